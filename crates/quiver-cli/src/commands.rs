//! One handler per command: validate the raw arguments, call the store, print.

use std::fs::File;
use std::io::{BufRead, BufReader, BufWriter, IsTerminal, Write};

use anyhow::{anyhow, bail, Context, Result};
use quiver_core::Strategy;
use quiver_store::{check_record, CollectionSpec, Record, Resolution, Store};

use crate::args::{
    BenchCmd, Cli, CollectionCmd, Command, ConflictsCmd, MemoryCmd, PeersCmd, SchemaCmd, TableCmd,
    TokenCmd,
};
use crate::output::{self, cell};

pub fn run(cli: Cli) -> Result<()> {
    let json = cli.json;
    let db = cli.db.clone();
    let open = || Store::open(&db).with_context(|| format!("opening {}", db.display()));
    // Commands that only read work on a store this user may not write.
    let read = || {
        match Store::open(&db) {
            Err(quiver_store::StoreError::ReadOnly { .. }) => Store::open_read_only(&db),
            other => other,
        }
        .with_context(|| format!("opening {}", db.display()))
    };
    match cli.command {
        Command::Init { name, sans } => {
            let mut s = Store::init(&db)?;
            if let Some(n) = name {
                s.set_node_name(&n)?;
            }
            let fp = quiver_sync::tls::create_identity(&db, &sans)?;
            let (cert, _) = quiver_sync::tls::identity_paths(&db);
            if json {
                output::json(&serde_json::json!({
                    "path": db, "site_id": s.site_id().to_hex(), "certificate": cert, "fingerprint": fp
                }))?;
            } else {
                println!("initialised {} (site {})", db.display(), s.site_id());
                println!("certificate {} (SHA-256 {fp})", cert.display());
            }
        }
        Command::Serve(a) => crate::net::serve(&db, a, json)?,
        Command::Sync(a) => crate::net::sync(&db, a, json)?,
        Command::Ping { addr, token, trust } => crate::net::ping(&db, &addr, token, &trust, json)?,
        Command::Clone {
            addr,
            token,
            name,
            trust,
        } => crate::net::clone(&db, &addr, token, name, &trust, json)?,
        Command::Collection(CollectionCmd::List) => list_tables(&read()?, json, true)?,
        Command::Collection(c) => collection(open()?, c, json)?,
        Command::Put {
            collection,
            id,
            vector,
            meta,
            content,
        } => {
            let mut s = open()?;
            let mut r = Record::new(&id, parse_vector(&vector)?);
            if let Some(m) = meta {
                r.metadata = serde_json::from_str(&m)
                    .map_err(|e| anyhow!("--meta is not valid JSON: {e}"))?;
            }
            r.content = content;
            s.put(&collection, &r)?;
            if json {
                output::json(&serde_json::json!({"put": {"collection": collection, "id": id}}))?;
            } else {
                println!("put {collection}/{id}");
            }
        }
        Command::Get { collection, id } => {
            let s = read()?;
            match s.get(&collection, &id)? {
                Some(r) if json => output::json(&r)?,
                Some(r) => {
                    println!("id:       {}", r.id);
                    println!("vector:   {}", serde_json::to_string(&r.vector)?);
                    println!("metadata: {}", r.metadata);
                    println!("content:  {}", r.content.as_deref().unwrap_or("-"));
                }
                None => bail!("no record {id:?} in collection {collection:?}"),
            }
        }
        Command::Delete { collection, id } => {
            let mut s = open()?;
            if !s.delete(&collection, &id)? {
                bail!("no record {id:?} in collection {collection:?}");
            }
            if json {
                output::json(
                    &serde_json::json!({"deleted": {"collection": collection, "id": id}}),
                )?;
            } else {
                println!("deleted {collection}/{id}");
            }
        }
        Command::Import {
            collection,
            file,
            batch,
            skip_bad,
        } => import(
            open()?,
            &collection,
            &file,
            ImportOpts {
                batch: batch.max(1),
                skip_bad,
            },
            json,
        )?,
        Command::Export { collection, out } => {
            let s = read()?;
            let n = match out {
                Some(path) => {
                    let mut w = BufWriter::new(
                        File::create(&path)
                            .with_context(|| format!("creating {}", path.display()))?,
                    );
                    let n = s.export(&collection, &mut w)?;
                    w.flush()?;
                    n
                }
                None => {
                    let stdout = std::io::stdout();
                    let mut w = BufWriter::new(stdout.lock());
                    let n = s.export(&collection, &mut w)?;
                    w.flush()?;
                    n
                }
            };
            if std::io::stderr().is_terminal() {
                eprintln!("exported {n} rows");
            }
        }
        Command::Sql { sql } => {
            let mut s = read()?;
            let results = match s.run_sql(&sql) {
                Err(quiver_store::StoreError::Sqlite(e))
                    if e.sqlite_error_code() == Some(rusqlite::ErrorCode::ReadOnly) =>
                {
                    return Err(quiver_store::StoreError::ReadOnly { path: db.clone() }.into())
                }
                other => other?,
            };
            // One statement's result a line under --json; a blank line
            // between the tables of several queries.
            let mut first = true;
            for result in &results {
                match result {
                    Some((names, rows)) if json => {
                        let out: Vec<serde_json::Map<String, serde_json::Value>> = rows
                            .iter()
                            .map(|r| {
                                names
                                    .iter()
                                    .cloned()
                                    .zip(r.iter().map(quiver_store::value_to_json))
                                    .collect()
                            })
                            .collect();
                        output::json(&out)?;
                    }
                    Some((names, rows)) => {
                        if !first {
                            println!();
                        }
                        let headers: Vec<&str> = names.iter().map(String::as_str).collect();
                        let rows: Vec<Vec<String>> =
                            rows.iter().map(|r| r.iter().map(cell).collect()).collect();
                        output::table(&headers, &rows);
                        first = false;
                    }
                    None => {}
                }
            }
            if results.iter().all(Option::is_none) {
                if json {
                    output::json(&serde_json::json!({"ok": true}))?;
                } else {
                    println!("ok");
                }
            }
        }
        Command::Table(TableCmd::Add {
            table,
            shard,
            strategy,
            column,
            references,
            on_delete,
        }) => {
            let mut s = open()?;
            let on_delete: quiver_core::OnDelete = on_delete.parse()?;
            let opts = quiver_store::TableOptions {
                policies: column
                    .iter()
                    .map(|c| parse_rule(c))
                    .collect::<Result<_>>()?,
                references: references
                    .iter()
                    .map(|r| parse_reference(r, on_delete))
                    .collect::<Result<_>>()?,
            };
            let t = s.add_table_with(&table, &shard, parse_strategy(&strategy)?, &opts)?;
            if json {
                output::json(&t)?;
            } else {
                println!(
                    "replicating table {} in shard {} ({})",
                    t.name, t.shard, t.strategy
                );
            }
        }
        Command::Table(TableCmd::List) => list_tables(&read()?, json, false)?,
        Command::Table(TableCmd::DropColumn { table, column }) => {
            let t = open()?.drop_column(&table, &column)?;
            if json {
                output::json(&t)?;
            } else {
                println!(
                    "dropped {table}.{column} here (schema version {}); peers keep it, and what they send for it is ignored here",
                    t.schema_version
                );
            }
        }
        Command::Table(TableCmd::Policy { table, rule }) => {
            let mut s = open()?;
            let (col, policy) = parse_rule(&rule)?;
            let t = s.set_column_policy(&table, &col, policy)?;
            if json {
                output::json(&t)?;
            } else {
                println!(
                    "{table}.{col} now merges by {policy} (schema version {}; peers take the rule at their next sync)",
                    t.schema_version
                );
            }
        }
        Command::Schema(SchemaCmd::Conflicts) => {
            let list = read()?.schema_conflicts()?;
            if json {
                output::json(&list)?;
            } else if list.is_empty() {
                println!("no schema conflicts");
            } else {
                let rows: Vec<Vec<String>> = list
                    .iter()
                    .map(|c| {
                        vec![
                            format!("{}.{}", c.table, c.column),
                            c.shard.clone(),
                            c.ours.clone(),
                            c.theirs.clone(),
                            c.peer.clone().unwrap_or_default(),
                        ]
                    })
                    .collect();
                output::table(&["column", "shard", "ours", "theirs", "peer"], &rows);
            }
        }
        Command::Schema(SchemaCmd::Resolve { column, keep }) => {
            let (table, col) = column.split_once('.').ok_or_else(|| {
                anyhow!("name the column as TABLE.COLUMN, e.g. tasks.size (got {column:?})")
            })?;
            let keep = match keep.as_str() {
                "ours" => quiver_store::Keep::Ours,
                "theirs" => quiver_store::Keep::Theirs,
                other => return Err(anyhow!("--keep takes ours or theirs, not {other:?}")),
            };
            let r = open()?.resolve_schema_conflict(table, col, keep)?;
            if json {
                output::json(&r)?;
            } else {
                println!(
                    "{}.{}: kept {}{}",
                    r.table,
                    r.column,
                    r.kept,
                    if r.values_discarded > 0 {
                        format!(
                            "; {} value(s) of this replica's column were discarded",
                            r.values_discarded
                        )
                    } else if keep == quiver_store::Keep::Ours {
                        "; the peer must resolve with --keep theirs before the shard syncs".into()
                    } else {
                        String::new()
                    }
                );
            }
        }
        Command::Memory(MemoryCmd::Init) => {
            let mut s = open()?;
            let tables = s.init_memory()?;
            if json {
                output::json(&tables)?;
            } else {
                println!("created agent memory (episodes, skills, edges) in shard memory");
            }
        }
        Command::Conflicts(c @ ConflictsCmd::List { .. }) => conflicts(read()?, c, json)?,
        Command::Conflicts(c) => conflicts(open()?, c, json)?,
        Command::Search(a) => crate::search_cmd::run(&read()?, a, json)?,
        Command::Status { server: None } => status(&read()?, json)?,
        Command::Compact {
            shard,
            dry_run,
            peer_horizon_days,
        } => compact(
            &mut open()?,
            &quiver_store::CompactOptions {
                shard,
                dry_run,
                peer_horizon_days,
                max_tombstones: None,
            },
            json,
        )?,
        Command::Status { server: Some(addr) } => crate::net::server_status(&addr, json)?,
        Command::Peers(p @ PeersCmd::List) => peers(read()?, p, json)?,
        Command::Peers(p) => peers(open()?, p, json)?,
        Command::Token(t @ TokenCmd::List) => token(read()?, t, json)?,
        Command::Token(t) => token(open()?, t, json)?,
        Command::Config(crate::args::ConfigCmd::Show { config }) => {
            crate::net::config_show(config.as_deref(), json)?
        }
        Command::Watch { shard } => crate::net::watch(open()?, shard)?,
        Command::Demo { rows } => crate::demo::run(rows, json)?,
        Command::Bench(BenchCmd::Write {
            n,
            dim,
            batch,
            policies,
        }) => {
            if policies {
                crate::bench::write_policies(n, dim, batch, json)?
            } else {
                crate::bench::write(n, dim, batch, json)?
            }
        }
        Command::Bench(BenchCmd::Search(a)) => crate::bench_search::run(&db, a, json)?,
        Command::Bench(BenchCmd::Live { writes, bursts }) => {
            crate::bench_live::run(writes, bursts, json)?
        }
        Command::Bench(BenchCmd::Sync {
            n,
            dim,
            mode,
            transport,
        }) => crate::bench_sync::sync(n, dim, &mode, transport, json)?,
        Command::Bench(BenchCmd::Apply { n }) => crate::bench_sync::apply(n, json)?,
        Command::Bench(BenchCmd::Conflicts { n }) => crate::bench_sync::conflicts(n, json)?,
        Command::Bench(BenchCmd::Compact { n }) => crate::bench::compact(n, json)?,
        Command::Bench(BenchCmd::Load {
            clients,
            rows,
            transport,
        }) => crate::bench_load::run(clients, rows, transport, json)?,
    }
    Ok(())
}

fn parse_strategy(s: &str) -> Result<Strategy> {
    Ok(s.parse::<Strategy>()?)
}

/// `COLUMN=RULE`, as `--column views=counter`.
fn parse_rule(s: &str) -> Result<(String, Strategy)> {
    let (col, rule) = s
        .split_once('=')
        .ok_or_else(|| anyhow!("expected COLUMN=RULE (e.g. views=counter), got {s:?}"))?;
    Ok((col.to_string(), parse_strategy(rule)?))
}

/// `COLUMN=TABLE.COLUMN`, as `--references src=nodes.id`.
fn parse_reference(
    s: &str,
    on_delete: quiver_core::OnDelete,
) -> Result<(String, quiver_core::Reference)> {
    let bad = || anyhow!("expected COLUMN=TABLE.COLUMN (e.g. src=episodes.id), got {s:?}");
    let (col, target) = s.split_once('=').ok_or_else(bad)?;
    let (table, column) = target.split_once('.').ok_or_else(bad)?;
    Ok((
        col.to_string(),
        quiver_core::Reference {
            table: table.to_string(),
            column: column.to_string(),
            on_delete,
        },
    ))
}

fn parse_vector(s: &str) -> Result<Vec<f32>> {
    serde_json::from_str::<Vec<f32>>(s)
        .map_err(|e| anyhow!("--vector must be a JSON array of numbers, e.g. '[0.1, 0.2]': {e}"))
}

fn collection(mut s: Store, c: CollectionCmd, json: bool) -> Result<()> {
    match c {
        CollectionCmd::Create {
            name,
            dim,
            metric,
            strategy,
            shard,
        } => {
            let spec = CollectionSpec {
                name,
                dim,
                metric: metric.parse()?,
                strategy: parse_strategy(&strategy)?,
                shard,
            };
            let t = s.create_collection(&spec)?;
            if json {
                output::json(&t)?;
            } else {
                println!(
                    "created collection {} (dim {}, {}, {}, shard {})",
                    t.name, dim, spec.metric, t.strategy, t.shard
                );
            }
        }
        CollectionCmd::List => list_tables(&s, json, true)?,
        CollectionCmd::Drop { name } => {
            s.drop_collection(&name)?;
            if json {
                output::json(&serde_json::json!({"dropped": name}))?;
            } else {
                println!("dropped collection {name}");
            }
        }
    }
    Ok(())
}

/// `  [views=counter, src->nodes.id (cascade)]`, or nothing.
fn column_notes(policies: &[String], references: &[String]) -> String {
    let all: Vec<&str> = policies
        .iter()
        .chain(references)
        .map(String::as_str)
        .collect();
    if all.is_empty() {
        String::new()
    } else {
        format!("  [{}]", all.join(", "))
    }
}

fn list_tables(s: &Store, json: bool, collections_only: bool) -> Result<()> {
    let tables: Vec<_> = s
        .tables()?
        .into_iter()
        .filter(|t| !collections_only || t.kind == quiver_store::TableKind::Collection)
        .collect();
    if json {
        let out: Vec<serde_json::Value> = tables
            .iter()
            .map(|t| {
                let mut v = serde_json::to_value(t).unwrap_or_default();
                v["rows"] = s.count(&t.name).unwrap_or(0).into();
                v
            })
            .collect();
        return output::json(&out);
    }
    let rows: Vec<Vec<String>> = tables
        .iter()
        .map(|t| {
            let (policies, references) = (t.policy_notes(), t.reference_notes());
            let columns = column_notes(&policies, &references);
            vec![
                t.name.clone(),
                format!("{:?}", t.kind).to_lowercase(),
                t.shard.clone(),
                t.strategy.to_string(),
                t.dim.map_or("-".into(), |d| d.to_string()),
                t.metric.map_or_else(|| "-".into(), |m| m.to_string()),
                s.count(&t.name).map(|n| n.to_string()).unwrap_or_default(),
                columns
                    .trim()
                    .trim_start_matches('[')
                    .trim_end_matches(']')
                    .to_string(),
            ]
        })
        .collect();
    output::table(
        &[
            "name", "kind", "shard", "strategy", "dim", "metric", "rows", "columns",
        ],
        &rows,
    );
    Ok(())
}

/// How an import went: rows written, records equal to what the store held,
/// and the lines skipped with `--skip-bad` (number and reason).
#[derive(Default, serde::Serialize)]
struct Imported {
    imported: usize,
    unchanged: usize,
    skipped: Vec<usize>,
    #[serde(skip)]
    reasons: Vec<String>,
}

fn import(
    mut s: Store,
    coll: &str,
    path: &std::path::Path,
    opts: ImportOpts,
    json: bool,
) -> Result<()> {
    let info = s.collection(coll)?;
    let file = File::open(path).with_context(|| format!("opening {}", path.display()))?;
    let size = file.metadata().map(|m| m.len()).unwrap_or(0);
    let progress = output::Progress::bytes(size, "importing", json);
    let mut records = Vec::with_capacity(opts.batch);
    let mut done = Imported::default();
    let mut read = 0u64;
    let flush = |s: &mut Store, records: &mut Vec<Record>, done: &mut Imported| -> Result<()> {
        let n = s.put_many(coll, records)?;
        done.imported += n;
        done.unchanged += records.len() - n;
        records.clear();
        Ok(())
    };
    for (i, line) in BufReader::new(file).lines().enumerate() {
        let line = line.with_context(|| format!("reading line {}", i + 1))?;
        read += line.len() as u64 + 1;
        if line.trim().is_empty() {
            continue;
        }
        match Record::from_json(&line).and_then(|r| check_record(&info, &r).map(|_| r)) {
            Ok(r) => records.push(r),
            Err(e) if opts.skip_bad => {
                done.skipped.push(i + 1);
                done.reasons.push(format!("line {}: {e}", i + 1));
            }
            Err(e) => bail!(
                "line {}: {e}. {} records were written before it, none of its batch; fix the \
                 line and run the same command again (records already imported are left as \
                 they are), or pass --skip-bad to import the good lines and list the bad ones",
                i + 1,
                done.imported + done.unchanged
            ),
        }
        if records.len() == opts.batch {
            flush(&mut s, &mut records, &mut done)?;
            progress.at(read, done.imported + done.unchanged, "records");
        }
    }
    flush(&mut s, &mut records, &mut done)?;
    progress.finish();
    if json {
        return output::json(&done);
    }
    for r in &done.reasons {
        eprintln!("skipped {r}");
    }
    print!("imported {} records into {coll}", done.imported);
    if done.unchanged > 0 {
        print!(" ({} already held unchanged)", done.unchanged);
    }
    println!();
    if !done.skipped.is_empty() {
        let lines: Vec<String> = done.skipped.iter().map(ToString::to_string).collect();
        println!(
            "skipped {} bad line{}: {}",
            lines.len(),
            if lines.len() == 1 { "" } else { "s" },
            lines.join(", ")
        );
    }
    Ok(())
}

/// `import`'s options.
struct ImportOpts {
    batch: usize,
    skip_bad: bool,
}

fn conflicts(mut s: Store, c: ConflictsCmd, json: bool) -> Result<()> {
    match c {
        ConflictsCmd::List { shard, all } => {
            let list = if all {
                s.conflicts(shard.as_deref())?
            } else {
                s.get_unresolved_conflicts(shard.as_deref())?
            };
            if json {
                return output::json(&list);
            }
            if list.is_empty() {
                println!("no {}conflicts", if all { "" } else { "open " });
            }
            for c in list {
                println!(
                    "#{} {}.{} [{}] ({}){}",
                    c.id,
                    c.table,
                    c.column,
                    c.pk,
                    c.strategy,
                    c.resolution
                        .map(|r| format!(" resolved: {r}"))
                        .unwrap_or_default()
                );
                for v in c.versions {
                    println!(
                        "    {} hlc {} {}{}",
                        v.version,
                        v.hlc,
                        v.value,
                        if v.kept { " (kept)" } else { "" }
                    );
                }
            }
        }
        ConflictsCmd::Resolve(a) => {
            let choice = match (a.keep, a.value) {
                (Some(k), _) => Resolution::Keep(k),
                (None, Some(v)) => {
                    let j: serde_json::Value = serde_json::from_str(&v)
                        .map_err(|e| anyhow!("--value is not valid JSON: {e}"))?;
                    Resolution::Value(s.conflict_value(a.id, &j)?)
                }
                (None, None) => bail!("give --keep VERSION or --value VALUE"),
            };
            s.resolve(a.id, choice)?;
            if json {
                output::json(&serde_json::json!({"resolved": a.id}))?;
            } else {
                println!("resolved conflict {}", a.id);
            }
        }
    }
    Ok(())
}

fn token(mut s: Store, t: TokenCmd, json: bool) -> Result<()> {
    match t {
        TokenCmd::Create {
            shards,
            read_only,
            label,
        } => {
            let token = quiver_sync::auth::generate_token();
            let id = s.add_token(
                &quiver_sync::auth::hash_token(&token),
                &shards,
                read_only,
                label.as_deref(),
            )?;
            if json {
                output::json(
                    &serde_json::json!({"id": id, "token": token, "shards": shards, "read_only": read_only}),
                )?;
            } else {
                println!("{token}");
                eprintln!(
                    "token {id}: {} on {} (shown once; only its hash is kept)",
                    if read_only { "read-only" } else { "read-write" },
                    if shards.is_empty() {
                        "all shards".to_string()
                    } else {
                        shards.join(", ")
                    }
                );
            }
        }
        TokenCmd::List => {
            let list = s.tokens()?;
            if json {
                let shown: Vec<serde_json::Value> = list
                    .iter()
                    .map(|t| serde_json::json!({"id": t.id, "shards": t.shards, "read_only": t.read_only, "label": t.label, "created_at": t.created_at}))
                    .collect();
                return output::json(&shown);
            }
            let rows: Vec<Vec<String>> = list
                .iter()
                .map(|t| {
                    vec![
                        t.id.to_string(),
                        if t.shards.is_empty() {
                            "all".into()
                        } else {
                            t.shards.join(",")
                        },
                        if t.read_only {
                            "read-only"
                        } else {
                            "read-write"
                        }
                        .into(),
                        t.label.clone().unwrap_or_default(),
                    ]
                })
                .collect();
            output::table(&["id", "shards", "access", "label"], &rows);
        }
        TokenCmd::Revoke { id } => {
            if !s.revoke_token(id)? {
                bail!("no token {id}");
            }
            if json {
                output::json(&serde_json::json!({"revoked": id}))?;
            } else {
                println!("revoked token {id}");
            }
        }
    }
    Ok(())
}

fn peers(mut s: Store, p: PeersCmd, json: bool) -> Result<()> {
    match p {
        PeersCmd::Add {
            node,
            addr,
            shards,
            token,
            pin,
        } => {
            let mut rec = quiver_store::PeerRecord::new(&node, &addr, shards);
            rec.token = token;
            rec.pin = pin.map(|p| quiver_sync::tls::parse_pin(&p)).transpose()?;
            s.register_peer(&rec)?;
            if json {
                output::json(&serde_json::json!({"registered": {"node": node, "addr": addr}}))?;
            } else {
                println!("registered peer {node} at {addr}");
            }
        }
        PeersCmd::List => {
            let list = s.peers()?;
            if json {
                // Tokens are secrets: never printed.
                let shown: Vec<serde_json::Value> = list
                    .iter()
                    .map(|p| {
                        let mut v = serde_json::to_value(p).unwrap_or_default();
                        v["token"] = serde_json::Value::Bool(p.token.is_some());
                        v
                    })
                    .collect();
                return output::json(&shown);
            }
            let rows: Vec<Vec<String>> = list
                .iter()
                .map(|p| {
                    vec![
                        p.node.clone(),
                        p.addr.clone(),
                        if p.shards.is_empty() {
                            "all".into()
                        } else {
                            p.shards.join(",")
                        },
                        if p.beyond_horizon {
                            format!("{} (beyond the horizon)", p.status)
                        } else {
                            p.status.clone()
                        },
                        p.last_error.clone().unwrap_or_default(),
                    ]
                })
                .collect();
            output::table(&["node", "addr", "shards", "status", "last error"], &rows);
        }
        PeersCmd::Remove { node } => {
            if !s.unregister_peer(&node)? {
                bail!("no peer {node:?} is registered");
            }
            if json {
                output::json(&serde_json::json!({"removed": node}))?;
            } else {
                println!("removed peer {node}");
            }
        }
    }
    Ok(())
}

fn status(s: &Store, json: bool) -> Result<()> {
    let st = s.status()?;
    let peers = s.peers()?;
    if json {
        let mut v = serde_json::to_value(&st)?;
        v["peers"] = peers
            .iter()
            .map(|p| serde_json::json!({"node": p.node, "addr": p.addr, "status": p.status, "last_contact": p.last_contact, "last_error": p.last_error}))
            .collect();
        return output::json(&v);
    }
    for p in &peers {
        println!(
            "peer       {} {} {}{}",
            p.node,
            p.addr,
            p.status,
            p.last_error
                .as_ref()
                .map(|e| format!(" ({e})"))
                .unwrap_or_default()
        );
    }
    println!("store      {}", st.path);
    println!("site       {}", st.site_id);
    if let Some(n) = &st.node_name {
        println!("node       {n}");
    }
    println!("db_version {}", st.db_version);
    println!("conflicts  {} open", st.open_conflicts);
    println!(
        "syncs      {} (sent {}, received {}){}",
        st.sync.sync_count,
        st.sync.total_sent,
        st.sync.total_received,
        st.sync
            .last_error
            .as_ref()
            .map(|e| format!(", last error: {e}"))
            .unwrap_or_default()
    );
    if let Some(c) = &st.coordinator {
        let n = |k: &str| c[k].as_f64().unwrap_or(0.0);
        println!(
            "peers      {} syncs and live rounds ({} failed), avg {:.1} ms, p95 {:.1} ms, \
             bytes out {} in {}, {} conflicts (the daemon's coordinator)",
            n("total_syncs"),
            n("failures"),
            n("avg_duration_ms"),
            n("p95_duration_ms"),
            n("bytes_sent"),
            n("bytes_received"),
            n("conflicts")
        );
    }
    for sh in &st.shards {
        println!("\nshard {}", sh.name);
        for (site, v) in &sh.version_vector {
            println!("  vv  {site} = {v}");
        }
        println!("  schema version {}", sh.schema_version);
        for t in &sh.tables {
            println!(
                "  {:<20} {:<10} {:>8} rows  {}{}{}",
                t.name,
                format!("{:?}", t.kind).to_lowercase(),
                t.rows,
                t.strategy,
                t.dim
                    .map(|d| format!(
                        "  dim {d} {}",
                        t.metric.map(quiver_core::Metric::as_str).unwrap_or("")
                    ))
                    .unwrap_or_default(),
                column_notes(&t.policies, &t.references)
            );
        }
        for a in &sh.acks {
            let ago = format!(
                "{} s ago",
                quiver_store::wall_ms().saturating_sub(a.at_ms) / 1000
            );
            let short = &a.site[..a.site.len().min(8)];
            if a.beyond_horizon {
                println!(
                    "  ack  {} ({short}) beyond the horizon: silent since {ago}, no longer holds compaction back",
                    a.node
                );
            } else if a.behind == 0 {
                println!("  ack  {} ({short}) holds all of it, as of {ago}", a.node);
            } else {
                println!(
                    "  ack  {} ({short}) lacked {} version(s) of it, as of {ago}",
                    a.node, a.behind
                );
            }
        }
        if sh.held > 0 {
            println!(
                "  held       {} change(s) for tables or columns not known here yet; applied when their schema arrives",
                sh.held
            );
        }
        for c in &sh.schema_conflicts {
            println!(
                "  SCHEMA CONFLICT {}.{}: {} here, {} at {}; this shard does not sync until \
                 `quiver schema resolve {}.{} --keep ours|theirs`",
                c.table,
                c.column,
                c.ours,
                c.theirs,
                c.peer.as_deref().unwrap_or("a peer"),
                c.table,
                c.column
            );
        }
        for d in &sh.dangling {
            println!(
                "  dangling   {}.{} -> {}: {} row(s) point at nothing: {}",
                d.table,
                d.column,
                d.references,
                d.keys.len(),
                d.keys
                    .iter()
                    .take(10)
                    .cloned()
                    .collect::<Vec<_>>()
                    .join(", ")
            );
        }
    }
    Ok(())
}

/// `quiver compact`: one pass, reported per shard.
fn compact(store: &mut Store, opts: &quiver_store::CompactOptions, json: bool) -> Result<()> {
    let r = store.compact(opts)?;
    if json {
        return crate::output::json(&r);
    }
    let verb = if r.dry_run { "would purge" } else { "purged" };
    for s in &r.shards {
        println!(
            "{}: {verb} {} tombstone(s), {} superseded record(s), {} resolved conflict(s); {} clock record(s) {}",
            s.shard,
            s.tombstones,
            s.superseded,
            s.conflicts,
            if r.dry_run { s.clock_records_before } else { s.clock_records_after },
            if r.dry_run { "now" } else { "left" },
        );
        for h in &s.held_by {
            println!(
                "  held back: {} record(s) not acknowledged by {} ({}), whose last sync ended {} s ago",
                h.records,
                h.node,
                &h.site[..h.site.len().min(8)],
                quiver_store::wall_ms().saturating_sub(h.since_ms) / 1000
            );
        }
        for b in &s.beyond_horizon {
            println!(
                "  beyond the horizon ({} days): {} ({}), silent for {} s, not waited for",
                r.peer_horizon_days,
                b.node,
                &b.site[..b.site.len().min(8)],
                quiver_store::wall_ms().saturating_sub(b.last_ack_ms) / 1000
            );
        }
    }
    if !r.dry_run {
        println!(
            "file {} -> {} bytes (space given back by {}), {:.3} s",
            r.bytes_before, r.bytes_after, r.space, r.seconds
        );
    }
    Ok(())
}

//! Schema changes: noticed from any writer, carried between replicas,
//! changes of a newer schema held, per-column rules, references kept whole.

mod common;

use common::{export, pull};
use quiver_core::{OnDelete, Reference, Strategy};
use quiver_store::{Keep, Store, StoreError, TableOptions};

type R = Result<(), Box<dyn std::error::Error>>;

fn store(dir: &tempfile::TempDir, name: &str) -> Store {
    Store::init(dir.path().join(format!("{name}.db"))).unwrap()
}

/// Another writer's connection to the same file, as the `sqlite3` shell.
fn shell(s: &Store, sql: &str) {
    let c = rusqlite::Connection::open(s.path()).unwrap();
    c.execute_batch(sql).unwrap();
}

/// What a sync's stream start does: each side merges the other's
/// definitions of the shard, then the changes flow both ways.
fn sync(a: &mut Store, b: &mut Store, shard: &str) {
    let defs_b: Vec<_> = b
        .shard_tables(shard)
        .unwrap()
        .iter()
        .map(|t| t.def())
        .collect();
    for d in &defs_b {
        a.merge_table_def(shard, d, Some("b")).unwrap();
    }
    let defs_a: Vec<_> = a
        .shard_tables(shard)
        .unwrap()
        .iter()
        .map(|t| t.def())
        .collect();
    for d in &defs_a {
        b.merge_table_def(shard, d, Some("a")).unwrap();
    }
    pull(a, b, shard);
    pull(b, a, shard);
}

fn tasks(dir: &tempfile::TempDir) -> (Store, Store) {
    let mut a = store(dir, "a");
    let mut b = store(dir, "b");
    a.execute_sql("CREATE TABLE tasks(id TEXT PRIMARY KEY, title TEXT)")
        .unwrap();
    a.add_table("tasks", "default", Strategy::Lww).unwrap();
    a.execute_sql("INSERT INTO tasks VALUES('t1','one')")
        .unwrap();
    sync(&mut a, &mut b, "default");
    (a, b)
}

#[test]
fn a_column_added_by_another_writer_is_captured_and_travels() -> R {
    let dir = tempfile::tempdir()?;
    let (mut a, mut b) = tasks(&dir);
    let before = a.table("tasks")?.schema_version;
    shell(
        &a,
        "ALTER TABLE tasks ADD COLUMN prio INTEGER;
         UPDATE tasks SET prio = 5 WHERE id = 't1';
         INSERT INTO tasks VALUES('t2', 'two', 3);",
    );
    let t = a.table("tasks")?;
    assert!(
        t.column("prio").is_some(),
        "the added column is in the catalog"
    );
    assert!(
        t.schema_version > before,
        "the change is a new schema version"
    );
    let out = export(&a, "tasks");
    assert!(
        out.contains(r#""prio":5"#) && out.contains(r#""prio":3"#),
        "{out}"
    );
    sync(&mut a, &mut b, "default");
    assert_eq!(export(&a, "tasks"), export(&b, "tasks"));
    // Captured from now on, on both sides, also from SQL.
    shell(&b, "UPDATE tasks SET prio = 9 WHERE id = 't2'");
    sync(&mut a, &mut b, "default");
    assert!(export(&a, "tasks").contains(r#""prio":9"#));
    Ok(())
}

#[test]
fn concurrent_added_columns_both_survive_in_the_same_order() -> R {
    let dir = tempfile::tempdir()?;
    let (mut a, mut b) = tasks(&dir);
    shell(
        &a,
        "ALTER TABLE tasks ADD COLUMN owner TEXT; UPDATE tasks SET owner = 'ann'",
    );
    shell(
        &b,
        "ALTER TABLE tasks ADD COLUMN due TEXT DEFAULT 'never'; UPDATE tasks SET due = 'mon'",
    );
    sync(&mut a, &mut b, "default");
    sync(&mut a, &mut b, "default");
    let (ea, eb) = (export(&a, "tasks"), export(&b, "tasks"));
    assert_eq!(ea, eb);
    assert!(ea.contains("ann") && ea.contains("mon"), "{ea}");
    let names = |s: &Store| -> Vec<String> {
        s.table("tasks")
            .unwrap()
            .columns
            .iter()
            .map(|c| c.name.clone())
            .collect()
    };
    assert_eq!(names(&a), names(&b));
    // The default travelled with the column: a new row on A gets it.
    a.execute_sql("INSERT INTO tasks(id, title) VALUES('t9', 'nine')")?;
    assert!(export(&a, "tasks").contains(r#""due":"never""#));
    Ok(())
}

#[test]
fn changes_a_peer_cannot_follow_are_refused_with_the_way_out() -> R {
    let dir = tempfile::tempdir()?;
    let (a, _b) = tasks(&dir);
    shell(&a, "ALTER TABLE tasks RENAME COLUMN title TO name");
    let err = a.table("tasks").unwrap_err().to_string();
    assert!(
        err.contains("rename") && err.contains("Rename it back"),
        "{err}"
    );
    shell(&a, "ALTER TABLE tasks RENAME COLUMN name TO title");
    assert!(a.table("tasks").is_ok(), "renamed back, all is well");
    // A type change needs a rebuild, which also drops the capture.
    shell(
        &a,
        "CREATE TABLE t2(id TEXT PRIMARY KEY, title INTEGER); INSERT INTO t2 SELECT * FROM tasks;
         DROP TABLE tasks; ALTER TABLE t2 RENAME TO tasks;",
    );
    let err = a.table("tasks").unwrap_err().to_string();
    assert!(err.contains("changed type from TEXT to INTEGER"), "{err}");
    Ok(())
}

#[test]
fn newer_schema_changes_are_held_until_their_column_arrives() -> R {
    let dir = tempfile::tempdir()?;
    let (a, mut b) = tasks(&dir);
    shell(
        &a,
        "ALTER TABLE tasks ADD COLUMN prio INTEGER; UPDATE tasks SET prio = 7",
    );
    a.refresh_schema()?;
    // Changes only, no definitions (as a live push delivers them).
    let r = pull(&mut b, &a, "default");
    assert!(r.held > 0, "{r:?}");
    assert_eq!(b.held_count(Some("default"))?, r.held);
    // B claims what it holds, and passes it on: a third replica on B's
    // schema receives the held changes from B.
    let mut c = store(&dir, "c");
    for d in b.shard_tables("default")?.iter().map(|t| t.def()) {
        c.merge_table_def("default", &d, None)?;
    }
    assert!(pull(&mut c, &b, "default").held > 0);
    for d in a.shard_tables("default")?.iter().map(|t| t.def()) {
        b.merge_table_def("default", &d, None)?;
    }
    let replayed = b.replay_held(Some("default"))?;
    assert!(replayed.applied > 0);
    assert_eq!(b.held_count(None)?, 0);
    assert_eq!(export(&a, "tasks"), export(&b, "tasks"));
    Ok(())
}

#[test]
fn the_same_column_with_two_types_is_a_schema_conflict_until_resolved() -> R {
    let dir = tempfile::tempdir()?;
    let (mut a, mut b) = tasks(&dir);
    shell(
        &a,
        "ALTER TABLE tasks ADD COLUMN size INTEGER; UPDATE tasks SET size = 1",
    );
    shell(
        &b,
        "ALTER TABLE tasks ADD COLUMN size TEXT; UPDATE tasks SET size = 'big'",
    );
    let d = a.table("tasks")?.def();
    let err = b.merge_table_def("default", &d, Some("a")).unwrap_err();
    assert!(matches!(err, StoreError::SchemaConflict { .. }), "{err}");
    let open = b.schema_conflicts()?;
    assert_eq!(open.len(), 1);
    assert_eq!(
        (open[0].ours.as_str(), open[0].theirs.as_str()),
        ("TEXT", "INTEGER")
    );
    let res = b.resolve_schema_conflict("tasks", "size", Keep::Theirs)?;
    assert_eq!(res.values_discarded, 1);
    assert!(b.schema_conflicts()?.is_empty());
    sync(&mut a, &mut b, "default");
    assert_eq!(export(&a, "tasks"), export(&b, "tasks"));
    assert!(export(&b, "tasks").contains(r#""size":1"#));
    Ok(())
}

#[test]
fn counter_increments_on_three_replicas_add_up() -> R {
    let dir = tempfile::tempdir()?;
    let mut s: Vec<Store> = ["a", "b", "c"].iter().map(|n| store(&dir, n)).collect();
    s[0].execute_sql(
        "CREATE TABLE stats(id TEXT PRIMARY KEY, views INTEGER NOT NULL DEFAULT 0, title TEXT)",
    )?;
    let opts = TableOptions {
        policies: vec![
            ("views".into(), Strategy::Counter),
            ("title".into(), Strategy::Fww),
        ],
        ..Default::default()
    };
    s[0].add_table_with("stats", "default", Strategy::Lww, &opts)?;
    s[0].execute_sql("INSERT INTO stats VALUES('page', 10, 'first')")?;
    let (x, rest) = s.split_at_mut(1);
    sync(&mut rest[0], &mut x[0], "default");
    sync(&mut rest[1], &mut x[0], "default");
    assert_eq!(
        s[2].table("stats")?.column("views").unwrap().policy(),
        Some(Strategy::Counter)
    );
    for round in 0..4 {
        for (i, st) in s.iter().enumerate() {
            for _ in 0..=i {
                shell(st, "UPDATE stats SET views = views + 1 WHERE id = 'page'");
            }
            shell(
                st,
                &format!("UPDATE stats SET title = 't{i}{round}' WHERE id = 'page'"),
            );
        }
        // Sync in a different pattern each round.
        let (i, j) = [(0, 1), (1, 2), (2, 0), (0, 2)][round];
        let (lo, hi) = (i.min(j), i.max(j));
        let (p, q) = s.split_at_mut(hi);
        sync(&mut p[lo], &mut q[0], "default");
    }
    for _ in 0..2 {
        for (i, j) in [(0, 1), (1, 2), (0, 2)] {
            let (p, q) = s.split_at_mut(j);
            sync(&mut p[i], &mut q[0], "default");
        }
    }
    let e = export(&s[0], "stats");
    // 10 + 4 rounds × (1 + 2 + 3)
    assert!(e.contains(r#""views":34"#), "{e}");
    assert_eq!(e, export(&s[1], "stats"));
    assert_eq!(e, export(&s[2], "stats"));
    Ok(())
}

#[test]
fn references_cascade_across_a_merge_and_keep_reports_dangling() -> R {
    let dir = tempfile::tempdir()?;
    let mut a = store(&dir, "a");
    let mut b = store(&dir, "b");
    a.execute_sql(
        "CREATE TABLE nodes(id TEXT PRIMARY KEY, name TEXT);
         CREATE TABLE links(id TEXT PRIMARY KEY, src TEXT NOT NULL, dst TEXT NOT NULL);
         CREATE TABLE notes(id TEXT PRIMARY KEY, about TEXT);",
    )?;
    a.add_table("nodes", "default", Strategy::Lww)?;
    let to_node = |on_delete| Reference {
        table: "nodes".into(),
        column: "id".into(),
        on_delete,
    };
    a.add_table_with(
        "links",
        "default",
        Strategy::Lww,
        &TableOptions {
            references: vec![
                ("src".into(), to_node(OnDelete::Cascade)),
                ("dst".into(), to_node(OnDelete::Cascade)),
            ],
            ..Default::default()
        },
    )?;
    a.add_table_with(
        "notes",
        "default",
        Strategy::Lww,
        &TableOptions {
            references: vec![("about".into(), to_node(OnDelete::Keep))],
            ..Default::default()
        },
    )?;
    a.execute_sql("INSERT INTO nodes VALUES('n1','one'), ('n2','two')")?;
    sync(&mut a, &mut b, "default");
    // Concurrently: A deletes n1, B links to it.
    a.execute_sql("DELETE FROM nodes WHERE id = 'n1'")?;
    b.execute_sql(
        "INSERT INTO links VALUES('l1','n1','n2'), ('l2','n2','n2'); INSERT INTO notes VALUES('x','n1')",
    )?;
    sync(&mut a, &mut b, "default");
    sync(&mut a, &mut b, "default");
    for s in [&a, &b] {
        let e = export(s, "links");
        assert!(!e.contains("l1") && e.contains("l2"), "{e}");
        let d = s.dangling()?;
        assert_eq!(d.len(), 1, "{d:?}");
        assert_eq!(
            (d[0].table.as_str(), d[0].keys.as_slice()),
            ("notes", &["x".to_string()][..])
        );
    }
    assert_eq!(export(&a, "links"), export(&b, "links"));
    // A local delete cascades as it happens.
    a.execute_sql("DELETE FROM nodes WHERE id = 'n2'")?;
    assert!(!export(&a, "links").contains("l2"));
    sync(&mut a, &mut b, "default");
    assert_eq!(export(&b, "links"), "");
    Ok(())
}

#[test]
fn rules_are_checked_against_their_columns() -> R {
    let dir = tempfile::tempdir()?;
    let mut a = store(&dir, "a");
    a.execute_sql("CREATE TABLE t(id TEXT PRIMARY KEY, name TEXT, n INTEGER)")?;
    let with = |p: Vec<(&str, Strategy)>| TableOptions {
        policies: p.into_iter().map(|(c, s)| (c.to_string(), s)).collect(),
        ..Default::default()
    };
    let err = a.add_table_with(
        "t",
        "default",
        Strategy::Lww,
        &with(vec![("name", Strategy::Counter)]),
    );
    assert!(err
        .unwrap_err()
        .to_string()
        .contains("a counter needs an INTEGER or REAL column"));
    let err = a.add_table_with(
        "t",
        "default",
        Strategy::Lww,
        &with(vec![("nope", Strategy::Max)]),
    );
    assert!(err.unwrap_err().to_string().contains("no column \"nope\""));
    let err = a.add_table_with(
        "t",
        "default",
        Strategy::Lww,
        &with(vec![("id", Strategy::Max)]),
    );
    assert!(err.unwrap_err().to_string().contains("primary key"));
    a.add_table_with(
        "t",
        "default",
        Strategy::Lww,
        &with(vec![("n", Strategy::Max)]),
    )?;
    let v = a.table("t")?.schema_version;
    let t = a.set_column_policy("t", "name", Strategy::Fww)?;
    assert_eq!(t.column("name").unwrap().policy(), Some(Strategy::Fww));
    assert!(t.schema_version > v, "a change of rule is a schema change");
    a.execute_sql("CREATE TABLE fk(id TEXT PRIMARY KEY, t TEXT REFERENCES t(id))")?;
    let err = a
        .add_table("fk", "default", Strategy::Lww)
        .unwrap_err()
        .to_string();
    assert!(err.contains("--references"), "{err}");
    Ok(())
}

#[test]
fn a_dropped_column_stops_replicating_here_and_a_rebuilt_table_gets_capture_back() -> R {
    let dir = tempfile::tempdir()?;
    let (mut a, mut b) = tasks(&dir);
    shell(
        &a,
        "ALTER TABLE tasks ADD COLUMN prio INTEGER; UPDATE tasks SET prio = 1",
    );
    sync(&mut a, &mut b, "default");
    // SQLite refuses the plain statement while capture names the column.
    let c = rusqlite::Connection::open(a.path())?;
    let e = c
        .execute_batch("ALTER TABLE tasks DROP COLUMN prio")
        .unwrap_err();
    assert!(e.to_string().contains("quiver_upd_tasks"), "{e}");
    let t = a.drop_column("tasks", "prio")?;
    assert!(t.column("prio").is_none() && t.dropped == vec!["prio".to_string()]);
    shell(&b, "UPDATE tasks SET prio = 2");
    sync(&mut a, &mut b, "default");
    assert!(
        !export(&a, "tasks").contains("prio"),
        "a peer's values for it are ignored"
    );
    assert!(
        export(&b, "tasks").contains(r#""prio":2"#),
        "the peer keeps its column"
    );
    // Rebuilt behind quiverdb's back (same columns): capture comes back.
    shell(
        &a,
        "CREATE TABLE t2(id TEXT PRIMARY KEY, title TEXT); INSERT INTO t2 SELECT * FROM tasks;
         DROP TABLE tasks; ALTER TABLE t2 RENAME TO tasks;",
    );
    a.refresh_schema()?;
    shell(&a, "UPDATE tasks SET title = 'rebuilt'");
    sync(&mut a, &mut b, "default");
    assert!(export(&b, "tasks").contains("rebuilt"));
    // A table dropped here stops replicating here; the peer keeps it, and
    // its definition does not bring it back.
    shell(&a, "DROP TABLE tasks");
    assert!(a.table("tasks").is_err());
    sync(&mut a, &mut b, "default");
    assert!(a.table("tasks").is_err(), "not recreated from the peer");
    assert!(!export(&b, "tasks").is_empty());
    // As the protocol does it: the peer asks for its own tables, and sends
    // batches covering a table dropped here; neither fails.
    let asked = b.table_versions("default")?;
    assert_eq!(
        a.changes_since_tables("default", &asked, Default::default())?
            .count(),
        0
    );
    let mut everything = b.table_versions("default")?;
    for vv in everything.values_mut() {
        *vv = Default::default();
    }
    for batch in b.changes_since_tables("default", &everything, Default::default())? {
        a.apply(&batch?)?;
    }
    assert!(a.table("tasks").is_err());
    Ok(())
}

#[test]
fn a_reference_whose_target_has_not_arrived_yet_waits() -> R {
    let dir = tempfile::tempdir()?;
    let mut a = store(&dir, "a");
    let mut b = store(&dir, "b");
    a.execute_sql(
        "CREATE TABLE episodes(id TEXT PRIMARY KEY, task TEXT);
         CREATE TABLE edges(id TEXT PRIMARY KEY, from_id TEXT NOT NULL);",
    )?;
    a.add_table("episodes", "default", Strategy::Lww)?;
    let opts = TableOptions {
        references: vec![(
            "from_id".into(),
            Reference {
                table: "episodes".into(),
                column: "id".into(),
                on_delete: OnDelete::Cascade,
            },
        )],
        ..Default::default()
    };
    a.add_table_with("edges", "default", Strategy::Lww, &opts)?;
    a.execute_sql("INSERT INTO episodes VALUES('e1','t'); INSERT INTO edges VALUES('x','e1')")?;
    for d in a.shard_tables("default")?.iter().map(|t| t.def()) {
        b.merge_table_def("default", &d, None)?;
    }
    // Edges first (they sort first), episodes in a later batch.
    let only = |name: &str| -> std::collections::BTreeMap<String, quiver_core::VersionVector> {
        [(name.to_string(), Default::default())]
            .into_iter()
            .collect()
    };
    for batch in a.changes_since_tables("default", &only("edges"), Default::default())? {
        b.apply(&batch?)?;
    }
    assert!(
        export(&b, "edges").contains(r#""x""#),
        "kept while its episode is on its way"
    );
    assert_eq!(b.dangling()?.len(), 1, "and listed meanwhile");
    for batch in a.changes_since_tables("default", &only("episodes"), Default::default())? {
        b.apply(&batch?)?;
    }
    assert!(b.dangling()?.is_empty());
    // Deleted there: the edge goes here too, as a replicated delete.
    a.execute_sql("DELETE FROM episodes WHERE id = 'e1'")?;
    assert_eq!(export(&a, "edges"), "");
    sync(&mut a, &mut b, "default");
    assert_eq!(export(&b, "edges"), "");
    Ok(())
}

#[test]
fn a_replica_that_dropped_a_column_still_relays_it() -> R {
    let dir = tempfile::tempdir()?;
    let (mut a, mut b) = tasks(&dir);
    let mut c = store(&dir, "c");
    shell(&a, "ALTER TABLE tasks ADD COLUMN prio INTEGER");
    sync(&mut a, &mut b, "default");
    sync(&mut b, &mut c, "default");
    b.drop_column("tasks", "prio")?;
    // A writes the column B dropped; C hears of A only through B.
    shell(
        &a,
        "UPDATE tasks SET prio = 7 WHERE id = 't1'; INSERT INTO tasks VALUES('t3', 'three', 9)",
    );
    sync(&mut a, &mut b, "default");
    assert!(!export(&b, "tasks").contains("prio"));
    sync(&mut b, &mut c, "default");
    assert_eq!(export(&a, "tasks"), export(&c, "tasks"));
    assert_eq!(
        b.held_count(None)?,
        0,
        "kept to pass on, not waiting for a schema"
    );
    Ok(())
}

/// Stores `a` and `b` sharing `stats` (views a counter, title lww) with
/// the row 'page' on both.
fn stats_pair(dir: &tempfile::TempDir) -> (Store, Store) {
    let mut a = store(dir, "a");
    let mut b = store(dir, "b");
    a.execute_sql(
        "CREATE TABLE stats(id TEXT PRIMARY KEY, views INTEGER NOT NULL DEFAULT 0, title TEXT)",
    )
    .unwrap();
    let opts = TableOptions {
        policies: vec![("views".into(), Strategy::Counter)],
        ..Default::default()
    };
    a.add_table_with("stats", "default", Strategy::Lww, &opts)
        .unwrap();
    a.execute_sql("INSERT INTO stats VALUES('page', 0, 'first')")
        .unwrap();
    sync(&mut a, &mut b, "default");
    (a, b)
}

/// A stream seals the open db_version when it starts, but its batches
/// are read later: a write committed in between carries the next, still
/// open, version, and another write in that version rewrites it in place.
/// Sent then, it would be taken later for the copy already seen.
#[test]
fn a_version_still_open_when_a_batch_is_read_is_not_sent_before_it_is_sealed() -> R {
    let dir = tempfile::tempdir()?;
    let (mut a, mut b) = stats_pair(&dir);
    // So that the row is in the stream's range.
    shell(&a, "UPDATE stats SET title = 'second' WHERE id = 'page'");
    let theirs = b.table_versions("default")?;
    let batches: Vec<_> = {
        let mut stream = a.changes_since_tables("default", &theirs, Default::default())?;
        // After the stream sealed, before its batch is read.
        shell(&a, "UPDATE stats SET views = views + 1 WHERE id = 'page'");
        stream.by_ref().collect::<Result<_, _>>()?
    };
    for batch in &batches {
        b.apply(batch)?;
    }
    // The same open version again, in place.
    shell(
        &a,
        "UPDATE stats SET views = views + 1, title = 'fourth' WHERE id = 'page'",
    );
    sync(&mut a, &mut b, "default");
    let e = export(&a, "stats");
    assert!(e.contains(r#""views":2"#) && e.contains("fourth"), "{e}");
    assert_eq!(e, export(&b, "stats"));
    Ok(())
}

/// A local increment whose only clock record an apply then gave to a
/// remote version (the counter cell's newest) still seals its db_version,
/// so the increment is sent.
#[test]
fn a_local_counter_total_left_only_among_siblings_is_still_sent() -> R {
    let dir = tempfile::tempdir()?;
    let (mut a, mut b) = stats_pair(&dir);
    shell(&b, "UPDATE stats SET views = views + 1 WHERE id = 'page'");
    sync(&mut a, &mut b, "default");
    // What `a` shows a peer (this seals its open version), then a local
    // increment, then the peer's newer one arrives.
    let theirs = a.table_versions("default")?;
    shell(&a, "UPDATE stats SET views = views + 1 WHERE id = 'page'");
    std::thread::sleep(std::time::Duration::from_millis(5));
    shell(&b, "UPDATE stats SET views = views + 1 WHERE id = 'page'");
    let batches: Vec<_> = b
        .changes_since_tables("default", &theirs, Default::default())?
        .collect::<Result<_, _>>()?;
    for batch in &batches {
        a.apply(batch)?;
    }
    pull(&mut b, &a, "default");
    let e = export(&a, "stats");
    assert!(e.contains(r#""views":3"#), "{e}");
    assert_eq!(e, export(&b, "stats"));
    Ok(())
}

/// A row new to the receiver, one of whose cells was rewritten in a
/// version still open when the batch was read, is not sent without that
/// cell (the receiver would show a value nobody wrote, or refuse a NOT
/// NULL column); it goes whole in the next stream.
#[test]
fn a_new_row_with_a_cell_in_an_open_version_waits_whole() -> R {
    let dir = tempfile::tempdir()?;
    let mut a = store(&dir, "a");
    let mut b = store(&dir, "b");
    a.execute_sql("CREATE TABLE t(id TEXT PRIMARY KEY, title TEXT NOT NULL, n INTEGER)")?;
    a.add_table("t", "default", Strategy::Lww)?;
    a.execute_sql("INSERT INTO t VALUES ('r0', 'zero', 0)")?;
    sync(&mut a, &mut b, "default");
    shell(&a, "INSERT INTO t VALUES ('r1', 'one', 1)");
    shell(&a, "INSERT INTO t VALUES ('r2', 'two', 2)");
    let theirs = b.table_versions("default")?;
    let batches: Vec<_> = {
        let mut stream = a.changes_since_tables("default", &theirs, Default::default())?;
        shell(&a, "UPDATE t SET title = 'uno' WHERE id = 'r1'");
        stream.by_ref().collect::<Result<_, _>>()?
    };
    for batch in &batches {
        b.apply(batch)?;
    }
    let e = export(&b, "t");
    assert!(!e.contains("\"r1\""), "r1 went without its title: {e}");
    assert!(
        e.contains("\"two\""),
        "the rest of the stream still went: {e}"
    );
    sync(&mut a, &mut b, "default");
    let e = export(&a, "t");
    assert!(e.contains("uno"), "{e}");
    assert_eq!(e, export(&b, "t"));
    Ok(())
}

//! `quiver demo`: three replicas in a temporary folder, each serving over
//! QUIC on loopback, writing at once (with conflicting writes to the same
//! ids), syncing in a ring until nothing moves, and checking that all three
//! hold identical data. Exits 0 only if they converged.

use std::time::Instant;

use anyhow::{bail, Result};
use quiver_store::{CollectionSpec, Record, Store};
use quiver_sync::{
    Client, ClientOptions, Identity, Server, ServerOptions, StoreHandle, SyncSpec, Trust,
};

const NAMES: [&str; 3] = ["alpha", "beta", "gamma"];
const DIM: usize = 8;

struct Replica {
    name: &'static str,
    handle: StoreHandle,
    addr: String,
    fp: String,
}

fn vector(seed: usize) -> Vec<f32> {
    (0..DIM)
        .map(|d| ((seed * 31 + d * 7) % 97) as f32 / 97.0)
        .collect()
}

async fn export(h: &StoreHandle) -> Result<String> {
    let out = h
        .call(|s| -> quiver_store::Result<String> {
            let mut buf = Vec::new();
            s.export("memories", &mut buf)?;
            Ok(String::from_utf8_lossy(&buf).into_owned())
        })
        .await??;
    Ok(out)
}

pub fn run(rows: usize, json: bool) -> Result<()> {
    crate::net::init_logging("error");
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    rt.block_on(demo(rows, json))
}

async fn demo(rows: usize, json: bool) -> Result<()> {
    let started = Instant::now();
    let dir = tempfile::tempdir()?;
    let say = |s: String| {
        if !json {
            println!("{s}");
        }
    };
    say(format!(
        "quiverdb demo: 3 replicas in {}",
        dir.path().display()
    ));
    let mut replicas = Vec::new();
    let mut servers = Vec::new();
    for name in NAMES {
        let db = dir.path().join(format!("{name}.db"));
        let mut store = Store::init(&db)?;
        store.set_node_name(name)?;
        let mut spec = CollectionSpec::new("memories", DIM);
        spec.strategy = quiver_core::Strategy::Lww;
        store.create_collection(&spec)?;
        let fp = quiver_sync::tls::create_identity(&db, &[])?;
        let (cert, key) = quiver_sync::tls::identity_paths(&db);
        let handle = StoreHandle::spawn(store);
        let opts = ServerOptions {
            listen: "127.0.0.1:0".parse()?,
            node: name.into(),
            ..Default::default()
        };
        let server = Server::bind(handle.clone(), &Identity::load(&cert, &key)?, opts)?;
        let addr = server.local_addr()?.to_string();
        say(format!(
            "  {name:<6} serving QUIC on {addr} (certificate {}…)",
            &fp[..16]
        ));
        servers.push(server.shutdown_token());
        tokio::spawn(server.run());
        replicas.push(Replica {
            name,
            handle,
            addr,
            fp,
        });
    }

    // Everyone writes at once: its own rows, plus the same shared ids.
    let shared = (rows / 10).max(1);
    let t = Instant::now();
    let mut writes = tokio::task::JoinSet::new();
    for (i, r) in replicas.iter().enumerate() {
        let h = r.handle.clone();
        let name = r.name;
        writes.spawn(async move {
            h.call(move |s| {
                let mut batch: Vec<Record> = (0..rows)
                    .map(|n| {
                        let mut rec =
                            Record::new(&format!("{name}-{n:04}"), vector(i * 10_000 + n));
                        rec.metadata = serde_json::json!({"author": name, "n": n});
                        rec
                    })
                    .collect();
                for n in 0..shared {
                    let mut rec = Record::new(&format!("shared-{n:03}"), vector(i * 100 + n));
                    rec.metadata = serde_json::json!({"author": name, "shared": true});
                    batch.push(rec);
                }
                s.put_many("memories", &batch)
            })
            .await
        });
    }
    while let Some(w) = writes.join_next().await {
        w???;
    }
    say(format!(
        "  wrote {rows} rows on each replica and {shared} conflicting ids on all three at once ({} ms)",
        t.elapsed().as_millis()
    ));

    // Sync in a ring until a whole round moves nothing.
    let mut clients: Vec<Client> = replicas
        .iter()
        .map(|r| {
            let opts = ClientOptions {
                trust: Trust::Pin(
                    replicas[(NAMES.iter().position(|n| *n == r.name).unwrap_or(0) + 1) % 3]
                        .fp
                        .clone(),
                ),
                node: r.name.into(),
                ..Default::default()
            };
            Client::new(r.handle.clone(), opts)
        })
        .collect();
    let mut total_conflicts = 0;
    for round in 1..=4 {
        let mut moved = 0;
        for i in 0..3 {
            let to = &replicas[(i + 1) % 3];
            let t = Instant::now();
            let r = clients[i]
                .sync(&to.addr, &SyncSpec::default(), None)
                .await?;
            moved += r.changes_sent + r.changes_received;
            total_conflicts += r.conflicts_detected;
            say(format!(
                "  round {round}: {:<6} <-> {:<6} sent {:>5} received {:>5} conflicts {:>3} ({} resolved) in {:>4} ms, {} bytes",
                replicas[i].name,
                to.name,
                r.changes_sent,
                r.changes_received,
                r.conflicts_detected,
                r.conflicts_resolved,
                t.elapsed().as_millis(),
                r.bytes_sent + r.bytes_received
            ));
        }
        if moved == 0 {
            break;
        }
    }

    // How conflicts were resolved, as one replica recorded them.
    let sample = replicas[0].handle.call(|s| s.conflicts(None)).await??;
    if let Some(c) = sample.iter().find(|c| c.column == "vector") {
        let kept = c
            .versions
            .iter()
            .find(|v| v.kept)
            .map(|v| v.version.clone())
            .unwrap_or_default();
        say(format!(
            "  e.g. conflict on {}.{} [{}]: {} versions, {} kept {}",
            c.table,
            c.column,
            c.pk,
            c.versions.len(),
            c.resolution.as_deref().unwrap_or("open"),
            kept
        ));
    }

    // Write-to-visible latency through one sync.
    let t = Instant::now();
    replicas[0]
        .handle
        .call(|s| s.put("memories", &Record::new("latency-probe", vector(424242))))
        .await??;
    clients[0]
        .sync(&replicas[1].addr, &SyncSpec::default(), None)
        .await?;
    let seen = replicas[1]
        .handle
        .call(|s| s.get("memories", "latency-probe"))
        .await??;
    let latency = t.elapsed().as_secs_f64() * 1000.0;
    if seen.is_none() {
        bail!("the probe written on alpha is not visible on beta after a sync");
    }
    say(format!(
        "  write on alpha -> visible on beta after one sync: {latency:.1} ms"
    ));
    for i in [1, 2] {
        clients[i]
            .sync(&replicas[(i + 1) % 3].addr, &SyncSpec::default(), None)
            .await?;
    }

    let exports = [
        export(&replicas[0].handle).await?,
        export(&replicas[1].handle).await?,
        export(&replicas[2].handle).await?,
    ];
    let converged = exports[0] == exports[1] && exports[1] == exports[2];
    let n = exports[0].lines().count();
    for c in &mut clients {
        c.close().await;
    }
    for s in servers {
        s.cancel();
    }
    if json {
        crate::output::json(&serde_json::json!({
            "converged": converged, "replicas": 3, "rows": n, "conflicts": total_conflicts,
            "write_to_visible_ms": latency, "duration_ms": started.elapsed().as_millis() as u64,
        }))?;
    } else if converged {
        println!(
            "converged: all 3 replicas hold the same {n} rows (byte-identical exports), {total_conflicts} conflicts resolved, {:.1} s in all",
            started.elapsed().as_secs_f64()
        );
    }
    if !converged {
        bail!("the replicas did not converge");
    }
    Ok(())
}

//! `quiver demo`: three replicas in a temporary folder, each serving over
//! QUIC on loopback with a live link to the next, writing at once (with
//! conflicting writes to the same ids), showing what flows as it flows and
//! how fast a write shows elsewhere, and checking that all three hold
//! identical data. Exits 0 only if they converged.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Result};
use quiver_store::{CollectionSpec, Record, Store};
use quiver_sync::{
    CancellationToken, Client, ClientOptions, Identity, RoundFn, Server, ServerOptions,
    StoreHandle, SyncSpec, Trust,
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
            let mut batch: Vec<Record> = (0..rows)
                .map(|n| {
                    let mut rec = Record::new(&format!("{name}-{n:04}"), vector(i * 10_000 + n));
                    rec.metadata = serde_json::json!({"author": name, "n": n});
                    rec
                })
                .collect();
            for n in 0..shared {
                let mut rec = Record::new(&format!("shared-{n:03}"), vector(i * 100 + n));
                rec.metadata = serde_json::json!({"author": name, "shared": true});
                batch.push(rec);
            }
            h.put_many("memories", batch).await
        });
    }
    while let Some(w) = writes.join_next().await {
        w??;
    }
    say(format!(
        "  wrote {rows} rows on each replica and {shared} conflicting ids on all three at once ({} ms)",
        t.elapsed().as_millis()
    ));

    // Live links in a ring: each replica follows the next one; every
    // committed change is pushed as it commits.
    let stop = CancellationToken::new();
    let quiet = Arc::new(AtomicBool::new(json));
    let mut links = Vec::new();
    for (i, r) in replicas.iter().enumerate() {
        let to = &replicas[(i + 1) % 3];
        let opts = ClientOptions {
            trust: Trust::Pin(to.fp.clone()),
            node: r.name.into(),
            ..Default::default()
        };
        let mut client = Client::new(r.handle.clone(), opts);
        let (addr, stop, from, peer) = (to.addr.clone(), stop.clone(), r.name, to.name);
        let quiet = quiet.clone();
        let on_round: RoundFn = Arc::new(move |res| {
            if res.changes_sent + res.changes_received > 0 && !quiet.load(Ordering::Relaxed) {
                println!(
                    "  live {from:<5} <-> {peer:<5} sent {:>5} changes, received {:>5}, {:>3} conflicting cells on {from} in {:>3} ms",
                    res.changes_sent, res.changes_received, res.conflicts_detected, res.duration_ms
                );
            }
        });
        links.push(tokio::spawn(async move {
            let r = client
                .live(&addr, &SyncSpec::default(), stop, Some(on_round))
                .await;
            client.close().await;
            r
        }));
    }
    let t = Instant::now();
    loop {
        let e = [
            export(&replicas[0].handle).await?,
            export(&replicas[1].handle).await?,
            export(&replicas[2].handle).await?,
        ];
        if e[0] == e[1] && e[1] == e[2] && e[0].lines().count() == 3 * rows + shared {
            break;
        }
        if t.elapsed() > Duration::from_secs(20) {
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    say(format!(
        "  all writes reached every replica in {} ms",
        t.elapsed().as_millis()
    ));

    // How conflicts were resolved, as alpha recorded them: versions named
    // by the replica that wrote them rather than by site id.
    let recorded = replicas[0].handle.call(|s| s.conflicts(None)).await??;
    let by_site: Vec<(String, &str)> = replicas
        .iter()
        .map(|r| (r.handle.site_id().to_hex(), r.name))
        .collect();
    let writer = |version: &str| {
        by_site
            .iter()
            .find(|(site, _)| version.starts_with(site.as_str()))
            .map_or_else(|| version.to_string(), |(_, name)| name.to_string())
    };
    let mut ids: Vec<&str> = recorded.iter().map(|c| c.pk.as_str()).collect();
    ids.sort_unstable();
    ids.dedup();
    let conflicting_ids = ids.len();
    say(format!(
        "  alpha recorded conflicts on {conflicting_ids} of the {shared} shared ids ({} cells), \
         each resolved by lww",
        recorded.len()
    ));
    if let Some(c) = recorded.iter().find(|c| c.column == "vector") {
        let names: Vec<String> = c.versions.iter().map(|v| writer(&v.version)).collect();
        let kept = c
            .versions
            .iter()
            .find(|v| v.kept)
            .map(|v| writer(&v.version))
            .unwrap_or_default();
        say(format!(
            "  e.g. {} [{}]: written by {}; {} kept {kept}'s, the latest by its hybrid clock",
            c.column,
            c.pk,
            names.join(", "),
            c.resolution.as_deref().unwrap_or("open"),
        ));
    }

    // Write-to-visible latency over the live links.
    quiet.store(true, Ordering::Relaxed);
    let mut latencies = Vec::new();
    for probe in 0..20 {
        let id = format!("probe-{probe:02}");
        let rec = Record::new(&id, vector(424_242 + probe));
        let t = Instant::now();
        replicas[0].handle.put("memories", rec).await?;
        for r in &replicas[1..] {
            crate::bench_live::visible(&r.handle, "memories", id.clone(), Duration::from_secs(5))
                .await?;
        }
        latencies.push(t.elapsed().as_secs_f64() * 1000.0);
    }
    latencies.sort_by(f64::total_cmp);
    let latency = latencies[latencies.len() / 2];
    say(format!(
        "  write on alpha -> visible on beta and gamma: median {latency:.1} ms, worst {:.1} ms (20 probes)",
        latencies[latencies.len() - 1]
    ));
    stop.cancel();
    for l in links {
        l.await
            .map_err(|e| anyhow::anyhow!("live link task: {e}"))??;
    }

    let exports = [
        export(&replicas[0].handle).await?,
        export(&replicas[1].handle).await?,
        export(&replicas[2].handle).await?,
    ];
    let converged = exports[0] == exports[1] && exports[1] == exports[2];
    let n = exports[0].lines().count();
    for s in servers {
        s.cancel();
    }
    if json {
        crate::output::json(&serde_json::json!({
            "converged": converged, "replicas": 3, "rows": n, "shared_ids": shared,
            "conflicts": conflicting_ids,
            "write_to_visible_ms": latency, "duration_ms": started.elapsed().as_millis() as u64,
        }))?;
    } else if converged {
        println!(
            "converged: all 3 replicas hold the same {n} rows (byte-identical exports), \
             {conflicting_ids} conflicting ids resolved, {:.1} s in all",
            started.elapsed().as_secs_f64()
        );
    }
    if !converged {
        bail!("the replicas did not converge");
    }
    Ok(())
}

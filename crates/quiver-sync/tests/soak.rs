//! Soak: insert/delete cycles on fresh ids on two replicas that sync over
//! real QUIC on loopback and compact after every round; the clock and the
//! file must stay flat. Long, so ignored by default:
//!
//! `QUIVER_SOAK_CYCLES=1000000 cargo test --release -p quiver-sync --test soak -- --ignored --nocapture`

use quiver_store::{CompactOptions, Store};
use quiver_sync::tls::{create_identity, identity_paths};
use quiver_sync::{
    Client, ClientOptions, Identity, Server, ServerOptions, StoreHandle, SyncSpec, Trust,
};

struct Side {
    dir: tempfile::TempDir,
    handle: StoreHandle,
    id: Identity,
    fp: String,
}

fn side(name: &str) -> Side {
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join(format!("{name}.db"));
    let mut s = Store::init(&db).unwrap();
    s.execute_sql("CREATE TABLE episodes(id TEXT PRIMARY KEY, body TEXT)")
        .unwrap();
    s.add_table("episodes", "default", quiver_core::Strategy::Lww)
        .unwrap();
    let fp = create_identity(&db, &[]).unwrap();
    let (c, k) = identity_paths(&db);
    Side {
        handle: StoreHandle::spawn(s),
        id: Identity::load(&c, &k).unwrap(),
        fp,
        dir,
    }
}

fn bytes(s: &Side) -> u64 {
    std::fs::read_dir(s.dir.path())
        .unwrap()
        .filter_map(|e| e.ok())
        .filter(|e| e.file_name().to_string_lossy().contains(".db"))
        .filter_map(|e| e.metadata().ok())
        .map(|m| m.len())
        .sum()
}

async fn clock(s: &Side) -> i64 {
    s.handle
        .call(|s| {
            s.connection()
                .query_row("SELECT count(*) FROM quiver_clock", [], |r| r.get(0))
        })
        .await
        .unwrap()
        .unwrap()
}

/// `n` fresh rows inserted, then deleted, in two transactions.
async fn churn(s: &Side, tag: &str, round: usize, n: usize) {
    let mut ins = String::from("INSERT INTO episodes(id, body) VALUES ");
    for i in 0..n {
        if i > 0 {
            ins.push(',');
        }
        ins += &format!("('{tag}-{round}-{i}', 'an episode of agent {tag}, number {i}')");
    }
    s.handle
        .call(move |s| {
            s.execute_sql(&ins)?;
            s.execute_sql("DELETE FROM episodes")
        })
        .await
        .unwrap()
        .unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "a soak: minutes in release"]
async fn insert_delete_cycles_with_compaction_stay_flat() {
    let cycles: usize = std::env::var("QUIVER_SOAK_CYCLES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(1_000_000);
    const PER_SIDE: usize = 1_000;
    let rounds = cycles.div_ceil(2 * PER_SIDE);
    let (a, b) = (side("a"), side("b"));
    let server = Server::bind(
        a.handle.clone(),
        &a.id,
        ServerOptions {
            listen: "127.0.0.1:0".parse().unwrap(),
            node: "a".into(),
            ..Default::default()
        },
    )
    .unwrap();
    let addr = server.local_addr().unwrap().to_string();
    let _stop = server.shutdown_token();
    tokio::spawn(server.run());
    let mut client = Client::new(
        b.handle.clone(),
        ClientOptions {
            trust: Trust::Pin(a.fp.clone()),
            node: "b".into(),
            ..Default::default()
        },
    );
    let started = std::time::Instant::now();
    let mut samples: Vec<(usize, i64, i64, u64, u64)> = Vec::new();
    let mut purged = 0u64;
    for round in 0..rounds {
        churn(&a, "a", round, PER_SIDE).await;
        churn(&b, "b", round, PER_SIDE).await;
        client
            .sync(&addr, &SyncSpec::default(), None)
            .await
            .unwrap();
        for s in [&a, &b] {
            purged += s
                .handle
                .call(|s| s.compact(&CompactOptions::default()))
                .await
                .unwrap()
                .unwrap()
                .purged;
        }
        if round % 25 == 0 || round + 1 == rounds {
            let sample = (
                (round + 1) * 2 * PER_SIDE,
                clock(&a).await,
                clock(&b).await,
                bytes(&a),
                bytes(&b),
            );
            println!(
                "soak: {} cycles, {purged} records purged, clock a {} b {}, bytes a {} b {}, {:.0} s",
                sample.0,
                sample.1,
                sample.2,
                sample.3,
                sample.4,
                started.elapsed().as_secs_f64()
            );
            samples.push(sample);
        }
    }
    // Flat: the clock holds at most the last round's records (those not
    // acknowledged yet when it compacted), and the file stays within
    // twice its size after the first rounds.
    let settled = samples[samples.len().min(2) - 1];
    for s in &samples {
        assert!(
            s.1 <= 2 * PER_SIDE as i64 && s.2 <= 2 * PER_SIDE as i64,
            "the clock grows: {s:?}"
        );
        assert!(
            s.3 <= 2 * settled.3.max(1 << 20) && s.4 <= 2 * settled.4.max(1 << 20),
            "the file grows: {s:?} against {settled:?}"
        );
    }
    // Each side purges its own tombstones and the other's: every one.
    assert_eq!(
        purged,
        2 * (rounds * 2 * PER_SIDE) as u64,
        "tombstones left behind"
    );
    let last = samples.last().unwrap();
    println!(
        "soak holds: {} cycles in {:.0} s; clock a {} b {}; steady size a {} b {} bytes",
        last.0,
        started.elapsed().as_secs_f64(),
        last.1,
        last.2,
        last.3,
        last.4
    );
}

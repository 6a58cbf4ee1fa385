//! `quiver bench live`: write on A, visible on B across a live link over
//! QUIC on loopback; p50/p99 over single writes, bursts, and writes made by
//! another connection (an application's own SQLite driver).

use std::time::{Duration, Instant};

use anyhow::{bail, Result};
use quiver_store::{CollectionSpec, Record, Store};
use quiver_sync::{
    CancellationToken, Client, ClientOptions, Identity, Server, ServerOptions, StoreHandle,
    SyncSpec, Trust,
};

const DIM: usize = 384;

fn percentile(sorted: &[f64], p: f64) -> f64 {
    if sorted.is_empty() {
        return 0.0;
    }
    let i = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[i.min(sorted.len() - 1)]
}

fn summary(mut v: Vec<f64>) -> serde_json::Value {
    v.sort_by(f64::total_cmp);
    serde_json::json!({
        "n": v.len(),
        "p50_ms": percentile(&v, 0.5),
        "p99_ms": percentile(&v, 0.99),
        "max_ms": v.last().copied().unwrap_or(0.0),
    })
}

/// Waits until a replica shows `id` in `collection`, waking on its change
/// counter rather than polling blindly.
pub async fn visible(
    h: &StoreHandle,
    collection: &str,
    id: String,
    deadline: Duration,
) -> Result<()> {
    let mut changes = h.subscribe_changes();
    let t = Instant::now();
    loop {
        let (probe, coll) = (id.clone(), collection.to_string());
        if h.call(move |s| s.get(&coll, &probe)).await??.is_some() {
            return Ok(());
        }
        let left = deadline.saturating_sub(t.elapsed());
        if left.is_zero() {
            bail!("{id} did not arrive within {deadline:?}");
        }
        let _ = tokio::time::timeout(left.min(Duration::from_millis(20)), changes.changed()).await;
    }
}

fn vector(i: usize) -> Vec<f32> {
    (0..DIM)
        .map(|d| ((i * 13 + d) % 101) as f32 / 101.0)
        .collect()
}

pub fn run(writes: usize, bursts: usize, json: bool) -> Result<()> {
    crate::net::init_logging("error");
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    rt.block_on(bench(writes, bursts, json))
}

async fn bench(writes: usize, bursts: usize, json: bool) -> Result<()> {
    let dir = tempfile::tempdir()?;
    let mut handles = Vec::new();
    for name in ["a", "b"] {
        let mut s = Store::init(dir.path().join(format!("{name}.db")))?;
        s.create_collection(&CollectionSpec::new("docs", DIM))?;
        handles.push(StoreHandle::spawn(s));
    }
    let (a, b) = (handles[0].clone(), handles[1].clone());
    let a_db = dir.path().join("a.db");
    let fp = quiver_sync::tls::create_identity(&a_db, &[])?;
    let (cert, key) = quiver_sync::tls::identity_paths(&a_db);
    let server = Server::bind(
        a.clone(),
        &Identity::load(&cert, &key)?,
        ServerOptions {
            listen: "127.0.0.1:0".parse()?,
            ..Default::default()
        },
    )?;
    let addr = server.local_addr()?.to_string();
    let stop = server.shutdown_token();
    tokio::spawn(server.run());
    let mut client = Client::new(
        b.clone(),
        ClientOptions {
            trust: Trust::Pin(fp),
            ..Default::default()
        },
    );
    let link_stop = CancellationToken::new();
    let ls = link_stop.clone();
    let link = tokio::spawn(async move {
        let r = client.live(&addr, &SyncSpec::default(), ls, None).await;
        client.close().await;
        r
    });
    // Warm up: the link is up once a first write arrives.
    a.put("docs", Record::new("warmup", vector(0))).await?;
    visible(&b, "docs", "warmup".into(), Duration::from_secs(10)).await?;

    let deadline = Duration::from_secs(5);
    let mut singles = Vec::with_capacity(writes);
    for i in 0..writes {
        let id = format!("single-{i}");
        let rec = Record::new(&id, vector(i));
        let t = Instant::now();
        a.put("docs", rec).await?;
        visible(&b, "docs", id, deadline).await?;
        singles.push(t.elapsed().as_secs_f64() * 1000.0);
    }
    let mut burst_times = Vec::with_capacity(bursts);
    for k in 0..bursts {
        let recs: Vec<Record> = (0..100)
            .map(|i| Record::new(&format!("burst-{k}-{i}"), vector(i)))
            .collect();
        let t = Instant::now();
        a.put_many("docs", recs).await?;
        visible(&b, "docs", format!("burst-{k}-99"), deadline).await?;
        burst_times.push(t.elapsed().as_secs_f64() * 1000.0);
    }
    // Another connection writes the file, as an application in any language would.
    let external = rusqlite_free_writer(&a_db, (writes / 5).max(1), &b, deadline).await?;

    link_stop.cancel();
    let _ = link.await;
    stop.cancel();
    let out = serde_json::json!({
        "bench": "live",
        "p50_ms": summary(singles.clone())["p50_ms"],
        "p99_ms": summary(singles.clone())["p99_ms"],
        "single_writes": summary(singles),
        "bursts_of_100": summary(burst_times),
        "external_writes": summary(external),
    });
    if json {
        crate::output::json(&out)?;
    } else {
        println!("write on A -> visible on B over a live QUIC link (loopback, {DIM}-dim vectors)");
        for (name, key) in [
            ("single writes", "single_writes"),
            ("bursts of 100", "bursts_of_100"),
            ("other-connection writes", "external_writes"),
        ] {
            let s = &out[key];
            println!(
                "  {name:<24} n={:<5} p50 {:>6.2} ms  p99 {:>6.2} ms  max {:>6.2} ms",
                s["n"],
                s["p50_ms"].as_f64().unwrap_or(0.0),
                s["p99_ms"].as_f64().unwrap_or(0.0),
                s["max_ms"].as_f64().unwrap_or(0.0)
            );
        }
    }
    Ok(())
}

/// Writes through a plain connection of its own (no quiverdb code on the
/// write path); the daemon notices through the file.
async fn rusqlite_free_writer(
    db: &std::path::Path,
    n: usize,
    b: &StoreHandle,
    deadline: Duration,
) -> Result<Vec<f64>> {
    let path = db.to_path_buf();
    let mut times = Vec::with_capacity(n);
    for i in 0..n {
        let id = format!("external-{i}");
        let p = path.clone();
        let row = id.clone();
        let t = Instant::now();
        tokio::task::spawn_blocking(move || -> Result<()> {
            let c = rusqlite::Connection::open(&p)?;
            c.busy_timeout(Duration::from_secs(5))?;
            let blob = quiver_core::vector::encode(&vector(i));
            c.execute(
                "INSERT INTO docs(id, vector, metadata) VALUES (?1, ?2, '{}')",
                rusqlite::params![row, blob],
            )?;
            Ok(())
        })
        .await??;
        visible(b, "docs", id, deadline).await?;
        times.push(t.elapsed().as_secs_f64() * 1000.0);
    }
    Ok(times)
}

//! `quiver bench load`: many clients syncing concurrently against one
//! `quiver serve` process on loopback. Two rounds (push everything, then
//! pull everything), no errors allowed, every export equal at the end;
//! throughput and the server's peak memory are reported.

use std::process::{Command, Stdio};
use std::time::Instant;

use anyhow::{bail, Result};
use quiver_store::{CollectionSpec, Record, Store};
use quiver_sync::{Client, ClientOptions, StoreHandle, SyncSpec, Trust};

const DIM: usize = 16;

fn export(s: &Store) -> Result<String> {
    let mut out = Vec::new();
    s.export("docs", &mut out)?;
    Ok(String::from_utf8_lossy(&out).into_owned())
}

pub fn run(
    clients: usize,
    rows: usize,
    transport: quiver_sync::TransportChoice,
    json: bool,
) -> Result<()> {
    crate::net::init_logging("error");
    let dir = tempfile::tempdir()?;
    let server_db = dir.path().join("server.db");
    let exe = std::env::current_exe()?;
    let q = |args: &[&str]| -> Result<()> {
        let st = Command::new(&exe)
            .arg("--db")
            .arg(&server_db)
            .args(args)
            .stdout(Stdio::null())
            .status()?;
        if !st.success() {
            bail!("quiver {args:?} failed");
        }
        Ok(())
    };
    q(&["init", "--name", "load-server"])?;
    q(&["collection", "create", "docs", "--dim", &DIM.to_string()])?;
    let max_conns = (clients + 16).to_string();
    let served = crate::bench::ServeChild::start(&server_db, &["--max-connections", &max_conns])?;
    let (addr, fp) = (served.addr.clone(), served.fp.clone());

    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    let result = rt.block_on(async {
        let mut handles = Vec::with_capacity(clients);
        for c in 0..clients {
            let mut s = Store::init(dir.path().join(format!("c{c}.db")))?;
            s.create_collection(&CollectionSpec::new("docs", DIM))?;
            let recs: Vec<Record> = (0..rows)
                .map(|i| {
                    Record::new(
                        &format!("c{c:03}-{i:03}"),
                        (0..DIM).map(|d| (c * 31 + i * 7 + d) as f32).collect(),
                    )
                })
                .collect();
            s.put_many("docs", &recs)?;
            handles.push(StoreHandle::spawn_unwatched(s));
        }
        let mut timings = Vec::new();
        let mut changes = 0u64;
        let mut retries = 0u64;
        for _round in 0..2 {
            let t = Instant::now();
            let mut tasks = tokio::task::JoinSet::new();
            for h in &handles {
                let (h, addr, fp) = (h.clone(), addr.clone(), fp.clone());
                tasks.spawn(async move {
                    let opts = ClientOptions {
                        trust: Trust::Pin(fp),
                        connect_timeout: std::time::Duration::from_secs(20),
                        transport,
                        ..Default::default()
                    };
                    let mut c = Client::new(h, opts);
                    let r = c.sync(&addr, &SyncSpec::default(), None).await;
                    c.close().await;
                    r
                });
            }
            let mut errors = Vec::new();
            while let Some(j) = tasks.join_next().await {
                match j {
                    Ok(Ok(r)) => {
                        changes += r.changes_sent + r.changes_received;
                        retries += (r.attempts.max(1) - 1) as u64;
                    }
                    Ok(Err(e)) => errors.push(e.to_string()),
                    Err(e) => errors.push(e.to_string()),
                }
            }
            if !errors.is_empty() {
                bail!(
                    "{} of {clients} syncs failed, e.g. {}",
                    errors.len(),
                    errors[0]
                );
            }
            timings.push(t.elapsed().as_secs_f64());
        }
        let server_export = export(&Store::open(&server_db)?)?;
        let mut equal = 0;
        for c in 0..clients {
            if export(&Store::open(dir.path().join(format!("c{c}.db")))?)? == server_export {
                equal += 1;
            }
        }
        Ok::<_, anyhow::Error>((
            timings,
            changes,
            equal,
            server_export.lines().count(),
            retries,
        ))
    });
    let peak = served.peak_kib();
    drop(served);
    let (timings, changes, equal, total_rows, retries) = result?;
    if equal != clients {
        bail!("only {equal} of {clients} clients hold the server's data");
    }
    let secs: f64 = timings.iter().sum();
    let v = serde_json::json!({
        "bench": "load", "transport": transport.to_string(), "clients": clients, "rows_per_client": rows, "total_rows": total_rows,
        "push_round_s": timings[0], "pull_round_s": timings[1],
        "changes": changes, "changes_per_s": changes as f64 / secs,
        "syncs_per_s": (2 * clients) as f64 / secs,
        "server_peak_rss_mib": peak.map(|k| k as f64 / 1024.0),
        "errors": 0, "retries": retries, "exports_equal": true,
    });
    if json {
        crate::output::json(&v)?;
    } else {
        println!("{clients} clients x {rows} rows against one quiver serve on loopback");
        println!(
            "  push round {:.2} s, pull round {:.2} s, {changes} changes ({:.0}/s), {:.0} syncs/s",
            timings[0],
            timings[1],
            changes as f64 / secs,
            (2 * clients) as f64 / secs
        );
        println!("  server peak RSS {:.1} MiB; no errors ({retries} transient retries); all {clients} exports equal the server's ({total_rows} rows)", peak.unwrap_or(0) as f64 / 1024.0);
    }
    Ok(())
}

//! `quiver bench sync|apply|conflicts`: sync and merge measured against
//! plain SQLite inserting the same rows in the same process.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use quiver_core::Strategy;
use quiver_store::{CollectionSpec, Store, StreamLimits};
use quiver_sync::{Client, ClientOptions, StoreHandle, SyncSpec, Trust};

use crate::bench::{plain_insert, records, ServeChild};

/// Rows a delta replica already holds before the measured sync.
const DELTA_BASE: usize = 1000;

/// Peak resident memory of this process since [`reset_peak`], in bytes.
fn own_peak_bytes() -> Option<u64> {
    crate::bench::peak_kib(std::process::id()).map(|k| k * 1024)
}

/// Starts a new peak-memory measurement of this process (Linux: writing 5
/// to `clear_refs` resets `VmHWM` to the current RSS).
fn reset_peak() {
    let _ = std::fs::write("/proc/self/clear_refs", "5");
}

/// A writer of the application's own: inserts a row every 10 ms into a
/// table of the bootstrapping store, and keeps the longest time one insert
/// waited.
struct Writer {
    stop: Arc<AtomicBool>,
    thread: std::thread::JoinHandle<Result<f64>>,
}

impl Writer {
    fn start(db: &std::path::Path) -> Result<Writer> {
        let conn = rusqlite::Connection::open(db)?;
        conn.busy_timeout(Duration::from_secs(30))?;
        conn.execute_batch("CREATE TABLE IF NOT EXISTS app_log(id INTEGER PRIMARY KEY, at REAL)")?;
        let stop = Arc::new(AtomicBool::new(false));
        let flag = stop.clone();
        let thread = std::thread::spawn(move || -> Result<f64> {
            let mut worst = 0f64;
            while !flag.load(Ordering::Relaxed) {
                let t = Instant::now();
                conn.execute("INSERT INTO app_log(at) VALUES (julianday('now'))", [])?;
                worst = worst.max(t.elapsed().as_secs_f64() * 1000.0);
                std::thread::sleep(Duration::from_millis(10));
            }
            Ok(worst)
        });
        Ok(Writer { stop, thread })
    }

    fn finish(self) -> Result<f64> {
        self.stop.store(true, Ordering::Relaxed);
        self.thread
            .join()
            .map_err(|_| anyhow::anyhow!("the writer thread panicked"))?
    }
}

/// `quiver bench sync`: a replica receives `n` rows from a `quiver serve`
/// process over QUIC (or TLS on TCP) on loopback, into an empty store
/// (`snapshot`) or one that already holds the source's earlier rows
/// (`delta`).
pub fn sync(
    n: usize,
    dim: usize,
    mode: &str,
    transport: quiver_sync::TransportChoice,
    json: bool,
) -> Result<()> {
    if !matches!(mode, "snapshot" | "delta" | "clone") {
        bail!("--mode {mode}: expected snapshot, delta or clone");
    }
    crate::net::init_logging("error");
    let dir = tempfile::tempdir()?;
    let rows = records(n, dim, 0x5eed);
    let payload: u64 = rows
        .iter()
        .map(|r| {
            (r.id.len() + r.vector.len() * 4 + r.metadata.to_string().len()) as u64
                + r.content.as_ref().map_or(0, |c| c.len() as u64)
        })
        .sum();
    let plain = plain_insert(&dir.path().join("plain.db"), &rows, 1000)?;

    let src_db = dir.path().join("source.db");
    let dst_db = dir.path().join("replica.db");
    let fp = {
        let mut s = Store::init(&src_db)?;
        s.create_collection(&CollectionSpec::new("docs", dim))?;
        if mode == "delta" {
            for chunk in records(DELTA_BASE, dim, 0xba5e).chunks(1000) {
                s.put_many("docs", chunk)?;
            }
        } else {
            for chunk in rows.chunks(1000) {
                s.put_many("docs", chunk)?;
            }
        }
        quiver_sync::tls::create_identity(&src_db, &[])?
    };
    let served = ServeChild::start(&src_db, &[])?;
    let opts = ClientOptions {
        trust: Trust::Pin(fp),
        connect_timeout: Duration::from_secs(10),
        transport,
        ..Default::default()
    };
    if mode == "clone" {
        return clone(n, dim, plain, payload, &dir, &served, opts, json);
    }
    drop(Store::init(&dst_db)?);
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    let handle = StoreHandle::spawn(Store::open(&dst_db)?);
    let mut client = Client::new(handle, opts);
    let spec = SyncSpec::default();
    let t = Instant::now();
    rt.block_on(client.ping(&served.addr))
        .context("connecting to the bench's server")?;
    let connect = t.elapsed().as_secs_f64();
    if mode == "delta" {
        rt.block_on(client.sync(&served.addr, &spec, None))?;
        // The new rows, written while the server runs (it notices them).
        let mut s = Store::open(&src_db)?;
        for chunk in rows.chunks(1000) {
            s.put_many("docs", chunk)?;
        }
    }
    drop(rows);
    let writer = Writer::start(&dst_db)?;
    reset_peak();
    let t = Instant::now();
    let r = rt.block_on(client.sync(&served.addr, &spec, None))?;
    let secs = t.elapsed().as_secs_f64();
    let client_peak = own_peak_bytes();
    let stall = writer.finish()?;
    let server_peak = served.peak_kib().map(|k| k * 1024);
    rt.block_on(client.close());
    drop(served);
    let want = n + if mode == "delta" { DELTA_BASE } else { 0 };
    let got = Store::open(&dst_db)?.count("docs")? as usize;
    if got != want {
        bail!("the replica holds {got} rows after the sync, not {want}");
    }
    let wire = r.bytes_sent + r.bytes_received;
    let v = serde_json::json!({
        "bench": "sync", "n": n, "dim": dim, "mode": mode, "transport": r.transport,
        "connect_s": connect, "sync_s": secs, "plain_sqlite_s": plain, "ratio": secs / plain,
        "wire_bytes": wire, "payload_bytes": payload,
        "changes": r.changes_received,
        "client_peak_rss_bytes": client_peak, "server_peak_rss_bytes": server_peak,
        "max_writer_stall_ms": stall,
    });
    if json {
        return crate::output::json(&v);
    }
    println!(
        "{mode} sync of {n} x {dim}-dim vectors from a quiver serve on loopback over {}",
        r.transport
    );
    println!("  connect        {:>9.2} ms", connect * 1000.0);
    println!(
        "  sync           {secs:>9.3} s   ({} changes, {:.0} rows/s)",
        r.changes_received,
        n as f64 / secs
    );
    println!(
        "  plain SQLite   {plain:>9.3} s   ratio {:.2}x",
        secs / plain
    );
    println!(
        "  wire           {wire} bytes for {payload} of payload ({:.2}x)",
        wire as f64 / payload as f64
    );
    println!(
        "  peak RSS       client {:.0} MiB, server {:.0} MiB",
        client_peak.unwrap_or(0) as f64 / 1048576.0,
        server_peak.unwrap_or(0) as f64 / 1048576.0
    );
    println!("  an app writing every 10 ms waited at most {stall:.1} ms");
    Ok(())
}

/// `quiver bench sync --mode clone`: the same rows as a whole-store copy.
#[allow(clippy::too_many_arguments)]
fn clone(
    n: usize,
    dim: usize,
    plain: f64,
    payload: u64,
    dir: &tempfile::TempDir,
    served: &ServeChild,
    opts: ClientOptions,
    json: bool,
) -> Result<()> {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    let hello = Store::init(dir.path().join("hello.db"))?;
    let mut client = Client::new(StoreHandle::spawn_unwatched(hello), opts);
    let t = Instant::now();
    let transport = rt
        .block_on(client.ping(&served.addr))
        .context("connecting to the bench's server")?
        .transport;
    let connect = t.elapsed().as_secs_f64();
    let dest = dir.path().join("clone.db");
    reset_peak();
    let t = Instant::now();
    let r = rt.block_on(client.clone_store(&served.addr, &dest))?;
    let secs = t.elapsed().as_secs_f64();
    let client_peak = own_peak_bytes();
    let server_peak = served.peak_kib().map(|k| k * 1024);
    rt.block_on(client.close());
    let got = Store::open(&dest)?.count("docs")? as usize;
    if got != n {
        bail!("the clone holds {got} rows, not {n}");
    }
    let v = serde_json::json!({
        "bench": "sync", "n": n, "dim": dim, "mode": "clone", "transport": transport,
        "connect_s": connect, "sync_s": secs, "plain_sqlite_s": plain, "ratio": secs / plain,
        "wire_bytes": r.bytes, "payload_bytes": payload,
        "client_peak_rss_bytes": client_peak, "server_peak_rss_bytes": server_peak,
        "max_writer_stall_ms": serde_json::Value::Null,
    });
    if json {
        return crate::output::json(&v);
    }
    println!("clone of a store of {n} x {dim}-dim vectors from a quiver serve on loopback");
    println!("  connect        {:>9.2} ms", connect * 1000.0);
    println!(
        "  clone          {secs:>9.3} s   ({} bytes of store file)",
        r.bytes
    );
    println!(
        "  plain SQLite   {plain:>9.3} s   ratio {:.2}x",
        secs / plain
    );
    Ok(())
}

/// Two stores holding the same `n` rows of `items(id, title, n)`, synced.
fn twin_stores(dir: &tempfile::TempDir, n: usize) -> Result<(Store, Store)> {
    let mut a = Store::init(dir.path().join("a.db"))?;
    let mut b = Store::init(dir.path().join("b.db"))?;
    for s in [&mut a, &mut b] {
        s.execute_sql("CREATE TABLE items(id TEXT PRIMARY KEY, title TEXT, n INTEGER)")?;
        s.add_table("items", "default", Strategy::Lww)?;
    }
    let tx = a.connection().unchecked_transaction()?;
    {
        let mut st = tx.prepare("INSERT INTO items VALUES (?1, ?2, ?3)")?;
        for i in 0..n {
            st.execute(rusqlite::params![
                format!("item-{i:08}"),
                format!("title {i}"),
                i as i64
            ])?;
        }
    }
    tx.commit()?;
    pull(&mut b, &a)?;
    Ok((a, b))
}

/// Applies everything `src` has that `dst` lacks; returns the seconds spent
/// applying (not reading) and the conflicts detected.
fn pull(dst: &mut Store, src: &Store) -> Result<(f64, u64)> {
    let theirs = dst.table_versions("default")?;
    let batches: Vec<_> = src
        .changes_since_tables("default", &theirs, StreamLimits::default())?
        .collect::<quiver_store::Result<_>>()?;
    let t = Instant::now();
    let mut conflicts = 0;
    for b in &batches {
        conflicts += dst.apply(b)?.conflicts_detected;
    }
    Ok((t.elapsed().as_secs_f64(), conflicts))
}

/// Updates the title of rows `range` in `s`, in one transaction.
fn retitle(s: &Store, range: std::ops::Range<usize>, tag: &str) -> Result<()> {
    let tx = s.connection().unchecked_transaction()?;
    {
        let mut st = tx.prepare("UPDATE items SET title = ?1 WHERE id = ?2")?;
        for i in range {
            st.execute([format!("{tag} {i}"), format!("item-{i:08}")])?;
        }
    }
    tx.commit()?;
    Ok(())
}

/// The same shape inserted with plain SQLite: the baseline.
fn plain_items(dir: &tempfile::TempDir, n: usize) -> Result<f64> {
    let mut c = rusqlite::Connection::open(dir.path().join("plain.db"))?;
    c.pragma_update(None, "journal_mode", "WAL")?;
    c.pragma_update(None, "synchronous", "NORMAL")?;
    c.execute_batch("CREATE TABLE items(id TEXT PRIMARY KEY, title TEXT, n INTEGER)")?;
    let t = Instant::now();
    let tx = c.transaction()?;
    {
        let mut st = tx.prepare("INSERT INTO items VALUES (?1, ?2, ?3)")?;
        for i in 0..n {
            st.execute(rusqlite::params![
                format!("item-{i:08}"),
                format!("upd {i}"),
                i as i64
            ])?;
        }
    }
    tx.commit()?;
    Ok(t.elapsed().as_secs_f64())
}

/// `quiver bench apply`: `n` remote changes to rows the replica holds,
/// half of them concurrent with its own edits.
pub fn apply(n: usize, json: bool) -> Result<()> {
    let dir = tempfile::tempdir()?;
    let (a, mut b) = twin_stores(&dir, n)?;
    retitle(&a, 0..n, "from a")?;
    retitle(&b, 0..n / 2, "from b")?;
    let (secs, conflicts) = pull(&mut b, &a)?;
    let plain = plain_items(&dir, n)?;
    let v = serde_json::json!({
        "bench": "apply", "n": n, "apply_s": secs, "plain_sqlite_s": plain,
        "ratio": secs / plain, "conflicts": conflicts,
    });
    if json {
        return crate::output::json(&v);
    }
    println!(
        "apply {n} remote updates to held rows, {} of them concurrent with local edits",
        n / 2
    );
    println!("  apply          {secs:>8.3} s  ({conflicts} conflicts resolved by lww)");
    println!("  plain SQLite   {plain:>8.3} s  (inserting {n} rows)");
    println!("  ratio          {:>8.2}x", secs / plain);
    Ok(())
}

/// `quiver bench conflicts`: `n` concurrent versions applied and resolved.
pub fn conflicts(n: usize, json: bool) -> Result<()> {
    let dir = tempfile::tempdir()?;
    let (a, mut b) = twin_stores(&dir, n)?;
    retitle(&a, 0..n, "from a")?;
    retitle(&b, 0..n, "from b")?;
    let (secs, found) = pull(&mut b, &a)?;
    if found as usize != n {
        bail!("{found} conflicts detected, not {n}");
    }
    let v = serde_json::json!({"bench": "conflicts", "n": n, "seconds": secs, "conflicts": found});
    if json {
        return crate::output::json(&v);
    }
    println!(
        "{n} concurrent versions applied and resolved (lww) in {:.3} ms",
        secs * 1000.0
    );
    Ok(())
}

//! `quiver bench`: measured as ratios against a baseline in the same process.

use std::time::Instant;

use anyhow::Result;
use quiver_store::{CollectionSpec, Record, Store};
use rusqlite::{params, Connection};

/// A small deterministic generator, so both sides insert the same rows.
struct XorShift(u64);

impl XorShift {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
    fn unit(&mut self) -> f32 {
        (self.next() >> 40) as f32 / (1u64 << 24) as f32 * 2.0 - 1.0
    }
}

/// `n` records of `dim` dimensions with random UUID-like ids and ~100-byte metadata.
pub fn records(n: usize, dim: usize, seed: u64) -> Vec<Record> {
    let mut g = XorShift(seed | 1);
    (0..n)
        .map(|i| {
            let id = format!("{:016x}{:016x}", g.next(), g.next());
            let mut r = Record::new(&id, (0..dim).map(|_| g.unit()).collect());
            r.metadata = serde_json::json!({
                "source": "bench", "index": i, "tags": ["alpha", "beta"],
                "score": (g.unit() * 1000.0).round() / 1000.0, "text": "lorem ipsum dolor sit amet"
            });
            r
        })
        .collect()
}

/// A plain SQLite connection set up as a store's is.
fn plain_conn(path: &std::path::Path) -> Result<Connection> {
    let conn = Connection::open(path)?;
    conn.busy_timeout(std::time::Duration::from_secs(5))?;
    conn.pragma_update(None, "journal_mode", "WAL")?;
    conn.pragma_update(None, "synchronous", "NORMAL")?;
    conn.pragma_update(None, "cache_size", -65536)?;
    conn.pragma_update(None, "wal_autocheckpoint", 10000)?;
    Ok(conn)
}

/// Peak resident memory of a process, in KiB (Linux).
pub(crate) fn peak_kib(pid: u32) -> Option<u64> {
    let s = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    s.lines()
        .find(|l| l.starts_with("VmHWM:"))?
        .split_whitespace()
        .nth(1)?
        .parse()
        .ok()
}

/// A `quiver serve` child process on a loopback port of its own, killed
/// when dropped.
pub(crate) struct ServeChild {
    child: std::process::Child,
    pub addr: String,
    pub fp: String,
    _out: std::io::BufReader<std::process::ChildStdout>,
}

impl ServeChild {
    pub fn start(db: &std::path::Path, extra: &[&str]) -> Result<ServeChild> {
        use std::io::BufRead;
        let mut child = std::process::Command::new(std::env::current_exe()?)
            .arg("--db")
            .arg(db)
            .args(["serve", "--listen", "127.0.0.1:0", "--http", "off"])
            .args(extra)
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::null())
            .spawn()
            .map_err(|e| anyhow::anyhow!("starting quiver serve: {e}"))?;
        let mut out = std::io::BufReader::new(
            child
                .stdout
                .take()
                .ok_or_else(|| anyhow::anyhow!("no stdout"))?,
        );
        let mut word = |what: &str| -> Result<String> {
            let mut line = String::new();
            out.read_line(&mut line)?;
            line.split_whitespace()
                .nth(2)
                .map(str::to_string)
                .ok_or_else(|| anyhow::anyhow!("serve printed {line:?} where its {what} goes"))
        };
        let addr = word("address")?;
        let fp = word("fingerprint")?;
        Ok(ServeChild {
            child,
            addr,
            fp,
            _out: out,
        })
    }

    pub fn peak_kib(&self) -> Option<u64> {
        peak_kib(self.child.id())
    }
}

impl Drop for ServeChild {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

pub(crate) fn plain_insert(path: &std::path::Path, rows: &[Record], batch: usize) -> Result<f64> {
    let mut conn = plain_conn(path)?;
    conn.execute_batch(
        "CREATE TABLE docs(id TEXT PRIMARY KEY NOT NULL, vector BLOB NOT NULL, metadata TEXT NOT NULL, content TEXT)",
    )?;
    let start = Instant::now();
    for chunk in rows.chunks(batch) {
        let tx = conn.transaction()?;
        {
            let mut stmt = tx.prepare_cached(
                "INSERT INTO docs(id, vector, metadata, content) VALUES (?1, ?2, ?3, ?4)
                 ON CONFLICT(id) DO UPDATE SET vector = excluded.vector, metadata = excluded.metadata, content = excluded.content",
            )?;
            for r in chunk {
                let blob = quiver_core::vector::encode(&r.vector);
                stmt.execute(params![r.id, blob, r.metadata.to_string(), r.content])?;
            }
        }
        tx.commit()?;
    }
    Ok(start.elapsed().as_secs_f64())
}

/// The time to write the rows, then the time to fold the logged inserts
/// into the clock (which the first sync or conflict review would pay).
fn quiver_insert(
    path: &std::path::Path,
    rows: &[Record],
    dim: usize,
    batch: usize,
) -> Result<(f64, f64)> {
    let mut s = Store::init(path)?;
    s.create_collection(&CollectionSpec::new("docs", dim))?;
    let start = Instant::now();
    for chunk in rows.chunks(batch) {
        s.put_many("docs", chunk)?;
    }
    let write = start.elapsed().as_secs_f64();
    let start = Instant::now();
    s.fold_pending()?;
    Ok((write, start.elapsed().as_secs_f64()))
}

pub fn write(n: usize, dim: usize, batch: usize, json: bool) -> Result<()> {
    let batch = batch.max(1);
    let rows = records(n, dim, 0x5eed);
    let dir = tempfile::tempdir()?;
    // Alternate the two sides and keep each side's best run: nine runs for
    // small n, where a single scheduler hiccup is a large share, three for
    // large n.
    let rounds = if n <= 20_000 { 9 } else { 3 };
    let mut plain = f64::MAX;
    let (mut quiver, mut fold) = (f64::MAX, f64::MAX);
    for round in 0..rounds {
        plain = plain.min(plain_insert(
            &dir.path().join(format!("plain{round}.db")),
            &rows,
            batch,
        )?);
        let (w, f) = quiver_insert(
            &dir.path().join(format!("quiver{round}.db")),
            &rows,
            dim,
            batch,
        )?;
        quiver = quiver.min(w);
        fold = fold.min(f);
    }
    let ratio = quiver / plain;
    let ratio_with_fold = (quiver + fold) / plain;
    if json {
        crate::output::json(&serde_json::json!({
            "bench": "write", "n": n, "dim": dim, "batch": batch,
            "quiver_s": quiver, "plain_sqlite_s": plain, "ratio": ratio,
            "fold_s": fold, "ratio_with_fold": ratio_with_fold,
            "quiver_rows_per_s": n as f64 / quiver, "plain_rows_per_s": n as f64 / plain,
        }))?;
    } else {
        println!("insert {n} x {dim}-dim vectors, {batch} per transaction, random ids");
        println!(
            "  plain SQLite  {plain:>8.3} s  {:>9.0} rows/s",
            n as f64 / plain
        );
        println!(
            "  quiverdb      {quiver:>8.3} s  {:>9.0} rows/s",
            n as f64 / quiver
        );
        println!("  ratio         {ratio:>8.2}x (change tracking cost on the write path)");
        println!(
            "  + fold        {fold:>8.3} s  {ratio_with_fold:>8.2}x with the clock brought up to date"
        );
    }
    Ok(())
}

/// The table of `quiver bench write --policies`: a collection's shape plus
/// a counter and a first-writer-wins column.
const POLICY_TABLE: &str = "CREATE TABLE docs(id TEXT PRIMARY KEY NOT NULL, vector BLOB NOT NULL,
    metadata TEXT NOT NULL, content TEXT, views INTEGER NOT NULL DEFAULT 0, title TEXT)";

/// Inserts the rows in transactions of `batch`, then increments each
/// row's `views` once, in transactions of `batch`: the time of both.
fn sql_writes(conn: &mut Connection, rows: &[Record], batch: usize) -> Result<f64> {
    let start = Instant::now();
    for chunk in rows.chunks(batch) {
        let tx = conn.transaction()?;
        {
            let mut stmt = tx.prepare_cached(
                "INSERT INTO docs(id, vector, metadata, content, title) VALUES (?1, ?2, ?3, ?4, ?5)",
            )?;
            for r in chunk {
                let blob = quiver_core::vector::encode(&r.vector);
                stmt.execute(params![
                    r.id,
                    blob,
                    r.metadata.to_string(),
                    r.content,
                    &r.id[..8]
                ])?;
            }
        }
        tx.commit()?;
    }
    for chunk in rows.chunks(batch) {
        let tx = conn.transaction()?;
        {
            let mut stmt = tx.prepare_cached("UPDATE docs SET views = views + 1 WHERE id = ?1")?;
            for r in chunk {
                stmt.execute([&r.id])?;
            }
        }
        tx.commit()?;
    }
    Ok(start.elapsed().as_secs_f64())
}

/// The same writes on a replicated table, with or without column rules.
fn quiver_sql_writes(
    path: &std::path::Path,
    rows: &[Record],
    batch: usize,
    policies: bool,
) -> Result<f64> {
    let mut s = Store::init(path)?;
    s.execute_sql(POLICY_TABLE)?;
    let opts = quiver_store::TableOptions {
        policies: if policies {
            vec![
                ("views".into(), quiver_core::Strategy::Counter),
                ("title".into(), quiver_core::Strategy::Fww),
            ]
        } else {
            Vec::new()
        },
        ..Default::default()
    };
    s.add_table_with("docs", "default", quiver_core::Strategy::Lww, &opts)?;
    drop(s);
    let mut conn = plain_conn(path)?;
    sql_writes(&mut conn, rows, batch)
}

/// `quiver bench write --policies`: what per-column rules cost on the
/// write path, against the same replicated table without them (and both
/// against plain SQLite), each arm's best of several alternating runs.
pub fn write_policies(n: usize, dim: usize, batch: usize, json: bool) -> Result<()> {
    let batch = batch.max(1);
    let rows = records(n, dim, 0x5eed);
    let dir = tempfile::tempdir()?;
    let rounds = if n <= 20_000 { 7 } else { 3 };
    let (mut plain, mut bare, mut ruled) = (f64::MAX, f64::MAX, f64::MAX);
    for round in 0..rounds {
        let mut conn = plain_conn(&dir.path().join(format!("plain{round}.db")))?;
        conn.execute_batch(POLICY_TABLE)?;
        plain = plain.min(sql_writes(&mut conn, &rows, batch)?);
        bare = bare.min(quiver_sql_writes(
            &dir.path().join(format!("bare{round}.db")),
            &rows,
            batch,
            false,
        )?);
        ruled = ruled.min(quiver_sql_writes(
            &dir.path().join(format!("ruled{round}.db")),
            &rows,
            batch,
            true,
        )?);
    }
    let (ratio, ratio_without) = (ruled / plain, bare / plain);
    let cost = ruled / bare;
    if json {
        crate::output::json(&serde_json::json!({
            "bench": "write", "policies": ["views=counter", "title=fww"], "n": n, "dim": dim,
            "batch": batch, "plain_sqlite_s": plain, "quiver_s": ruled,
            "quiver_without_policies_s": bare, "ratio": ratio,
            "ratio_without_policies": ratio_without, "policy_cost": cost,
        }))?;
    } else {
        println!(
            "insert {n} rows ({dim}-dim vector, views=counter, title=fww), then views = views + 1 on each, \
             {batch} per transaction"
        );
        println!("  plain SQLite             {plain:>8.3} s");
        println!("  quiverdb, no rules       {bare:>8.3} s  {ratio_without:>6.2}x");
        println!("  quiverdb, counter + fww  {ruled:>8.3} s  {ratio:>6.2}x");
        println!(
            "  rules cost               {cost:>8.2}x the same writes without them ({:+.1} %)",
            (cost - 1.0) * 100.0
        );
    }
    Ok(())
}

/// `quiver bench compact`: `n` rows of a plain table inserted and deleted
/// (one tombstone each, no peer to wait for), then one compaction pass
/// timed, with the file size before and after.
pub fn compact(n: usize, json: bool) -> Result<()> {
    let dir = tempfile::tempdir()?;
    let path = dir.path().join("compact.db");
    let mut store = quiver_store::Store::init(&path)?;
    store.execute_sql("CREATE TABLE episodes(id TEXT PRIMARY KEY, body TEXT)")?;
    store.add_table("episodes", "default", quiver_core::Strategy::Lww)?;
    drop(store);
    {
        // Another writer, as an application: captured by the triggers.
        let mut c = rusqlite::Connection::open(&path)?;
        c.busy_timeout(std::time::Duration::from_secs(5))?;
        for chunk in (0..n as i64).collect::<Vec<_>>().chunks(50_000) {
            let tx = c.transaction()?;
            {
                let mut st = tx.prepare("INSERT INTO episodes(id, body) VALUES (?1, ?2)")?;
                for i in chunk {
                    st.execute(rusqlite::params![
                        format!("ep-{i:08}"),
                        format!("episode {i} of a busy agent")
                    ])?;
                }
            }
            tx.commit()?;
            c.execute("DELETE FROM episodes", [])?;
        }
    }
    let mut store = quiver_store::Store::open(&path)?;
    store.fold_pending()?;
    let clock_records: i64 =
        store
            .connection()
            .query_row("SELECT count(*) FROM quiver_clock", [], |r| r.get(0))?;
    let r = store.compact(&quiver_store::CompactOptions::default())?;
    if json {
        crate::output::json(&serde_json::json!({
            "bench": "compact", "n": n, "clock_records": clock_records,
            "purged": r.purged, "seconds": r.seconds,
            "clock_records_after": r.clock_records,
            "bytes_before": r.bytes_before, "bytes_after": r.bytes_after,
            "space": r.space,
        }))?;
    } else {
        println!(
            "compact: {clock_records} clock records, {} purged in {:.2} s; file {} -> {} bytes ({})",
            r.purged, r.seconds, r.bytes_before, r.bytes_after, r.space
        );
    }
    Ok(())
}

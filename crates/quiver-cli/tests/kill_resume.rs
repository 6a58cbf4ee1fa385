//! The receiver is killed with SIGKILL in the middle of a 100,000-vector
//! sync, restarted, and synced again: exports are equal and no change is
//! applied twice (the second sync applies exactly what the first did not
//! commit). An empty replica receives a snapshot (rows in key order), and
//! each committed batch keeps its mark (the last key through which every
//! row arrived), so the resumed sync goes on past it and re-sends nothing.

mod common;

use std::io::Write;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::{bin, Node};

const N: usize = 100_000;

fn committed_rows(db: &std::path::Path) -> u64 {
    let Ok(c) =
        rusqlite::Connection::open_with_flags(db, rusqlite::OpenFlags::SQLITE_OPEN_READ_ONLY)
    else {
        return 0;
    };
    c.query_row("SELECT count(*) FROM docs", [], |r| r.get::<_, i64>(0))
        .map(|n| n as u64)
        .unwrap_or(0)
}

#[test]
fn sigkill_mid_sync_then_resume() {
    kill_and_resume("quic");
}

/// The same over TLS on TCP (HTTP/2): the cursor is the same, so is the resume.
#[test]
fn sigkill_mid_sync_over_tcp_then_resume() {
    kill_and_resume("tcp");
}

/// The source is killed mid-snapshot: the receiver's sync fails, keeps what
/// it committed, and the next sync against the restarted source goes on
/// past the last key it committed.
#[test]
fn sigkill_of_the_source_mid_snapshot_then_resume() {
    let a = source();
    let mut s = a.serve(&[]);
    let b = Node::new("b");
    let mut child = Command::new(bin())
        .arg("--db")
        .arg(&b.db)
        .args(["sync", &s.addr, "--pin", &s.fp])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    wait_for_rows(&b.db, &mut child);
    s.child.kill().unwrap(); // SIGKILL
    s.child.wait().unwrap();
    let started = Instant::now();
    let status = loop {
        if let Some(st) = child.try_wait().unwrap() {
            break st;
        }
        assert!(
            started.elapsed() < Duration::from_secs(60),
            "the sync did not notice its source was gone"
        );
        std::thread::sleep(Duration::from_millis(50));
    };
    assert!(!status.success(), "the sync cut short must fail");
    let k = committed_rows(&b.db);
    assert!(
        k > 0 && (k as usize) < N,
        "cut mid-way ({k} rows committed)"
    );

    let s = a.serve(&[]);
    let out = b.q(&["--json", "sync", &s.addr, "--pin", &s.fp]);
    let r: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(a.export("docs"), b.export("docs"));
    assert_eq!(r["applied"].as_u64().unwrap(), 4 * (N as u64 - k), "{out}");
    assert_eq!(r["snapshot_rows"].as_u64().unwrap(), N as u64 - k, "{out}");
}

/// A node holding `N` vectors of `docs`.
fn source() -> Node {
    let a = Node::new("a");
    a.q(&["collection", "create", "docs", "--dim", "4"]);
    let jsonl = a.dir.path().join("data.jsonl");
    let mut f = std::io::BufWriter::new(std::fs::File::create(&jsonl).unwrap());
    for i in 0..N {
        let x = i as f32;
        writeln!(
            f,
            r#"{{"id":"v{i:06}","vector":[{x},1,2,3],"metadata":{{"i":{i}}}}}"#
        )
        .unwrap();
    }
    f.flush().unwrap();
    drop(f);
    a.q(&["import", "docs", jsonl.to_str().unwrap()]);
    a
}

/// Waits until the sync `child` into `db` has committed some rows.
fn wait_for_rows(db: &std::path::Path, child: &mut std::process::Child) {
    let started = Instant::now();
    while committed_rows(db) < 12_000 {
        assert!(
            child.try_wait().unwrap().is_none(),
            "the sync finished before it could be killed"
        );
        assert!(started.elapsed() < Duration::from_secs(120), "no progress");
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn kill_and_resume(transport: &str) {
    let a = source();
    let s = a.serve(&[]);

    let b = Node::new("b");
    let mut child = Command::new(bin())
        .arg("--db")
        .arg(&b.db)
        .args(["sync", &s.addr, "--pin", &s.fp, "--transport", transport])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    wait_for_rows(&b.db, &mut child);
    child.kill().unwrap(); // SIGKILL
    child.wait().unwrap();
    let k = committed_rows(&b.db);
    assert!(
        k > 0 && (k as usize) < N,
        "killed mid-way ({k} rows committed)"
    );

    let out = b.q(&[
        "--json",
        "sync",
        &s.addr,
        "--pin",
        &s.fp,
        "--transport",
        transport,
    ]);
    let r: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(r["transport"], transport, "{out}");
    assert_eq!(a.export("docs"), b.export("docs"));
    // Each row travels as four changes (existence, vector, metadata, content):
    // exactly the rows missing after the kill were applied, none twice.
    assert_eq!(r["applied"].as_u64().unwrap(), 4 * (N as u64 - k), "{out}");
    assert!(
        r["changes_received"].as_u64().unwrap() < 4 * N as u64,
        "resumed from the cursor, not from scratch: {out}"
    );
    // A snapshot, continued past the last key the killed one committed.
    assert_eq!(r["snapshot_rows"].as_u64().unwrap(), N as u64 - k, "{out}");
    assert_eq!(
        r["snapshot_tables"],
        serde_json::json!(["default.docs"]),
        "{out}"
    );
}

//! What a new user meets in the first hour: machine output and errors under
//! `--json`, safe defaults, one daemon per store, read-only stores, imports
//! that can go on past a bad line, waits that end soon, plain logs in files.
//! Real `quiver` processes, on loopback only.

mod common;

use std::io::{BufRead, BufReader, Read};
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::{bin, closed_addr, err, ok, run, Node};

fn json_lines(text: &str) -> Vec<serde_json::Value> {
    text.lines()
        .filter(|l| !l.trim().is_empty())
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("not JSON ({e}): {l}")))
        .collect()
}

fn docs(n: &Node) {
    n.q(&["collection", "create", "docs", "--dim", "3"]);
}

#[test]
fn json_means_json_for_results_and_errors() {
    let a = Node::new("a");
    docs(&a);
    let put = json_lines(&a.q(&["--json", "put", "docs", "p1", "--vector", "[1,2,3]"]));
    assert_eq!(put[0]["put"]["id"], "p1");
    let del = json_lines(&a.q(&["--json", "delete", "docs", "p1"]));
    assert_eq!(del[0]["deleted"]["collection"], "docs");

    let out = run(&a.db, &["--json", "get", "docs", "nosuch"]);
    assert_eq!(out.status.code(), Some(1));
    let e = json_lines(&String::from_utf8_lossy(&out.stderr));
    assert!(e[0]["error"].as_str().unwrap().contains("nosuch"), "{e:?}");
    assert_eq!(e[0]["exit_code"], 1);

    // A usage error too, with its own exit code.
    let out = run(&a.db, &["--json", "put", "docs"]);
    assert_eq!(out.status.code(), Some(2));
    let e = json_lines(&String::from_utf8_lossy(&out.stderr));
    assert_eq!(e[0]["exit_code"], 2);
}

#[test]
fn a_closed_pipe_ends_export_quietly() {
    let a = Node::new("a");
    docs(&a);
    let lines: String = (0..5000)
        .map(|i| format!("{{\"id\":\"r{i:05}\",\"vector\":[1,2,3]}}\n"))
        .collect();
    let file = a.dir.path().join("rows.jsonl");
    std::fs::write(&file, lines).unwrap();
    a.q(&["import", "docs", file.to_str().unwrap()]);
    let mut child = Command::new(bin())
        .arg("--db")
        .arg(&a.db)
        .args(["export", "docs"])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut first = String::new();
    BufReader::new(child.stdout.take().unwrap())
        .read_line(&mut first)
        .unwrap();
    // The reader is gone now, as `head -1` would be.
    assert!(first.contains("r00000"), "{first}");
    let status = child.wait().unwrap();
    let mut stderr = String::new();
    child
        .stderr
        .take()
        .unwrap()
        .read_to_string(&mut stderr)
        .unwrap();
    assert!(stderr.is_empty(), "a closed pipe is no error: {stderr}");
    use std::os::unix::process::ExitStatusExt;
    assert!(
        status.success() || status.signal() == Some(SIGPIPE),
        "{status:?}"
    );
}

/// The signal a write into a closed pipe raises (Linux).
const SIGPIPE: i32 = 13;

#[test]
fn serving_the_network_needs_a_token_or_a_client_ca() {
    let a = Node::new("a");
    let e = err(&a.db, &["serve", "--listen", "0.0.0.0:0"]);
    assert!(
        e.contains("--allow-anonymous") && e.contains("--token"),
        "{e}"
    );
    // Loopback needs nothing; a token or the explicit flag lets it start.
    for extra in [&["--token", "t"][..], &["--allow-anonymous"][..]] {
        let mut child = Command::new(bin())
            .arg("--db")
            .arg(&a.db)
            .args(["serve", "--listen", "0.0.0.0:0", "--http", "off"])
            .args(extra)
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        let mut line = String::new();
        BufReader::new(child.stdout.take().unwrap())
            .read_line(&mut line)
            .unwrap();
        assert!(
            line.starts_with("listening on 0.0.0.0:"),
            "{extra:?}: {line}"
        );
        child.kill().unwrap();
        child.wait().unwrap();
    }
}

#[test]
fn a_second_daemon_on_one_store_is_refused_with_the_first_ones_pid_and_address() {
    let a = Node::new("a");
    let first = a.serve(&[]);
    let e = err(&a.db, &["serve", "--listen", "127.0.0.1:0"]);
    assert!(
        e.contains(&format!("pid {}", first.child.id())) && e.contains(&first.addr),
        "{e}"
    );
    // Another store may not take the first one's port either, and is told
    // which address is busy.
    let b = Node::new("b");
    let e = err(&b.db, &["serve", "--listen", &first.addr]);
    assert!(
        e.contains(&first.addr) && e.contains("already in use"),
        "{e}"
    );
    assert_eq!(e.matches("already in use").count(), 1, "said once: {e}");
    drop(first);
    // Once the first has stopped, the store can be served again.
    let again = a.serve(&[]);
    assert!(again.addr.starts_with("127.0.0.1:"));
}

/// Runs `quiver` as a user who may read the store but not write it: as
/// `nobody` when these tests run as root (root writes anything), else as
/// ourselves after taking the write bits away. `exe` is a copy of the
/// binary that user can reach.
fn as_reader(exe: &Path, db: &Path, args: &[&str]) -> std::process::Output {
    let mut cmd = if is_root() {
        let mut c = Command::new("setpriv");
        c.args(["--reuid=65534", "--regid=65534", "--clear-groups"]);
        c.arg(exe);
        c
    } else {
        Command::new(exe)
    };
    cmd.arg("--db").arg(db).args(args).output().unwrap()
}

fn is_root() -> bool {
    std::fs::read_to_string("/proc/self/status")
        .map(|s| {
            s.lines()
                .any(|l| l.starts_with("Uid:") && l.split_whitespace().nth(1) == Some("0"))
        })
        .unwrap_or(false)
}

#[test]
fn reading_commands_work_on_a_store_that_cannot_be_written() {
    use std::os::unix::fs::PermissionsExt;
    let a = Node::new("a");
    docs(&a);
    a.q(&["put", "docs", "x", "--vector", "[1,2,3]"]);
    a.q(&[
        "sql",
        "INSERT INTO docs(id, vector) VALUES ('y', x'0000803f0000803f0000803f')",
    ]);
    let before = a.q(&["export", "docs"]);
    // The build folder may be closed to other users: a copy beside the store.
    let exe = a.dir.path().join("quiver-copy");
    std::fs::copy(bin(), &exe).unwrap();
    for entry in std::fs::read_dir(a.dir.path()).unwrap() {
        let p = entry.unwrap().path();
        let mode = if p == exe { 0o555 } else { 0o444 };
        std::fs::set_permissions(&p, std::fs::Permissions::from_mode(mode)).unwrap();
    }
    std::fs::set_permissions(a.dir.path(), std::fs::Permissions::from_mode(0o555)).unwrap();
    let read = |args: &[&str]| {
        let out = as_reader(&exe, &a.db, args);
        assert!(
            out.status.success(),
            "{args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8(out.stdout).unwrap()
    };
    assert_eq!(read(&["export", "docs"]), before);
    assert!(read(&["status"]).contains("docs"));
    assert!(read(&["get", "docs", "y"]).contains("[1.0,1.0,1.0]"));
    assert!(read(&["search", "docs", "--vector", "[1,1,1]", "-k", "1"]).contains(" y "));
    assert!(read(&["sql", "SELECT count(*) AS n FROM docs"]).contains('2'));
    read(&["conflicts", "list"]);
    read(&["collection", "list"]);
    for write in [
        &["put", "docs", "z", "--vector", "[1,2,3]"][..],
        &["sql", "DELETE FROM docs"][..],
    ] {
        let out = as_reader(&exe, &a.db, write);
        let e = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(1), "{write:?}: {e}");
        assert!(e.contains("read-only"), "{write:?}: {e}");
    }
    std::fs::set_permissions(a.dir.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
    std::fs::set_permissions(&a.db, std::fs::Permissions::from_mode(0o644)).unwrap();
    assert_eq!(a.q(&["export", "docs"]), before, "nothing changed");
}

#[test]
fn import_can_skip_bad_lines_and_a_rerun_changes_nothing() {
    let a = Node::new("a");
    docs(&a);
    let file = a.dir.path().join("in.jsonl");
    std::fs::write(
        &file,
        "{\"id\":\"g1\",\"vector\":[1,1,1]}\nnot json\n{\"id\":\"g2\",\"vector\":[2,2,2]}\n\
         {\"id\":\"g3\",\"vector\":[1,2]}\n",
    )
    .unwrap();
    let f = file.to_str().unwrap();
    let e = err(&a.db, &["import", "docs", f]);
    assert!(e.contains("line 2") && e.contains("--skip-bad"), "{e}");
    let r = json_lines(&a.q(&["--json", "import", "docs", f, "--skip-bad"]));
    assert_eq!(r[0]["imported"], 2);
    assert_eq!(r[0]["skipped"], serde_json::json!([2, 4]));
    let version = |n: &Node| {
        let st: serde_json::Value = serde_json::from_str(&n.q(&["--json", "status"])).unwrap();
        st["db_version"].as_u64().unwrap()
    };
    let v = version(&a);
    // The same file again: nothing new is written, nothing is versioned.
    let r = json_lines(&a.q(&["--json", "import", "docs", f, "--skip-bad"]));
    assert_eq!(
        (r[0]["imported"].as_u64(), r[0]["unchanged"].as_u64()),
        (Some(0), Some(2))
    );
    assert_eq!(version(&a), v);
    let text = a.q(&["import", "docs", f, "--skip-bad"]);
    assert!(text.contains("skipped 2 bad lines: 2, 4"), "{text}");
}

#[test]
fn sql_prints_every_statement_and_views_are_refused_with_the_reason() {
    let a = Node::new("a");
    let out = a.q(&["sql", "SELECT 1 AS one; SELECT 2 AS two"]);
    assert!(out.contains("one") && out.contains("two"), "{out}");
    let out = a.q(&[
        "sql",
        "CREATE TABLE t(id TEXT PRIMARY KEY, v INTEGER); INSERT INTO t VALUES ('a', 1); \
         SELECT v FROM t",
    ]);
    assert!(out.lines().any(|l| l.trim() == "1"), "{out}");
    a.q(&["sql", "CREATE VIEW tv AS SELECT * FROM t"]);
    let e = err(&a.db, &["table", "add", "tv"]);
    assert!(e.contains("view"), "{e}");
}

#[test]
fn bad_pins_and_addresses_fail_at_once_and_a_silent_server_soon() {
    let a = Node::new("a");
    let e = err(&a.db, &["sync", "127.0.0.1:4433", "--pin", "xyz"]);
    assert!(e.contains("not a SHA-256 fingerprint"), "{e}");
    let t = Instant::now();
    let e = err(&a.db, &["sync", "127.0.0.1:notaport", "--insecure"]);
    assert!(e.contains("bad address"), "{e}");
    assert!(
        !e.contains("retrying"),
        "a malformed address is not retried: {e}"
    );
    // Nothing listens there: said within 3 s (the default retries do not
    // apply to a server that never answered).
    let closed = closed_addr();
    let e = err(&a.db, &["sync", &closed, "--insecure"]);
    assert!(e.contains("no QUIC server answered"), "{e}");
    assert!(
        t.elapsed() < Duration::from_secs(6),
        "took {:?}",
        t.elapsed()
    );
}

#[test]
fn a_refused_live_link_says_only_why() {
    let a = Node::new("a");
    let s = a.serve(&["--token", "secret"]);
    let b = Node::new("b");
    let out = run(&b.db, &["sync", &s.addr, "--pin", &s.fp, "--watch"]);
    let (stdout, stderr) = (
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr),
    );
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(stderr.contains("token"), "{stderr}");
    assert!(!stdout.contains("live link"), "{stdout}");
}

#[test]
fn daemon_output_is_plain_in_files_and_counts_agree() {
    let a = Node::new("a");
    docs(&a);
    a.q(&["put", "docs", "x", "--vector", "[1,2,3]"]);
    let log = a.dir.path().join("serve.log");
    let mut child = Command::new(bin())
        .arg("--db")
        .arg(&a.db)
        .args(["serve", "--listen", "127.0.0.1:0"])
        .stdout(Stdio::piped())
        .stderr(std::fs::File::create(&log).unwrap())
        .spawn()
        .unwrap();
    let mut out = BufReader::new(child.stdout.take().unwrap());
    let mut lines = Vec::new();
    for _ in 0..3 {
        let mut l = String::new();
        out.read_line(&mut l).unwrap();
        lines.push(l);
    }
    let addr = lines[0].split_whitespace().nth(2).unwrap().to_string();
    let fp = lines[1].split_whitespace().nth(2).unwrap().to_string();
    let http = lines[2]
        .strip_prefix("health and metrics on http://")
        .and_then(|r| r.split('/').next())
        .unwrap()
        .to_string();
    // Every series is there, at zero, before anything happened.
    let (_, metrics) = common::http_get(&http, "/metrics");
    for series in [
        "quiver_syncs_total{result=\"ok\"} 0",
        "quiver_changes_received_total 0",
        "quiver_connections_active 0",
    ] {
        assert!(metrics.contains(series), "{series} missing: {metrics}");
    }
    let b = Node::new("b");
    for _ in 0..2 {
        b.q(&["sync", &addr, "--pin", &fp]);
    }
    // The server counts its side after the client has its answer: wait
    // until the metric shows both syncs, then status must say the same.
    let deadline = Instant::now() + Duration::from_secs(10);
    let ok_syncs = loop {
        let (_, metrics) = common::http_get(&http, "/metrics");
        let ok: u64 = metrics
            .lines()
            .find(|l| l.starts_with("quiver_syncs_total{result=\"ok\"}"))
            .and_then(|l| l.split_whitespace().last())
            .and_then(|v| v.parse().ok())
            .unwrap();
        if ok >= 2 {
            break ok;
        }
        assert!(Instant::now() < deadline, "metrics count {ok} ok syncs");
        std::thread::sleep(Duration::from_millis(50));
    };
    assert_eq!(ok_syncs, 2);
    loop {
        let st: serde_json::Value = serde_json::from_str(&a.q(&["--json", "status"])).unwrap();
        if st["sync"]["sync_count"].as_u64() == Some(ok_syncs) {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "status {st} against metrics {ok_syncs}"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    child.kill().unwrap();
    child.wait().unwrap();
    let text = std::fs::read_to_string(&log).unwrap();
    assert!(text.contains("INFO"), "{text}");
    assert!(!text.contains('\x1b'), "colour codes in a file: {text}");
}

#[test]
fn config_show_lines_up() {
    let out = ok(Path::new("unused.db"), &["config", "show"]);
    let columns: Vec<usize> = out.lines().map(|l| l.find(" = ").unwrap()).collect();
    assert!(columns.windows(2).all(|w| w[0] == w[1]), "{out}");
    let sources: Vec<usize> = out.lines().map(|l| l.rfind(" (").unwrap()).collect();
    assert!(sources.windows(2).all(|w| w[0] == w[1]), "{out}");
}

#[test]
fn help_names_both_ways_to_resolve_a_conflict() {
    let out = ok(Path::new("unused.db"), &["conflicts", "resolve", "--help"]);
    assert!(out.contains("--keep <VERSION>|--value <VALUE>"), "{out}");
}

#[test]
fn a_network_daemon_whose_last_token_is_revoked_lets_nobody_in() {
    let a = Node::new("a");
    let token = a.q(&["token", "create", "--label", "only"]);
    let token = token.trim();
    let mut child = Command::new(bin())
        .arg("--db")
        .arg(&a.db)
        .args(["serve", "--listen", "0.0.0.0:0", "--http", "off"])
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let mut out = BufReader::new(child.stdout.take().unwrap());
    let mut line = String::new();
    out.read_line(&mut line).unwrap();
    let port = line
        .split_whitespace()
        .nth(2)
        .unwrap()
        .rsplit(':')
        .next()
        .unwrap()
        .to_string();
    let addr = format!("127.0.0.1:{port}");
    let b = Node::new("b");
    b.q(&["sync", &addr, "--insecure", "--token", token]);
    a.q(&["token", "revoke", "1"]);
    let e = err(&b.db, &["sync", &addr, "--insecure"]);
    assert!(e.contains("takes only clients with a token"), "{e}");
    child.kill().unwrap();
    child.wait().unwrap();
}

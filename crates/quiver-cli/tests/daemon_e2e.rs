//! The daemon under pressure: its connection limit, stale sessions, SIGTERM
//! in the middle of a sync, configuration, health, metrics, rate limits and
//! JSON logs.

mod common;

use std::io::{BufRead, BufReader, Write};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::{bin, err, http_get, wait_connections, Node};

#[test]
fn the_connection_limit_refuses_with_a_retry_hint() {
    connection_limit("quic");
}

/// The same limit counts connections over TLS on TCP.
#[test]
fn the_connection_limit_holds_over_tcp_too() {
    connection_limit("tcp");
}

fn connection_limit(transport: &str) {
    let a = Node::new("a");
    a.q(&["collection", "create", "docs", "--dim", "2"]);
    let s = a.serve(&["--max-connections", "1"]);
    let b = Node::new("b");
    // A live link holds the only slot.
    let mut holder = b.live_link(&s, &["--transport", transport], Stdio::piped());
    let mut first = String::new();
    BufReader::new(holder.stdout.take().unwrap())
        .read_line(&mut first)
        .unwrap();
    std::thread::sleep(Duration::from_millis(300));
    let c = Node::new("c");
    let e = err(
        &c.db,
        &[
            "sync",
            &s.addr,
            "--transport",
            transport,
            "--pin",
            &s.fp,
            "--retries",
            "0",
        ],
    );
    assert!(
        e.contains("connection limit (1)") && e.contains("retry"),
        "{e}"
    );
    // With a retry the client waits the hinted second before trying again.
    let t = Instant::now();
    let _ = err(
        &c.db,
        &[
            "sync",
            &s.addr,
            "--transport",
            transport,
            "--pin",
            &s.fp,
            "--retries",
            "1",
        ],
    );
    assert!(
        t.elapsed() >= Duration::from_millis(900),
        "the retry hint was honoured"
    );
    // A link stopped gracefully frees its slot at once (a killed one would
    // hold it until the idle timeout cleans it up).
    let pid = holder.id().to_string();
    assert!(Command::new("kill")
        .args(["-TERM", &pid])
        .status()
        .unwrap()
        .success());
    holder.wait().unwrap();
    c.q(&[
        "sync",
        &s.addr,
        "--transport",
        transport,
        "--pin",
        &s.fp,
        "--retries",
        "3",
    ]);
}

#[test]
fn a_vanished_client_is_cleaned_up_after_the_idle_timeout() {
    let a = Node::new("a");
    a.q(&["collection", "create", "docs", "--dim", "2"]);
    let s = a.serve_with_config("idle_timeout_secs = 2\nkeep_alive_secs = 1\n");
    let http = s.http.clone().unwrap();
    let b = Node::new("b");
    let mut link = b.live_link(&s, &[], Stdio::null());
    wait_connections(&http, "the live link is listed", |c| {
        c.as_array().is_some_and(|l| l.len() == 1) && c[0]["live"] == true
    });
    // SIGKILL: no goodbye reaches the server, only silence.
    link.kill().unwrap();
    link.wait().unwrap();
    let killed = Instant::now();
    wait_connections(&http, "the silent connection is dropped", |c| {
        c.as_array().is_some_and(|l| l.is_empty())
    });
    assert!(
        killed.elapsed() >= Duration::from_millis(1500),
        "dropped by the idle timeout, not by a close"
    );
}

#[test]
fn sigterm_mid_sync_lets_the_exchange_in_flight_finish_then_exits_cleanly() {
    sigterm_mid_sync("quic");
}

/// SIGTERM with an exchange in flight over TLS on TCP: it finishes too.
#[test]
fn sigterm_mid_sync_over_tcp_lets_the_exchange_finish_too() {
    sigterm_mid_sync("tcp");
}

fn sigterm_mid_sync(transport: &str) {
    let a = Node::new("a");
    a.q(&["collection", "create", "docs", "--dim", "4"]);
    let b = Node::new("b");
    b.q(&["collection", "create", "docs", "--dim", "4"]);
    let jsonl = b.dir.path().join("d.jsonl");
    let mut f = std::io::BufWriter::new(std::fs::File::create(&jsonl).unwrap());
    let rows = 40_000;
    for i in 0..rows {
        writeln!(f, r#"{{"id":"r{i:05}","vector":[{i},1,2,3]}}"#).unwrap();
    }
    f.flush().unwrap();
    drop(f);
    b.q(&["import", "docs", jsonl.to_str().unwrap()]);
    // A grace long enough for a debug build on a busy machine: what is
    // tested is that the exchange finishes, not how fast.
    let s = a.serve_with_config("shutdown_grace_secs = 120\n");
    let push = Command::new(bin())
        .arg("--db")
        .arg(&b.db)
        .args(["sync", &s.addr, "--pin", &s.fp, "--retries", "0", "--json"])
        .args(["--transport", transport])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    // Let some batches land, then ask the server to stop.
    let count = || -> usize {
        a.q(&["sql", "SELECT count(*) AS n FROM docs"])
            .lines()
            .nth(1)
            .unwrap_or("0")
            .trim()
            .parse()
            .unwrap_or(0)
    };
    let t = Instant::now();
    let mut landed = count();
    while landed == 0 {
        assert!(t.elapsed() < Duration::from_secs(30));
        std::thread::sleep(Duration::from_millis(20));
        landed = count();
    }
    let mut server = s;
    let pid = server.child.id().to_string();
    assert!(Command::new("kill")
        .args(["-TERM", &pid])
        .status()
        .unwrap()
        .success());
    let t = Instant::now();
    let code = loop {
        if let Some(st) = server.child.try_wait().unwrap() {
            break st.code();
        }
        assert!(
            t.elapsed() < Duration::from_secs(130),
            "the server did not stop in time"
        );
        std::thread::sleep(Duration::from_millis(20));
    };
    assert_eq!(code, Some(0), "SIGTERM is a clean exit");
    assert!(
        landed < rows,
        "the exchange was over before the signal ({landed} rows had landed): nothing was in flight"
    );
    // The exchange in flight finished before the server exited: the client
    // got the server's report, and every row is in the server's store.
    let out = push.wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "the client's sync was cut: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let r: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(
        r["shards"][0]["remote"]["applied"], r["changes_sent"],
        "the server reported applying all it was sent: {r}"
    );
    assert_eq!(count(), rows);
    // The client's cursor is consistent with it: a restarted server gets
    // nothing more.
    let s2 = a.serve(&[]);
    let again: serde_json::Value = serde_json::from_str(&b.q(&[
        "sync",
        &s2.addr,
        "--transport",
        transport,
        "--pin",
        &s2.fp,
        "--json",
    ]))
    .unwrap();
    assert_eq!(again["changes_sent"], 0, "{again}");
    assert_eq!(a.export("docs"), b.export("docs"));
}

#[test]
fn logs_can_be_json() {
    let a = Node::new("a");
    let mut child = Command::new(bin())
        .arg("--db")
        .arg(&a.db)
        .args(["serve", "--listen", "127.0.0.1:0", "--log-format", "json"])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut out = BufReader::new(child.stdout.take().unwrap()).lines();
    let addr = out
        .next()
        .unwrap()
        .unwrap()
        .split_whitespace()
        .nth(2)
        .unwrap()
        .to_string();
    let fp = out
        .next()
        .unwrap()
        .unwrap()
        .split_whitespace()
        .nth(2)
        .unwrap()
        .to_string();
    let b = Node::new("b");
    b.q(&["ping", &addr, "--pin", &fp]);
    child.kill().unwrap();
    child.wait().unwrap();
    let mut stderr = String::new();
    std::io::Read::read_to_string(&mut child.stderr.take().unwrap(), &mut stderr).unwrap();
    let first = stderr.lines().next().expect("a log line");
    let v: serde_json::Value =
        serde_json::from_str(first).unwrap_or_else(|e| panic!("{first}: {e}"));
    assert!(v["level"].is_string() && v["fields"].is_object(), "{first}");
}

#[test]
fn configuration_is_layered_and_bad_keys_are_refused_at_start() {
    let a = Node::new("a");
    let cfg = a.dir.path().join("quiver.toml");
    std::fs::write(
        &cfg,
        "max_connections = 5\nmax_streams = 9\nlisten = \"127.0.0.1:0\"\n",
    )
    .unwrap();
    let show = |envs: &[(&str, &str)]| -> serde_json::Value {
        let out = Command::new(bin())
            .args([
                "--json",
                "config",
                "show",
                "--config",
                cfg.to_str().unwrap(),
            ])
            .envs(envs.iter().copied())
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        serde_json::from_slice(&out.stdout).unwrap()
    };
    let v = show(&[]);
    assert_eq!(v["max_connections"], serde_json::json!(["5", "file"]));
    assert_eq!(v["idle_timeout_secs"], serde_json::json!(["30", "default"]));
    let v = show(&[("QUIC_MAX_CONNECTIONS", "7"), ("QUIVER_TOKEN", "secret")]);
    assert_eq!(v["max_connections"], serde_json::json!(["7", "env"]));
    assert_eq!(
        v["token"],
        serde_json::json!(["(set)", "env"]),
        "secrets are not printed"
    );

    // The daemon starts from the file; a flag beats it.
    let s = a.serve(&["--config", cfg.to_str().unwrap(), "--max-streams", "12"]);
    assert!(s.addr.starts_with("127.0.0.1:"));
    drop(s);

    for (bad, says) in [
        ("colour = \"blue\"\n", "unknown key `colour`"),
        ("max_connections = \"many\"\n", "`max_connections`"),
        ("max_connections = 0\n", "out of range"),
        (
            "keep_alive_secs = 99\nidle_timeout_secs = 10\n",
            "`keep_alive_secs`",
        ),
        ("max_streams = [1]\n", "wrong type"),
    ] {
        std::fs::write(&cfg, bad).unwrap();
        let out = Command::new(bin())
            .arg("--db")
            .arg(&a.db)
            .args(["serve", "--config", cfg.to_str().unwrap()])
            .output()
            .unwrap();
        let e = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(1), "{bad}: {e}");
        assert!(e.contains(says), "{bad:?} should say {says:?}: {e}");
    }
}

#[test]
fn health_and_prometheus_metrics() {
    let a = Node::new("a");
    a.q(&["collection", "create", "docs", "--dim", "2"]);
    a.q(&["put", "docs", "x", "--vector", "[1,2]"]);
    let s = a.serve(&["--token", "t"]);
    let http = s.http.clone().expect("the HTTP endpoint is on by default");
    assert!(
        http.starts_with("127.0.0.1:"),
        "loopback by default: {http}"
    );
    let (code, body) = http_get(&http, "/health");
    assert_eq!(code, 200, "{body}");
    assert!(body.contains("\"status\":\"ready\""), "{body}");
    let b = Node::new("b");
    b.q(&["sync", &s.addr, "--pin", &s.fp, "--token", "t"]);
    let _ = err(
        &b.db,
        &[
            "sync",
            &s.addr,
            "--pin",
            &s.fp,
            "--token",
            "wrong",
            "--retries",
            "0",
        ],
    );
    let (code, m) = http_get(&http, "/metrics");
    assert_eq!(code, 200);
    for name in [
        "quiver_connections_total",
        "quiver_syncs_total",
        "quiver_changes_sent_total",
        "quiver_bytes_sent_total",
        "quiver_refusals_total",
        "quiver_sync_duration_seconds_bucket",
    ] {
        assert!(m.contains(name), "{name} missing from:\n{m}");
    }
    assert!(m.contains("code=\"Unauthorized\""), "{m}");
    assert_eq!(http_get(&http, "/nope").0, 404);
}

#[test]
fn rate_limits_refuse_with_a_retry_hint() {
    rate_limits("quic");
}

/// Per-client rate limits apply over TLS on TCP as well.
#[test]
fn rate_limits_hold_over_tcp_too() {
    rate_limits("tcp");
}

fn rate_limits(transport: &str) {
    let a = Node::new("a");
    a.q(&["collection", "create", "docs", "--dim", "2"]);
    let s = a.serve_with_config("rate_requests_per_min = 2\n");
    let b = Node::new("b");
    b.q(&["collection", "create", "docs", "--dim", "2"]);
    b.q(&["sync", &s.addr, "--transport", transport, "--pin", &s.fp]);
    b.q(&["sync", &s.addr, "--transport", transport, "--pin", &s.fp]);
    let e = err(
        &b.db,
        &[
            "sync",
            &s.addr,
            "--transport",
            transport,
            "--pin",
            &s.fp,
            "--retries",
            "0",
        ],
    );
    assert!(
        e.contains("RateLimited") && e.contains("requests per minute") && e.contains("retry in"),
        "{e}"
    );

    // Bytes per minute: a push bigger than the allowance is refused, nothing applied.
    let a2 = Node::new("a2");
    a2.q(&["collection", "create", "docs", "--dim", "64"]);
    let s2 = a2.serve_with_config("rate_bytes_per_min = 4096\n");
    let c = Node::new("c");
    c.q(&["collection", "create", "docs", "--dim", "64"]);
    // Values that do not compress: the limit counts bytes on the wire.
    let mut x: u64 = 0x9e37_79b9_7f4a_7c15;
    for i in 0..20 {
        let v: Vec<String> = (0..64)
            .map(|_| {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                format!("{}", (x % 1_000_000) as f64 / 7.0)
            })
            .collect();
        c.q(&[
            "put",
            "docs",
            &format!("r{i}"),
            "--vector",
            &format!("[{}]", v.join(",")),
        ]);
    }
    let e = err(
        &c.db,
        &[
            "sync",
            &s2.addr,
            "--transport",
            transport,
            "--pin",
            &s2.fp,
            "--retries",
            "0",
        ],
    );
    assert!(e.contains("bytes per minute"), "{e}");
    assert_eq!(a2.export("docs"), "");
}

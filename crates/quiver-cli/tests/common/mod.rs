#![allow(dead_code)]
//! Real `quiver` processes on loopback.

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};

pub fn bin() -> &'static str {
    env!("CARGO_BIN_EXE_quiver")
}

pub fn run(db: &Path, args: &[&str]) -> Output {
    Command::new(bin())
        .arg("--db")
        .arg(db)
        .args(args)
        .output()
        .expect("run quiver")
}

pub fn ok(db: &Path, args: &[&str]) -> String {
    let out = run(db, args);
    assert!(
        out.status.success(),
        "quiver {args:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap()
}

pub fn err(db: &Path, args: &[&str]) -> String {
    let out = run(db, args);
    assert!(!out.status.success(), "quiver {args:?} should fail");
    let e = String::from_utf8_lossy(&out.stderr).into_owned();
    assert!(!e.contains("panicked"), "{e}");
    e
}

/// A plain HTTP GET; returns the status code and the body.
pub fn http_get(addr: &str, path: &str) -> (u16, String) {
    use std::io::{Read, Write};
    let mut s = std::net::TcpStream::connect(addr).unwrap();
    write!(
        s,
        "GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n"
    )
    .unwrap();
    let mut resp = String::new();
    s.read_to_string(&mut resp).unwrap();
    let code = resp.split_whitespace().nth(1).unwrap().parse().unwrap();
    let body = resp.split("\r\n\r\n").nth(1).unwrap_or("").to_string();
    (code, body)
}

/// A running daemon's live connections, from its HTTP endpoint.
pub fn connections(http: &str) -> serde_json::Value {
    let out = ok(
        Path::new("unused.db"),
        &["--json", "status", "--server", http],
    );
    serde_json::from_str(&out).unwrap()
}

/// Polls a daemon's connection list until `want` holds of it.
pub fn wait_connections(
    http: &str,
    what: &str,
    want: impl Fn(&serde_json::Value) -> bool,
) -> serde_json::Value {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
    loop {
        let v = connections(http);
        if want(&v["connections"]) {
            return v;
        }
        assert!(std::time::Instant::now() < deadline, "{what}: {v}");
        std::thread::sleep(std::time::Duration::from_millis(100));
    }
}

/// A store in a folder of its own.
pub struct Node {
    pub dir: tempfile::TempDir,
    pub db: PathBuf,
}

impl Node {
    pub fn new(name: &str) -> Node {
        let dir = tempfile::tempdir().unwrap();
        let db = dir.path().join(format!("{name}.db"));
        ok(&db, &["init", "--name", name]);
        Node { dir, db }
    }

    pub fn q(&self, args: &[&str]) -> String {
        ok(&self.db, args)
    }

    pub fn export(&self, table: &str) -> String {
        self.q(&["export", table])
    }

    /// `quiver sync --watch` to `s`: a live link, until killed.
    pub fn live_link(&self, s: &Served, extra: &[&str], stdout: Stdio) -> Child {
        Command::new(bin())
            .arg("--db")
            .arg(&self.db)
            .args(["sync", &s.addr, "--pin", &s.fp, "--watch"])
            .args(extra)
            .stdout(stdout)
            .stderr(Stdio::null())
            .spawn()
            .unwrap()
    }

    /// Serves with a config file holding `toml`, written into the node's folder.
    pub fn serve_with_config(&self, toml: &str) -> Served {
        let cfg = self.dir.path().join("quiver.toml");
        std::fs::write(&cfg, toml).unwrap();
        self.serve(&["--config", cfg.to_str().unwrap()])
    }

    pub fn serve(&self, extra: &[&str]) -> Served {
        let mut child = Command::new(bin())
            .arg("--db")
            .arg(&self.db)
            .args(["serve", "--listen", "127.0.0.1:0"])
            .args(extra)
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        // The reader is kept for the server's life: a closed pipe would make
        // its later output fail.
        let mut out = BufReader::new(child.stdout.take().unwrap());
        let mut line = String::new();
        let mut read = |out: &mut BufReader<std::process::ChildStdout>| {
            line.clear();
            out.read_line(&mut line).unwrap();
            line.trim().to_string()
        };
        let first = read(&mut out);
        let addr = first.split_whitespace().nth(2).unwrap().to_string();
        let second = read(&mut out);
        let fp = second.split_whitespace().nth(2).unwrap().to_string();
        let third = read(&mut out);
        let http = third
            .strip_prefix("health and metrics on http://")
            .and_then(|r| r.split('/').next())
            .map(str::to_string);
        Served {
            child,
            addr,
            fp,
            http,
            _out: out,
        }
    }
}

/// A running `quiver serve`, killed when dropped.
pub struct Served {
    pub child: Child,
    pub addr: String,
    pub fp: String,
    /// Where /health and /metrics are served, if they are.
    pub http: Option<String>,
    _out: BufReader<std::process::ChildStdout>,
}

impl Drop for Served {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A loopback address where nothing listens, over TCP or UDP: a port the
/// kernel handed out and that was closed again, instead of guessing one.
pub fn closed_addr() -> String {
    let tcp = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = tcp.local_addr().unwrap();
    // The same port number is free for UDP too, or the bind says so.
    let _udp = std::net::UdpSocket::bind(addr).unwrap();
    addr.to_string()
}

//! Live sync between real processes: `quiver sync --watch` and
//! `quiver serve --peer`, writes from other processes (a Python script using
//! the standard sqlite3 module), a link killed and restored, and five nodes
//! in a line and in a ring.

mod common;

use std::io::BufRead;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use common::{bin, Node, Served};

fn wait_until(what: &str, mut f: impl FnMut() -> bool) {
    let t = Instant::now();
    while !f() {
        assert!(
            t.elapsed() < Duration::from_secs(20),
            "timed out waiting for {what}"
        );
        std::thread::sleep(Duration::from_millis(25));
    }
}

fn has(n: &Node, table: &str, id: &str) -> bool {
    n.export(table).contains(&format!("\"id\":\"{id}\""))
}

/// A child process killed when dropped, even if the test panics.
struct Reaped(Child);

impl Reaped {
    fn kill(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

impl Drop for Reaped {
    fn drop(&mut self) {
        self.kill();
    }
}

fn watch(n: &Node, s: &Served) -> Reaped {
    Reaped(n.live_link(s, &[], Stdio::null()))
}

fn python_insert(db: &std::path::Path, id: &str) {
    let script = format!(
        "import sqlite3\nc = sqlite3.connect({:?}, timeout=10)\nc.execute(\"INSERT INTO notes(id, body) VALUES (?, ?)\", ({id:?}, \"written by python\"))\nc.commit()\n",
        db.to_str().unwrap()
    );
    let st = Command::new("python3")
        .arg("-c")
        .arg(script)
        .status()
        .expect("python3");
    assert!(st.success());
}

#[test]
fn live_link_both_ways_with_foreign_writers_and_a_killed_link() {
    let a = Node::new("a");
    let b = Node::new("b");
    for n in [&a, &b] {
        n.q(&["collection", "create", "docs", "--dim", "2"]);
        n.q(&["sql", "CREATE TABLE notes(id TEXT PRIMARY KEY, body TEXT)"]);
        n.q(&["table", "add", "notes"]);
    }
    let s = a.serve(&[]);
    let mut link = watch(&b, &s);
    a.q(&["put", "docs", "a1", "--vector", "[1,1]"]);
    wait_until("a1 on b", || has(&b, "docs", "a1"));
    b.q(&["put", "docs", "b1", "--vector", "[2,2]"]);
    wait_until("b1 on a", || has(&a, "docs", "b1"));
    // An application in another language writes the served store's file.
    python_insert(&a.db, "py1");
    wait_until("python's row on b", || has(&b, "notes", "py1"));

    // Cut the link hard, write on both sides, restore it.
    link.kill();
    a.q(&["put", "docs", "a2", "--vector", "[3,3]"]);
    b.q(&["put", "docs", "b2", "--vector", "[4,4]"]);
    let mut link = watch(&b, &s);
    wait_until("convergence after the link came back", || {
        a.export("docs") == b.export("docs") && a.export("docs").lines().count() == 4
    });
    assert_eq!(a.export("notes"), b.export("notes"));
    link.kill();
}

/// Starts five daemons; node i keeps live links to the nodes `links(i)` names.
fn topology(links: impl Fn(usize, &[Served]) -> Vec<String>) -> (Vec<Node>, Vec<Served>) {
    let nodes: Vec<Node> = (0..5).map(|i| Node::new(&format!("n{i}"))).collect();
    for n in &nodes {
        n.q(&["collection", "create", "docs", "--dim", "2"]);
    }
    let mut served: Vec<Served> = Vec::new();
    for (i, n) in nodes.iter().enumerate() {
        let peers = links(i, &served);
        let mut args: Vec<String> = Vec::new();
        for p in peers {
            args.push("--peer".into());
            args.push(p);
        }
        let refs: Vec<&str> = args.iter().map(String::as_str).collect();
        served.push(n.serve(&refs));
    }
    (nodes, served)
}

fn peer(s: &Served) -> String {
    format!("{}@{}", s.addr, s.fp)
}

#[test]
fn five_nodes_in_a_line_and_in_a_ring_converge() {
    // Line: n1 links to n0, n2 to n1, ...: a write at either end crosses four hops.
    let (nodes, _served) = topology(|i, s| {
        if i == 0 {
            vec![]
        } else {
            vec![peer(&s[i - 1])]
        }
    });
    nodes[0].q(&["put", "docs", "from-0", "--vector", "[0,0]"]);
    nodes[4].q(&["put", "docs", "from-4", "--vector", "[4,4]"]);
    nodes[2].q(&["put", "docs", "both", "--vector", "[2,2]"]);
    nodes[3].q(&["put", "docs", "both", "--vector", "[3,3]"]);
    wait_until("the line to converge", || {
        let first = nodes[0].export("docs");
        first.lines().count() == 3 && nodes.iter().all(|n| n.export("docs") == first)
    });

    // Ring: the last node also links to the first (it starts last, so it
    // links to n0 and n3).
    let (nodes, _served) = topology(|i, s| match i {
        0 => vec![],
        4 => vec![peer(&s[3]), peer(&s[0])],
        _ => vec![peer(&s[i - 1])],
    });
    for (i, n) in nodes.iter().enumerate() {
        n.q(&["put", "docs", &format!("r{i}"), "--vector", "[1,1]"]);
    }
    wait_until("the ring to converge", || {
        let first = nodes[0].export("docs");
        first.lines().count() == 5 && nodes.iter().all(|n| n.export("docs") == first)
    });
}

#[test]
fn registered_peers_get_live_links_and_watch_prints_events() {
    let a = Node::new("a");
    let b = Node::new("b");
    for n in [&a, &b] {
        n.q(&["collection", "create", "docs", "--dim", "2"]);
    }
    let sa = a.serve(&[]);
    b.q(&[
        "peers", "add", "a", &sa.addr, "--pin", &sa.fp, "--shard", "default", "--token", "s3cret",
    ]);
    let list: serde_json::Value = serde_json::from_str(&b.q(&["--json", "peers", "list"])).unwrap();
    assert_eq!(list[0]["node"], "a");
    assert_eq!(list[0]["token"], true, "the token itself is never printed");
    assert!(common::err(&b.db, &["peers", "add", "x", "no-port"]).contains("HOST:PORT"));

    let mut watcher = Command::new(bin())
        .arg("--db")
        .arg(&b.db)
        .arg("watch")
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    // a has no token configured, so the peer's token is simply not needed.
    let _sb = b.serve(&[]);
    a.q(&["put", "docs", "x", "--vector", "[1,2]"]);
    wait_until("x on b through the registry peer's live link", || {
        has(&b, "docs", "x")
    });
    wait_until("the peer shown online", || {
        let st: serde_json::Value = serde_json::from_str(&b.q(&["--json", "status"])).unwrap();
        st["peers"][0]["status"] == "online"
    });
    // The daemon's coordinator keeps its statistics where `status` shows them.
    wait_until("the coordinator's statistics in status", || {
        let st: serde_json::Value = serde_json::from_str(&b.q(&["--json", "status"])).unwrap();
        st["coordinator"]["total_syncs"].as_u64().unwrap_or(0) >= 1
    });
    assert!(b.q(&["status"]).contains("(the daemon's coordinator)"));
    // The watcher prints nothing until an event, so it may still have been
    // opening the store when x arrived; writes after that are seen.
    let stdout = watcher.stdout.take().unwrap();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in std::io::BufReader::new(stdout)
            .lines()
            .map_while(Result::ok)
        {
            if tx.send(line).is_err() {
                break;
            }
        }
    });
    let mut lines = String::new();
    let seen =
        |l: &str| l.contains("\"event\":\"external_change\"") && l.contains("\"remote\":true");
    for i in 0..40 {
        while let Ok(l) = rx.recv_timeout(Duration::from_millis(250)) {
            lines.push_str(&l);
            lines.push('\n');
        }
        if seen(&lines) {
            break;
        }
        a.q(&["put", "docs", &format!("y{i}"), "--vector", "[1,2]"]);
    }
    watcher.kill().unwrap();
    watcher.wait().unwrap();
    assert!(seen(&lines), "{lines}");
    b.q(&["peers", "remove", "a"]);
    assert!(
        b.q(&["peers", "list"]).lines().count() == 1,
        "only the header is left"
    );
    assert!(common::err(&b.db, &["peers", "remove", "a"]).contains("no peer"));
}

/// Lines of a child's output or a socket, as they come.
fn lines_of(r: impl std::io::Read + Send + 'static) -> std::sync::mpsc::Receiver<String> {
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in std::io::BufReader::new(r).lines().map_while(Result::ok) {
            if tx.send(line).is_err() {
                break;
            }
        }
    });
    rx
}

/// Writes rows with another SQLite driver (rusqlite, as an application
/// would) until `rx` shows a line naming one of them and the table.
fn insert_until_reported(
    db: &std::path::Path,
    prefix: &str,
    rx: &std::sync::mpsc::Receiver<String>,
) -> String {
    let conn = rusqlite::Connection::open(db).unwrap();
    conn.busy_timeout(Duration::from_secs(5)).unwrap();
    let mut seen = String::new();
    for i in 0..40 {
        conn.execute(
            "INSERT INTO notes(id, body) VALUES (?1, 'hi')",
            [format!("{prefix}{i}")],
        )
        .unwrap();
        while let Ok(l) = rx.recv_timeout(Duration::from_millis(250)) {
            if l.contains(prefix) && l.contains("\"table\":\"notes\"") {
                return l;
            }
            seen.push_str(&l);
            seen.push('\n');
        }
    }
    panic!("no event named a {prefix}… row of notes: {seen}");
}

#[test]
fn watch_and_the_daemons_event_stream_name_what_another_driver_wrote() {
    let a = Node::new("a");
    a.q(&["sql", "CREATE TABLE notes(id TEXT PRIMARY KEY, body TEXT)"]);
    a.q(&["table", "add", "notes"]);
    let mut watcher = Command::new(bin())
        .arg("--db")
        .arg(&a.db)
        .arg("watch")
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let rx = lines_of(watcher.stdout.take().unwrap());
    let line = insert_until_reported(&a.db, "drv-", &rx);
    let e: serde_json::Value = serde_json::from_str(&line).unwrap();
    assert_eq!(e["event"], "external_change", "{line}");
    assert_eq!(e["local"], true, "{line}");
    assert_eq!(e["changes"][0]["shard"], "default", "{line}");
    // Rows written before the watcher was up are sealed together with the
    // first one it sees: each is counted and named.
    let keys = e["changes"][0]["keys"].as_array().unwrap();
    assert_eq!(
        e["changes"][0]["rows"].as_u64(),
        Some(keys.len() as u64),
        "{line}"
    );
    assert!(
        keys.iter().all(|k| k.as_str().unwrap().starts_with("drv-")),
        "{line}"
    );
    assert!(e["site"].as_str().is_some_and(|s| s.len() == 32), "{line}");
    watcher.kill().unwrap();
    watcher.wait().unwrap();

    // The daemon streams the same events on /events.
    let s = a.serve(&[]);
    let http = s.http.clone().unwrap();
    let mut sock = std::net::TcpStream::connect(&http).unwrap();
    use std::io::Write;
    write!(sock, "GET /events HTTP/1.1\r\nHost: {http}\r\n\r\n").unwrap();
    let rx = lines_of(sock.try_clone().unwrap());
    let line = insert_until_reported(&a.db, "sse-", &rx);
    let data: serde_json::Value =
        serde_json::from_str(line.strip_prefix("data: ").expect("a data: line")).unwrap();
    assert_eq!(data["event"], "external_change");
    assert!(data["changes"][0]["keys"][0]
        .as_str()
        .unwrap()
        .starts_with("sse-"));

    // A daemon with a peer streams its coordinator's sync events too.
    let b = Node::new("b");
    let peer = format!("{}@{}", s.addr, s.fp);
    let sb = b.serve(&["--peer", &peer]);
    let http = sb.http.clone().unwrap();
    let mut sock = std::net::TcpStream::connect(&http).unwrap();
    write!(sock, "GET /events HTTP/1.1\r\nHost: {http}\r\n\r\n").unwrap();
    let rx = lines_of(sock.try_clone().unwrap());
    let mut seen = String::new();
    for i in 0..40 {
        rusqlite::Connection::open(&a.db)
            .unwrap()
            .execute(
                "INSERT INTO notes(id, body) VALUES (?1, 'x')",
                [format!("peer-{i}")],
            )
            .unwrap();
        while let Ok(l) = rx.recv_timeout(Duration::from_millis(250)) {
            seen.push_str(&l);
            seen.push('\n');
        }
        if seen.contains("\"event\":\"sync_completed\"") {
            break;
        }
    }
    assert!(seen.contains("\"event\":\"sync_completed\""), "{seen}");
}

//! Sync over real QUIC between real `quiver` processes on loopback.

mod common;

use common::{err, Node};

fn sync_json(n: &Node, addr: &str, extra: &[&str]) -> serde_json::Value {
    let mut args = vec!["--json", "sync", addr];
    args.extend_from_slice(extra);
    serde_json::from_str(&n.q(&args)).unwrap()
}

#[test]
fn two_way_sync_with_concurrent_conflicting_writes() {
    conflicting_writes("quic");
}

/// The same over TLS on TCP (HTTP/2), as a client whose UDP is blocked syncs.
#[test]
fn two_way_sync_with_concurrent_conflicting_writes_over_tcp() {
    conflicting_writes("tcp");
}

fn conflicting_writes(t: &str) {
    let a = Node::new("a");
    let b = Node::new("b");
    for n in [&a, &b] {
        n.q(&["collection", "create", "docs", "--dim", "3"]);
    }
    a.q(&["put", "docs", "only-a", "--vector", "[1,1,1]"]);
    a.q(&[
        "put",
        "docs",
        "both",
        "--vector",
        "[1,2,3]",
        "--meta",
        r#"{"by":"a"}"#,
    ]);
    b.q(&["put", "docs", "only-b", "--vector", "[2,2,2]"]);
    b.q(&[
        "put",
        "docs",
        "both",
        "--vector",
        "[3,2,1]",
        "--meta",
        r#"{"by":"b"}"#,
    ]);
    let s = a.serve(&["--token", "t0k"]);
    let r = sync_json(
        &b,
        &s.addr,
        &["--token", "t0k", "--pin", &s.fp, "--transport", t],
    );
    let both_ends =
        r["conflicts_detected"].as_u64().unwrap() + r["peer_conflicts_detected"].as_u64().unwrap();
    assert!(both_ends >= 2, "{r}");
    assert_eq!(r["transport"], t, "{r}");
    // The summary counts what this replica recorded, as `conflicts list`
    // shows it here; the server's own count is beside it.
    let here: Vec<serde_json::Value> =
        serde_json::from_str(&b.q(&["--json", "conflicts", "list", "--all"])).unwrap();
    assert_eq!(
        r["conflicts_detected"].as_u64(),
        Some(here.len() as u64),
        "{r}"
    );
    let there: Vec<serde_json::Value> =
        serde_json::from_str(&a.q(&["--json", "conflicts", "list", "--all"])).unwrap();
    assert_eq!(
        r["peer_conflicts_detected"].as_u64(),
        Some(there.len() as u64),
        "{r}"
    );
    assert_eq!(a.export("docs"), b.export("docs"));
    assert_eq!(a.export("docs").lines().count(), 3);
    // Nothing moves on a second sync.
    let again = sync_json(
        &b,
        &s.addr,
        &["--token", "t0k", "--pin", &s.fp, "--transport", t],
    );
    assert_eq!(again["changes_received"], 0, "{again}");
    assert_eq!(again["changes_sent"], 0, "{again}");
    let st: serde_json::Value = serde_json::from_str(&b.q(&["--json", "status"])).unwrap();
    assert_eq!(st["sync"]["sync_count"], 2);
}

#[test]
fn fresh_replica_bootstraps_from_nothing_and_relays() {
    let a = Node::new("a");
    a.q(&[
        "collection",
        "create",
        "docs",
        "--dim",
        "2",
        "--strategy",
        "merge",
        "--metric",
        "l2",
    ]);
    a.q(&["memory", "init"]);
    a.q(&["put", "docs", "x", "--vector", "[1,2]"]);
    a.q(&[
        "sql",
        "INSERT INTO episodes(id, task, created) VALUES ('e1', 'plan', 1)",
    ]);
    let sa = a.serve(&[]);
    let b = Node::new("b");
    let r = sync_json(&b, &sa.addr, &["--pin", &sa.fp, "--shard", "default"]);
    assert_eq!(
        r["shards"][0]["tables_created"],
        serde_json::json!(["docs"])
    );
    assert_eq!(b.export("docs"), a.export("docs"));
    let t: serde_json::Value =
        serde_json::from_str(&b.q(&["--json", "collection", "list"])).unwrap();
    assert_eq!(t[0]["strategy"], "merge");
    assert_eq!(t[0]["metric"], "l2");
    // Only the shard asked for came over.
    assert!(err(&b.db, &["export", "episodes"]).contains("not a replicated table"));
    // A table-limited sync of the memory shard.
    sync_json(
        &b,
        &sa.addr,
        &["--pin", &sa.fp, "--shard", "memory", "--tables", "episodes"],
    );
    assert_eq!(b.export("episodes"), a.export("episodes"));
    // Relay: C learns A's rows from B.
    let sb = b.serve(&[]);
    let c = Node::new("c");
    sync_json(&c, &sb.addr, &["--pin", &sb.fp]);
    assert_eq!(c.export("docs"), a.export("docs"));
    assert_eq!(c.export("episodes"), a.export("episodes"));
}

#[test]
fn wrong_token_and_untrusted_certificates_are_refused_before_data_moves() {
    refusals("quic");
}

#[test]
fn wrong_token_and_untrusted_certificates_are_refused_over_tcp_too() {
    refusals("tcp");
}

fn refusals(t: &str) {
    let a = Node::new("a");
    a.q(&["collection", "create", "docs", "--dim", "2"]);
    a.q(&["put", "docs", "x", "--vector", "[1,2]"]);
    let s = a.serve(&["--token", "right"]);
    let b = Node::new("b");
    let e = err(
        &b.db,
        &[
            "sync",
            &s.addr,
            "--transport",
            t,
            "--pin",
            &s.fp,
            "--token",
            "wrong",
        ],
    );
    assert!(e.contains("invalid token"), "{e}");
    let e = err(&b.db, &["sync", &s.addr, "--transport", t, "--pin", &s.fp]);
    assert!(e.contains("token is required"), "{e}");
    let e = err(
        &b.db,
        &["sync", &s.addr, "--transport", t, "--token", "right"],
    );
    assert!(
        e.contains("not trusted") && e.contains(&s.fp) && e.contains("--pin"),
        "{e}"
    );
    let e = err(
        &b.db,
        &[
            "sync",
            &s.addr,
            "--transport",
            t,
            "--token",
            "right",
            "--pin",
            &"0".repeat(64),
        ],
    );
    assert!(e.contains("does not match the pinned"), "{e}");
    // Nothing arrived anywhere.
    assert!(err(&b.db, &["export", "docs"]).contains("not a replicated table"));
    // Trust by CA file (the server's own self-signed certificate) works.
    let cert = format!("{}.cert.pem", a.db.display());
    b.q(&[
        "sync",
        &s.addr,
        "--transport",
        t,
        "--token",
        "right",
        "--ca",
        &cert,
    ]);
    assert_eq!(b.export("docs"), a.export("docs"));
    // Insecure, when asked for, works too.
    let c = Node::new("c");
    c.q(&[
        "sync",
        &s.addr,
        "--transport",
        t,
        "--token",
        "right",
        "--insecure",
    ]);
    let ping: serde_json::Value = serde_json::from_str(&c.q(&[
        "--json",
        "ping",
        &s.addr,
        "--token",
        "right",
        "--insecure",
        "--transport",
        t,
    ]))
    .unwrap();
    assert!(ping["rtt_ms"].as_f64().unwrap() > 0.0);
    assert_eq!(ping["transport"], t, "{ping}");
}

/// Each side records what the other holds of a shard after a completed
/// sync, and `status` shows it: all of it after a clean exchange, and how
/// much it lacks once this side writes more.
#[test]
fn a_completed_sync_leaves_each_side_the_others_acknowledgement() {
    let a = Node::new("a");
    let b = Node::new("b");
    for n in [&a, &b] {
        n.q(&["collection", "create", "docs", "--dim", "3"]);
    }
    a.q(&["put", "docs", "x", "--vector", "[1,1,1]"]);
    b.q(&["put", "docs", "y", "--vector", "[2,2,2]"]);
    let sa = a.serve(&[]);
    sync_json(&b, &sa.addr, &["--pin", &sa.fp]);
    let acks = |n: &Node| -> Vec<serde_json::Value> {
        let st: serde_json::Value = serde_json::from_str(&n.q(&["--json", "status"])).unwrap();
        let shard = st["shards"]
            .as_array()
            .unwrap()
            .iter()
            .find(|s| s["name"] == "default")
            .unwrap()
            .clone();
        shard["acks"].as_array().unwrap().clone()
    };
    let site = |n: &Node| -> String {
        let st: serde_json::Value = serde_json::from_str(&n.q(&["--json", "status"])).unwrap();
        st["site_id"].as_str().unwrap().to_string()
    };
    for (me, other, name) in [(&a, &b, "b"), (&b, &a, "a")] {
        let got = acks(me);
        assert_eq!(got.len(), 1, "{got:?}");
        assert_eq!(got[0]["node"], name);
        assert_eq!(got[0]["site"], site(other).as_str());
        assert_eq!(got[0]["behind"], 0, "{got:?}");
        // The other holds this side's writes.
        assert!(got[0]["version_vector"][site(me)].as_u64().unwrap() >= 1);
    }
    // A write on a after the sync: b's acknowledgement on a falls behind.
    a.q(&["put", "docs", "z", "--vector", "[3,3,3]"]);
    let got = acks(&a);
    assert!(got[0]["behind"].as_u64().unwrap() >= 1, "{got:?}");
    let text = a.q(&["status"]);
    assert!(text.contains("ack  b ("), "{text}");
    // A sync of some of the shard's tables says nothing of the others: b
    // takes docs only, and still lacks a's note.
    for n in [&a, &b] {
        n.q(&["collection", "create", "notes", "--dim", "3"]);
    }
    sync_json(&b, &sa.addr, &["--pin", &sa.fp]);
    a.q(&["put", "notes", "n1", "--vector", "[4,4,4]"]);
    a.q(&["put", "docs", "w", "--vector", "[5,5,5]"]);
    sync_json(&b, &sa.addr, &["--pin", &sa.fp, "--tables", "docs"]);
    let got = acks(&a);
    assert!(
        got[0]["behind"].as_u64().unwrap() >= 1,
        "the note is not acknowledged: {got:?}"
    );
    sync_json(&b, &sa.addr, &["--pin", &sa.fp]);
    assert_eq!(acks(&a)[0]["behind"], 0, "{:?}", acks(&a));
}

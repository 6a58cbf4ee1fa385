//! `quiver clone`: a new replica from a consistent copy of a server's
//! whole store, over QUIC, with a site of its own.

mod common;

use common::{err, ok, Node};

#[test]
fn a_clone_is_a_replica_of_its_own_that_syncs_both_ways() {
    let a = Node::new("a");
    a.q(&["collection", "create", "docs", "--dim", "3"]);
    a.q(&[
        "collection",
        "create",
        "private",
        "--dim",
        "2",
        "--shard",
        "other",
    ]);
    for i in 0..50 {
        a.q(&["put", "docs", &format!("d{i}"), "--vector", "[1,2,3]"]);
    }
    a.q(&["put", "private", "p1", "--vector", "[1,2]"]);
    let scoped = a.q(&["token", "create", "--shard", "default"]);
    let scoped = scoped.split_whitespace().last().unwrap().to_string();
    let reader = a.q(&["token", "create", "--read-only"]);
    let reader = reader.split_whitespace().last().unwrap().to_string();
    let full = a.q(&["token", "create"]);
    let full = full.split_whitespace().last().unwrap().to_string();
    let s = a.serve(&[]);
    let dir = tempfile::tempdir().unwrap();
    let c = dir.path().join("c.db");
    let e = err(&c, &["clone", &s.addr, "--pin", &s.fp, "--token", &scoped]);
    assert!(e.contains("scoped") && e.contains("quiver sync"), "{e}");
    assert!(!c.exists(), "a refused clone leaves nothing");
    let e = err(&c, &["clone", &s.addr, "--pin", &s.fp, "--token", &reader]);
    assert!(e.contains("read-write"), "{e}");
    assert!(!c.exists());
    let out = ok(
        &c,
        &[
            "--json", "clone", &s.addr, "--pin", &s.fp, "--token", &full, "--name", "c",
        ],
    );
    let r: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert!(r["bytes"].as_u64().unwrap() > 0, "{r}");
    assert_eq!(ok(&c, &["export", "docs"]), a.export("docs"));
    assert_eq!(ok(&c, &["export", "private"]), a.export("private"));
    let sa: serde_json::Value = serde_json::from_str(&a.q(&["--json", "status"])).unwrap();
    let sc: serde_json::Value = serde_json::from_str(&ok(&c, &["--json", "status"])).unwrap();
    assert_ne!(sa["site_id"], sc["site_id"], "a site of its own");
    assert_eq!(sc["node_name"], "c");
    let tokens: Vec<serde_json::Value> =
        serde_json::from_str(&ok(&c, &["--json", "token", "list"])).unwrap();
    assert!(tokens.is_empty(), "the source's tokens stay there");
    // Nothing to exchange right after: the clone kept the source's versions.
    let first: serde_json::Value = serde_json::from_str(&ok(
        &c,
        &["--json", "sync", &s.addr, "--pin", &s.fp, "--token", &full],
    ))
    .unwrap();
    assert_eq!(first["changes_received"], 0, "{first}");
    assert_eq!(first["changes_sent"], 0, "{first}");
    // Its own writes go back; the source's new ones come.
    ok(&c, &["put", "docs", "from-clone", "--vector", "[0,0,1]"]);
    a.q(&["put", "docs", "from-a", "--vector", "[1,0,0]"]);
    ok(&c, &["sync", &s.addr, "--pin", &s.fp, "--token", &full]);
    assert_eq!(ok(&c, &["export", "docs"]), a.export("docs"));
    assert!(a.export("docs").contains("from-clone"));
    // An existing store is not overwritten.
    let e = err(&c, &["clone", &s.addr, "--pin", &s.fp, "--token", &full]);
    assert!(e.contains("already exists"), "{e}");
}

//! Scoped tokens: several tokens, each limited to shards and to read-only
//! or read-write, stored hashed; a shard outside a token's scope is
//! invisible; a read-only client pulls but does not push.

mod common;

use common::{err, Node};

fn token(n: &Node, args: &[&str]) -> String {
    let mut a = vec!["--json", "token", "create"];
    a.extend_from_slice(args);
    let v: serde_json::Value = serde_json::from_str(&n.q(&a)).unwrap();
    v["token"].as_str().unwrap().to_string()
}

#[test]
fn scoped_and_read_only_tokens() {
    let a = Node::new("a");
    a.q(&["collection", "create", "docs", "--dim", "2"]);
    a.q(&["put", "docs", "x", "--vector", "[1,2]"]);
    a.q(&["memory", "init"]);
    a.q(&[
        "sql",
        "INSERT INTO episodes(id, task, created) VALUES ('e1', 'plan', 1)",
    ]);
    let ro = token(
        &a,
        &["--shard", "memory", "--read-only", "--label", "readers"],
    );
    let rw = token(&a, &["--shard", "default"]);
    let listed = a.q(&["--json", "token", "list"]);
    assert!(
        !listed.contains(&ro) && !listed.contains(&rw),
        "tokens are never shown again"
    );
    let s = a.serve(&[]);

    let b = Node::new("b");
    assert!(err(&b.db, &["sync", &s.addr, "--pin", &s.fp]).contains("token is required"));
    assert!(err(
        &b.db,
        &["sync", &s.addr, "--pin", &s.fp, "--token", "qv_guess"]
    )
    .contains("invalid token"));

    // Read-only on memory: pulls memory, sees nothing else, pushes nothing.
    b.q(&["memory", "init"]);
    b.q(&[
        "sql",
        "INSERT INTO episodes(id, task, created) VALUES ('b-local', 'mine', 2)",
    ]);
    let r: serde_json::Value =
        serde_json::from_str(&b.q(&["--json", "sync", &s.addr, "--pin", &s.fp, "--token", &ro]))
            .unwrap();
    assert_eq!(r["read_only"], true, "{r}");
    let shards: Vec<&str> = r["shards"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| s["shard"].as_str().unwrap())
        .collect();
    assert_eq!(shards, ["memory"], "only the token's shard: {r}");
    assert!(b.export("episodes").contains("\"e1\""));
    assert!(
        !a.export("episodes").contains("b-local"),
        "a read-only client's changes never reach the server"
    );
    let e = err(
        &b.db,
        &[
            "sync", &s.addr, "--pin", &s.fp, "--token", &ro, "--shard", "default",
        ],
    );
    assert!(
        e.contains("no shard \"default\""),
        "out of scope looks like absent: {e}"
    );

    // Read-write on default: both directions, and memory stays invisible.
    let c = Node::new("c");
    c.q(&["sync", &s.addr, "--pin", &s.fp, "--token", &rw]);
    assert_eq!(c.export("docs"), a.export("docs"));
    assert!(err(&c.db, &["export", "episodes"]).contains("not a replicated table"));
    c.q(&["put", "docs", "y", "--vector", "[3,4]"]);
    c.q(&["sync", &s.addr, "--pin", &s.fp, "--token", &rw]);
    assert!(a.export("docs").contains("\"y\""));

    // Revoked tokens stop working.
    let list: serde_json::Value = serde_json::from_str(&a.q(&["--json", "token", "list"])).unwrap();
    let ro_id = list
        .as_array()
        .unwrap()
        .iter()
        .find(|t| t["read_only"] == true)
        .unwrap()["id"]
        .to_string();
    a.q(&["token", "revoke", &ro_id]);
    assert!(
        err(&b.db, &["sync", &s.addr, "--pin", &s.fp, "--token", &ro]).contains("invalid token")
    );
}

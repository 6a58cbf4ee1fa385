//! Compaction with real processes: a daemon compacting on its own once its
//! peers acknowledged, a slow peer holding it back, and a peer back from
//! beyond the horizon with a write to a compacted row.

mod common;

use std::time::{Duration, Instant};

use common::{http_get, Node};

fn clock_records(n: &Node) -> i64 {
    let c = rusqlite::Connection::open(&n.db).unwrap();
    c.query_row("SELECT count(*) FROM quiver_clock", [], |r| r.get(0))
        .unwrap()
}

fn json(s: &str) -> serde_json::Value {
    serde_json::from_str(s).unwrap_or_else(|e| panic!("{e}: {s}"))
}

fn fill(n: &Node, rows: usize) {
    n.q(&["collection", "create", "docs", "--dim", "4"]);
    let lines: String = (0..rows)
        .map(|i| {
            format!("{{\"id\":\"d{i:05}\",\"vector\":[{i},1,2,3],\"metadata\":{{\"i\":{i}}}}}\n")
        })
        .collect();
    let file = n.dir.path().join("rows.jsonl");
    std::fs::write(&file, lines).unwrap();
    n.q(&["import", "docs", file.to_str().unwrap()]);
}

#[test]
fn the_daemon_compacts_once_every_peer_acknowledged_and_a_slow_one_holds_it_back() {
    let a = Node::new("a");
    fill(&a, 10_000);
    let s = a.serve_with_config("compact_interval_secs = 1\n");
    let http = s.http.clone().unwrap();
    let sync = |n: &Node| n.q(&["sync", &s.addr, "--pin", &s.fp]);
    let (b, c) = (Node::new("b"), Node::new("c"));
    sync(&b);
    sync(&c);
    // 50 rows stay.
    a.q(&["sql", "DELETE FROM docs WHERE id >= 'd00050'"]);
    // b sees the deletes, c does not yet: c holds compaction back.
    sync(&b);
    sync(&b);
    let dry = json(&a.q(&["--json", "compact", "--dry-run"]));
    let shard = &dry["shards"][0];
    assert_eq!(shard["tombstones"], 0, "{dry}");
    assert_eq!(shard["held_back"], 9_950, "{dry}");
    assert_eq!(shard["held_by"].as_array().unwrap().len(), 1, "{dry}");
    assert_eq!(shard["held_by"][0]["node"], "c", "{dry}");
    assert_eq!(shard["held_by"][0]["records"], 9_950, "{dry}");
    let t = Instant::now();
    loop {
        let (_, m) = http_get(&http, "/metrics");
        if m.contains("quiver_compaction_held_back{shard=\"default\"} 9950") {
            break;
        }
        assert!(t.elapsed() < Duration::from_secs(20), "{m}");
        std::thread::sleep(Duration::from_millis(200));
    }
    assert_eq!(clock_records(&a), 10_000, "nothing purged while c lags");
    // Once c has them too, the daemon purges on its own: what is left is
    // what the live rows need.
    sync(&c);
    sync(&c);
    let t = Instant::now();
    while clock_records(&a) > 50 && t.elapsed() < Duration::from_secs(20) {
        std::thread::sleep(Duration::from_millis(200));
    }
    assert_eq!(clock_records(&a), 50, "the daemon did not compact");
    let t = Instant::now();
    loop {
        let (_, m) = http_get(&http, "/metrics");
        if m.contains("quiver_clock_records{shard=\"default\"} 50") {
            assert!(m.contains("quiver_tombstones{shard=\"default\"} 0"), "{m}");
            break;
        }
        assert!(t.elapsed() < Duration::from_secs(20), "{m}");
        std::thread::sleep(Duration::from_millis(200));
    }
    // The one-shot command does the same on the others.
    for n in [&b, &c] {
        let r = json(&n.q(&["--json", "compact"]));
        assert_eq!(r["purged"], 9_950, "{r}");
        assert_eq!(clock_records(n), 50);
    }
    // A new replica gets exactly what is live, and the compacted files are
    // back near the size of one that only ever held the live rows.
    a.q(&["put", "docs", "new", "--vector", "[1,1,1,1]"]);
    let d = Node::new("d");
    for n in [&d, &b, &c] {
        sync(n);
        assert_eq!(n.export("docs"), a.export("docs"));
    }
    let size = |n: &Node| {
        let db = n.db.to_str().unwrap().to_string();
        [db.clone(), format!("{db}-wal")]
            .iter()
            .filter_map(|p| std::fs::metadata(p).ok())
            .map(|m| m.len())
            .sum::<u64>()
    };
    for n in [&a, &b, &c] {
        n.q(&["compact"]);
        assert!(
            size(n) < 2 * size(&d).max(200_000),
            "{} bytes against {} for the live rows alone",
            size(n),
            size(&d)
        );
    }
}

#[test]
fn a_peer_back_from_beyond_the_horizon_keeps_its_write_for_review_and_nothing_comes_back() {
    let a = Node::new("a");
    fill(&a, 20);
    let s = a.serve_with_config("compact_interval_secs = 0\n");
    let sync = |n: &Node| n.q(&["sync", &s.addr, "--pin", &s.fp]);
    let (b, c) = (Node::new("b"), Node::new("c"));
    sync(&b);
    sync(&c);
    // b edits a row, then goes away.
    b.q(&[
        "sql",
        "UPDATE docs SET metadata = '{\"by\":\"b\"}' WHERE id = 'd00003'",
    ]);
    a.q(&["sql", "DELETE FROM docs WHERE id IN ('d00003', 'd00004')"]);
    std::thread::sleep(Duration::from_millis(1200));
    sync(&c);
    sync(&c);
    // 0.00001 days is 0.86 s: b is past it, c is not.
    let r = json(&a.q(&["--json", "compact", "--peer-horizon-days", "0.00001"]));
    let shard = &r["shards"][0];
    assert_eq!(shard["tombstones"], 2, "{r}");
    assert_eq!(shard["beyond_horizon"].as_array().unwrap().len(), 1, "{r}");
    assert_eq!(shard["beyond_horizon"][0]["node"], "b", "{r}");
    let st = json(&a.q(&["--json", "status"]));
    let acks = st["shards"][0]["acks"].as_array().unwrap().clone();
    assert!(
        acks.iter().all(|x| x["beyond_horizon"] == false),
        "the store's own horizon is still 30 days: {st}"
    );
    // b returns.
    sync(&b);
    assert_eq!(b.export("docs"), a.export("docs"));
    assert!(!a.export("docs").contains("d00003"));
    let open = json(&b.q(&["--json", "conflicts", "list"]));
    let open = open.as_array().unwrap();
    assert_eq!(open.len(), 1, "{open:?}");
    assert_eq!(open[0]["kind"], "resurrection");
    assert_eq!(open[0]["pk"], "d00003");
    // Keeping b's write brings the row back, everywhere.
    let id = open[0]["id"].to_string();
    let write = open[0]["versions"][1]["version"]
        .as_str()
        .unwrap()
        .to_string();
    b.q(&["conflicts", "resolve", &id, "--keep", &write]);
    sync(&b);
    sync(&c);
    assert!(a.export("docs").contains("\"by\":\"b\""));
    assert_eq!(b.export("docs"), a.export("docs"));
    assert_eq!(c.export("docs"), a.export("docs"));
}

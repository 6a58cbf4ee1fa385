//! The real `quiver` binary: every command, and every bad input giving a
//! clear message with exit code 1 (2 for usage), never a panic.

use std::path::Path;
use std::process::{Command, Output};

fn quiver(db: &Path, args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_quiver"))
        .arg("--db")
        .arg(db)
        .args(args)
        .output()
        .expect("run quiver")
}

fn ok(db: &Path, args: &[&str]) -> String {
    let out = quiver(db, args);
    assert!(
        out.status.success(),
        "quiver {args:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap()
}

fn fails(db: &Path, args: &[&str], code: i32, says: &str) {
    let out = quiver(db, args);
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(code), "quiver {args:?}: {err}");
    assert!(
        err.contains(says),
        "quiver {args:?} should say {says:?}, said: {err}"
    );
    assert!(!err.contains("panicked"), "quiver {args:?} panicked: {err}");
}

#[test]
fn store_commands_end_to_end() {
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("q.db");
    fails(&db, &["status"], 1, "quiver init");
    ok(&db, &["init", "--name", "alpha"]);
    fails(&db, &["init"], 1, "already holds");
    ok(
        &db,
        &[
            "collection",
            "create",
            "docs",
            "--dim",
            "3",
            "--metric",
            "l2",
        ],
    );
    fails(
        &db,
        &["collection", "create", "docs", "--dim", "3"],
        1,
        "already exists",
    );
    fails(
        &db,
        &[
            "collection",
            "create",
            "x",
            "--dim",
            "3",
            "--metric",
            "hamming",
        ],
        1,
        "unknown metric",
    );
    fails(
        &db,
        &[
            "collection",
            "create",
            "x",
            "--dim",
            "3",
            "--strategy",
            "newest",
        ],
        1,
        "unknown conflict strategy",
    );
    fails(&db, &["collection", "create", "x"], 2, "--dim");
    ok(
        &db,
        &[
            "put",
            "docs",
            "a",
            "--vector",
            "[1,2,3]",
            "--meta",
            r#"{"k":1}"#,
            "--content",
            "hi",
        ],
    );
    fails(
        &db,
        &["put", "docs", "b", "--vector", "[1,2]"],
        1,
        "expects 3",
    );
    fails(
        &db,
        &["put", "docs", "b", "--vector", "[1,2,x]"],
        1,
        "JSON array of numbers",
    );
    fails(
        &db,
        &["put", "docs", "b", "--vector", "[1,2,3]", "--meta", "[1]"],
        1,
        "JSON object",
    );
    fails(
        &db,
        &["put", "nope", "b", "--vector", "[1,2,3]"],
        1,
        "does not exist",
    );
    let got: serde_json::Value =
        serde_json::from_str(&ok(&db, &["--json", "get", "docs", "a"])).unwrap();
    assert_eq!(got["metadata"]["k"], 1);
    fails(&db, &["get", "docs", "zz"], 1, "no record");

    let jsonl = dir.path().join("in.jsonl");
    std::fs::write(
        &jsonl,
        "{\"id\":\"i1\",\"vector\":[1,1,1]}\n{\"id\":\"i2\",\"vector\":[2,2,2],\"metadata\":{\"x\":true}}\n",
    )
    .unwrap();
    ok(&db, &["import", "docs", jsonl.to_str().unwrap()]);
    let bad = dir.path().join("bad.jsonl");
    std::fs::write(
        &bad,
        "{\"id\":\"j1\",\"vector\":[1,1,1]}\n{\"id\":\"j2\",\"vector\":[1]}\n",
    )
    .unwrap();
    fails(&db, &["import", "docs", bad.to_str().unwrap()], 1, "line 2");
    let export = ok(&db, &["export", "docs"]);
    assert_eq!(
        export.lines().count(),
        3,
        "the bad import wrote nothing of its batch: {export}"
    );
    assert!(export.lines().next().unwrap().starts_with("{\"id\":\"a\""));
    ok(&db, &["delete", "docs", "i1"]);
    fails(&db, &["delete", "docs", "i1"], 1, "no record");

    ok(
        &db,
        &["sql", "CREATE TABLE notes(id TEXT PRIMARY KEY, body TEXT)"],
    );
    ok(&db, &["table", "add", "notes", "--shard", "app"]);
    ok(
        &db,
        &["sql", "CREATE TABLE bad(id INTEGER PRIMARY KEY, body TEXT)"],
    );
    fails(&db, &["table", "add", "bad"], 1, "alias of the rowid");
    fails(&db, &["sql", "SELEC nonsense"], 1, "syntax error");
    ok(&db, &["sql", "INSERT INTO notes VALUES ('n1', 'hello')"]);
    let rows: serde_json::Value =
        serde_json::from_str(&ok(&db, &["--json", "sql", "SELECT * FROM notes"])).unwrap();
    assert_eq!(rows[0]["body"], "hello");
    ok(&db, &["memory", "init"]);
    let st: serde_json::Value = serde_json::from_str(&ok(&db, &["--json", "status"])).unwrap();
    let shards: Vec<&str> = st["shards"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| s["name"].as_str().unwrap())
        .collect();
    assert_eq!(shards, ["app", "default", "memory"]);
    assert_eq!(st["node_name"], "alpha");
    let c: serde_json::Value =
        serde_json::from_str(&ok(&db, &["--json", "conflicts", "list"])).unwrap();
    assert_eq!(c, serde_json::json!([]));
    fails(
        &db,
        &["conflicts", "resolve", "99", "--keep", "x"],
        1,
        "does not exist",
    );
    fails(&db, &["conflicts", "resolve", "99"], 2, "--keep");
    fails(&db, &["frobnicate"], 2, "unrecognized subcommand");
}

#[test]
fn foreign_files_are_refused_untouched() {
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("plain.txt");
    std::fs::write(&db, "just text").unwrap();
    fails(&db, &["status"], 1, "not a quiverdb store");
    assert_eq!(std::fs::read_to_string(&db).unwrap(), "just text");
}

#[test]
fn bench_write_prints_the_ratio() {
    let dir = tempfile::tempdir().unwrap();
    let out = ok(
        &dir.path().join("unused.db"),
        &["--json", "bench", "write", "--n", "300", "--dim", "8"],
    );
    let v: serde_json::Value = serde_json::from_str(&out).unwrap();
    for k in ["n", "quiver_s", "plain_sqlite_s", "ratio"] {
        assert!(v[k].is_number(), "{k} missing in {out}");
    }
    assert_eq!(v["n"], 300);
}

#[test]
fn demo_converges() {
    let dir = tempfile::tempdir().unwrap();
    let out = ok(
        &dir.path().join("unused.db"),
        &["--json", "demo", "--rows", "60"],
    );
    let v: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(v["converged"], true, "{out}");
    // Every shared id was written on all three at once; conflicts are
    // counted once an id (not once per cell and per link), so there are
    // some, and never more than the shared ids.
    assert_eq!(v["shared_ids"], 6, "{out}");
    let conflicts = v["conflicts"].as_u64().unwrap();
    assert!(
        (1..=6).contains(&conflicts),
        "the demo counts conflicting ids: {out}"
    );
    assert_eq!(
        v["rows"],
        3 * 60 + 6 + 20,
        "rows, shared ids and latency probes: {out}"
    );
}

#[test]
fn bench_live_reports_percentiles() {
    let dir = tempfile::tempdir().unwrap();
    let out = ok(
        &dir.path().join("unused.db"),
        &["--json", "bench", "live", "--writes", "30", "--bursts", "2"],
    );
    let v: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert!(v["p50_ms"].as_f64().unwrap() > 0.0, "{out}");
    assert!(
        v["p99_ms"].as_f64().unwrap() >= v["p50_ms"].as_f64().unwrap(),
        "{out}"
    );
    assert_eq!(v["single_writes"]["n"], 30);
}

#[test]
fn search_with_filters_through_the_cli() {
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("q.db");
    ok(&db, &["init"]);
    ok(
        &db,
        &["collection", "create", "d", "--dim", "2", "--metric", "l2"],
    );
    ok(
        &db,
        &[
            "put",
            "d",
            "a",
            "--vector",
            "[0,0]",
            "--meta",
            r#"{"lang":"en","year":2020}"#,
        ],
    );
    ok(
        &db,
        &[
            "put",
            "d",
            "b",
            "--vector",
            "[1,1]",
            "--meta",
            r#"{"lang":"fr","year":2022}"#,
        ],
    );
    ok(
        &db,
        &[
            "put",
            "d",
            "c",
            "--vector",
            "[5,5]",
            "--meta",
            r#"{"lang":"en","year":2024}"#,
        ],
    );
    let hits = |args: &[&str]| -> Vec<String> {
        let mut a = vec!["--json", "search", "d"];
        a.extend_from_slice(args);
        let v: serde_json::Value = serde_json::from_str(&ok(&db, &a)).unwrap();
        v["hits"]
            .as_array()
            .unwrap()
            .iter()
            .map(|h| h["id"].as_str().unwrap().to_string())
            .collect()
    };
    assert_eq!(hits(&["--vector", "[0.9,0.9]", "-k", "2"]), ["b", "a"]);
    // The filter applies inside the scan: the nearest match comes back even if far.
    assert_eq!(
        hits(&[
            "--vector",
            "[0.9,0.9]",
            "-k",
            "1",
            "--filter",
            r#"{"year":{"$gte":2023}}"#
        ]),
        ["c"]
    );
    assert_eq!(
        hits(&[
            "--vector",
            "[0,0]",
            "--filter",
            r#"{"$or":[{"lang":"fr"},{"year":2024}]}"#
        ]),
        ["b", "c"]
    );
    fails(&db, &["search", "d", "--vector", "[1]"], 1, "expects 2");
    fails(
        &db,
        &[
            "search",
            "d",
            "--vector",
            "[1,1]",
            "--filter",
            r#"{"year":{"$gtee":1}}"#,
        ],
        1,
        "unknown operator",
    );
    fails(
        &db,
        &["search", "nope", "--vector", "[1,1]"],
        1,
        "does not exist",
    );
}

#[test]
fn bench_load_many_clients_against_one_server() {
    let dir = tempfile::tempdir().unwrap();
    let out = ok(
        &dir.path().join("unused.db"),
        &["--json", "bench", "load", "--clients", "12", "--rows", "5"],
    );
    let v: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(v["exports_equal"], true, "{out}");
    assert_eq!(v["total_rows"], 60);
    assert!(v["server_peak_rss_mib"].as_f64().unwrap() > 0.0, "{out}");
}

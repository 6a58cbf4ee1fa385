//! Schema changes between real `quiver` processes over QUIC: a column
//! added by another writer travels, concurrent columns merge, a column
//! with two types is held until resolved, counters add up, references
//! stay whole.

mod common;

use std::path::Path;

use common::Node;

/// Runs SQL as another program would: the `sqlite3` shell when the machine
/// has one, else a plain SQLite connection of this test's own.
fn shell(db: &Path, sql: &str) {
    match std::process::Command::new("sqlite3")
        .args(["-bail", "-cmd", ".timeout 10000"])
        .arg(db)
        .arg(sql)
        .output()
    {
        Ok(out) => assert!(
            out.status.success(),
            "sqlite3 {sql}: {}",
            String::from_utf8_lossy(&out.stderr)
        ),
        Err(_) => {
            let c = rusqlite::Connection::open(db).unwrap();
            c.busy_timeout(std::time::Duration::from_secs(10)).unwrap();
            c.execute_batch(sql).unwrap();
        }
    }
}

fn sync(n: &Node, s: &common::Served) -> serde_json::Value {
    serde_json::from_str(&n.q(&["--json", "sync", &s.addr, "--pin", &s.fp])).unwrap()
}

fn tasks() -> (Node, Node) {
    let a = Node::new("a");
    let b = Node::new("b");
    a.q(&["sql", "CREATE TABLE tasks(id TEXT PRIMARY KEY, title TEXT)"]);
    a.q(&["table", "add", "tasks"]);
    a.q(&["sql", "INSERT INTO tasks VALUES('t1','one')"]);
    (a, b)
}

#[test]
fn an_added_column_is_exported_captured_and_synced() {
    let (a, b) = tasks();
    let sa = a.serve(&[]);
    sync(&b, &sa);
    // The session of the issue: ALTER from SQL, then writes that use it.
    a.q(&["sql", "ALTER TABLE tasks ADD COLUMN prio INTEGER"]);
    a.q(&["sql", "UPDATE tasks SET prio=5 WHERE id='t1'"]);
    a.q(&["sql", "INSERT INTO tasks VALUES('t2','two',3)"]);
    let exported = a.export("tasks");
    assert!(
        exported.contains(r#""prio":5"#) && exported.contains(r#""prio":3"#),
        "{exported}"
    );
    let r = sync(&b, &sa);
    assert_eq!(r["held"], 0, "{r}");
    assert_eq!(a.export("tasks"), b.export("tasks"));
    // A column added by the sqlite3 shell, on the other side, written at once.
    shell(&b.db, "ALTER TABLE tasks ADD COLUMN note TEXT DEFAULT 'none'; UPDATE tasks SET note = 'from the shell' WHERE id = 't2';");
    sync(&b, &sa);
    assert_eq!(a.export("tasks"), b.export("tasks"));
    assert!(a.export("tasks").contains("from the shell"));
    let st: serde_json::Value = serde_json::from_str(&a.q(&["--json", "status"])).unwrap();
    assert!(
        st["shards"][0]["schema_version"].as_i64().unwrap() >= 3,
        "{st}"
    );
}

#[test]
fn concurrent_columns_on_two_replicas_both_survive() {
    let (a, b) = tasks();
    let sa = a.serve(&[]);
    let sb = b.serve(&[]);
    sync(&b, &sa);
    shell(
        &a.db,
        "ALTER TABLE tasks ADD COLUMN owner TEXT; UPDATE tasks SET owner = 'ann';",
    );
    shell(
        &b.db,
        "ALTER TABLE tasks ADD COLUMN due TEXT; UPDATE tasks SET due = 'mon';",
    );
    sync(&b, &sa);
    sync(&a, &sb);
    let e = a.export("tasks");
    assert_eq!(e, b.export("tasks"));
    assert!(e.contains("ann") && e.contains("mon"), "{e}");
}

#[test]
fn a_column_with_two_types_holds_its_shard_until_resolved() {
    let (a, b) = tasks();
    // A second shard syncs on while this one is held.
    a.q(&["sql", "CREATE TABLE other(id TEXT PRIMARY KEY, x TEXT)"]);
    a.q(&["table", "add", "other", "--shard", "side"]);
    let sa = a.serve(&[]);
    sync(&b, &sa);
    shell(
        &a.db,
        "ALTER TABLE tasks ADD COLUMN size INTEGER; UPDATE tasks SET size = 1;",
    );
    shell(
        &b.db,
        "ALTER TABLE tasks ADD COLUMN size TEXT; UPDATE tasks SET size = 'big';",
    );
    a.q(&["sql", "INSERT INTO other VALUES('o1', 'still flows')"]);
    let out = common::run(&b.db, &["sync", &sa.addr, "--pin", &sa.fp]);
    assert!(!out.status.success());
    let e = String::from_utf8_lossy(&out.stderr);
    assert!(e.contains("schema conflict on tasks.size"), "{e}");
    assert!(
        b.export("other").contains("still flows"),
        "the other shard synced"
    );
    // The side that received the other's definition holds it and says so.
    let st: serde_json::Value = serde_json::from_str(&a.q(&["--json", "status"])).unwrap();
    let held = st["shards"]
        .as_array()
        .unwrap()
        .iter()
        .find(|s| s["name"] == "default")
        .unwrap()["schema_conflicts"]
        .clone();
    assert_eq!(held[0]["column"], "size", "{st}");
    assert_eq!(
        (held[0]["ours"].as_str(), held[0]["theirs"].as_str()),
        (Some("INTEGER"), Some("TEXT"))
    );
    assert!(a.q(&["status"]).contains("SCHEMA CONFLICT tasks.size"));
    let listed: Vec<serde_json::Value> =
        serde_json::from_str(&a.q(&["--json", "schema", "conflicts"])).unwrap();
    assert_eq!(listed.len(), 1);
    // A takes B's type: its own values of the column are discarded.
    let r = a.q(&["schema", "resolve", "tasks.size", "--keep", "theirs"]);
    assert!(r.contains("1 value(s)"), "{r}");
    sync(&b, &sa);
    assert_eq!(a.export("tasks"), b.export("tasks"));
    assert!(a.export("tasks").contains(r#""size":"big""#));
}

#[test]
fn counters_on_three_replicas_add_every_increment() {
    let nodes: Vec<Node> = ["a", "b", "c"].iter().map(|n| Node::new(n)).collect();
    nodes[0].q(&[
        "sql",
        "CREATE TABLE stats(id TEXT PRIMARY KEY, views INTEGER NOT NULL DEFAULT 0, title TEXT)",
    ]);
    nodes[0].q(&[
        "table",
        "add",
        "stats",
        "--column",
        "views=counter",
        "--column",
        "title=fww",
    ]);
    nodes[0].q(&["sql", "INSERT INTO stats VALUES('page', 0, 'first')"]);
    let served: Vec<common::Served> = nodes.iter().map(|n| n.serve(&[])).collect();
    sync(&nodes[1], &served[0]);
    sync(&nodes[2], &served[0]);
    let listed = nodes[2].q(&["table", "list"]);
    assert!(
        listed.contains("views=counter") && listed.contains("title=fww"),
        "{listed}"
    );
    const N: usize = 1000;
    std::thread::scope(|scope| {
        for n in &nodes {
            let db = n.db.clone();
            scope.spawn(move || {
                let c = rusqlite::Connection::open(&db).unwrap();
                c.busy_timeout(std::time::Duration::from_secs(30)).unwrap();
                for _ in 0..N {
                    c.execute("UPDATE stats SET views = views + 1 WHERE id = 'page'", [])
                        .unwrap();
                }
            });
        }
        // Meanwhile, random syncs between the replicas.
        scope.spawn(|| {
            for i in 0..12usize {
                let (from, to) = (i % 3, (i * 7 + 1) % 3);
                if from != to {
                    sync(&nodes[from], &served[to]);
                }
            }
        });
    });
    for _ in 0..2 {
        for (i, j) in [(0, 1), (1, 2), (2, 0)] {
            sync(&nodes[i], &served[j]);
        }
    }
    for n in &nodes {
        let v: serde_json::Value = serde_json::from_str(n.export("stats").trim()).unwrap();
        assert_eq!(v["views"], 3 * N, "{v}");
        assert_eq!(v["title"], "first");
    }
}

#[test]
fn a_link_to_a_node_deleted_elsewhere_goes_on_every_replica() {
    let a = Node::new("a");
    let b = Node::new("b");
    a.q(&["sql", "CREATE TABLE nodes(id TEXT PRIMARY KEY, name TEXT); CREATE TABLE links(id TEXT PRIMARY KEY, src TEXT NOT NULL, dst TEXT NOT NULL)"]);
    a.q(&["table", "add", "nodes"]);
    a.q(&[
        "table",
        "add",
        "links",
        "--references",
        "src=nodes.id",
        "--references",
        "dst=nodes.id",
        "--on-delete",
        "cascade",
    ]);
    a.q(&["sql", "INSERT INTO nodes VALUES('n1','one'), ('n2','two')"]);
    let sa = a.serve(&[]);
    let sb = b.serve(&[]);
    sync(&b, &sa);
    a.q(&["sql", "DELETE FROM nodes WHERE id = 'n1'"]);
    shell(
        &b.db,
        "INSERT INTO links VALUES('l1','n1','n2'); INSERT INTO links VALUES('l2','n2','n2');",
    );
    sync(&b, &sa);
    sync(&a, &sb);
    for n in [&a, &b] {
        let links = n.export("links");
        assert!(!links.contains("l1") && links.contains("l2"), "{links}");
    }
    assert_eq!(a.export("links"), b.export("links"));
    // A bad reference is refused with the reason.
    let e = common::err(
        &a.db,
        &["table", "add", "nodes", "--references", "name=nowhere.id"],
    );
    assert!(e.contains("already") || e.contains("nowhere"), "{e}");
}

#[test]
fn an_older_schema_receives_newer_changes_first_holds_them_then_applies_them() {
    let (a, b) = tasks();
    let c = Node::new("c");
    let sa = a.serve(&[]);
    let sb = b.serve(&[]);
    sync(&b, &sa);
    sync(&c, &sb);
    // A's schema moves on; B takes it, then drops the column here (it
    // still passes on what it claimed); C, on the old schema, hears of
    // A's new column only through B: changes first, no definition.
    a.q(&["sql", "ALTER TABLE tasks ADD COLUMN prio INTEGER"]);
    a.q(&["sql", "UPDATE tasks SET prio = 4 WHERE id = 't1'"]);
    sync(&b, &sa);
    b.q(&["table", "drop-column", "tasks", "prio"]);
    assert!(!b.export("tasks").contains("prio"));
    let r = sync(&c, &sb);
    assert!(r["held"].as_u64().unwrap() > 0, "{r}");
    let st: serde_json::Value = serde_json::from_str(&c.q(&["--json", "status"])).unwrap();
    assert!(st["shards"][0]["held"].as_u64().unwrap() > 0, "{st}");
    assert!(!c.export("tasks").contains("prio"));
    // The definition arrives from A: the held changes apply, in order.
    sync(&c, &sa);
    assert_eq!(a.export("tasks"), c.export("tasks"));
    assert!(c.export("tasks").contains(r#""prio":4"#));
    let st: serde_json::Value = serde_json::from_str(&c.q(&["--json", "status"])).unwrap();
    assert_eq!(st["shards"][0]["held"], 0, "{st}");
}

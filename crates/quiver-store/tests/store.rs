//! Store operations and every bad input they must refuse.

use quiver_core::{Strategy, Value};
use quiver_store::{CollectionSpec, Metric, Record, RecordColumns, Store, StoreError};
use rusqlite::Connection;
use serde_json::json;

type R = Result<(), Box<dyn std::error::Error>>;

fn new_store(dir: &tempfile::TempDir, name: &str) -> Store {
    Store::init(dir.path().join(name)).unwrap()
}

fn docs(s: &mut Store, dim: usize) {
    let mut spec = CollectionSpec::new("docs", dim);
    spec.metric = Metric::L2;
    s.create_collection(&spec).unwrap();
}

#[test]
fn init_open_and_refusals() -> R {
    let dir = tempfile::tempdir()?;
    let p = dir.path().join("a.db");
    let site = Store::init(&p)?.site_id();
    assert_eq!(
        Store::open(&p)?.site_id(),
        site,
        "site id is kept in the file"
    );
    assert!(matches!(
        Store::init(&p),
        Err(StoreError::AlreadyInitialised { .. })
    ));
    assert!(matches!(
        Store::open(dir.path().join("none.db")),
        Err(StoreError::Missing { .. })
    ));

    // A plain SQLite file is refused and left untouched (not switched to WAL).
    let plain = dir.path().join("plain.db");
    Connection::open(&plain)?.execute_batch("CREATE TABLE t(x); INSERT INTO t VALUES (1);")?;
    let before = std::fs::read(&plain)?;
    assert!(matches!(
        Store::open(&plain),
        Err(StoreError::NotAStore { .. })
    ));
    assert_eq!(std::fs::read(&plain)?, before);

    // Garbage is refused too.
    let junk = dir.path().join("junk.db");
    std::fs::write(
        &junk,
        b"this is not sqlite at all, not even close............",
    )?;
    assert!(matches!(
        Store::open(&junk),
        Err(StoreError::NotAStore { .. })
    ));

    // A newer format is refused.
    Connection::open(&p)?.execute("UPDATE quiver_meta SET value = 99 WHERE key = 'format'", [])?;
    let err = Store::open(&p).err().unwrap();
    assert!(
        matches!(err, StoreError::NewerFormat { found: 99, .. }),
        "{err}"
    );
    Ok(())
}

#[test]
fn collection_crud_and_validation() -> R {
    let dir = tempfile::tempdir()?;
    let mut s = new_store(&dir, "a.db");
    docs(&mut s, 3);
    assert!(matches!(
        s.create_collection(&CollectionSpec::new("docs", 3)),
        Err(StoreError::AlreadyExists(_))
    ));
    assert!(matches!(
        s.create_collection(&CollectionSpec::new("bad name", 3)),
        Err(StoreError::InvalidName { .. })
    ));
    assert!(s
        .create_collection(&CollectionSpec::new("zero", 0))
        .is_err());
    assert_eq!(s.collections()?.len(), 1);
    assert_eq!(s.collection("docs")?.metric, Some(Metric::L2));

    let mut r = Record::new("a", vec![1.0, 2.0, 3.0]);
    r.metadata = json!({"k": 1});
    r.content = Some("hello".into());
    s.put("docs", &r)?;
    assert_eq!(s.get("docs", "a")?, Some(r.clone()));

    // Bad inputs: clear errors, nothing written (the batch is all or nothing).
    let good = Record::new("b", vec![0.0; 3]);
    let wrong_dim = Record::new("c", vec![0.0; 2]);
    let err = s.put_many("docs", &[good.clone(), wrong_dim]).unwrap_err();
    assert!(
        matches!(
            err,
            StoreError::Dimension {
                expected: 3,
                got: 2,
                ..
            }
        ),
        "{err}"
    );
    assert_eq!(s.get("docs", "b")?, None);
    let nan = Record::new("d", vec![0.0, f32::NAN, 1.0]);
    assert!(matches!(
        s.put("docs", &nan),
        Err(StoreError::NotFinite { index: 1, .. })
    ));
    let mut meta = Record::new("e", vec![0.0; 3]);
    meta.metadata = json!([1, 2]);
    assert!(matches!(s.put("docs", &meta), Err(StoreError::Metadata(_))));
    assert!(matches!(
        s.put("nope", &good),
        Err(StoreError::NoSuchCollection(_))
    ));
    assert_eq!(s.count("docs")?, 1);

    // Upsert, delete, scan.
    s.put_many("docs", &[good.clone(), Record::new("a", vec![9.0; 3])])?;
    assert_eq!(s.get("docs", "a")?.unwrap().vector, vec![9.0; 3]);
    assert!(s.delete("docs", "a")?);
    assert!(!s.delete("docs", "a")?);
    let mut ids = Vec::new();
    s.scan("docs", |r| {
        ids.push(r.id);
        Ok(())
    })?;
    assert_eq!(ids, vec!["b"]);

    // Re-insert after delete works.
    s.put("docs", &Record::new("a", vec![1.0; 3]))?;
    assert_eq!(s.count("docs")?, 2);

    s.drop_collection("docs")?;
    assert!(s.collections()?.is_empty());
    Ok(())
}

#[test]
fn json_lines_parse_strictly() {
    let r = Record::from_json(r#"{"id":"x","vector":[1,2],"metadata":{"a":1}}"#).unwrap();
    assert_eq!(r.vector, vec![1.0, 2.0]);
    assert!(Record::from_json(r#"{"id":"x"}"#).is_err());
    assert!(Record::from_json(r#"{"id":"x","vector":[1],"extra":1}"#).is_err());
    assert!(Record::from_json("not json").is_err());
}

#[test]
fn table_registration_checks() -> R {
    let dir = tempfile::tempdir()?;
    let mut s = new_store(&dir, "a.db");
    s.execute_sql(
        "CREATE TABLE nokey(a TEXT, b TEXT);
         CREATE TABLE alias(id INTEGER PRIMARY KEY, x TEXT);
         CREATE TABLE good(id TEXT PRIMARY KEY, n INTEGER, note TEXT);
         CREATE TABLE pair(a TEXT, b INTEGER, v REAL, PRIMARY KEY(a, b));
         INSERT INTO good VALUES ('pre', 1, 'existing row');",
    )?;
    let err = s.add_table("nokey", "default", Strategy::Lww).unwrap_err();
    assert!(err.to_string().contains("no explicit PRIMARY KEY"), "{err}");
    let err = s.add_table("alias", "default", Strategy::Lww).unwrap_err();
    assert!(err.to_string().contains("alias of the rowid"), "{err}");
    assert!(s.add_table("missing", "default", Strategy::Lww).is_err());
    assert!(s
        .add_table("quiver_clock", "default", Strategy::Lww)
        .is_err());
    let t = s.add_table("good", "app", Strategy::Fww)?;
    assert_eq!((t.shard.as_str(), t.strategy), ("app", Strategy::Fww));
    assert!(matches!(
        s.add_table("good", "app", Strategy::Lww),
        Err(StoreError::AlreadyExists(_))
    ));
    s.add_table("pair", "app", Strategy::Lww)?;
    // Existing rows get a version and are synced like new ones.
    let changes: Vec<_> = s
        .changes_since("app", &Default::default())?
        .collect::<Result<_, _>>()?;
    let all: Vec<_> = changes.iter().flat_map(|b| b.changes.iter()).collect();
    assert!(all.iter().any(|c| c.pk == vec![Value::Text("pre".into())]));
    Ok(())
}

#[test]
fn writes_through_a_plain_connection_are_tracked() -> R {
    let dir = tempfile::tempdir()?;
    let p = dir.path().join("a.db");
    let mut s = Store::init(&p)?;
    s.execute_sql("CREATE TABLE notes(id TEXT PRIMARY KEY, body TEXT, n INTEGER)")?;
    s.add_table("notes", "default", Strategy::Lww)?;
    let before = s.version_vector("default")?.get(&s.site_id());

    // Another process's driver: no quiverdb code, no custom functions.
    let other = Connection::open(&p)?;
    other.execute_batch(
        "INSERT INTO notes VALUES ('n1', 'hello', 1);
         INSERT INTO notes VALUES ('n2', 'bye', 2);
         UPDATE notes SET body = 'hello again' WHERE id = 'n1';
         DELETE FROM notes WHERE id = 'n2';",
    )?;
    drop(other);

    let vv = s.version_vector("default")?;
    assert!(
        vv.get(&s.site_id()) > before,
        "external writes got a db_version"
    );
    let changes: Vec<_> = s
        .changes_since("default", &Default::default())?
        .collect::<Result<Vec<_>, _>>()?
        .into_iter()
        .flat_map(|b| b.changes)
        .collect();
    let n1: Vec<_> = changes
        .iter()
        .filter(|c| c.pk == vec![Value::Text("n1".into())])
        .collect();
    assert!(n1.iter().any(
        |c| c.column.as_deref() == Some("body") && c.value == Value::Text("hello again".into())
    ));
    let n2: Vec<_> = changes
        .iter()
        .filter(|c| c.pk == vec![Value::Text("n2".into())])
        .collect();
    assert_eq!(n2.len(), 1, "a deleted row travels as its tombstone only");
    assert!(!n2[0].alive());
    Ok(())
}

#[test]
fn db_version_is_per_transaction_and_persists() -> R {
    let dir = tempfile::tempdir()?;
    let p = dir.path().join("a.db");
    let mut s = Store::init(&p)?;
    docs(&mut s, 2);
    let v0 = s.version_vector("default")?.get(&s.site_id());
    s.put_many(
        "docs",
        &[
            Record::new("a", vec![1.0, 1.0]),
            Record::new("b", vec![2.0, 2.0]),
        ],
    )?;
    let v1 = s.version_vector("default")?.get(&s.site_id());
    assert_eq!(v1, v0 + 1, "one transaction, one db_version");
    s.put("docs", &Record::new("c", vec![1.0, 1.0]))?;
    drop(s);
    let s = Store::open(&p)?;
    assert_eq!(s.version_vector("default")?.get(&s.site_id()), v1 + 1);
    Ok(())
}

#[test]
fn agent_memory_preset() -> R {
    let dir = tempfile::tempdir()?;
    let mut s = new_store(&dir, "a.db");
    let tables = s.init_memory()?;
    assert_eq!(
        tables.iter().map(|t| t.name.as_str()).collect::<Vec<_>>(),
        ["episodes", "skills", "edges"]
    );
    assert!(tables.iter().all(|t| t.shard == "memory"));
    assert!(s.init_memory().is_err());
    s.execute_sql("INSERT INTO episodes(id, task, created) VALUES ('e1', 'plan a trip', 1)")?;
    assert_eq!(s.count("episodes")?, 1);
    Ok(())
}

#[test]
fn sync_state_and_cursors_persist() -> R {
    let dir = tempfile::tempdir()?;
    let p = dir.path().join("a.db");
    let mut s = Store::init(&p)?;
    s.record_sync(10, 20, None)?;
    s.record_sync(1, 2, Some("connection reset"))?;
    s.set_peer_sent_cursor("peer-b", "default", "{}")?;
    drop(s);
    let s = Store::open(&p)?;
    let st = s.sync_state()?;
    assert_eq!(
        (st.total_sent, st.total_received, st.sync_count),
        (11, 22, 2)
    );
    assert_eq!(st.last_error.as_deref(), Some("connection reset"));
    assert_eq!(s.peer_cursors()?.len(), 1);
    Ok(())
}

#[test]
fn older_formats_are_migrated_forward() -> R {
    let dir = tempfile::tempdir()?;
    let p = dir.path().join("old.db");
    drop(Store::init(&p)?);
    // Make it a format-1 store: no token table yet.
    let c = Connection::open(&p)?;
    c.execute_batch(
        "ALTER TABLE quiver_tables DROP COLUMN dropped; DROP TABLE quiver_held; DROP TABLE quiver_schema_conflicts;
         DROP TABLE quiver_tokens; DROP TABLE quiver_pending; DROP TABLE quiver_acks; DROP TABLE quiver_snapshots;
         DROP TABLE quiver_compacted; DROP TABLE quiver_snapshot_seen;
         ALTER TABLE quiver_conflicts DROP COLUMN kind; ALTER TABLE quiver_conflicts DROP COLUMN row;
         UPDATE quiver_meta SET value = 1 WHERE key = 'format';",
    )?;
    drop(c);
    let mut s = Store::open(&p)?;
    assert_eq!(s.status()?.format, quiver_store::FORMAT_VERSION);
    let id = s.add_token(&"ab".repeat(32), &["default".into()], true, Some("ci"))?;
    let t = s.tokens()?;
    assert_eq!(
        (t[0].id, t[0].read_only, t[0].shards.clone()),
        (id, true, vec!["default".to_string()])
    );
    assert!(s.add_token("not-a-hash", &[], false, None).is_err());
    assert!(s.revoke_token(id)?);
    assert!(s.tokens()?.is_empty());
    Ok(())
}

/// Every change of `shard`, as the first sync would send them.
fn all_changes(
    s: &Store,
    shard: &str,
) -> Result<Vec<quiver_core::Change>, quiver_store::StoreError> {
    Ok(s.changes_since(shard, &Default::default())?
        .collect::<Result<Vec<_>, _>>()?
        .into_iter()
        .flat_map(|b| b.changes)
        .collect())
}

/// A store at `dir/name` with a replicated table `notes(id, body)`.
fn notes_store(
    dir: &tempfile::TempDir,
    name: &str,
) -> Result<(std::path::PathBuf, Store), quiver_store::StoreError> {
    let p = dir.path().join(name);
    let mut s = Store::init(&p)?;
    s.execute_sql("CREATE TABLE notes(id TEXT PRIMARY KEY, body TEXT)")?;
    s.add_table("notes", "default", Strategy::Lww)?;
    Ok((p, s))
}

/// Whether the live row `id` is among the shard's changes.
fn travels(s: &Store, id: &str) -> Result<bool, quiver_store::StoreError> {
    Ok(all_changes(s, "default")?
        .iter()
        .any(|c| c.pk == vec![Value::Text(id.into())] && c.alive()))
}

#[test]
fn a_format_2_store_gets_the_insert_log_and_new_triggers() -> R {
    let dir = tempfile::tempdir()?;
    let (p, mut s) = notes_store(&dir, "old.db")?;
    s.execute_sql("INSERT INTO notes VALUES ('a', 'kept')")?;
    // A registered table someone dropped behind quiverdb's back.
    s.execute_sql("CREATE TABLE gone(id TEXT PRIMARY KEY, x TEXT)")?;
    s.add_table("gone", "default", Strategy::Lww)?;
    s.fold_pending()?;
    drop(s);
    // What a format-2 build left: no insert log, and an insert trigger that
    // writes the clock directly.
    let c = Connection::open(&p)?;
    c.execute_batch(
        "ALTER TABLE quiver_conflicts DROP COLUMN kind; ALTER TABLE quiver_conflicts DROP COLUMN row;
         ALTER TABLE quiver_tables DROP COLUMN dropped; DROP TABLE quiver_held; DROP TABLE quiver_schema_conflicts;
         DROP TABLE quiver_pending; DROP TABLE quiver_acks; DROP TABLE quiver_snapshots;
         DROP TABLE quiver_compacted; DROP TABLE quiver_snapshot_seen;
         DROP TABLE gone;
         DROP TRIGGER quiver_ins_notes;
         CREATE TRIGGER quiver_ins_notes AFTER INSERT ON notes BEGIN
           INSERT INTO quiver_clock(tbl, pk, col, site, dbv, hlc, cl)
           SELECT (SELECT id FROM quiver_tables WHERE name = 'notes'), NEW.id, '', 0, s.dbv, s.hlc_floor, 1
           FROM quiver_state s WHERE s.applying = 0;
         END;
         UPDATE quiver_meta SET value = 2 WHERE key = 'format';",
    )?;
    drop(c);
    let s = Store::open(&p)?;
    let c = Connection::open(&p)?;
    let format: i64 = c.query_row(
        "SELECT value FROM quiver_meta WHERE key = 'format'",
        [],
        |r| r.get(0),
    )?;
    assert_eq!(format, quiver_store::FORMAT_VERSION);
    let triggers: i64 = c.query_row(
        "SELECT count(*) FROM sqlite_master WHERE type = 'trigger' AND tbl_name = 'notes'",
        [],
        |r| r.get(0),
    )?;
    assert_eq!(triggers, 4);
    c.execute("INSERT INTO notes VALUES ('b', 'new')", [])?;
    let logged: i64 = c.query_row("SELECT count(*) FROM quiver_pending", [], |r| r.get(0))?;
    assert_eq!(
        logged, 1,
        "the new insert trigger logs instead of writing the clock"
    );
    for id in ["a", "b"] {
        assert!(travels(&s, id)?, "row {id} travels");
    }
    Ok(())
}

#[test]
fn logged_inserts_keep_every_life_of_a_row() -> R {
    let dir = tempfile::tempdir()?;
    let (p, mut s) = notes_store(&dir, "a.db")?;
    let existence = |s: &Store| -> Result<(u64, u64), Box<dyn std::error::Error>> {
        let ch = all_changes(s, "default")?;
        let e = ch
            .iter()
            .find(|c| c.pk == vec![Value::Text("x".into())] && c.column.is_none())
            .ok_or("no existence change for x")?;
        Ok((e.cl, e.db_version))
    };
    let other = Connection::open(&p)?;
    let pending = |c: &Connection| -> rusqlite::Result<i64> {
        c.query_row("SELECT count(*) FROM quiver_pending", [], |r| r.get(0))
    };
    // Three lives before anything folds: insert, then two replacements of
    // the live row (SQLite deletes without firing the delete trigger).
    other.execute_batch(
        "INSERT INTO notes VALUES ('x', 'one');
         INSERT OR REPLACE INTO notes VALUES ('x', 'two');
         INSERT OR REPLACE INTO notes VALUES ('x', 'three');",
    )?;
    assert_eq!(pending(&other)?, 3, "inserts are logged, not folded");
    assert!(s.close_open_version()?, "logged inserts seal a version");
    let (cl, v1) = existence(&s)?;
    assert_eq!(cl, 5);
    assert_eq!(pending(&other)?, 0, "reading changes folds the log");
    // A delete folds first, so it tombstones the newest life; the next
    // insert starts the one after.
    other.execute_batch(
        "INSERT OR REPLACE INTO notes VALUES ('x', 'four');
         DELETE FROM notes WHERE id = 'x';",
    )?;
    assert_eq!(pending(&other)?, 0, "the delete trigger folded the log");
    other.execute("INSERT INTO notes VALUES ('x', 'five')", [])?;
    // An update of a row still in the log is captured as a cell version.
    other.execute("UPDATE notes SET body = 'six' WHERE id = 'x'", [])?;
    let ch = all_changes(&s, "default")?;
    let (cl, v2) = existence(&s)?;
    assert_eq!(cl, 9);
    assert!(v2 > v1);
    assert!(ch.iter().any(|c| c.column.as_deref() == Some("body")
        && c.value == Value::Text("six".into())
        && c.cl == 9));
    Ok(())
}

#[test]
fn put_many_logs_new_rows_and_tracks_updates_through_the_triggers() -> R {
    use rusqlite::config::DbConfig;
    let dir = tempfile::tempdir()?;
    let mut s = new_store(&dir, "a.db");
    docs(&mut s, 2);
    s.put_many(
        "docs",
        &[
            Record::new("a", vec![1.0, 1.0]),
            Record::new("b", vec![2.0, 2.0]),
        ],
    )?;
    let before = s.version_vector("default")?;
    // New, existing, and a new id written twice in one batch.
    s.put_many(
        "docs",
        &[
            Record::new("c", vec![3.0, 3.0]),
            Record::new("a", vec![9.0, 9.0]),
            Record::new("c", vec![4.0, 4.0]),
        ],
    )?;
    let on = |s: &Store| {
        s.connection()
            .db_config(DbConfig::SQLITE_DBCONFIG_ENABLE_TRIGGER)
    };
    assert!(on(&s)?, "capture is back on after put_many");
    assert_eq!(
        s.get("docs", "c")?.ok_or("c missing")?.vector,
        vec![4.0, 4.0]
    );
    let changes: Vec<_> = s
        .changes_since("default", &before)?
        .collect::<Result<Vec<_>, _>>()?
        .into_iter()
        .flat_map(|b| b.changes)
        .collect();
    let of = |id: &str| -> Vec<&quiver_core::Change> {
        changes
            .iter()
            .filter(|c| c.pk == vec![Value::Text(id.into())])
            .collect()
    };
    assert!(
        of("a")
            .iter()
            .any(|c| c.column.as_deref() == Some("vector")),
        "update of a travels"
    );
    assert!(of("b").is_empty(), "b did not change");
    assert!(of("c")
        .iter()
        .any(|c| c.column.is_none() && c.alive() && c.cl == 1));
    assert!(
        of("c")
            .iter()
            .any(|c| c.column.as_deref() == Some("vector")),
        "c's second write travels"
    );

    // A batch that fails half-way writes nothing and leaves capture on.
    s.execute_sql("CREATE UNIQUE INDEX docs_content ON docs(content)")?;
    let mut d = Record::new("d", vec![1.0, 2.0]);
    d.content = Some("same".into());
    let mut e = Record::new("e", vec![1.0, 2.0]);
    e.content = Some("same".into());
    assert!(s.put_many("docs", &[d, e]).is_err());
    assert!(on(&s)?);
    assert!(s.get("docs", "d")?.is_none());
    // Writes keep their order: moving "x" from h to i is valid only if h's
    // update comes before i's insert, and k before h takes the direct path.
    let with = |id: &str, content: &str| {
        let mut r = Record::new(id, vec![1.0, 1.0]);
        r.content = Some(content.into());
        r
    };
    s.put("docs", &with("h", "x"))?;
    s.put_many("docs", &[with("k", "z"), with("h", "y"), with("i", "x")])?;
    assert_eq!(
        s.get("docs", "i")?.ok_or("i missing")?.content.as_deref(),
        Some("x")
    );
    s.execute_sql(
        "INSERT INTO docs(id, vector, metadata) VALUES ('f', x'0000803f0000803f', '{}')",
    )?;
    assert!(travels(&s, "f")?, "a later SQL insert is captured");

    // Keys travel through the log exactly, whatever they contain.
    let odd = "q\"uo\\te é\n\u{1F600}";
    s.put("docs", &Record::new(odd, vec![1.0, 1.0]))?;
    assert!(travels(&s, odd)?);

    // A trigger of the user's own on the collection still fires (SQLite
    // matches table names without regard to case).
    s.execute_sql(
        "CREATE TABLE audit(id TEXT);
         CREATE TRIGGER audit_docs AFTER INSERT ON DOCS BEGIN INSERT INTO audit VALUES (NEW.id); END;",
    )?;
    s.put("docs", &Record::new("g", vec![1.0, 1.0]))?;
    let audited: i64 =
        s.connection()
            .query_row("SELECT count(*) FROM audit WHERE id = 'g'", [], |r| {
                r.get(0)
            })?;
    assert_eq!(audited, 1);
    assert!(
        travels(&s, "g")?,
        "and the row is captured by the insert trigger"
    );
    Ok(())
}

#[test]
fn run_sql_runs_every_statement_in_one_transaction_or_none() -> quiver_store::Result<()> {
    let dir = tempfile::tempdir().unwrap();
    let mut s = Store::init(dir.path().join("s.db"))?;
    let out = s.run_sql("CREATE TABLE t(id TEXT PRIMARY KEY, v INTEGER); INSERT INTO t VALUES ('a', 1); SELECT v FROM t")?;
    assert_eq!(out.len(), 3);
    assert!(out[0].is_none() && out[1].is_none());
    assert_eq!(
        out[2].as_ref().unwrap().1,
        vec![vec![quiver_core::Value::Integer(1)]]
    );
    // A failing statement undoes the ones before it.
    assert!(s
        .run_sql("INSERT INTO t VALUES ('b', 2); INSERT INTO nosuch VALUES (1)")
        .is_err());
    let n = s.run_sql("SELECT count(*) FROM t")?;
    assert_eq!(
        n[0].as_ref().unwrap().1,
        vec![vec![quiver_core::Value::Integer(1)]]
    );
    // Parameters go with one statement, and their number must match.
    let p = s.run_sql_with(
        "SELECT v FROM t WHERE id = ?",
        &[quiver_core::Value::Text("a".into())],
    )?;
    assert_eq!(p[0].as_ref().unwrap().1.len(), 1);
    assert!(s
        .run_sql_with("SELECT 1; SELECT ?", &[quiver_core::Value::Integer(1)])
        .is_err());
    assert!(
        s.run_sql("SELECT ?").is_err(),
        "an unbound parameter is an error, not NULL"
    );
    Ok(())
}

#[test]
fn put_many_writes_only_what_changed() -> quiver_store::Result<()> {
    let dir = tempfile::tempdir().unwrap();
    let mut s = Store::init(dir.path().join("s.db"))?;
    s.create_collection(&CollectionSpec::new("docs", 2))?;
    let recs = vec![
        Record::new("a", vec![1.0, 2.0]),
        Record::new("b", vec![3.0, 4.0]),
    ];
    assert_eq!(s.put_many("docs", &recs)?, 2);
    let before = s.status()?.db_version;
    assert_eq!(
        s.put_many("docs", &recs)?,
        0,
        "the same records again write nothing"
    );
    assert_eq!(s.status()?.db_version, before, "and claim no new version");
    let changed = vec![
        Record::new("a", vec![1.0, 2.0]),
        Record::new("b", vec![3.0, 5.0]),
    ];
    assert_eq!(s.put_many("docs", &changed)?, 1);
    Ok(())
}

#[test]
fn a_read_only_handle_reads_and_writes_nothing() -> quiver_store::Result<()> {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("s.db");
    {
        let mut s = Store::init(&path)?;
        s.create_collection(&CollectionSpec::new("docs", 2))?;
        s.connection().execute(
            "INSERT INTO docs(id, vector) VALUES ('x', x'0000803f00000040')",
            [],
        )?;
    }
    let mut r = Store::open_read_only(&path)?;
    assert!(r.is_read_only());
    assert_eq!(r.count("docs")?, 1);
    let status = r.status()?;
    assert_eq!(status.shards.len(), 1);
    assert!(r.put("docs", &Record::new("y", vec![1.0, 1.0])).is_err());
    drop(r);
    // The insert by another connection still waits in the log for a writer.
    let w = Store::open(&path)?;
    assert!(!w.is_read_only());
    assert!(w.fold_pending()?, "the reader did not fold the log");
    Ok(())
}

#[test]
fn put_columns_writes_what_put_many_writes_and_refuses_what_it_refuses() -> R {
    let dir = tempfile::tempdir()?;
    let mut s = new_store(&dir, "a.db");
    docs(&mut s, 2);
    let mut t = new_store(&dir, "b.db");
    docs(&mut t, 2);
    let mut a = Record::new("a", vec![1.0, 2.0]);
    a.metadata = json!({"k": [1, 2.5], "b": "é"});
    a.content = Some("hi".into());
    let b = Record::new("b", vec![3.0, 4.0]);
    s.put_many("docs", &[a.clone(), b.clone()])?;
    let rows = RecordColumns {
        ids: vec!["a".into(), "b".into()],
        vectors: vec![1.0, 2.0, 3.0, 4.0],
        metadata: vec![a.metadata.to_string(), "{}".into()],
        contents: vec![Some("hi".into()), None],
    };
    assert_eq!(t.put_columns("docs", &rows)?, 2);
    for id in ["a", "b"] {
        assert_eq!(s.get("docs", id)?, t.get("docs", id)?);
    }
    assert_eq!(t.get("docs", "a")?, Some(a));
    // Without contents, and an update through the upsert.
    let again = RecordColumns {
        ids: vec!["b".into()],
        vectors: vec![5.0, 6.0],
        metadata: vec![r#"{"n":1}"#.into()],
        contents: vec![],
    };
    assert_eq!(t.put_columns("docs", &again)?, 1);
    assert_eq!(t.get("docs", "b")?.ok_or("b")?.metadata, json!({"n": 1}));

    // Every bad batch is refused whole, with what is wrong.
    let bad = |ids: &[&str], vectors: Vec<f32>, metadata: &[&str]| RecordColumns {
        ids: ids.iter().map(|s| s.to_string()).collect(),
        vectors,
        metadata: metadata.iter().map(|s| s.to_string()).collect(),
        contents: vec![],
    };
    let cases = [
        bad(&["x", "y"], vec![0.0; 3], &["{}", "{}"]),
        bad(&["x", "y"], vec![0.0; 4], &["{}"]),
        bad(&["x", "y"], vec![0.0, 0.0, f32::NAN, 0.0], &["{}", "{}"]),
        bad(&["x", ""], vec![0.0; 4], &["{}", "{}"]),
        bad(&["x", "y"], vec![0.0; 4], &["{}", "[1]"]),
        bad(&["x", "y"], vec![0.0; 4], &["{}", "{\"a\":"]),
        bad(&["x", "y"], vec![0.0; 4], &["{}", "{} {}"]),
        bad(&["x", "y"], vec![0.0; 4], &["{}", r#"{"n":1e400}"#]),
        bad(&["x", "y"], vec![0.0; 4], &["{}", r#"{"a":{"k":1,"k":2}}"#]),
        bad(&["x", "y"], vec![0.0; 4], &["{}", r#"{"s":"\ud800"}"#]),
        bad(
            &["x", "y"],
            vec![0.0; 4],
            &[
                "{}",
                &format!("{{\"d\":{}1{}}}", "[".repeat(200), "]".repeat(200)),
            ],
        ),
    ];
    for (i, c) in cases.iter().enumerate() {
        let err = t
            .put_columns("docs", c)
            .expect_err(&format!("case {i} was accepted"));
        assert!(!err.to_string().is_empty());
    }
    assert!(matches!(
        t.put_columns("docs", &cases[2]),
        Err(StoreError::NotFinite { index: 0, .. })
    ));
    assert!(matches!(
        t.put_columns("docs", &cases[4]),
        Err(StoreError::Metadata(_))
    ));
    assert_eq!(t.get("docs", "x")?, None);
    assert_eq!(t.count("docs")?, 2);
    Ok(())
}

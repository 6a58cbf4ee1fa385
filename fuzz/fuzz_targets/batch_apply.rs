//! Change-batch validation and apply against a real store (a collection
//! and a table with a counter and a reference): any batch a peer could send
//! is applied or refused whole with an error, never a panic, and the store
//! stays readable.
#![no_main]

use std::cell::RefCell;

use arbitrary::{Arbitrary, Unstructured};
use libfuzzer_sys::fuzz_target;
use quiver_core::{
    Change, ChangeBatch, Covered, Hlc, SiteId, SnapshotMark, Strategy, Value, VersionVector,
};
use quiver_store::{CollectionSpec, Store};

struct Fixture {
    _dir: tempfile::TempDir,
    store: Store,
}

thread_local! {
    static STORE: RefCell<Fixture> = RefCell::new(fixture());
}

fn fixture() -> Fixture {
    let dir = tempfile::tempdir().unwrap();
    let mut store = Store::init(dir.path().join("f.db")).unwrap();
    store
        .create_collection(&CollectionSpec::new("docs", 2))
        .unwrap();
    store
        .execute_sql("CREATE TABLE notes(id TEXT PRIMARY KEY, body TEXT, n INTEGER DEFAULT 0)")
        .unwrap();
    store.add_table("notes", "default", Strategy::Lww).unwrap();
    Fixture { _dir: dir, store }
}

const TABLES: &[&str] = &["docs", "notes", "nope"];
const COLUMNS: &[&str] = &["vector", "metadata", "content", "body", "n", "id", "zz"];
const SHARDS: &[&str] = &["default", "memory", "x"];

fn value(u: &mut Unstructured) -> arbitrary::Result<Value> {
    Ok(match u.int_in_range(0..=5)? {
        0 => Value::Null,
        1 => Value::Integer(i64::arbitrary(u)?),
        2 => Value::Real(f64::arbitrary(u)?),
        3 => Value::Text(String::arbitrary(u)?),
        4 => Value::Text(r#"{"k":1}"#.into()),
        _ => Value::Blob(Vec::<u8>::arbitrary(u)?),
    })
}

fn site(u: &mut Unstructured) -> arbitrary::Result<SiteId> {
    Ok(SiteId([u.int_in_range(0..=3)?; 16]))
}

fn batch(u: &mut Unstructured) -> arbitrary::Result<ChangeBatch> {
    let mut changes = Vec::new();
    for _ in 0..u.int_in_range(0..=12)? {
        let mut replaces = VersionVector::new();
        if bool::arbitrary(u)? {
            replaces.set(site(u)?, u.int_in_range(0..=20)?);
        }
        changes.push(Change {
            table: u.choose(TABLES)?.to_string(),
            pk: match u.int_in_range(0..=3)? {
                0 => vec![],
                1 => vec![Value::Integer(7)],
                _ => vec![Value::Text(format!("k{}", u.int_in_range(0..=3)?))],
            },
            column: match bool::arbitrary(u)? {
                true => None,
                false => Some(u.choose(COLUMNS)?.to_string()),
            },
            value: value(u)?,
            hlc: Hlc::new(u.int_in_range(0..=u64::MAX >> 20)?, u16::arbitrary(u)?),
            site: site(u)?,
            db_version: u.int_in_range(0..=20)?,
            cl: u.int_in_range(0..=6)?,
            replaces,
        });
    }
    let mut covered = Vec::new();
    for _ in 0..u.int_in_range(0..=2)? {
        covered.push(Covered {
            table: u.choose(TABLES)?.to_string(),
            site: site(u)?,
            version: u.int_in_range(0..=30)?,
        });
    }
    let snapshot = if bool::arbitrary(u)? {
        let mut versions = VersionVector::new();
        versions.set(site(u)?, u.int_in_range(0..=30)?);
        Some(Box::new(SnapshotMark {
            table: u.choose(TABLES)?.to_string(),
            after: if bool::arbitrary(u)? { Some(value(u)?) } else { None },
            versions,
            rows: u64::arbitrary(u)?,
        }))
    } else {
        None
    };
    Ok(ChangeBatch {
        shard: u.choose(SHARDS)?.to_string(),
        changes,
        covered,
        snapshot,
    })
}

fuzz_target!(|data: &[u8]| {
    let mut u = Unstructured::new(data);
    let Ok(b) = batch(&mut u) else {
        return;
    };
    STORE.with(|f| {
        let mut f = f.borrow_mut();
        let _ = f.store.apply(&b);
        // The store still reads whatever was applied.
        f.store.count("docs").expect("the store stays readable");
    });
});

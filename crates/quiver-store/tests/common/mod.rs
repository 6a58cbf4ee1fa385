#![allow(dead_code)]

use quiver_core::Strategy;
use quiver_store::{ApplyReport, CollectionSpec, Store, StreamLimits};

/// Pulls into `dst` everything of `shard` that `src` has and `dst` lacks.
pub fn pull(dst: &mut Store, src: &Store, shard: &str) -> ApplyReport {
    pull_limited(dst, src, shard, StreamLimits::default())
}

pub fn pull_limited(
    dst: &mut Store,
    src: &Store,
    shard: &str,
    limits: StreamLimits,
) -> ApplyReport {
    // Only tables the source holds, as a responder does.
    let mut theirs = dst.table_versions(shard).unwrap();
    let held: Vec<String> = src
        .shard_tables(shard)
        .unwrap()
        .into_iter()
        .map(|t| t.name)
        .collect();
    theirs.retain(|t, _| held.contains(t));
    let mut total = ApplyReport::default();
    for batch in src.changes_since_tables(shard, &theirs, limits).unwrap() {
        total.add(&dst.apply(&batch.unwrap()).unwrap());
    }
    total
}

/// Both directions.
pub fn exchange(a: &mut Store, b: &mut Store, shard: &str) {
    pull(a, b, shard);
    pull(b, a, shard);
}

pub fn export(s: &Store, table: &str) -> String {
    let mut out = Vec::new();
    s.export(table, &mut out).unwrap();
    String::from_utf8(out).unwrap()
}

/// `n` stores in `dir`, each with collection `docs` (dim 3) and table `notes`.
pub fn stores(dir: &tempfile::TempDir, n: usize, strategy: Strategy) -> Vec<Store> {
    (0..n)
        .map(|i| {
            let mut s = Store::init(dir.path().join(format!("s{i}.db"))).unwrap();
            let mut spec = CollectionSpec::new("docs", 3);
            spec.strategy = strategy;
            s.create_collection(&spec).unwrap();
            s.execute_sql(
                "CREATE TABLE notes(id TEXT PRIMARY KEY, title TEXT, body TEXT, n INTEGER)",
            )
            .unwrap();
            s.add_table("notes", "default", strategy).unwrap();
            s
        })
        .collect()
}

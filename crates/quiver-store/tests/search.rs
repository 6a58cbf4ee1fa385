//! Vector search against a brute-force reference that reads the table
//! itself (through `Store::scan`, never through the search cache), after
//! every kind of write the cache must notice.

mod common;

use quiver_store::{CollectionSpec, Filter, Hit, Metric, Record, Store, StoreError};
use rusqlite::Connection;
use serde_json::{json, Value};

type R = Result<(), Box<dyn std::error::Error>>;

/// Deterministic numbers for vectors and metadata.
struct Gen(u64);

impl Gen {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
    fn unit(&mut self) -> f32 {
        (self.next() >> 40) as f32 / (1u64 << 24) as f32 * 2.0 - 1.0
    }
    fn vector(&mut self, dim: usize) -> Vec<f32> {
        (0..dim).map(|_| self.unit()).collect()
    }
    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
}

fn record(g: &mut Gen, i: usize, dim: usize) -> Record {
    let mut r = Record::new(&format!("r{i:05}"), g.vector(dim));
    let langs = ["en", "fr", "de"];
    let tags = ["a", "b", "c", "d", "e"];
    let tag = if g.below(4) == 0 {
        json!([tags[g.below(5) as usize], tags[g.below(5) as usize]])
    } else {
        json!(tags[g.below(5) as usize])
    };
    r.metadata = json!({
        "lang": langs[g.below(3) as usize],
        "year": 2010 + g.below(15),
        "tag": tag,
        "n": i,
        "author": {"name": if i % 7 == 3 { "ann" } else { "bob" }},
    });
    if i % 3 == 1 {
        r.content = Some(format!("content of {i}"));
    }
    r
}

fn store_with(
    dir: &tempfile::TempDir,
    file: &str,
    metric: Metric,
    dim: usize,
    n: usize,
    seed: u64,
) -> Store {
    let mut s = Store::init(dir.path().join(file)).unwrap();
    let mut spec = CollectionSpec::new("docs", dim);
    spec.metric = metric;
    s.create_collection(&spec).unwrap();
    let mut g = Gen(seed);
    let rows: Vec<Record> = (0..n).map(|i| record(&mut g, i, dim)).collect();
    s.put_many("docs", &rows).unwrap();
    s
}

fn reference_distance(metric: Metric, q: &[f32], v: &[f32]) -> f64 {
    let dot: f64 = q.iter().zip(v).map(|(a, b)| *a as f64 * *b as f64).sum();
    match metric {
        Metric::Cosine => {
            let nq: f64 = q.iter().map(|a| (*a as f64).powi(2)).sum::<f64>().sqrt();
            let nv: f64 = v.iter().map(|a| (*a as f64).powi(2)).sum::<f64>().sqrt();
            if nq == 0.0 || nv == 0.0 {
                1.0
            } else {
                1.0 - dot / (nq * nv)
            }
        }
        Metric::L2 => q
            .iter()
            .zip(v)
            .map(|(a, b)| (*a as f64 - *b as f64).powi(2))
            .sum::<f64>()
            .sqrt(),
        Metric::Dot => -dot,
    }
}

/// Every row of the table, read from SQLite.
fn rows(s: &Store) -> Vec<Record> {
    let mut out = Vec::new();
    s.scan("docs", |r| {
        out.push(r);
        Ok(())
    })
    .unwrap();
    out
}

/// Brute force over the table: (record, distance), nearest first, ties by id.
fn reference(
    s: &Store,
    metric: Metric,
    q: &[f32],
    k: usize,
    keep: &dyn Fn(&Value) -> bool,
) -> Vec<(Record, f64)> {
    let mut all: Vec<(Record, f64)> = rows(s)
        .into_iter()
        .filter(|r| keep(&r.metadata))
        .map(|r| {
            let d = reference_distance(metric, q, &r.vector);
            (r, d)
        })
        .collect();
    all.sort_by(|a, b| a.1.total_cmp(&b.1).then_with(|| a.0.id.cmp(&b.0.id)));
    all.truncate(k);
    all
}

/// Checks hits against the reference: same count, same distances rank by
/// rank, each hit's distance and fields those of its row, ids in the
/// reference's order wherever neighbours are not within rounding of each
/// other.
fn check(hits: &[Hit], want: &[(Record, f64)], what: &str) {
    assert_eq!(hits.len(), want.len(), "{what}: number of hits");
    let tol = |d: f64| 1e-4 * (1.0 + d.abs());
    let mut seen = std::collections::HashSet::new();
    for (i, (h, (r, d))) in hits.iter().zip(want).enumerate() {
        assert!(seen.insert(h.id.clone()), "{what}: {} returned twice", h.id);
        assert!(
            (h.distance as f64 - d).abs() < tol(*d),
            "{what}: rank {i} distance {} vs reference {d}",
            h.distance
        );
        let clear = |j: usize| (want[j].1 - d).abs() > 1e-3;
        let isolated = (i == 0 || clear(i - 1)) && (i + 1 >= want.len() || clear(i + 1));
        if isolated {
            assert_eq!(h.id, r.id, "{what}: rank {i}");
        }
        if h.id == r.id {
            assert_eq!(h.metadata, r.metadata, "{what}: metadata of {}", h.id);
            assert_eq!(h.content, r.content, "{what}: content of {}", h.id);
        }
    }
    for w in hits.windows(2) {
        assert!(
            (w[0].distance, &w[0].id) <= (w[1].distance, &w[1].id),
            "{what}: not ordered by (distance, id)"
        );
    }
}

fn filter(v: Value) -> Filter {
    Filter::from_json(&v).unwrap()
}

/// The filters of the tests, each with the same predicate written by hand.
#[allow(clippy::type_complexity)]
fn filters() -> Vec<(Value, Box<dyn Fn(&Value) -> bool>)> {
    let tag_is = |m: &Value, t: &str| match &m["tag"] {
        Value::Array(a) => a.iter().any(|x| x == t),
        x => x == t,
    };
    vec![
        (
            json!({"lang": "en"}),
            Box::new(|m: &Value| m["lang"] == "en"),
        ),
        (
            json!({"year": {"$gte": 2015, "$lt": 2018}}),
            Box::new(|m: &Value| {
                m["year"]
                    .as_u64()
                    .is_some_and(|y| (2015..2018).contains(&y))
            }),
        ),
        (
            json!({"tag": {"$in": ["a", "c"]}}),
            Box::new(move |m: &Value| tag_is(m, "a") || tag_is(m, "c")),
        ),
        (
            json!({"$or": [{"lang": "fr", "year": {"$gt": 2020}}, {"author.name": "ann"}]}),
            Box::new(|m: &Value| {
                (m["lang"] == "fr" && m["year"].as_u64().is_some_and(|y| y > 2020))
                    || m["author"]["name"] == "ann"
            }),
        ),
        (
            json!({"$and": [{"lang": {"$ne": "de"}}, {"n": {"$lte": 40}}]}),
            Box::new(|m: &Value| m["lang"] != "de" && m["n"].as_u64().is_some_and(|n| n <= 40)),
        ),
        (
            json!({"lang": "en", "tag": "b", "year": {"$in": [2012, 2013, 2014]}}),
            Box::new(move |m: &Value| {
                m["lang"] == "en"
                    && tag_is(m, "b")
                    && m["year"]
                        .as_u64()
                        .is_some_and(|y| (2012..=2014).contains(&y))
            }),
        ),
        (json!({"nothing": 1}), Box::new(|_: &Value| false)),
    ]
}

/// Searches for `queries` random vectors (and for some stored ones) with
/// and without every filter, comparing each answer with the reference.
fn compare_all(s: &Store, metric: Metric, dim: usize, seed: u64, what: &str) {
    let mut g = Gen(seed);
    let stored = rows(s);
    let mut queries: Vec<Vec<f32>> = (0..4).map(|_| g.vector(dim)).collect();
    queries.extend(stored.iter().step_by(97).take(2).map(|r| r.vector.clone()));
    for (qi, q) in queries.iter().enumerate() {
        for k in [1, 10, 40] {
            let hits = s.search("docs", q, k, None).unwrap();
            check(
                &hits,
                &reference(s, metric, q, k, &|_| true),
                &format!("{what} q{qi} k{k}"),
            );
        }
        for (fi, (fv, keep)) in filters().iter().enumerate() {
            let hits = s.search("docs", q, 10, Some(&filter(fv.clone()))).unwrap();
            check(
                &hits,
                &reference(s, metric, q, 10, keep.as_ref()),
                &format!("{what} q{qi} filter {fi} {fv}"),
            );
        }
    }
}

#[test]
fn every_metric_matches_brute_force_with_and_without_filters() {
    let dir = tempfile::tempdir().unwrap();
    for (i, metric) in [Metric::Cosine, Metric::L2, Metric::Dot]
        .into_iter()
        .enumerate()
    {
        // 37 dimensions: two full 16-lane chunks and a tail.
        let s = store_with(&dir, &format!("m{i}.db"), metric, 37, 600, 11 + i as u64);
        compare_all(&s, metric, 37, 99, &metric.to_string());
    }
}

#[test]
fn filters_apply_inside_the_scan_so_k_matches_come_back() -> R {
    let dir = tempfile::tempdir()?;
    let s = store_with(&dir, "a.db", Metric::L2, 8, 2000, 5);
    // About 1 row in 45 matches (en, 2012..2014, tag b): far fewer than
    // would survive filtering a top-10 afterwards.
    let (fv, keep) = filters().swap_remove(5);
    let matching = rows(&s).iter().filter(|r| keep(&r.metadata)).count();
    assert!((20..100).contains(&matching), "{matching} rows match");
    let q = Gen(3).vector(8);
    let hits = s.search("docs", &q, 10, Some(&filter(fv.clone())))?;
    assert_eq!(hits.len(), 10);
    assert!(hits.iter().all(|h| keep(&h.metadata)));
    check(
        &hits,
        &reference(&s, Metric::L2, &q, 10, keep.as_ref()),
        "selective filter",
    );
    // k beyond the matches: every match, and no more.
    let hits = s.search("docs", &q, 1000, Some(&filter(fv)))?;
    assert_eq!(hits.len(), matching);
    check(
        &hits,
        &reference(&s, Metric::L2, &q, 1000, keep.as_ref()),
        "k > matches",
    );
    // k beyond the collection; k = 0.
    assert_eq!(s.search("docs", &q, 5000, None)?.len(), 2000);
    assert_eq!(s.search("docs", &q, usize::MAX, None)?.len(), 2000);
    assert!(s.search("docs", &q, 0, None)?.is_empty());
    Ok(())
}

#[test]
fn parallel_scan_of_a_large_collection_matches_brute_force() {
    // 3,000 × 200 = 600,000 elements: above the threshold for threads.
    let dir = tempfile::tempdir().unwrap();
    let s = store_with(&dir, "big.db", Metric::Cosine, 200, 3000, 8);
    let mut g = Gen(17);
    for _ in 0..3 {
        let q = g.vector(200);
        check(
            &s.search("docs", &q, 25, None).unwrap(),
            &reference(&s, Metric::Cosine, &q, 25, &|_| true),
            "parallel",
        );
        let (fv, keep) = filters().swap_remove(0);
        check(
            &s.search("docs", &q, 25, Some(&filter(fv))).unwrap(),
            &reference(&s, Metric::Cosine, &q, 25, keep.as_ref()),
            "parallel filtered",
        );
    }
}

#[test]
fn equal_distances_are_ordered_by_id() -> R {
    let dir = tempfile::tempdir()?;
    let mut s = Store::init(dir.path().join("t.db"))?;
    let mut spec = CollectionSpec::new("docs", 2);
    spec.metric = Metric::L2;
    s.create_collection(&spec)?;
    // Inserted out of id order; each pair of ids has the same vector.
    for id in ["m", "c", "x", "a", "k", "b"] {
        let v = if "abc".contains(id) {
            vec![1.0, 0.0]
        } else {
            vec![0.0, 1.0]
        };
        s.put("docs", &Record::new(id, v))?;
    }
    let ids = |hits: Vec<Hit>| hits.into_iter().map(|h| h.id).collect::<Vec<_>>();
    assert_eq!(
        ids(s.search("docs", &[1.0, 0.0], 6, None)?),
        ["a", "b", "c", "k", "m", "x"]
    );
    assert_eq!(
        ids(s.search("docs", &[0.0, 1.0], 4, None)?),
        ["k", "m", "x", "a"]
    );
    assert_eq!(ids(s.search("docs", &[0.0, 1.0], 2, None)?), ["k", "m"]);
    Ok(())
}

#[test]
fn local_deletes_updates_and_rekeys_are_seen() -> R {
    let dir = tempfile::tempdir()?;
    let mut s = store_with(&dir, "a.db", Metric::L2, 16, 300, 21);
    let q = Gen(4).vector(16);
    let first = s.search("docs", &q, 10, None)?; // loads the cache
                                                 // Delete the three nearest, move a far row onto the query, retag one.
    for h in &first[..3] {
        assert!(s.delete("docs", &h.id)?);
    }
    let mut moved = s.get("docs", "r00299")?.unwrap();
    moved.vector = q.clone();
    s.put("docs", &moved)?;
    let mut retag = s.get("docs", &first[5].id)?.unwrap();
    retag.metadata = json!({"lang": "xx"});
    s.put("docs", &retag)?;
    let hits = s.search("docs", &q, 10, None)?;
    assert_eq!(hits[0].id, "r00299");
    assert!(hits[0].distance.abs() < 1e-6);
    assert!(!hits.iter().any(|h| first[..3].iter().any(|d| d.id == h.id)));
    check(
        &hits,
        &reference(&s, Metric::L2, &q, 10, &|_| true),
        "after deletes and updates",
    );
    let xx = s.search("docs", &q, 10, Some(&filter(json!({"lang": "xx"}))))?;
    assert_eq!(
        xx.iter().map(|h| h.id.as_str()).collect::<Vec<_>>(),
        [retag.id.as_str()]
    );
    // An UPDATE that changes the key keeps the rowid: the old id must go.
    s.execute_sql("UPDATE docs SET id = 'renamed' WHERE id = 'r00299'")?;
    let hits = s.search("docs", &q, 3, None)?;
    assert_eq!(hits[0].id, "renamed");
    assert!(!hits.iter().any(|h| h.id == "r00299"));
    // INSERT OR REPLACE deletes the old row without telling the hook.
    let blob: Vec<u8> = q.iter().map(|x| -x).flat_map(f32::to_le_bytes).collect();
    s.connection().execute(
        "INSERT OR REPLACE INTO docs(id, vector, metadata) VALUES ('renamed', ?1, '{}')",
        [blob],
    )?;
    let hits = s.search("docs", &q, 300, None)?;
    assert_eq!(hits.iter().filter(|h| h.id == "renamed").count(), 1);
    check(
        &hits,
        &reference(&s, Metric::L2, &q, 300, &|_| true),
        "after replace",
    );
    compare_all(&s, Metric::L2, 16, 5, "after local writes");
    Ok(())
}

#[test]
fn remote_changes_applied_by_sync_are_seen() -> R {
    let dir = tempfile::tempdir()?;
    let mut a = store_with(&dir, "a.db", Metric::Cosine, 12, 200, 31);
    let mut b = Store::init(dir.path().join("b.db"))?;
    let mut spec = CollectionSpec::new("docs", 12);
    spec.metric = Metric::Cosine;
    b.create_collection(&spec)?;
    common::pull(&mut b, &a, "default");
    let q = Gen(6).vector(12);
    check(
        &b.search("docs", &q, 10, None)?,
        &reference(&b, Metric::Cosine, &q, 10, &|_| true),
        "b after first pull",
    );
    // New rows, updates and deletes on a, pulled into b's warm cache.
    let mut g = Gen(77);
    let fresh: Vec<Record> = (1000..1100).map(|i| record(&mut g, i, 12)).collect();
    a.put_many("docs", &fresh)?;
    let mut near = a.get("docs", "r00010")?.unwrap();
    near.vector = q.iter().map(|x| x * 2.0).collect();
    a.put("docs", &near)?;
    for h in b.search("docs", &q, 4, None)? {
        if h.id != "r00010" {
            a.delete("docs", &h.id)?;
        }
    }
    common::pull(&mut b, &a, "default");
    assert_eq!(common::export(&a, "docs"), common::export(&b, "docs"));
    let hits = b.search("docs", &q, 10, None)?;
    assert_eq!(hits[0].id, "r00010");
    compare_all(&b, Metric::Cosine, 12, 8, "after remote changes");
    Ok(())
}

#[test]
fn writes_by_another_connection_are_seen_through_data_version() -> R {
    let dir = tempfile::tempdir()?;
    let s = store_with(&dir, "a.db", Metric::Dot, 4, 100, 41);
    let q: [f32; 4] = [1.0, 0.5, -0.5, 0.25];
    let before = s.search("docs", &q, 5, None)?;
    // Another process's driver: no hook of ours sees these writes.
    let other = Connection::open(s.path())?;
    let blob = |v: [f32; 4]| v.iter().flat_map(|x| x.to_le_bytes()).collect::<Vec<u8>>();
    other.execute(
        "INSERT INTO docs(id, vector, metadata) VALUES ('ext', ?1, '{\"lang\": \"ext\"}')",
        [blob([10.0, 5.0, -5.0, 2.5])],
    )?;
    other.execute("DELETE FROM docs WHERE id = ?1", [&before[1].id])?;
    other.execute(
        "UPDATE docs SET vector = ?1 WHERE id = ?2",
        rusqlite::params![blob([-1.0, -0.5, 0.5, -0.25]), &before[2].id],
    )?;
    drop(other);
    let hits = s.search("docs", &q, 5, None)?;
    assert_eq!(hits[0].id, "ext");
    assert_eq!(hits[0].metadata, json!({"lang": "ext"}));
    check(
        &hits,
        &reference(&s, Metric::Dot, &q, 5, &|_| true),
        "after external writes",
    );
    compare_all(&s, Metric::Dot, 4, 9, "after external writes");
    Ok(())
}

#[test]
fn rolled_back_writes_leave_nothing_behind() -> R {
    let dir = tempfile::tempdir()?;
    let s = store_with(&dir, "a.db", Metric::L2, 4, 100, 51);
    let q: [f32; 4] = [0.1, 0.2, 0.3, 0.4];
    let blob: Vec<u8> = q.iter().flat_map(|x| x.to_le_bytes()).collect();
    let top = s.search("docs", &q, 3, None)?;
    let c = s.connection();
    let rounds = [
        // Rolled back without a search inside the transaction.
        false, // Searched inside the transaction (which sees its own writes).
        true,
    ];
    for search_inside in rounds {
        c.execute_batch("BEGIN")?;
        c.execute("INSERT INTO docs(id, vector) VALUES ('ghost', ?1)", [&blob])?;
        c.execute("DELETE FROM docs WHERE id = ?1", [&top[0].id])?;
        c.execute(
            "UPDATE docs SET vector = ?1 WHERE id = ?2",
            rusqlite::params![&blob, &top[2].id],
        )?;
        c.execute(
            "INSERT OR REPLACE INTO docs(id, vector, metadata) VALUES (?1, ?2, '{}')",
            rusqlite::params![&top[1].id, &blob],
        )?;
        if search_inside {
            let inside = s.search("docs", &q, 3, None)?;
            assert_eq!(inside.len(), 3);
            assert!(
                inside.iter().all(|h| h.distance < 1e-6),
                "the transaction's own rows"
            );
            assert!(inside.iter().any(|h| h.id == "ghost"));
        }
        c.execute_batch("ROLLBACK")?;
        let hits = s.search("docs", &q, 3, None)?;
        assert_eq!(hits, top, "search_inside = {search_inside}");
        compare_all(&s, Metric::L2, 4, 12, "after rollback");
    }
    Ok(())
}

#[test]
fn a_cache_first_loaded_inside_a_rolled_back_transaction_is_reloaded() -> R {
    let dir = tempfile::tempdir()?;
    let s = store_with(&dir, "a.db", Metric::L2, 4, 50, 61);
    let q = [0.0; 4];
    let c = s.connection();
    c.execute_batch("BEGIN")?;
    c.execute(
        "INSERT INTO docs(id, vector) VALUES ('ghost', zeroblob(16))",
        [],
    )?;
    assert_eq!(s.search("docs", &q, 1, None)?[0].id, "ghost");
    c.execute_batch("ROLLBACK")?;
    let hits = s.search("docs", &q, 1, None)?;
    assert_ne!(hits[0].id, "ghost");
    check(
        &hits,
        &reference(&s, Metric::L2, &q, 1, &|_| true),
        "after rollback",
    );
    Ok(())
}

#[test]
fn bulk_writes_past_the_dirty_limit_reload_the_collection() -> R {
    let dir = tempfile::tempdir()?;
    let mut s = store_with(&dir, "a.db", Metric::L2, 4, 100, 71);
    let q = [0.5, 0.5, 0.5, 0.5];
    s.search("docs", &q, 1, None)?;
    let mut g = Gen(5);
    let more: Vec<Record> = (100..5200).map(|i| record(&mut g, i, 4)).collect();
    s.put_many("docs", &more)?;
    assert_eq!(s.search_stats("docs")?.rows, 5200);
    compare_all(&s, Metric::L2, 4, 13, "after bulk insert");
    Ok(())
}

#[test]
fn a_recreated_collection_is_not_served_from_the_old_cache() -> R {
    let dir = tempfile::tempdir()?;
    let mut s = store_with(&dir, "a.db", Metric::L2, 4, 20, 81);
    s.search("docs", &[0.0; 4], 1, None)?;
    s.drop_collection("docs")?;
    // Same name, shape and metric: only the schema change tells them apart.
    let mut spec = CollectionSpec::new("docs", 4);
    spec.metric = Metric::L2;
    s.create_collection(&spec)?;
    s.put("docs", &Record::new("only", vec![3.0, 4.0, 0.0, 0.0]))?;
    let hits = s.search("docs", &[0.0; 4], 5, None)?;
    assert_eq!(hits.len(), 1);
    assert_eq!((hits[0].id.as_str(), hits[0].distance), ("only", 5.0));
    Ok(())
}

#[test]
fn stats_report_the_matrix_size() -> R {
    let dir = tempfile::tempdir()?;
    let s = store_with(&dir, "a.db", Metric::Cosine, 64, 250, 91);
    let st = s.search_stats("docs")?;
    assert_eq!((st.rows, st.dim), (250, 64));
    assert_eq!(st.matrix_bytes, 250 * 64 * 4);
    assert!(st.total_bytes > st.matrix_bytes + 250 * 50, "{st:?}");
    Ok(())
}

#[test]
fn bad_queries_are_refused() -> R {
    let dir = tempfile::tempdir()?;
    let s = store_with(&dir, "a.db", Metric::Cosine, 4, 10, 1);
    match s.search("docs", &[1.0, 2.0, 3.0], 5, None) {
        Err(StoreError::Dimension {
            expected: 4,
            got: 3,
            ..
        }) => {}
        other => panic!("wrong dimension: {other:?}"),
    }
    match s.search("docs", &[1.0, f32::NAN, 3.0, 4.0], 5, None) {
        Err(StoreError::NotFinite { index: 1, .. }) => {}
        other => panic!("NaN: {other:?}"),
    }
    match s.search("docs", &[1.0, 2.0, 3.0, f32::INFINITY], 5, None) {
        Err(StoreError::NotFinite { index: 3, .. }) => {}
        other => panic!("infinity: {other:?}"),
    }
    assert!(matches!(
        s.search("nope", &[0.0; 4], 5, None),
        Err(StoreError::NoSuchCollection(_))
    ));
    for bad in [
        json!({"year": {"$between": [1, 2]}}),
        json!({"$or": "x"}),
        json!({"tag": {"$in": 3}}),
        json!("lang = en"),
    ] {
        let e = Filter::from_json(&bad).unwrap_err();
        assert!(matches!(e, StoreError::InvalidValue(_)), "{bad}: {e}");
    }
    Ok(())
}

#[test]
fn a_store_with_a_search_cache_can_move_to_another_thread() -> R {
    fn assert_send<T: Send>() {}
    assert_send::<Store>();
    let dir = tempfile::tempdir()?;
    let s = store_with(&dir, "a.db", Metric::L2, 4, 10, 3);
    s.search("docs", &[0.0; 4], 1, None)?;
    let hits =
        std::thread::spawn(move || s.search("docs", &[0.0; 4], 3, None).map(|h| h.len())).join();
    assert_eq!(hits.map_err(|_| "search thread panicked")??, 3);
    Ok(())
}

//! The merge engine through in-process sync of real stores.

mod common;

use common::{exchange, export, pull, pull_limited, stores};
use quiver_core::{Change, ChangeBatch, Hlc, Strategy, Value};
use quiver_store::{Record, Resolution, StoreError, StreamLimits};
use serde_json::json;

type R = Result<(), Box<dyn std::error::Error>>;

fn rec(id: &str, v: [f32; 3], meta: serde_json::Value) -> Record {
    let mut r = Record::new(id, v.to_vec());
    r.metadata = meta;
    r
}

#[test]
fn two_way_sync_without_conflicts() -> R {
    let dir = tempfile::tempdir()?;
    let mut s = stores(&dir, 2, Strategy::Lww);
    let (a, b) = s.split_at_mut(1);
    let (a, b) = (&mut a[0], &mut b[0]);
    a.put("docs", &rec("x", [1.0, 2.0, 3.0], json!({"from": "a"})))?;
    b.put("docs", &rec("y", [4.0, 5.0, 6.0], json!({"from": "b"})))?;
    exchange(a, b, "default");
    assert_eq!(export(a, "docs"), export(b, "docs"));
    assert_eq!(a.count("docs")?, 2);
    // Nothing left to send either way.
    assert_eq!(pull(a, b, "default").applied, 0);
    Ok(())
}

fn concurrent_put(strategy: Strategy) -> (tempfile::TempDir, Vec<quiver_store::Store>) {
    let dir = tempfile::tempdir().unwrap();
    let mut s = stores(&dir, 2, strategy);
    s[0].put(
        "docs",
        &rec("x", [0.0, 0.0, 0.0], json!({"a": 1, "shared": "a"})),
    )
    .unwrap();
    std::thread::sleep(std::time::Duration::from_millis(3));
    s[1].put(
        "docs",
        &rec("x", [2.0, 4.0, 6.0], json!({"b": 2, "shared": "b"})),
    )
    .unwrap();
    let (a, b) = s.split_at_mut(1);
    exchange(&mut a[0], &mut b[0], "default");
    (dir, s)
}

#[test]
fn lww_keeps_the_newest() {
    let (_d, s) = concurrent_put(Strategy::Lww);
    assert_eq!(export(&s[0], "docs"), export(&s[1], "docs"));
    assert_eq!(
        s[0].get("docs", "x").unwrap().unwrap().vector,
        vec![2.0, 4.0, 6.0]
    );
    assert!(
        !s[0].conflicts(None).unwrap().is_empty(),
        "the conflict is recorded"
    );
}

#[test]
fn fww_keeps_the_oldest() {
    let (_d, s) = concurrent_put(Strategy::Fww);
    assert_eq!(export(&s[0], "docs"), export(&s[1], "docs"));
    assert_eq!(
        s[1].get("docs", "x").unwrap().unwrap().vector,
        vec![0.0, 0.0, 0.0]
    );
}

#[test]
fn merge_means_vectors_and_merges_metadata() {
    let (_d, s) = concurrent_put(Strategy::Merge);
    assert_eq!(export(&s[0], "docs"), export(&s[1], "docs"));
    let r = s[0].get("docs", "x").unwrap().unwrap();
    assert_eq!(r.vector, vec![1.0, 2.0, 3.0]);
    assert_eq!(r.metadata, json!({"a": 1, "b": 2, "shared": "b"}));
}

#[test]
fn local_and_remote_wins_decide_by_side() {
    for (strategy, expect) in [
        (Strategy::LocalWins, [0.0f32; 3]),
        (Strategy::RemoteWins, [2.0, 4.0, 6.0]),
    ] {
        let dir = tempfile::tempdir().unwrap();
        let mut s = stores(&dir, 2, strategy);
        s[0].put("docs", &rec("x", [0.0; 3], json!({}))).unwrap();
        s[1].put("docs", &rec("x", [2.0, 4.0, 6.0], json!({})))
            .unwrap();
        let (a, b) = s.split_at_mut(1);
        let r = pull(&mut a[0], &b[0], "default");
        assert!(r.conflicts_detected > 0);
        assert_eq!(
            a[0].get("docs", "x").unwrap().unwrap().vector,
            expect.to_vec(),
            "{strategy}"
        );
    }
}

#[test]
fn manual_conflict_stays_open_until_resolved_and_resolution_wins_everywhere() -> R {
    let (_d, mut s) = concurrent_put(Strategy::Manual);
    assert_eq!(
        export(&s[0], "docs"),
        export(&s[1], "docs"),
        "shows the lww winner meanwhile"
    );
    let open = s[0].get_unresolved_conflicts(Some("default"))?;
    assert_eq!(open.iter().filter(|c| c.column == "vector").count(), 1);
    let c = open.iter().find(|c| c.column == "vector").unwrap().clone();
    assert_eq!(c.versions.len(), 2);
    // The older version (the one lww did not pick) is kept on request.
    let loser = c
        .versions
        .iter()
        .find(|v| v.value == json!([0.0, 0.0, 0.0]))
        .unwrap();
    let err = s[0]
        .resolve(c.id, Resolution::Keep("nope".into()))
        .unwrap_err();
    assert!(matches!(err, StoreError::NoSuchVersion { .. }), "{err}");
    s[0].resolve(c.id, Resolution::Keep(loser.version.clone()))?;
    assert!(matches!(
        s[0].resolve(c.id, Resolution::Keep(loser.version.clone())),
        Err(StoreError::ConflictResolved { .. })
    ));
    for o in s[0].get_unresolved_conflicts(None)? {
        s[0].resolve(
            o.id,
            Resolution::Value(Value::Text("{\"done\":true}".into())),
        )?;
    }
    let (a, b) = s.split_at_mut(1);
    exchange(&mut a[0], &mut b[0], "default");
    assert_eq!(export(&s[0], "docs"), export(&s[1], "docs"));
    assert_eq!(s[1].get("docs", "x")?.unwrap().vector, vec![0.0; 3]);
    assert!(
        s[1].get_unresolved_conflicts(None)?.is_empty(),
        "the resolution closed it on the peer too"
    );
    Ok(())
}

#[test]
fn delete_wins_over_concurrent_update_and_reinsert_resurrects() -> R {
    let dir = tempfile::tempdir()?;
    let mut s = stores(&dir, 2, Strategy::Lww);
    s[0].put("docs", &rec("x", [1.0; 3], json!({})))?;
    let (a, b) = s.split_at_mut(1);
    let (a, b) = (&mut a[0], &mut b[0]);
    exchange(a, b, "default");
    a.delete("docs", "x")?;
    std::thread::sleep(std::time::Duration::from_millis(3));
    b.put("docs", &rec("x", [9.0; 3], json!({"late": true})))?; // newer stamp, but concurrent
    exchange(a, b, "default");
    assert_eq!(a.get("docs", "x")?, None);
    assert_eq!(b.get("docs", "x")?, None);
    // An insert after seeing the delete brings it back everywhere.
    b.put("docs", &rec("x", [5.0; 3], json!({})))?;
    exchange(a, b, "default");
    assert_eq!(a.get("docs", "x")?.unwrap().vector, vec![5.0; 3]);
    assert_eq!(export(a, "docs"), export(b, "docs"));
    Ok(())
}

#[test]
fn concurrent_writes_to_different_columns_both_survive() -> R {
    let dir = tempfile::tempdir()?;
    let mut s = stores(&dir, 2, Strategy::Lww);
    s[0].execute_sql("INSERT INTO notes VALUES ('n', 'title', 'body', 0)")?;
    let (a, b) = s.split_at_mut(1);
    let (a, b) = (&mut a[0], &mut b[0]);
    exchange(a, b, "default");
    a.execute_sql("UPDATE notes SET title = 'title by a' WHERE id = 'n'")?;
    b.execute_sql("UPDATE notes SET body = 'body by b', n = 7 WHERE id = 'n'")?;
    let ra = pull(a, b, "default");
    assert_eq!(
        ra.conflicts_detected, 0,
        "different columns do not conflict"
    );
    pull(b, a, "default");
    assert_eq!(export(a, "notes"), export(b, "notes"));
    assert_eq!(
        export(a, "notes").trim(),
        r#"{"body":"body by b","id":"n","n":7,"title":"title by a"}"#
    );
    Ok(())
}

#[test]
fn relay_keeps_the_origin() -> R {
    let dir = tempfile::tempdir()?;
    let mut s = stores(&dir, 3, Strategy::Lww);
    s[0].put("docs", &rec("x", [1.0; 3], json!({})))?;
    let a_site = s[0].site_id();
    let (ab, c) = s.split_at_mut(2);
    let (a, b) = ab.split_at_mut(1);
    pull(&mut b[0], &a[0], "default");
    pull(&mut c[0], &b[0], "default");
    assert_eq!(export(&c[0], "docs"), export(&a[0], "docs"));
    let changes: Vec<Change> = c[0]
        .changes_since("default", &Default::default())?
        .flat_map(|b| b.unwrap().changes)
        .collect();
    assert!(
        changes.iter().all(|ch| ch.site == a_site),
        "C relays A's writes as A's"
    );
    // C claims A's versions, so A has nothing new to send it.
    assert_eq!(
        c[0].version_vector("default")?.get(&a_site),
        a[0].version_vector("default")?.get(&a_site)
    );
    Ok(())
}

#[test]
fn duplicate_and_split_delivery_have_no_effect() -> R {
    let dir = tempfile::tempdir()?;
    let mut s = stores(&dir, 2, Strategy::Merge);
    let many: Vec<Record> = (0..50)
        .map(|i| rec(&format!("r{i:02}"), [i as f32; 3], json!({"i": i})))
        .collect();
    s[0].put_many("docs", &many)?;
    let batches: Vec<ChangeBatch> = s[0]
        .changes_since_tables(
            "default",
            &s[1].table_versions("default")?,
            StreamLimits {
                max_changes: 7,
                max_bytes: 1 << 20,
            },
        )?
        .collect::<Result<_, _>>()?;
    assert!(batches.len() > 3, "split into several batches");
    for b in &batches {
        s[1].apply(b)?;
    }
    let once = export(&s[1], "docs");
    for b in batches.iter().rev() {
        let r = s[1].apply(b)?;
        assert_eq!(r.applied, 0, "a second delivery changes nothing");
    }
    assert_eq!(export(&s[1], "docs"), once);
    assert_eq!(once, export(&s[0], "docs"));
    let (a, b) = s.split_at_mut(1);
    assert_eq!(
        pull_limited(&mut b[0], &a[0], "default", StreamLimits::default()).applied,
        0
    );
    Ok(())
}

fn change(table: &str, col: Option<&str>, value: Value) -> Change {
    Change {
        table: table.into(),
        pk: vec![Value::Text("bad".into())],
        column: col.map(Into::into),
        value,
        hlc: Hlc::new(1, 0),
        site: quiver_core::SiteId([7; 16]),
        db_version: 1,
        cl: 1,
        replaces: Default::default(),
    }
}

#[test]
fn bad_batches_are_refused_whole() -> R {
    let dir = tempfile::tempdir()?;
    let mut s = stores(&dir, 1, Strategy::Lww);
    let s = &mut s[0];
    s.execute_sql("CREATE TABLE other(id TEXT PRIMARY KEY, x TEXT)")?;
    s.add_table("other", "elsewhere", Strategy::Lww)?;
    let good = vec![
        change("docs", None, Value::Null),
        change("docs", Some("vector"), Value::Blob(vec![0; 12])),
    ];
    let cases: Vec<(Vec<Change>, &str)> = vec![
        // A table or column not known yet is held (tests/schema.rs), but
        // a name that could never be one is refused.
        (vec![change("no pe", None, Value::Null)], "invalid name"),
        (
            vec![change("docs", Some("col;our"), Value::Text("x".into()))],
            "invalid name",
        ),
        (
            vec![change("docs", Some("vector"), Value::Blob(vec![0; 8]))],
            "dimensions",
        ),
        (
            vec![change("docs", Some("vector"), Value::Text("x".into()))],
            "got a TEXT",
        ),
        (
            vec![change(
                "docs",
                Some("vector"),
                Value::Blob(
                    [f32::NAN, 0.0, 0.0]
                        .iter()
                        .flat_map(|f| f.to_le_bytes())
                        .collect(),
                ),
            )],
            "finite",
        ),
        (
            vec![change("docs", Some("metadata"), Value::Text("[1]".into()))],
            "JSON object",
        ),
        (
            vec![change("notes", Some("n"), Value::Text("seven".into()))],
            "declared INTEGER",
        ),
        (vec![change("other", None, Value::Null)], "belongs to shard"),
    ];
    for (bad, why) in cases {
        let mut changes = good.clone();
        changes.extend(bad);
        let batch = ChangeBatch {
            snapshot: None,
            shard: "default".into(),
            changes,
            covered: vec![],
        };
        let err = s.apply(&batch).unwrap_err();
        assert!(err.to_string().contains(why), "{err} should mention {why}");
        assert_eq!(s.count("docs")?, 0, "nothing of a refused batch is applied");
    }
    // A stamp from far in the future is refused instead of dragging the clock.
    let mut far = good.clone();
    for c in &mut far {
        c.hlc = Hlc::new(quiver_store::wall_ms() + 3_600_000, 0);
    }
    let err = s
        .apply(&ChangeBatch {
            snapshot: None,
            shard: "default".into(),
            changes: far,
            covered: vec![],
        })
        .unwrap_err();
    assert!(
        err.to_string().contains("ahead of the local wall clock"),
        "{err}"
    );
    assert_eq!(s.count("docs")?, 0);
    Ok(())
}

#[test]
fn events_report_remote_changes_and_conflicts() -> R {
    let dir = tempfile::tempdir()?;
    let mut s = stores(&dir, 2, Strategy::Lww);
    let rx = s[1].subscribe();
    s[0].put("docs", &rec("x", [1.0; 3], json!({})))?;
    s[1].put("docs", &rec("x", [2.0; 3], json!({})))?;
    let (a, b) = s.split_at_mut(1);
    pull(&mut b[0], &a[0], "default");
    let events: Vec<_> = rx.try_iter().collect();
    assert!(
        events
            .iter()
            .any(|e| matches!(e, quiver_store::StoreEvent::Conflict { .. })),
        "{events:?}"
    );
    Ok(())
}

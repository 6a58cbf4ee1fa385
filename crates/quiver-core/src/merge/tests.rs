use proptest::prelude::{any, prop, prop_assert_eq, proptest};

use super::*;
use crate::SiteId;

fn site(n: u8) -> SiteId {
    SiteId([n; 16])
}

fn ver(s: u8, dbv: u64, ms: u64, value: Value, replaces: &[(u8, u64)]) -> Version {
    Version {
        dot: Dot::new(site(s), dbv),
        hlc: Hlc::new(ms, 0),
        cl: 1,
        replaces: replaces.iter().map(|(s, v)| (site(*s), *v)).collect(),
        value,
    }
}

fn int(i: i64) -> Value {
    Value::Integer(i)
}

fn vec_blob(v: &[f32]) -> Value {
    Value::Blob(v.iter().flat_map(|f| f.to_le_bytes()).collect())
}

#[test]
fn fast_forward_when_writer_had_seen_held() {
    let held = vec![ver(1, 1, 10, int(1), &[])];
    let inc = ver(2, 1, 5, int(2), &[(1, 1)]);
    let out = merge_cell(
        &held,
        inc,
        &VersionVector::new(),
        Strategy::Fww,
        ColumnKind::Other,
    );
    assert_eq!(out.verdict, Verdict::FastForward);
    // Even under fww an older stamp replaces when it causally follows.
    assert_eq!(out.visible, int(2));
}

#[test]
fn duplicate_when_known_or_held() {
    let held = vec![ver(1, 1, 10, int(1), &[])];
    let out = merge_cell(
        &held,
        held[0].clone(),
        &VersionVector::new(),
        Strategy::Lww,
        ColumnKind::Other,
    );
    assert_eq!(out.verdict, Verdict::Duplicate);
    let known: VersionVector = [(site(3), 4)].into_iter().collect();
    let old = ver(3, 2, 99, int(9), &[]);
    let out = merge_cell(&held, old, &known, Strategy::Lww, ColumnKind::Other);
    assert_eq!(out.verdict, Verdict::Duplicate);
    assert_eq!(out.visible, int(1));
}

#[test]
fn lww_and_fww_pick_by_hlc_then_site() {
    let a = ver(1, 1, 10, int(1), &[]);
    let b = ver(2, 1, 20, int(2), &[]);
    let lww = merge_cell(
        std::slice::from_ref(&a),
        b.clone(),
        &VersionVector::new(),
        Strategy::Lww,
        ColumnKind::Other,
    );
    assert_eq!((lww.verdict, lww.visible), (Verdict::Concurrent, int(2)));
    let fww = merge_cell(
        std::slice::from_ref(&a),
        b.clone(),
        &VersionVector::new(),
        Strategy::Fww,
        ColumnKind::Other,
    );
    assert_eq!(fww.visible, int(1));
    // Equal stamps: the greater site id wins under lww.
    let c = ver(3, 1, 10, int(3), &[]);
    let tie = merge_cell(
        &[a],
        c,
        &VersionVector::new(),
        Strategy::Lww,
        ColumnKind::Other,
    );
    assert_eq!(tie.visible, int(3));
}

#[test]
fn fww_keeps_losers_so_a_later_replacement_does_not_resurrect_the_wrong_winner() {
    // a (older) and b are concurrent: fww shows a. Then c replaces b only:
    // a is still concurrent with c and, being older, still wins.
    let b = ver(2, 1, 10, int(2), &[]);
    let a = ver(1, 1, 20, int(1), &[]);
    let held = merge_cell(
        std::slice::from_ref(&b),
        a,
        &VersionVector::new(),
        Strategy::Fww,
        ColumnKind::Other,
    );
    assert_eq!(held.visible, int(2));
    let c = ver(2, 2, 30, int(3), &[(2, 1)]);
    let out = merge_cell(
        &held.versions,
        c,
        &VersionVector::new(),
        Strategy::Fww,
        ColumnKind::Other,
    );
    assert_eq!(out.verdict, Verdict::Concurrent);
    assert_eq!(out.visible, int(1));
}

#[test]
fn local_and_remote_wins() {
    let a = ver(1, 1, 10, int(1), &[]);
    let b = ver(2, 1, 5, int(2), &[]);
    let local = merge_cell(
        std::slice::from_ref(&a),
        b.clone(),
        &VersionVector::new(),
        Strategy::LocalWins,
        ColumnKind::Other,
    );
    assert_eq!(local.visible, int(1));
    let remote = merge_cell(
        &[a],
        b,
        &VersionVector::new(),
        Strategy::RemoteWins,
        ColumnKind::Other,
    );
    assert_eq!(remote.visible, int(2));
}

#[test]
fn manual_keeps_every_version_and_shows_lww() {
    let a = ver(1, 1, 10, int(1), &[]);
    let b = ver(2, 1, 20, int(2), &[]);
    let out = merge_cell(
        &[a],
        b,
        &VersionVector::new(),
        Strategy::Manual,
        ColumnKind::Other,
    );
    assert_eq!(out.versions.len(), 2);
    assert_eq!(out.visible, int(2));
    // A resolution that saw both replaces both.
    let r = ver(1, 2, 30, int(7), &[(1, 1), (2, 1)]);
    let done = merge_cell(
        &out.versions,
        r,
        &VersionVector::new(),
        Strategy::Manual,
        ColumnKind::Other,
    );
    assert_eq!(done.verdict, Verdict::FastForward);
    assert_eq!(done.versions.len(), 1);
    assert_eq!(done.visible, int(7));
}

#[test]
fn merge_means_vectors_and_merges_json_keys() {
    let a = ver(1, 1, 10, vec_blob(&[1.0, 2.0]), &[]);
    let b = ver(2, 1, 20, vec_blob(&[3.0, 4.0]), &[]);
    let out = merge_cell(
        &[a],
        b,
        &VersionVector::new(),
        Strategy::Merge,
        ColumnKind::Vector,
    );
    assert_eq!(out.visible, vec_blob(&[2.0, 3.0]));

    let a = ver(1, 1, 10, Value::Text(r#"{"x":1,"y":1}"#.into()), &[]);
    let b = ver(2, 1, 20, Value::Text(r#"{"y":2,"z":2}"#.into()), &[]);
    let out = merge_cell(
        &[a],
        b,
        &VersionVector::new(),
        Strategy::Merge,
        ColumnKind::JsonObject,
    );
    assert_eq!(out.visible, Value::Text(r#"{"x":1,"y":2,"z":2}"#.into()));
}

#[test]
fn partial_replacement_keeps_the_unseen_version() {
    let a = ver(1, 1, 10, vec_blob(&[0.0]), &[]);
    let b = ver(2, 1, 20, vec_blob(&[2.0]), &[]);
    let held = merge_cell(
        &[a],
        b,
        &VersionVector::new(),
        Strategy::Merge,
        ColumnKind::Vector,
    )
    .versions;
    // c saw a but not b: it replaces a and stays concurrent with b.
    let c = ver(3, 1, 30, vec_blob(&[4.0]), &[(1, 1)]);
    let out = merge_cell(
        &held,
        c,
        &VersionVector::new(),
        Strategy::Merge,
        ColumnKind::Vector,
    );
    assert_eq!(out.verdict, Verdict::Concurrent);
    assert_eq!(out.visible, vec_blob(&[3.0]));
}

#[test]
fn stale_life_is_ignored() {
    let mut held = ver(1, 2, 10, int(1), &[]);
    held.cl = 3;
    let old = ver(2, 1, 50, int(2), &[]);
    let out = merge_cell(
        &[held],
        old,
        &VersionVector::new(),
        Strategy::Lww,
        ColumnKind::Other,
    );
    assert_eq!(out.verdict, Verdict::Stale);
    assert_eq!(out.visible, int(1));
}

#[test]
fn existence_follows_causal_length() {
    let alive = ver(1, 1, 10, Value::Null, &[]);
    let mut deleted = ver(2, 1, 5, Value::Null, &[(1, 1)]);
    deleted.cl = 2;
    let mut concurrent_update = ver(3, 1, 50, Value::Null, &[]);
    concurrent_update.cl = 1;
    let none = VersionVector::new();
    let d = merge_existence(Some(&alive), deleted.clone(), &none);
    assert!(d.new_life && d.record.cl == 2);
    // An update of the old life loses against the delete.
    let u = merge_existence(Some(&d.record), concurrent_update, &none);
    assert_eq!(u.verdict, Verdict::Stale);
    // A re-insert after seeing the delete resurrects.
    let mut reinsert = ver(1, 2, 60, Value::Null, &[(1, 1), (2, 1)]);
    reinsert.cl = 3;
    let r = merge_existence(Some(&d.record), reinsert, &none);
    assert!(r.new_life && r.record.cl % 2 == 1);
}

#[test]
fn strategy_names_round_trip() {
    for s in Strategy::ALL {
        assert_eq!(s.as_str().parse::<Strategy>().unwrap(), s);
    }
    assert!("newest".parse::<Strategy>().is_err());
}

/// Concurrent versions of one cell delivered in any order, any number of
/// times, end in the same visible value under every convergent strategy.
fn arb_versions() -> impl proptest::strategy::Strategy<Value = Vec<Version>> {
    use proptest::strategy::Strategy as _;
    prop::collection::vec(
        (0u8..4, 1u64..50, prop::collection::vec(-10f32..10.0, 3)),
        1..6,
    )
    .prop_map(|raw| {
        let mut seen = std::collections::HashSet::new();
        raw.into_iter()
            .filter(|(s, _, _)| seen.insert(*s))
            .enumerate()
            .map(|(i, (s, ms, v))| ver(s, i as u64 + 1, ms, vec_blob(&v), &[]))
            .collect()
    })
}

fn fold(order: &[Version], strategy: Strategy, kind: ColumnKind) -> Value {
    let mut held: Vec<Version> = Vec::new();
    let mut visible = Value::Null;
    for v in order {
        let out = merge_cell(&held, v.clone(), &VersionVector::new(), strategy, kind);
        held = out.versions;
        visible = out.visible;
    }
    visible
}

proptest! {
    #[test]
    fn order_of_arrival_does_not_matter(versions in arb_versions(), seed in any::<u64>(), dup in 0usize..3) {
        let mut shuffled = versions.clone();
        // A deterministic shuffle from the seed, with some duplicates.
        let mut x = seed | 1;
        for i in (1..shuffled.len()).rev() {
            x ^= x << 13; x ^= x >> 7; x ^= x << 17;
            shuffled.swap(i, (x % (i as u64 + 1)) as usize);
        }
        for i in 0..dup.min(shuffled.len()) {
            let d = shuffled[i].clone();
            shuffled.push(d);
        }
        for strategy in [Strategy::Lww, Strategy::Fww, Strategy::Merge, Strategy::Manual] {
            prop_assert_eq!(
                fold(&versions, strategy, ColumnKind::Vector),
                fold(&shuffled, strategy, ColumnKind::Vector),
                "strategy {}", strategy
            );
        }
    }
}

/// Folds versions into a cell in the given order.
fn fold_cell(order: &[Version], strategy: Strategy) -> Value {
    let mut held: Vec<Version> = Vec::new();
    for v in order {
        held = merge_cell(
            &held,
            v.clone(),
            &VersionVector::new(),
            strategy,
            ColumnKind::Other,
        )
        .versions;
    }
    visible_value(&held, strategy, ColumnKind::Other)
}

#[test]
fn counter_totals_of_each_site_add_up_in_any_order() {
    // Site 1 counts to 3 then 5; site 2 to 4; each total replaces only its own.
    let vs = [
        ver(1, 1, 10, int(3), &[]),
        ver(2, 1, 11, int(4), &[(1, 1)]),
        ver(1, 2, 12, int(5), &[(1, 1), (2, 1)]),
    ];
    for order in [[0, 1, 2], [2, 1, 0], [1, 2, 0], [2, 0, 1]] {
        let seq: Vec<Version> = order.iter().map(|i| vs[*i].clone()).collect();
        assert_eq!(fold_cell(&seq, Strategy::Counter), int(9), "{order:?}");
    }
    // Seen again: no effect.
    let held = merge_cell(
        &[],
        vs[2].clone(),
        &VersionVector::new(),
        Strategy::Counter,
        ColumnKind::Other,
    )
    .versions;
    let again = merge_cell(
        &held,
        vs[0].clone(),
        &VersionVector::new(),
        Strategy::Counter,
        ColumnKind::Other,
    );
    assert_eq!(again.verdict, Verdict::Duplicate);
    assert_eq!(again.visible, int(5));
}

#[test]
fn max_and_min_pick_by_value_among_concurrent_versions() {
    let a = ver(1, 1, 10, int(7), &[]);
    let b = ver(2, 1, 20, int(3), &[]);
    for (x, y) in [(&a, &b), (&b, &a)] {
        let seq = [x.clone(), y.clone()];
        assert_eq!(fold_cell(&seq, Strategy::Max), int(7));
        assert_eq!(fold_cell(&seq, Strategy::Min), int(3));
    }
    // A write that saw the maximum replaces it, even with a lower value.
    let c = ver(3, 1, 30, int(1), &[(1, 1), (2, 1)]);
    assert_eq!(fold_cell(&[a, b, c], Strategy::Max), int(1));
}

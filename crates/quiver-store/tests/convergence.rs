//! Property test: random writes on 3-5 stores (through the API and through
//! plain SQL), random exchanges that may be split, repeated or cut short;
//! after everyone exchanges until quiescent, every export is identical.
//!
//! `QUIVER_PROPTEST_CASES=100000 cargo test -p quiver-store --release --test convergence`
//! runs a long campaign.

mod common;

use common::{export, stores};
use proptest::prelude::{
    any, prop, prop_assert_eq, prop_oneof, proptest, Just, ProptestConfig, TestCaseError,
};
use proptest::strategy::Strategy as _;
use quiver_core::{ChangeBatch, Strategy};
use quiver_store::{Record, Store, StreamLimits};

#[derive(Debug, Clone)]
enum Op {
    Put {
        s: usize,
        id: u8,
        v: [i8; 3],
        meta: (u8, u8),
    },
    SqlVector {
        s: usize,
        id: u8,
        v: [i8; 3],
    },
    SqlMeta {
        s: usize,
        id: u8,
        key: u8,
        val: u8,
    },
    Delete {
        s: usize,
        id: u8,
    },
    SqlDelete {
        s: usize,
        id: u8,
    },
    NoteReplace {
        s: usize,
        id: u8,
        title: u8,
    },
    NoteColumn {
        s: usize,
        id: u8,
        body: u8,
        n: i8,
    },
    NoteDelete {
        s: usize,
        id: u8,
    },
    Sync {
        from: usize,
        to: usize,
        max: usize,
        twice: bool,
        cut: Option<usize>,
    },
}

fn op(n: usize) -> impl proptest::strategy::Strategy<Value = Op> {
    let s = 0..n;
    let id = 0u8..4;
    prop_oneof![
        3 => (s.clone(), id.clone(), any::<[i8; 3]>(), (0u8..3, 0u8..3)).prop_map(|(s, id, v, meta)| Op::Put { s, id, v, meta }),
        1 => (s.clone(), id.clone(), any::<[i8; 3]>()).prop_map(|(s, id, v)| Op::SqlVector { s, id, v }),
        1 => (s.clone(), id.clone(), 0u8..3, 0u8..5).prop_map(|(s, id, key, val)| Op::SqlMeta { s, id, key, val }),
        1 => (s.clone(), id.clone()).prop_map(|(s, id)| Op::Delete { s, id }),
        1 => (s.clone(), id.clone()).prop_map(|(s, id)| Op::SqlDelete { s, id }),
        1 => (s.clone(), id.clone(), 0u8..4).prop_map(|(s, id, title)| Op::NoteReplace { s, id, title }),
        2 => (s.clone(), id.clone(), 0u8..4, any::<i8>()).prop_map(|(s, id, body, n)| Op::NoteColumn { s, id, body, n }),
        1 => (s.clone(), id).prop_map(|(s, id)| Op::NoteDelete { s, id }),
        4 => (s.clone(), s, prop_oneof![Just(1usize), Just(3), Just(1000)], any::<bool>(), prop::option::weighted(0.2, 0usize..3))
            .prop_map(|(from, to, max, twice, cut)| Op::Sync { from, to, max, twice, cut }),
    ]
}

fn vec3(v: [i8; 3]) -> Vec<f32> {
    v.iter().map(|x| *x as f32 / 4.0).collect()
}

fn blob(v: [i8; 3]) -> Vec<u8> {
    vec3(v).iter().flat_map(|f| f.to_le_bytes()).collect()
}

/// Delivers `from`'s changes to `to`, possibly split, repeated or cut short.
fn deliver(
    stores: &mut [Store],
    from: usize,
    to: usize,
    max: usize,
    twice: bool,
    cut: Option<usize>,
) {
    if from == to {
        return;
    }
    let theirs = stores[to].table_versions("default").unwrap();
    let batches: Vec<ChangeBatch> = stores[from]
        .changes_since_tables(
            "default",
            &theirs,
            StreamLimits {
                max_changes: max,
                max_bytes: 1 << 20,
            },
        )
        .unwrap()
        .collect::<Result<_, _>>()
        .unwrap();
    let n = cut.map_or(batches.len(), |c| c.min(batches.len()));
    for b in &batches[..n] {
        stores[to].apply(b).unwrap();
        if twice {
            stores[to].apply(b).unwrap();
        }
    }
}

fn run(n: usize, strategy: Strategy, ops: &[Op]) -> Result<(), TestCaseError> {
    let dir = tempfile::tempdir().unwrap();
    let mut s = stores(&dir, n, strategy);
    for op in ops {
        match *op {
            Op::Put { s: i, id, v, meta } => {
                let mut r = Record::new(&format!("v{id}"), vec3(v));
                r.metadata = serde_json::json!({ format!("k{}", meta.0): meta.1 });
                s[i].put("docs", &r).unwrap();
            }
            Op::SqlVector { s: i, id, v } => {
                s[i].connection()
                    .execute(
                        "UPDATE docs SET vector = ?1 WHERE id = ?2",
                        rusqlite::params![blob(v), format!("v{id}")],
                    )
                    .unwrap();
            }
            Op::SqlMeta { s: i, id, key, val } => {
                s[i].connection()
                    .execute(
                        "UPDATE docs SET metadata = json_set(metadata, ?1, ?2) WHERE id = ?3",
                        rusqlite::params![format!("$.k{key}"), val, format!("v{id}")],
                    )
                    .unwrap();
            }
            Op::Delete { s: i, id } => {
                s[i].delete("docs", &format!("v{id}")).unwrap();
            }
            Op::SqlDelete { s: i, id } => {
                s[i].connection()
                    .execute("DELETE FROM docs WHERE id = ?1", [format!("v{id}")])
                    .unwrap();
            }
            Op::NoteReplace { s: i, id, title } => {
                s[i].connection()
                    .execute(
                        "INSERT OR REPLACE INTO notes(id, title, body, n) VALUES (?1, ?2, 'fresh', 0)",
                        rusqlite::params![format!("n{id}"), format!("t{title}")],
                    )
                    .unwrap();
            }
            Op::NoteColumn { s: i, id, body, n } => {
                s[i].connection()
                    .execute(
                        "UPDATE notes SET body = ?1, n = ?2 WHERE id = ?3",
                        rusqlite::params![format!("b{body}"), n, format!("n{id}")],
                    )
                    .unwrap();
            }
            Op::NoteDelete { s: i, id } => {
                s[i].connection()
                    .execute("DELETE FROM notes WHERE id = ?1", [format!("n{id}")])
                    .unwrap();
            }
            Op::Sync {
                from,
                to,
                max,
                twice,
                cut,
            } => deliver(&mut s, from, to, max, twice, cut),
        }
    }
    // Everyone exchanges until nothing moves.
    for _round in 0..n + 2 {
        for i in 0..n {
            for j in 0..n {
                deliver(&mut s, i, j, 1000, false, None);
            }
        }
    }
    for t in ["docs", "notes"] {
        let first = export(&s[0], t);
        for (i, other) in s.iter().enumerate().skip(1) {
            prop_assert_eq!(
                &first,
                &export(other, t),
                "table {} differs between store 0 and {} ({})",
                t,
                i,
                strategy
            );
        }
    }
    Ok(())
}

fn cases() -> u32 {
    std::env::var("QUIVER_PROPTEST_CASES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(300)
}

proptest! {
    #![proptest_config(ProptestConfig { cases: cases(), ..ProptestConfig::default() })]

    #[test]
    fn replicas_converge(
        n in 3usize..=5,
        strategy in prop_oneof![Just(Strategy::Lww), Just(Strategy::Fww), Just(Strategy::Merge), Just(Strategy::Manual)],
        ops in prop::collection::vec(op(5), 1..40),
    ) {
        let ops: Vec<Op> = ops.into_iter().filter(|o| match o {
            Op::Sync { from, to, .. } => *from < n && *to < n,
            Op::Put { s, .. } | Op::SqlVector { s, .. } | Op::SqlMeta { s, .. } | Op::Delete { s, .. }
            | Op::SqlDelete { s, .. } | Op::NoteReplace { s, .. } | Op::NoteColumn { s, .. } | Op::NoteDelete { s, .. } => *s < n,
        }).collect();
        run(n, strategy, &ops)?;
    }
}

//! Property test: random writes on 3-5 stores (through the API and through
//! plain SQL), schema changes (columns added on any replica, concurrently),
//! counter increments, max registers and references that cascade, random
//! exchanges that may be split, repeated or cut short; after everyone
//! exchanges until quiescent, every export is identical, counters hold
//! every increment and no reference dangles. Compaction runs at random
//! points on random replicas (each complete exchange records what the
//! other side holds, as a sync's acknowledgement does), and never purges a
//! tombstone some replica it has heard from does not hold.
//!
//! `QUIVER_PROPTEST_CASES=100000 cargo test -p quiver-store --release --test convergence`
//! runs a long campaign.

mod common;

use common::{export, stores};
use proptest::prelude::{
    any, prop, prop_assert, prop_assert_eq, prop_oneof, proptest, Just, ProptestConfig,
    TestCaseError,
};
use proptest::strategy::Strategy as _;
use quiver_core::{ChangeBatch, OnDelete, Reference, Strategy};
use quiver_store::{Record, Store, StreamLimits, TableOptions};

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
    AddColumn {
        s: usize,
        col: u8,
        val: u8,
    },
    Count {
        s: usize,
        id: u8,
        by: i8,
    },
    Raise {
        s: usize,
        id: u8,
        to: i8,
    },
    Link {
        s: usize,
        id: u8,
        to: u8,
    },
    Compact {
        s: usize,
    },
    Sync {
        from: usize,
        to: usize,
        max: usize,
        twice: bool,
        cut: Option<usize>,
        /// Writes while the exchange runs: an increment of counter c{id}
        /// and a change to every note on the sender before each batch is
        /// read, and an increment on the receiver before each is applied.
        mid: Option<u8>,
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
        1 => (s.clone(), id.clone()).prop_map(|(s, id)| Op::NoteDelete { s, id }),
        1 => (s.clone(), 0u8..3, 0u8..4).prop_map(|(s, col, val)| Op::AddColumn { s, col, val }),
        2 => (s.clone(), 0u8..2, -3i8..4).prop_map(|(s, id, by)| Op::Count { s, id, by }),
        1 => (s.clone(), 0u8..2, any::<i8>()).prop_map(|(s, id, to)| Op::Raise { s, id, to }),
        1 => (s.clone(), id.clone(), id).prop_map(|(s, id, to)| Op::Link { s, id, to }),
        2 => s.clone().prop_map(|s| Op::Compact { s }),
        4 => (s.clone(), s, prop_oneof![Just(1usize), Just(3), Just(1000)], any::<bool>(), prop::option::weighted(0.2, 0usize..3), prop::option::weighted(0.3, 0u8..2))
            .prop_map(|(from, to, max, twice, cut, mid)| Op::Sync { from, to, max, twice, cut, mid }),
    ]
}

fn vec3(v: [i8; 3]) -> Vec<f32> {
    v.iter().map(|x| *x as f32 / 4.0).collect()
}

fn blob(v: [i8; 3]) -> Vec<u8> {
    vec3(v).iter().flat_map(|f| f.to_le_bytes()).collect()
}

/// An increment of counter `c{id}` on `s`, counted in `counted`.
fn increment(s: &Store, id: u8, by: i8, counted: &mut [i64; 2]) {
    let c = s.connection();
    let key = format!("c{id}");
    c.execute(
        "INSERT OR IGNORE INTO stats(id, views) VALUES (?1, 0)",
        [&key],
    )
    .unwrap();
    c.execute(
        "UPDATE stats SET views = views + ?1 WHERE id = ?2",
        rusqlite::params![by, key],
    )
    .unwrap();
    counted[id as usize] += by as i64;
}

/// Delivers `from`'s changes to `to`, possibly split, repeated or cut
/// short, and with writes on both sides while it runs (`mid`).
#[allow(clippy::too_many_arguments)]
fn deliver(
    stores: &mut [Store],
    from: usize,
    to: usize,
    max: usize,
    twice: bool,
    cut: Option<usize>,
    mid: Option<u8>,
    counted: &mut [i64; 2],
) {
    if from == to {
        return;
    }
    // As a sync's stream start does: definitions first.
    let defs: Vec<_> = stores[from]
        .shard_tables("default")
        .unwrap()
        .iter()
        .map(|t| t.def())
        .collect();
    for d in &defs {
        stores[to].merge_table_def("default", d, None).unwrap();
    }
    let theirs = stores[to].table_versions("default").unwrap();
    let src = &stores[from];
    let mut stream = src
        .changes_since_tables(
            "default",
            &theirs,
            StreamLimits {
                max_changes: max,
                max_bytes: 1 << 20,
            },
        )
        .unwrap();
    let mut batches: Vec<ChangeBatch> = Vec::new();
    loop {
        if let Some(id) = mid {
            increment(src, id, 1, counted);
            src.connection()
                .execute("UPDATE notes SET n = coalesce(n, 0) + 1", [])
                .unwrap();
        }
        match stream.next() {
            Some(b) => batches.push(b.unwrap()),
            None => break,
        }
    }
    drop(stream);
    let complete = cut.is_none_or(|c| c >= batches.len());
    let n = cut.map_or(batches.len(), |c| c.min(batches.len()));
    for b in &batches[..n] {
        if let Some(id) = mid {
            increment(&stores[to], id, 1, counted);
        }
        stores[to].apply(b).unwrap();
        if twice {
            stores[to].apply(b).unwrap();
        }
    }
    if complete {
        // Each side now knows what the other holds, as a completed sync
        // records it.
        for (at, of) in [(from, to), (to, from)] {
            let vv = stores[of].version_vector("default").unwrap();
            let tables = stores[of].table_versions("default").unwrap();
            let site = stores[of].site_id();
            stores[at]
                .record_ack_tables(&site, &format!("s{of}"), "default", &vv, &tables)
                .unwrap();
        }
    }
}

/// Compacts store `i`, checking that every tombstone it purges is held by
/// every replica it has an acknowledgement from.
fn compact(stores: &mut [Store], i: usize) -> Result<(), TestCaseError> {
    let tombs = |s: &Store| -> Vec<(String, String, String, i64)> {
        let mut st = s
            .connection()
            .prepare(
                "SELECT t.name, quote(c.pk), hex(x.site_id), c.dbv FROM quiver_clock c
                 JOIN quiver_tables t ON t.id = c.tbl JOIN quiver_sites x ON x.ix = c.site
                 WHERE c.col = '' AND c.cl % 2 = 0",
            )
            .unwrap();
        st.query_map([], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?, r.get(3)?)))
            .unwrap()
            .collect::<rusqlite::Result<_>>()
            .unwrap()
    };
    // Inserts still in the log replace tombstones when folded: fold first.
    stores[i].fold_pending().unwrap();
    let before = tombs(&stores[i]);
    let heard: Vec<usize> = stores[i]
        .acks()
        .unwrap()
        .iter()
        .filter_map(|a| stores.iter().position(|s| s.site_id().to_hex() == a.site))
        .collect();
    stores[i]
        .compact(&quiver_store::CompactOptions::default())
        .unwrap();
    let after = tombs(&stores[i]);
    for (table, key, site, dbv) in before.iter().filter(|t| !after.contains(t)) {
        let site: quiver_core::SiteId = site.to_lowercase().parse().unwrap();
        for &j in &heard {
            let holds = stores[j].table_versions("default").unwrap()[table].get(&site);
            prop_assert!(
                holds >= *dbv as u64,
                "store {} purged the tombstone of {}.{} ({}:{}) that store {} does not hold",
                i,
                table,
                key,
                site,
                dbv,
                j
            );
        }
    }
    Ok(())
}

/// Store 0 also gets `stats` (a counter and a max column) and `links`
/// (referencing notes, cascade); the others receive them with the schema.
fn more_tables(s: &mut Store) {
    s.execute_sql(
        "CREATE TABLE stats(id TEXT PRIMARY KEY, views INTEGER NOT NULL DEFAULT 0, hi INTEGER);
         CREATE TABLE links(id TEXT PRIMARY KEY, note TEXT NOT NULL);",
    )
    .unwrap();
    let opts = TableOptions {
        policies: vec![
            ("views".into(), Strategy::Counter),
            ("hi".into(), Strategy::Max),
        ],
        ..Default::default()
    };
    s.add_table_with("stats", "default", Strategy::Lww, &opts)
        .unwrap();
    let opts = TableOptions {
        references: vec![(
            "note".into(),
            Reference {
                table: "notes".into(),
                column: "id".into(),
                on_delete: OnDelete::Cascade,
            },
        )],
        ..Default::default()
    };
    s.add_table_with("links", "default", Strategy::Lww, &opts)
        .unwrap();
}

fn run(n: usize, strategy: Strategy, ops: &[Op]) -> Result<(), TestCaseError> {
    let dir = tempfile::tempdir().unwrap();
    let mut s = stores(&dir, n, strategy);
    more_tables(&mut s[0]);
    // Every increment made, per row: what the counters must end at.
    let mut counted = [0i64; 2];
    for i in 1..n {
        deliver(&mut s, 0, i, 1000, false, None, None, &mut counted);
    }
    play(&mut s, ops, &mut counted)?;
    settle_and_check(&mut s, strategy, &mut counted)?;
    // Everyone compacts what everyone holds, then the same again on top:
    // writes to ids whose tombstones are gone, deletes compacted at random
    // points while replicas lag.
    for i in 0..n {
        compact(&mut s, i)?;
    }
    let left: i64 = s
        .iter()
        .map(|st| {
            st.connection()
                .query_row(
                    "SELECT count(*) FROM quiver_clock WHERE col = '' AND cl % 2 = 0",
                    [],
                    |r| r.get::<_, i64>(0),
                )
                .unwrap()
        })
        .sum();
    prop_assert_eq!(
        left,
        0,
        "tombstones left after everyone acknowledged everything"
    );
    play(&mut s, ops, &mut counted)?;
    settle_and_check(&mut s, strategy, &mut counted)
}

fn play(s: &mut [Store], ops: &[Op], counted: &mut [i64; 2]) -> Result<(), TestCaseError> {
    for op in ops {
        match *op {
            Op::AddColumn { s: i, col, val } => {
                let name = format!("extra{col}");
                let has: bool = s[i]
                    .connection()
                    .query_row(
                        "SELECT count(*) FROM pragma_table_info('notes') WHERE name = ?1",
                        [&name],
                        |r| r.get::<_, i64>(0).map(|c| c > 0),
                    )
                    .unwrap();
                if !has {
                    s[i].connection()
                        .execute_batch(&format!("ALTER TABLE notes ADD COLUMN {name} TEXT"))
                        .unwrap();
                }
                s[i].connection()
                    .execute(
                        &format!("UPDATE notes SET {name} = ?1"),
                        [format!("x{val}")],
                    )
                    .unwrap();
            }
            Op::Count { s: i, id, by } => increment(&s[i], id, by, counted),
            Op::Raise { s: i, id, to } => {
                s[i].connection()
                    .execute(
                        "UPDATE stats SET hi = ?1 WHERE id = ?2",
                        rusqlite::params![to, format!("c{id}")],
                    )
                    .unwrap();
            }
            Op::Link { s: i, id, to } => {
                s[i].connection()
                    .execute(
                        "INSERT OR REPLACE INTO links(id, note) SELECT ?1, id FROM notes WHERE id = ?2",
                        rusqlite::params![format!("l{id}"), format!("n{to}")],
                    )
                    .unwrap();
            }
            _ => {}
        }
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
                mid,
            } => deliver(s, from, to, max, twice, cut, mid, counted),
            Op::Compact { s: i } => compact(s, i)?,
            _ => {}
        }
    }
    Ok(())
}

/// Exchanges until quiescent, then checks that every replica shows the same.
fn settle_and_check(
    s: &mut [Store],
    strategy: Strategy,
    counted: &mut [i64; 2],
) -> Result<(), TestCaseError> {
    let n = s.len();
    // Everyone exchanges until nothing moves.
    for _round in 0..n + 2 {
        for i in 0..n {
            for j in 0..n {
                deliver(s, i, j, 1000, false, None, None, counted);
            }
        }
    }
    for t in ["docs", "notes", "stats", "links"] {
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
    for st in s.iter() {
        for (id, total) in counted.iter().enumerate() {
            let views: Option<i64> = st
                .connection()
                .query_row(
                    "SELECT views FROM stats WHERE id = ?1",
                    [format!("c{id}")],
                    |r| r.get(0),
                )
                .ok();
            // A row that was never inserted has nothing to count; one
            // that was holds every increment.
            if let Some(v) = views {
                prop_assert_eq!(v, *total, "counter c{} lost or doubled increments", id);
            }
        }
        prop_assert_eq!(st.dangling().unwrap().len(), 0, "a link dangles");
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
            | Op::SqlDelete { s, .. } | Op::NoteReplace { s, .. } | Op::NoteColumn { s, .. } | Op::NoteDelete { s, .. }
            | Op::AddColumn { s, .. } | Op::Count { s, .. } | Op::Raise { s, .. } | Op::Link { s, .. }
            | Op::Compact { s } => *s < n,
        }).collect();
        run(n, strategy, &ops)?;
    }
}

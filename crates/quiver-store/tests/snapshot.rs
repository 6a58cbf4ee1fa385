//! Snapshot streams: a replica holding nothing of a table receives its
//! current rows in key order, each with its clock records, and the
//! versions they cover once, at the end.

mod common;

use common::{export, pull, stores};
use quiver_core::{ChangeBatch, Strategy, Value};
use quiver_store::{Store, StreamLimits};

type R = Result<(), Box<dyn std::error::Error>>;

fn small() -> StreamLimits {
    StreamLimits {
        max_changes: 40,
        max_bytes: 1 << 20,
    }
}

/// Another writer's connection to the same file, as the `sqlite3` shell.
fn shell(s: &Store, sql: &str) {
    rusqlite::Connection::open(s.path())
        .unwrap()
        .execute_batch(sql)
        .unwrap();
}

/// `n` notes with ids in no particular order.
fn fill(s: &Store, n: usize, tag: &str) {
    let mut sql = String::from("BEGIN;");
    for i in 0..n {
        let id = format!("{:08x}", (i as u64).wrapping_mul(2_654_435_761) % 1_000_003);
        sql += &format!("INSERT INTO notes VALUES('{tag}{id}', 'title {i}', 'body', {i});");
    }
    sql += "COMMIT;";
    shell(s, &sql);
}

fn key_text(v: &Value) -> String {
    match v {
        Value::Text(t) => t.clone(),
        other => format!("{other:?}"),
    }
}

/// What `dst` holds of `table`, as it would ask for it.
fn theirs(
    dst: &Store,
    table: &str,
) -> std::collections::BTreeMap<String, quiver_core::VersionVector> {
    let mut theirs = dst.table_versions("default").unwrap();
    theirs.retain(|t, _| t == table);
    theirs
}

/// The batches of a stream from `src` to `dst` for `table`, continuing the
/// snapshot `dst` took in part if `resume`.
fn stream_of(src: &Store, dst: &Store, table: &str, resume: bool) -> Vec<ChangeBatch> {
    let marks = if resume {
        dst.snapshot_progress("default").unwrap()
    } else {
        Vec::new()
    };
    src.changes_since_tables("default", &theirs(dst, table), small())
        .unwrap()
        .resume_snapshots(&marks)
        .collect::<Result<_, _>>()
        .unwrap()
}

/// The batches of a stream from `src` to `dst` for `notes`.
fn stream(src: &Store, dst: &Store) -> Vec<ChangeBatch> {
    stream_of(src, dst, "notes", false)
}

#[test]
fn a_replica_holding_nothing_gets_rows_in_key_order_and_the_claims_at_the_end() -> R {
    let dir = tempfile::tempdir()?;
    let mut s = stores(&dir, 3, Strategy::Lww);
    let (mut c, rest) = (s.pop().unwrap(), s);
    let (mut a, mut b) = {
        let mut it = rest.into_iter();
        (it.next().unwrap(), it.next().unwrap())
    };
    fill(&a, 300, "a");
    fill(&b, 50, "b");
    pull(&mut a, &b, "default");
    shell(&a, "UPDATE notes SET title = 'changed' WHERE n % 7 = 0");
    shell(&a, "DELETE FROM notes WHERE n % 11 = 0");
    let batches = stream(&a, &c);
    assert!(batches.len() > 5, "small batches: {}", batches.len());
    let mut last: Option<String> = None;
    for (i, b) in batches.iter().enumerate() {
        if i + 1 < batches.len() {
            assert!(b.covered.is_empty(), "batch {i} claims {:?}", b.covered);
        }
        for ch in b.changes.iter().filter(|c| c.column.is_none()) {
            let k = key_text(&ch.pk[0]);
            assert!(last.as_ref().is_none_or(|l| *l < k), "{last:?} then {k}");
            last = Some(k);
        }
    }
    let claims = &batches.last().unwrap().covered;
    assert_eq!(claims.len(), 2, "a's and b's versions: {claims:?}");
    for batch in &batches {
        c.apply(batch)?;
    }
    assert_eq!(export(&a, "notes"), export(&c, "notes"));
    assert_eq!(
        a.table_versions("default")?["notes"],
        c.table_versions("default")?["notes"]
            .iter()
            .filter(|(s, _)| **s != c.site_id())
            .map(|(s, v)| (*s, *v))
            .collect()
    );
    // Then deltas, both ways, from what the snapshot claimed.
    shell(&a, "UPDATE notes SET body = 'later' WHERE n % 5 = 0");
    shell(&c, "INSERT INTO notes VALUES('c-own', 'from c', 'x', 1)");
    let delta = stream(&a, &c);
    assert!(
        delta.iter().all(|b| b.changes.len() < 300),
        "a delta, not the table"
    );
    pull(&mut c, &a, "default");
    pull(&mut a, &c, "default");
    pull(&mut b, &a, "default");
    assert_eq!(export(&a, "notes"), export(&c, "notes"));
    assert_eq!(export(&a, "notes"), export(&b, "notes"));
    Ok(())
}

#[test]
fn writes_on_the_source_while_a_snapshot_is_read_are_not_lost() -> R {
    let dir = tempfile::tempdir()?;
    let mut s = stores(&dir, 2, Strategy::Lww);
    let mut c = s.pop().unwrap();
    let a = s.pop().unwrap();
    fill(&a, 400, "a");
    let theirs = theirs(&c, "notes");
    let mut applied = 0;
    {
        let st = a.changes_since_tables("default", &theirs, small())?;
        let mut i = 0;
        for batch in st {
            c.apply(&batch?)?;
            applied += 1;
            // Rows behind the cursor, ahead of it, new ones and deletes.
            i += 1;
            shell(
                &a,
                &format!(
                    "UPDATE notes SET title = 'w{i}' WHERE n = {i} OR n = {};
                     INSERT INTO notes VALUES('new{i:03}', 'new', 'x', {i});
                     DELETE FROM notes WHERE n = {};",
                    400 - i,
                    200 + i
                ),
            );
        }
    }
    assert!(applied > 5);
    pull(&mut c, &a, "default");
    assert_eq!(export(&a, "notes"), export(&c, "notes"));
    Ok(())
}

/// A row rewritten in a version still open when the snapshot ends cannot
/// go: then nothing of the table is claimed, and the next sync sends it.
#[test]
fn a_row_in_a_version_open_to_the_end_withholds_the_claims() -> R {
    let dir = tempfile::tempdir()?;
    let mut s = stores(&dir, 2, Strategy::Lww);
    let mut c = s.pop().unwrap();
    let a = s.pop().unwrap();
    fill(&a, 100, "a");
    let theirs = theirs(&c, "notes");
    let batches: Vec<_> = {
        let mut st = a.changes_since_tables("default", &theirs, small())?;
        shell(&a, "INSERT INTO notes VALUES('a-late', 'late', 'x', 0)");
        shell(&a, "UPDATE notes SET title = 'open' WHERE n = 3");
        st.by_ref().collect::<Result<_, _>>()?
    };
    assert!(batches.iter().all(|b| b.covered.is_empty()));
    for b in &batches {
        c.apply(b)?;
    }
    assert_eq!(c.table_versions("default")?["notes"].get(&a.site_id()), 0);
    pull(&mut c, &a, "default");
    assert_eq!(export(&a, "notes"), export(&c, "notes"));
    Ok(())
}

/// The batches of a stream from `src` to `dst` for `notes`, continuing the
/// snapshot `dst` took in part.
fn resumed(src: &Store, dst: &Store) -> Vec<ChangeBatch> {
    stream_of(src, dst, "notes", true)
}

fn rows_in(batches: &[ChangeBatch]) -> usize {
    batches
        .iter()
        .flat_map(|b| &b.changes)
        .filter(|c| c.column.is_none())
        .count()
}

/// A snapshot cut after some batches were committed goes on past the last
/// key committed: no row is sent twice, none is missed, and what the
/// source wrote between the two attempts arrives by the delta after it.
#[test]
fn an_interrupted_snapshot_resumes_past_the_last_key_committed() -> R {
    let dir = tempfile::tempdir()?;
    let mut s = stores(&dir, 3, Strategy::Lww);
    let mut c = s.pop().unwrap();
    let mut b = s.pop().unwrap();
    let mut a = s.pop().unwrap();
    fill(&a, 500, "a");
    let first = stream(&a, &c);
    assert!(
        first
            .iter()
            .all(|b| b.snapshot.as_ref().is_some_and(|m| m.rows == 500)),
        "every batch marks, with the rows the stream sends in all"
    );
    let cut = first.len() / 3;
    for batch in &first[..cut] {
        c.apply(batch)?;
    }
    let marks = c.snapshot_progress("default")?;
    assert_eq!(marks.len(), 1, "{marks:?}");
    assert_eq!(marks[0].table, "notes");
    let sent_before = rows_in(&first[..cut]);
    // The source goes on: rows behind the mark and ahead of it change,
    // some go, some come.
    shell(&a, "UPDATE notes SET title = 'moved' WHERE n % 9 = 0");
    shell(&a, "DELETE FROM notes WHERE n % 13 = 0");
    fill(&a, 40, "z");
    let mark = marks[0].after.clone().unwrap();
    let rest = resumed(&a, &c);
    // The rows up to the mark that changed since go again (first), then
    // every row past it once (deleted ones too; the new keys sort after).
    let below = |k: &Value| key_text(k) <= key_text(&mark);
    let again = rest
        .iter()
        .flat_map(|b| &b.changes)
        .filter(|c| c.column.is_none() && below(&c.pk[0]))
        .count();
    let changed_below = a
        .connection()
        .prepare("SELECT id FROM notes WHERE n % 9 = 0")?
        .query_map([], |r| r.get::<_, String>(0))?
        .collect::<Result<Vec<_>, _>>()?
        .into_iter()
        .filter(|k| *k <= key_text(&mark))
        .count();
    assert!(changed_below > 0, "the test changes rows below the mark");
    assert!(
        again >= changed_below,
        "{again} again, {changed_below} updated"
    );
    let records: i64 = rusqlite::Connection::open(a.path())?.query_row(
        "SELECT count(*) FROM quiver_clock WHERE col = ''",
        [],
        |r| r.get(0),
    )?;
    assert_eq!(
        (sent_before + rows_in(&rest) - again) as i64,
        records,
        "{sent_before} rows before the cut, {} after ({again} again)",
        rows_in(&rest)
    );
    assert!(
        (again as i64) < sent_before as i64,
        "only the rows changed go again"
    );
    assert_eq!(
        rest[0].snapshot.as_ref().map(|m| m.rows as i64),
        Some(records - sent_before as i64 + again as i64),
        "the rows left"
    );
    for batch in &rest {
        c.apply(batch)?;
    }
    assert!(
        c.snapshot_progress("default")?.is_empty(),
        "the claims ended it"
    );
    // One resumed stream, and the replica holds what the source held when
    // it began.
    assert_eq!(export(&a, "notes"), export(&c, "notes"));
    pull(&mut c, &a, "default");
    assert_eq!(export(&a, "notes"), export(&c, "notes"));

    // Cut again, and continued from another replica holding the same.
    pull(&mut b, &a, "default");
    let d_dir = tempfile::tempdir()?;
    let mut d = stores(&d_dir, 1, Strategy::Lww).pop().unwrap();
    let first = stream(&a, &d);
    for batch in &first[..first.len() / 2] {
        d.apply(batch)?;
    }
    shell(&b, "UPDATE notes SET body = 'from b' WHERE n % 4 = 0");
    for batch in resumed(&b, &d) {
        d.apply(&batch)?;
    }
    assert_eq!(export(&b, "notes"), export(&d, "notes"), "one stream");
    pull(&mut d, &b, "default");
    pull(&mut d, &a, "default");
    pull(&mut a, &b, "default");
    assert_eq!(export(&a, "notes"), export(&d, "notes"));
    Ok(())
}

/// A mark taken from one replica, handed to another that shares none of
/// its versions, would claim nothing at the end and leave the table a
/// snapshot forever: that snapshot starts over, and ends with claims.
#[test]
fn a_mark_sharing_no_versions_with_the_sender_starts_over() -> R {
    let dir = tempfile::tempdir()?;
    let mut s = stores(&dir, 3, Strategy::Lww);
    let mut e = s.pop().unwrap();
    let mut d = s.pop().unwrap();
    let mut a = s.pop().unwrap();
    fill(&a, 300, "a");
    fill(&e, 200, "e");
    let first = stream(&a, &d);
    for batch in &first[..first.len() / 2] {
        d.apply(batch)?;
    }
    assert_eq!(d.snapshot_progress("default")?.len(), 1);
    let rest = resumed(&e, &d);
    assert_eq!(rows_in(&rest), 200, "all of e's rows, from the start");
    assert!(!rest.last().unwrap().covered.is_empty(), "and its claims");
    for batch in &rest {
        d.apply(batch)?;
    }
    assert!(d.snapshot_progress("default")?.is_empty());
    pull(&mut d, &a, "default");
    pull(&mut a, &e, "default");
    pull(&mut e, &a, "default");
    assert_eq!(export(&a, "notes"), export(&d, "notes"));
    assert_eq!(export(&e, "notes"), export(&d, "notes"));
    Ok(())
}

/// A table dropped and created again (it may get the same id) inherits no
/// mark of a snapshot the old one received in part.
#[test]
fn a_dropped_table_leaves_no_mark_behind() -> R {
    let dir = tempfile::tempdir()?;
    let mut s = stores(&dir, 2, Strategy::Lww);
    let mut c = s.pop().unwrap();
    let mut a = s.pop().unwrap();
    let recs: Vec<quiver_store::Record> = (0..300)
        .map(|i| quiver_store::Record::new(&format!("r{i:04}"), vec![i as f32, 1.0, 2.0]))
        .collect();
    a.put_many("docs", &recs)?;
    let first = stream_of(&a, &c, "docs", false);
    for batch in &first[..first.len() / 2] {
        c.apply(batch)?;
    }
    assert_eq!(c.snapshot_progress("default")?.len(), 1);
    c.drop_collection("docs")?;
    assert!(c.snapshot_progress("default")?.is_empty());
    c.create_collection(&quiver_store::CollectionSpec::new("docs", 3))?;
    assert!(c.snapshot_progress("default")?.is_empty());
    pull(&mut c, &a, "default");
    assert_eq!(export(&a, "docs"), export(&c, "docs"));
    Ok(())
}

/// Rows that arrive from the requester itself while its snapshot is read
/// (it pushes while it pulls) are not sent back to it.
#[test]
fn a_snapshot_does_not_send_the_requester_its_own_rows() -> R {
    let dir = tempfile::tempdir()?;
    let mut s = stores(&dir, 2, Strategy::Lww);
    let mut b = s.pop().unwrap();
    let a = s.pop().unwrap();
    fill(&a, 300, "a");
    fill(&b, 50, "b");
    let theirs = theirs(&b, "notes");
    let mut batches = Vec::new();
    {
        let mut st = a.changes_since_tables("default", &theirs, small())?;
        batches.push(st.next().unwrap()?);
        // b's push lands on a (another connection) mid-snapshot; its keys
        // sort after a's, so the snapshot reaches them.
        let mut a2 = Store::open(a.path())?;
        pull(&mut a2, &b, "default");
        for batch in st {
            batches.push(batch?);
        }
    }
    let back: Vec<_> = batches
        .iter()
        .flat_map(|b| &b.changes)
        .filter(|c| c.site == b.site_id())
        .collect();
    assert!(back.is_empty(), "sent back: {} changes", back.len());
    assert_eq!(rows_in(&batches), 300);
    for batch in &batches {
        b.apply(batch)?;
    }
    pull(&mut b, &a, "default");
    assert_eq!(export(&a, "notes"), export(&b, "notes"));
    Ok(())
}

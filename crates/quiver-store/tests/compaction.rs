//! Compaction on acknowledgement, the horizon for silent peers, and the
//! safe return of a peer whose writes touch rows compacted meanwhile.

mod common;

use common::{export, pull, stores};
use quiver_core::Strategy;
use quiver_store::{CompactOptions, Resolution, Store};

type R = Result<(), Box<dyn std::error::Error>>;

const SHARD: &str = "default";

fn shell(s: &Store, sql: &str) {
    rusqlite::Connection::open(s.path())
        .unwrap()
        .execute_batch(sql)
        .unwrap();
}

fn clock_records(s: &Store) -> i64 {
    s.connection()
        .query_row("SELECT count(*) FROM quiver_clock", [], |r| r.get(0))
        .unwrap()
}

/// `to` records what `from` holds now, as a completed sync would.
fn ack(to: &mut Store, from: &Store, node: &str) {
    let vv = from.version_vector(SHARD).unwrap();
    to.record_ack(&from.site_id(), node, SHARD, &vv).unwrap();
}

fn note_rows(s: &Store) -> Vec<String> {
    let mut st = s
        .connection()
        .prepare("SELECT id || '=' || coalesce(title, '') FROM notes ORDER BY id")
        .unwrap();
    st.query_map([], |r| r.get(0))
        .unwrap()
        .collect::<rusqlite::Result<_>>()
        .unwrap()
}

fn insert_notes(s: &Store, n: usize) {
    let mut sql = String::from("BEGIN;");
    for i in 0..n {
        sql += &format!("INSERT INTO notes VALUES('n{i:05}', 'title {i}', 'body {i}', {i});");
    }
    sql += "COMMIT;";
    shell(s, &sql);
}

fn compact(s: &mut Store, dry_run: bool, horizon: Option<f64>) -> quiver_store::CompactReport {
    s.compact(&CompactOptions {
        shard: None,
        dry_run,
        peer_horizon_days: horizon,
        max_tombstones: None,
    })
    .unwrap()
}

#[test]
fn acknowledged_tombstones_are_purged_and_the_file_shrinks() -> R {
    let dir = tempfile::tempdir()?;
    let mut s = stores(&dir, 3, Strategy::Lww);
    let (a, rest) = s.split_first_mut().unwrap();
    let (b, rest) = rest.split_first_mut().unwrap();
    let c = &mut rest[0];
    insert_notes(a, 3000);
    pull(b, a, SHARD);
    shell(a, "DELETE FROM notes WHERE id >= 'n00010'");
    pull(b, a, SHARD);
    ack(a, b, "b");
    let records = clock_records(a);

    let dry = compact(a, true, None);
    assert_eq!(dry.purged, 2990, "{dry:?}");
    assert_eq!(clock_records(a), records, "a dry run changes nothing");

    let done = compact(a, false, None);
    assert_eq!(done.shards[0].tombstones, 2990);
    assert_eq!(clock_records(a), 10);
    assert!(
        done.bytes_after * 3 < done.bytes_before,
        "{} -> {} bytes",
        done.bytes_before,
        done.bytes_after
    );
    assert_eq!(done.space, "incremental vacuum");
    // A new replica still gets exactly what is live.
    pull(c, a, SHARD);
    assert_eq!(export(c, "notes"), export(a, "notes"));
    // And one that acknowledged everything goes on with deltas.
    shell(a, "UPDATE notes SET title = 'after' WHERE id = 'n00001'");
    pull(b, a, SHARD);
    assert_eq!(export(b, "notes"), export(a, "notes"));
    Ok(())
}

#[test]
fn a_peer_that_has_not_acknowledged_holds_compaction_back_until_the_horizon() -> R {
    let dir = tempfile::tempdir()?;
    let mut s = stores(&dir, 3, Strategy::Lww);
    let (a, rest) = s.split_first_mut().unwrap();
    let (b, rest) = rest.split_first_mut().unwrap();
    let c = &mut rest[0];
    insert_notes(a, 50);
    pull(b, a, SHARD);
    // c only ever syncs with b.
    pull(c, b, SHARD);
    ack(a, b, "b");
    shell(a, "DELETE FROM notes");
    // b has not seen the deletes: it holds them back.
    let r = compact(a, false, None);
    assert_eq!(r.purged, 0);
    assert_eq!(r.shards[0].held_back, 50);
    assert_eq!(r.shards[0].held_by.len(), 1);
    assert_eq!(r.shards[0].held_by[0].node, "b");
    assert_eq!(r.shards[0].held_by[0].records, 50);
    assert_eq!(clock_records(a), 50);
    // Past the horizon it no longer does, and status says so.
    std::thread::sleep(std::time::Duration::from_millis(30));
    a.set_peer_horizon_days(1e-7)?; // 8.6 ms
    let st = a.status()?;
    assert!(st.shards[0].acks[0].beyond_horizon);
    // And in the registry.
    a.register_peer(&quiver_store::PeerRecord::new("b", "127.0.0.1:1", vec![]))?;
    a.register_peer(&quiver_store::PeerRecord::new("z", "127.0.0.1:2", vec![]))?;
    let peers = a.peers()?;
    assert!(peers[0].beyond_horizon, "{peers:?}");
    assert!(
        !peers[1].beyond_horizon,
        "never acknowledged: nothing to say"
    );
    let r = compact(a, false, None);
    assert_eq!(r.shards[0].beyond_horizon.len(), 1);
    assert_eq!(r.purged, 50);
    assert_eq!(clock_records(a), 0);
    // When b returns it gets a snapshot, which takes the deleted rows away.
    pull(b, a, SHARD);
    assert_eq!(export(b, "notes"), export(a, "notes"));
    assert!(note_rows(b).is_empty());
    // b took them away as deletes of its own, which reach c.
    pull(c, b, SHARD);
    assert!(note_rows(c).is_empty());
    assert!(b.get_unresolved_conflicts(None)?.is_empty());
    Ok(())
}

#[test]
fn a_returning_write_to_a_compacted_row_waits_in_the_conflicts_queue() -> R {
    let dir = tempfile::tempdir()?;
    let mut s = stores(&dir, 3, Strategy::Lww);
    let (a, rest) = s.split_first_mut().unwrap();
    let (b, rest) = rest.split_first_mut().unwrap();
    let c = &mut rest[0];
    insert_notes(a, 5);
    pull(b, a, SHARD);
    pull(c, a, SHARD);
    // b edits a row, and leaves before it syncs.
    shell(
        b,
        "UPDATE notes SET title = 'b was here' WHERE id = 'n00001'",
    );
    ack(a, b, "b");
    // Meanwhile the row (and another) is deleted; c sees it.
    shell(a, "DELETE FROM notes WHERE id IN ('n00001', 'n00002')");
    pull(c, a, SHARD);
    ack(a, c, "c");
    std::thread::sleep(std::time::Duration::from_millis(30));
    a.set_peer_horizon_days(1e-7)?;
    assert_eq!(compact(a, false, None).shards[0].tombstones, 2);

    // b returns: it pulls first. The row it did not write follows the
    // source; the one it wrote is buried and its write held for review.
    pull(b, a, SHARD);
    assert_eq!(export(b, "notes"), export(a, "notes"));
    let open = b.get_unresolved_conflicts(None)?;
    assert_eq!(open.len(), 1, "{open:?}");
    assert_eq!(open[0].kind, "resurrection");
    assert_eq!(open[0].pk, "n00001");
    assert_eq!(open[0].versions.len(), 2);
    assert_eq!(open[0].versions[1].value["title"], "b was here");
    // Nothing comes back by itself, in either direction.
    pull(a, b, SHARD);
    pull(c, a, SHARD);
    assert_eq!(export(a, "notes"), export(b, "notes"));
    assert_eq!(export(c, "notes"), export(a, "notes"));
    assert!(!note_rows(a).iter().any(|r| r.starts_with("n00001")));

    // Keeping the write brings the row back everywhere, over c's tombstone too.
    let write = open[0].versions[1].version.clone();
    b.resolve(open[0].id, Resolution::Keep(write))?;
    pull(a, b, SHARD);
    pull(c, a, SHARD);
    assert!(note_rows(a).contains(&"n00001=b was here".to_string()));
    assert_eq!(export(a, "notes"), export(b, "notes"));
    assert_eq!(export(c, "notes"), export(a, "notes"));
    Ok(())
}

#[test]
fn a_write_pushed_to_a_compacted_row_is_held_where_it_arrives() -> R {
    let dir = tempfile::tempdir()?;
    let mut s = stores(&dir, 2, Strategy::Lww);
    let (a, rest) = s.split_first_mut().unwrap();
    let b = &mut rest[0];
    insert_notes(a, 3);
    pull(b, a, SHARD);
    shell(b, "UPDATE notes SET title = 'late' WHERE id = 'n00000'");
    ack(a, b, "b");
    shell(a, "DELETE FROM notes WHERE id = 'n00000'");
    std::thread::sleep(std::time::Duration::from_millis(30));
    assert_eq!(compact(a, false, Some(1e-7)).shards[0].tombstones, 1);
    // b pushes first: a holds the write for review instead of dropping it.
    let report = pull(a, b, SHARD);
    assert_eq!(report.conflicts_open, 1);
    // The same write again (a repeated batch) opens nothing more.
    let mut again = b.table_versions(SHARD)?;
    for vv in again.values_mut() {
        *vv = quiver_core::VersionVector::new();
    }
    for batch in b.changes_since_tables(SHARD, &again, quiver_store::StreamLimits::default())? {
        a.apply(&batch?)?;
    }
    let open = a.get_unresolved_conflicts(None)?;
    assert_eq!(open.len(), 1);
    assert_eq!(open[0].kind, "resurrection");
    assert!(!note_rows(a).iter().any(|r| r.starts_with("n00000")));
    // Then b pulls, and both show the same rows.
    pull(b, a, SHARD);
    assert_eq!(export(a, "notes"), export(b, "notes"));
    // Keeping the delete closes it.
    a.resolve(open[0].id, Resolution::Keep("deleted".into()))?;
    assert!(a.get_unresolved_conflicts(None)?.is_empty());
    Ok(())
}

#[test]
fn each_table_is_compacted_by_what_peers_hold_of_it() -> R {
    let dir = tempfile::tempdir()?;
    let mut s = stores(&dir, 2, Strategy::Lww);
    let (a, rest) = s.split_first_mut().unwrap();
    let b = &mut rest[0];
    // a writes only notes, b only docs: neither origin is in both tables.
    insert_notes(a, 20);
    b.put(
        "docs",
        &quiver_store::Record::new("d1", vec![1.0, 2.0, 3.0]),
    )?;
    common::exchange(a, b, SHARD);
    shell(a, "DELETE FROM notes");
    pull(b, a, SHARD);
    let tables = b.table_versions(SHARD)?;
    let vv = b.version_vector(SHARD)?;
    a.record_ack_tables(&b.site_id(), "b", SHARD, &vv, &tables)?;
    let r = compact(a, false, None);
    assert_eq!(r.shards[0].tombstones, 20, "{r:?}");
    assert_eq!(r.shards[0].held_back, 0);
    Ok(())
}

#[test]
fn a_row_inserted_again_after_its_tombstone_was_purged_wins_over_peers_tombstones() -> R {
    let dir = tempfile::tempdir()?;
    let mut s = stores(&dir, 2, Strategy::Lww);
    let (a, rest) = s.split_first_mut().unwrap();
    let b = &mut rest[0];
    insert_notes(a, 3);
    pull(b, a, SHARD);
    shell(a, "DELETE FROM notes WHERE id = 'n00001'");
    pull(b, a, SHARD);
    ack(a, b, "b");
    // a purges the tombstone; b still holds its own copy of it.
    assert_eq!(compact(a, false, None).shards[0].tombstones, 1);
    shell(a, "INSERT INTO notes VALUES('n00001', 'again', 'body', 9)");
    pull(b, a, SHARD);
    assert!(
        note_rows(b).contains(&"n00001=again".to_string()),
        "{:?}",
        note_rows(b)
    );
    assert_eq!(export(b, "notes"), export(a, "notes"));
    Ok(())
}

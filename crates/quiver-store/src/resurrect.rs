//! Writes that would bring back a row deleted and compacted away.
//!
//! Once a row's tombstone is purged, nothing here says the row ever
//! existed. A write to it made before the writer saw the delete (a peer back
//! from beyond the horizon, or a replica that never synced with this one)
//! would otherwise bring it back, or be dropped unseen. Instead the row is
//! buried here under a tombstone of this store's own, one life past the
//! write, and the write goes to the conflicts queue as a `resurrection`
//! with both sides shown: keeping it writes the row again (a new life that
//! wins over every tombstone of the old one), keeping `deleted` closes it.

use std::collections::BTreeMap;

use quiver_core::merge::Version;
use quiver_core::{Dot, Hlc, SiteId, Value, VersionVector};
use rusqlite::{params, Connection};

use crate::catalog::TableInfo;
use crate::events::StoreEvent;
use crate::rowstate::{self, RowState, Sites};
use crate::sqlvalue::{display_pk, from_ref, pk_values, P};
use crate::{wall_ms, Result, StoreError};

/// The handle of the delete's side of a resurrection conflict.
pub const DELETED: &str = "deleted";

/// Buries row `key` under a tombstone of this store's (open version, one
/// causal length past `cl`), a delete peers then hear of like any other,
/// and, given a `write` (with the row it would show, by column), records
/// its resurrection. Capture must be off.
#[allow(clippy::too_many_arguments)]
pub(crate) fn bury(
    conn: &Connection,
    sites: &mut Sites,
    t: &TableInfo,
    key: &Value,
    mut state: RowState,
    cl: u64,
    write: Option<(&Version, &BTreeMap<String, Value>)>,
    own: SiteId,
    now: Hlc,
    events: &mut Vec<StoreEvent>,
) -> Result<Option<i64>> {
    let pk = pk_values(key, t.pk.len())
        .ok_or_else(|| StoreError::Corrupt(format!("bad key of a row of {}", t.name)))?;
    let open: i64 = conn.query_row("SELECT dbv FROM quiver_state", [], |r| r.get(0))?;
    let dot = Dot::new(own, open as u64);
    let cl = if cl % 2 == 1 { cl + 1 } else { cl + 2 };
    let was_alive = state.alive();
    if let Some((w, _)) = write {
        state.know.advance(w.dot.site, w.dot.db_version);
    }
    let replaces = state.know.clone();
    state.know.advance(own, open as u64);
    state.existence = Some(Version {
        dot,
        hlc: now,
        cl,
        replaces,
        value: Value::Null,
    });
    state.cells.clear();
    let fresh: bool = !conn
        .prepare_cached("SELECT EXISTS (SELECT 1 FROM quiver_clock WHERE tbl = ?1 AND pk = ?2)")?
        .query_row(params![t.id, P(key)], |r| r.get(0))?;
    rowstate::store(
        conn,
        sites,
        t,
        key,
        &pk,
        &state,
        Some(&BTreeMap::new()),
        fresh,
    )?;
    if was_alive {
        events.push(StoreEvent::RemoteChange {
            table: t.name.clone(),
            shard: t.shard.clone(),
            pk: display_pk(&pk),
            deleted: true,
        });
    }
    let Some((write, row)) = write else {
        return Ok(None);
    };
    let shown: serde_json::Map<String, serde_json::Value> = row
        .iter()
        .map(|(c, v)| (c.clone(), crate::sqlvalue::to_json(v)))
        .collect();
    let versions = serde_json::json!([
        {"version": DELETED, "hlc": "", "value": null, "kept": true},
        {
            "version": format!("{}:{}", write.dot.site, write.dot.db_version),
            "hlc": write.hlc.to_string(),
            "value": shown,
            "kept": false
        }
    ]);
    let raw = serde_json::to_string(row).map_err(|e| StoreError::Corrupt(e.to_string()))?;
    conn.prepare_cached(
        "INSERT INTO quiver_conflicts(tbl, pk, col, strategy, detected_at, versions, kind, row)
         VALUES (?1, ?2, '', ?3, ?4, ?5, 'resurrection', ?6)",
    )?
    .execute(params![
        t.id,
        P(key),
        t.strategy.as_str(),
        wall_ms() as i64,
        versions.to_string(),
        raw
    ])?;
    let id = conn.last_insert_rowid();
    events.push(StoreEvent::Conflict {
        id,
        table: t.name.clone(),
        pk: display_pk(&pk),
        column: String::new(),
        strategy: t.strategy,
        open: true,
    });
    Ok(Some(id))
}

/// The row a resurrection conflict would write back, by column.
pub(crate) fn stored_row(conn: &Connection, id: i64) -> Result<BTreeMap<String, Value>> {
    let raw: Option<String> = conn.query_row(
        "SELECT row FROM quiver_conflicts WHERE id = ?1",
        [id],
        |r| r.get(0),
    )?;
    let raw = raw.ok_or_else(|| StoreError::Corrupt(format!("conflict {id} keeps no row")))?;
    serde_json::from_str(&raw).map_err(|e| StoreError::Corrupt(format!("conflict {id}: {e}")))
}

/// The end of a sweeping snapshot (sent to a replica holding less than its
/// sender compacted): a live row the snapshot did not bring, whose record
/// the sender's claimed versions cover, was deleted there and its tombstone
/// compacted. It is buried here too, under a tombstone of this store's that
/// replicas syncing only with this one then receive; if this replica (or a
/// third) wrote to it since, that write is held as a resurrection. Capture
/// must be off. Returns the rows taken away.
#[allow(clippy::too_many_arguments)]
pub(crate) fn sweep(
    conn: &Connection,
    sites: &mut Sites,
    t: &TableInfo,
    claimed: &VersionVector,
    own: SiteId,
    now: Hlc,
    report: &mut crate::ApplyReport,
    events: &mut Vec<StoreEvent>,
) -> Result<u64> {
    let rows: Vec<(Value, i64, i64, i64)> = conn
        .prepare_cached(
            "SELECT c.pk, c.site, c.dbv, c.cl FROM quiver_clock c
             WHERE c.tbl = ?1 AND c.col = '' AND c.cl % 2 = 1 AND NOT EXISTS (
               SELECT 1 FROM quiver_snapshot_seen s WHERE s.tbl = c.tbl AND s.pk = c.pk)",
        )?
        .query_map([t.id], |r| {
            Ok((from_ref(r.get_ref(0)?), r.get(1)?, r.get(2)?, r.get(3)?))
        })?
        .collect::<rusqlite::Result<_>>()?;
    let mut removed = 0;
    for (key, site, dbv, cl) in rows {
        let dot = Dot::new(sites.id(conn, site)?, dbv as u64);
        if !claimed.covers(&dot) {
            continue;
        }
        let Some(pk) = pk_values(&key, t.pk.len()) else {
            continue;
        };
        let state = rowstate::load(conn, sites, t, &key, &pk)?;
        let newer = state
            .cells
            .values()
            .flatten()
            .filter(|v| !claimed.covers(&v.dot))
            .max_by(|a, b| a.order(b))
            .cloned();
        removed += 1;
        let row = match &newer {
            Some(_) => rowstate::read_user_row(conn, t, &pk)?.unwrap_or_default(),
            None => BTreeMap::new(),
        };
        bury(
            conn,
            sites,
            t,
            &key,
            state,
            cl as u64,
            newer.as_ref().map(|w| (w, &row)),
            own,
            now,
            events,
        )?;
        if newer.is_some() {
            report.conflicts_detected += 1;
            report.conflicts_open += 1;
        } else {
            report.applied += 1;
        }
    }
    conn.prepare_cached("DELETE FROM quiver_snapshot_seen WHERE tbl = ?1")?
        .execute([t.id])?;
    Ok(removed)
}

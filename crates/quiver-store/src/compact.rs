//! Compaction on proof: a tombstone, or a record superseded by a newer life
//! of its row, is purged once every peer that holds the shard has
//! acknowledged a version vector covering it (causal stability). Peers not
//! heard from within the horizon stop holding it back; a replica whose
//! versions predate what this store purged later gets a snapshot (see
//! `changes.rs`), and its old writes to purged rows go to the conflicts
//! queue (see `apply.rs`). The file gives the space back by incremental
//! vacuum.

use std::collections::BTreeMap;
use std::time::Instant;

use quiver_core::{Dot, SiteId, VersionVector};
use rusqlite::{params, Connection};
use serde::Serialize;

use crate::catalog::TableInfo;
use crate::rowstate::Sites;
use crate::sqlvalue::{from_ref, P};
use crate::{triggers, wall_ms, Result, Store, StoreError};

/// The horizon used when none is set: 30 days.
pub const DEFAULT_PEER_HORIZON_DAYS: f64 = 30.0;

const MS_PER_DAY: f64 = 86_400_000.0;

/// Rows purged per transaction, so that an application writing to the same
/// file waits for one short transaction at a time, not for the whole pass.
const PURGE_CHUNK: usize = 2_000;

/// What to compact.
#[derive(Debug, Clone, Default)]
pub struct CompactOptions {
    /// One shard, or every shard.
    pub shard: Option<String>,
    /// Report what would be purged and change nothing.
    pub dry_run: bool,
    /// Overrides the store's horizon (days, fractions allowed).
    pub peer_horizon_days: Option<f64>,
    /// Purge at most this many tombstones in this pass (the daemon takes
    /// them in parts, so that syncs are served between them).
    pub max_tombstones: Option<usize>,
}

/// A peer whose acknowledgement holds records back.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct HeldBy {
    /// Site id (hex) and node name of the peer.
    pub site: String,
    pub node: String,
    /// When it last acknowledged (ms since the epoch): it holds back since then.
    pub since_ms: u64,
    /// Records it has not acknowledged yet.
    pub records: u64,
}

/// A peer silent past the horizon: it no longer holds compaction back.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct BeyondHorizon {
    pub site: String,
    pub node: String,
    pub last_ack_ms: u64,
}

/// What compaction did (or, in a dry run, would do) to one shard.
#[derive(Debug, Clone, Serialize, Default)]
pub struct ShardCompaction {
    pub shard: String,
    /// Clock records of the shard before and after.
    pub clock_records_before: u64,
    pub clock_records_after: u64,
    /// Tombstones purged (each a deleted row's last record).
    pub tombstones: u64,
    /// Cell records and sibling versions of an older life of their row.
    pub superseded: u64,
    /// Conflict records already resolved, every version of them acknowledged.
    pub conflicts: u64,
    /// Everything purged.
    pub purged: u64,
    /// Records that could go but for a peer's acknowledgement.
    pub held_back: u64,
    /// Who holds them back.
    pub held_by: Vec<HeldBy>,
    /// Peers past the horizon, ignored.
    pub beyond_horizon: Vec<BeyondHorizon>,
    /// Per table, the versions this store and every peer within the
    /// horizon hold (site id hex to db_version): what could be purged.
    pub stable: BTreeMap<String, BTreeMap<String, u64>>,
}

/// What `quiver compact` reports.
#[derive(Debug, Clone, Serialize)]
pub struct CompactReport {
    pub dry_run: bool,
    pub peer_horizon_days: f64,
    pub shards: Vec<ShardCompaction>,
    pub clock_records: u64,
    pub purged: u64,
    /// The file (with its WAL) before and after.
    pub bytes_before: u64,
    pub bytes_after: u64,
    /// How the space went back: `incremental vacuum`, `vacuum` (a store
    /// made before auto-vacuum, switched over once) or `none`.
    pub space: String,
    pub seconds: f64,
}

/// A clock's counts for `/metrics`, per shard.
#[derive(Debug, Clone, Serialize, Default, PartialEq)]
pub struct ClockStats {
    pub shard: String,
    pub clock_records: u64,
    pub tombstones: u64,
    /// Tombstones some peer within the horizon has not acknowledged.
    pub held_back: u64,
    /// The oldest version (db_version of its origin) of those, 0 if none.
    pub oldest_unacknowledged: u64,
}

/// One shard's acknowledgement picture at `now`.
struct Frontier {
    /// Per table (by id): what this store and every peer within the
    /// horizon hold of it.
    stable: BTreeMap<i64, VersionVector>,
    active: Vec<crate::PeerAck>,
    beyond: Vec<crate::PeerAck>,
}

impl Frontier {
    fn of(&self, tbl: i64) -> &VersionVector {
        static NOTHING: std::sync::OnceLock<VersionVector> = std::sync::OnceLock::new();
        self.stable
            .get(&tbl)
            .unwrap_or_else(|| NOTHING.get_or_init(VersionVector::new))
    }
}

fn frontier(store: &Store, shard: &str, tables: &[TableInfo], horizon_ms: u64) -> Result<Frontier> {
    let now = wall_ms();
    let (active, beyond): (Vec<_>, Vec<_>) = store
        .acks()?
        .into_iter()
        .filter(|a| a.shard == shard && a.site != store.site.to_hex())
        .partition(|a| now.saturating_sub(a.at_ms) <= horizon_ms);
    let own = store.table_versions(shard)?;
    let mut stable = BTreeMap::new();
    for t in tables {
        let mine = own.get(&t.name).cloned().unwrap_or_default();
        let vv = active
            .iter()
            .fold(mine, |acc, a| acc.meet(a.table_vv(&t.name)));
        stable.insert(t.id, vv);
    }
    Ok(Frontier {
        stable,
        active,
        beyond,
    })
}

/// A tombstone: its table, clock key, version and causal length.
struct Tomb {
    tbl: i64,
    key: quiver_core::Value,
    dot: Dot,
    cl: i64,
}

fn tombstones(conn: &Connection, sites: &mut Sites, t: &TableInfo) -> Result<Vec<Tomb>> {
    let rows: Vec<(quiver_core::Value, i64, i64, i64)> = conn
        .prepare_cached(
            "SELECT pk, site, dbv, cl FROM quiver_clock WHERE tbl = ?1 AND col = '' AND cl % 2 = 0",
        )?
        .query_map([t.id], |r| {
            Ok((from_ref(r.get_ref(0)?), r.get(1)?, r.get(2)?, r.get(3)?))
        })?
        .collect::<rusqlite::Result<_>>()?;
    rows.into_iter()
        .map(|(key, site, dbv, cl)| {
            Ok(Tomb {
                tbl: t.id,
                key,
                dot: Dot::new(sites.id(conn, site)?, dbv as u64),
                cl,
            })
        })
        .collect()
}

fn count(conn: &Connection, sql: &str, tbl: i64) -> Result<u64> {
    Ok(conn
        .prepare_cached(sql)?
        .query_row([tbl], |r| r.get::<_, i64>(0))? as u64)
}

/// Cell records and siblings of an older life than their row's record
/// (left by `INSERT OR REPLACE`, or by a delete), whose row record is
/// acknowledged by every peer: (count, and the statement deleting them).
const SUPERSEDED_CELLS: &str = "FROM quiver_clock c WHERE c.tbl = ?1 AND c.col <> '' AND EXISTS (
      SELECT 1 FROM quiver_clock r WHERE r.tbl = c.tbl AND r.pk = c.pk AND r.col = ''
      AND r.cl <> c.cl AND r.cl % 2 = 1 AND r.site = ?2 AND r.dbv <= ?3)";
const SUPERSEDED_SIBLINGS: &str = "FROM quiver_siblings c WHERE c.tbl = ?1 AND EXISTS (
      SELECT 1 FROM quiver_clock r WHERE r.tbl = c.tbl AND r.pk = c.pk AND r.col = ''
      AND r.cl <> c.cl AND r.cl % 2 = 1 AND r.site = ?2 AND r.dbv <= ?3)";

fn file_bytes(path: &std::path::Path) -> u64 {
    let mut wal = path.as_os_str().to_owned();
    wal.push("-wal");
    [path.as_os_str().to_owned(), wal]
        .iter()
        .filter_map(|p| std::fs::metadata(p).ok())
        .map(|m| m.len())
        .sum()
}

/// Whether a conflict's recorded versions (`site:db_version` labels) are
/// all covered by `stable`.
fn versions_stable(versions: &str, stable: &VersionVector) -> bool {
    let list: Vec<crate::ConflictVersion> = serde_json::from_str(versions).unwrap_or_default();
    !list.is_empty()
        && list.iter().all(|v| {
            v.version == crate::resurrect::DELETED
                || v.version
                    .split_once(':')
                    .and_then(|(s, d)| Some((s.parse::<SiteId>().ok()?, d.parse::<u64>().ok()?)))
                    .is_some_and(|(s, d)| stable.covers(&Dot::new(s, d)))
        })
}

impl Store {
    /// The horizon past which a silent peer stops holding compaction back.
    pub fn peer_horizon_days(&self) -> Result<f64> {
        Ok(self
            .meta("peer_horizon_days")?
            .and_then(|v| v.parse().ok())
            .unwrap_or(DEFAULT_PEER_HORIZON_DAYS))
    }

    /// Sets the horizon (the daemon writes its `peer_horizon_days` here, so
    /// `quiver status` and `quiver compact` use the same one).
    pub fn set_peer_horizon_days(&mut self, days: f64) -> Result<()> {
        if !(days.is_finite() && days > 0.0) {
            return Err(StoreError::InvalidValue(format!(
                "peer_horizon_days must be a positive number of days, not {days}"
            )));
        }
        self.set_meta("peer_horizon_days", &days.to_string())
    }

    /// The horizon in days and in milliseconds (`days` overrides the store's).
    pub(crate) fn horizon_ms(&self, days: Option<f64>) -> Result<(f64, u64)> {
        let days = match days {
            Some(d) if !(d.is_finite() && d > 0.0) => {
                return Err(StoreError::InvalidValue(format!(
                    "the peer horizon must be a positive number of days, not {d}"
                )))
            }
            Some(d) => d,
            None => self.peer_horizon_days()?,
        };
        Ok((days, (days * MS_PER_DAY) as u64))
    }

    /// Purges what every peer within the horizon has acknowledged, then
    /// gives the file's free pages back.
    pub fn compact(&mut self, opts: &CompactOptions) -> Result<CompactReport> {
        let started = Instant::now();
        let (days, horizon_ms) = self.horizon_ms(opts.peer_horizon_days)?;
        if let Some(s) = &opts.shard {
            if !self.shards()?.iter().any(|x| x == s) {
                return Err(StoreError::InvalidValue(format!(
                    "no shard {s:?} in this store"
                )));
            }
        }
        let bytes_before = file_bytes(&self.path);
        let shards: Vec<String> = match &opts.shard {
            Some(s) => vec![s.clone()],
            None => self.shards()?,
        };
        let mut out = Vec::new();
        let mut budget = opts.max_tombstones.unwrap_or(usize::MAX);
        for shard in shards {
            let r = self.compact_shard(&shard, horizon_ms, opts.dry_run, budget)?;
            budget = budget.saturating_sub(r.tombstones as usize);
            out.push(r);
        }
        let purged: u64 = out.iter().map(|s| s.purged).sum();
        let space = if opts.dry_run || purged == 0 {
            "none".to_string()
        } else {
            self.give_space_back()?
        };
        Ok(CompactReport {
            dry_run: opts.dry_run,
            peer_horizon_days: days,
            clock_records: out.iter().map(|s| s.clock_records_after).sum(),
            purged,
            shards: out,
            bytes_before,
            bytes_after: file_bytes(&self.path),
            space,
            seconds: started.elapsed().as_secs_f64(),
        })
    }

    fn compact_shard(
        &mut self,
        shard: &str,
        horizon_ms: u64,
        dry_run: bool,
        budget: usize,
    ) -> Result<ShardCompaction> {
        triggers::fold_pending(&self.conn)?;
        triggers::close_open_version(&self.conn)?;
        let tables = self.shard_tables(shard)?;
        let f = frontier(self, shard, &tables, horizon_ms)?;
        let mut sites = Sites::default();
        let mut report = ShardCompaction {
            shard: shard.to_string(),
            stable: tables
                .iter()
                .map(|t| {
                    let vv = f.of(t.id).iter().map(|(s, v)| (s.to_hex(), *v)).collect();
                    (t.name.clone(), vv)
                })
                .collect(),
            beyond_horizon: f
                .beyond
                .iter()
                .map(|a| BeyondHorizon {
                    site: a.site.clone(),
                    node: a.node.clone(),
                    last_ack_ms: a.at_ms,
                })
                .collect(),
            ..Default::default()
        };
        let mut held: BTreeMap<usize, u64> = BTreeMap::new();
        let mut purge: Vec<Tomb> = Vec::new();
        for t in &tables {
            report.clock_records_before += count(
                &self.conn,
                "SELECT count(*) FROM quiver_clock WHERE tbl = ?1",
                t.id,
            )?;
            for tomb in tombstones(&self.conn, &mut sites, t)? {
                if f.of(t.id).covers(&tomb.dot) {
                    purge.push(tomb);
                    continue;
                }
                report.held_back += 1;
                for (i, a) in f.active.iter().enumerate() {
                    if !a.table_vv(&t.name).covers(&tomb.dot) {
                        *held.entry(i).or_default() += 1;
                    }
                }
            }
        }
        report.held_by = held
            .into_iter()
            .map(|(i, records)| HeldBy {
                site: f.active[i].site.clone(),
                node: f.active[i].node.clone(),
                since_ms: f.active[i].at_ms,
                records,
            })
            .collect();
        // Past the budget they wait for the next pass.
        purge.truncate(budget);
        report.tombstones = purge.len() as u64;
        // Records of an older life, by the (site, version) of their row's
        // record: stable when that record is.
        let mut stable: BTreeMap<i64, Vec<(i64, u64)>> = BTreeMap::new();
        for t in &tables {
            let by_ix = f
                .of(t.id)
                .iter()
                .map(|(s, v)| Ok((sites.ix(&self.conn, s)?, *v)))
                .collect::<Result<_>>()?;
            stable.insert(t.id, by_ix);
        }
        for t in &tables {
            for (ix, v) in &stable[&t.id] {
                for sql in [SUPERSEDED_CELLS, SUPERSEDED_SIBLINGS] {
                    report.superseded += self
                        .conn
                        .prepare_cached(&format!("SELECT count(*) {sql}"))?
                        .query_row(params![t.id, ix, *v as i64], |r| r.get::<_, i64>(0))?
                        as u64;
                }
            }
        }
        let ids: Vec<i64> = tables.iter().map(|t| t.id).collect();
        let resolved: Vec<(i64, String)> = {
            let mut st = self.conn.prepare_cached(
                "SELECT id, tbl, versions FROM quiver_conflicts WHERE resolved_at IS NOT NULL",
            )?;
            let rows = st.query_map([], |r| {
                Ok((
                    r.get::<_, i64>(0)?,
                    r.get::<_, i64>(1)?,
                    r.get::<_, String>(2)?,
                ))
            })?;
            let mut out = Vec::new();
            for row in rows {
                let (id, tbl, versions) = row?;
                if ids.contains(&tbl) && versions_stable(&versions, f.of(tbl)) {
                    out.push((id, versions));
                }
            }
            out
        };
        report.conflicts = resolved.len() as u64;
        report.purged = report.tombstones + report.superseded + report.conflicts;
        if dry_run {
            report.clock_records_after = report.clock_records_before - report.tombstones;
            return Ok(report);
        }
        for chunk in purge.chunks(PURGE_CHUNK) {
            let tx = self
                .conn
                .transaction_with_behavior(rusqlite::TransactionBehavior::Immediate)?;
            // The highest purged version of each origin, and causal length,
            // per table, move with the purge itself: a peer holding less
            // may lack a delete this store can no longer send, and gets a
            // snapshot instead (see `changes.rs`); a row inserted here again
            // starts a life past it (see `triggers::FOLD`).
            let mut floors: BTreeMap<i64, (VersionVector, i64)> = BTreeMap::new();
            for tomb in chunk {
                // Still the record read above: a sync may have moved it since.
                let site = sites.ix(&tx, &tomb.dot.site)?;
                let gone = tx
                    .prepare_cached(
                        "DELETE FROM quiver_clock WHERE tbl = ?1 AND pk = ?2 AND col = ''
                         AND site = ?3 AND dbv = ?4 AND cl % 2 = 0",
                    )?
                    .execute(params![
                        tomb.tbl,
                        P(&tomb.key),
                        site,
                        tomb.dot.db_version as i64
                    ])?;
                if gone == 0 {
                    continue;
                }
                for sql in [
                    "DELETE FROM quiver_clock WHERE tbl = ?1 AND pk = ?2",
                    "DELETE FROM quiver_siblings WHERE tbl = ?1 AND pk = ?2",
                ] {
                    tx.prepare_cached(sql)?
                        .execute(params![tomb.tbl, P(&tomb.key)])?;
                }
                let (vv, cl) = floors.entry(tomb.tbl).or_default();
                vv.advance(tomb.dot.site, tomb.dot.db_version);
                *cl = (*cl).max(tomb.cl);
            }
            for (tbl, (vv, cl)) in floors {
                let mut floor = compacted_floor(&tx, tbl)?;
                floor.merge(&vv);
                tx.prepare_cached(
                    "INSERT INTO quiver_compacted(tbl, vv, cl) VALUES (?1, ?2, ?3)
                     ON CONFLICT(tbl) DO UPDATE SET vv = excluded.vv, cl = max(cl, excluded.cl)",
                )?
                .execute(params![
                    tbl,
                    serde_json::to_string(&floor)
                        .map_err(|e| StoreError::Corrupt(e.to_string()))?,
                    cl
                ])?;
            }
            tx.commit()?;
        }
        let tx = self
            .conn
            .transaction_with_behavior(rusqlite::TransactionBehavior::Immediate)?;
        for t in &tables {
            for (ix, v) in &stable[&t.id] {
                for del in [
                    format!(
                        "DELETE FROM quiver_clock WHERE (tbl, pk, col) IN (SELECT c.tbl, c.pk, c.col {SUPERSEDED_CELLS})"
                    ),
                    format!(
                        "DELETE FROM quiver_siblings WHERE (tbl, pk, col, site, dbv) IN
                         (SELECT c.tbl, c.pk, c.col, c.site, c.dbv {SUPERSEDED_SIBLINGS})"
                    ),
                ] {
                    tx.prepare_cached(&del)?
                        .execute(params![t.id, ix, *v as i64])?;
                }
            }
        }
        for (id, _) in &resolved {
            tx.prepare_cached("DELETE FROM quiver_conflicts WHERE id = ?1")?
                .execute([id])?;
        }
        tx.commit()?;
        for t in &tables {
            report.clock_records_after += count(
                &self.conn,
                "SELECT count(*) FROM quiver_clock WHERE tbl = ?1",
                t.id,
            )?;
        }
        Ok(report)
    }

    /// Frees the pages compaction emptied: incremental vacuum, after
    /// switching a store made before auto-vacuum over with one `VACUUM`.
    /// Then the WAL is copied back and cut to nothing.
    fn give_space_back(&mut self) -> Result<String> {
        let mode: i64 = self
            .conn
            .query_row("PRAGMA auto_vacuum", [], |r| r.get(0))?;
        let how = if mode == 2 {
            // It frees pages as it is stepped: step it to the end.
            let mut st = self.conn.prepare("PRAGMA incremental_vacuum")?;
            let mut rows = st.query([])?;
            while rows.next()?.is_some() {}
            "incremental vacuum"
        } else {
            self.conn
                .execute_batch("PRAGMA auto_vacuum = INCREMENTAL; VACUUM")?;
            "vacuum"
        };
        // Readers may keep part of the WAL; what they hold goes next time.
        let _ = self
            .conn
            .query_row("PRAGMA wal_checkpoint(TRUNCATE)", [], |_| Ok(()));
        Ok(how.to_string())
    }

    /// Per shard: clock records, tombstones, and the tombstones peers
    /// within the horizon still hold back (with the oldest such version).
    pub fn clock_stats(&self) -> Result<Vec<ClockStats>> {
        let (_, horizon_ms) = self.horizon_ms(None)?;
        let mut out = Vec::new();
        let mut sites = Sites::default();
        for shard in self.shards()? {
            let tables = self.shard_tables(&shard)?;
            let f = frontier(self, &shard, &tables, horizon_ms)?;
            let mut s = ClockStats {
                shard: shard.clone(),
                ..Default::default()
            };
            for t in tables {
                s.clock_records += count(
                    &self.conn,
                    "SELECT count(*) FROM quiver_clock WHERE tbl = ?1",
                    t.id,
                )?;
                for tomb in tombstones(&self.conn, &mut sites, &t)? {
                    s.tombstones += 1;
                    if !f.of(t.id).covers(&tomb.dot) {
                        s.held_back += 1;
                        let v = tomb.dot.db_version;
                        if s.oldest_unacknowledged == 0 || v < s.oldest_unacknowledged {
                            s.oldest_unacknowledged = v;
                        }
                    }
                }
            }
            out.push(s);
        }
        Ok(out)
    }
}

/// The highest version of each origin whose tombstones this store purged
/// from a table (empty if none).
pub(crate) fn compacted_floor(conn: &Connection, tbl: i64) -> Result<VersionVector> {
    use rusqlite::OptionalExtension;
    let json: Option<String> = conn
        .prepare_cached("SELECT vv FROM quiver_compacted WHERE tbl = ?1")?
        .query_row([tbl], |r| r.get(0))
        .optional()?;
    match json {
        None => Ok(VersionVector::new()),
        Some(j) => serde_json::from_str(&j)
            .map_err(|e| StoreError::Corrupt(format!("compaction floor of table {tbl}: {e}"))),
    }
}

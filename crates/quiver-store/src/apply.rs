//! Applying a batch of remote changes: validate everything, then merge row
//! group by row group in one transaction that also advances the cursor.

use std::collections::{BTreeMap, HashMap};

use quiver_core::merge::{merge_cell, merge_existence, visible_value, Verdict, Version};
use quiver_core::{Change, ChangeBatch, Hlc, Value, VersionVector};
use rusqlite::{params, OptionalExtension, Transaction};

use crate::catalog::{self, TableInfo};
use crate::conflicts;
use crate::events::StoreEvent;
use crate::rowstate::{self, RowState, Sites};
use crate::sqlvalue::{display_pk, pk_key, P};
use crate::{wall_ms, Result, Store, StoreError};

/// What applying a batch did (the same counts travel on the wire).
pub use quiver_core::wire::Report as ApplyReport;

fn version_of(c: &Change) -> Version {
    Version {
        dot: c.dot(),
        hlc: c.hlc,
        cl: c.cl,
        replaces: c.replaces.clone(),
        value: c.value.clone(),
    }
}

/// The WAL size past which an apply copies its pages into the database.
/// Our connections also cut the WAL file back to this size when it starts
/// over (`journal_size_limit`), so a file past it holds that much not yet
/// copied, not just the trace of an earlier large sync.
pub(crate) const WAL_CHECKPOINT_BYTES: u64 = 1 << 20;

/// A batch that would break a constraint of a user table (a row without
/// a value its NOT NULL column needs, a CHECK) is bad input from the peer,
/// refused whole like any other: its transaction rolled back.
fn refused_by_constraint(e: StoreError) -> StoreError {
    match e {
        StoreError::Sqlite(ref s)
            if s.sqlite_error_code() == Some(rusqlite::ErrorCode::ConstraintViolation) =>
        {
            StoreError::BatchRefused(format!("it would break a constraint of a table here: {s}"))
        }
        other => other,
    }
}

/// What validation decided about a batch.
struct Plan {
    tables: HashMap<String, TableInfo>,
    /// Indexes of changes whose table or column is unknown here (held).
    held: Vec<(usize, String)>,
    /// Indexes of changes for a table or column dropped here (ignored).
    ignored: Vec<usize>,
}

/// Checks a whole batch against the catalog before anything is written.
fn validate(conn: &rusqlite::Connection, batch: &ChangeBatch) -> Result<Plan> {
    let refuse = |m: String| Err(StoreError::BatchRefused(m));
    let dropped = crate::evolve::dropped_tables(conn)?;
    let mut tables: HashMap<String, TableInfo> = HashMap::new();
    // Ok(None): not known here (dropped, or not arrived yet).
    let mut lookup = |name: &str| -> Result<Option<TableInfo>> {
        if let Some(t) = tables.get(name) {
            return Ok(Some(t.clone()));
        }
        let Some(t) = catalog::load(conn, name)? else {
            return Ok(None);
        };
        if t.shard != batch.shard {
            return Err(StoreError::BatchRefused(format!(
                "table {name:?} belongs to shard {:?}, not {:?}",
                t.shard, batch.shard
            )));
        }
        tables.insert(name.to_string(), t.clone());
        Ok(Some(t))
    };
    for c in &batch.covered {
        lookup(&c.table)?;
    }
    if let Some(m) = &batch.snapshot {
        lookup(&m.table)?;
    }
    let mut plan_held = Vec::new();
    let mut ignored = Vec::new();
    for (i, ch) in batch.changes.iter().enumerate() {
        let at = |m: String| {
            format!(
                "change {i} ({}.{}): {m}",
                ch.table,
                ch.column.as_deref().unwrap_or("<row>")
            )
        };
        if ch.db_version == 0 || ch.cl == 0 {
            return refuse(at("db_version and causal length must be positive".into()));
        }
        let Some(t) = lookup(&ch.table)? else {
            if dropped.contains_key(&ch.table) {
                ignored.push(i);
            } else {
                crate::names::check(&ch.table)
                    .map_err(|e| StoreError::BatchRefused(at(e.to_string())))?;
                plan_held.push((i, format!("table {:?} is not known here yet", ch.table)));
            }
            continue;
        };
        if ch.pk.len() != t.pk.len() {
            return refuse(at(format!(
                "key has {} values, table has {}",
                ch.pk.len(),
                t.pk.len()
            )));
        }
        for (col, v) in t.pk.iter().zip(&ch.pk) {
            t.check_value(col, v)
                .map_err(|m| StoreError::BatchRefused(at(m)))?;
        }
        match &ch.column {
            None if ch.value != Value::Null => {
                return refuse(at("a row record carries no value".into()))
            }
            None => {}
            Some(name) => {
                let Some(col) = t.column(name) else {
                    if t.dropped.contains(name) {
                        // Not applied, but kept to pass on (see DROPPED_HERE).
                        ignored.push(i);
                        plan_held.push((i, crate::evolve::DROPPED_HERE.to_string()));
                    } else {
                        crate::names::check(name)
                            .map_err(|e| StoreError::BatchRefused(at(e.to_string())))?;
                        plan_held
                            .push((i, format!("column {}.{name} is not known here yet", t.name)));
                    }
                    continue;
                };
                if ch.alive() {
                    t.check_value(col, &ch.value)
                        .map_err(|m| StoreError::BatchRefused(at(m)))?;
                }
            }
        }
    }
    Ok(Plan {
        tables,
        held: plan_held,
        ignored,
    })
}

impl Store {
    /// Applies a batch of remote changes in one transaction.
    pub fn apply(&mut self, batch: &ChangeBatch) -> Result<ApplyReport> {
        self.apply_from(batch, None)
    }

    /// Applies a batch received from `peer` (a node name, for its cursor).
    pub fn apply_from(&mut self, batch: &ChangeBatch, peer: Option<&str>) -> Result<ApplyReport> {
        self.apply_inner(batch, peer, None)
            .map_err(refused_by_constraint)
    }

    /// Applies held changes whose schema has arrived, removing them from
    /// the held list in the same transaction.
    pub(crate) fn apply_replay(
        &mut self,
        batch: &ChangeBatch,
        seqs: &[i64],
    ) -> Result<ApplyReport> {
        self.apply_inner(batch, None, Some(seqs))
    }

    fn apply_inner(
        &mut self,
        batch: &ChangeBatch,
        peer: Option<&str>,
        replay: Option<&[i64]>,
    ) -> Result<ApplyReport> {
        self.refresh_schema()?;
        let plan = validate(&self.conn, batch)?;
        let tables = &plan.tables;
        let set_aside: std::collections::HashSet<usize> = plan
            .held
            .iter()
            .map(|(i, _)| *i)
            .chain(plan.ignored.iter().copied())
            .collect();
        // Ignored changes of a dropped column are also in `held`: counted once.
        let ignored_cells = plan.ignored.len() as u64;
        let changes: std::borrow::Cow<'_, [Change]> = if set_aside.is_empty() {
            std::borrow::Cow::Borrowed(&batch.changes)
        } else {
            std::borrow::Cow::Owned(
                batch
                    .changes
                    .iter()
                    .enumerate()
                    .filter(|(i, _)| !set_aside.contains(i))
                    .map(|(_, c)| c.clone())
                    .collect(),
            )
        };
        if let Some(max) = batch.changes.iter().map(|c| c.hlc).max() {
            self.clock.observe(max, wall_ms())?;
        }
        let floor = self.clock.last().successor();
        let mut report = ApplyReport::default();
        let mut events = Vec::new();
        let tx = self
            .conn
            .transaction_with_behavior(rusqlite::TransactionBehavior::Immediate)?;
        crate::triggers::fold_pending(&tx)?;
        for (i, reason) in &plan.held {
            let kept = crate::evolve::hold(&tx, &batch.shard, &batch.changes[*i], reason)?;
            if kept && reason != crate::evolve::DROPPED_HERE {
                report.held += 1;
            }
        }
        report.stale += ignored_cells;
        if let Some(seqs) = replay {
            let mut del = tx.prepare_cached("DELETE FROM quiver_held WHERE seq = ?1")?;
            for s in seqs {
                del.execute([s])?;
            }
        }
        tx.execute(
            "UPDATE quiver_state SET applying = 1, hlc_floor = max(hlc_floor, ?1)",
            [floor.as_i64()],
        )?;
        let mut sites = Sites::default();
        // A snapshot for a replica holding less than its sender compacted:
        // the keys it brings are noted, so that at its end the rows it did
        // not bring can follow the source (see `resurrect`).
        let sweep = batch
            .snapshot
            .as_ref()
            .filter(|m| m.sweep)
            .and_then(|m| tables.get(&m.table))
            .map(|t| t.id);
        if let Some(m) = &batch.snapshot {
            if let Some(t) = tables.get(&m.table) {
                // The keys noted belong to one sweeping stream: the one
                // whose mark holds these versions. Any other mark (another
                // stream, or one that does not sweep) starts them over.
                let versions = serde_json::to_string(&m.versions)
                    .map_err(|e| StoreError::Corrupt(e.to_string()))?;
                let stored: Option<(bool, String)> = tx
                    .prepare_cached("SELECT sweep, vv FROM quiver_snapshots WHERE tbl = ?1")?
                    .query_row([t.id], |r| Ok((r.get(0)?, r.get(1)?)))
                    .optional()?;
                let other = stored.is_some_and(|(sweeps, vv)| !sweeps || vv != versions);
                if !m.sweep || other {
                    tx.prepare_cached("DELETE FROM quiver_snapshot_seen WHERE tbl = ?1")?
                        .execute([t.id])?;
                }
            }
        }
        if let (Some(tid), Some(m)) = (sweep, &batch.snapshot) {
            let mut seen = tx.prepare_cached(
                "INSERT OR IGNORE INTO quiver_snapshot_seen(tbl, pk) VALUES (?1, ?2)",
            )?;
            for c in changes.iter().filter(|c| c.table == m.table) {
                seen.execute(params![tid, P(&pk_key(&c.pk))])?;
            }
        }
        // Tables compacted here, with what this store holds of them: a
        // write to a row of theirs with no record here may be to a row
        // deleted and compacted away.
        let mut compacted = HashMap::new();
        for t in tables.values() {
            if !crate::compact::compacted_floor(&tx, t.id)?.is_empty() {
                compacted.insert(
                    t.id,
                    crate::changes::table_vv(&tx, &mut sites, t, self.site)?,
                );
            }
        }
        let ctx = RowCtx {
            replay: replay.is_some(),
            own: self.site,
            now: floor,
            compacted: &compacted,
        };
        let quiet = if crate::triggers::only_ours(&tx, tables.keys().map(String::as_str))? {
            Some(crate::triggers::TriggersOff::new(&tx)?)
        } else {
            None
        };
        let mut start = 0;
        while start < changes.len() {
            let first = &changes[start];
            let end = changes[start..]
                .iter()
                .position(|c| c.table != first.table || c.pk != first.pk)
                .map_or(changes.len(), |n| start + n);
            let t = &tables[&first.table];
            apply_row(
                &tx,
                &mut sites,
                t,
                &changes[start..end],
                &ctx,
                &mut report,
                &mut events,
            )?;
            start = end;
        }
        // The claims that end a sweeping snapshot (they come with its
        // mark), the first time they arrive: a batch applied again claims
        // nothing new, and the keys noted are gone.
        if let Some(t) = sweep.and_then(|id| tables.values().find(|t| t.id == id)) {
            let mut claimed = VersionVector::new();
            for c in batch.covered.iter().filter(|c| c.table == t.name) {
                claimed.advance(c.site, c.version);
            }
            let held = crate::changes::table_vv(&tx, &mut sites, t, self.site)?;
            if !claimed.is_empty() && !held.dominates(&claimed) {
                crate::resurrect::sweep(
                    &tx,
                    &mut sites,
                    t,
                    &claimed,
                    self.site,
                    floor,
                    &mut report,
                    &mut events,
                )?;
            }
        }
        drop(quiet);
        tx.execute("UPDATE quiver_state SET applying = 0", [])?;
        crate::references::keep_whole(&tx, tables, &events)?;
        if let Some(m) = &batch.snapshot {
            // Kept with the rows it marks, so a sync cut after this commit
            // resumes past them.
            // A sweeping stream is never resumed, but its mark names the
            // stream its noted keys belong to: kept even before any key.
            let placeholder = Value::Blob(Vec::new());
            let after = m.after.as_ref().or(m.sweep.then_some(&placeholder));
            if let (Some(t), Some(after)) = (tables.get(&m.table), after) {
                let vv = serde_json::to_string(&m.versions)
                    .map_err(|e| StoreError::Corrupt(e.to_string()))?;
                tx.prepare_cached(
                    "INSERT INTO quiver_snapshots(tbl, after, vv, sweep) VALUES (?1, ?2, ?3, ?4)
                     ON CONFLICT(tbl) DO UPDATE SET after = excluded.after, vv = excluded.vv,
                       sweep = excluded.sweep",
                )?
                .execute(params![t.id, P(after), vv, sweep == Some(t.id)])?;
            }
        }
        for c in &batch.covered {
            // A table dropped here, or not known yet: nothing to claim.
            let Some(t) = tables.get(&c.table) else {
                continue;
            };
            // Claims end a snapshot: nothing of it is left to resume.
            tx.prepare_cached("DELETE FROM quiver_snapshots WHERE tbl = ?1")?
                .execute([t.id])?;
            tx.prepare_cached("DELETE FROM quiver_snapshot_seen WHERE tbl = ?1")?
                .execute([t.id])?;
            if c.site == self.site {
                continue;
            }
            let ix = sites.ix(&tx, &c.site)?;
            tx.prepare_cached(
                "INSERT INTO quiver_vv(tbl, site, dbv) VALUES (?1, ?2, ?3)
                 ON CONFLICT(tbl, site) DO UPDATE SET dbv = max(dbv, excluded.dbv)",
            )?
            .execute(params![t.id, ix, c.version as i64])?;
        }
        if let Some(peer) = peer {
            let vv = crate::changes::shard_vv(&tx, &mut sites, &batch.shard, self.site)?;
            let json =
                serde_json::to_string(&vv).map_err(|e| StoreError::Corrupt(e.to_string()))?;
            tx.execute(
                "INSERT INTO quiver_peer_cursors(peer, shard, received, updated_at) VALUES (?1, ?2, ?3, ?4)
                 ON CONFLICT(peer, shard) DO UPDATE SET received = excluded.received, updated_at = excluded.updated_at",
                params![peer, batch.shard, json, wall_ms() as i64],
            )?;
        }
        crate::triggers::close_open_version(&tx)?;
        tx.commit()?;
        // A burial (see `resurrect`) is a local delete peers must hear of.
        if report.applied > 0 || report.conflicts_open > 0 {
            self.changes += 1;
            // Each batch's pages go to the database file now, while no one
            // waits: otherwise the WAL grows until some commit crosses the
            // autocheckpoint threshold and copies it all, and that commit
            // may be an application's own single-row write (SQLite's
            // default threshold is 1,000 pages), which would stall on a
            // sync's worth of pages. PASSIVE never waits for readers or
            // writers; what it cannot copy now, the next one does. Only once
            // the WAL holds more than 1 MiB (well below the 4 MiB at which an
            // application's connection checkpoints by default), so that a live link's small
            // batches do not each pay a checkpoint's disk flushes.
            let mut wal = self.path.as_os_str().to_owned();
            wal.push("-wal");
            if std::fs::metadata(&wal).is_ok_and(|m| m.len() > WAL_CHECKPOINT_BYTES) {
                let _ = self
                    .conn
                    .query_row("PRAGMA wal_checkpoint(PASSIVE)", [], |_| Ok(()));
            }
        }
        self.revision = self.read_revision()?;
        for e in events {
            self.events.emit(e);
        }
        Ok(report)
    }
}

/// What every row of a batch shares.
struct RowCtx<'a> {
    /// Held changes replayed (see [`apply_row`]).
    replay: bool,
    own: quiver_core::SiteId,
    /// A clock reading past every version of the batch.
    now: Hlc,
    /// Tables compacted here, with what this store holds of them.
    compacted: &'a HashMap<i64, VersionVector>,
}

/// Of a row group for a row with no record here, in a compacted table: the
/// newest live write that built on versions this store holds (so the row
/// was here, and only compaction can have taken its record), unless the
/// group brings a new life after a delete (causal length 3 or more).
fn resurrection<'c>(group: &'c [Change], held: &VersionVector) -> Option<&'c Change> {
    if group.iter().any(|c| c.is_existence() && c.cl >= 3) {
        return None;
    }
    group
        .iter()
        .filter(|c| {
            c.alive()
                && !c.replaces.is_empty()
                && c.replaces
                    .iter()
                    .all(|(s, v)| held.covers(&quiver_core::Dot::new(*s, *v)))
        })
        .max_by_key(|c| c.hlc)
}

/// Merges one row group: the existence record first, then the cells.
/// Replaying held changes, a cell is merged by what its versions replaced
/// alone: the row's knowledge moved past them while they were held.
fn apply_row(
    tx: &Transaction<'_>,
    sites: &mut Sites,
    t: &TableInfo,
    group: &[Change],
    ctx: &RowCtx<'_>,
    report: &mut ApplyReport,
    events: &mut Vec<StoreEvent>,
) -> Result<()> {
    let pk = &group[0].pk;
    let key = pk_key(pk);
    let before = rowstate::load(tx, sites, t, &key, pk)?;
    // A row with no record in a compacted table: what this store already
    // holds of it was purged (it is not brought back), and a live write
    // building on it is held for review (see `resurrect`).
    let mut kept: Vec<Change> = Vec::new();
    let group = match ctx.compacted.get(&t.id) {
        Some(held) if before.existence.is_none() => {
            kept.extend(group.iter().filter(|c| !held.covers(&c.dot())).cloned());
            report.stale += (group.len() - kept.len()) as u64;
            if let Some(write) = resurrection(&kept, held) {
                let row = kept
                    .iter()
                    .filter_map(|c| Some((c.column.clone()?, c.value.clone())))
                    .collect();
                crate::resurrect::bury(
                    tx,
                    sites,
                    t,
                    &key,
                    before,
                    write.cl,
                    Some((&version_of(write), &row)),
                    ctx.own,
                    ctx.now,
                    events,
                )?;
                report.stale += kept.len() as u64;
                report.conflicts_detected += 1;
                report.conflicts_open += 1;
                return Ok(());
            }
            if kept.is_empty() {
                return Ok(());
            }
            &kept[..]
        }
        _ => group,
    };
    let known = before.know.clone();
    let mut state = before.clone();
    let mut changed = false;
    let mut tally = |v: Verdict, report: &mut ApplyReport| match v {
        Verdict::Duplicate => report.duplicates += 1,
        Verdict::Stale => report.stale += 1,
        Verdict::FastForward | Verdict::Concurrent => {
            report.applied += 1;
            changed = true;
        }
    };
    let mut fresh_life = false;
    for ch in group.iter().filter(|c| c.is_existence()) {
        let out = merge_existence(state.existence.as_ref(), version_of(ch), &known);
        tally(out.verdict, report);
        if out.new_life {
            state.cells.clear();
            fresh_life = true;
        }
        state.existence = Some(out.record);
    }
    let row_cl = state.existence.as_ref().map_or(0, |e| e.cl);
    let mut conflicted: Vec<(String, Vec<Version>, Vec<Version>)> = Vec::new();
    for ch in group.iter().filter(|c| !c.is_existence()) {
        let col_name = ch.column.as_deref().unwrap_or_default();
        if ch.cl != row_cl || !state.alive() {
            tally(Verdict::Stale, report);
            continue;
        }
        let Some(col) = t.column(col_name) else {
            continue;
        };
        let held = state.cells.get(col_name).cloned().unwrap_or_default();
        let nothing = quiver_core::VersionVector::new();
        let out = merge_cell(
            &held,
            version_of(ch),
            if ctx.replay { &nothing } else { &known },
            t.policy(col),
            t.column_kind(col),
        );
        tally(out.verdict, report);
        // Concurrent versions that agree on the value are no conflict to report.
        let disagree = out.contenders.windows(2).any(|w| w[0].value != w[1].value);
        if out.verdict == Verdict::Concurrent && disagree {
            conflicted.push((
                col_name.to_string(),
                out.contenders.clone(),
                out.versions.clone(),
            ));
        } else if out.verdict == Verdict::FastForward && held.len() > 1 {
            conflicts::close_open(tx, t, &key, col_name, "replaced by a remote write")?;
        }
        state.cells.insert(col_name.to_string(), out.versions);
    }
    // A new life from a writer that did not know a column added since
    // says nothing about it: the column shows its default, under a version
    // any real write replaces.
    if fresh_life && state.alive() {
        if let Some(ex) = &state.existence {
            for c in t.columns.iter().filter(|c| c.added() > 0) {
                state
                    .cells
                    .entry(c.name.clone())
                    .or_insert_with(|| vec![crate::evolve::bottom(ex, c)]);
            }
        }
    }
    for ch in group {
        state.know.advance(ch.site, ch.db_version);
        state.know.merge(&ch.replaces);
    }
    let visible = |s: &RowState| -> BTreeMap<String, Value> {
        t.columns
            .iter()
            .map(|c| {
                let versions = s.cells.get(&c.name).map(Vec::as_slice).unwrap_or(&[]);
                (
                    c.name.clone(),
                    visible_value(versions, t.policy(c), t.column_kind(c)),
                )
            })
            .collect()
    };
    let after_visible = visible(&state);
    let shown_changed =
        before.alive() != state.alive() || (before.alive() && visible(&before) != after_visible);
    if changed || state.know != before.know {
        rowstate::store(
            tx,
            sites,
            t,
            &key,
            pk,
            &state,
            shown_changed.then_some(&after_visible),
            before.existence.is_none(),
        )?;
    }
    for (col, contenders, kept) in conflicted {
        let strategy = t.column(&col).map_or(t.strategy, |c| t.policy(c));
        let id = conflicts::record(
            tx,
            t,
            &key,
            &col,
            &contenders,
            &kept,
            Hlc::new(wall_ms(), 0),
        )?;
        report.conflicts_detected += 1;
        if strategy.keeps_open() {
            report.conflicts_open += 1;
        } else {
            report.conflicts_resolved += 1;
        }
        events.push(StoreEvent::Conflict {
            id,
            table: t.name.clone(),
            pk: display_pk(pk),
            column: col,
            strategy,
            open: strategy.keeps_open(),
        });
    }
    if shown_changed {
        events.push(StoreEvent::RemoteChange {
            table: t.name.clone(),
            shard: t.shard.clone(),
            pk: display_pk(pk),
            deleted: !state.alive(),
        });
    }
    Ok(())
}

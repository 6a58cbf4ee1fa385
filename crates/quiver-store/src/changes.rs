//! Extracting what a peer lacks: per table and origin site, the changes
//! with `peer < version <= own`, streamed in bounded batches by keyset
//! pagination (nothing is loaded whole), each batch ending on a row
//! boundary and saying how far the receiver may advance its cursor.

use std::collections::BTreeMap;

use quiver_core::merge::Version;
use quiver_core::{Change, ChangeBatch, Covered, SiteId, SnapshotMark, Value, VersionVector};
use rusqlite::{params, Connection};

use crate::catalog::TableInfo;
use crate::rowstate::{self, RowState, Sites};
use crate::sqlvalue::{pk_values, P};
use crate::{triggers, Result, Store, StoreError};

/// Bounds on one batch.
#[derive(Debug, Clone, Copy)]
pub struct StreamLimits {
    pub max_changes: usize,
    pub max_bytes: usize,
}

impl Default for StreamLimits {
    fn default() -> Self {
        StreamLimits {
            max_changes: 2000,
            max_bytes: 4 << 20,
        }
    }
}

/// One (table, origin site) range to send.
struct Segment {
    table: TableInfo,
    site: SiteId,
    site_ix: i64,
    from: u64,
    to: u64,
    /// The requester's knowledge of this table.
    theirs: VersionVector,
    /// Whether this store holds changes of the table it cannot apply yet.
    held: bool,
    /// A snapshot of the whole table (see [`snapshot_wanted`]): its rows
    /// in key order, then these claims (what the store held when the
    /// stream began). `site`, `from` and `to` are unused.
    snapshot: Option<VersionVector>,
    /// A snapshot continued from a receiver's mark: the rows up to this
    /// key arrived in an earlier stream.
    resume_after: Option<Value>,
    /// With `resume_after`: what the rows up to that key held when they
    /// were sent (the meet of the mark's versions and this store's). Those
    /// of them written since go again first.
    resume_since: Option<VersionVector>,
    /// How many rows a snapshot segment sends, counted when it starts.
    rows: Option<u64>,
    /// A snapshot for a requester holding less than this store compacted
    /// (see [`SnapshotMark::sweep`]).
    sweep: bool,
}

impl Segment {
    /// Where the scan of this segment starts.
    fn start(&self) -> Cursor {
        match &self.snapshot {
            Some(_) => Cursor::Snapshot {
                after: self.resume_after.clone(),
            },
            None => Cursor::Held { after: 0 },
        }
    }
}

/// Whether a peer holding `theirs` of a table gets a snapshot of it (its
/// current rows in key order, each with its clock records) rather than
/// history (per origin site, in version order): when it holds nothing of
/// any site this store has something of. The records sent are the same
/// (the clock keeps only the newest version of each cell), but a receiver
/// takes them in key order, so its clock and its tables grow at their end
/// instead of at random places, and it claims the versions once, at the
/// end.
fn snapshot_wanted(own: &VersionVector, theirs: &VersionVector) -> bool {
    let mut any = false;
    for (site, v) in own.iter() {
        if *v > 0 {
            if theirs.get(site) > 0 {
                return false;
            }
            any = true;
        }
    }
    any
}

/// Where the scan of the current segment stands.
enum Cursor {
    /// Changes held here for a column this store does not know, passed on
    /// by range (past `after`, a `quiver_held.seq`), a page at a time.
    Held {
        after: i64,
    },
    Siblings,
    Clock {
        after: Option<(i64, Value)>,
    },
    /// A snapshot segment, past this key of the clock.
    Snapshot {
        after: Option<Value>,
    },
}

/// A stream of change batches; an iterator of `Result<ChangeBatch>`.
pub struct ChangeStream<'s> {
    conn: &'s Connection,
    shard: String,
    segments: Vec<Segment>,
    seg: usize,
    cursor: Cursor,
    limits: StreamLimits,
    sites: Sites,
    done: bool,
    /// This store's site id, and the newest of its own db_versions sealed
    /// when the current batch was read (see [`sealed_bound`]).
    own: SiteId,
    sealed: i64,
    /// The highest version of the current segment that may be claimed:
    /// below the first row skipped for a version still open.
    cap: Option<i64>,
    /// Rows of the current snapshot segment skipped for a version still
    /// open: tried again at its end.
    skipped: Vec<Value>,
    /// The key through which every row of the current snapshot segment
    /// has been sent (it stops at the first row skipped).
    sent_through: Option<Value>,
    /// Of a resumed snapshot segment: the rows up to the mark's key written
    /// since they were sent, still to go again (`None`: not read yet), and
    /// whether none of them was skipped.
    catchup: Option<Vec<Value>>,
    catchup_clean: bool,
}

/// The newest of this store's own db_versions that no write can change
/// any more: sealed, and none of its inserts still waiting in the log (a
/// stream reads only the clock, and a claim is a promise to send). One
/// statement, so both are read from one snapshot.
fn sealed_bound(conn: &Connection) -> Result<i64> {
    let (open, oldest_logged): (i64, Option<i64>) = conn.query_row(
        "SELECT dbv, (SELECT p.dbv FROM quiver_pending p ORDER BY p.seq LIMIT 1) FROM quiver_state",
        [],
        |r| Ok((r.get(0)?, r.get(1)?)),
    )?;
    Ok(oldest_logged.map_or(open, |l| l.min(open)) - 1)
}

/// The store's knowledge of one table: its own closed versions plus what it
/// holds of every other site.
pub(crate) fn table_vv(
    conn: &Connection,
    sites: &mut Sites,
    t: &TableInfo,
    own: SiteId,
) -> Result<VersionVector> {
    let mut vv = VersionVector::new();
    vv.set(own, sealed_bound(conn)?.max(0) as u64);
    let rows: Vec<(i64, i64)> = conn
        .prepare_cached("SELECT site, dbv FROM quiver_vv WHERE tbl = ?1")?
        .query_map([t.id], |r| Ok((r.get(0)?, r.get(1)?)))?
        .collect::<rusqlite::Result<_>>()?;
    for (ix, dbv) in rows {
        if ix != 0 {
            vv.advance(sites.id(conn, ix)?, dbv as u64);
        }
    }
    Ok(vv)
}

/// What the store can claim for a whole shard: the meet over its tables.
pub(crate) fn shard_vv(
    conn: &Connection,
    sites: &mut Sites,
    shard: &str,
    own: SiteId,
) -> Result<VersionVector> {
    let mut out: Option<VersionVector> = None;
    for t in crate::catalog::load_all(conn)?
        .iter()
        .filter(|t| t.shard == shard)
    {
        let vv = table_vv(conn, sites, t, own)?;
        out = Some(match out {
            None => vv,
            Some(acc) => acc.meet(&vv),
        });
    }
    Ok(out.unwrap_or_else(|| {
        let mut vv = VersionVector::new();
        vv.set(own, 0);
        vv
    }))
}

impl Store {
    /// This store's version vector for a shard (what it can claim to hold
    /// of every table in it).
    pub fn version_vector(&self, shard: &str) -> Result<VersionVector> {
        triggers::fold_pending(&self.conn)?;
        triggers::close_open_version(&self.conn)?;
        shard_vv(&self.conn, &mut Sites::default(), shard, self.site)
    }

    /// Per table of a shard, what this store holds.
    pub fn table_versions(&self, shard: &str) -> Result<BTreeMap<String, VersionVector>> {
        triggers::fold_pending(&self.conn)?;
        triggers::close_open_version(&self.conn)?;
        let mut sites = Sites::default();
        let mut out = BTreeMap::new();
        for t in self.shard_tables(shard)? {
            out.insert(
                t.name.clone(),
                table_vv(&self.conn, &mut sites, &t, self.site)?,
            );
        }
        Ok(out)
    }

    /// The snapshots of `shard`'s tables received in part here: the mark
    /// of the last batch committed of each, to hand back to the sender.
    pub fn snapshot_progress(&self, shard: &str) -> Result<Vec<SnapshotMark>> {
        let mut st = self.conn.prepare_cached(
            "SELECT t.name, s.after, s.vv FROM quiver_snapshots s
             JOIN quiver_tables t ON t.id = s.tbl WHERE t.shard = ?1 AND s.sweep = 0
             ORDER BY t.name",
        )?;
        let rows = st.query_map([shard], |r| {
            Ok((
                r.get::<_, String>(0)?,
                crate::sqlvalue::from_ref(r.get_ref(1)?),
                r.get::<_, String>(2)?,
            ))
        })?;
        let mut out = Vec::new();
        for row in rows {
            let (table, after, vv) = row?;
            let versions = serde_json::from_str(&vv)
                .map_err(|e| StoreError::Corrupt(format!("snapshot progress of {table}: {e}")))?;
            out.push(SnapshotMark {
                table,
                after: Some(after),
                versions,
                rows: 0,
                sweep: false,
            });
        }
        Ok(out)
    }

    /// Streams every change of `shard` that a peer knowing `theirs` lacks.
    pub fn changes_since(&self, shard: &str, theirs: &VersionVector) -> Result<ChangeStream<'_>> {
        let per_table = self
            .shard_tables(shard)?
            .into_iter()
            .map(|t| (t.name, theirs.clone()))
            .collect();
        self.changes_since_tables(shard, &per_table, StreamLimits::default())
    }

    /// Streams the changes of the named tables of `shard` that a peer
    /// holding `theirs` (per table) lacks.
    pub fn changes_since_tables(
        &self,
        shard: &str,
        theirs: &BTreeMap<String, VersionVector>,
        limits: StreamLimits,
    ) -> Result<ChangeStream<'_>> {
        triggers::fold_pending(&self.conn)?;
        triggers::close_open_version(&self.conn)?;
        let mut sites = Sites::default();
        let mut segments = Vec::new();
        for (name, their_vv) in theirs {
            // A table the peer has and this store dropped (or never had):
            // nothing of it to send.
            let t = match self.table(name) {
                Ok(t) => t,
                Err(StoreError::NoSuchTable(_)) => continue,
                Err(e) => return Err(e),
            };
            if t.shard != shard {
                return Err(StoreError::NoSuchTable(format!(
                    "{name} (in shard {shard})"
                )));
            }
            let own = table_vv(&self.conn, &mut sites, &t, self.site)?;
            let held: bool = self.conn.query_row(
                "SELECT EXISTS (SELECT 1 FROM quiver_held WHERE tbl = ?1)",
                [&t.name],
                |r| r.get(0),
            )?;
            // Changes held here for a column this store does not know go by
            // version range, which only history sends.
            // A peer holding less of some origin than this store compacted
            // may lack a delete whose tombstone is gone: only the current
            // rows tell it (and it drops, or holds for review, those it
            // has that they lack; see `resurrect`).
            let floor = crate::compact::compacted_floor(&self.conn, t.id)?;
            let behind = floor.iter().any(|(s, v)| their_vv.get(s) < *v);
            if !held && (behind || snapshot_wanted(&own, their_vv)) {
                segments.push(Segment {
                    table: t.clone(),
                    site: self.site,
                    site_ix: 0,
                    from: 0,
                    to: 0,
                    theirs: their_vv.clone(),
                    held,
                    snapshot: Some(own),
                    resume_after: None,
                    resume_since: None,
                    rows: None,
                    sweep: behind,
                });
                continue;
            }
            for (site, from, to) in own.ahead_of(their_vv) {
                let site_ix = if site == self.site {
                    0
                } else {
                    sites.find(&self.conn, &site)?.unwrap_or(-1)
                };
                segments.push(Segment {
                    table: t.clone(),
                    site,
                    site_ix,
                    from,
                    to,
                    theirs: their_vv.clone(),
                    held,
                    snapshot: None,
                    resume_after: None,
                    resume_since: None,
                    rows: None,
                    sweep: false,
                });
            }
        }
        let cursor = segments
            .first()
            .map_or(Cursor::Held { after: 0 }, Segment::start);
        Ok(ChangeStream {
            conn: &self.conn,
            shard: shard.to_string(),
            segments,
            seg: 0,
            cursor,
            limits: StreamLimits {
                max_changes: limits.max_changes.max(1),
                max_bytes: limits.max_bytes.max(1),
            },
            sites,
            done: false,
            own: self.site,
            sealed: 0,
            cap: None,
            skipped: Vec::new(),
            sent_through: None,
            catchup: None,
            catchup_clean: true,
        })
    }
}

fn approx_size(c: &Change) -> usize {
    let v = match &c.value {
        Value::Text(t) => t.len(),
        Value::Blob(b) => b.len(),
        _ => 8,
    };
    64 + v + c.table.len() + c.replaces.len() * 24
}

impl ChangeStream<'_> {
    /// Appends the changes of one row the requester lacks, but none of
    /// this store's own versions in a db_version not sealed yet: another
    /// write in that version rewrites them in place, under the same dot,
    /// and a receiver that took the first would take the rewrite for a
    /// duplicate. They go once sealed, in a later stream. `None` when the
    /// row's very existence record is such a version: nothing of the row
    /// can go before it (a receiver counts every dot of a row group as
    /// seen); nor when the receiver lacks the row's life and a cell would
    /// be left out (it would show a value nobody wrote). The caller then
    /// skips the row and claims the segment only below it.
    fn emit_row(
        &mut self,
        seg_i: usize,
        key: &Value,
        at_dbv: i64,
        out: &mut Vec<Change>,
    ) -> Result<Option<usize>> {
        let seg = &self.segments[seg_i];
        let t = &seg.table;
        let pk = pk_values(key, t.pk.len())
            .ok_or_else(|| StoreError::Corrupt(format!("bad key in clock of {}", t.name)))?;
        let state: RowState = rowstate::load(self.conn, &mut self.sites, t, key, &pk)?;
        let Some(ex) = &state.existence else {
            return Ok(Some(0));
        };
        let (own, sealed) = (self.own, self.sealed);
        let open = |v: &Version| v.dot.site == own && v.dot.db_version as i64 > sealed;
        if open(ex) || (!seg.theirs.covers(&ex.dot) && state.cells.values().flatten().any(open)) {
            return Ok(None);
        }
        // Send each row once per segment: at the lowest version of this
        // site the requester lacks.
        if at_dbv >= 0 {
            let lowest = std::iter::once(ex)
                .chain(state.cells.values().flatten())
                .filter(|v| v.dot.site == seg.site && v.dot.db_version > seg.from)
                .map(|v| v.dot.db_version)
                .min();
            if lowest.is_some_and(|l| l != at_dbv as u64) {
                return Ok(Some(0));
            }
        }
        let mut bytes = 0;
        let start = out.len();
        let mut push = |c: Change, out: &mut Vec<Change>| {
            bytes += approx_size(&c);
            out.push(c);
        };
        push(ex.to_change(&t.name, &pk, None), out);
        // Changes this store holds for the row, for a column it does not
        // know, travel with the rest of the row: a receiver taking the
        // row's other cells of the same transaction counts that
        // transaction as seen, and would take them for duplicates later.
        if seg.held {
            let rows: Vec<String> = self
                .conn
                .prepare_cached(
                    "SELECT change FROM quiver_held WHERE tbl = ?1 AND pk = ?2 ORDER BY seq",
                )?
                .query_map(params![t.name, P(key)], |r| r.get(0))?
                .collect::<rusqlite::Result<_>>()?;
            for body in rows {
                let c = crate::evolve::decode_held(&body)?;
                if !seg.theirs.covers(&c.dot()) {
                    push(c, out);
                }
            }
        }
        for (col, versions) in &state.cells {
            // A version 0 is a column's default before anyone wrote it
            // (see `evolve::bottom`): every replica has it, none sends it.
            for v in versions
                .iter()
                .filter(|v| v.dot.db_version > 0 && !seg.theirs.covers(&v.dot) && !open(v))
            {
                push(v.to_change(&t.name, &pk, Some(col)), out);
            }
        }
        // Nothing but a record the requester holds: nothing to send (a
        // snapshot meets rows that came from the requester itself while
        // it was read).
        if out.len() == start + 1 && seg.theirs.covers(&ex.dot) && !seg.sweep {
            out.truncate(start);
            return Ok(Some(0));
        }
        Ok(Some(bytes))
    }

    /// Passes on the changes this store holds in the segment's range for a
    /// column it does not know (or dropped): it claims their versions, so
    /// a replica syncing from it must get them from it. (Those of a row
    /// also travel with the row, see [`ChangeStream::emit_row`]; a second
    /// copy is a duplicate to the receiver.)
    fn emit_held(
        &mut self,
        seg_i: usize,
        after: i64,
        out: &mut Vec<Change>,
    ) -> Result<(bool, i64, usize)> {
        let seg = &self.segments[seg_i];
        if !seg.held {
            return Ok((false, after, 0));
        }
        let page = self.limits.max_changes.max(1) as i64;
        let rows: Vec<(i64, String)> = self
            .conn
            .prepare_cached(
                "SELECT seq, change FROM quiver_held WHERE tbl = ?1 AND site = ?2 AND dbv > ?3 AND dbv <= ?4
                   AND seq > ?5 ORDER BY seq LIMIT ?6",
            )?
            .query_map(
                params![
                    seg.table.name,
                    seg.site.as_bytes().as_slice(),
                    seg.from as i64,
                    seg.to as i64,
                    after,
                    page
                ],
                |r| Ok((r.get(0)?, r.get(1)?)),
            )?
            .collect::<rusqlite::Result<_>>()?;
        let (mut bytes, mut last) = (0, after);
        let more = rows.len() as i64 == page;
        for (seq, body) in rows {
            let c = crate::evolve::decode_held(&body)?;
            bytes += approx_size(&c);
            out.push(c);
            last = seq;
            if bytes >= self.limits.max_bytes {
                return Ok((true, last, bytes));
            }
        }
        Ok((more, last, bytes))
    }

    /// One batch, read in one read transaction: the clock and the row
    /// values it pairs with come from the same snapshot, so a row deleted
    /// (or rewritten) by another connection while the batch is read is
    /// either wholly there or wholly gone, never a record with the values
    /// of another moment.
    fn next_batch_in_one_snapshot(&mut self) -> Result<Option<ChangeBatch>> {
        if !self.conn.is_autocommit() {
            // The caller's own transaction already holds one snapshot.
            return self.next_batch();
        }
        self.conn.execute_batch("BEGIN DEFERRED")?;
        let out = self.next_batch();
        // A read transaction: ending it cannot lose anything.
        if let Err(e) = self.conn.execute_batch("COMMIT") {
            let _ = self.conn.execute_batch("ROLLBACK");
            out?;
            return Err(e.into());
        }
        out
    }

    fn next_segment(&mut self) {
        self.seg += 1;
        self.cap = None;
        self.skipped.clear();
        self.cursor = self
            .segments
            .get(self.seg)
            .map_or(Cursor::Held { after: 0 }, Segment::start);
        self.sent_through = self
            .segments
            .get(self.seg)
            .and_then(|s| s.resume_after.clone());
        self.catchup = None;
        self.catchup_clean = true;
    }

    /// Continues the snapshots a receiver took in part (the marks it
    /// handed back): a table still to be sent as a snapshot, and still in
    /// the mark's key space, goes on past the mark's key and claims at the
    /// end only what both parts hold. A mark for a table sent as history
    /// now (the receiver holds some of it) is of no use and is ignored.
    pub fn resume_snapshots(mut self, marks: &[SnapshotMark]) -> Self {
        if self.seg != 0 || self.done {
            return self;
        }
        for seg in &mut self.segments {
            let Some(own) = &seg.snapshot else {
                continue;
            };
            // A mark sharing no versions with this store (taken from a
            // replica holding other sites' writes) would claim nothing at
            // the end: the snapshot starts over instead.
            // A sweeping snapshot starts over: what it takes away at its end
            // is what did not come in this stream, and rows purged since a
            // mark would not be sent again.
            if seg.sweep {
                continue;
            }
            let Some(m) = marks.iter().find(|m| m.table == seg.table.name) else {
                continue;
            };
            let meet = own.meet(&m.versions);
            if !meet.is_empty() {
                seg.resume_after = m.after.clone();
                seg.resume_since = Some(meet);
            }
        }
        if let Some(first) = self.segments.first() {
            self.cursor = first.start();
            self.sent_through = first.resume_after.clone();
        }
        self.catchup = None;
        self.catchup_clean = true;
        self
    }

    /// The rows of table `tid` up to key `after` with a record written
    /// since `since` (deletes and new rows included), in key order.
    fn changed_since(
        &mut self,
        tid: i64,
        after: &Value,
        since: &VersionVector,
    ) -> Result<Vec<Value>> {
        let mut keys: Vec<Value> = Vec::new();
        for sql in [
            "SELECT pk, site, dbv FROM quiver_clock WHERE tbl = ?1 AND pk <= ?2 ORDER BY pk",
            "SELECT pk, site, dbv FROM quiver_siblings WHERE tbl = ?1 AND pk <= ?2 ORDER BY pk",
        ] {
            let rows: Vec<(Value, i64, i64)> = self
                .conn
                .prepare_cached(sql)?
                .query_map(params![tid, P(after)], |r| {
                    Ok((
                        crate::sqlvalue::from_ref(r.get_ref(0)?),
                        r.get(1)?,
                        r.get(2)?,
                    ))
                })?
                .collect::<rusqlite::Result<_>>()?;
            let from_clock = keys.len();
            for (pk, site, dbv) in rows {
                let newer = dbv as u64 > since.get(&self.sites.id(self.conn, site)?);
                let known = keys.last() == Some(&pk) || keys[..from_clock].contains(&pk);
                if newer && !known {
                    keys.push(pk);
                }
            }
        }
        Ok(keys)
    }

    /// Marks `batch` with how far the current snapshot segment has come.
    /// Until the rows written since a resumed snapshot's mark have gone
    /// again (all of them), the rows up to its key hold only what they held
    /// then.
    fn mark(&self, batch: &mut ChangeBatch) {
        let seg = &self.segments[self.seg];
        let pending = self.catchup.as_ref().is_some_and(|c| !c.is_empty()) || !self.catchup_clean;
        let versions = match (&seg.resume_since, &seg.snapshot) {
            (Some(since), _) if pending => since,
            (_, Some(own)) => own,
            (_, None) => return,
        };
        batch.snapshot = Some(Box::new(SnapshotMark {
            table: seg.table.name.clone(),
            after: self.sent_through.clone(),
            versions: versions.clone(),
            rows: seg.rows.unwrap_or(0),
            sweep: seg.sweep,
        }));
    }

    /// Reads the next page of a snapshot segment's rows into `batch`;
    /// `true` once the segment is through (its claims made, or withheld).
    fn snapshot_page(&mut self, batch: &mut ChangeBatch, bytes: &mut usize) -> Result<bool> {
        let full = |b: &ChangeBatch, bytes: usize, l: &StreamLimits| {
            b.changes.len() >= l.max_changes || bytes >= l.max_bytes
        };
        let tid = self.segments[self.seg].table.id;
        let after = match &self.cursor {
            Cursor::Snapshot { after } => after.clone(),
            _ => None,
        };
        if self.segments[self.seg].rows.is_none() {
            let resume = &self.segments[self.seg].resume_after;
            let rows: i64 = self.conn.query_row(
                "SELECT count(*) FROM quiver_clock WHERE tbl = ?1 AND col = ''
                 AND (?2 IS NULL OR pk > ?2)",
                params![tid, resume.as_ref().map(P)],
                |r| r.get(0),
            )?;
            self.segments[self.seg].rows = Some(rows as u64);
        }
        // A resumed snapshot first sends again the rows up to the mark's
        // key written since they were sent: then the claims at the end
        // (what this store held when the stream began) hold for them too.
        if self.catchup.is_none() {
            let seg = &self.segments[self.seg];
            let mut keys = match (seg.resume_after.clone(), seg.resume_since.clone()) {
                (Some(after), Some(since)) => self.changed_since(tid, &after, &since)?,
                _ => Vec::new(),
            };
            keys.reverse();
            if let Some(rows) = &mut self.segments[self.seg].rows {
                *rows += keys.len() as u64;
            }
            self.catchup = Some(keys);
        }
        while let Some(key) = self.catchup.as_mut().and_then(Vec::pop) {
            match self.emit_row(self.seg, &key, -1, &mut batch.changes)? {
                Some(n) => *bytes += n,
                None => {
                    self.catchup_clean = false;
                    self.skipped.push(key);
                }
            }
            if full(batch, *bytes, &self.limits) {
                self.mark(batch);
                return Ok(false);
            }
        }
        let page = self.limits.max_changes.clamp(64, 4096) as i64;
        let keys: Vec<Value> = match &after {
            None => self
                .conn
                .prepare_cached(
                    "SELECT pk FROM quiver_clock WHERE tbl = ?1 AND col = '' ORDER BY pk LIMIT ?2",
                )?
                .query_map(params![tid, page], |r| {
                    Ok(crate::sqlvalue::from_ref(r.get_ref(0)?))
                })?
                .collect::<rusqlite::Result<_>>()?,
            Some(k) => self
                .conn
                .prepare_cached(
                    "SELECT pk FROM quiver_clock WHERE tbl = ?1 AND pk > ?2 AND col = ''
                     ORDER BY pk LIMIT ?3",
                )?
                .query_map(params![tid, P(k), page], |r| {
                    Ok(crate::sqlvalue::from_ref(r.get_ref(0)?))
                })?
                .collect::<rusqlite::Result<_>>()?,
        };
        let (found, mut taken) = (keys.len(), 0);
        for key in keys {
            match self.emit_row(self.seg, &key, -1, &mut batch.changes)? {
                Some(n) => {
                    *bytes += n;
                    if self.skipped.is_empty() {
                        self.sent_through = Some(key.clone());
                    }
                }
                None => self.skipped.push(key.clone()),
            }
            taken += 1;
            self.cursor = Cursor::Snapshot { after: Some(key) };
            if full(batch, *bytes, &self.limits) {
                break;
            }
        }
        self.mark(batch);
        if (found as i64) == page || taken < found {
            return Ok(false);
        }
        // Rows skipped for a version then still open: most are sealed by
        // now. If one is not, nothing of the table is claimed (a claim is
        // a promise that every record up to it, or its successor, was
        // sent); the rows sent are kept and the next sync sends the rest.
        let mut whole = true;
        for key in std::mem::take(&mut self.skipped) {
            match self.emit_row(self.seg, &key, -1, &mut batch.changes)? {
                Some(n) => *bytes += n,
                None => whole = false,
            }
        }
        let seg = &self.segments[self.seg];
        if whole {
            for (site, v) in seg.snapshot.iter().flat_map(|vv| vv.iter()) {
                batch.covered.push(Covered {
                    table: seg.table.name.clone(),
                    site: *site,
                    version: *v,
                });
            }
        }
        Ok(true)
    }

    fn next_batch(&mut self) -> Result<Option<ChangeBatch>> {
        if self.done {
            return Ok(None);
        }
        self.sealed = sealed_bound(self.conn)?;
        let mut batch = ChangeBatch {
            shard: self.shard.clone(),
            ..Default::default()
        };
        let mut bytes = 0usize;
        let full = |b: &ChangeBatch, bytes: usize, l: &StreamLimits| {
            b.changes.len() >= l.max_changes || bytes >= l.max_bytes
        };
        while self.seg < self.segments.len() {
            if self.segments[self.seg].snapshot.is_some() {
                let through = self.snapshot_page(&mut batch, &mut bytes)?;
                if through {
                    self.next_segment();
                }
                // A batch holds one snapshot's rows at most, so its mark
                // speaks for all of them; its claims go with it too (a
                // sweeping snapshot's receiver acts on them by its mark).
                if full(&batch, bytes, &self.limits)
                    || (through && !(batch.changes.is_empty() && batch.covered.is_empty()))
                {
                    return Ok(Some(batch));
                }
                continue;
            }
            let (tid, ix, from, to) = {
                let s = &self.segments[self.seg];
                (s.table.id, s.site_ix, s.from as i64, s.to as i64)
            };
            if let Cursor::Held { after } = self.cursor {
                let (more, last, n) = self.emit_held(self.seg, after, &mut batch.changes)?;
                bytes += n;
                if more {
                    // Mid-segment: nothing of it is covered yet.
                    self.cursor = Cursor::Held { after: last };
                    return Ok(Some(batch));
                }
                self.cursor = Cursor::Siblings;
            }
            if matches!(self.cursor, Cursor::Siblings) {
                let keys: Vec<Value> = self
                    .conn
                    .prepare_cached(
                        "SELECT DISTINCT pk FROM quiver_siblings WHERE tbl = ?1 AND site = ?2 AND dbv > ?3 AND dbv <= ?4",
                    )?
                    .query_map(params![tid, ix, from, to], |r| Ok(crate::sqlvalue::from_ref(r.get_ref(0)?)))?
                    .collect::<rusqlite::Result<_>>()?;
                for key in keys {
                    match self.emit_row(self.seg, &key, -1, &mut batch.changes)? {
                        Some(n) => bytes += n,
                        // Nothing of the segment can be claimed yet.
                        None => self.cap = Some(from),
                    }
                }
                self.cursor = Cursor::Clock { after: None };
            }
            let after = match &self.cursor {
                Cursor::Clock { after } => after.clone(),
                Cursor::Siblings | Cursor::Held { .. } | Cursor::Snapshot { .. } => None,
            };
            let page = self.limits.max_changes.clamp(64, 4096) as i64;
            let (a_dbv, a_key) = after.unwrap_or((from, Value::Null));
            let rows: Vec<(i64, Value)> = self
                .conn
                .prepare_cached(
                    "SELECT dbv, pk FROM quiver_clock
                     WHERE tbl = ?1 AND site = ?2 AND dbv <= ?4 AND (dbv, pk) > (?3, ?5)
                     ORDER BY dbv, pk LIMIT ?6",
                )?
                .query_map(params![tid, ix, a_dbv, to, P(&a_key), page], |r| {
                    Ok((r.get(0)?, crate::sqlvalue::from_ref(r.get_ref(1)?)))
                })?
                .collect::<rusqlite::Result<_>>()?;
            let exhausted = (rows.len() as i64) < page;
            let mut last: Option<(i64, Value)> = None;
            for (dbv, key) in rows {
                if last.as_ref().is_some_and(|(d, k)| *d == dbv && *k == key) {
                    continue;
                }
                match self.emit_row(self.seg, &key, dbv, &mut batch.changes)? {
                    Some(n) => bytes += n,
                    // Skipped (see `emit_row`): the segment is claimed only
                    // below it, so a later stream sends it.
                    None => self.cap = Some(self.cap.map_or(dbv - 1, |c| c.min(dbv - 1))),
                }
                last = Some((dbv, key));
                if full(&batch, bytes, &self.limits) {
                    break;
                }
            }
            if let Some(l) = &last {
                self.cursor = Cursor::Clock {
                    after: Some(l.clone()),
                };
            }
            let seg = &self.segments[self.seg];
            let cap = self.cap;
            let claim = |version: i64, batch: &mut ChangeBatch| {
                let version = cap.map_or(version, |c| c.min(version));
                if version > from {
                    batch.covered.push(Covered {
                        table: seg.table.name.clone(),
                        site: seg.site,
                        version: version as u64,
                    });
                }
            };
            if full(&batch, bytes, &self.limits) && !(exhausted && last.is_none()) {
                // Mid-segment: everything below the last version sent is held.
                if let Some((dbv, _)) = last {
                    claim(dbv - 1, &mut batch);
                }
                return Ok(Some(batch));
            }
            if exhausted || last.is_none() {
                claim(to, &mut batch);
                self.next_segment();
            }
        }
        self.done = true;
        if batch.changes.is_empty() && batch.covered.is_empty() {
            return Ok(None);
        }
        Ok(Some(batch))
    }
}

impl Iterator for ChangeStream<'_> {
    type Item = Result<ChangeBatch>;

    fn next(&mut self) -> Option<Self::Item> {
        match self.next_batch_in_one_snapshot() {
            Ok(Some(b)) => Some(Ok(b)),
            Ok(None) => None,
            Err(e) => {
                self.done = true;
                Some(Err(e))
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Another connection may insert between a reader's fold and its read
    /// of the versions; a version whose inserts wait in the log must not
    /// be claimed, since the stream reads only the clock.
    #[test]
    fn a_version_whose_inserts_wait_in_the_log_is_not_claimed() -> Result<()> {
        let dir = tempfile::tempdir().map_err(|e| StoreError::Corrupt(e.to_string()))?;
        let p = dir.path().join("a.db");
        let mut s = Store::init(&p)?;
        s.execute_sql("CREATE TABLE notes(id TEXT PRIMARY KEY, body TEXT)")?;
        let t = s.add_table("notes", "default", quiver_core::Strategy::Lww)?;
        let me = s.site_id();
        let claim = |s: &Store| -> Result<u64> {
            Ok(table_vv(&s.conn, &mut Sites::default(), &t, me)?.get(&me))
        };
        let before = claim(&s)?;
        rusqlite::Connection::open(&p)?.execute("INSERT INTO notes VALUES ('x', 'one')", [])?;
        // Sealed, as when the store notices another process's commit.
        assert!(s.close_open_version()?);
        assert_eq!(claim(&s)?, before, "not claimed while only in the log");
        triggers::fold_pending(&s.conn)?;
        assert_eq!(claim(&s)?, before + 1);
        Ok(())
    }
}

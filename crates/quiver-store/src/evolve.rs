//! Schema changes of replicated tables.
//!
//! Any writer may change a replicated table (`quiver sql`, the `sqlite3`
//! shell, an app's driver). Before the store reads or writes its tables it
//! compares SQLite's `schema_version` with the one it last saw; when it
//! moved, it compares each table's live columns (`table_xinfo`) with the
//! catalog and records what changed: an added column joins the catalog
//! (with its default and the stamp of its addition, which orders added
//! columns alike on every replica), capture is reinstalled for the new
//! column list, values written under the old capture are captured now,
//! and the shard's schema version moves. A change peers could not follow
//! (a rename, a type change, a new key, a default that is not a plain
//! value) is refused with the reason and the way out.
//!
//! A peer's definitions merge into this replica's: columns it lacks are
//! added (one transaction, before any change that needs them arrives),
//! rules it lacks are adopted, and a column both define differently is a
//! schema conflict that holds the shard until someone resolves it.
//! Changes for a table or column this replica does not know yet are held
//! (persisted, counted) and applied once the schema that explains them
//! arrives.

use std::collections::BTreeMap;

use quiver_core::merge::Version;
use quiver_core::wire::TableDef;
use quiver_core::{is_literal, Change, ChangeBatch, ColumnDef, Dot, Hlc, Value, VersionVector};
use rusqlite::{params, Connection, OptionalExtension};
use serde::Serialize;

use crate::catalog::{self, live_columns, TableInfo};
use crate::events::StoreEvent;
use crate::names::{self, quote};
use crate::sqlvalue::{pk_key, P};
use crate::{triggers, wall_ms, Result, Store, StoreError};

/// What another writer did to a registered table.
#[derive(Debug, Default)]
struct Drift {
    added: Vec<ColumnDef>,
    dropped: Vec<String>,
    /// The table is gone.
    gone: bool,
    /// Its capture triggers are missing (the table was rebuilt).
    triggers: bool,
}

impl Drift {
    fn is_empty(&self) -> bool {
        self.added.is_empty() && self.dropped.is_empty() && !self.gone && !self.triggers
    }

    fn describe(&self) -> String {
        let mut parts = Vec::new();
        if self.gone {
            parts.push("table dropped".to_string());
        }
        for c in &self.added {
            parts.push(format!("column {} {} added", c.name, c.decl_type));
        }
        for c in &self.dropped {
            parts.push(format!("column {c} dropped"));
        }
        if self.triggers && parts.is_empty() {
            parts.push("capture reinstalled after a rebuild".into());
        }
        parts.join(", ")
    }
}

/// Orders columns as every replica does: those a table started with in
/// table order, then added ones by the stamp of their addition and name.
pub(crate) fn sort_columns(columns: &mut [ColumnDef]) {
    columns.sort_by(|a, b| match (a.added(), b.added()) {
        (0, 0) => std::cmp::Ordering::Equal,
        (x, y) => x.cmp(&y).then_with(|| a.name.cmp(&b.name)),
    });
}

/// The clock stamp the next local write gets, for ordering added columns.
fn stamp_now(conn: &Connection) -> Result<u64> {
    Ok(conn.query_row(
        "SELECT max(hlc_floor, CAST((julianday('now') - 2440587.5) * 86400000.0 AS INTEGER) << 16) FROM quiver_state",
        [],
        |r| r.get::<_, i64>(0),
    )? as u64)
}

/// Compares a table's live columns with the catalog.
fn drift(conn: &Connection, t: &TableInfo) -> Result<Drift> {
    let live = live_columns(conn, &t.name)?;
    let refuse = |reason: String| StoreError::SchemaRefused {
        table: t.name.clone(),
        reason,
    };
    if live.is_empty() {
        return Ok(Drift {
            gone: true,
            ..Default::default()
        });
    }
    let mut live_pk: Vec<&catalog::LiveColumn> = live.iter().filter(|c| c.3 > 0).collect();
    live_pk.sort_by_key(|c| c.3);
    let same_key = live_pk.len() == t.pk.len()
        && live_pk
            .iter()
            .zip(&t.pk)
            .all(|(l, k)| l.0 == k.name && l.1.eq_ignore_ascii_case(&k.decl_type));
    if !same_key {
        let was: Vec<&str> = t.pk.iter().map(|c| c.name.as_str()).collect();
        let now: Vec<&str> = live_pk.iter().map(|c| c.0.as_str()).collect();
        return Err(refuse(format!(
            "its primary key changed from ({}) to ({}); peers identify rows by the old key. Restore the \
             old key, or make a new table with the new key, copy the rows into it and register that",
            was.join(", "),
            now.join(", ")
        )));
    }
    let mut d = Drift {
        triggers: !triggers::installed(conn, t)?,
        ..Default::default()
    };
    for c in &t.columns {
        match live.iter().find(|l| l.0 == c.name) {
            None => d.dropped.push(c.name.clone()),
            Some(l) if !l.1.eq_ignore_ascii_case(&c.decl_type) => {
                return Err(refuse(format!(
                    "column {:?} changed type from {} to {}; peers keep {}. Change it back, or add a new \
                     column of the new type and copy the values into it",
                    c.name, c.decl_type, l.1, c.decl_type
                )))
            }
            Some(_) => {}
        }
    }
    let stamp = stamp_now(conn)?;
    for (name, decl_type, not_null, pk_pos, default) in &live {
        if *pk_pos > 0 || t.column(name).is_some() {
            continue;
        }
        names::check(name).map_err(|e| refuse(format!("added column {name:?}: {e}")))?;
        if let Some(dv) = default.as_deref().filter(|dv| !is_literal(dv)) {
            return Err(refuse(format!(
                "added column {name:?} has the default {dv}, which is not a plain value: each replica would \
                 compute its own. Drop it and add it again with a literal default (a number or a quoted string)"
            )));
        }
        let mut c = ColumnDef::plain(name, decl_type, *not_null);
        c.edit_ext(|e| {
            e.default = default.clone();
            e.added = stamp;
        });
        d.added.push(c);
    }
    if !d.added.is_empty() && !d.dropped.is_empty() {
        return Err(refuse(format!(
            "column(s) {} went and {} came: a rename cannot be carried to peers, which keep the old name. \
             Rename it back; then add the new column, copy the values (UPDATE … SET new = old) and drop \
             the old one, each as its own step",
            d.dropped.join(", "),
            d.added
                .iter()
                .map(|c| c.name.as_str())
                .collect::<Vec<_>>()
                .join(", ")
        )));
    }
    Ok(d)
}

/// Records a drift in the catalog, reinstalls capture and captures the
/// values written under the old capture. Returns the event to report.
fn record_drift(conn: &Connection, t: &TableInfo, d: &Drift) -> Result<StoreEvent> {
    triggers::fold_pending(conn)?;
    let change = d.describe();
    if d.gone {
        forget_table(conn, t)?;
        return Ok(StoreEvent::SchemaChanged {
            shard: t.shard.clone(),
            table: t.name.clone(),
            change: format!(
                "{change}: it no longer replicates from this store (peers keep theirs); \
                 `quiver table add {}` replicates it again",
                t.name
            ),
            schema_version: t.schema_version,
        });
    }
    let mut n = t.clone();
    for name in &d.dropped {
        n.columns.retain(|c| &c.name != name);
        if !n.dropped.contains(name) {
            n.dropped.push(name.clone());
        }
        forget_column(conn, t.id, name)?;
    }
    for c in &d.added {
        n.dropped.retain(|x| x != &c.name);
        n.columns.push(c.clone());
    }
    sort_columns(&mut n.columns);
    if !d.added.is_empty() || !d.dropped.is_empty() {
        n.schema_version = catalog::next_schema_version(conn, &t.shard)?;
        catalog::save(conn, &n)?;
    }
    triggers::reinstall(conn, &n)?;
    for c in &d.added {
        bottoms(conn, n.id, &c.name)?;
        capture_existing(conn, &n, c)?;
    }
    Ok(StoreEvent::SchemaChanged {
        shard: n.shard.clone(),
        table: n.name.clone(),
        change,
        schema_version: n.schema_version,
    })
}

/// Gives every row whose value in a newly noticed column differs from the
/// column's default a version of that cell: writes made between the
/// `ALTER TABLE` and now went through the old capture, which did not know
/// the column.
fn capture_existing(conn: &Connection, t: &TableInfo, c: &ColumnDef) -> Result<()> {
    let key = triggers::pk_expr("t", &t.pk);
    let default = c.default_sql().unwrap_or("NULL");
    let n = conn.execute(
        &format!(
            "INSERT INTO quiver_clock(tbl, pk, col, site, dbv, hlc, cl, ctx)
               SELECT {tid}, {key}, ?1, 0, s.dbv, max(s.hlc_floor, CAST((julianday('now') - 2440587.5) * 86400000.0 AS INTEGER) << 16),
                      r.cl, coalesce(r.know, json_object(CAST(r.site AS TEXT), r.dbv))
               FROM {table} AS t JOIN quiver_clock r ON r.tbl = {tid} AND r.pk = {key} AND r.col = ''
               JOIN quiver_state s
               WHERE t.{col} IS NOT ({default})
             ON CONFLICT(tbl, pk, col) DO UPDATE SET site = 0, dbv = excluded.dbv,
               hlc = excluded.hlc, cl = excluded.cl, ctx = excluded.ctx",
            tid = t.id,
            table = quote(&t.name),
            col = quote(&c.name),
        ),
        [&c.name],
    )?;
    if n > 0 {
        conn.execute(
            "UPDATE quiver_clock SET know = json_set(coalesce(know, json_object(CAST(site AS TEXT), dbv)),
                 '$.\"0\"', (SELECT dbv FROM quiver_state))
             WHERE tbl = ?1 AND col = '' AND pk IN (
               SELECT pk FROM quiver_clock WHERE tbl = ?1 AND col = ?2 AND site = 0
                 AND dbv = (SELECT dbv FROM quiver_state))",
            params![t.id, c.name],
        )?;
    }
    Ok(())
}

/// The version a column added after a row's life began holds for that row
/// until someone writes it: the column's default, from the row's writer at
/// version 0, which every version of that writer covers, so it is never
/// sent and any real write replaces it. Without it, the row record's own
/// version would stand for the column, as if the row's writer had set it.
pub(crate) fn bottom(existence: &Version, c: &ColumnDef) -> Version {
    Version {
        dot: Dot::new(existence.dot.site, 0),
        hlc: Hlc::ZERO,
        cl: existence.cl,
        replaces: VersionVector::new(),
        value: c.default_sql().map_or(Value::Null, literal_value),
    }
}

/// The value of a literal checked by [`is_literal`].
fn literal_value(sql: &str) -> Value {
    let s = sql.trim();
    match s.to_ascii_uppercase().as_str() {
        "NULL" => return Value::Null,
        "TRUE" => return Value::Integer(1),
        "FALSE" => return Value::Integer(0),
        _ => {}
    }
    if let Some(inner) = s.strip_prefix('\'').and_then(|x| x.strip_suffix('\'')) {
        return Value::Text(inner.replace("''", "'"));
    }
    if s.len() > 3 && (s.starts_with("X'") || s.starts_with("x'")) {
        let hex = &s[2..s.len() - 1];
        return Value::Blob(
            (0..hex.len())
                .step_by(2)
                .filter_map(|i| u8::from_str_radix(&hex[i..i + 2], 16).ok())
                .collect(),
        );
    }
    s.parse::<i64>()
        .map(Value::Integer)
        .or_else(|_| s.parse::<f64>().map(Value::Real))
        .unwrap_or(Value::Null)
}

/// Gives every existing row the [`bottom`] version of a column it gains.
fn bottoms(conn: &Connection, tid: i64, col: &str) -> Result<()> {
    conn.execute(
        "INSERT OR IGNORE INTO quiver_clock(tbl, pk, col, site, dbv, hlc, cl, ctx, know)
         SELECT tbl, pk, ?2, site, 0, 0, cl, NULL, NULL FROM quiver_clock
         WHERE tbl = ?1 AND col = '' AND cl % 2 = 1",
        params![tid, col],
    )?;
    Ok(())
}

/// Keeps every version of a column about to be dropped as a change to
/// pass on: this replica has claimed them, so a peer that keeps the
/// column and syncs through it must still get them (see [`DROPPED_HERE`]).
fn keep_dropped(conn: &Connection, t: &TableInfo, col: &str) -> Result<()> {
    let keys: Vec<Value> = conn
        .prepare("SELECT pk FROM quiver_clock WHERE tbl = ?1 AND col = '' AND cl % 2 = 1")?
        .query_map([t.id], |r| Ok(crate::sqlvalue::from_ref(r.get_ref(0)?)))?
        .collect::<rusqlite::Result<_>>()?;
    let mut sites = crate::rowstate::Sites::default();
    for key in keys {
        let pk = crate::sqlvalue::pk_values(&key, t.pk.len())
            .ok_or_else(|| StoreError::Corrupt(format!("bad key in clock of {}", t.name)))?;
        let state = crate::rowstate::load(conn, &mut sites, t, &key, &pk)?;
        for v in state.cells.get(col).into_iter().flatten() {
            if v.dot.db_version == 0 {
                continue;
            }
            let ch = v.to_change(&t.name, &pk, Some(col));
            hold(conn, &t.shard, &ch, DROPPED_HERE)?;
        }
    }
    Ok(())
}

/// Removes what the store keeps of a column no longer in the table.
fn forget_column(conn: &Connection, tid: i64, col: &str) -> Result<()> {
    conn.execute(
        "DELETE FROM quiver_clock WHERE tbl = ?1 AND col = ?2",
        params![tid, col],
    )?;
    conn.execute(
        "DELETE FROM quiver_siblings WHERE tbl = ?1 AND col = ?2",
        params![tid, col],
    )?;
    conn.execute(
        "UPDATE quiver_conflicts SET resolved_at = ?3, resolution = 'column dropped locally'
         WHERE tbl = ?1 AND col = ?2 AND resolved_at IS NULL",
        params![tid, col, wall_ms() as i64],
    )?;
    Ok(())
}

/// Deletes a table's replication state and its registration (by id: a
/// table registered later may get the same id, and must inherit nothing).
pub(crate) fn unregister(conn: &Connection, tid: i64) -> Result<()> {
    for sql in [
        "DELETE FROM quiver_clock WHERE tbl = ?1",
        "DELETE FROM quiver_siblings WHERE tbl = ?1",
        "DELETE FROM quiver_vv WHERE tbl = ?1",
        "DELETE FROM quiver_pending WHERE tbl = ?1",
        "DELETE FROM quiver_conflicts WHERE tbl = ?1",
        "DELETE FROM quiver_snapshots WHERE tbl = ?1",
        "DELETE FROM quiver_snapshot_seen WHERE tbl = ?1",
        "DELETE FROM quiver_compacted WHERE tbl = ?1",
        "DELETE FROM quiver_tables WHERE id = ?1",
    ] {
        conn.execute(sql, [tid])?;
    }
    Ok(())
}

/// Unregisters a table dropped by another writer and remembers it, so a
/// peer's definition does not bring it back behind the user's back.
fn forget_table(conn: &Connection, t: &TableInfo) -> Result<()> {
    unregister(conn, t.id)?;
    for sql in [
        "DELETE FROM quiver_held WHERE tbl = ?1",
        "DELETE FROM quiver_schema_conflicts WHERE tbl = ?1",
    ] {
        conn.execute(sql, [&t.name])?;
    }
    triggers::remove(conn, t)?;
    let mut dropped = dropped_tables(conn)?;
    dropped.insert(t.name.clone(), t.shard.clone());
    set_dropped_tables(conn, &dropped)
}

/// Tables dropped on this replica, by name, with their shard.
pub(crate) fn dropped_tables(conn: &Connection) -> Result<BTreeMap<String, String>> {
    let json: Option<String> = conn
        .query_row(
            "SELECT value FROM quiver_meta WHERE key = 'dropped_tables'",
            [],
            |r| r.get(0),
        )
        .optional()?;
    match json {
        None => Ok(BTreeMap::new()),
        Some(j) => serde_json::from_str(&j)
            .map_err(|e| StoreError::Corrupt(format!("dropped_tables: {e}"))),
    }
}

pub(crate) fn set_dropped_tables(conn: &Connection, d: &BTreeMap<String, String>) -> Result<()> {
    let json = serde_json::to_string(d).map_err(|e| StoreError::Corrupt(e.to_string()))?;
    conn.execute(
        "INSERT INTO quiver_meta(key, value) VALUES ('dropped_tables', ?1)
         ON CONFLICT(key) DO UPDATE SET value = excluded.value",
        [json],
    )?;
    Ok(())
}

/// The SQL of a column for `CREATE TABLE` or `ALTER TABLE ADD COLUMN`,
/// built from checked parts only (a peer's definition is never pasted in).
pub(crate) fn column_sql(table: &str, c: &ColumnDef) -> Result<String> {
    let refuse = |reason: String| StoreError::TableRefused {
        table: table.to_string(),
        reason,
    };
    names::check(&c.name)?;
    let t = &c.decl_type;
    if t.len() > 64
        || !t
            .chars()
            .all(|ch| ch.is_ascii_alphanumeric() || " _(),".contains(ch))
    {
        return Err(refuse(format!(
            "column {:?} has an unsupported type {t:?}",
            c.name
        )));
    }
    let mut sql = format!("{} {t}", quote(&c.name));
    if c.not_null {
        sql.push_str(" NOT NULL");
    }
    if let Some(d) = c.default_sql() {
        if !is_literal(d) {
            return Err(refuse(format!(
                "column {:?} has a default that is not a plain value: {d}",
                c.name
            )));
        }
        sql.push_str(&format!(" DEFAULT {d}"));
    }
    Ok(sql)
}

/// A schema conflict waiting for someone to resolve it.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct SchemaConflict {
    pub shard: String,
    pub table: String,
    pub column: String,
    /// This replica's definition of the column (`TYPE [NOT NULL]`).
    pub ours: String,
    /// The peer's.
    pub theirs: String,
    pub peer: Option<String>,
    pub detected_at: u64,
}

/// `TYPE [NOT NULL] [DEFAULT x]`, as a schema conflict shows a column.
fn shape(c: &ColumnDef) -> String {
    let mut s = c.decl_type.clone();
    if c.not_null {
        s.push_str(" NOT NULL");
    }
    if let Some(d) = c.default_sql() {
        s.push_str(" DEFAULT ");
        s.push_str(d);
    }
    s
}

/// Whether two replicas' definitions of one column disagree on what a row
/// nobody wrote shows (both carry a default, and they differ).
fn other_default(a: &ColumnDef, b: &ColumnDef) -> bool {
    matches!((a.default_sql(), b.default_sql()), (Some(x), Some(y)) if x.trim() != y.trim())
}

/// Which side a schema conflict's resolution keeps.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Keep {
    Ours,
    Theirs,
}

/// What resolving a schema conflict did.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct SchemaResolution {
    pub table: String,
    pub column: String,
    pub kept: String,
    /// Values of the column this replica discarded (keeping theirs).
    pub values_discarded: u64,
}

impl Store {
    /// Notices schema changes any writer made to replicated tables since
    /// this handle last looked, and records them (see the module
    /// documentation). Cheap when nothing changed: one read of SQLite's
    /// schema cookie. The store calls it before it reads or writes its
    /// tables; call it yourself after changing a table's schema through
    /// [`Store::connection`] to have the change recorded at once.
    pub fn refresh_schema(&self) -> Result<()> {
        let cookie = schema_cookie(&self.conn)?;
        if cookie == self.schema_seen.get() || !self.conn.is_autocommit() {
            return Ok(());
        }
        let mut found = false;
        for t in catalog::load_all(&self.conn)? {
            found |= !drift(&self.conn, &t)?.is_empty();
        }
        if found {
            if self.is_read_only() {
                // A reader cannot record it; the writer does before it
                // reads or writes the table again. Until then a reader
                // sees the schema as last recorded.
                tracing::warn!(
                    "the schema of a replicated table changed; this read-only handle shows it as last \
                     recorded until a writer of the store records the change"
                );
                self.schema_seen.set(cookie);
                return Ok(());
            }
            self.conn.execute_batch("BEGIN IMMEDIATE")?;
            let recorded = (|| -> Result<Vec<StoreEvent>> {
                let mut events = Vec::new();
                // Again under the write lock: another process may have
                // recorded the same change meanwhile.
                for t in catalog::load_all(&self.conn)? {
                    let d = drift(&self.conn, &t)?;
                    if !d.is_empty() {
                        events.push(record_drift(&self.conn, &t, &d)?);
                    }
                }
                triggers::close_open_version(&self.conn)?;
                Ok(events)
            })();
            let events = match recorded {
                Ok(e) => {
                    if let Err(c) = self.conn.execute_batch("COMMIT") {
                        let _ = self.conn.execute_batch("ROLLBACK");
                        return Err(c.into());
                    }
                    e
                }
                Err(e) => {
                    let _ = self.conn.execute_batch("ROLLBACK");
                    return Err(e);
                }
            };
            for e in events {
                tracing::info!(?e, "schema change recorded");
                self.events.emit_shared(e);
            }
        }
        self.schema_seen.set(schema_cookie(&self.conn)?);
        Ok(())
    }

    /// Merges a peer's definition of a table of `shard` into this store:
    /// creates the table if missing, adds the columns it lacks, adopts
    /// rules it lacks. Returns whether the table was created. A column
    /// both define differently is recorded as a schema conflict and
    /// refused; a table dropped here is left alone.
    pub fn merge_table_def(
        &mut self,
        shard: &str,
        d: &TableDef,
        peer: Option<&str>,
    ) -> Result<bool> {
        self.refresh_schema()?;
        if dropped_tables(&self.conn)?.contains_key(&d.name) {
            return Ok(false);
        }
        let Some(t) = catalog::load(&self.conn, &d.name)? else {
            self.create_from_def(shard, d)?;
            return Ok(true);
        };
        let mismatch = |why: String| StoreError::TableRefused {
            table: d.name.clone(),
            reason: format!("its definition differs from the peer's: {why}"),
        };
        if t.shard != shard {
            return Err(mismatch(format!("here it belongs to shard {:?}", t.shard)));
        }
        let dim = t.dim.map(|x| x as u32);
        if t.kind != d.kind || t.pk != d.pk || dim != d.dim {
            return Err(mismatch(format!(
                "here a {} keyed by {:?}, there a {} keyed by {:?}",
                t.kind,
                t.pk.iter().map(|c| &c.name).collect::<Vec<_>>(),
                d.kind,
                d.pk.iter().map(|c| &c.name).collect::<Vec<_>>()
            )));
        }
        if t.strategy != d.strategy {
            return Err(mismatch(format!(
                "strategy {} here, {} there",
                t.strategy, d.strategy
            )));
        }
        let mut n = t.clone();
        let mut added = Vec::new();
        let mut adopted = Vec::new();
        for theirs in &d.columns {
            if t.dropped.contains(&theirs.name) {
                continue;
            }
            let Some(mine) = n.columns.iter_mut().find(|c| c.name == theirs.name) else {
                added.push(theirs.clone());
                continue;
            };
            if !mine.same_shape(theirs) || other_default(mine, theirs) {
                let c = SchemaConflict {
                    shard: shard.to_string(),
                    table: t.name.clone(),
                    column: mine.name.clone(),
                    ours: shape(mine),
                    theirs: shape(theirs),
                    peer: peer.map(str::to_string),
                    detected_at: wall_ms(),
                };
                record_conflict(&self.conn, &c)?;
                self.events.emit(StoreEvent::SchemaConflict {
                    shard: c.shard.clone(),
                    table: c.table.clone(),
                    column: c.column.clone(),
                    ours: c.ours.clone(),
                    theirs: c.theirs.clone(),
                });
                return Err(StoreError::SchemaConflict {
                    table: c.table,
                    column: c.column,
                    ours: c.ours,
                    theirs: c.theirs,
                });
            }
            check_peer_reference(&self.conn, &t.name, shard, theirs)?;
            let before = mine.clone();
            merge_ext(&t.name, mine, theirs)?;
            if *mine != before {
                adopted.push(mine.name.clone());
            }
        }
        if added.is_empty() && adopted.is_empty() {
            return Ok(false);
        }
        for c in &added {
            check_peer_reference(&self.conn, &t.name, shard, c)?;
            if c.not_null
                && c.default_sql()
                    .is_none_or(|d| d.eq_ignore_ascii_case("NULL"))
            {
                return Err(mismatch(format!(
                    "the peer's column {:?} is NOT NULL without a default, which no existing row could hold",
                    c.name
                )));
            }
            if let Some(p) = c.policy() {
                catalog::check_policy(&t.name, c, p)?;
            }
        }
        let ddl: Vec<String> = added
            .iter()
            .map(|c| {
                Ok(format!(
                    "ALTER TABLE {} ADD COLUMN {}",
                    quote(&t.name),
                    column_sql(&t.name, c)?
                ))
            })
            .collect::<Result<_>>()?;
        n.columns.extend(added.iter().cloned());
        sort_columns(&mut n.columns);
        let change = added
            .iter()
            .map(|c| format!("column {} {} added", c.name, c.decl_type))
            .chain(adopted.iter().map(|c| format!("rule of {c} adopted")))
            .collect::<Vec<_>>()
            .join(", ");
        let n = self.local_write(|tx| {
            triggers::fold_pending(tx)?;
            for sql in &ddl {
                tx.execute_batch(sql)?;
            }
            for c in &added {
                bottoms(tx, n.id, &c.name)?;
            }
            n.schema_version = catalog::next_schema_version(tx, shard)?;
            catalog::save(tx, &n)?;
            triggers::reinstall(tx, &n)?;
            Ok(n)
        })?;
        self.schema_seen.set(schema_cookie(&self.conn)?);
        self.events.emit(StoreEvent::SchemaChanged {
            shard: shard.to_string(),
            table: n.name.clone(),
            change: format!("{change} (from {})", peer.unwrap_or("a peer")),
            schema_version: n.schema_version,
        });
        Ok(false)
    }

    /// Creates a table (or collection) from a peer's definition, with its
    /// columns' rules, references and stamps as the peer has them.
    fn create_from_def(&mut self, shard: &str, d: &TableDef) -> Result<()> {
        for c in &d.columns {
            check_peer_reference(&self.conn, &d.name, shard, c)?;
        }
        let mut t = if d.kind == quiver_core::TableKind::Collection {
            let dim = d.dim.ok_or_else(|| StoreError::TableRefused {
                table: d.name.clone(),
                reason: "the peer defines a collection without a dimension".into(),
            })? as usize;
            self.create_collection(&crate::CollectionSpec {
                name: d.name.clone(),
                dim,
                metric: d.metric.unwrap_or_default(),
                strategy: d.strategy,
                shard: shard.to_string(),
            })?
        } else {
            self.create_table(&d.name, shard, d.strategy, &d.pk, &d.columns)?
        };
        if t.columns.iter().zip(&d.columns).all(|(a, b)| a == b)
            && t.columns.len() == d.columns.len()
        {
            return Ok(());
        }
        for c in t.columns.iter_mut() {
            if let Some(theirs) = d
                .columns
                .iter()
                .find(|x| x.name == c.name && x.same_shape(c))
            {
                if let Some(p) = theirs.policy() {
                    catalog::check_policy(&d.name, c, p)?;
                }
                c.ext = theirs.ext.clone();
            }
        }
        sort_columns(&mut t.columns);
        self.local_write(|tx| {
            catalog::save(tx, &t)?;
            triggers::reinstall(tx, &t)
        })?;
        Ok(())
    }

    /// Open schema conflicts.
    pub fn schema_conflicts(&self) -> Result<Vec<SchemaConflict>> {
        let mut stmt = self.conn.prepare_cached(
            "SELECT shard, tbl, col, ours, theirs, peer, detected_at FROM quiver_schema_conflicts ORDER BY tbl, col",
        )?;
        let rows = stmt
            .query_map([], |r| {
                Ok(SchemaConflict {
                    shard: r.get(0)?,
                    table: r.get(1)?,
                    column: r.get(2)?,
                    ours: r.get(3)?,
                    theirs: r.get(4)?,
                    peer: r.get(5)?,
                    detected_at: r.get::<_, i64>(6)? as u64,
                })
            })?
            .collect::<rusqlite::Result<_>>()?;
        Ok(rows)
    }

    /// Resolves a schema conflict. `Keep::Theirs` replaces this replica's
    /// column with the peer's definition (its values here are discarded,
    /// and counted; the peer's arrive with the next sync). `Keep::Ours`
    /// keeps this replica's column: the peer must take this definition
    /// (resolving on its side with `theirs`) before the shard syncs again.
    pub fn resolve_schema_conflict(
        &mut self,
        table: &str,
        column: &str,
        keep: Keep,
    ) -> Result<SchemaResolution> {
        let c = self
            .schema_conflicts()?
            .into_iter()
            .find(|c| c.table == table && c.column == column)
            .ok_or_else(|| {
                StoreError::InvalidValue(format!("no schema conflict on {table}.{column}"))
            })?;
        let t = self.table(table)?;
        let mut discarded = 0;
        if keep == Keep::Theirs {
            let (rest, default) = match c.theirs.split_once(" DEFAULT ") {
                Some((r, d)) => (r, Some(d.to_string())),
                None => (c.theirs.as_str(), None),
            };
            let (decl_type, not_null) = match rest.strip_suffix(" NOT NULL") {
                Some(t) => (t.to_string(), true),
                None => (rest.to_string(), false),
            };
            let mut col = t
                .column(column)
                .cloned()
                .ok_or_else(|| StoreError::NoSuchTable(format!("{table}.{column}")))?;
            col.decl_type = decl_type;
            col.not_null = not_null;
            col.edit_ext(|e| e.default = default);
            if not_null && col.default_sql().is_none() {
                return Err(StoreError::InvalidValue(format!(
                    "the peer's {table}.{column} is NOT NULL: give this replica's rows a value first \
                     (ALTER TABLE … DROP COLUMN, ADD COLUMN … NOT NULL DEFAULT …), then resolve"
                )));
            }
            let add = column_sql(table, &col)?;
            discarded = self.conn.query_row(
                &format!(
                    "SELECT count(*) FROM {} WHERE {} IS NOT NULL",
                    quote(table),
                    quote(column)
                ),
                [],
                |r| r.get::<_, i64>(0),
            )? as u64;
            let mut n = t.clone();
            if let Some(x) = n.columns.iter_mut().find(|x| x.name == column) {
                *x = col;
            }
            self.local_write(|tx| {
                // Capture is off for the rebuild: the old values go with
                // the column, not as writes peers would receive.
                triggers::fold_pending(tx)?;
                triggers::remove(tx, &t)?;
                tx.execute_batch(&format!(
                    "ALTER TABLE {q} DROP COLUMN {c}; ALTER TABLE {q} ADD COLUMN {add}",
                    q = quote(table),
                    c = quote(column)
                ))?;
                forget_column(tx, t.id, column)?;
                bottoms(tx, t.id, column)?;
                n.schema_version = catalog::next_schema_version(tx, &t.shard)?;
                catalog::save(tx, &n)?;
                triggers::install(tx, &n)?;
                tx.execute(
                    "DELETE FROM quiver_schema_conflicts WHERE tbl = ?1 AND col = ?2",
                    [table, column],
                )?;
                Ok(())
            })?;
            self.schema_seen.set(schema_cookie(&self.conn)?);
        } else {
            self.conn.execute(
                "DELETE FROM quiver_schema_conflicts WHERE tbl = ?1 AND col = ?2",
                [table, column],
            )?;
        }
        Ok(SchemaResolution {
            table: table.to_string(),
            column: column.to_string(),
            kept: match keep {
                Keep::Ours => format!("ours ({})", c.ours),
                Keep::Theirs => format!("theirs ({})", c.theirs),
            },
            values_discarded: discarded,
        })
    }

    /// Drops a column of a replicated table. SQLite refuses `ALTER TABLE …
    /// DROP COLUMN` from other writers while the capture triggers name the
    /// column, so this is the way: the triggers go, the column goes, the
    /// change is recorded and capture comes back for the columns left.
    /// Peers keep the column; what they send for it is ignored here.
    pub fn drop_column(&mut self, table: &str, column: &str) -> Result<TableInfo> {
        let t = self.table(table)?;
        if t.pk.iter().any(|c| c.name == column) {
            return Err(StoreError::InvalidValue(format!(
                "{table}.{column} is part of the primary key and cannot be dropped"
            )));
        }
        if t.column(column).is_none() {
            return Err(StoreError::InvalidValue(format!(
                "table {table:?} has no column {column:?}"
            )));
        }
        let d = Drift {
            dropped: vec![column.to_string()],
            ..Default::default()
        };
        let event = self.local_write(|tx| {
            triggers::fold_pending(tx)?;
            keep_dropped(tx, &t, column)?;
            triggers::remove(tx, &t)?;
            tx.execute_batch(&format!(
                "ALTER TABLE {} DROP COLUMN {}",
                quote(table),
                quote(column)
            ))?;
            record_drift(tx, &t, &d)
        })?;
        self.schema_seen.set(schema_cookie(&self.conn)?);
        self.events.emit(event);
        self.table(table)
    }

    /// Changes (or sets) the merge rule of one column; a change of rule
    /// is a schema change and travels to peers with the schema.
    pub fn set_column_policy(
        &mut self,
        table: &str,
        column: &str,
        policy: quiver_core::Strategy,
    ) -> Result<TableInfo> {
        let mut t = self.table(table)?;
        let Some(c) = t.columns.iter_mut().find(|c| c.name == column) else {
            return Err(StoreError::InvalidValue(format!(
                "table {table:?} has no column {column:?} (key columns have no rule of their own)"
            )));
        };
        catalog::check_policy(table, c, policy)?;
        c.edit_ext(|e| e.policy = Some(policy));
        let t = self.local_write(|tx| {
            t.schema_version = catalog::next_schema_version(tx, &t.shard)?;
            catalog::save(tx, &t)?;
            triggers::reinstall(tx, &t)?;
            Ok(t)
        })?;
        self.schema_seen.set(schema_cookie(&self.conn)?);
        Ok(t)
    }

    /// Changes held because their table or column is not known here yet.
    pub fn held_count(&self, shard: Option<&str>) -> Result<u64> {
        Ok(self.conn.query_row(
            "SELECT count(*) FROM quiver_held WHERE (?1 IS NULL OR shard = ?1) AND reason <> 'column dropped here'",
            [shard],
            |r| r.get::<_, i64>(0),
        )? as u64)
    }

    /// Applies held changes (of `shard`, or of every shard) whose schema
    /// has arrived, in the order they were received. Returns what applying
    /// them did. A shard's held changes that its store refuses stay held,
    /// with the reason, and do not stop the others.
    pub fn replay_held(&mut self, shard: Option<&str>) -> Result<crate::ApplyReport> {
        let mut report = crate::ApplyReport::default();
        if self.held_count(shard)? == 0 {
            return Ok(report);
        }
        let tables = catalog::load_all(&self.conn)?;
        let rows: Vec<(i64, String, String)> = self
            .conn
            .prepare("SELECT seq, shard, change FROM quiver_held WHERE ?1 IS NULL OR shard = ?1 ORDER BY seq")?
            .query_map([shard], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)))?
            .collect::<rusqlite::Result<_>>()?;
        let mut by_shard: BTreeMap<String, (Vec<i64>, Vec<Change>)> = BTreeMap::new();
        for (seq, shard, body) in rows {
            let ch = decode_held(&body)?;
            let known = tables.iter().any(|t| {
                t.name == ch.table
                    && t.shard == shard
                    && ch.column.as_ref().is_none_or(|c| t.column(c).is_some())
            });
            if known {
                let e = by_shard.entry(shard).or_default();
                e.0.push(seq);
                e.1.push(ch);
            }
        }
        for (shard, (seqs, mut changes)) in by_shard {
            // Row groups together, each row's record first, as a sender
            // orders them; a stable sort keeps the arrival order within.
            changes.sort_by(|a, b| {
                (
                    &a.table,
                    crate::sqlvalue::display_pk(&a.pk),
                    a.column.is_some(),
                )
                    .cmp(&(
                        &b.table,
                        crate::sqlvalue::display_pk(&b.pk),
                        b.column.is_some(),
                    ))
            });
            let batch = ChangeBatch {
                snapshot: None,
                shard,
                changes,
                covered: Vec::new(),
            };
            match self.apply_replay(&batch, &seqs) {
                Ok(r) => report.add(&r),
                Err(e) => {
                    tracing::warn!(shard = %batch.shard, "held changes still cannot be applied: {e}");
                    let why = format!("refused when replayed: {e}");
                    let mut st = self
                        .conn
                        .prepare_cached("UPDATE quiver_held SET reason = ?2 WHERE seq = ?1")?;
                    for s in &seqs {
                        st.execute(params![s, why])?;
                    }
                }
            }
        }
        Ok(report)
    }
}

/// Adopts what a peer's definition of a column says that ours does not:
/// a rule, a reference, a default, an earlier stamp of addition.
fn merge_ext(table: &str, mine: &mut ColumnDef, theirs: &ColumnDef) -> Result<()> {
    let name = mine.name.clone();
    let refuse = |what: &str, a: String, b: String| StoreError::TableRefused {
        table: table.to_string(),
        reason: format!(
            "column {name:?} has {what} {a} here and {b} at the peer; set the same on both \
             (`quiver table policy {table} {name}=RULE`)"
        ),
    };
    match (mine.policy(), theirs.policy()) {
        (Some(a), Some(b)) if a != b => {
            return Err(refuse("the rule", a.to_string(), b.to_string()))
        }
        (None, Some(p)) => {
            catalog::check_policy(table, mine, p)?;
            mine.edit_ext(|e| e.policy = Some(p));
        }
        _ => {}
    }
    match (mine.references().cloned(), theirs.references()) {
        (Some(a), Some(b)) if &a != b => {
            return Err(refuse(
                "the reference",
                format!("{}.{}", a.table, a.column),
                format!("{}.{}", b.table, b.column),
            ))
        }
        (None, Some(r)) => mine.edit_ext(|e| e.references = Some(r.clone())),
        _ => {}
    }
    let (a, b) = (mine.added(), theirs.added());
    if a != 0 && b != 0 && b < a {
        mine.edit_ext(|e| e.added = b);
    }
    if mine.default_sql().is_none() {
        if let Some(d) = theirs.default_sql().filter(|d| is_literal(d)) {
            mine.edit_ext(|e| e.default = Some(d.to_string()));
        }
    }
    Ok(())
}

/// Checks a reference a peer's definition declares, as registration
/// checks a local one: a valid name, and where the target is here, a
/// replicated table of the same shard keyed by that one column. A target
/// not here yet is checked when it arrives (its cascade trigger waits).
fn check_peer_reference(conn: &Connection, table: &str, shard: &str, c: &ColumnDef) -> Result<()> {
    let Some(r) = c.references() else {
        return Ok(());
    };
    let refuse = |reason: String| StoreError::TableRefused {
        table: table.to_string(),
        reason: format!("the peer's reference of column {:?}: {reason}", c.name),
    };
    names::check(&r.table).map_err(|e| refuse(e.to_string()))?;
    names::check(&r.column).map_err(|e| refuse(e.to_string()))?;
    if let Some(target) = catalog::load(conn, &r.table)? {
        if target.shard != shard {
            return Err(refuse(format!(
                "{} is in shard {:?}",
                r.table, target.shard
            )));
        }
        if target.pk.len() != 1 || target.pk[0].name != r.column {
            return Err(refuse(format!(
                "{}.{} is not that table's single-column key",
                r.table, r.column
            )));
        }
    }
    Ok(())
}

fn record_conflict(conn: &Connection, c: &SchemaConflict) -> Result<()> {
    conn.execute(
        "INSERT INTO quiver_schema_conflicts(tbl, col, shard, ours, theirs, peer, detected_at)
         VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7)
         ON CONFLICT(tbl, col) DO UPDATE SET ours = excluded.ours, theirs = excluded.theirs,
           peer = excluded.peer",
        params![
            c.table,
            c.column,
            c.shard,
            c.ours,
            c.theirs,
            c.peer,
            c.detected_at as i64
        ],
    )?;
    Ok(())
}

fn schema_cookie(conn: &Connection) -> Result<i64> {
    Ok(conn.query_row("PRAGMA schema_version", [], |r| r.get(0))?)
}

/// A held change as stored.
pub(crate) fn decode_held(body: &str) -> Result<Change> {
    serde_json::from_str(body).map_err(|e| StoreError::Corrupt(format!("a held change: {e}")))
}

/// Keeps a change whose table or column this replica does not know yet.
pub(crate) fn hold(conn: &Connection, shard: &str, ch: &Change, reason: &str) -> Result<bool> {
    let body = serde_json::to_string(ch).map_err(|e| StoreError::Corrupt(e.to_string()))?;
    let n = conn
        .prepare_cached(
            "INSERT OR IGNORE INTO quiver_held(shard, tbl, col, pk, site, dbv, change, reason, held_at)
             VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9)",
        )?
        .execute(params![
            shard,
            ch.table,
            ch.column.as_deref().unwrap_or(""),
            P(&pk_key(&ch.pk)),
            ch.site.as_bytes().as_slice(),
            ch.db_version as i64,
            body,
            reason,
            wall_ms() as i64
        ])?;
    Ok(n > 0)
}

/// Why changes for a column this replica dropped are kept: not to apply
/// them (unless the column comes back), but to pass them on, since this
/// replica claims their versions and a peer that keeps the column may
/// count on it as a relay. Held changes of every kind are claimed: this
/// store holds them, and passes them on with their rows and by range.
pub(crate) const DROPPED_HERE: &str = "column dropped here";

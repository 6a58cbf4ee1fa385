//! Change capture in SQL triggers.
//!
//! Triggers use only built-in SQL, so a write from any SQLite client (the
//! `sqlite3` shell included) is captured in its own transaction. An insert
//! appends one row to `quiver_pending`, an append-only log in insertion
//! order, instead of touching the clock, whose B-tree is keyed by the
//! row's key and so is written at random places; [`fold_pending`] moves
//! the log into the clock in one statement before anything reads the
//! clock, and the update and delete triggers do the same before they read
//! a row's record. An update adds one clock row per column whose value
//! changed. Changes are stamped with the open `db_version` from
//! `quiver_state`, which [`close_open_version`] seals before anything reads
//! them for sync.

use rusqlite::config::DbConfig;
use rusqlite::Connection;

use crate::catalog::{ColumnDef, TableInfo};
use crate::names::quote;
use crate::Result;

const DBV: &str = "(SELECT dbv FROM quiver_state)";
const HLC: &str = "(SELECT max(hlc_floor, CAST((julianday('now') - 2440587.5) * 86400000.0 AS INTEGER) << 16) FROM quiver_state)";
const NOW_MS: &str = "CAST((julianday('now') - 2440587.5) * 86400000.0 AS INTEGER)";
const CAPTURING: &str = "(SELECT applying FROM quiver_state) = 0";
/// The row's knowledge: `know`, or just the row record's own version.
const KNOW: &str = "coalesce(know, json_object(CAST(site AS TEXT), dbv))";

/// The clock key of a row: the key itself, or a JSON array of a composite key.
pub(crate) fn pk_expr(prefix: &str, pk: &[ColumnDef]) -> String {
    let col = |c: &ColumnDef| {
        if prefix.is_empty() {
            quote(&c.name)
        } else {
            format!("{prefix}.{}", quote(&c.name))
        }
    };
    match pk {
        [one] => col(one),
        many => format!(
            "json_array({})",
            many.iter().map(col).collect::<Vec<_>>().join(", ")
        ),
    }
}

/// An insert is logged with its version and stamp; one read of quiver_state
/// gives the capture flag, the db_version and the clock floor.
fn insert_body(tid: i64, pk: &str) -> String {
    format!(
        "INSERT INTO quiver_pending(tbl, pk, dbv, hlc)
           SELECT {tid}, {pk}, s.dbv, max(s.hlc_floor, {NOW_MS} << 16)
           FROM quiver_state s WHERE s.applying = 0;"
    )
}

/// The store's own inserts log themselves: while this lives, capture
/// triggers are off on the connection, and [`DirectLog::log`] appends what
/// the insert trigger would have appended, with the same version and the
/// same stamp formula, in the same transaction. Rows that already exist
/// must be written after [`DirectLog::finish`], through the triggers.
/// Skipping the trigger spares SQLite a sub-program and a statement journal
/// per row. Switching triggers off would also silence triggers of the
/// user's own on the table, so a table that has any gets no direct log.
pub(crate) struct DirectLog<'c> {
    conn: &'c Connection,
    /// The open db_version and the stamp; `None` while remote changes are
    /// applied (capture off).
    stamp: Option<(i64, i64)>,
    append: rusqlite::CachedStatement<'c>,
    on: bool,
}

impl<'c> DirectLog<'c> {
    pub(crate) fn begin(conn: &'c Connection, t: &TableInfo) -> Result<Option<DirectLog<'c>>> {
        use rusqlite::OptionalExtension;
        let ours: Vec<String> = KINDS.iter().map(|k| trigger_ident(k, t)).collect();
        let foreign: i64 = conn
            .prepare_cached(
                "SELECT count(*) FROM (
                   SELECT name, tbl_name FROM main.sqlite_master WHERE type = 'trigger'
                   UNION ALL
                   SELECT name, tbl_name FROM temp.sqlite_master WHERE type = 'trigger')
                 WHERE tbl_name = ?1 COLLATE NOCASE AND name NOT IN (?2, ?3, ?4, ?5)",
            )?
            .query_row(
                rusqlite::params![t.name, ours[0], ours[1], ours[2], ours[3]],
                |r| r.get(0),
            )?;
        if foreign > 0 {
            return Ok(None);
        }
        let stamp = conn
            .query_row(
                &format!(
                    "SELECT dbv, max(hlc_floor, {NOW_MS} << 16) FROM quiver_state WHERE applying = 0"
                ),
                [],
                |r| Ok((r.get(0)?, r.get(1)?)),
            )
            .optional()?;
        // The guard exists before triggers go off, so every way out turns
        // them back on.
        let log = DirectLog {
            conn,
            stamp,
            append: conn.prepare_cached(
                "INSERT INTO quiver_pending(tbl, pk, dbv, hlc) VALUES (?1, ?2, ?3, ?4)",
            )?,
            on: false,
        };
        conn.set_db_config(DbConfig::SQLITE_DBCONFIG_ENABLE_TRIGGER, false)?;
        Ok(Some(log))
    }

    /// Records the insert of a new row of table `tid`.
    pub(crate) fn log(&mut self, tid: i64, key: &str) -> Result<()> {
        if let Some((dbv, hlc)) = self.stamp {
            self.append.execute(rusqlite::params![tid, key, dbv, hlc])?;
        }
        Ok(())
    }

    /// Turns the triggers back on.
    pub(crate) fn finish(mut self) -> Result<()> {
        self.conn
            .set_db_config(DbConfig::SQLITE_DBCONFIG_ENABLE_TRIGGER, true)?;
        self.on = true;
        Ok(())
    }
}

impl Drop for DirectLog<'_> {
    fn drop(&mut self) {
        if !self.on {
            // An error path: the caller's transaction rolls back; capture
            // must be on again for whatever the connection runs next.
            let _ = self
                .conn
                .set_db_config(DbConfig::SQLITE_DBCONFIG_ENABLE_TRIGGER, true);
        }
    }
}

/// Whether every trigger on these tables is one of quiverdb's own (whose
/// names start with `quiver_`, a prefix reserved for it).
pub(crate) fn only_ours<'a>(
    conn: &Connection,
    tables: impl IntoIterator<Item = &'a str>,
) -> Result<bool> {
    let mut stmt = conn.prepare_cached(
        "SELECT count(*) FROM (
           SELECT name, tbl_name FROM main.sqlite_master WHERE type = 'trigger'
           UNION ALL
           SELECT name, tbl_name FROM temp.sqlite_master WHERE type = 'trigger')
         WHERE tbl_name = ?1 COLLATE NOCASE AND substr(name, 1, 7) <> 'quiver_'",
    )?;
    for t in tables {
        if stmt.query_row([t], |r| r.get::<_, i64>(0))? > 0 {
            return Ok(false);
        }
    }
    Ok(true)
}

/// Switches a connection's triggers off until dropped. While remote
/// changes are applied every capture trigger is a no-op (`applying`), yet
/// SQLite would still run each one's sub-program, and a statement journal
/// for every write that fires one; with only quiverdb's triggers on the
/// tables, the apply skips them all.
pub(crate) struct TriggersOff<'c>(&'c Connection);

impl<'c> TriggersOff<'c> {
    pub(crate) fn new(conn: &'c Connection) -> Result<TriggersOff<'c>> {
        conn.set_db_config(DbConfig::SQLITE_DBCONFIG_ENABLE_TRIGGER, false)?;
        Ok(TriggersOff(conn))
    }
}

impl Drop for TriggersOff<'_> {
    fn drop(&mut self) {
        let _ = self
            .0
            .set_db_config(DbConfig::SQLITE_DBCONFIG_ENABLE_TRIGGER, true);
    }
}

/// Moves logged inserts into the clock in the order they happened (the
/// log's own order, so no sort; sorting by key measured 10% slower). An
/// insert starts a new life of the row: a fresh row gets causal length 1, a re-insert after delete the next odd
/// length, and `INSERT OR REPLACE` over a live row (SQLite's
/// delete-then-insert, which fires no delete trigger) skips to the next odd
/// length too. Cell versions of older lives are then ignored by their
/// causal length, so inserts need no cleanup statements. In a table whose
/// tombstones were compacted, a row with no record may be one deleted and
/// purged here that peers still hold a tombstone of: its new life starts
/// past every causal length purged (see `compact`).
const FOLD: &str = "INSERT INTO quiver_clock(tbl, pk, col, site, dbv, hlc, cl, ctx, know)
       SELECT tbl, pk, '', 0, dbv, hlc,
         coalesce((SELECT x.cl + 1 FROM quiver_compacted x WHERE x.tbl = quiver_pending.tbl), 1),
         NULL, NULL FROM quiver_pending
       WHERE true ORDER BY seq
       ON CONFLICT(tbl, pk, col) DO UPDATE SET
         cl = cl + 1 + (cl % 2), ctx = coalesce(know, json_object(CAST(site AS TEXT), dbv)),
         know = json_set(coalesce(know, json_object(CAST(site AS TEXT), dbv)), '$.\"0\"', excluded.dbv),
         site = 0, dbv = excluded.dbv, hlc = excluded.hlc;
     DELETE FROM quiver_pending;";

fn delete_body(tid: i64, pk: &str) -> String {
    format!(
        "UPDATE quiver_clock SET cl = cl + (cl % 2), ctx = {KNOW},
             know = json_set({KNOW}, '$.\"0\"', {DBV}), site = 0, dbv = {DBV}, hlc = {HLC}
           WHERE tbl = {tid} AND pk = {pk} AND col = '';
         DELETE FROM quiver_clock WHERE tbl = {tid} AND pk = {pk} AND col <> '';
         DELETE FROM quiver_siblings WHERE tbl = {tid} AND pk = {pk};
         UPDATE quiver_conflicts SET resolved_at = {NOW_MS}, resolution = 'row deleted locally'
           WHERE tbl = {tid} AND pk = {pk} AND resolved_at IS NULL;"
    )
}

/// A counter column keeps one version per site, each with that site's own
/// running total; the cell shows their sum. While the only version is this
/// site's, it is an ordinary cell (the update's clock record, the value in
/// the table), and nothing more is written. Once another site's total is
/// in, the versions live side by side in `quiver_siblings`: a local update
/// first turns the cell's single version (if it has no siblings yet in
/// this life) into a sibling holding the old value, then moves this site's
/// total, `+ NEW - OLD`, to a new version, and its older one goes. This
/// runs in a BEFORE trigger of its own, so it reads the cell as it was
/// before the update trigger records the new version, and its WHEN skips
/// it whole while the cell is this site's alone.
fn counter_body(tid: i64, pk: &str, c: &ColumnDef) -> String {
    let q = quote(&c.name);
    let name = &c.name;
    let cond = format!("NEW.{q} IS NOT OLD.{q}");
    let row = format!("quiver_clock r WHERE r.tbl = {tid} AND r.pk = {pk} AND r.col = ''");
    let mine = format!(
        "quiver_siblings s WHERE s.tbl = {tid} AND s.pk = {pk} AND s.col = '{name}' AND s.site = 0"
    );
    format!(
        "DELETE FROM quiver_siblings WHERE tbl = {tid} AND pk = {pk} AND col = '{name}' AND {cond}
           AND cl <> (SELECT r.cl FROM {row});
         INSERT OR IGNORE INTO quiver_siblings(tbl, pk, col, site, dbv, hlc, cl, ctx, value)
           SELECT {tid}, {pk}, '{name}', coalesce(x.site, r.site), coalesce(x.dbv, r.dbv),
                  coalesce(x.hlc, r.hlc), r.cl, CASE WHEN x.col IS NULL THEN r.ctx ELSE x.ctx END, OLD.{q}
           FROM quiver_clock r LEFT JOIN quiver_clock x
             ON x.tbl = r.tbl AND x.pk = r.pk AND x.col = '{name}' AND x.cl = r.cl
           WHERE r.tbl = {tid} AND r.pk = {pk} AND r.col = '' AND {cond}
             AND coalesce(x.site, r.site) <> 0
             AND NOT EXISTS (SELECT 1 FROM quiver_siblings s WHERE s.tbl = {tid} AND s.pk = {pk}
                               AND s.col = '{name}' AND s.cl = r.cl);
         INSERT INTO quiver_siblings(tbl, pk, col, site, dbv, hlc, cl, ctx, value)
           SELECT {tid}, {pk}, '{name}', 0, {DBV}, {HLC}, r.cl,
                  coalesce(r.know, json_object(CAST(r.site AS TEXT), r.dbv)),
                  coalesce((SELECT s.value FROM {mine} AND s.cl = r.cl ORDER BY s.dbv DESC LIMIT 1), 0)
                    + (coalesce(NEW.{q}, 0) - coalesce(OLD.{q}, 0))
           FROM {row} AND {cond}
             AND EXISTS (SELECT 1 FROM quiver_siblings s WHERE s.tbl = {tid} AND s.pk = {pk}
                           AND s.col = '{name}' AND s.cl = r.cl)
         ON CONFLICT(tbl, pk, col, site, dbv) DO UPDATE SET value = excluded.value, hlc = excluded.hlc;
         DELETE FROM quiver_siblings WHERE tbl = {tid} AND pk = {pk} AND col = '{name}' AND site = 0
           AND dbv < {DBV} AND {cond};\n"
    )
}

/// Whether a counter cell holds (or must now hold) other sites' totals.
fn counter_shared(tid: i64, pk: &str, name: &str) -> String {
    format!(
        "(EXISTS (SELECT 1 FROM quiver_siblings s WHERE s.tbl = {tid} AND s.pk = {pk} AND s.col = '{name}')
          OR (SELECT CASE WHEN x.cl = r.cl THEN x.site ELSE r.site END
              FROM quiver_clock r LEFT JOIN quiver_clock x
                ON x.tbl = r.tbl AND x.pk = r.pk AND x.col = '{name}'
              WHERE r.tbl = {tid} AND r.pk = {pk} AND r.col = '') <> 0)"
    )
}

fn update_body(t: &TableInfo, pk: &str) -> String {
    let (tid, cols) = (t.id, &t.columns);
    let mut sql = String::new();
    let changed = |c: &ColumnDef| format!("NEW.{q} IS NOT OLD.{q}", q = quote(&c.name));
    let counter = |c: &ColumnDef| t.policy(c) == quiver_core::Strategy::Counter;
    for c in cols {
        sql.push_str(&format!(
            "INSERT INTO quiver_clock(tbl, pk, col, site, dbv, hlc, cl, ctx)
               SELECT {tid}, {pk}, '{name}', 0, {DBV}, {HLC}, r.cl,
                      coalesce(r.know, json_object(CAST(r.site AS TEXT), r.dbv))
               FROM quiver_clock r
               WHERE r.tbl = {tid} AND r.pk = {pk} AND r.col = '' AND {cond}
               ON CONFLICT(tbl, pk, col) DO UPDATE SET site = 0, dbv = excluded.dbv,
                 hlc = excluded.hlc, cl = excluded.cl, ctx = excluded.ctx;\n",
            name = c.name,
            cond = changed(c),
        ));
    }
    // A counter's siblings are its sites' totals, never a conflict.
    let per_col = cols
        .iter()
        .filter(|c| !counter(c))
        .map(|c| format!("(col = '{}' AND {})", c.name, changed(c)))
        .chain(std::iter::once("false".to_string()))
        .collect::<Vec<_>>()
        .join(" OR ");
    let any = cols.iter().map(changed).collect::<Vec<_>>().join(" OR ");
    sql.push_str(&format!(
        "DELETE FROM quiver_siblings WHERE tbl = {tid} AND pk = {pk} AND ({per_col});
         UPDATE quiver_conflicts SET resolved_at = {NOW_MS}, resolution = 'replaced by a local write'
           WHERE tbl = {tid} AND pk = {pk} AND resolved_at IS NULL AND ({per_col});
         UPDATE quiver_clock SET know = json_set({KNOW}, '$.\"0\"', {DBV})
           WHERE tbl = {tid} AND pk = {pk} AND col = '' AND ({any});"
    ));
    sql
}

pub(crate) const KINDS: [&str; 4] = ["ins", "del", "rekey", "upd"];

pub(crate) fn trigger_ident(kind: &str, t: &TableInfo) -> String {
    format!("quiver_{kind}_{}", t.name)
}

/// (Names use `:` between table and column, which neither may contain, so
/// no two pairs give one name.)
/// The trigger that deletes rows of `t` pointing at a row of the
/// referenced table deleted by a local write (a merge's deletes are
/// followed in the apply path).
fn reference_ident(t: &TableInfo, col: &ColumnDef) -> String {
    format!("quiver_ref_{}:{}", t.name, col.name)
}

fn counter_ident(t: &TableInfo, col: &ColumnDef) -> String {
    format!("quiver_cnt_{}:{}", t.name, col.name)
}

/// The names of every capture trigger `t` should have.
fn expected_triggers(conn: &Connection, t: &TableInfo) -> Vec<String> {
    let kinds = if t.columns.is_empty() {
        &KINDS[..3]
    } else {
        &KINDS[..]
    };
    kinds
        .iter()
        .map(|k| trigger_ident(k, t))
        .chain(
            t.references()
                .filter(|(_, r)| {
                    r.on_delete == quiver_core::OnDelete::Cascade
                        && table_exists(conn, &r.table).unwrap_or(true)
                })
                .map(|(c, _)| reference_ident(t, c)),
        )
        .chain(
            t.columns
                .iter()
                .filter(|c| t.policy(c) == quiver_core::Strategy::Counter)
                .map(|c| counter_ident(t, c)),
        )
        .collect()
}

fn table_exists(conn: &Connection, name: &str) -> Result<bool> {
    Ok(conn
        .prepare_cached("SELECT count(*) FROM sqlite_master WHERE type = 'table' AND name = ?1")?
        .query_row([name], |r| r.get::<_, i64>(0))?
        > 0)
}

/// Whether every capture trigger of `t` exists (a table rebuilt by
/// another writer loses them).
pub(crate) fn installed(conn: &Connection, t: &TableInfo) -> Result<bool> {
    let mut stmt = conn.prepare_cached(
        "SELECT count(*) FROM sqlite_master WHERE type = 'trigger' AND name = ?1",
    )?;
    for name in expected_triggers(conn, t) {
        if stmt.query_row([&name], |r| r.get::<_, i64>(0))? == 0 {
            return Ok(false);
        }
    }
    Ok(true)
}

fn trigger_name(kind: &str, t: &TableInfo) -> String {
    quote(&trigger_ident(kind, t))
}

/// Drops every capture trigger of a table: its own, its counters', and
/// the reference triggers on the tables it points to.
pub(crate) fn remove(conn: &Connection, t: &TableInfo) -> Result<()> {
    for kind in KINDS {
        conn.execute_batch(&format!("DROP TRIGGER IF EXISTS {}", trigger_name(kind, t)))?;
    }
    // Its counter triggers are on the table itself; its reference
    // triggers are on the tables it points to, and delete from it.
    let extra: Vec<String> = conn
        .prepare(
            "SELECT name FROM sqlite_master WHERE type = 'trigger' AND (
               (tbl_name = ?1 AND substr(name, 1, 11) = 'quiver_cnt_')
               OR (substr(name, 1, 11) = 'quiver_ref_' AND instr(sql, ?2) > 0))",
        )?
        .query_map(
            rusqlite::params![t.name, format!("DELETE FROM {} WHERE", quote(&t.name))],
            |r| r.get(0),
        )?
        .collect::<rusqlite::Result<_>>()?;
    for name in extra {
        conn.execute_batch(&format!("DROP TRIGGER IF EXISTS {}", quote(&name)))?;
    }
    Ok(())
}

/// Replaces a table's capture triggers with this build's.
pub(crate) fn reinstall(conn: &Connection, t: &TableInfo) -> Result<()> {
    remove(conn, t)?;
    install(conn, t)
}

/// Folds the log if the write lock is free right now; otherwise leaves it
/// for the next reader. For read-only views (conflict listing) that should
/// not wait on another writer; an unfolded log only delays what they show
/// about rows replaced by `INSERT OR REPLACE`.
pub(crate) fn try_fold_pending(conn: &Connection) -> Result<()> {
    conn.busy_timeout(std::time::Duration::ZERO)?;
    let folded = fold_pending(conn);
    conn.busy_timeout(crate::schema::BUSY_TIMEOUT)?;
    match folded {
        Err(crate::StoreError::Sqlite(e))
            if e.sqlite_error_code() == Some(rusqlite::ErrorCode::DatabaseBusy) =>
        {
            Ok(())
        }
        other => other.map(|_| ()),
    }
}

/// Moves the logged inserts into the clock (see [`FOLD`]); every reader of
/// the clock calls this first. Returns whether anything was pending.
pub(crate) fn fold_pending(conn: &Connection) -> Result<bool> {
    // A store opened read-only leaves the log for a writer; readers of the
    // clock stay right, as no version is claimed past an unfolded insert.
    if read_only(conn)? {
        return Ok(false);
    }
    let pending: bool = conn
        .prepare_cached("SELECT EXISTS (SELECT 1 FROM quiver_pending)")?
        .query_row([], |r| r.get(0))?;
    if !pending {
        return Ok(false);
    }
    // A savepoint keeps the move and the log's truncation together, in or
    // out of an enclosing transaction.
    conn.execute_batch("SAVEPOINT quiver_fold")?;
    if let Err(e) = conn.execute_batch(FOLD) {
        let _ = conn.execute_batch("ROLLBACK TO quiver_fold; RELEASE quiver_fold");
        return Err(e.into());
    }
    conn.execute_batch("RELEASE quiver_fold")?;
    Ok(true)
}

/// Creates the capture triggers of a replicated table.
pub(crate) fn install(conn: &Connection, t: &TableInfo) -> Result<()> {
    let tid = t.id;
    let q = quote(&t.name);
    let new_pk = pk_expr("NEW", &t.pk);
    let old_pk = pk_expr("OLD", &t.pk);
    let same_key =
        t.pk.iter()
            .map(|c| format!("NEW.{q} IS OLD.{q}", q = quote(&c.name)))
            .collect::<Vec<_>>()
            .join(" AND ");
    // Updates and deletes read the row's record, so they fold the log first
    // (nothing to do unless inserts are pending).
    let mut sql = format!(
        "CREATE TRIGGER {ins} AFTER INSERT ON {q} BEGIN {ib} END;
         CREATE TRIGGER {del} AFTER DELETE ON {q} WHEN {CAPTURING} BEGIN {FOLD} {db} END;
         CREATE TRIGGER {rekey} AFTER UPDATE ON {q} WHEN {CAPTURING} AND NOT ({same_key}) BEGIN {FOLD} {db} {ib} END;",
        ins = trigger_name("ins", t),
        del = trigger_name("del", t),
        rekey = trigger_name("rekey", t),
        ib = insert_body(tid, &new_pk),
        db = delete_body(tid, &old_pk),
    );
    if !t.columns.is_empty() {
        sql.push_str(&format!(
            "CREATE TRIGGER {upd} AFTER UPDATE ON {q} WHEN {CAPTURING} AND ({same_key}) BEGIN {FOLD} {ub} END;",
            upd = trigger_name("upd", t),
            ub = update_body(t, &new_pk),
        ));
    }
    for c in t
        .columns
        .iter()
        .filter(|c| t.policy(c) == quiver_core::Strategy::Counter)
    {
        sql.push_str(&format!(
            "CREATE TRIGGER {name} BEFORE UPDATE OF {col} ON {q}
               WHEN {CAPTURING} AND ({same_key}) AND NEW.{col} IS NOT OLD.{col}
                 AND {shared}
             BEGIN {body} END;",
            name = quote(&counter_ident(t, c)),
            col = quote(&c.name),
            shared = counter_shared(tid, &old_pk, &c.name),
            body = counter_body(tid, &old_pk, c),
        ));
    }
    for (c, r) in t.references() {
        // A target not created yet gets the trigger when it is registered.
        if r.on_delete != quiver_core::OnDelete::Cascade || !table_exists(conn, &r.table)? {
            continue;
        }
        sql.push_str(&format!(
            "CREATE TRIGGER {name} AFTER DELETE ON {target} WHEN {CAPTURING} BEGIN
               DELETE FROM {q} WHERE {col} = OLD.{tcol};
             END;",
            name = quote(&reference_ident(t, c)),
            target = quote(&r.table),
            col = quote(&c.name),
            tcol = quote(&r.column),
        ));
    }
    conn.execute_batch(&sql)?;
    Ok(())
}

/// Gives rows that existed before registration a version of their own.
pub(crate) fn backfill(conn: &Connection, t: &TableInfo) -> Result<()> {
    conn.execute(
        &format!(
            "INSERT OR IGNORE INTO quiver_clock(tbl, pk, col, site, dbv, hlc, cl)
             SELECT {}, {}, '', 0, {DBV}, {HLC}, 1 FROM {}",
            t.id,
            pk_expr("", &t.pk),
            quote(&t.name)
        ),
        [],
    )?;
    Ok(())
}

/// Whether the open version holds captured writes, read without taking the
/// write lock (the check [`close_open_version`] makes again under it).
pub(crate) fn open_version_has_writes(conn: &Connection) -> Result<bool> {
    Ok(conn
        .prepare_cached(
            "SELECT (SELECT p.dbv FROM quiver_pending p ORDER BY p.seq DESC LIMIT 1) = s.dbv
                OR EXISTS (SELECT 1 FROM quiver_tables t WHERE EXISTS (
                  SELECT 1 FROM quiver_clock c WHERE c.tbl = t.id AND c.site = 0 AND c.dbv = s.dbv)
                  OR EXISTS (
                  SELECT 1 FROM quiver_siblings c WHERE c.tbl = t.id AND c.site = 0 AND c.dbv = s.dbv))
             FROM quiver_state s",
        )?
        .query_row([], |r| r.get::<_, Option<bool>>(0))?
        .unwrap_or(false))
}

/// Seals the open db_version if any change carries it (a logged insert or
/// a clock record), so later writes get the next one. Returns whether it sealed one.
pub(crate) fn close_open_version(conn: &Connection) -> Result<bool> {
    if read_only(conn)? {
        return Ok(false);
    }
    let n = conn.execute(
        "UPDATE quiver_state SET dbv = dbv + 1
         WHERE (SELECT p.dbv FROM quiver_pending p ORDER BY p.seq DESC LIMIT 1) = quiver_state.dbv
            OR EXISTS (SELECT 1 FROM quiver_tables t WHERE EXISTS (
           SELECT 1 FROM quiver_clock c WHERE c.tbl = t.id AND c.site = 0
             AND c.dbv = (SELECT dbv FROM quiver_state))
           OR EXISTS (
           SELECT 1 FROM quiver_siblings c WHERE c.tbl = t.id AND c.site = 0
             AND c.dbv = (SELECT dbv FROM quiver_state)))",
        [],
    )?;
    Ok(n > 0)
}

/// Records a local write of one cell whose value was set with capture off:
/// a new version replacing everything the row knew, as the update trigger does.
pub(crate) fn touch_cell(
    conn: &Connection,
    tid: i64,
    key: &quiver_core::Value,
    col: &str,
) -> Result<()> {
    use crate::sqlvalue::P;
    fold_pending(conn)?;
    conn.execute(
        &format!(
            "INSERT INTO quiver_clock(tbl, pk, col, site, dbv, hlc, cl, ctx)
               SELECT ?1, ?2, ?3, 0, {DBV}, {HLC}, r.cl, coalesce(r.know, json_object(CAST(r.site AS TEXT), r.dbv))
               FROM quiver_clock r WHERE r.tbl = ?1 AND r.pk = ?2 AND r.col = ''
               ON CONFLICT(tbl, pk, col) DO UPDATE SET site = 0, dbv = excluded.dbv,
                 hlc = excluded.hlc, cl = excluded.cl, ctx = excluded.ctx"
        ),
        rusqlite::params![tid, P(key), col],
    )?;
    conn.execute(
        "DELETE FROM quiver_siblings WHERE tbl = ?1 AND pk = ?2 AND col = ?3",
        rusqlite::params![tid, P(key), col],
    )?;
    conn.execute(
        &format!(
            "UPDATE quiver_clock SET know = json_set({KNOW}, '$.\"0\"', {DBV})
             WHERE tbl = ?1 AND pk = ?2 AND col = ''"
        ),
        rusqlite::params![tid, P(key)],
    )?;
    Ok(())
}

/// Whether this connection cannot write the store (opened read-only).
pub(crate) fn read_only(conn: &Connection) -> Result<bool> {
    Ok(conn.is_readonly(rusqlite::DatabaseName::Main)?)
}

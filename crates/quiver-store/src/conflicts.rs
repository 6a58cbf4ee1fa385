//! Conflicts: recorded as they are detected, listed, and resolved by an
//! ordinary local write that replaces every version it saw.

use quiver_core::merge::Version;
use quiver_core::{Hlc, Value};
use rusqlite::{params, Connection, OptionalExtension};
use serde::{Deserialize, Serialize};

use crate::catalog::{self, TableInfo};
use crate::names::quote;
use crate::rowstate::{self, Sites};
use crate::sqlvalue::{display_pk, hex, pk_values, to_json, P};
use crate::{wall_ms, Result, Store, StoreError};

/// One version taking part in a conflict.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ConflictVersion {
    /// `site:db_version`, the handle `quiver conflicts resolve --keep` takes.
    pub version: String,
    pub hlc: String,
    pub value: serde_json::Value,
    /// Whether the cell kept this version after the merge.
    pub kept: bool,
}

/// A conflict as recorded.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Conflict {
    pub id: i64,
    pub table: String,
    pub shard: String,
    pub pk: String,
    pub column: String,
    pub strategy: String,
    pub detected_at: u64,
    pub versions: Vec<ConflictVersion>,
    pub resolved_at: Option<u64>,
    pub resolution: Option<String>,
    /// `concurrent` (two writes to one cell), or `resurrection`: a write to
    /// a row deleted and compacted away meanwhile, held for review (the
    /// column is empty: the whole row; keep `deleted` or the write).
    pub kind: String,
}

/// How to resolve a conflict.
#[derive(Debug, Clone, PartialEq)]
pub enum Resolution {
    /// Keep one of the recorded versions (by its `site:db_version` handle,
    /// or an unambiguous prefix of it).
    Keep(String),
    /// Write a new value.
    Value(Value),
}

fn label(v: &Version) -> String {
    format!("{}:{}", v.dot.site, v.dot.db_version)
}

/// How a value is shown in a conflict listing: vectors as float arrays.
fn show(t: &TableInfo, col: &str, v: &Value) -> serde_json::Value {
    match (t.column(col).map(|c| t.column_kind(c)), v) {
        (Some(quiver_core::ColumnKind::Vector), Value::Blob(b)) if b.len() % 4 == 0 => {
            quiver_core::vector::decode(b)
                .map(|x| serde_json::json!(x))
                .collect()
        }
        (_, Value::Blob(b)) => serde_json::Value::String(hex(b)),
        _ => to_json(v),
    }
}

fn versions_json(t: &TableInfo, col: &str, contenders: &[Version], kept: &[Version]) -> String {
    let list: Vec<ConflictVersion> = contenders
        .iter()
        .map(|v| ConflictVersion {
            version: label(v),
            hlc: v.hlc.to_string(),
            value: show(t, col, &v.value),
            kept: kept.iter().any(|k| k.dot == v.dot),
        })
        .collect();
    serde_json::to_string(&list).unwrap_or_else(|_| "[]".into())
}

/// Records a detected conflict. Under `manual` an open conflict on the same
/// cell is updated rather than duplicated. Returns its id.
pub(crate) fn record(
    conn: &Connection,
    t: &TableInfo,
    key: &Value,
    col: &str,
    contenders: &[Version],
    kept: &[Version],
    now: Hlc,
) -> Result<i64> {
    let versions = versions_json(t, col, contenders, kept);
    let strategy = t.column(col).map_or(t.strategy, |c| t.policy(c));
    if strategy.keeps_open() {
        let open: Option<i64> = conn
            .prepare_cached(
                "SELECT id FROM quiver_conflicts WHERE tbl = ?1 AND pk = ?2 AND col = ?3 AND resolved_at IS NULL",
            )?
            .query_row(params![t.id, P(key), col], |r| r.get(0))
            .optional()?;
        if let Some(id) = open {
            conn.execute(
                "UPDATE quiver_conflicts SET versions = ?2 WHERE id = ?1",
                params![id, versions],
            )?;
            return Ok(id);
        }
        conn.execute(
            "INSERT INTO quiver_conflicts(tbl, pk, col, strategy, detected_at, versions) VALUES (?1, ?2, ?3, ?4, ?5, ?6)",
            params![t.id, P(key), col, strategy.as_str(), now.ms() as i64, versions],
        )?;
    } else {
        conn.execute(
            "INSERT INTO quiver_conflicts(tbl, pk, col, strategy, detected_at, versions, resolved_at, resolution)
             VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?5, ?7)",
            params![
                t.id,
                P(key),
                col,
                strategy.as_str(),
                now.ms() as i64,
                versions,
                format!("automatic ({strategy})")
            ],
        )?;
    }
    Ok(conn.last_insert_rowid())
}

/// Marks the open conflict of a cell resolved.
pub(crate) fn close_open(
    conn: &Connection,
    t: &TableInfo,
    key: &Value,
    col: &str,
    why: &str,
) -> Result<()> {
    conn.prepare_cached(
        "UPDATE quiver_conflicts SET resolved_at = ?4, resolution = ?5
         WHERE tbl = ?1 AND pk = ?2 AND col = ?3 AND resolved_at IS NULL",
    )?
    .execute(params![t.id, P(key), col, wall_ms() as i64, why])?;
    Ok(())
}

/// Whether a cell still holds several versions (an open conflict is real).
fn still_open(
    conn: &Connection,
    t: &TableInfo,
    key: &Value,
    pk: &[Value],
    col: &str,
) -> Result<bool> {
    let state = rowstate::load(conn, &mut Sites::default(), t, key, pk)?;
    Ok(state.cells.get(col).is_some_and(|v| v.len() > 1))
}

type Raw = (
    i64,
    i64,
    Value,
    String,
    String,
    i64,
    String,
    Option<i64>,
    Option<String>,
    String,
);

fn query(conn: &Connection, filter: &str) -> Result<Vec<Raw>> {
    let sql = format!(
        "SELECT id, tbl, pk, col, strategy, detected_at, versions, resolved_at, resolution, kind
         FROM quiver_conflicts {filter} ORDER BY id"
    );
    let mut stmt = conn.prepare(&sql)?;
    let rows = stmt
        .query_map([], |r| {
            Ok((
                r.get(0)?,
                r.get(1)?,
                crate::sqlvalue::from_ref(r.get_ref(2)?),
                r.get(3)?,
                r.get(4)?,
                r.get(5)?,
                r.get(6)?,
                r.get(7)?,
                r.get(8)?,
                r.get(9)?,
            ))
        })?
        .collect::<rusqlite::Result<_>>()?;
    Ok(rows)
}

impl Store {
    fn conflicts_where(&self, filter: &str, shard: Option<&str>) -> Result<Vec<Conflict>> {
        crate::triggers::try_fold_pending(&self.conn)?;
        let tables = self.tables()?;
        let mut out = Vec::new();
        for (id, tbl, key, col, strategy, detected, versions, resolved, resolution, kind) in
            query(&self.conn, filter)?
        {
            let Some(t) = tables.iter().find(|t| t.id == tbl) else {
                continue;
            };
            if shard.is_some_and(|s| s != t.shard) {
                continue;
            }
            let pk = pk_values(&key, t.pk.len()).unwrap_or_else(|| vec![key.clone()]);
            if resolved.is_none()
                && kind != "resurrection"
                && !still_open(&self.conn, t, &key, &pk, &col)?
            {
                // Replaced wholesale since (INSERT OR REPLACE starts a new life).
                continue;
            }
            out.push(Conflict {
                id,
                table: t.name.clone(),
                shard: t.shard.clone(),
                pk: display_pk(&pk),
                column: col,
                strategy,
                detected_at: detected as u64,
                versions: serde_json::from_str(&versions).unwrap_or_default(),
                resolved_at: resolved.map(|r| r as u64),
                resolution,
                kind,
            });
        }
        Ok(out)
    }

    /// Conflicts still open for review, optionally of one shard.
    pub fn get_unresolved_conflicts(&self, shard: Option<&str>) -> Result<Vec<Conflict>> {
        self.conflicts_where("WHERE resolved_at IS NULL", shard)
    }

    /// Every recorded conflict, resolved or not.
    pub fn conflicts(&self, shard: Option<&str>) -> Result<Vec<Conflict>> {
        self.conflicts_where("", shard)
    }

    /// Resolves an open conflict with a local write that replaces every
    /// version it saw, so the choice wins on every replica after sync.
    /// A JSON value as the value of conflict `id`'s column: a number array
    /// for a vector (stored as little-endian f32), an object for metadata,
    /// a string, number, boolean or null for a plain column.
    pub fn conflict_value(&self, id: i64, json: &serde_json::Value) -> Result<Value> {
        use quiver_core::ColumnKind;
        let c = self
            .conflicts(None)?
            .into_iter()
            .find(|c| c.id == id)
            .ok_or(StoreError::NoSuchConflict(id))?;
        let t = self.table(&c.table)?;
        let col = t
            .column(&c.column)
            .ok_or_else(|| StoreError::InvalidValue(format!("column {} is gone", c.column)))?;
        let bad = |m: String| StoreError::InvalidValue(m);
        Ok(match (t.column_kind(col), json) {
            (ColumnKind::Vector, j) => {
                let v: Vec<f32> = serde_json::from_value(j.clone())
                    .map_err(|e| bad(format!("the value must be a number array: {e}")))?;
                Value::Blob(quiver_core::vector::encode(&v))
            }
            (ColumnKind::JsonObject, j @ serde_json::Value::Object(_)) => {
                Value::Text(j.to_string())
            }
            (ColumnKind::JsonObject, _) => {
                return Err(bad(format!(
                    "the value must be a JSON object for {}",
                    c.column
                )))
            }
            (_, serde_json::Value::Null) => Value::Null,
            (_, serde_json::Value::String(s)) => Value::Text(s.clone()),
            (_, serde_json::Value::Number(n)) => match n.as_i64() {
                Some(i) => Value::Integer(i),
                None => Value::Real(n.as_f64().unwrap_or_default()),
            },
            (_, serde_json::Value::Bool(b)) => Value::Integer(*b as i64),
            (_, other) => Value::Text(other.to_string()),
        })
    }

    pub fn resolve(&mut self, id: i64, choice: Resolution) -> Result<()> {
        crate::triggers::fold_pending(&self.conn)?;
        let raw = query(&self.conn, &format!("WHERE id = {id}"))?;
        let Some((_, tbl, key, col, _, _, versions_json, _, _, kind)) = raw.into_iter().next()
        else {
            return Err(StoreError::NoSuchConflict(id));
        };
        let open: bool = self.conn.query_row(
            "SELECT resolved_at IS NULL FROM quiver_conflicts WHERE id = ?1",
            [id],
            |r| r.get(0),
        )?;
        if !open {
            return Err(StoreError::ConflictResolved { id });
        }
        let t = catalog::load_all(&self.conn)?
            .into_iter()
            .find(|t| t.id == tbl)
            .ok_or_else(|| StoreError::Corrupt(format!("conflict {id} names an unknown table")))?;
        let pk = pk_values(&key, t.pk.len())
            .ok_or_else(|| StoreError::Corrupt(format!("conflict {id} has a bad key")))?;
        if kind == "resurrection" {
            return self.resolve_resurrection(id, &t, &pk, &versions_json, choice);
        }
        let mut sites = Sites::default();
        let state = rowstate::load(&self.conn, &mut sites, &t, &key, &pk)?;
        let versions = state.cells.get(&col).cloned().unwrap_or_default();
        if versions.len() < 2 {
            close_open(&self.conn, &t, &key, &col, "replaced by a local write")?;
            return Err(StoreError::ConflictResolved { id });
        }
        let (value, how) = match choice {
            Resolution::Keep(handle) => {
                let matches: Vec<&Version> = versions
                    .iter()
                    .filter(|v| label(v).starts_with(&handle))
                    .collect();
                match matches.as_slice() {
                    [one] => (one.value.clone(), format!("kept {}", label(one))),
                    _ => {
                        return Err(StoreError::NoSuchVersion {
                            id,
                            version: handle,
                            choices: versions.iter().map(label).collect::<Vec<_>>().join(", "),
                        })
                    }
                }
            }
            Resolution::Value(v) => {
                let c = t.column(&col).ok_or_else(|| {
                    StoreError::Corrupt(format!("conflict {id} names an unknown column"))
                })?;
                t.check_value(c, &v).map_err(StoreError::InvalidValue)?;
                (v, "new value".to_string())
            }
        };
        let where_pk =
            t.pk.iter()
                .enumerate()
                .map(|(i, c)| format!("{} IS ?{}", quote(&c.name), i + 2))
                .collect::<Vec<_>>()
                .join(" AND ");
        let update = format!(
            "UPDATE {} SET {} = ?1 WHERE {where_pk}",
            quote(&t.name),
            quote(&col)
        );
        let tid = t.id;
        self.local_write(|tx| {
            // Write the value without capture, then record the resolution as
            // a new version of the cell that replaces everything the row knew.
            tx.execute("UPDATE quiver_state SET applying = 1", [])?;
            let params: Vec<P<'_>> = std::iter::once(P(&value)).chain(pk.iter().map(P)).collect();
            tx.execute(&update, rusqlite::params_from_iter(params))?;
            tx.execute("UPDATE quiver_state SET applying = 0", [])?;
            crate::triggers::touch_cell(tx, tid, &key, &col)?;
            tx.execute(
                "UPDATE quiver_conflicts SET resolved_at = ?2, resolution = ?3 WHERE id = ?1",
                params![id, wall_ms() as i64, how],
            )?;
            Ok(())
        })?;
        Ok(())
    }

    /// Keeps the delete (closes the conflict) or the write (inserts the row
    /// again: a new life past this store's tombstone of it).
    fn resolve_resurrection(
        &mut self,
        id: i64,
        t: &TableInfo,
        pk: &[Value],
        versions_json: &str,
        choice: Resolution,
    ) -> Result<()> {
        let listed: Vec<ConflictVersion> = serde_json::from_str(versions_json).unwrap_or_default();
        let labels: Vec<&str> = listed.iter().map(|v| v.version.as_str()).collect();
        let handle = match choice {
            Resolution::Keep(h) => h,
            Resolution::Value(_) => {
                return Err(StoreError::InvalidValue(format!(
                    "conflict {id} is a resurrection of a whole row: keep one of {}",
                    labels.join(", ")
                )))
            }
        };
        let matches: Vec<&str> = labels
            .iter()
            .copied()
            .filter(|l| l.starts_with(&handle))
            .collect();
        let [kept] = matches.as_slice() else {
            return Err(StoreError::NoSuchVersion {
                id,
                version: handle,
                choices: labels.join(", "),
            });
        };
        let close = "UPDATE quiver_conflicts SET resolved_at = ?2, resolution = ?3 WHERE id = ?1";
        if *kept == crate::resurrect::DELETED {
            self.conn
                .execute(close, params![id, wall_ms() as i64, "kept the delete"])?;
            return Ok(());
        }
        // Over what the row shows now, if it was written again meanwhile:
        // a write that carried some cells only keeps the others.
        let mut row = rowstate::read_user_row(&self.conn, t, pk)?.unwrap_or_default();
        row.extend(crate::resurrect::stored_row(&self.conn, id)?);
        let how = format!("kept {kept}: the row written again");
        self.local_write(|tx| {
            // Captured, as any local write: an upsert, since the row may
            // have been written again meanwhile.
            rowstate::write_user_row(tx, t, pk, true, &row)?;
            tx.execute(close, params![id, wall_ms() as i64, how])?;
            Ok(())
        })
    }
}

//! Declared references kept whole across merges.
//!
//! SQLite's own foreign keys cannot span replicas: a row and the row it
//! points to arrive in separate batches, and a delete on one replica meets
//! a concurrent insert of a referring row on another. So references are
//! declared on the catalog (`quiver table add T --references COL=TABLE.COL`)
//! and kept after each merge: a referring row whose target is gone is
//! deleted as a replicated delete (`cascade`), which every replica then
//! receives, or left and reported as dangling (`keep`). A local delete of a
//! target cascades through a trigger, as the write happens.

use std::collections::{HashMap, HashSet};

use quiver_core::{OnDelete, Value};
use rusqlite::Connection;
use serde::Serialize;

use crate::catalog::{self, ColumnDef, TableInfo};
use crate::events::StoreEvent;
use crate::names::quote;
use crate::sqlvalue::{display_pk, from_ref, P};
use crate::{Result, Store};

/// Referring rows whose target does not exist.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Dangling {
    pub table: String,
    pub column: String,
    pub references: String,
    pub keys: Vec<String>,
}

/// The keys of `t`'s rows whose `col` points at no row of its target; with
/// `deleted_only`, only those whose target this replica knows was deleted
/// (its tombstone is here), not one that has not arrived yet. A reference
/// whose target table is gone points at nothing to check.
fn dangling_rows(
    conn: &Connection,
    t: &TableInfo,
    col: &ColumnDef,
    deleted_only: bool,
) -> Result<Vec<Vec<Value>>> {
    let Some(r) = col.references() else {
        return Ok(Vec::new());
    };
    let Some(target) = catalog::load(conn, &r.table)? else {
        return Ok(Vec::new());
    };
    let keys =
        t.pk.iter()
            .map(|c| format!("x.{}", quote(&c.name)))
            .collect::<Vec<_>>()
            .join(", ");
    // The target is keyed by this one column, so its clock key is the value.
    let tombstone = if deleted_only {
        format!(
            "AND EXISTS (SELECT 1 FROM quiver_clock c WHERE c.tbl = {} AND c.pk = x.{} AND c.col = '' AND c.cl % 2 = 0)",
            target.id,
            quote(&col.name)
        )
    } else {
        String::new()
    };
    let sql = format!(
        "SELECT {keys} FROM {t} AS x WHERE x.{c} IS NOT NULL
           AND NOT EXISTS (SELECT 1 FROM {target} AS y WHERE y.{tc} = x.{c}) {tombstone}",
        t = quote(&t.name),
        c = quote(&col.name),
        target = quote(&r.table),
        tc = quote(&r.column),
    );
    let n = t.pk.len();
    let rows = conn
        .prepare_cached(&sql)?
        .query_map([], |row| {
            (0..n)
                .map(|i| row.get_ref(i).map(from_ref))
                .collect::<rusqlite::Result<Vec<_>>>()
        })?
        .collect::<rusqlite::Result<_>>()?;
    Ok(rows)
}

/// After a merge (capture on again, in the merge's transaction): deletes,
/// as local writes peers will receive, the rows of `cascade` references
/// whose target is deleted here (a tombstone, from this merge or an earlier
/// one). A target that has not arrived yet deletes nothing: the rows wait,
/// listed as dangling, since the target may be on its way (a shard's
/// tables stream in name order). Only references touching a table whose
/// rows the merge changed are looked at.
pub(crate) fn keep_whole(
    conn: &Connection,
    batch_tables: &HashMap<String, TableInfo>,
    events: &[StoreEvent],
) -> Result<u64> {
    let touched: HashSet<&str> = events
        .iter()
        .filter_map(|e| match e {
            StoreEvent::RemoteChange { table, .. } => Some(table.as_str()),
            _ => None,
        })
        .collect();
    if touched.is_empty() {
        return Ok(0);
    }
    let shards: HashSet<&str> = batch_tables.values().map(|t| t.shard.as_str()).collect();
    let mut deleted = 0;
    for t in catalog::load_all(conn)?
        .iter()
        .filter(|t| shards.contains(t.shard.as_str()))
    {
        for (col, r) in t.references() {
            if r.on_delete != OnDelete::Cascade
                || !(touched.contains(t.name.as_str()) || touched.contains(r.table.as_str()))
            {
                continue;
            }
            let rows = dangling_rows(conn, t, col, true)?;
            if rows.is_empty() {
                continue;
            }
            let sql = format!(
                "DELETE FROM {} WHERE {}",
                quote(&t.name),
                t.pk.iter()
                    .enumerate()
                    .map(|(i, c)| format!("{} IS ?{}", quote(&c.name), i + 1))
                    .collect::<Vec<_>>()
                    .join(" AND ")
            );
            let mut stmt = conn.prepare_cached(&sql)?;
            for pk in &rows {
                tracing::info!(
                    table = %t.name,
                    key = %display_pk(pk),
                    "deleting a row whose {}.{} target a merge removed",
                    r.table,
                    r.column
                );
                deleted += stmt.execute(rusqlite::params_from_iter(pk.iter().map(P)))? as u64;
            }
        }
    }
    Ok(deleted)
}

impl Store {
    /// Rows of `keep` references (and of `cascade` ones not yet followed)
    /// whose target does not exist, per reference.
    pub fn dangling(&self) -> Result<Vec<Dangling>> {
        let mut out = Vec::new();
        for t in self.tables()? {
            for (col, r) in t.references() {
                let rows = dangling_rows(&self.conn, &t, col, false)?;
                if !rows.is_empty() {
                    out.push(Dangling {
                        table: t.name.clone(),
                        column: col.name.clone(),
                        references: format!("{}.{}", r.table, r.column),
                        keys: rows.iter().map(|k| display_pk(k)).collect(),
                    });
                }
            }
        }
        Ok(out)
    }
}

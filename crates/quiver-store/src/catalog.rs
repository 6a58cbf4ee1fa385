//! The registry of replicated tables and collections (`quiver_tables`).

use quiver_core::{ColumnKind, Metric, Strategy, Value};
use rusqlite::{Connection, OptionalExtension, Row};
use serde::Serialize;

use crate::names::{self, quote};
use crate::{triggers, wall_ms, Result, Store, StoreError};

pub use quiver_core::{ColumnDef, TableKind};

/// A replicated table (or collection) as registered.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct TableInfo {
    #[serde(skip)]
    pub id: i64,
    pub name: String,
    pub shard: String,
    pub strategy: Strategy,
    pub kind: TableKind,
    /// Primary-key columns, in key order.
    pub pk: Vec<ColumnDef>,
    /// The other columns, in table order.
    pub columns: Vec<ColumnDef>,
    pub dim: Option<usize>,
    pub metric: Option<Metric>,
    pub schema_version: i64,
}

impl TableInfo {
    pub fn column(&self, name: &str) -> Option<&ColumnDef> {
        self.columns.iter().find(|c| c.name == name)
    }

    /// How `merge` treats the column.
    pub fn column_kind(&self, col: &ColumnDef) -> ColumnKind {
        let t = col.decl_type.to_ascii_uppercase();
        match self.kind {
            TableKind::Collection if col.name == "vector" => ColumnKind::Vector,
            TableKind::Collection if col.name == "metadata" => ColumnKind::JsonObject,
            _ if t.contains("VECTOR") || t.contains("F32") => ColumnKind::Vector,
            _ if t.contains("JSON") => ColumnKind::JsonObject,
            _ => ColumnKind::Other,
        }
    }

    /// Checks a value a peer sent for `col` against the declared column.
    pub fn check_value(&self, col: &ColumnDef, v: &Value) -> std::result::Result<(), String> {
        let what = || format!("{}.{}", self.name, col.name);
        if matches!(v, Value::Null) {
            return if col.not_null {
                Err(format!("{} is NOT NULL but got NULL", what()))
            } else {
                Ok(())
            };
        }
        if let (TableKind::Collection, Some(dim)) = (self.kind, self.dim) {
            match (col.name.as_str(), v) {
                ("vector", Value::Blob(b)) if b.len() == dim * 4 => {
                    return crate::collections::check_finite_blob(b).map_err(|e| e.to_string())
                }
                ("vector", Value::Blob(b)) => {
                    return Err(format!(
                        "{} has {} dimensions, expected {dim}",
                        what(),
                        b.len() as f64 / 4.0
                    ))
                }
                ("metadata", Value::Text(t)) => {
                    return crate::collections::check_metadata(t).map_err(|e| e.to_string())
                }
                ("vector" | "metadata", other) => {
                    return Err(format!("{} got a {}", what(), other.type_name()))
                }
                _ => {}
            }
        }
        let t = col.decl_type.to_ascii_uppercase();
        let ok = if t.contains("INT") {
            matches!(v, Value::Integer(_))
        } else if t.contains("CHAR") || t.contains("CLOB") || t.contains("TEXT") {
            matches!(v, Value::Text(_))
        } else if t.contains("REAL") || t.contains("FLOA") || t.contains("DOUB") {
            matches!(v, Value::Real(_) | Value::Integer(_))
        } else {
            true
        };
        if ok {
            if self.column_kind(col) == ColumnKind::Vector {
                if let Value::Blob(b) = v {
                    if b.len() % 4 != 0 {
                        return Err(format!("{} is not a whole number of f32 values", what()));
                    }
                }
            }
            Ok(())
        } else {
            Err(format!(
                "{} is declared {} but got a {}",
                what(),
                col.decl_type,
                v.type_name()
            ))
        }
    }
}

/// A `quiver_tables` row as read.
type RawTable = (
    i64,
    String,
    String,
    String,
    String,
    String,
    String,
    Option<i64>,
    Option<String>,
    i64,
);

fn from_row(r: &Row<'_>) -> rusqlite::Result<RawTable> {
    Ok((
        r.get(0)?,
        r.get(1)?,
        r.get(2)?,
        r.get(3)?,
        r.get(4)?,
        r.get(5)?,
        r.get(6)?,
        r.get(7)?,
        r.get(8)?,
        r.get(9)?,
    ))
}

const SELECT: &str = "SELECT id, name, shard, strategy, kind, pk, columns, dim, metric, schema_version FROM quiver_tables";

fn decode(
    (id, name, shard, strategy, kind, pk, columns, dim, metric, schema_version): RawTable,
) -> Result<TableInfo> {
    let corrupt =
        |what: &str| StoreError::Corrupt(format!("quiver_tables row {name:?}: bad {what}"));
    Ok(TableInfo {
        id,
        strategy: strategy.parse().map_err(|_| corrupt("strategy"))?,
        kind: match kind.as_str() {
            "table" => TableKind::Table,
            "collection" => TableKind::Collection,
            _ => return Err(corrupt("kind")),
        },
        pk: serde_json::from_str(&pk).map_err(|_| corrupt("pk"))?,
        columns: serde_json::from_str(&columns).map_err(|_| corrupt("columns"))?,
        dim: dim.map(|d| d as usize),
        metric: metric
            .map(|m| m.parse())
            .transpose()
            .map_err(|_| corrupt("metric"))?,
        schema_version,
        name,
        shard,
    })
}

/// The registered table `name`, if any.
pub(crate) fn load(conn: &Connection, name: &str) -> Result<Option<TableInfo>> {
    let mut stmt = conn.prepare_cached(&format!("{SELECT} WHERE name = ?1"))?;
    let row = stmt.query_row([name], from_row).optional()?;
    row.map(decode).transpose()
}

/// Every registered table, by name.
pub(crate) fn load_all(conn: &Connection) -> Result<Vec<TableInfo>> {
    let mut stmt = conn.prepare_cached(&format!("{SELECT} ORDER BY name"))?;
    let rows = stmt
        .query_map([], from_row)?
        .collect::<rusqlite::Result<Vec<_>>>()?;
    rows.into_iter().map(decode).collect()
}

/// Inspects an existing user table and registers it for replication:
/// records it, installs its triggers and gives its existing rows a version.
pub(crate) fn register(
    conn: &Connection,
    name: &str,
    shard: &str,
    strategy: Strategy,
    kind: TableKind,
    dim: Option<usize>,
    metric: Option<Metric>,
) -> Result<TableInfo> {
    names::check(name)?;
    names::check_shard(shard)?;
    let refuse = |reason: String| StoreError::TableRefused {
        table: name.to_string(),
        reason,
    };
    if load(conn, name)?.is_some() {
        return Err(StoreError::AlreadyExists(name.to_string()));
    }
    let object: Option<String> = conn
        .query_row(
            "SELECT type FROM sqlite_master WHERE name = ?1 AND type IN ('table', 'view')",
            [name],
            |r| r.get(0),
        )
        .optional()?;
    match object.as_deref() {
        Some("table") => {}
        Some(_) => {
            return Err(refuse(
                "it is a view: a view holds no rows of its own to replicate; replicate the \
                 tables it reads from, and create the view on each replica"
                    .into(),
            ))
        }
        None => return Err(refuse("no such table; create it first".into())),
    }
    let mut stmt = conn.prepare(&format!("PRAGMA table_info({})", quote(name)))?;
    let cols: Vec<(String, String, bool, i64)> = stmt
        .query_map([], |r| {
            Ok((r.get(1)?, r.get(2)?, r.get::<_, i64>(3)? != 0, r.get(5)?))
        })?
        .collect::<rusqlite::Result<_>>()?;
    let mut pk: Vec<(i64, ColumnDef)> = Vec::new();
    let mut columns = Vec::new();
    for (cname, ctype, not_null, pk_pos) in cols {
        names::check(&cname).map_err(|e| refuse(format!("column {cname:?}: {e}")))?;
        let info = ColumnDef {
            name: cname,
            decl_type: ctype,
            not_null: not_null || pk_pos > 0,
        };
        if pk_pos > 0 {
            pk.push((pk_pos, info));
        } else {
            columns.push(info);
        }
    }
    if pk.is_empty() {
        return Err(refuse(
            "it has no explicit PRIMARY KEY; replicated rows need a key that is the same on every replica"
                .into(),
        ));
    }
    pk.sort_by_key(|(p, _)| *p);
    let pk: Vec<ColumnDef> = pk.into_iter().map(|(_, c)| c).collect();
    if pk.len() == 1
        && pk[0].decl_type.eq_ignore_ascii_case("INTEGER")
        && !has_pk_index(conn, name)?
    {
        return Err(refuse(format!(
            "its key {:?} is an INTEGER PRIMARY KEY, an alias of the rowid: two offline replicas would \
             mint the same key for different rows. Use a globally unique key instead (TEXT ids, UUIDs, \
             content hashes)",
            pk[0].name
        )));
    }
    if pk.len() > 1 {
        if let Some(c) = pk
            .iter()
            .find(|c| c.decl_type.to_ascii_uppercase().contains("BLOB"))
        {
            return Err(refuse(format!(
                "composite keys cannot include BLOB column {:?}",
                c.name
            )));
        }
    }
    conn.execute(
        "INSERT INTO quiver_tables(name, shard, strategy, kind, pk, columns, dim, metric, created_at)
         VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9)",
        rusqlite::params![
            name,
            shard,
            strategy.as_str(),
            kind.as_str(),
            serde_json::to_string(&pk).map_err(|e| StoreError::Corrupt(e.to_string()))?,
            serde_json::to_string(&columns).map_err(|e| StoreError::Corrupt(e.to_string()))?,
            dim.map(|d| d as i64),
            metric.map(Metric::as_str),
            wall_ms() as i64,
        ],
    )?;
    let info = load(conn, name)?.ok_or_else(|| StoreError::NoSuchTable(name.to_string()))?;
    triggers::install(conn, &info)?;
    triggers::backfill(conn, &info)?;
    Ok(info)
}

/// Whether the table's key is backed by an index (so it is not a rowid alias).
fn has_pk_index(conn: &Connection, name: &str) -> Result<bool> {
    let mut stmt = conn.prepare(&format!("PRAGMA index_list({})", quote(name)))?;
    let origins: Vec<String> = stmt
        .query_map([], |r| r.get(3))?
        .collect::<rusqlite::Result<_>>()?;
    Ok(origins.iter().any(|o| o == "pk"))
}

impl Store {
    /// Registers an existing table for replication in `shard`.
    pub fn add_table(&mut self, name: &str, shard: &str, strategy: Strategy) -> Result<TableInfo> {
        self.local_write(|tx| register(tx, name, shard, strategy, TableKind::Table, None, None))
    }

    /// Creates and registers a plain replicated table from column
    /// definitions (as a replica does when a peer brings a shard it lacks).
    /// The SQL is built here from checked names and types, never taken from
    /// the peer.
    pub fn create_table(
        &mut self,
        name: &str,
        shard: &str,
        strategy: Strategy,
        pk: &[ColumnDef],
        columns: &[ColumnDef],
    ) -> Result<TableInfo> {
        names::check(name)?;
        if pk.is_empty() {
            return Err(StoreError::TableRefused {
                table: name.to_string(),
                reason: "no primary key columns given".into(),
            });
        }
        let mut defs = Vec::new();
        for c in pk.iter().chain(columns) {
            names::check(&c.name)?;
            let t = &c.decl_type;
            if t.len() > 64
                || !t
                    .chars()
                    .all(|ch| ch.is_ascii_alphanumeric() || " _(),".contains(ch))
            {
                return Err(StoreError::TableRefused {
                    table: name.to_string(),
                    reason: format!("column {:?} has an unsupported type {t:?}", c.name),
                });
            }
            defs.push(format!(
                "{} {}{}",
                quote(&c.name),
                t,
                if c.not_null { " NOT NULL" } else { "" }
            ));
        }
        let keys = pk
            .iter()
            .map(|c| quote(&c.name))
            .collect::<Vec<_>>()
            .join(", ");
        let ddl = format!(
            "CREATE TABLE {}({}, PRIMARY KEY ({keys}))",
            quote(name),
            defs.join(", ")
        );
        self.local_write(|tx| {
            tx.execute_batch(&ddl)?;
            register(tx, name, shard, strategy, TableKind::Table, None, None)
        })
    }

    /// Every replicated table and collection.
    pub fn tables(&self) -> Result<Vec<TableInfo>> {
        load_all(&self.conn)
    }

    /// One replicated table or collection.
    pub fn table(&self, name: &str) -> Result<TableInfo> {
        load(&self.conn, name)?.ok_or_else(|| StoreError::NoSuchTable(name.to_string()))
    }

    /// The shards this store holds, sorted.
    pub fn shards(&self) -> Result<Vec<String>> {
        let mut s: Vec<String> = self.tables()?.into_iter().map(|t| t.shard).collect();
        s.sort();
        s.dedup();
        Ok(s)
    }

    /// The tables of one shard.
    pub fn shard_tables(&self, shard: &str) -> Result<Vec<TableInfo>> {
        Ok(self
            .tables()?
            .into_iter()
            .filter(|t| t.shard == shard)
            .collect())
    }
}

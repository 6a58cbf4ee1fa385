//! The registry of replicated tables and collections (`quiver_tables`).

use quiver_core::{ColumnKind, Metric, Reference, Strategy, Value};
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
    /// Columns dropped on this replica: what peers send for them is ignored.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub dropped: Vec<String>,
}

/// Per-column rules and references given when a table is registered.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct TableOptions {
    /// Column name and its own merge rule.
    pub policies: Vec<(String, Strategy)>,
    /// Column name and the row it points to.
    pub references: Vec<(String, Reference)>,
}

impl TableInfo {
    pub fn column(&self, name: &str) -> Option<&ColumnDef> {
        self.columns.iter().find(|c| c.name == name)
    }

    /// The definition peers receive.
    pub fn def(&self) -> quiver_core::wire::TableDef {
        quiver_core::wire::TableDef {
            name: self.name.clone(),
            kind: self.kind,
            strategy: self.strategy,
            pk: self.pk.clone(),
            columns: self.columns.clone(),
            dim: self.dim.map(|d| d as u32),
            metric: self.metric,
        }
    }

    /// The rule that merges `col`: its own, or the table's strategy.
    pub fn policy(&self, col: &ColumnDef) -> Strategy {
        col.policy().unwrap_or(self.strategy)
    }

    /// Columns with a rule of their own, as `column=rule`.
    pub fn policy_notes(&self) -> Vec<String> {
        self.columns
            .iter()
            .filter_map(|c| c.policy().map(|p| format!("{}={p}", c.name)))
            .collect()
    }

    /// Declared references, as `column->table.column (on-delete)`.
    pub fn reference_notes(&self) -> Vec<String> {
        self.references()
            .map(|(c, r)| {
                format!(
                    "{}->{}.{} ({})",
                    c.name,
                    r.table,
                    r.column,
                    r.on_delete.as_str()
                )
            })
            .collect()
    }

    /// Whether any column is a counter (its capture keeps per-site totals).
    pub fn has_counters(&self) -> bool {
        self.columns
            .iter()
            .any(|c| self.policy(c) == Strategy::Counter)
    }

    /// The declared references of this table's columns.
    pub fn references(&self) -> impl Iterator<Item = (&ColumnDef, &Reference)> {
        self.columns
            .iter()
            .filter_map(|c| c.references().map(|r| (c, r)))
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
    String,
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
        r.get(10)?,
    ))
}

const SELECT: &str = "SELECT id, name, shard, strategy, kind, pk, columns, dim, metric, schema_version, dropped FROM quiver_tables";

fn decode(
    (id, name, shard, strategy, kind, pk, columns, dim, metric, schema_version, dropped): RawTable,
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
        dropped: serde_json::from_str(&dropped).map_err(|_| corrupt("dropped"))?,
        name,
        shard,
    })
}

fn json<T: Serialize>(v: &T) -> Result<String> {
    serde_json::to_string(v).map_err(|e| StoreError::Corrupt(e.to_string()))
}

/// Writes a table's columns, strategy, dropped list and schema version back
/// to the catalog.
pub(crate) fn save(conn: &Connection, t: &TableInfo) -> Result<()> {
    conn.execute(
        "UPDATE quiver_tables SET columns = ?2, strategy = ?3, dropped = ?4, schema_version = ?5 WHERE id = ?1",
        rusqlite::params![
            t.id,
            json(&t.columns)?,
            t.strategy.as_str(),
            json(&t.dropped)?,
            t.schema_version
        ],
    )?;
    Ok(())
}

/// The next schema version of `shard`: one past every table's in it, so a
/// change to any table moves the shard's version.
pub(crate) fn next_schema_version(conn: &Connection, shard: &str) -> Result<i64> {
    Ok(conn.query_row(
        "SELECT coalesce(max(schema_version), 0) + 1 FROM quiver_tables WHERE shard = ?1",
        [shard],
        |r| r.get(0),
    )?)
}

/// Checks that a rule fits its column.
pub(crate) fn check_policy(table: &str, col: &ColumnDef, policy: Strategy) -> Result<()> {
    let t = col.decl_type.to_ascii_uppercase();
    let numeric = t.contains("INT")
        || t.contains("REAL")
        || t.contains("FLOA")
        || t.contains("DOUB")
        || t.contains("NUM");
    if policy == Strategy::Counter
        && col
            .default_sql()
            .is_some_and(|d| !matches!(d.trim(), "0" | "0.0" | "NULL" | "null"))
    {
        return Err(StoreError::TableRefused {
            table: table.to_string(),
            reason: format!(
                "column {:?} was added with the default {}: as a counter, each replica would count \
                 that default once; add it with DEFAULT 0 (or none)",
                col.name,
                col.default_sql().unwrap_or_default()
            ),
        });
    }
    if policy == Strategy::Counter && !numeric {
        return Err(StoreError::TableRefused {
            table: table.to_string(),
            reason: format!(
                "column {:?} is declared {:?}: a counter needs an INTEGER or REAL column",
                col.name, col.decl_type
            ),
        });
    }
    Ok(())
}

/// Applies the rules and references of `opts` to the columns of a table
/// being registered, checking each against the catalog.
fn apply_options(
    conn: &Connection,
    name: &str,
    shard: &str,
    columns: &mut [ColumnDef],
    pk: &[ColumnDef],
    opts: &TableOptions,
) -> Result<()> {
    let refuse = |reason: String| StoreError::TableRefused {
        table: name.to_string(),
        reason,
    };
    let find = |columns: &mut [ColumnDef], c: &str| -> Result<usize> {
        if pk.iter().any(|k| k.name == c) {
            return Err(refuse(format!(
                "column {c:?} is part of the primary key, which has no merge rule or reference of its own"
            )));
        }
        columns
            .iter()
            .position(|x| x.name == c)
            .ok_or_else(|| refuse(format!("it has no column {c:?}")))
    };
    for (c, policy) in &opts.policies {
        let i = find(columns, c)?;
        check_policy(name, &columns[i], *policy)?;
        columns[i].edit_ext(|e| e.policy = Some(*policy));
    }
    for (c, r) in &opts.references {
        let i = find(columns, c)?;
        let target = if r.table == name {
            None
        } else {
            load(conn, &r.table)?
        };
        let (target_shard, target_pk) = match (&target, r.table == name) {
            (_, true) => (shard.to_string(), pk.to_vec()),
            (Some(t), false) => (t.shard.clone(), t.pk.clone()),
            (None, false) => {
                return Err(refuse(format!(
                "column {c:?} references {:?}, which is not a replicated table; register it first",
                r.table
            )))
            }
        };
        if target_shard != shard {
            return Err(refuse(format!(
                "column {c:?} references {:?} in shard {target_shard:?}: a reference must stay within one shard, which syncs as a whole",
                r.table
            )));
        }
        if target_pk.len() != 1 || target_pk[0].name != r.column {
            return Err(refuse(format!(
                "column {c:?} references {}.{}, which is not that table's single-column primary key",
                r.table, r.column
            )));
        }
        columns[i].edit_ext(|e| e.references = Some(r.clone()));
    }
    Ok(())
}

/// The live columns of a table as SQLite declares them now:
/// (name, type, not null, primary-key position, default).
pub(crate) type LiveColumn = (String, String, bool, i64, Option<String>);

pub(crate) fn live_columns(conn: &Connection, name: &str) -> Result<Vec<LiveColumn>> {
    let mut stmt = conn.prepare(&format!("PRAGMA table_xinfo({})", quote(name)))?;
    let cols = stmt
        .query_map([], |r| {
            Ok((
                r.get(1)?,
                r.get(2)?,
                r.get::<_, i64>(3)? != 0,
                r.get(5)?,
                r.get(4)?,
                r.get::<_, i64>(6)?,
            ))
        })?
        .collect::<rusqlite::Result<Vec<(String, String, bool, i64, Option<String>, i64)>>>()?;
    // Hidden columns of virtual tables (1) are not stored; generated
    // columns (2, 3) are computed on each replica.
    Ok(cols
        .into_iter()
        .filter(|c| c.5 == 0)
        .map(|(n, t, nn, pk, d, _)| (n, t, nn, pk, d))
        .collect())
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
#[allow(clippy::too_many_arguments)]
pub(crate) fn register(
    conn: &Connection,
    name: &str,
    shard: &str,
    strategy: Strategy,
    kind: TableKind,
    dim: Option<usize>,
    metric: Option<Metric>,
    opts: &TableOptions,
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
    let foreign: i64 = conn.query_row(
        "SELECT count(*) FROM pragma_foreign_key_list(?1)",
        [name],
        |r| r.get(0),
    )?;
    if foreign > 0 {
        return Err(refuse(
            "it declares SQL FOREIGN KEY constraints, which a replica cannot check against rows \
             that have not arrived yet; declare them with `quiver table add T --references COL=TABLE.COL` \
             instead, which keeps them whole across merges"
                .into(),
        ));
    }
    let mut pk: Vec<(i64, ColumnDef)> = Vec::new();
    let mut columns = Vec::new();
    // Defaults of the columns a table starts with stay in its own DDL (a
    // replica creating it from a peer's definition gets none, as before);
    // only columns added later carry theirs, which their ALTER needs.
    for (cname, ctype, not_null, pk_pos, _default) in live_columns(conn, name)? {
        names::check(&cname).map_err(|e| refuse(format!("column {cname:?}: {e}")))?;
        let info = ColumnDef::plain(&cname, &ctype, not_null || pk_pos > 0);
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
    apply_options(conn, name, shard, &mut columns, &pk, opts)?;
    if strategy == Strategy::Counter {
        for c in &columns {
            check_policy(name, c, strategy)?;
        }
    }
    conn.execute(
        "INSERT INTO quiver_tables(name, shard, strategy, kind, pk, columns, dim, metric, created_at, schema_version)
         VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10)",
        rusqlite::params![
            name,
            shard,
            strategy.as_str(),
            kind.as_str(),
            json(&pk)?,
            json(&columns)?,
            dim.map(|d| d as i64),
            metric.map(Metric::as_str),
            wall_ms() as i64,
            next_schema_version(conn, shard)?,
        ],
    )?;
    let mut dropped = crate::evolve::dropped_tables(conn)?;
    if dropped.remove(name).is_some() {
        crate::evolve::set_dropped_tables(conn, &dropped)?;
    }
    let info = load(conn, name)?.ok_or_else(|| StoreError::NoSuchTable(name.to_string()))?;
    triggers::install(conn, &info)?;
    // Tables whose references point here get their cascade trigger now.
    for other in load_all(conn)? {
        if other.name != name && other.references().any(|(_, r)| r.table == name) {
            triggers::reinstall(conn, &other)?;
        }
    }
    triggers::backfill(conn, &info)?;
    Ok(info)
}

/// Registers a plain table (not a collection).
fn register_table(
    conn: &Connection,
    name: &str,
    shard: &str,
    strategy: Strategy,
    opts: &TableOptions,
) -> Result<TableInfo> {
    register(
        conn,
        name,
        shard,
        strategy,
        TableKind::Table,
        None,
        None,
        opts,
    )
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
        self.add_table_with(name, shard, strategy, &TableOptions::default())
    }

    /// Registers an existing table with per-column rules and references.
    pub fn add_table_with(
        &mut self,
        name: &str,
        shard: &str,
        strategy: Strategy,
        opts: &TableOptions,
    ) -> Result<TableInfo> {
        self.refresh_schema()?;
        self.local_write(|tx| register_table(tx, name, shard, strategy, opts))
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
        let defs = pk
            .iter()
            .chain(columns)
            .map(|c| crate::evolve::column_sql(name, c))
            .collect::<Result<Vec<_>>>()?;
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
            register_table(tx, name, shard, strategy, &TableOptions::default())
        })
    }

    /// Every replicated table and collection.
    pub fn tables(&self) -> Result<Vec<TableInfo>> {
        self.refresh_schema()?;
        load_all(&self.conn)
    }

    /// One replicated table or collection.
    pub fn table(&self, name: &str) -> Result<TableInfo> {
        self.refresh_schema()?;
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

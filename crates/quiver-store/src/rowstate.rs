//! A row's replication state, loaded from the clock, the siblings and the
//! user table, and written back after a merge.

use std::collections::{BTreeMap, HashMap};

use quiver_core::merge::Version;
use quiver_core::{Dot, Hlc, SiteId, Value, VersionVector};
use rusqlite::{params, Connection, OptionalExtension};

use crate::catalog::TableInfo;
use crate::names::quote;
use crate::sqlvalue::{from_ref, P};
use crate::{Result, StoreError};

/// Maps site ids to the small indexes the clock stores, for one operation.
#[derive(Default)]
pub(crate) struct Sites {
    by_ix: HashMap<i64, SiteId>,
    by_id: HashMap<SiteId, i64>,
}

impl Sites {
    pub fn id(&mut self, conn: &Connection, ix: i64) -> Result<SiteId> {
        if let Some(s) = self.by_ix.get(&ix) {
            return Ok(*s);
        }
        let bytes: Vec<u8> = conn
            .prepare_cached("SELECT site_id FROM quiver_sites WHERE ix = ?1")?
            .query_row([ix], |r| r.get(0))
            .optional()?
            .ok_or_else(|| StoreError::Corrupt(format!("unknown site index {ix}")))?;
        let id = SiteId::from_slice(&bytes)
            .ok_or_else(|| StoreError::Corrupt("site id is not 16 bytes".into()))?;
        self.by_ix.insert(ix, id);
        self.by_id.insert(id, ix);
        Ok(id)
    }

    /// The index of `site`, or `None` if this store has never heard of it.
    pub fn find(&mut self, conn: &Connection, site: &SiteId) -> Result<Option<i64>> {
        if let Some(ix) = self.by_id.get(site) {
            return Ok(Some(*ix));
        }
        let ix: Option<i64> = conn
            .prepare_cached("SELECT ix FROM quiver_sites WHERE site_id = ?1")?
            .query_row([site.as_bytes().as_slice()], |r| r.get(0))
            .optional()?;
        if let Some(ix) = ix {
            self.by_ix.insert(ix, *site);
            self.by_id.insert(*site, ix);
        }
        Ok(ix)
    }

    /// The index of `site`, registering it if new.
    pub fn ix(&mut self, conn: &Connection, site: &SiteId) -> Result<i64> {
        if let Some(ix) = self.find(conn, site)? {
            return Ok(ix);
        }
        conn.prepare_cached("INSERT INTO quiver_sites(site_id) VALUES (?1)")?
            .execute([site.as_bytes().as_slice()])?;
        let ix = conn.last_insert_rowid();
        self.by_ix.insert(ix, *site);
        self.by_id.insert(*site, ix);
        Ok(ix)
    }

    /// Parses a stored `{"ix": version}` JSON object.
    pub fn vv_from_json(&mut self, conn: &Connection, json: Option<&str>) -> Result<VersionVector> {
        let mut vv = VersionVector::new();
        let Some(json) = json else { return Ok(vv) };
        let map: BTreeMap<String, u64> = serde_json::from_str(json)
            .map_err(|e| StoreError::Corrupt(format!("bad version context {json:?}: {e}")))?;
        for (k, v) in map {
            let ix: i64 = k
                .parse()
                .map_err(|_| StoreError::Corrupt(format!("bad site index {k:?}")))?;
            vv.advance(self.id(conn, ix)?, v);
        }
        Ok(vv)
    }

    pub fn vv_to_json(&mut self, conn: &Connection, vv: &VersionVector) -> Result<Option<String>> {
        if vv.is_empty() {
            return Ok(None);
        }
        let mut map = BTreeMap::new();
        for (site, v) in vv.iter() {
            map.insert(self.ix(conn, site)?.to_string(), *v);
        }
        Ok(Some(
            serde_json::to_string(&map).map_err(|e| StoreError::Corrupt(e.to_string()))?,
        ))
    }
}

/// Everything the store holds about one row.
#[derive(Debug, Clone, Default)]
pub(crate) struct RowState {
    /// The row record: existence (by causal length) and its version.
    pub existence: Option<Version>,
    /// Every version of the row seen.
    pub know: VersionVector,
    /// Per column, the versions held (with their values) in the current life.
    pub cells: BTreeMap<String, Vec<Version>>,
}

impl RowState {
    pub fn alive(&self) -> bool {
        self.existence.as_ref().is_some_and(|e| e.cl % 2 == 1)
    }
}

fn where_pk(t: &TableInfo) -> String {
    t.pk.iter()
        .enumerate()
        .map(|(i, c)| format!("{} IS ?{}", quote(&c.name), i + 1))
        .collect::<Vec<_>>()
        .join(" AND ")
}

/// The user table's current values of a row, by column.
pub(crate) fn read_user_row(
    conn: &Connection,
    t: &TableInfo,
    pk: &[Value],
) -> Result<Option<BTreeMap<String, Value>>> {
    if t.columns.is_empty() {
        let sql = format!("SELECT 1 FROM {} WHERE {}", quote(&t.name), where_pk(t));
        let found = conn
            .prepare_cached(&sql)?
            .query_row(rusqlite::params_from_iter(pk.iter().map(P)), |_| Ok(()))
            .optional()?;
        return Ok(found.map(|_| BTreeMap::new()));
    }
    let cols = t
        .columns
        .iter()
        .map(|c| quote(&c.name))
        .collect::<Vec<_>>()
        .join(", ");
    let sql = format!(
        "SELECT {cols} FROM {} WHERE {}",
        quote(&t.name),
        where_pk(t)
    );
    let mut stmt = conn.prepare_cached(&sql)?;
    let row = stmt
        .query_row(rusqlite::params_from_iter(pk.iter().map(P)), |r| {
            let mut m = BTreeMap::new();
            for (i, c) in t.columns.iter().enumerate() {
                m.insert(c.name.clone(), from_ref(r.get_ref(i)?));
            }
            Ok(m)
        })
        .optional()?;
    Ok(row)
}

type SiblingRow = (String, i64, i64, i64, i64, Option<String>, Value);
type ClockRow = (String, i64, i64, i64, i64, Option<String>, Option<String>);

/// Loads the state of row `pk` (clock key `key`).
pub(crate) fn load(
    conn: &Connection,
    sites: &mut Sites,
    t: &TableInfo,
    key: &Value,
    pk: &[Value],
) -> Result<RowState> {
    let clock: Vec<ClockRow> = conn
        .prepare_cached(
            "SELECT col, site, dbv, hlc, cl, ctx, know FROM quiver_clock WHERE tbl = ?1 AND pk = ?2",
        )?
        .query_map(params![t.id, P(key)], |r| {
            Ok((r.get(0)?, r.get(1)?, r.get(2)?, r.get(3)?, r.get(4)?, r.get(5)?, r.get(6)?))
        })?
        .collect::<rusqlite::Result<_>>()?;
    let mut state = RowState::default();
    let mut explicit: BTreeMap<String, Version> = BTreeMap::new();
    for (col, site, dbv, hlc, cl, ctx, know) in clock {
        let version = Version {
            dot: Dot::new(sites.id(conn, site)?, dbv as u64),
            hlc: Hlc::from_i64(hlc),
            cl: cl as u64,
            replaces: sites.vv_from_json(conn, ctx.as_deref())?,
            value: Value::Null,
        };
        if col.is_empty() {
            state.know = match know {
                Some(k) => sites.vv_from_json(conn, Some(&k))?,
                None => [(version.dot.site, version.dot.db_version)]
                    .into_iter()
                    .collect(),
            };
            state.existence = Some(version);
        } else {
            explicit.insert(col, version);
        }
    }
    if !state.alive() {
        return Ok(state);
    }
    let existence = state
        .existence
        .clone()
        .unwrap_or_else(unreachable_existence);
    // Versions of an older life of the row (left by INSERT OR REPLACE) are dead.
    explicit.retain(|_, v| v.cl == existence.cl);
    let mut siblings: BTreeMap<String, Vec<Version>> = BTreeMap::new();
    let rows: Vec<SiblingRow> = conn
        .prepare_cached(
            "SELECT col, site, dbv, hlc, cl, ctx, value FROM quiver_siblings WHERE tbl = ?1 AND pk = ?2",
        )?
        .query_map(params![t.id, P(key)], |r| {
            Ok((r.get(0)?, r.get(1)?, r.get(2)?, r.get(3)?, r.get(4)?, r.get(5)?, from_ref(r.get_ref(6)?)))
        })?
        .collect::<rusqlite::Result<_>>()?;
    for (col, site, dbv, hlc, cl, ctx, value) in rows {
        if cl as u64 != existence.cl {
            continue;
        }
        siblings.entry(col).or_default().push(Version {
            dot: Dot::new(sites.id(conn, site)?, dbv as u64),
            hlc: Hlc::from_i64(hlc),
            cl: cl as u64,
            replaces: sites.vv_from_json(conn, ctx.as_deref())?,
            value,
        });
    }
    let values = read_user_row(conn, t, pk)?.unwrap_or_default();
    for c in &t.columns {
        let versions = if let Some(s) = siblings.remove(&c.name) {
            s
        } else {
            let mut v = explicit
                .remove(&c.name)
                .unwrap_or_else(|| existence.clone());
            v.value = values.get(&c.name).cloned().unwrap_or(Value::Null);
            vec![v]
        };
        state.cells.insert(c.name.clone(), versions);
    }
    Ok(state)
}

fn unreachable_existence() -> Version {
    // `alive()` implies an existence record; this default is never used.
    Version {
        dot: Dot::new(SiteId([0; 16]), 0),
        hlc: Hlc::ZERO,
        cl: 0,
        replaces: VersionVector::new(),
        value: Value::Null,
    }
}

/// Writes a row's state back: clock, siblings and, if `visible` is given,
/// the user table (which must have capture switched off by the caller).
/// `fresh`: the store held nothing of the row before.
#[allow(clippy::too_many_arguments)]
pub(crate) fn store(
    conn: &Connection,
    sites: &mut Sites,
    t: &TableInfo,
    key: &Value,
    pk: &[Value],
    state: &RowState,
    visible: Option<&BTreeMap<String, Value>>,
    fresh: bool,
) -> Result<()> {
    let Some(ex) = &state.existence else {
        return Ok(());
    };
    let know = sites.vv_to_json(conn, &state.know)?;
    let ctx = sites.vv_to_json(conn, &ex.replaces)?;
    conn.prepare_cached(
        "INSERT INTO quiver_clock(tbl, pk, col, site, dbv, hlc, cl, ctx, know)
         VALUES (?1, ?2, '', ?3, ?4, ?5, ?6, ?7, ?8)
         ON CONFLICT(tbl, pk, col) DO UPDATE SET site = excluded.site, dbv = excluded.dbv,
           hlc = excluded.hlc, cl = excluded.cl, ctx = excluded.ctx, know = excluded.know",
    )?
    .execute(params![
        t.id,
        P(key),
        sites.ix(conn, &ex.dot.site)?,
        ex.dot.db_version as i64,
        ex.hlc.as_i64(),
        ex.cl as i64,
        ctx,
        know
    ])?;
    // A row new to this store has no cell records or siblings to clear.
    if !fresh {
        conn.prepare_cached("DELETE FROM quiver_clock WHERE tbl = ?1 AND pk = ?2 AND col <> ''")?
            .execute(params![t.id, P(key)])?;
        conn.prepare_cached("DELETE FROM quiver_siblings WHERE tbl = ?1 AND pk = ?2")?
            .execute(params![t.id, P(key)])?;
    }
    for (col, versions) in &state.cells {
        let Some(primary) = versions.iter().max_by(|a, b| a.order(b)) else {
            continue;
        };
        let implicit = versions.len() == 1
            && primary.dot == ex.dot
            && primary.hlc == ex.hlc
            && primary.cl == ex.cl
            && primary.replaces == ex.replaces;
        if !implicit {
            let ctx = sites.vv_to_json(conn, &primary.replaces)?;
            conn.prepare_cached(
                "INSERT INTO quiver_clock(tbl, pk, col, site, dbv, hlc, cl, ctx)
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8)",
            )?
            .execute(params![
                t.id,
                P(key),
                col,
                sites.ix(conn, &primary.dot.site)?,
                primary.dot.db_version as i64,
                primary.hlc.as_i64(),
                primary.cl as i64,
                ctx
            ])?;
        }
        if versions.len() > 1 {
            for v in versions {
                let ctx = sites.vv_to_json(conn, &v.replaces)?;
                conn.prepare_cached(
                    "INSERT INTO quiver_siblings(tbl, pk, col, site, dbv, hlc, cl, ctx, value)
                     VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9)",
                )?
                .execute(params![
                    t.id,
                    P(key),
                    col,
                    sites.ix(conn, &v.dot.site)?,
                    v.dot.db_version as i64,
                    v.hlc.as_i64(),
                    v.cl as i64,
                    ctx,
                    P(&v.value)
                ])?;
            }
        }
    }
    if let Some(visible) = visible {
        write_user_row(conn, t, pk, state.alive(), visible)?;
    }
    Ok(())
}

/// Makes the user table show `visible` for the row (or no row when dead).
pub(crate) fn write_user_row(
    conn: &Connection,
    t: &TableInfo,
    pk: &[Value],
    alive: bool,
    visible: &BTreeMap<String, Value>,
) -> Result<()> {
    let table = quote(&t.name);
    if !alive {
        let sql = format!("DELETE FROM {table} WHERE {}", where_pk(t));
        conn.prepare_cached(&sql)?
            .execute(rusqlite::params_from_iter(pk.iter().map(P)))?;
        return Ok(());
    }
    let all: Vec<&str> =
        t.pk.iter()
            .chain(t.columns.iter())
            .map(|c| c.name.as_str())
            .collect();
    let cols = all.iter().map(|c| quote(c)).collect::<Vec<_>>().join(", ");
    let marks = (1..=all.len())
        .map(|i| format!("?{i}"))
        .collect::<Vec<_>>()
        .join(", ");
    let keys =
        t.pk.iter()
            .map(|c| quote(&c.name))
            .collect::<Vec<_>>()
            .join(", ");
    let action = if t.columns.is_empty() {
        "NOTHING".to_string()
    } else {
        format!(
            "UPDATE SET {}",
            t.columns
                .iter()
                .map(|c| format!("{q} = excluded.{q}", q = quote(&c.name)))
                .collect::<Vec<_>>()
                .join(", ")
        )
    };
    let sql =
        format!("INSERT INTO {table}({cols}) VALUES ({marks}) ON CONFLICT({keys}) DO {action}");
    let null = Value::Null;
    let values: Vec<P<'_>> = pk
        .iter()
        .map(P)
        .chain(
            t.columns
                .iter()
                .map(|c| P(visible.get(&c.name).unwrap_or(&null))),
        )
        .collect();
    conn.prepare_cached(&sql)?
        .execute(rusqlite::params_from_iter(values))?;
    Ok(())
}

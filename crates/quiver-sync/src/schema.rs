//! Table definitions exchanged at the start of a shard's stream, so a
//! replica lacking a table (or a whole shard) creates it before data flows.

use quiver_core::wire::TableDef;
use quiver_store::{CollectionSpec, Store, TableInfo, TableKind};

use crate::{Result, SyncError};

/// The wire definition of a table.
pub fn def_of(t: &TableInfo) -> TableDef {
    TableDef {
        name: t.name.clone(),
        kind: t.kind,
        strategy: t.strategy,
        pk: t.pk.clone(),
        columns: t.columns.clone(),
        dim: t.dim.map(|d| d as u32),
        metric: t.metric,
    }
}

/// The definitions of a shard's tables.
pub fn shard_defs(store: &Store, shard: &str) -> Result<Vec<TableDef>> {
    Ok(store.shard_tables(shard)?.iter().map(def_of).collect())
}

/// The shards a store holds with their schema versions, for the handshake.
pub fn shard_infos(store: &Store) -> Result<Vec<quiver_core::wire::ShardInfo>> {
    let mut out = Vec::new();
    for name in store.shards()? {
        let tables = store.shard_tables(&name)?;
        out.push(quiver_core::wire::ShardInfo {
            schema_version: schema_version(&tables),
            name,
        });
    }
    Ok(out)
}

/// The shard's schema version, as stated in the handshake.
pub fn schema_version(tables: &[TableInfo]) -> u64 {
    tables
        .iter()
        .map(|t| t.schema_version as u64)
        .max()
        .unwrap_or(0)
}

/// Creates the tables of `defs` that the store lacks; refuses a table that
/// exists with a different shape.
pub fn ensure_tables(store: &mut Store, shard: &str, defs: &[TableDef]) -> Result<Vec<String>> {
    let mut created = Vec::new();
    for d in defs {
        let mismatch = |why: String| {
            SyncError::Protocol(format!(
                "schema of table {:?} differs from the peer's: {why}",
                d.name
            ))
        };
        match store.table(&d.name) {
            Ok(t) => {
                let mine = def_of(&t);
                if t.shard != shard {
                    return Err(mismatch(format!("here it belongs to shard {:?}", t.shard)));
                }
                if mine.kind != d.kind
                    || mine.pk != d.pk
                    || mine.columns != d.columns
                    || mine.dim != d.dim
                {
                    return Err(mismatch(format!("here {mine:?}, there {d:?}")));
                }
                if mine.strategy != d.strategy {
                    return Err(mismatch(format!(
                        "strategy {} here, {} there",
                        mine.strategy, d.strategy
                    )));
                }
            }
            Err(quiver_store::StoreError::NoSuchTable(_)) => {
                let strategy = d.strategy;
                if d.kind == TableKind::Collection {
                    let dim = d
                        .dim
                        .ok_or_else(|| mismatch("collection without a dimension".into()))?
                        as usize;
                    store.create_collection(&CollectionSpec {
                        name: d.name.clone(),
                        dim,
                        metric: d.metric.unwrap_or_default(),
                        strategy,
                        shard: shard.to_string(),
                    })?;
                } else {
                    store.create_table(&d.name, shard, strategy, &d.pk, &d.columns)?;
                }
                created.push(d.name.clone());
            }
            Err(e) => return Err(e.into()),
        }
    }
    Ok(created)
}

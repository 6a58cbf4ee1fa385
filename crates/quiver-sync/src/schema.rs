//! Table definitions exchanged at the start of a shard's stream, so a
//! replica lacking a table (or a whole shard) creates it before data flows.

use quiver_core::wire::TableDef;
use quiver_store::{Store, TableInfo};

use crate::Result;

/// The wire definition of a table.
pub fn def_of(t: &TableInfo) -> TableDef {
    t.def()
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

/// Merges a peer's definitions of a shard's tables into the store:
/// creates the tables it lacks, adds the columns it lacks (before any
/// change that needs them flows), then applies changes held for want of
/// them. A column both sides define differently is a schema conflict
/// that fails this shard's exchange (see `Store::merge_table_def`).
pub fn ensure_tables(
    store: &mut Store,
    shard: &str,
    defs: &[TableDef],
    peer: Option<&str>,
) -> Result<Vec<String>> {
    let mut created = Vec::new();
    for d in defs {
        if store.merge_table_def(shard, d, peer)? {
            created.push(d.name.clone());
        }
    }
    // Held changes whose schema is known by now (from this peer, or from
    // a local change) go in before the exchange's own.
    if store.held_count(Some(shard))? > 0 {
        let r = store.replay_held(Some(shard))?;
        tracing::info!(
            shard,
            applied = r.applied,
            "applied changes held for the schema that arrived"
        );
    }
    Ok(created)
}

//! A summary of the store for `quiver status`.

use std::collections::BTreeMap;

use serde::Serialize;

use crate::catalog::TableKind;
use crate::{Result, Store, SyncState};

#[derive(Debug, Clone, Serialize)]
pub struct TableStatus {
    pub name: String,
    pub kind: TableKind,
    pub rows: u64,
    pub strategy: String,
    pub dim: Option<usize>,
    pub metric: Option<quiver_core::Metric>,
    /// Columns with a rule of their own, as `column=rule`.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub policies: Vec<String>,
    /// Declared references, as `column->table.column (on-delete)`.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub references: Vec<String>,
}

#[derive(Debug, Clone, Serialize)]
pub struct ShardStatus {
    pub name: String,
    /// Site id (hex) to db_version.
    pub version_vector: BTreeMap<String, u64>,
    pub tables: Vec<TableStatus>,
    /// The shard's schema version: moves with every schema change.
    pub schema_version: i64,
    /// Changes held until the schema that explains them arrives.
    pub held: u64,
    /// Columns a peer defines differently: the shard's sync is held.
    pub schema_conflicts: Vec<crate::SchemaConflict>,
    /// Rows whose declared reference points at no row (`keep`).
    pub dangling: Vec<crate::Dangling>,
    /// What each peer this store completed a sync with holds of the shard.
    pub acks: Vec<AckStatus>,
}

/// A peer's acknowledgement of a shard, as `status` shows it.
#[derive(Debug, Clone, Serialize)]
pub struct AckStatus {
    /// The peer's site id (hex) and node name.
    pub site: String,
    pub node: String,
    /// Site id (hex) to db_version: what the peer holds.
    pub version_vector: BTreeMap<String, u64>,
    /// How many of the versions this store holds the peer lacks.
    pub behind: u64,
    /// When the sync that showed it ended (ms since the epoch).
    pub at_ms: u64,
    /// Not heard from within the peer horizon (`peer_horizon_days`): it no
    /// longer holds compaction back, and gets a snapshot when it returns.
    pub beyond_horizon: bool,
}

#[derive(Debug, Clone, Serialize)]
pub struct StoreStatus {
    pub path: String,
    pub site_id: String,
    pub node_name: Option<String>,
    pub format: i64,
    pub db_version: u64,
    pub open_conflicts: usize,
    pub shards: Vec<ShardStatus>,
    pub sync: SyncState,
    /// The statistics of the daemon's shard coordinator (syncs and live
    /// rounds with its peers), as it last kept them in the store.
    pub coordinator: Option<serde_json::Value>,
}

impl Store {
    pub fn status(&self) -> Result<StoreStatus> {
        let mut shards = Vec::new();
        let all_acks = self.acks()?;
        let (_, horizon_ms) = self.horizon_ms(None)?;
        let now = crate::wall_ms();
        for shard in self.shards()? {
            let vv = self.version_vector(&shard)?;
            let acks = all_acks
                .iter()
                .filter(|a| a.shard == shard)
                .map(|a| AckStatus {
                    site: a.site.clone(),
                    node: a.node.clone(),
                    version_vector: a.vv.iter().map(|(s, v)| (s.to_hex(), *v)).collect(),
                    behind: vv.iter().map(|(s, v)| v.saturating_sub(a.vv.get(s))).sum(),
                    at_ms: a.at_ms,
                    beyond_horizon: now.saturating_sub(a.at_ms) > horizon_ms,
                })
                .collect();
            let mut tables = Vec::new();
            let shard_tables = self.shard_tables(&shard)?;
            let schema_version = shard_tables
                .iter()
                .map(|t| t.schema_version)
                .max()
                .unwrap_or(0);
            let dangling = self.dangling()?;
            for t in shard_tables {
                tables.push(TableStatus {
                    rows: self.count(&t.name)?,
                    policies: t.policy_notes(),
                    references: t.reference_notes(),
                    name: t.name,
                    kind: t.kind,
                    strategy: t.strategy.to_string(),
                    dim: t.dim,
                    metric: t.metric,
                });
            }
            shards.push(ShardStatus {
                version_vector: vv.iter().map(|(s, v)| (s.to_hex(), *v)).collect(),
                schema_version,
                held: self.held_count(Some(&shard))?,
                schema_conflicts: self
                    .schema_conflicts()?
                    .into_iter()
                    .filter(|c| c.shard == shard)
                    .collect(),
                dangling: dangling
                    .into_iter()
                    .filter(|d| tables.iter().any(|t| t.name == d.table))
                    .collect(),
                acks,
                tables,
                name: shard,
            });
        }
        let open: i64 = self.conn.query_row(
            "SELECT count(*) FROM quiver_conflicts WHERE resolved_at IS NULL",
            [],
            |r| r.get(0),
        )?;
        let dbv: i64 = self
            .conn
            .query_row("SELECT dbv FROM quiver_state", [], |r| r.get(0))?;
        Ok(StoreStatus {
            path: self.path.display().to_string(),
            site_id: self.site.to_hex(),
            node_name: self.node_name()?,
            format: crate::FORMAT_VERSION,
            db_version: (dbv - 1).max(0) as u64,
            open_conflicts: open as usize,
            shards,
            sync: self.sync_state()?,
            coordinator: self
                .meta("coordinator_stats")?
                .and_then(|s| serde_json::from_str(&s).ok()),
        })
    }
}

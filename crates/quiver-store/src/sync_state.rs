//! Sync bookkeeping kept across restarts: the sync-state record and the
//! per-peer, per-shard cursors.

use std::collections::BTreeMap;

use quiver_core::{SiteId, VersionVector};
use rusqlite::params;
use serde::{Deserialize, Serialize};

use crate::{wall_ms, Result, Store};

/// Totals of every sync this store took part in.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct SyncState {
    pub last_sync: Option<u64>,
    pub total_sent: u64,
    pub total_received: u64,
    pub sync_count: u64,
    pub last_error: Option<String>,
}

/// What this store last received from and sent to a peer for a shard.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PeerCursor {
    pub peer: String,
    pub shard: String,
    /// Our version vector of the shard after the last batch from the peer (JSON).
    pub received: Option<String>,
    /// The peer's version vector as it last stated it (JSON).
    pub sent: Option<String>,
    pub updated_at: u64,
}

impl Store {
    pub fn sync_state(&self) -> Result<SyncState> {
        Ok(self.conn.query_row(
            "SELECT last_sync, total_sent, total_received, sync_count, last_error FROM quiver_sync_state",
            [],
            |r| {
                Ok(SyncState {
                    last_sync: r.get::<_, Option<i64>>(0)?.map(|v| v as u64),
                    total_sent: r.get::<_, i64>(1)? as u64,
                    total_received: r.get::<_, i64>(2)? as u64,
                    sync_count: r.get::<_, i64>(3)? as u64,
                    last_error: r.get(4)?,
                })
            },
        )?)
    }

    /// Records the end of a sync: its counts, or the error that ended it.
    pub fn record_sync(&mut self, sent: u64, received: u64, error: Option<&str>) -> Result<()> {
        self.record_syncs(1, sent, received, error)
    }

    /// Records `count` exchanges at once (the shards of one sync).
    pub fn record_syncs(
        &mut self,
        count: u64,
        sent: u64,
        received: u64,
        error: Option<&str>,
    ) -> Result<()> {
        self.conn.execute(
            "UPDATE quiver_sync_state SET last_sync = ?1, total_sent = total_sent + ?2,
               total_received = total_received + ?3, sync_count = sync_count + ?5, last_error = ?4",
            params![
                wall_ms() as i64,
                sent as i64,
                received as i64,
                error,
                count as i64
            ],
        )?;
        Ok(())
    }

    /// Records the version vector a peer stated for a shard.
    pub fn set_peer_sent_cursor(&mut self, peer: &str, shard: &str, vv_json: &str) -> Result<()> {
        self.conn.execute(
            "INSERT INTO quiver_peer_cursors(peer, shard, sent, updated_at) VALUES (?1, ?2, ?3, ?4)
             ON CONFLICT(peer, shard) DO UPDATE SET sent = excluded.sent, updated_at = excluded.updated_at",
            params![peer, shard, vv_json, wall_ms() as i64],
        )?;
        Ok(())
    }

    pub fn peer_cursors(&self) -> Result<Vec<PeerCursor>> {
        let mut stmt = self.conn.prepare(
            "SELECT peer, shard, received, sent, updated_at FROM quiver_peer_cursors ORDER BY peer, shard",
        )?;
        let rows = stmt
            .query_map([], |r| {
                Ok(PeerCursor {
                    peer: r.get(0)?,
                    shard: r.get(1)?,
                    received: r.get(2)?,
                    sent: r.get(3)?,
                    updated_at: r.get::<_, i64>(4)? as u64,
                })
            })?
            .collect::<rusqlite::Result<_>>()?;
        Ok(rows)
    }
}

/// What a peer holds of a shard, as it stood at the end of the last
/// completed sync with it: what it stated at the start, plus every version
/// this store claimed to have sent it and it confirmed by its report.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PeerAck {
    /// The peer's site id, in hex.
    pub site: String,
    /// Its node name then.
    pub node: String,
    pub shard: String,
    pub vv: VersionVector,
    /// Per table, when the sync said (compaction works per table; `vv`,
    /// their meet, stands for a table not listed).
    #[serde(default)]
    pub tables: BTreeMap<String, VersionVector>,
    /// When (ms since the epoch).
    pub at_ms: u64,
}

impl PeerAck {
    /// What the peer holds of `table`: nothing of a table its per-table
    /// acknowledgement does not list (one added since), the meet for an
    /// acknowledgement made without tables.
    pub fn table_vv(&self, table: &str) -> &VersionVector {
        static NOTHING: std::sync::OnceLock<VersionVector> = std::sync::OnceLock::new();
        match self.tables.get(table) {
            Some(vv) => vv,
            None if self.tables.is_empty() => &self.vv,
            None => NOTHING.get_or_init(VersionVector::new),
        }
    }
}

fn vv_to_json(vv: &VersionVector) -> String {
    let m: serde_json::Map<String, serde_json::Value> = vv
        .iter()
        .map(|(s, v)| (s.to_hex(), serde_json::Value::from(*v)))
        .collect();
    serde_json::Value::Object(m).to_string()
}

fn vv_from_json(text: &str) -> Result<VersionVector> {
    let bad = || crate::StoreError::Corrupt(format!("bad acknowledgement {text:?}"));
    let m: BTreeMap<String, u64> = serde_json::from_str(text).map_err(|_| bad())?;
    let mut vv = VersionVector::new();
    for (s, v) in m {
        vv.set(s.parse::<SiteId>().map_err(|_| bad())?, v);
    }
    Ok(vv)
}

impl Store {
    /// Records what `site` (node `node`) holds of `shard` after a
    /// completed sync; it replaces the earlier record.
    pub fn record_ack(
        &mut self,
        site: &SiteId,
        node: &str,
        shard: &str,
        vv: &VersionVector,
    ) -> Result<()> {
        self.record_ack_tables(site, node, shard, vv, &BTreeMap::new())
    }

    /// Records what `site` holds of each table of `shard` (and their meet,
    /// `vv`) after a completed sync.
    pub fn record_ack_tables(
        &mut self,
        site: &SiteId,
        node: &str,
        shard: &str,
        vv: &VersionVector,
        tables: &BTreeMap<String, VersionVector>,
    ) -> Result<()> {
        let tables = (!tables.is_empty()).then(|| {
            serde_json::Value::Object(
                tables
                    .iter()
                    .map(|(t, vv)| (t.clone(), serde_json::Value::String(vv_to_json(vv))))
                    .collect(),
            )
            .to_string()
        });
        self.conn.execute(
            "INSERT INTO quiver_acks(site, shard, node, vv, at, tables) VALUES (?1, ?2, ?3, ?4, ?5, ?6)
             ON CONFLICT(site, shard) DO UPDATE SET node = excluded.node, vv = excluded.vv,
               at = excluded.at, tables = excluded.tables",
            params![site.to_hex(), shard, node, vv_to_json(vv), wall_ms() as i64, tables],
        )?;
        Ok(())
    }

    /// Every peer's acknowledgement, by shard then site.
    pub fn acks(&self) -> Result<Vec<PeerAck>> {
        type Row = (String, String, String, String, i64, Option<String>);
        let rows: Vec<Row> = self
            .conn
            .prepare(
                "SELECT site, node, shard, vv, at, tables FROM quiver_acks ORDER BY shard, site",
            )?
            .query_map([], |r| {
                Ok((
                    r.get(0)?,
                    r.get(1)?,
                    r.get(2)?,
                    r.get(3)?,
                    r.get(4)?,
                    r.get(5)?,
                ))
            })?
            .collect::<rusqlite::Result<_>>()?;
        rows.into_iter()
            .map(|(site, node, shard, vv, at, tables)| {
                let mut per_table = BTreeMap::new();
                if let Some(text) = tables {
                    let m: BTreeMap<String, String> =
                        serde_json::from_str(&text).map_err(|_| {
                            crate::StoreError::Corrupt(format!("bad acknowledgement {text:?}"))
                        })?;
                    for (t, vv) in m {
                        per_table.insert(t, vv_from_json(&vv)?);
                    }
                }
                Ok(PeerAck {
                    site,
                    node,
                    shard,
                    vv: vv_from_json(&vv)?,
                    tables: per_table,
                    at_ms: at as u64,
                })
            })
            .collect()
    }
}

/// A peer in the registry the shard coordinator works from.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PeerRecord {
    pub node: String,
    pub addr: String,
    pub shards: Vec<String>,
    pub token: Option<String>,
    /// SHA-256 fingerprint of the peer's certificate.
    pub pin: Option<String>,
    pub last_contact: Option<u64>,
    /// `online`, `offline` or `degraded`.
    pub status: String,
    pub last_error: Option<String>,
    /// Its last acknowledgement is older than the peer horizon
    /// (`peer_horizon_days`): it no longer holds compaction back, and gets
    /// a snapshot when it returns.
    #[serde(default)]
    pub beyond_horizon: bool,
}

impl PeerRecord {
    pub fn new(node: &str, addr: &str, shards: Vec<String>) -> Self {
        PeerRecord {
            node: node.to_string(),
            addr: addr.to_string(),
            shards,
            token: None,
            pin: None,
            last_contact: None,
            status: "offline".into(),
            last_error: None,
            beyond_horizon: false,
        }
    }
}

impl Store {
    /// Adds or replaces a peer in the registry.
    pub fn register_peer(&mut self, p: &PeerRecord) -> Result<()> {
        if p.node.is_empty() || p.node.len() > 128 {
            return Err(crate::StoreError::InvalidValue(
                "a peer's node name must be 1 to 128 characters".into(),
            ));
        }
        if !p.addr.contains(':') {
            return Err(crate::StoreError::InvalidValue(format!(
                "peer address {:?} must be HOST:PORT",
                p.addr
            )));
        }
        for s in &p.shards {
            crate::names::check_shard(s)?;
        }
        let shards = serde_json::to_string(&p.shards)
            .map_err(|e| crate::StoreError::Corrupt(e.to_string()))?;
        self.conn.execute(
            "INSERT INTO quiver_peers(node_id, addr, shards, token, pin, status) VALUES (?1, ?2, ?3, ?4, ?5, 'offline')
             ON CONFLICT(node_id) DO UPDATE SET addr = excluded.addr, shards = excluded.shards,
               token = excluded.token, pin = excluded.pin",
            params![p.node, p.addr, shards, p.token, p.pin],
        )?;
        Ok(())
    }

    /// Removes a peer; returns whether it was registered.
    pub fn unregister_peer(&mut self, node: &str) -> Result<bool> {
        Ok(self
            .conn
            .execute("DELETE FROM quiver_peers WHERE node_id = ?1", [node])?
            > 0)
    }

    /// Every registered peer, by node name.
    pub fn peers(&self) -> Result<Vec<PeerRecord>> {
        let mut stmt = self.conn.prepare(
            "SELECT node_id, addr, shards, token, pin, last_contact, status, last_error FROM quiver_peers ORDER BY node_id",
        )?;
        let rows = stmt
            .query_map([], |r| {
                let shards: String = r.get(2)?;
                Ok(PeerRecord {
                    node: r.get(0)?,
                    addr: r.get(1)?,
                    shards: serde_json::from_str(&shards).unwrap_or_default(),
                    token: r.get(3)?,
                    pin: r.get(4)?,
                    last_contact: r.get::<_, Option<i64>>(5)?.map(|v| v as u64),
                    status: r.get(6)?,
                    last_error: r.get(7)?,
                    beyond_horizon: false,
                })
            })?
            .collect::<rusqlite::Result<Vec<PeerRecord>>>()?;
        // By node name, the newest acknowledgement of any shard.
        let (_, horizon_ms) = self.horizon_ms(None)?;
        let mut newest: BTreeMap<String, u64> = BTreeMap::new();
        for a in self.acks()? {
            let at = newest.entry(a.node).or_default();
            *at = (*at).max(a.at_ms);
        }
        let now = wall_ms();
        let mut rows = rows;
        for p in &mut rows {
            p.beyond_horizon = newest
                .get(&p.node)
                .is_some_and(|at| now.saturating_sub(*at) > horizon_ms);
        }
        Ok(rows)
    }

    /// Records the outcome of contacting a peer.
    pub fn set_peer_status(&mut self, node: &str, status: &str, error: Option<&str>) -> Result<()> {
        let contact = (status != "offline").then(|| wall_ms() as i64);
        self.conn.execute(
            "UPDATE quiver_peers SET status = ?2, last_error = ?3, last_contact = coalesce(?4, last_contact) WHERE node_id = ?1",
            params![node, status, error, contact],
        )?;
        Ok(())
    }
}

/// An access token as stored: its hash and its scope, never the token.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TokenRecord {
    pub id: i64,
    /// SHA-256 of the token, hex.
    pub hash: String,
    /// Shards it may see (empty: all).
    pub shards: Vec<String>,
    pub read_only: bool,
    pub label: Option<String>,
    pub created_at: u64,
}

impl Store {
    /// Stores a token's hash and scope; returns its id.
    pub fn add_token(
        &mut self,
        hash: &str,
        shards: &[String],
        read_only: bool,
        label: Option<&str>,
    ) -> Result<i64> {
        if hash.len() != 64 || !hash.chars().all(|c| c.is_ascii_hexdigit()) {
            return Err(crate::StoreError::InvalidValue(
                "a token hash is 64 hex characters".into(),
            ));
        }
        for s in shards {
            crate::names::check_shard(s)?;
        }
        let shards =
            serde_json::to_string(shards).map_err(|e| crate::StoreError::Corrupt(e.to_string()))?;
        self.conn.execute(
            "INSERT INTO quiver_tokens(hash, shards, read_only, label, created_at) VALUES (?1, ?2, ?3, ?4, ?5)",
            params![hash, shards, read_only, label, wall_ms() as i64],
        )?;
        Ok(self.conn.last_insert_rowid())
    }

    pub fn tokens(&self) -> Result<Vec<TokenRecord>> {
        let mut stmt = self.conn.prepare(
            "SELECT id, hash, shards, read_only, label, created_at FROM quiver_tokens ORDER BY id",
        )?;
        let rows = stmt
            .query_map([], |r| {
                let shards: String = r.get(2)?;
                Ok(TokenRecord {
                    id: r.get(0)?,
                    hash: r.get(1)?,
                    shards: serde_json::from_str(&shards).unwrap_or_default(),
                    read_only: r.get(3)?,
                    label: r.get(4)?,
                    created_at: r.get::<_, i64>(5)? as u64,
                })
            })?
            .collect::<rusqlite::Result<_>>()?;
        Ok(rows)
    }

    /// Revokes a token; returns whether it existed.
    pub fn revoke_token(&mut self, id: i64) -> Result<bool> {
        Ok(self
            .conn
            .execute("DELETE FROM quiver_tokens WHERE id = ?1", [id])?
            > 0)
    }
}

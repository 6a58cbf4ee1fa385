//! Sync bookkeeping kept across restarts: the sync-state record and the
//! per-peer, per-shard cursors.

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
        self.conn.execute(
            "UPDATE quiver_sync_state SET last_sync = ?1, total_sent = total_sent + ?2,
               total_received = total_received + ?3, sync_count = sync_count + 1, last_error = ?4",
            params![wall_ms() as i64, sent as i64, received as i64, error],
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

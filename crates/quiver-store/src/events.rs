//! Events the store reports as remote changes and conflicts are applied,
//! for the event API of the networked engine.

use std::sync::mpsc;

use quiver_core::{Strategy, Value};
use rusqlite::Connection;
use serde::Serialize;

use crate::sqlvalue::{display_pk, pk_values};

/// The rows of one table that a commit wrote: how many, and the keys of
/// the first [`KEYS_LISTED`] of them.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct TableChanges {
    pub shard: String,
    pub table: String,
    pub rows: u64,
    pub keys: Vec<String>,
}

/// How many keys an event lists per table; `rows` counts them all.
pub const KEYS_LISTED: usize = 20;

/// Something that happened in the store.
#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(tag = "event", rename_all = "snake_case")]
pub enum StoreEvent {
    /// A local transaction committed through this store handle, writing
    /// these rows; `site` is this replica, their origin.
    LocalCommit {
        site: String,
        changes: Vec<TableChanges>,
    },
    /// Another connection (another process, any SQLite driver) committed:
    /// local writes (`local`, with the rows in `changes`, from this
    /// replica's `site`) and/or remote changes it applied (`remote`).
    ExternalChange {
        local: bool,
        remote: bool,
        site: String,
        changes: Vec<TableChanges>,
    },
    /// A remote change altered what a row shows.
    RemoteChange {
        table: String,
        shard: String,
        pk: String,
        deleted: bool,
    },
    /// A conflict was detected while applying.
    Conflict {
        id: i64,
        table: String,
        pk: String,
        column: String,
        strategy: Strategy,
        open: bool,
    },
}

impl StoreEvent {
    /// The event as a watcher of one shard sees it: rows of other shards
    /// left out, and `None` when nothing of the shard is left.
    pub fn in_shard(mut self, shard: &str) -> Option<StoreEvent> {
        let keep = match &mut self {
            StoreEvent::RemoteChange { shard: s, .. } => s == shard,
            StoreEvent::LocalCommit { changes, .. }
            | StoreEvent::ExternalChange { changes, .. } => {
                let had = !changes.is_empty();
                changes.retain(|c| c.shard == shard);
                !had || !changes.is_empty()
            }
            StoreEvent::Conflict { .. } => true,
        };
        keep.then_some(self)
    }
}

/// Fan-out to subscribers; a dropped receiver is forgotten.
#[derive(Default)]
pub(crate) struct EventHub {
    subscribers: Vec<mpsc::Sender<StoreEvent>>,
}

impl EventHub {
    pub fn emit(&mut self, e: StoreEvent) {
        self.subscribers.retain(|s| s.send(e.clone()).is_ok());
    }

    pub fn wanted(&self) -> bool {
        !self.subscribers.is_empty()
    }
}

impl crate::Store {
    /// Receives every event from now on.
    pub fn subscribe(&mut self) -> mpsc::Receiver<StoreEvent> {
        let (tx, rx) = mpsc::channel();
        self.events.subscribers.push(tx);
        rx
    }
}

/// The rows this replica's writes gave versions `from..to` (the open
/// versions of the commits in question), per table: sealed writes in the
/// clock and inserts still in the insert log.
pub(crate) fn written_rows(
    conn: &Connection,
    from: i64,
    to: i64,
) -> crate::Result<Vec<TableChanges>> {
    let mut out = Vec::new();
    if to <= from {
        return Ok(out);
    }
    for t in crate::catalog::load_all(conn)? {
        let keys =
            "SELECT pk FROM quiver_clock WHERE tbl = ?1 AND site = 0 AND dbv >= ?2 AND dbv < ?3
                    UNION SELECT pk FROM quiver_pending WHERE tbl = ?1 AND dbv >= ?2 AND dbv < ?3";
        let rows: i64 = conn
            .prepare_cached(&format!("SELECT count(*) FROM ({keys})"))?
            .query_row(rusqlite::params![t.id, from, to], |r| r.get(0))?;
        if rows == 0 {
            continue;
        }
        let listed: Vec<Value> = conn
            .prepare_cached(&format!("{keys} LIMIT {KEYS_LISTED}"))?
            .query_map(rusqlite::params![t.id, from, to], |r| {
                Ok(crate::sqlvalue::from_ref(r.get_ref(0)?))
            })?
            .collect::<rusqlite::Result<_>>()?;
        out.push(TableChanges {
            shard: t.shard.clone(),
            table: t.name.clone(),
            rows: rows as u64,
            keys: listed
                .iter()
                .map(|k| {
                    pk_values(k, t.pk.len())
                        .map(|pk| display_pk(&pk))
                        .unwrap_or_else(|| crate::sqlvalue::to_json(k).to_string())
                })
                .collect(),
        });
    }
    Ok(out)
}

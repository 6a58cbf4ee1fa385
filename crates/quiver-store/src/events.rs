//! Events the store reports as remote changes and conflicts are applied,
//! for the event API of the networked engine.

use std::sync::mpsc;

use quiver_core::{Strategy, Value};
use rusqlite::Connection;
use serde::Serialize;

use crate::sqlvalue::{display_pk, pk_values};

/// The rows of one table that a commit wrote: how many (a row both inserted
/// and then updated within the commits in question counts twice), and the
/// first [`KEYS_LISTED`] keys in order.
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
    /// A replicated table's schema changed (by any writer, or from a peer).
    SchemaChanged {
        shard: String,
        table: String,
        change: String,
        schema_version: i64,
    },
    /// A peer defines a column this replica has with another shape: the
    /// shard's sync is held until someone resolves it.
    SchemaConflict {
        shard: String,
        table: String,
        column: String,
        ours: String,
        theirs: String,
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
            StoreEvent::RemoteChange { shard: s, .. }
            | StoreEvent::SchemaChanged { shard: s, .. }
            | StoreEvent::SchemaConflict { shard: s, .. } => s == shard,
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
pub(crate) struct EventHub {
    subscribers: Vec<mpsc::Sender<StoreEvent>>,
    /// Whether anyone downstream of the subscribers listens (a relay, such
    /// as a store thread's broadcast, says when nobody does).
    listening: bool,
}

impl Default for EventHub {
    fn default() -> Self {
        EventHub {
            subscribers: Vec::new(),
            listening: true,
        }
    }
}

impl EventHub {
    pub fn emit(&mut self, e: StoreEvent) {
        self.subscribers.retain(|s| s.send(e.clone()).is_ok());
    }

    /// Like [`EventHub::emit`] through a shared reference; a dropped
    /// receiver is forgotten at the next `emit`.
    pub fn emit_shared(&self, e: StoreEvent) {
        for s in &self.subscribers {
            let _ = s.send(e.clone());
        }
    }

    /// Whether events that cost a query (the rows a commit wrote) are
    /// worth working out.
    pub fn wanted(&self) -> bool {
        self.listening && !self.subscribers.is_empty()
    }
}

impl crate::Store {
    /// Says whether anyone listens behind the subscribers, for a relay
    /// that passes events on: with nobody listening, commits skip working
    /// out which rows they wrote.
    pub fn set_listening(&mut self, listening: bool) {
        self.events.listening = listening;
    }

    /// Receives every event from now on.
    pub fn subscribe(&mut self) -> mpsc::Receiver<StoreEvent> {
        let (tx, rx) = mpsc::channel();
        self.events.subscribers.push(tx);
        rx
    }
}

/// The rows this replica's writes gave versions `from..to` (the open
/// versions of the commits in question), per table: sealed writes in the
/// clock (through its version index) and inserts still in the insert log
/// (read from its end, where the newest are, so the cost follows the rows
/// written, not the log's length).
pub(crate) fn written_rows(
    conn: &Connection,
    from: i64,
    to: i64,
) -> crate::Result<Vec<TableChanges>> {
    use std::collections::{BTreeMap, BTreeSet};
    if to <= from {
        return Ok(Vec::new());
    }
    let tables: BTreeMap<i64, crate::catalog::TableInfo> = crate::catalog::load_all(conn)?
        .into_iter()
        .map(|t| (t.id, t))
        .collect();
    let shown = |t: &crate::catalog::TableInfo, k: Value| {
        pk_values(&k, t.pk.len())
            .map(|pk| display_pk(&pk))
            .unwrap_or_else(|| crate::sqlvalue::to_json(&k).to_string())
    };
    // Per table: rows counted, and the first keys by order, at most
    // KEYS_LISTED of them kept whatever the size of the commit.
    let mut found: BTreeMap<i64, (u64, BTreeSet<String>)> = BTreeMap::new();
    let mut note = |tbl: i64, n: u64, key: Option<String>| {
        let e = found.entry(tbl).or_default();
        e.0 += n;
        if let Some(k) = key {
            e.1.insert(k);
            if e.1.len() > KEYS_LISTED {
                e.1.pop_last();
            }
        }
    };
    {
        let mut log =
            conn.prepare_cached("SELECT tbl, pk, dbv FROM quiver_pending ORDER BY seq DESC")?;
        let mut cursor = log.query([])?;
        while let Some(r) = cursor.next()? {
            let dbv: i64 = r.get(2)?;
            if dbv < from {
                break;
            }
            let tbl: i64 = r.get(0)?;
            if let (true, Some(t)) = (dbv < to, tables.get(&tbl)) {
                note(
                    tbl,
                    1,
                    Some(shown(t, crate::sqlvalue::from_ref(r.get_ref(1)?))),
                );
            }
        }
    }
    let mut count = conn.prepare_cached(
        "SELECT count(DISTINCT pk) FROM quiver_clock WHERE tbl = ?1 AND site = 0 AND dbv >= ?2 AND dbv < ?3",
    )?;
    let mut first = conn.prepare_cached(&format!(
        "SELECT DISTINCT pk FROM quiver_clock WHERE tbl = ?1 AND site = 0 AND dbv >= ?2 AND dbv < ?3 LIMIT {KEYS_LISTED}"
    ))?;
    for t in tables.values() {
        let n: i64 = count.query_row(rusqlite::params![t.id, from, to], |r| r.get(0))?;
        if n == 0 {
            continue;
        }
        note(t.id, n as u64, None);
        let mut cursor = first.query(rusqlite::params![t.id, from, to])?;
        while let Some(r) = cursor.next()? {
            note(
                t.id,
                0,
                Some(shown(t, crate::sqlvalue::from_ref(r.get_ref(0)?))),
            );
        }
    }
    Ok(found
        .into_iter()
        .filter_map(|(id, (rows, keys))| {
            let t = tables.get(&id)?;
            Some(TableChanges {
                shard: t.shard.clone(),
                table: t.name.clone(),
                rows,
                keys: keys.into_iter().collect(),
            })
        })
        .collect())
}

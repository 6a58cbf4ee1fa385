//! Events the store reports as remote changes and conflicts are applied,
//! for the event API of the networked engine.

use std::sync::mpsc;

use quiver_core::Strategy;
use serde::Serialize;

/// Something that happened in the store.
#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(tag = "event", rename_all = "snake_case")]
pub enum StoreEvent {
    /// A local transaction committed through this store handle.
    LocalCommit,
    /// Another connection (another process) committed: new local writes
    /// and/or remote changes it applied.
    ExternalChange { local: bool, remote: bool },
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

/// Fan-out to subscribers; a dropped receiver is forgotten.
#[derive(Default)]
pub(crate) struct EventHub {
    subscribers: Vec<mpsc::Sender<StoreEvent>>,
}

impl EventHub {
    pub fn emit(&mut self, e: StoreEvent) {
        self.subscribers.retain(|s| s.send(e.clone()).is_ok());
    }

    pub fn emit_local_commit(&mut self) {
        if !self.subscribers.is_empty() {
            self.emit(StoreEvent::LocalCommit);
        }
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

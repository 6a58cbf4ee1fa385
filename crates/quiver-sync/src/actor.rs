//! One thread owns the store's write connection; async code reaches it
//! through a handle and never blocks the runtime on SQLite. The handle also
//! publishes the store's change counter, which live sync watches: it moves
//! on local writes, on remote changes that took effect, and on writes by
//! other processes (noticed by polling `PRAGMA data_version`).

use std::path::PathBuf;
use std::sync::{Arc, Weak};
use std::time::Duration;

use quiver_core::wire::TableDef;
use quiver_core::{ChangeBatch, SiteId, SnapshotMark, Value, VersionVector};
use quiver_store::{
    ApplyReport, CollectionSpec, FileWatcher, PeerRecord, Record, RecordColumns, SqlRows, Store,
    StoreEvent, TableInfo,
};
use tokio::sync::{broadcast, mpsc, oneshot, watch};

use crate::{Result, SyncError};

type Job = Box<dyn FnOnce(&mut Store) + Send>;
type Reply<T> = oneshot::Sender<Result<T>>;

/// How often the file is checked for commits by other processes.
pub const WATCH_INTERVAL: Duration = Duration::from_millis(5);

/// How many requests may wait for the store thread; a sender waits beyond.
pub const REQUEST_QUEUE: usize = 256;

/// What the store thread is asked to do. Every write the sync layer, the
/// daemon, the coordinator and the file watch make is a request of its own
/// kind, as are the application writes the handle names (put, put_many,
/// put_columns, delete, SQL, creating a collection, the memory preset,
/// resolving a conflict); `Run` carries the
/// rest: reads, and an embedding program's own work.
pub enum Request {
    /// Seal what other connections wrote and fold the insert log, so that
    /// a read-only connection can then read changes.
    PrepareRead {
        reply: Reply<()>,
    },
    /// Another connection committed: seal its writes.
    NoticeExternal,
    /// Seal the open version (before a copy is taken).
    Seal {
        reply: Reply<bool>,
    },
    /// A batch of a peer's changes.
    Apply {
        batch: ChangeBatch,
        peer: String,
        reply: Reply<ApplyReport>,
    },
    /// A shard's table versions and definitions.
    ShardState {
        shard: String,
        reply: Reply<ShardState>,
    },
    /// Create or extend the tables a peer defines in a shard; gives the
    /// tables created.
    EnsureTables {
        shard: String,
        defs: Vec<TableDef>,
        peer: String,
        reply: Reply<Vec<String>>,
    },
    /// The server's admission of a shard: the client's definitions taken
    /// in, then the shard's definitions and versions.
    Admit {
        shard: String,
        schema: Vec<TableDef>,
        peer: String,
        reply: Reply<ShardState>,
    },
    /// Count exchanges (and an error) in the sync state.
    RecordSyncs {
        count: u64,
        sent: u64,
        received: u64,
        error: Option<String>,
        reply: Reply<()>,
    },
    RegisterPeer {
        peer: PeerRecord,
        reply: Reply<()>,
    },
    UnregisterPeer {
        node: String,
        reply: Reply<bool>,
    },
    SetPeerStatus {
        node: String,
        status: String,
        error: Option<String>,
        reply: Reply<()>,
    },
    SetMeta {
        key: String,
        value: String,
        reply: Reply<()>,
    },
    CreateCollection {
        spec: CollectionSpec,
        reply: Reply<TableInfo>,
    },
    Put {
        collection: String,
        record: Record,
        reply: Reply<()>,
    },
    PutMany {
        collection: String,
        records: Vec<Record>,
        reply: Reply<usize>,
    },
    PutColumns {
        collection: String,
        rows: RecordColumns,
        reply: Reply<usize>,
    },
    Delete {
        collection: String,
        id: String,
        reply: Reply<bool>,
    },
    Sql {
        sql: String,
        params: Vec<Value>,
        reply: Reply<Vec<Option<SqlRows>>>,
    },
    /// Creates the agent-memory preset unless it is there.
    InitMemory {
        reply: Reply<()>,
    },
    /// Resolves a conflict: keep a recorded version (`Ok`), or write a
    /// new value given as JSON (`Err`).
    Resolve {
        id: i64,
        choice: std::result::Result<String, serde_json::Value>,
        reply: Reply<()>,
    },
    /// Anything else, run as given.
    Run(Job),
}

impl Request {
    /// Does what was asked and answers.
    fn serve(self, s: &mut Store) {
        fn answer<T>(reply: Reply<T>, r: Result<T>) {
            let _ = reply.send(r);
        }
        fn store<T>(r: quiver_store::Result<T>) -> Result<T> {
            r.map_err(SyncError::from)
        }
        match self {
            Request::PrepareRead { reply } => answer(
                reply,
                store(
                    s.notice_external_changes()
                        .and_then(|_| s.fold_pending().map(drop)),
                ),
            ),
            Request::NoticeExternal => {
                if let Err(e) = s.notice_external_changes() {
                    tracing::warn!("sealing external writes: {e}");
                }
            }
            Request::Seal { reply } => answer(reply, store(s.close_open_version())),
            Request::Apply { batch, peer, reply } => {
                answer(reply, store(s.apply_from(&batch, Some(&peer))))
            }
            Request::ShardState { shard, reply } => answer(reply, shard_state(s, &shard)),
            Request::EnsureTables {
                shard,
                defs,
                peer,
                reply,
            } => answer(
                reply,
                crate::schema::ensure_tables(s, &shard, &defs, Some(&peer)),
            ),
            Request::Admit {
                shard,
                schema,
                peer,
                reply,
            } => {
                let admitted = (|| {
                    if !schema.is_empty() {
                        crate::schema::ensure_tables(s, &shard, &schema, Some(&peer))?;
                    }
                    shard_state(s, &shard)
                })();
                answer(reply, admitted)
            }
            Request::RecordSyncs {
                count,
                sent,
                received,
                error,
                reply,
            } => answer(
                reply,
                store(s.record_syncs(count, sent, received, error.as_deref())),
            ),
            Request::RegisterPeer { peer, reply } => answer(reply, store(s.register_peer(&peer))),
            Request::UnregisterPeer { node, reply } => {
                answer(reply, store(s.unregister_peer(&node)))
            }
            Request::SetPeerStatus {
                node,
                status,
                error,
                reply,
            } => answer(
                reply,
                store(s.set_peer_status(&node, &status, error.as_deref())),
            ),
            Request::SetMeta { key, value, reply } => {
                answer(reply, store(s.set_meta(&key, &value)))
            }
            Request::CreateCollection { spec, reply } => {
                answer(reply, store(s.create_collection(&spec)))
            }
            Request::Put {
                collection,
                record,
                reply,
            } => answer(reply, store(s.put(&collection, &record))),
            Request::PutMany {
                collection,
                records,
                reply,
            } => answer(reply, store(s.put_many(&collection, &records))),
            Request::PutColumns {
                collection,
                rows,
                reply,
            } => answer(reply, store(s.put_columns(&collection, &rows))),
            Request::Delete {
                collection,
                id,
                reply,
            } => answer(reply, store(s.delete(&collection, &id))),
            Request::Sql { sql, params, reply } => {
                answer(reply, store(s.run_sql_with(&sql, &params)))
            }
            Request::InitMemory { reply } => answer(
                reply,
                store(match s.table("episodes") {
                    Ok(_) => Ok(()),
                    Err(_) => s.init_memory().map(drop),
                }),
            ),
            Request::Resolve { id, choice, reply } => {
                let resolution = match choice {
                    Ok(keep) => Ok(quiver_store::Resolution::Keep(keep)),
                    Err(v) => s
                        .conflict_value(id, &v)
                        .map(quiver_store::Resolution::Value),
                };
                answer(reply, store(resolution.and_then(|r| s.resolve(id, r))))
            }
            Request::Run(job) => job(s),
        }
    }
}

/// A shard's table versions and definitions.
pub struct ShardState {
    pub versions: Vec<(String, VersionVector)>,
    pub defs: Vec<TableDef>,
    /// Snapshots of the shard's tables received here in part.
    pub resume: Vec<SnapshotMark>,
}

fn shard_state(s: &Store, shard: &str) -> Result<ShardState> {
    Ok(ShardState {
        versions: s.table_versions(shard)?.into_iter().collect(),
        defs: crate::schema::shard_defs(s, shard)?,
        resume: s.snapshot_progress(shard)?,
    })
}

/// A cloneable handle to the store thread.
#[derive(Clone)]
pub struct StoreHandle {
    tx: mpsc::Sender<Request>,
    path: PathBuf,
    site: SiteId,
    changes: watch::Receiver<u64>,
    events: broadcast::Sender<StoreEvent>,
    readers: Arc<crate::readers::ReaderPool>,
    _alive: Arc<()>,
}

impl StoreHandle {
    /// Moves the store onto its own thread and starts watching the file.
    pub fn spawn(store: Store) -> StoreHandle {
        Self::spawn_with(store, true)
    }

    /// Like [`StoreHandle::spawn`] without watching the file for other
    /// writers: for a process holding many stores that only it writes.
    pub fn spawn_unwatched(store: Store) -> StoreHandle {
        Self::spawn_with(store, false)
    }

    fn spawn_with(mut store: Store, watch_file: bool) -> StoreHandle {
        let (tx, mut rx) = mpsc::channel::<Request>(REQUEST_QUEUE);
        let store_events = store.subscribe();
        let (events, _) = broadcast::channel(1024);
        let events_tx = events.clone();
        let path = store.path().to_path_buf();
        let site = store.site_id();
        let (changes_tx, changes) = watch::channel(store.change_counter());
        let spawned = std::thread::Builder::new()
            .name("quiver-store".into())
            .spawn(move || {
                let mut store = store;
                let mut last = store.change_counter();
                while let Some(request) = rx.blocking_recv() {
                    store.set_listening(events_tx.receiver_count() > 0);
                    request.serve(&mut store);
                    for e in store_events.try_iter() {
                        let _ = events_tx.send(e);
                    }
                    let now = store.change_counter();
                    if now != last {
                        last = now;
                        changes_tx.send_replace(now);
                    }
                }
            });
        if let Err(e) = spawned {
            tracing::error!("cannot start the store thread: {e}");
        }
        let alive = Arc::new(());
        if watch_file {
            start_file_watch(path.clone(), tx.clone(), Arc::downgrade(&alive));
        }
        StoreHandle {
            tx,
            readers: crate::readers::ReaderPool::new(path.clone()),
            path,
            site,
            changes,
            events,
            _alive: alive,
        }
    }

    /// Sends a request and waits for its answer.
    pub async fn request<T>(&self, make: impl FnOnce(Reply<T>) -> Request) -> Result<T> {
        let (tx, rx) = oneshot::channel();
        self.tx
            .send(make(tx))
            .await
            .map_err(|_| SyncError::StoreGone)?;
        rx.await.map_err(|_| SyncError::StoreGone)?
    }

    /// Runs `f` on the store thread and waits for its result.
    pub async fn call<R: Send + 'static>(
        &self,
        f: impl FnOnce(&mut Store) -> R + Send + 'static,
    ) -> Result<R> {
        self.request(|reply| {
            Request::Run(Box::new(move |s: &mut Store| {
                let _ = reply.send(Ok(f(s)));
            }))
        })
        .await
    }

    /// Applies a peer's batch.
    pub async fn apply(&self, batch: ChangeBatch, peer: &str) -> Result<ApplyReport> {
        let peer = peer.to_string();
        self.request(|reply| Request::Apply { batch, peer, reply })
            .await
    }

    /// Creates a collection.
    pub async fn create_collection(&self, spec: CollectionSpec) -> Result<TableInfo> {
        self.request(|reply| Request::CreateCollection { spec, reply })
            .await
    }

    /// Writes a record.
    pub async fn put(&self, collection: &str, record: Record) -> Result<()> {
        let collection = collection.to_string();
        self.request(|reply| Request::Put {
            collection,
            record,
            reply,
        })
        .await
    }

    /// Writes records in one transaction.
    pub async fn put_many(&self, collection: &str, records: Vec<Record>) -> Result<usize> {
        let collection = collection.to_string();
        self.request(|reply| Request::PutMany {
            collection,
            records,
            reply,
        })
        .await
    }

    /// Writes rows held in columns in one transaction.
    pub async fn put_columns(&self, collection: &str, rows: RecordColumns) -> Result<usize> {
        let collection = collection.to_string();
        self.request(|reply| Request::PutColumns {
            collection,
            rows,
            reply,
        })
        .await
    }

    /// Deletes a record; gives whether it existed.
    pub async fn delete(&self, collection: &str, id: &str) -> Result<bool> {
        let (collection, id) = (collection.to_string(), id.to_string());
        self.request(|reply| Request::Delete {
            collection,
            id,
            reply,
        })
        .await
    }

    /// Runs SQL with parameters (see [`Store::run_sql_with`]).
    pub async fn sql(&self, sql: &str, params: Vec<Value>) -> Result<Vec<Option<SqlRows>>> {
        let sql = sql.to_string();
        self.request(|reply| Request::Sql { sql, params, reply })
            .await
    }

    /// Counts exchanges (and an error) in the store's sync state.
    pub async fn record_syncs(
        &self,
        count: u64,
        sent: u64,
        received: u64,
        error: Option<String>,
    ) -> Result<()> {
        self.request(|reply| Request::RecordSyncs {
            count,
            sent,
            received,
            error,
            reply,
        })
        .await
    }

    /// Requests waiting for the store thread (at most [`REQUEST_QUEUE`]).
    pub fn queued(&self) -> usize {
        REQUEST_QUEUE - self.tx.capacity()
    }

    /// Store events (local commits, remote changes, conflicts) as they happen.
    pub fn events(&self) -> broadcast::Receiver<StoreEvent> {
        self.events.subscribe()
    }

    /// The store's change counter; `changed()` wakes on every move.
    pub fn subscribe_changes(&self) -> watch::Receiver<u64> {
        self.changes.clone()
    }

    /// The store file.
    pub fn path(&self) -> &std::path::Path {
        &self.path
    }

    /// The store's read-only connections (streaming changes out runs on
    /// one, so it never waits for applies).
    pub(crate) fn readers(&self) -> &Arc<crate::readers::ReaderPool> {
        &self.readers
    }

    pub fn site_id(&self) -> SiteId {
        self.site
    }
}

/// Polls `PRAGMA data_version`; when another connection committed, asks the
/// store thread to seal captured changes (which moves the counter only if
/// there were local changes, not for our own applies).
fn start_file_watch(path: PathBuf, tx: mpsc::Sender<Request>, alive: Weak<()>) {
    let spawned = std::thread::Builder::new()
        .name("quiver-watch".into())
        .spawn(move || {
            let watcher = match FileWatcher::open(&path) {
                Ok(w) => w,
                Err(e) => {
                    tracing::warn!("not watching {} for other writers: {e}", path.display());
                    return;
                }
            };
            let mut last = watcher.data_version().unwrap_or(0);
            while alive.strong_count() > 0 {
                std::thread::sleep(WATCH_INTERVAL);
                let Ok(v) = watcher.data_version() else {
                    continue;
                };
                if v != last {
                    last = v;
                    if tx.blocking_send(Request::NoticeExternal).is_err() {
                        return;
                    }
                }
            }
        });
    if let Err(e) = spawned {
        tracing::warn!("cannot start the file watcher: {e}");
    }
}

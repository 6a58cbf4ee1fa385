//! One thread owns the store's write connection; async code reaches it
//! through a handle and never blocks the runtime on SQLite. The handle also
//! publishes the store's change counter, which live sync watches: it moves
//! on local writes, on remote changes that took effect, and on writes by
//! other processes (noticed by polling `PRAGMA data_version`).

use std::path::PathBuf;
use std::sync::{mpsc, Arc, Weak};
use std::time::Duration;

use quiver_core::SiteId;
use quiver_store::{FileWatcher, Store, StoreEvent};
use tokio::sync::{broadcast, oneshot, watch};

use crate::{Result, SyncError};

type Job = Box<dyn FnOnce(&mut Store) + Send>;

/// How often the file is checked for commits by other processes.
pub const WATCH_INTERVAL: Duration = Duration::from_millis(5);

/// A cloneable handle to the store thread.
#[derive(Clone)]
pub struct StoreHandle {
    tx: mpsc::Sender<Job>,
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
        let (tx, rx) = mpsc::channel::<Job>();
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
                while let Ok(job) = rx.recv() {
                    store.set_listening(events_tx.receiver_count() > 0);
                    job(&mut store);
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

    /// Runs `f` on the store thread and waits for its result.
    pub async fn call<R: Send + 'static>(
        &self,
        f: impl FnOnce(&mut Store) -> R + Send + 'static,
    ) -> Result<R> {
        let (tx, rx) = oneshot::channel();
        self.tx
            .send(Box::new(move |s: &mut Store| {
                let _ = tx.send(f(s));
            }))
            .map_err(|_| SyncError::StoreGone)?;
        rx.await.map_err(|_| SyncError::StoreGone)
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
fn start_file_watch(path: PathBuf, tx: mpsc::Sender<Job>, alive: Weak<()>) {
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
                    let job: Job = Box::new(|s: &mut Store| {
                        if let Err(e) = s.notice_external_changes() {
                            tracing::warn!("sealing external writes: {e}");
                        }
                    });
                    if tx.send(job).is_err() {
                        return;
                    }
                }
            }
        });
    if let Err(e) = spawned {
        tracing::warn!("cannot start the file watcher: {e}");
    }
}

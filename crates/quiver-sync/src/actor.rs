//! One thread owns the store's write connection; async code reaches it
//! through a handle and never blocks the runtime on SQLite.

use std::path::PathBuf;
use std::sync::mpsc;

use quiver_core::SiteId;
use quiver_store::Store;
use tokio::sync::oneshot;

use crate::{Result, SyncError};

type Job = Box<dyn FnOnce(&mut Store) + Send>;

/// A cloneable handle to the store thread.
#[derive(Clone)]
pub struct StoreHandle {
    tx: mpsc::Sender<Job>,
    path: PathBuf,
    site: SiteId,
}

impl StoreHandle {
    /// Moves the store onto its own thread.
    pub fn spawn(store: Store) -> StoreHandle {
        let (tx, rx) = mpsc::channel::<Job>();
        let path = store.path().to_path_buf();
        let site = store.site_id();
        std::thread::Builder::new()
            .name("quiver-store".into())
            .spawn(move || {
                let mut store = store;
                while let Ok(job) = rx.recv() {
                    job(&mut store);
                }
            })
            .map(|_| ())
            .unwrap_or_else(|e| tracing::error!("cannot start the store thread: {e}"));
        StoreHandle { tx, path, site }
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

    /// The store file, for read-only connections of its own (streaming
    /// changes out runs on one, so it never waits for applies).
    pub fn path(&self) -> &std::path::Path {
        &self.path
    }

    pub fn site_id(&self) -> SiteId {
        self.site
    }
}

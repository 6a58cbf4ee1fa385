//! Read-only connections to the store file, for work that only reads:
//! streaming changes out and answering handshakes, so that neither queues
//! behind the store thread's applies once it has started. They are opened read-only, so they
//! cannot write, not even fold the insert log (the store thread does that
//! before a stream starts). A few idle ones are kept for the next reader.

use std::ops::Deref;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};

use quiver_store::Store;

use crate::{Result, SyncError};

/// Idle connections kept for reuse.
const KEEP: usize = 4;

/// The pool of one store file.
pub(crate) struct ReaderPool {
    path: PathBuf,
    idle: Mutex<Vec<Store>>,
}

impl ReaderPool {
    pub(crate) fn new(path: PathBuf) -> Arc<ReaderPool> {
        Arc::new(ReaderPool {
            path,
            idle: Mutex::default(),
        })
    }

    /// A read-only connection: an idle one, or a new one (blocking; call it
    /// off the async runtime's threads).
    pub(crate) fn take(self: &Arc<Self>) -> Result<Reader> {
        let idle = self.idle.lock().unwrap_or_else(|e| e.into_inner()).pop();
        let store = match idle {
            Some(s) => s,
            None => Store::open_read_only(&self.path)?,
        };
        Ok(Reader {
            store: Some(store),
            pool: self.clone(),
        })
    }

    /// Runs `f` on a read-only connection, on a blocking thread.
    pub(crate) async fn read<R: Send + 'static>(
        self: &Arc<Self>,
        f: impl FnOnce(&Store) -> quiver_store::Result<R> + Send + 'static,
    ) -> Result<R> {
        let pool = self.clone();
        tokio::task::spawn_blocking(move || -> Result<R> {
            let reader = pool.take()?;
            Ok(f(&reader)?)
        })
        .await
        .map_err(|e| SyncError::Protocol(format!("a read on the store failed: {e}")))?
    }
}

/// A read-only connection on loan from the pool; it goes back when dropped.
pub(crate) struct Reader {
    store: Option<Store>,
    pool: Arc<ReaderPool>,
}

impl Deref for Reader {
    type Target = Store;

    fn deref(&self) -> &Store {
        self.store
            .as_ref()
            .expect("a reader holds its store until dropped")
    }
}

impl Drop for Reader {
    fn drop(&mut self) {
        if let Some(s) = self.store.take() {
            // A read left open (a panic, a failed commit) would pin an old
            // snapshot for the next reader: end it, or drop the connection.
            if !s.connection().is_autocommit() {
                let _ = s.connection().execute_batch("ROLLBACK");
                if !s.connection().is_autocommit() {
                    return;
                }
            }
            let mut idle = self.pool.idle.lock().unwrap_or_else(|e| e.into_inner());
            if idle.len() < KEEP {
                idle.push(s);
            }
        }
    }
}

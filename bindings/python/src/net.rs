//! The network: one-shot sync, live links, a server, and the store's events.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use pyo3::exceptions::{PyAttributeError, PyStopIteration};
use pyo3::prelude::*;
use pyo3::types::PyDict;
use quiver_sync::{CancellationToken, ClientOptions, Identity, Trust};
use tokio::sync::broadcast::error::RecvError;
use tokio::task::JoinHandle;

use crate::convert::{bad, internal, json_to_py, sync_err};
use crate::db::Database;
use crate::{runtime, wait};

/// A task on the package's runtime (a live link, a server) and the token
/// that stops it. Shared by its Python object, its store (which stops it at
/// `close()`) and the process (which stops it at interpreter exit).
#[derive(Clone)]
pub(crate) struct Background(Arc<Task>);

struct Task {
    stop: CancellationToken,
    handle: Mutex<Option<JoinHandle<quiver_sync::Result<()>>>>,
}

/// Every background task of the process, for `_shutdown()` at exit.
fn everything() -> &'static Mutex<Vec<Background>> {
    static ALL: std::sync::OnceLock<Mutex<Vec<Background>>> = std::sync::OnceLock::new();
    ALL.get_or_init(Mutex::default)
}

impl Background {
    pub(crate) fn spawn(
        stop: CancellationToken,
        fut: impl std::future::Future<Output = quiver_sync::Result<()>> + Send + 'static,
    ) -> Background {
        let b = Background(Arc::new(Task {
            stop,
            handle: Mutex::new(Some(runtime().spawn(fut))),
        }));
        if let Ok(mut all) = everything().lock() {
            all.retain(Background::running);
            all.push(b.clone());
        }
        b
    }

    pub(crate) fn running(&self) -> bool {
        self.0
            .handle
            .lock()
            .map(|t| t.as_ref().is_some_and(|t| !t.is_finished()))
            .unwrap_or(false)
    }

    /// Stops the task and waits for it to close its connections.
    pub(crate) fn stop(&self, py: Python<'_>) -> PyResult<()> {
        self.0.stop.cancel();
        let task = self.0.handle.lock().map_err(internal)?.take();
        if let Some(t) = task {
            let abort = t.abort_handle();
            let finished = wait(py, async move {
                tokio::time::timeout(Duration::from_secs(10), t).await
            });
            // Not finished in time (or interrupted): end it rather than
            // leave it running unseen.
            if !matches!(finished, Ok(Ok(_))) {
                abort.abort();
            }
            let _ = finished?;
        }
        Ok(())
    }
}

pub(crate) fn shutdown_all(py: Python<'_>) {
    let all: Vec<Background> = everything()
        .lock()
        .map(|mut a| std::mem::take(&mut *a))
        .unwrap_or_default();
    for b in &all {
        let _ = b.stop(py);
    }
}

/// How a client trusts the server: a pinned fingerprint, a CA file, or
/// (only when asked) nothing.
pub(crate) fn trust(pin: Option<String>, ca: Option<String>, insecure: bool) -> PyResult<Trust> {
    Ok(match (pin, ca, insecure) {
        (Some(p), None, false) => Trust::Pin(quiver_sync::tls::parse_pin(&p).map_err(sync_err)?),
        (None, Some(c), false) => Trust::Ca(c.into()),
        (None, None, true) => Trust::Insecure,
        (None, None, false) => Trust::Verify,
        _ => return Err(bad("give at most one of pin=, ca= and insecure=True")),
    })
}

/// The client options the CLI would use for this store: its node name, and
/// its own certificate for servers that ask for one.
pub(crate) fn client_options(
    py: Python<'_>,
    db: &Database,
    trust: Trust,
    token: Option<String>,
) -> PyResult<ClientOptions> {
    let node = db
        .call(py, |s| s.node_name())?
        .unwrap_or_else(|| "python".to_string());
    let (cert, key) = quiver_sync::tls::identity_paths(db.path());
    let client_identity = Identity::load(&cert, &key).ok().map(|_| (cert, key));
    Ok(ClientOptions {
        trust,
        client_identity,
        token,
        node,
        ..Default::default()
    })
}

/// What a sync did: the fields of `quiver sync --json` as attributes
/// (`changes_sent`, `changes_received`, `applied`, `conflicts_detected`,
/// `peer_node`, `shards`, `duration_ms`, …); `to_dict()` gives them all.
#[pyclass(module = "quiverdb", frozen)]
pub struct SyncResult {
    fields: Py<PyDict>,
}

impl SyncResult {
    pub(crate) fn new(py: Python<'_>, r: &quiver_sync::SyncResult) -> PyResult<SyncResult> {
        let j = serde_json::to_value(r).map_err(internal)?;
        let d = json_to_py(py, &j)?.into_bound(py).cast_into::<PyDict>()?;
        Ok(SyncResult { fields: d.unbind() })
    }
}

#[pymethods]
impl SyncResult {
    fn __getattr__(&self, py: Python<'_>, name: &str) -> PyResult<Py<PyAny>> {
        match self.fields.bind(py).get_item(name)? {
            Some(v) => Ok(v.unbind()),
            None => Err(PyAttributeError::new_err(format!(
                "SyncResult has no field {name:?}"
            ))),
        }
    }

    fn to_dict(&self, py: Python<'_>) -> PyResult<Py<PyDict>> {
        Ok(self.fields.bind(py).copy()?.unbind())
    }

    fn __repr__(&self, py: Python<'_>) -> PyResult<String> {
        let f = self.fields.bind(py);
        let get = |k: &str| -> String {
            f.get_item(k)
                .ok()
                .flatten()
                .map(|v| v.to_string())
                .unwrap_or_default()
        };
        Ok(format!(
            "SyncResult(peer_node={}, changes_sent={}, changes_received={}, applied={}, conflicts_detected={}, duration_ms={})",
            get("peer_node"),
            get("changes_sent"),
            get("changes_received"),
            get("applied"),
            get("conflicts_detected"),
            get("duration_ms")
        ))
    }
}

#[derive(Default)]
pub(crate) struct LinkState {
    pub(crate) rounds: u64,
    pub(crate) sent: u64,
    pub(crate) received: u64,
    pub(crate) error: Option<String>,
}

/// A live link running in the background.
#[pyclass(module = "quiverdb")]
pub struct LiveLink {
    pub(crate) address: String,
    pub(crate) task: Background,
    pub(crate) state: Arc<Mutex<LinkState>>,
}

#[pymethods]
impl LiveLink {
    #[getter]
    fn address(&self) -> String {
        self.address.clone()
    }

    /// Rounds completed (each catch-up or push/pull of a change).
    #[getter]
    fn rounds(&self) -> u64 {
        self.state.lock().map(|s| s.rounds).unwrap_or(0)
    }

    /// Changes received over the link so far.
    #[getter]
    fn received(&self) -> u64 {
        self.state.lock().map(|s| s.received).unwrap_or(0)
    }

    /// Changes sent over the link so far.
    #[getter]
    fn sent(&self) -> u64 {
        self.state.lock().map(|s| s.sent).unwrap_or(0)
    }

    /// Why the link ended, if it ended on an error (a refused token, an
    /// untrusted certificate); lost connections are retried, not errors.
    #[getter]
    fn error(&self) -> Option<String> {
        self.state.lock().ok().and_then(|s| s.error.clone())
    }

    /// Whether the link still runs.
    #[getter]
    fn running(&self) -> bool {
        self.task.running()
    }

    /// Waits until at least `rounds` rounds have completed, for `timeout`
    /// seconds at most; gives whether they did. Raises the link's error if
    /// it ended on one.
    #[pyo3(signature = (rounds=1, timeout=10.0))]
    fn wait_rounds(&self, py: Python<'_>, rounds: u64, timeout: f64) -> PyResult<bool> {
        let state = self.state.clone();
        let deadline = std::time::Instant::now() + Duration::from_secs_f64(timeout.max(0.0));
        let reached = wait(py, async move {
            loop {
                if let Ok(s) = state.lock() {
                    if s.rounds >= rounds {
                        return Ok(true);
                    }
                    if let Some(e) = &s.error {
                        return Err(e.clone());
                    }
                }
                if std::time::Instant::now() >= deadline {
                    return Ok(false);
                }
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
        })?;
        reached.map_err(crate::SyncError::new_err)
    }

    /// Stops the link and waits for it to close its connection.
    fn stop(&self, py: Python<'_>) -> PyResult<()> {
        self.task.stop(py)
    }

    fn __enter__(slf: Py<Self>) -> Py<Self> {
        slf
    }

    #[pyo3(signature = (*_args))]
    fn __exit__(&self, py: Python<'_>, _args: &Bound<'_, pyo3::types::PyTuple>) -> PyResult<bool> {
        self.stop(py)?;
        Ok(false)
    }

    fn __repr__(&self) -> String {
        format!(
            "LiveLink({:?}, rounds={}, running={})",
            self.address,
            self.rounds(),
            self.running()
        )
    }
}

/// A server running in the background.
#[pyclass(module = "quiverdb")]
pub struct ServerHandle {
    pub(crate) address: String,
    pub(crate) fingerprint: String,
    pub(crate) task: Background,
}

#[pymethods]
impl ServerHandle {
    /// The bound address, "host:port".
    #[getter]
    fn address(&self) -> String {
        self.address.clone()
    }

    /// The SHA-256 fingerprint clients pin.
    #[getter]
    fn fingerprint(&self) -> String {
        self.fingerprint.clone()
    }

    /// Stops accepting, lets in-flight batches finish, closes connections.
    fn stop(&self, py: Python<'_>) -> PyResult<()> {
        self.task.stop(py)
    }

    /// Whether the server still runs.
    #[getter]
    fn running(&self) -> bool {
        self.task.running()
    }

    fn __enter__(slf: Py<Self>) -> Py<Self> {
        slf
    }

    #[pyo3(signature = (*_args))]
    fn __exit__(&self, py: Python<'_>, _args: &Bound<'_, pyo3::types::PyTuple>) -> PyResult<bool> {
        self.stop(py)?;
        Ok(false)
    }

    fn __repr__(&self) -> String {
        format!(
            "Server({:?}, fingerprint={:?})",
            self.address, self.fingerprint
        )
    }
}

/// An iterator over a store's events; see `Database.events`.
#[pyclass(module = "quiverdb")]
pub struct Events {
    pub(crate) db: Py<Database>,
    pub(crate) timeout: Duration,
}

#[pymethods]
impl Events {
    fn __iter__(slf: Py<Self>) -> Py<Self> {
        slf
    }

    fn __next__(&self, py: Python<'_>) -> PyResult<Py<PyAny>> {
        let db = self.db.borrow(py);
        let events = &db.events;
        let timeout = self.timeout;
        // The receiver is taken out while this thread waits (and takes the
        // GIL back now and then for Ctrl-C), so the lock is never held
        // across the GIL; a second iterator meanwhile finds none and ends.
        let Some(mut rx) = events.lock().map_err(internal)?.take() else {
            return Err(PyStopIteration::new_err(()));
        };
        let next = py.detach(|| -> PyResult<Option<quiver_store::StoreEvent>> {
            runtime().block_on(async {
                let deadline = tokio::time::sleep(timeout);
                tokio::pin!(deadline);
                loop {
                    tokio::select! {
                        r = rx.recv() => match r {
                            Ok(e) => return Ok(Some(e)),
                            // Too many unread events: the oldest are gone.
                            Err(RecvError::Lagged(_)) => continue,
                            Err(RecvError::Closed) => return Ok(None),
                        },
                        _ = &mut deadline => return Ok(None),
                        _ = tokio::time::sleep(Duration::from_millis(100)) => {
                            Python::attach(|py| py.check_signals())?;
                        }
                    }
                }
            })
        });
        if let Ok(mut slot) = events.lock() {
            slot.get_or_insert(rx);
        }
        match next? {
            Some(e) => {
                let j = serde_json::to_value(&e).map_err(internal)?;
                json_to_py(py, &j)
            }
            None => Err(PyStopIteration::new_err(())),
        }
    }
}

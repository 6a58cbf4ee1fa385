//! `quiverdb` for Python: the store, the sync client and the server of the
//! Rust crates, embedded in the Python process. It adds no logic of its
//! own: every call goes to `quiver-store` (through the store thread of
//! `quiver-sync`) or to `quiver-sync`'s client and server, on a runtime of
//! the package's own, with the GIL released while Rust works or waits.

mod convert;
mod db;
mod net;

use std::future::Future;
use std::sync::OnceLock;
use std::time::Duration;

use pyo3::create_exception;
use pyo3::exceptions::PyException;
use pyo3::prelude::*;

create_exception!(_native, Error, PyException, "Every error quiverdb raises.");
create_exception!(
    _native,
    ValidationError,
    Error,
    "Bad input: a wrong dimension, a value that is not finite, metadata that is not a dict, a malformed filter, address or pin. Nothing was written."
);
create_exception!(
    _native,
    NotFound,
    Error,
    "No such store, collection, table or conflict."
);
create_exception!(
    _native,
    ReadOnly,
    Error,
    "The store cannot be written by this user."
);
create_exception!(
    _native,
    SyncError,
    Error,
    "A sync, live link or server failed: the network, the peer, or the protocol."
);
create_exception!(
    _native,
    Unauthorized,
    SyncError,
    "The peer refused the token (missing, wrong, revoked or out of scope)."
);
create_exception!(
    _native,
    Untrusted,
    SyncError,
    "The peer's certificate is not trusted: pin its fingerprint or give its CA."
);

/// The package's runtime: two worker threads, shared by every store,
/// client, live link and server of the process.
pub(crate) fn runtime() -> &'static tokio::runtime::Runtime {
    static RT: OnceLock<tokio::runtime::Runtime> = OnceLock::new();
    RT.get_or_init(|| {
        tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .thread_name("quiverdb")
            .enable_all()
            .build()
            .expect("the quiverdb runtime starts")
    })
}

/// Runs `fut` to completion with the GIL released, checking for Ctrl-C
/// (and other signals Python handles) every 100 ms, so that a long sync or
/// wait can be interrupted with `KeyboardInterrupt`.
pub(crate) fn wait<T: Send>(py: Python<'_>, fut: impl Future<Output = T> + Send) -> PyResult<T> {
    py.detach(|| {
        runtime().block_on(async {
            tokio::pin!(fut);
            loop {
                tokio::select! {
                    out = &mut fut => return Ok(out),
                    _ = tokio::time::sleep(Duration::from_millis(100)) => {
                        Python::attach(|py| py.check_signals())?;
                    }
                }
            }
        })
    })
}

/// Ends every live link and server of the process (registered with
/// `atexit` by the package, so that the interpreter exits cleanly).
#[pyfunction]
fn _shutdown(py: Python<'_>) {
    net::shutdown_all(py);
}

#[pymodule]
fn _native(m: &Bound<'_, PyModule>) -> PyResult<()> {
    let py = m.py();
    m.add("Error", py.get_type::<Error>())?;
    m.add("ValidationError", py.get_type::<ValidationError>())?;
    m.add("NotFound", py.get_type::<NotFound>())?;
    m.add("ReadOnly", py.get_type::<ReadOnly>())?;
    m.add("SyncError", py.get_type::<SyncError>())?;
    m.add("Unauthorized", py.get_type::<Unauthorized>())?;
    m.add("Untrusted", py.get_type::<Untrusted>())?;
    m.add_function(wrap_pyfunction!(db::open, m)?)?;
    m.add_function(wrap_pyfunction!(_shutdown, m)?)?;
    m.add_class::<db::Database>()?;
    m.add_class::<db::Collection>()?;
    m.add_class::<db::Record>()?;
    m.add_class::<db::Hit>()?;
    m.add_class::<db::Memory>()?;
    m.add_class::<net::SyncResult>()?;
    m.add_class::<net::LiveLink>()?;
    m.add_class::<net::ServerHandle>()?;
    m.add_class::<net::Events>()?;
    Ok(())
}

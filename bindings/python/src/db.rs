//! The store: `quiverdb.open`, collections, records, search, SQL, agent
//! memory, conflicts, and the network calls of a store (sync, live links,
//! a server, events), whose running parts live in `net`.

use std::path::PathBuf;
use std::sync::{Arc, Mutex, RwLock};
use std::time::Duration;

use numpy::PyArray1;
use pyo3::prelude::*;
use pyo3::types::{PyDict, PyList};
use quiver_store::{
    CollectionSpec, Filter, Record as StoreRecord, RecordColumns, Store, StoreEvent,
};
use quiver_sync::{
    CancellationToken, Client, Identity, Request, Server, ServerOptions, StoreHandle, SyncSpec,
};
use tokio::sync::broadcast;

use crate::convert::{
    bad, gone, json_to_py, matrix, py_to_json, sql_to_py, sql_value, store_err, sync_err, vector,
};
use crate::net::{
    client_options, trust, Background, Events, LinkState, LiveLink, ServerHandle, SyncResult,
};
use crate::{runtime, wait};

/// Opens the store at `path`, creating it (with its TLS certificate beside
/// it) if it does not exist. `name` names a new store's node.
#[pyfunction]
#[pyo3(signature = (path, name=None))]
pub(crate) fn open(py: Python<'_>, path: PathBuf, name: Option<String>) -> PyResult<Database> {
    let store = py.detach(|| -> PyResult<Store> {
        if path.exists() {
            return Store::open(&path).map_err(store_err);
        }
        let mut s = Store::init(&path).map_err(store_err)?;
        if let Some(n) = &name {
            s.set_node_name(n).map_err(store_err)?;
        }
        quiver_sync::tls::create_identity(&path, &[]).map_err(crate::convert::sync_err)?;
        Ok(s)
    })?;
    // The store thread; its file watch notices other processes' writes.
    let handle = {
        let _guard = crate::runtime().enter();
        StoreHandle::spawn(store)
    };
    let events = Mutex::new(None);
    Ok(Database {
        handle: RwLock::new(Some(handle)),
        path,
        events,
        background: Mutex::default(),
    })
}

/// A quiverdb store: one SQLite file, opened by this process.
///
/// Every method runs on the store's own thread with the GIL released.
#[pyclass(module = "quiverdb")]
pub struct Database {
    handle: RwLock<Option<StoreHandle>>,
    path: PathBuf,
    /// Events from the first call to `events()` on (until then, commits
    /// do not work out what they wrote for nobody).
    pub(crate) events: Mutex<Option<broadcast::Receiver<StoreEvent>>>,
    /// Its live links and servers, stopped by `close()`.
    background: Mutex<Vec<crate::net::Background>>,
}

impl Database {
    pub(crate) fn handle(&self) -> PyResult<StoreHandle> {
        self.handle
            .read()
            .map_err(|_| crate::convert::internal("lock poisoned"))?
            .clone()
            .ok_or_else(|| crate::Error::new_err(format!("{} is closed", self.path.display())))
    }

    pub(crate) fn path(&self) -> &std::path::Path {
        &self.path
    }

    /// Keeps a live link or server of this store, to stop at `close()`.
    pub(crate) fn adopt(&self, task: crate::net::Background) -> PyResult<()> {
        let mut all = self
            .background
            .lock()
            .map_err(|_| crate::convert::internal("lock poisoned"))?;
        all.retain(crate::net::Background::running);
        all.push(task);
        Ok(())
    }

    /// Runs `f` on the store thread, the GIL released; store errors become
    /// Python exceptions.
    pub(crate) fn call<R: Send + 'static>(
        &self,
        py: Python<'_>,
        f: impl FnOnce(&mut Store) -> quiver_store::Result<R> + Send + 'static,
    ) -> PyResult<R> {
        let h = self.handle()?;
        wait(py, async move { h.call(f).await })?
            .map_err(gone)?
            .map_err(store_err)
    }

    /// Sends the store thread a request by name (see
    /// `quiver_sync::Request`) and waits for it with the GIL released.
    pub(crate) fn ask<T: Send, F>(
        &self,
        py: Python<'_>,
        f: impl FnOnce(StoreHandle) -> F,
    ) -> PyResult<T>
    where
        F: std::future::Future<Output = quiver_sync::Result<T>> + Send,
    {
        let h = self.handle()?;
        wait(py, f(h))?.map_err(crate::convert::sync_err)
    }
}

#[pymethods]
impl Database {
    /// The store file.
    #[getter(path)]
    fn store_path(&self) -> String {
        self.path.display().to_string()
    }

    /// This replica's site id (hex).
    #[getter]
    fn site_id(&self) -> PyResult<String> {
        Ok(self.handle()?.site_id().to_hex())
    }

    /// The node name, if the store has one.
    #[getter]
    fn name(&self, py: Python<'_>) -> PyResult<Option<String>> {
        self.call(py, |s| s.node_name())
    }

    /// Creates a vector collection. `metric` is "cosine", "l2" or "dot";
    /// `strategy` one of "lww", "fww", "merge", "manual", "local-wins",
    /// "remote-wins".
    #[pyo3(signature = (name, dim, metric="cosine", strategy="lww", shard="default"))]
    fn create_collection(
        slf: Bound<'_, Self>,
        name: String,
        dim: usize,
        metric: &str,
        strategy: &str,
        shard: &str,
    ) -> PyResult<Collection> {
        let spec = CollectionSpec {
            name: name.clone(),
            dim,
            metric: metric
                .parse()
                .map_err(|e: quiver_core::CoreError| bad(e.to_string()))?,
            strategy: strategy
                .parse()
                .map_err(|e: quiver_core::CoreError| bad(e.to_string()))?,
            shard: shard.to_string(),
        };
        let py = slf.py();
        slf.borrow()
            .ask(py, |h| async move { h.create_collection(spec).await })?;
        Ok(Collection {
            db: slf.unbind(),
            name,
            dim,
        })
    }

    /// An existing collection.
    fn collection(slf: Bound<'_, Self>, name: String) -> PyResult<Collection> {
        let py = slf.py();
        let n = name.clone();
        let info = slf.borrow().call(py, move |s| s.collection(&n))?;
        Ok(Collection {
            db: slf.unbind(),
            name,
            dim: info.dim.unwrap_or(0),
        })
    }

    /// The names of the store's collections.
    fn collections(&self, py: Python<'_>) -> PyResult<Vec<String>> {
        let tables = self.call(py, |s| s.tables())?;
        Ok(tables
            .into_iter()
            .filter(|t| t.kind == quiver_store::TableKind::Collection)
            .map(|t| t.name)
            .collect())
    }

    /// Runs SQL: one or more statements; `params` bind the `?` of a single
    /// statement. Gives the rows (a list of dicts) of the last statement
    /// that returns rows, or `[]`. Writes to replicated tables are tracked.
    #[pyo3(signature = (sql, params=None))]
    fn sql(
        &self,
        py: Python<'_>,
        sql: String,
        params: Option<Bound<'_, PyAny>>,
    ) -> PyResult<Py<PyList>> {
        let params = match params {
            None => Vec::new(),
            Some(p) => p
                .try_iter()?
                .map(|v| sql_value(&v?))
                .collect::<PyResult<Vec<_>>>()?,
        };
        let results = self.ask(py, |h| async move { h.sql(&sql, params).await })?;
        let out = PyList::empty(py);
        if let Some((names, rows)) = results.into_iter().flatten().last() {
            for r in rows {
                let d = PyDict::new(py);
                for (n, v) in names.iter().zip(&r) {
                    d.set_item(n, sql_to_py(py, v)?)?;
                }
                out.append(d)?;
            }
        }
        Ok(out.unbind())
    }

    /// The agent-memory preset (episodes, skills, edges in shard "memory"),
    /// created on first use.
    #[getter]
    fn memory(slf: Bound<'_, Self>) -> PyResult<Memory> {
        let py = slf.py();
        slf.borrow().ask(py, |h| async move {
            h.request(|reply| Request::InitMemory { reply }).await
        })?;
        Ok(Memory { db: slf.unbind() })
    }

    /// Conflicts as dicts: the open ones, or all with `all=True`.
    #[pyo3(signature = (shard=None, all=false))]
    fn conflicts(&self, py: Python<'_>, shard: Option<String>, all: bool) -> PyResult<Py<PyAny>> {
        let list = self.call(py, move |s| {
            if all {
                s.conflicts(shard.as_deref())
            } else {
                s.get_unresolved_conflicts(shard.as_deref())
            }
        })?;
        let j = serde_json::to_value(&list).map_err(|e| bad(e.to_string()))?;
        json_to_py(py, &j)
    }

    /// Resolves conflict `id`: `keep` a recorded version ("site:version" or
    /// a unique prefix), or write a new `value` (a list of numbers for a
    /// vector, a dict for metadata). The resolution wins everywhere.
    #[pyo3(signature = (id, keep=None, value=None))]
    fn resolve(
        &self,
        py: Python<'_>,
        id: i64,
        keep: Option<String>,
        value: Option<Bound<'_, PyAny>>,
    ) -> PyResult<()> {
        let choice = match (keep, value) {
            (Some(k), None) => Ok(k),
            (None, Some(v)) => Err(py_to_json(&v, "value")?),
            _ => return Err(bad("give exactly one of keep= and value=")),
        };
        self.ask(py, |h| async move {
            h.request(|reply| Request::Resolve { id, choice, reply })
                .await
        })
    }

    /// Syncs both ways with the server at `address` ("host:port") and gives
    /// a `SyncResult` with the fields of `quiver sync --json`. Trust the
    /// server with `pin` (its certificate's SHA-256 fingerprint) or `ca` (a
    /// PEM file); `shards` and `tables` narrow the sync. Transient failures
    /// are retried `retries` times. Ctrl-C interrupts it.
    #[pyo3(signature = (address, pin=None, token=None, ca=None, insecure=false, shards=None, tables=None, retries=4))]
    #[allow(clippy::too_many_arguments)]
    fn sync(
        &self,
        py: Python<'_>,
        address: String,
        pin: Option<String>,
        token: Option<String>,
        ca: Option<String>,
        insecure: bool,
        shards: Option<Vec<String>>,
        tables: Option<Vec<String>>,
        retries: u32,
    ) -> PyResult<SyncResult> {
        let mut opts = client_options(py, self, trust(pin, ca, insecure)?, token)?;
        opts.retries = retries;
        // As `quiver sync`: a server that does not answer the handshake
        // within 2.5 s is reported at once rather than retried.
        opts.connect_timeout = Duration::from_millis(2500);
        opts.retry_no_answer = false;
        let spec = SyncSpec {
            shards: shards.unwrap_or_default(),
            tables: tables.unwrap_or_default(),
        };
        let mut client = Client::new(self.handle()?, opts);
        let r = wait(py, async move {
            let r = client.sync(&address, &spec, None).await;
            client.close().await;
            r
        })?
        .map_err(sync_err)?;
        SyncResult::new(py, &r)
    }

    /// A live link to the server at `address`, in the background: catch up,
    /// then push and pull each change as it commits, reconnecting after a
    /// loss. Use it as a context manager (`with db.live(...) as link:`), or
    /// call `stop()`.
    #[pyo3(signature = (address, pin=None, token=None, ca=None, insecure=false, shards=None))]
    #[allow(clippy::too_many_arguments)]
    fn live(
        &self,
        py: Python<'_>,
        address: String,
        pin: Option<String>,
        token: Option<String>,
        ca: Option<String>,
        insecure: bool,
        shards: Option<Vec<String>>,
    ) -> PyResult<LiveLink> {
        let opts = client_options(py, self, trust(pin, ca, insecure)?, token)?;
        let spec = SyncSpec {
            shards: shards.unwrap_or_default(),
            tables: vec![],
        };
        let stop = CancellationToken::new();
        let state = Arc::new(Mutex::new(LinkState::default()));
        let seen = state.clone();
        let on_round: quiver_sync::RoundFn = Arc::new(move |r| {
            if let Ok(mut s) = seen.lock() {
                s.rounds += 1;
                s.received += r.changes_received;
                s.sent += r.changes_sent;
            }
        });
        let mut client = Client::new(self.handle()?, opts);
        let (to, until) = (address.clone(), stop.clone());
        let ended = state.clone();
        let task = Background::spawn(stop, async move {
            let r = client.live(&to, &spec, until, Some(on_round)).await;
            client.close().await;
            if let (Err(e), Ok(mut s)) = (&r, ended.lock()) {
                s.error = Some(e.to_string());
            }
            r
        });
        self.adopt(task.clone())?;
        Ok(LiveLink {
            address,
            task,
            state,
        })
    }

    /// Serves this store over QUIC at `listen` (port 0 picks one; see
    /// `.address` and `.fingerprint`), in the background, with the store's
    /// certificate. Clients must present `token` when one is given (or one
    /// of the store's scoped tokens); `client_ca` asks for client
    /// certificates (mutual TLS).
    #[pyo3(signature = (listen="127.0.0.1:0", token=None, client_ca=None))]
    fn serve(
        &self,
        py: Python<'_>,
        listen: &str,
        token: Option<String>,
        client_ca: Option<String>,
    ) -> PyResult<ServerHandle> {
        let listen = listen.parse().map_err(|_| {
            bad(format!(
                "listen: {listen:?} is not an address like 127.0.0.1:4433"
            ))
        })?;
        let (cert, key) = quiver_sync::tls::identity_paths(self.path());
        let id = Identity::load(&cert, &key).map_err(sync_err)?;
        let node = self
            .call(py, |s| s.node_name())?
            .unwrap_or_else(|| "python".to_string());
        let opts = ServerOptions {
            listen,
            token,
            node,
            client_ca: client_ca.map(Into::into),
            ..Default::default()
        };
        let handle = self.handle()?;
        let server = {
            let _guard = runtime().enter();
            Server::bind(handle, &id, opts).map_err(sync_err)?
        };
        let address = server.local_addr().map_err(sync_err)?.to_string();
        let task = Background::spawn(server.shutdown_token(), server.run());
        self.adopt(task.clone())?;
        Ok(ServerHandle {
            address,
            fingerprint: id.fingerprint(),
            task,
        })
    }

    /// The store's events as dicts (the same as `quiver watch`): local
    /// commits, commits by other processes, remote changes, conflicts.
    /// Iterating waits up to `timeout` seconds for each next event and ends
    /// when none comes. Events are kept from the first call to `events()`
    /// on, so call it once before the writes you want to hear of.
    #[pyo3(signature = (timeout=1.0))]
    fn events(slf: Py<Self>, py: Python<'_>, timeout: f64) -> PyResult<Events> {
        {
            let db = slf.borrow(py);
            let mut rx = db
                .events
                .lock()
                .map_err(|_| crate::convert::internal("lock poisoned"))?;
            if rx.is_none() {
                *rx = Some(db.handle()?.events());
            }
        }
        if !(timeout.is_finite() && timeout >= 0.0) {
            return Err(bad("timeout is a number of seconds, 0 or more"));
        }
        Ok(Events {
            db: slf,
            timeout: Duration::from_secs_f64(timeout),
        })
    }

    /// The store's status (`quiver status --json`) as a dict.
    fn status(&self, py: Python<'_>) -> PyResult<Py<PyAny>> {
        let st = self.call(py, |s| s.status())?;
        let j = serde_json::to_value(&st).map_err(|e| bad(e.to_string()))?;
        json_to_py(py, &j)
    }

    /// Stops the store's live links and servers, then closes the store;
    /// later calls raise `quiverdb.Error`.
    fn close(&self, py: Python<'_>) -> PyResult<()> {
        let tasks: Vec<_> = self
            .background
            .lock()
            .map(|mut b| std::mem::take(&mut *b))
            .unwrap_or_default();
        // Every task is stopped even if one stop fails (Ctrl-C); the first
        // failure is raised after the store is closed.
        let mut failed = None;
        for t in tasks {
            if let Err(e) = t.stop(py) {
                failed.get_or_insert(e);
            }
        }
        self.handle
            .write()
            .map_err(|_| crate::convert::internal("lock poisoned"))?
            .take();
        failed.map_or(Ok(()), Err)
    }

    fn __enter__(slf: Py<Self>) -> Py<Self> {
        slf
    }

    #[pyo3(signature = (*_args))]
    fn __exit__(&self, py: Python<'_>, _args: &Bound<'_, pyo3::types::PyTuple>) -> PyResult<()> {
        self.close(py)
    }

    fn __repr__(&self) -> String {
        format!("quiverdb.Database({:?})", self.path.display().to_string())
    }
}

/// A vector collection of a store.
#[pyclass(module = "quiverdb")]
pub struct Collection {
    db: Py<Database>,
    name: String,
    dim: usize,
}

impl Collection {
    fn call<R: Send + 'static>(
        &self,
        py: Python<'_>,
        f: impl FnOnce(&mut Store) -> quiver_store::Result<R> + Send + 'static,
    ) -> PyResult<R> {
        self.db.borrow(py).call(py, f)
    }
}

#[pymethods]
impl Collection {
    #[getter]
    fn name(&self) -> String {
        self.name.clone()
    }

    /// Dimensions of every vector.
    #[getter]
    fn dim(&self) -> usize {
        self.dim
    }

    /// Inserts or replaces one record. `vector` is a 1-D float32 array (or
    /// a list of numbers) of the collection's dimension; `metadata` a dict.
    #[pyo3(signature = (id, vector, metadata=None, content=None))]
    fn put(
        &self,
        py: Python<'_>,
        id: String,
        vector: Bound<'_, PyAny>,
        metadata: Option<Bound<'_, PyAny>>,
        content: Option<String>,
    ) -> PyResult<()> {
        let mut r = StoreRecord::new(&id, crate::convert::vector(&vector)?);
        r.metadata = crate::convert::metadata(metadata.as_ref())?;
        r.content = content;
        let name = self.name.clone();
        self.db
            .borrow(py)
            .ask(py, |h| async move { h.put(&name, r).await })
    }

    /// Inserts or replaces many records in one transaction, all or nothing:
    /// `ids` a list of str, `vectors` an (n, dim) C-contiguous float32
    /// array, `metadatas` and `contents` lists of n (or None). Gives how
    /// many rows were written (records equal to what is held are left
    /// alone).
    #[pyo3(signature = (ids, vectors, metadatas=None, contents=None))]
    fn put_many(
        &self,
        py: Python<'_>,
        ids: Vec<String>,
        vectors: Bound<'_, PyAny>,
        metadatas: Option<Bound<'_, PyAny>>,
        contents: Option<Vec<Option<String>>>,
    ) -> PyResult<usize> {
        let (values, width) = matrix(&vectors, ids.len())?;
        if width != self.dim {
            return Err(bad(format!(
                "the matrix has {width} columns, collection {:?} expects {}",
                self.name, self.dim
            )));
        }
        let metadata = match &metadatas {
            Some(m) if !m.is_none() => crate::convert::metadatas(m, ids.len())?,
            _ => vec!["{}".to_string(); ids.len()],
        };
        let contents = match contents {
            Some(c) if c.len() != ids.len() => {
                return Err(bad(format!("{} ids but {} contents", ids.len(), c.len())));
            }
            c => c.unwrap_or_default(),
        };
        let name = self.name.clone();
        let rows = RecordColumns {
            ids,
            vectors: values,
            metadata,
            contents,
        };
        self.db
            .borrow(py)
            .ask(py, |h| async move { h.put_columns(&name, rows).await })
    }

    /// The record with this id, or None.
    fn get(&self, py: Python<'_>, id: String) -> PyResult<Option<Record>> {
        let name = self.name.clone();
        let r = self.call(py, move |s| s.get(&name, &id))?;
        r.map(|r| Record::from_store(py, r)).transpose()
    }

    /// Deletes a record; gives whether it existed.
    fn delete(&self, py: Python<'_>, id: String) -> PyResult<bool> {
        let name = self.name.clone();
        self.db
            .borrow(py)
            .ask(py, |h| async move { h.delete(&name, &id).await })
    }

    fn __len__(&self, py: Python<'_>) -> PyResult<usize> {
        let name = self.name.clone();
        Ok(self.call(py, move |s| s.count(&name))? as usize)
    }

    /// The `k` nearest records to `query` (a 1-D float32 array), closest
    /// first, as a list of `Hit(id, score, metadata, content)`; `score` is
    /// the distance under the collection's metric (smaller is closer).
    ///
    /// `filter` selects by metadata, MongoDB-style:
    ///
    /// - `{"lang": "en"}`: equality; keys of a dict are ANDed.
    /// - `{"year": {"$gte": 2020, "$lt": 2024}}`: `$eq`, `$ne`, `$gt`,
    ///   `$gte`, `$lt`, `$lte` (numbers or strings).
    /// - `{"tag": {"$in": ["a", "b"]}}`, `$nin`, `{"x": {"$exists": True}}`.
    /// - `{"$or": [{...}, {...}]}`, `$and`; `"author.name"` reaches into
    ///   nested dicts; on a list field, equality matches any element.
    ///
    /// The collection stays in memory after the first search and follows
    /// every write, so later queries cost only the scan.
    #[pyo3(signature = (query, k=10, filter=None))]
    fn search(
        &self,
        py: Python<'_>,
        query: Bound<'_, PyAny>,
        k: usize,
        filter: Option<Bound<'_, PyAny>>,
    ) -> PyResult<Vec<Hit>> {
        let q = vector(&query)?;
        let filter = match filter {
            None => None,
            Some(f) if f.is_none() => None,
            Some(f) => Some(Filter::from_json(&py_to_json(&f, "filter")?).map_err(store_err)?),
        };
        let name = self.name.clone();
        let hits = self.call(py, move |s| s.search(&name, &q, k, filter.as_ref()))?;
        hits.into_iter()
            .map(|h| {
                Ok(Hit {
                    id: h.id,
                    score: h.distance,
                    metadata: json_to_py(py, &h.metadata)?,
                    content: h.content,
                })
            })
            .collect()
    }

    fn __repr__(&self) -> String {
        format!("quiverdb.Collection({:?}, dim={})", self.name, self.dim)
    }
}

/// A stored record.
#[pyclass(module = "quiverdb", frozen, get_all)]
pub struct Record {
    id: String,
    /// The vector, as a float32 numpy array.
    vector: Py<PyAny>,
    metadata: Py<PyAny>,
    content: Option<String>,
}

impl Record {
    fn from_store(py: Python<'_>, r: StoreRecord) -> PyResult<Record> {
        Ok(Record {
            vector: PyArray1::from_vec(py, r.vector).into_any().unbind(),
            metadata: json_to_py(py, &r.metadata)?,
            id: r.id,
            content: r.content,
        })
    }
}

#[pymethods]
impl Record {
    fn __repr__(&self, py: Python<'_>) -> String {
        format!(
            "Record(id={:?}, metadata={}, content={:?})",
            self.id,
            self.metadata
                .bind(py)
                .repr()
                .map(|r| r.to_string())
                .unwrap_or_default(),
            self.content
        )
    }
}

/// A search result: `score` is the distance (smaller is closer).
#[pyclass(module = "quiverdb", frozen, get_all)]
pub struct Hit {
    id: String,
    score: f32,
    metadata: Py<PyAny>,
    content: Option<String>,
}

#[pymethods]
impl Hit {
    /// The same as `score`: the distance under the collection's metric.
    #[getter]
    fn distance(&self) -> f32 {
        self.score
    }

    fn __repr__(&self, py: Python<'_>) -> String {
        format!(
            "Hit(id={:?}, score={:.6}, metadata={})",
            self.id,
            self.score,
            self.metadata
                .bind(py)
                .repr()
                .map(|r| r.to_string())
                .unwrap_or_default()
        )
    }
}

/// The agent-memory tables: episodes, skills and the edges between them.
#[pyclass(module = "quiverdb")]
pub struct Memory {
    db: Py<Database>,
}

/// A fresh random id (UUID version 4 form).
fn new_id() -> String {
    let mut b: [u8; 16] = rand::random();
    b[6] = (b[6] & 0x0f) | 0x40;
    b[8] = (b[8] & 0x3f) | 0x80;
    let h: String = b.iter().map(|x| format!("{x:02x}")).collect();
    format!(
        "{}-{}-{}-{}-{}",
        &h[..8],
        &h[8..12],
        &h[12..16],
        &h[16..20],
        &h[20..]
    )
}

impl Memory {
    fn insert(
        &self,
        py: Python<'_>,
        sql: &'static str,
        params: Vec<quiver_core::Value>,
    ) -> PyResult<()> {
        self.db
            .borrow(py)
            .ask(py, |h| async move { h.sql(sql, params).await.map(drop) })
    }

    fn list(&self, py: Python<'_>, table: &str) -> PyResult<Py<PyList>> {
        self.db
            .borrow(py)
            .sql(py, format!("SELECT * FROM {table} ORDER BY rowid"), None)
    }
}

fn opt_text(v: Option<String>) -> quiver_core::Value {
    v.map_or(quiver_core::Value::Null, quiver_core::Value::Text)
}

fn opt_real(v: Option<f64>) -> quiver_core::Value {
    v.map_or(quiver_core::Value::Null, quiver_core::Value::Real)
}

fn opt_vector(v: Option<Bound<'_, PyAny>>) -> PyResult<quiver_core::Value> {
    Ok(match v {
        None => quiver_core::Value::Null,
        Some(v) => quiver_core::Value::Blob(quiver_core::vector::encode(&vector(&v)?)),
    })
}

#[pymethods]
impl Memory {
    /// Records an episode (a task tried, with its outcome); gives its id.
    #[pyo3(signature = (task, input=None, output=None, critique=None, reward=None, success=None, embedding=None, id=None))]
    #[allow(clippy::too_many_arguments)]
    fn add_episode(
        &self,
        py: Python<'_>,
        task: String,
        input: Option<String>,
        output: Option<String>,
        critique: Option<String>,
        reward: Option<f64>,
        success: Option<bool>,
        embedding: Option<Bound<'_, PyAny>>,
        id: Option<String>,
    ) -> PyResult<String> {
        use quiver_core::Value as V;
        let id = id.unwrap_or_else(new_id);
        let created = quiver_store::wall_ms() as i64;
        self.insert(
            py,
            "INSERT INTO episodes(id, task, input, output, critique, reward, success, embedding, created)
             VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
            vec![
                V::Text(id.clone()),
                V::Text(task),
                opt_text(input),
                opt_text(output),
                opt_text(critique),
                opt_real(reward),
                success.map_or(V::Null, |b| V::Integer(b as i64)),
                opt_vector(embedding)?,
                V::Integer(created),
            ],
        )?;
        Ok(id)
    }

    /// Records a skill; gives its id.
    #[pyo3(signature = (name, description=None, code=None, success_rate=None, embedding=None, id=None))]
    #[allow(clippy::too_many_arguments)]
    fn add_skill(
        &self,
        py: Python<'_>,
        name: String,
        description: Option<String>,
        code: Option<String>,
        success_rate: Option<f64>,
        embedding: Option<Bound<'_, PyAny>>,
        id: Option<String>,
    ) -> PyResult<String> {
        use quiver_core::Value as V;
        let id = id.unwrap_or_else(new_id);
        self.insert(
            py,
            "INSERT INTO skills(id, name, description, code, success_rate, embedding)
             VALUES (?, ?, ?, ?, ?, ?)",
            vec![
                V::Text(id.clone()),
                V::Text(name),
                opt_text(description),
                opt_text(code),
                opt_real(success_rate),
                opt_vector(embedding)?,
            ],
        )?;
        Ok(id)
    }

    /// Records a relation between two episodes or skills; gives its id.
    #[pyo3(signature = (from_id, to_id, relation, weight=None, id=None))]
    fn add_edge(
        &self,
        py: Python<'_>,
        from_id: String,
        to_id: String,
        relation: String,
        weight: Option<f64>,
        id: Option<String>,
    ) -> PyResult<String> {
        use quiver_core::Value as V;
        let id = id.unwrap_or_else(new_id);
        self.insert(
            py,
            "INSERT INTO edges(id, from_id, to_id, relation, weight) VALUES (?, ?, ?, ?, ?)",
            vec![
                V::Text(id.clone()),
                V::Text(from_id),
                V::Text(to_id),
                V::Text(relation),
                opt_real(weight),
            ],
        )?;
        Ok(id)
    }

    /// Every episode, as dicts.
    fn episodes(&self, py: Python<'_>) -> PyResult<Py<PyList>> {
        self.list(py, "episodes")
    }

    /// Every skill, as dicts.
    fn skills(&self, py: Python<'_>) -> PyResult<Py<PyList>> {
        self.list(py, "skills")
    }

    /// Every edge, as dicts.
    fn edges(&self, py: Python<'_>) -> PyResult<Py<PyList>> {
        self.list(py, "edges")
    }
}

//! Exact k-nearest-neighbour search over a collection, with metadata
//! filters ([`Store::search`]).
//!
//! # Distances
//!
//! Smaller is closer, whatever the collection's metric:
//!
//! | metric | distance |
//! | --- | --- |
//! | `cosine` | `1 - cos(q, v)`, in `[0, 2]` up to rounding; `1` when either vector is zero |
//! | `l2` | the Euclidean distance `‖q - v‖` (not squared, as sqlite-vec's `vec_distance_l2`) |
//! | `dot` | `-(q · v)` |
//!
//! Results are exact (every row is compared), ordered by distance then by
//! id ascending, so equal distances come back in a deterministic order.
//!
//! # The cache
//!
//! The first search of a collection reads it once into a [`Matrix`]: all
//! vectors in one contiguous row-major `Vec<f32>`, ids, norms (cosine) and
//! metadata flattened for filtering. Later searches reuse it and only
//! refresh what changed:
//!
//! - **Writes through this store's connection** (local puts, `Store::apply`
//!   of remote changes, SQL run through [`Store::connection`]) fire SQLite's
//!   update hook, which records the rowid in a per-collection dirty set. The
//!   next search re-reads exactly those rows from the table. Because rows
//!   are re-read rather than replayed, a write that was rolled back leaves
//!   nothing behind: the re-read sees the row as it is after the rollback.
//!   A search made inside an open transaction keeps the rows it re-read (or
//!   the whole matrix, if it loaded one) marked, so they are read again
//!   once the transaction has ended, whichever way it ended.
//! - **Writes by other connections** (other processes sharing the file)
//!   change `PRAGMA data_version`; the collection is then reloaded whole.
//! - **Schema changes** (`PRAGMA schema_version`: a collection dropped or
//!   created) drop every cached matrix.
//! - More dirty rows than half the collection (min 4,096) also reload it.
//!
//! # Memory
//!
//! Per row: `4 × dim` bytes of vector, about 220 bytes of ids, norm,
//! rowid and lookup maps, plus the flattened metadata (~250 bytes for a
//! 5-key object). Measured at dim 384 (RSS growth on load): 1.76 GB per
//! million vectors with empty metadata, 2.0 GB with 5-key metadata; the
//! matrix alone is 1.536 GB. [`Store::search_stats`] reports the figures of
//! a loaded collection. Content is never cached: it is read from SQLite for
//! the rows returned only, as is the metadata returned.
//!
//! # Speed
//!
//! Distances use chunked kernels the compiler vectorises (see
//! `distance.rs`); the top k are kept in a bounded max-heap; the filter is
//! evaluated before the distance, inside the scan, so `k` hits come back
//! whenever `k` rows match. Collections over 2^19 matrix elements are
//! scanned on all cores with scoped threads.

mod distance;
mod fields;
mod filter;
mod matrix;
mod scan;

use std::cell::RefCell;
use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};

use rusqlite::hooks::Action;
use rusqlite::Connection;
use serde::Serialize;

pub use filter::Filter;
use matrix::Matrix;

use crate::catalog::TableInfo;
use crate::collections::check_finite;
use crate::names::quote;
use crate::{Metric, Result, Store, StoreError};

/// Dirty sets never shrink the reload threshold below this many rows.
const MIN_DIRTY_LIMIT: usize = 4096;

/// One search result.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Hit {
    pub id: String,
    /// Distance under the collection's metric; smaller is closer.
    pub distance: f32,
    pub metadata: serde_json::Value,
    pub content: Option<String>,
}

/// Size of a collection's search cache.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct SearchStats {
    /// Rows held (rows whose vector is malformed are not searchable).
    pub rows: usize,
    pub dim: usize,
    /// Bytes of the vector matrix (`rows × dim × 4`, by capacity).
    pub matrix_bytes: usize,
    /// Bytes of everything cached for the collection, matrix included.
    pub total_bytes: usize,
}

/// The search caches of a store, and the change tracking that keeps them
/// current. Lives in [`Store`]; search takes `&self`, hence the cells.
pub(crate) struct SearchCache {
    /// Shared with the update hook, which must be `Send + 'static`.
    dirty: Arc<Mutex<Dirty>>,
    state: RefCell<State>,
}

/// Rowids written since each cached collection was last brought up to date.
/// Only collections with a cached matrix are tracked.
#[derive(Default)]
struct Dirty {
    tables: HashMap<String, DirtyRows>,
}

#[derive(Default)]
struct DirtyRows {
    rowids: HashSet<i64>,
    /// More rows were written than `limit`: reload instead of refreshing.
    overflow: bool,
    limit: usize,
}

impl DirtyRows {
    fn mark(&mut self, rowid: i64) {
        if self.overflow {
            return;
        }
        if self.rowids.len() >= self.limit {
            self.overflow = true;
            self.rowids = HashSet::new();
        } else {
            self.rowids.insert(rowid);
        }
    }
}

#[derive(Default)]
struct State {
    schema_version: Option<i64>,
    matrices: HashMap<String, Matrix>,
}

fn lock(m: &Mutex<Dirty>) -> MutexGuard<'_, Dirty> {
    // Nothing panics while holding the lock, and the sets stay valid even
    // if something did: poisoning carries no meaning here.
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

impl SearchCache {
    /// Makes an empty cache and registers the update hook on `conn` that
    /// feeds it. The connection has one update hook: nothing else in the
    /// store may install another.
    pub(crate) fn attach(conn: &Connection) -> SearchCache {
        let dirty = Arc::new(Mutex::new(Dirty::default()));
        let hook = Arc::clone(&dirty);
        conn.update_hook(Some(move |_: Action, db: &str, table: &str, rowid: i64| {
            // Our own tables (the insert log, the clock) are never collections.
            if db == "main" && !table.starts_with("quiver_") {
                if let Some(rows) = lock(&hook).tables.get_mut(table) {
                    rows.mark(rowid);
                }
            }
        }));
        SearchCache {
            dirty,
            state: RefCell::new(State::default()),
        }
    }

    /// Brings the matrix of collection `t` up to date and runs `f` on it.
    fn with<T>(
        &self,
        conn: &Connection,
        t: &TableInfo,
        dim: usize,
        metric: Metric,
        f: impl FnOnce(&Matrix) -> T,
    ) -> Result<T> {
        let data_version: i64 = conn.query_row("PRAGMA data_version", [], |r| r.get(0))?;
        let schema_version: i64 = conn.query_row("PRAGMA schema_version", [], |r| r.get(0))?;
        let in_tx = !conn.is_autocommit();
        // Search runs no user code while the state is borrowed, so the
        // borrow cannot be taken twice.
        let mut state = self.state.borrow_mut();
        if state.schema_version != Some(schema_version) {
            state.matrices.clear();
            lock(&self.dirty).tables.clear();
            state.schema_version = Some(schema_version);
        }
        let name = &t.name;
        // Inside a transaction the rows stay marked: it may still roll back.
        let (rowids, overflow) = match lock(&self.dirty).tables.get_mut(name) {
            Some(d) if in_tx => (d.rowids.clone(), d.overflow),
            Some(d) => (
                std::mem::take(&mut d.rowids),
                std::mem::take(&mut d.overflow),
            ),
            None => (HashSet::new(), false),
        };
        let reload = match state.matrices.get(name) {
            None => true,
            Some(m) => {
                m.table_id != t.id
                    || m.dim != dim
                    || m.metric != metric
                    || m.data_version != data_version
                    || (m.provisional && !in_tx)
                    || overflow
            }
        };
        if reload {
            // Free the old matrix before building the new one.
            state.matrices.remove(name);
            lock(&self.dirty).tables.entry(name.clone()).or_default();
            let m = Matrix::load(conn, t, dim, metric, data_version)?;
            if let Some(d) = lock(&self.dirty).tables.get_mut(name) {
                d.limit = MIN_DIRTY_LIMIT.max(m.len() / 2);
            }
            state.matrices.insert(name.clone(), m);
        } else if !rowids.is_empty() {
            if let Some(m) = state.matrices.get_mut(name) {
                match m.refresh(conn, name, &rowids) {
                    Ok(touched) if in_tx => {
                        if let Some(d) = lock(&self.dirty).tables.get_mut(name) {
                            d.rowids.extend(touched);
                        }
                    }
                    Ok(_) => {}
                    Err(e) => {
                        // Half-refreshed: start over next time.
                        state.matrices.remove(name);
                        return Err(e);
                    }
                }
            }
        }
        let m = state
            .matrices
            .get(name)
            .ok_or_else(|| StoreError::Corrupt(format!("search cache of {name:?} went missing")))?;
        Ok(f(m))
    }
}

impl Store {
    /// The `k` records of `collection` nearest to `query` among those whose
    /// metadata passes `filter`, nearest first (ties by id ascending). Exact:
    /// every row is compared. Fewer than `k` come back only when fewer match.
    ///
    /// Distances, smaller is closer: cosine `1 - cos(q, v)` (1 when either
    /// vector is zero), l2 the Euclidean distance (not squared), dot
    /// `-(q · v)`. See [`Filter`] for the filter language.
    ///
    /// The first search of a collection loads it into memory (about
    /// `4 × dim + 250` bytes a row: 1.8 to 2 GB per million vectors of dim
    /// 384); later ones refresh only the rows written since, whether by
    /// this store (local writes, [`Store::apply`]) or by other processes.
    ///
    /// A query of the wrong dimension is refused with
    /// [`StoreError::Dimension`], one holding NaN or an infinity with
    /// [`StoreError::NotFinite`].
    pub fn search(
        &self,
        collection: &str,
        query: &[f32],
        k: usize,
        filter: Option<&Filter>,
    ) -> Result<Vec<Hit>> {
        let (t, dim, metric) = self.search_target(collection)?;
        if query.len() != dim {
            return Err(StoreError::Dimension {
                collection: t.name,
                expected: dim,
                got: query.len(),
            });
        }
        check_finite(query)?;
        let found: Vec<(i64, String, f32)> =
            self.search.with(&self.conn, &t, dim, metric, |m| {
                let compiled = filter.map(|f| f.compile(m.keys()));
                scan::top_k(m, query, k, compiled.as_ref())
                    .into_iter()
                    .map(|c| (m.rowid(c.slot as usize), c.id.to_string(), c.distance))
                    .collect()
            })?;
        let mut stmt = self.conn.prepare_cached(&format!(
            "SELECT metadata, content FROM {} WHERE rowid = ?1",
            quote(&t.name)
        ))?;
        found
            .into_iter()
            .map(|(rowid, id, distance)| {
                let (metadata, content): (Option<String>, Option<String>) =
                    stmt.query_row([rowid], |r| Ok((r.get(0)?, r.get(1)?)))?;
                let metadata = match metadata {
                    Some(text) => serde_json::from_str(&text).map_err(|e| {
                        StoreError::Corrupt(format!("metadata of {:?} in {:?}: {e}", id, t.name))
                    })?,
                    None => serde_json::Value::Object(Default::default()),
                };
                Ok(Hit {
                    id,
                    distance,
                    metadata,
                    content,
                })
            })
            .collect()
    }

    /// Brings the search cache of `collection` up to date (loading it on
    /// first use) and reports its size.
    pub fn search_stats(&self, collection: &str) -> Result<SearchStats> {
        let (t, dim, metric) = self.search_target(collection)?;
        self.search
            .with(&self.conn, &t, dim, metric, |m| SearchStats {
                rows: m.len(),
                dim,
                matrix_bytes: m.matrix_bytes(),
                total_bytes: m.total_bytes(),
            })
    }

    fn search_target(&self, collection: &str) -> Result<(TableInfo, usize, Metric)> {
        let t = self.collection(collection)?;
        let dim = t.dim.ok_or_else(|| {
            StoreError::Corrupt(format!("collection {:?} has no dimension", t.name))
        })?;
        let metric = t
            .metric
            .ok_or_else(|| StoreError::Corrupt(format!("collection {:?} has no metric", t.name)))?;
        Ok((t, dim, metric))
    }
}

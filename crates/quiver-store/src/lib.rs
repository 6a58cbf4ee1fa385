//! SQLite persistence of quiverdb.
//!
//! A [`Store`] is one SQLite file in WAL mode. Replicated tables are tracked
//! by SQL triggers, so writes from any SQLite client are captured; remote
//! changes are merged in by [`Store::apply`]; [`Store::changes_since`]
//! streams what a peer lacks.

mod apply;
mod catalog;
mod changes;
mod collections;
mod conflicts;
mod error;
mod events;
mod memory;
mod names;
mod rowstate;
mod schema;
mod search;
pub(crate) mod sqlvalue;
mod status;
mod sync_state;
mod triggers;

use std::path::{Path, PathBuf};
use std::time::{SystemTime, UNIX_EPOCH};

use quiver_core::{Hlc, HlcClock, SiteId, DEFAULT_MAX_DRIFT_MS};
use rusqlite::{Connection, OpenFlags};

pub use apply::ApplyReport;
pub use catalog::{ColumnInfo, TableInfo, TableKind};
pub use changes::{ChangeStream, StreamLimits};
pub use collections::{check_record, CollectionSpec, Metric, Record};
pub use conflicts::{Conflict, ConflictVersion, Resolution};
pub use error::{Result, StoreError};
pub use events::StoreEvent;
pub use memory::MEMORY_SHARD;
pub use names::DEFAULT_SHARD;
pub use schema::FORMAT_VERSION;
pub use search::{Filter, Hit, SearchStats};
pub use sqlvalue::to_json as value_to_json;
pub use status::{ShardStatus, StoreStatus, TableStatus};
pub use sync_state::{PeerCursor, PeerRecord, SyncState, TokenRecord};

/// Column names and rows of a query.
pub type SqlRows = (Vec<String>, Vec<Vec<quiver_core::Value>>);

/// Milliseconds since the Unix epoch from the system clock.
pub fn wall_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

/// One quiverdb store: a SQLite file and this process's connection to it.
pub struct Store {
    conn: Connection,
    path: PathBuf,
    site: SiteId,
    clock: HlcClock,
    events: events::EventHub,
    /// Moves when this store's data changes in a way peers should hear of.
    changes: u64,
    /// The store's revision as last seen by this handle, to tell other
    /// processes' commits from our own.
    revision: (i64, f64),
    search: search::SearchCache,
}

impl Store {
    /// Creates a new store at `path` (the file may exist as a plain SQLite
    /// database, but must not hold a store yet).
    pub fn init(path: impl AsRef<Path>) -> Result<Store> {
        let path = path.as_ref();
        let mut conn = Connection::open(path)?;
        if schema::format_of(&conn)?.is_some() {
            return Err(StoreError::AlreadyInitialised {
                path: path.to_path_buf(),
            });
        }
        schema::configure(&conn)?;
        schema::migrate(&mut conn, path, 0)?;
        let site = SiteId::from_bytes(rand::random());
        conn.execute(
            "INSERT INTO quiver_meta(key, value) VALUES ('site_id', ?1), ('created_at', ?2)",
            rusqlite::params![site.as_bytes().to_vec(), wall_ms() as i64],
        )?;
        conn.execute(
            "INSERT INTO quiver_sites(ix, site_id) VALUES (0, ?1)",
            [site.as_bytes().to_vec()],
        )?;
        Self::from_conn(conn, path)
    }

    /// Opens an existing store, migrating it forward if it is older. A file
    /// that is not a store, or of a newer format, is refused untouched.
    pub fn open(path: impl AsRef<Path>) -> Result<Store> {
        let path = path.as_ref();
        if !path.exists() {
            return Err(StoreError::Missing {
                path: path.to_path_buf(),
            });
        }
        // Look before touching: read-only first, so a foreign file is not
        // switched to WAL mode or otherwise changed.
        let probe =
            Connection::open_with_flags(path, OpenFlags::SQLITE_OPEN_READ_ONLY).map_err(|_| {
                StoreError::NotAStore {
                    path: path.to_path_buf(),
                }
            })?;
        let format = match schema::format_of(&probe) {
            Ok(Some(f)) => f,
            Ok(None) | Err(_) => {
                return Err(StoreError::NotAStore {
                    path: path.to_path_buf(),
                })
            }
        };
        drop(probe);
        if format > FORMAT_VERSION {
            return Err(StoreError::NewerFormat {
                path: path.to_path_buf(),
                found: format,
                supported: FORMAT_VERSION,
            });
        }
        let mut conn = Connection::open(path)?;
        schema::configure(&conn)?;
        schema::migrate(&mut conn, path, format)?;
        Self::from_conn(conn, path)
    }

    fn from_conn(conn: Connection, path: &Path) -> Result<Store> {
        let bytes: Vec<u8> = conn.query_row(
            "SELECT value FROM quiver_meta WHERE key = 'site_id'",
            [],
            |r| r.get(0),
        )?;
        let site = SiteId::from_slice(&bytes)
            .ok_or_else(|| StoreError::Corrupt("site id is not 16 bytes".into()))?;
        let floor: i64 = conn.query_row("SELECT hlc_floor FROM quiver_state", [], |r| r.get(0))?;
        // Register the pure-SQL helpers nothing depends on; triggers use only
        // built-in SQL so that any SQLite client can write.
        let search = search::SearchCache::attach(&conn);
        let mut store = Store {
            conn,
            path: path.to_path_buf(),
            site,
            clock: HlcClock::new(Hlc::from_i64(floor), DEFAULT_MAX_DRIFT_MS),
            events: events::EventHub::default(),
            changes: 0,
            revision: (0, 0.0),
            search,
        };
        store.close_open_version()?;
        store.revision = store.read_revision()?;
        Ok(store)
    }

    /// This replica's site id.
    pub fn site_id(&self) -> SiteId {
        self.site
    }

    /// The file this store lives in.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The underlying connection, for reads and writes outside quiverdb's
    /// API. Writes to replicated tables through it are tracked like any other.
    pub fn connection(&self) -> &Connection {
        &self.conn
    }

    /// Sets how far ahead of the local wall clock a remote stamp may be.
    pub fn set_max_clock_drift_ms(&mut self, ms: u64) {
        self.clock = HlcClock::new(self.clock.last(), ms);
    }

    /// The node name set at init, if any.
    pub fn node_name(&self) -> Result<Option<String>> {
        self.meta("node_name")
    }

    pub fn set_node_name(&mut self, name: &str) -> Result<()> {
        self.conn.execute(
            "INSERT INTO quiver_meta(key, value) VALUES ('node_name', ?1)
             ON CONFLICT(key) DO UPDATE SET value = excluded.value",
            [name],
        )?;
        Ok(())
    }

    fn meta(&self, key: &str) -> Result<Option<String>> {
        use rusqlite::OptionalExtension;
        Ok(self
            .conn
            .query_row("SELECT value FROM quiver_meta WHERE key = ?1", [key], |r| {
                r.get(0)
            })
            .optional()?)
    }

    /// Runs `f` in one write transaction as a local write: the clock ticks
    /// for it, triggers stamp its changes, and it gets its own db_version.
    pub(crate) fn local_write<T>(
        &mut self,
        f: impl FnOnce(&rusqlite::Transaction<'_>) -> Result<T>,
    ) -> Result<T> {
        let stamp = self.clock.now(wall_ms());
        let tx = self
            .conn
            .transaction_with_behavior(rusqlite::TransactionBehavior::Immediate)?;
        tx.execute(
            "UPDATE quiver_state SET hlc_floor = max(hlc_floor, ?1)",
            [stamp.as_i64()],
        )?;
        let out = f(&tx)?;
        let sealed = triggers::close_open_version(&tx)?;
        tx.commit()?;
        if sealed {
            self.changes += 1;
        }
        self.revision = self.read_revision()?;
        self.events.emit_local_commit();
        Ok(out)
    }

    /// Local versions sealed and remote versions received, in one value.
    fn read_revision(&self) -> Result<(i64, f64)> {
        Ok(self.conn.query_row(
            "SELECT (SELECT dbv FROM quiver_state), (SELECT total(dbv) FROM quiver_vv)",
            [],
            |r| Ok((r.get(0)?, r.get(1)?)),
        )?)
    }

    /// Notices what other connections committed: seals their captured
    /// writes and moves the change counter if the store gained versions
    /// (local writes, or remote changes applied by another process).
    pub fn notice_external_changes(&mut self) -> Result<bool> {
        self.close_open_version()?;
        let now = self.read_revision()?;
        if now != self.revision {
            let (local, remote) = (now.0 != self.revision.0, now.1 != self.revision.1);
            self.revision = now;
            self.changes += 1;
            self.events
                .emit(StoreEvent::ExternalChange { local, remote });
            return Ok(true);
        }
        Ok(false)
    }

    /// A counter that moves whenever this store gains changes its peers
    /// lack: a local write, a remote change that took effect, or writes by
    /// another process sealed by [`Store::close_open_version`]. Live sync
    /// watches it.
    pub fn change_counter(&self) -> u64 {
        self.changes
    }

    /// Gives every change captured since the last close (for instance by
    /// another process writing the file) a db_version of its own, so it can
    /// be synced. Returns whether there was any.
    pub fn close_open_version(&mut self) -> Result<bool> {
        let tx = self
            .conn
            .transaction_with_behavior(rusqlite::TransactionBehavior::Immediate)?;
        let closed = triggers::close_open_version(&tx)?;
        tx.commit()?;
        if closed {
            self.changes += 1;
            self.revision = self.read_revision()?;
        }
        Ok(closed)
    }

    /// Moves captured inserts from the append-only log into the clock. Sync
    /// and conflict review do this themselves before reading; call it to
    /// pay that cost at a moment of your choosing. Returns whether anything
    /// was pending.
    pub fn fold_pending(&self) -> Result<bool> {
        triggers::fold_pending(&self.conn)
    }

    /// Runs SQL as a local write (any number of statements). Writes to
    /// replicated tables are tracked by the triggers.
    pub fn execute_sql(&mut self, sql: &str) -> Result<()> {
        self.local_write(|tx| Ok(tx.execute_batch(sql)?))
    }

    /// Runs SQL: a single read-only statement returns its column names and
    /// rows; anything else runs as a local write and returns `None`.
    pub fn run_sql(&mut self, sql: &str) -> Result<Option<SqlRows>> {
        let query = {
            let stmt = self.conn.prepare(sql)?;
            stmt.readonly() && stmt.column_count() > 0
        };
        if !query {
            self.execute_sql(sql)?;
            return Ok(None);
        }
        let mut stmt = self.conn.prepare(sql)?;
        let names: Vec<String> = stmt.column_names().iter().map(|s| s.to_string()).collect();
        let n = names.len();
        let rows = stmt
            .query_map([], |r| {
                (0..n)
                    .map(|i| r.get_ref(i).map(sqlvalue::from_ref))
                    .collect()
            })?
            .collect::<rusqlite::Result<Vec<Vec<_>>>>()?;
        Ok(Some((names, rows)))
    }
}

/// A read-only connection that tells when anyone commits to the store file
/// (`PRAGMA data_version`), for noticing writes by other processes.
pub struct FileWatcher {
    conn: Connection,
}

impl FileWatcher {
    pub fn open(path: impl AsRef<Path>) -> Result<FileWatcher> {
        let conn = Connection::open_with_flags(
            path,
            OpenFlags::SQLITE_OPEN_READ_ONLY | OpenFlags::SQLITE_OPEN_NO_MUTEX,
        )?;
        Ok(FileWatcher { conn })
    }

    /// Changes whenever another connection commits.
    pub fn data_version(&self) -> Result<i64> {
        Ok(self
            .conn
            .query_row("PRAGMA data_version", [], |r| r.get(0))?)
    }
}

//! SQLite persistence of quiverdb.
//!
//! A [`Store`] is one SQLite file in WAL mode. Replicated tables are tracked
//! by SQL triggers, so writes from any SQLite client are captured; remote
//! changes are merged in by [`Store::apply`]; [`Store::changes_since`]
//! streams what a peer lacks.

mod apply;
mod catalog;
mod changes;
mod clone;
mod collections;
mod compact;
mod conflicts;
mod error;
mod events;
mod evolve;
mod memory;
mod names;
mod references;
mod resurrect;
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
pub use catalog::{ColumnDef, TableInfo, TableKind, TableOptions};
pub use changes::{ChangeStream, StreamLimits};
pub use collections::{
    check_json_text, check_record, CollectionSpec, Metric, Record, RecordColumns,
};
pub use compact::{
    BeyondHorizon, ClockStats, CompactOptions, CompactReport, HeldBy, ShardCompaction,
    DEFAULT_PEER_HORIZON_DAYS,
};
pub use conflicts::{Conflict, ConflictVersion, Resolution};
pub use error::{Result, StoreError};
pub use events::{StoreEvent, TableChanges, KEYS_LISTED};
pub use evolve::{Keep, SchemaConflict, SchemaResolution};
pub use memory::MEMORY_SHARD;
pub use names::DEFAULT_SHARD;
pub use references::Dangling;
pub use schema::FORMAT_VERSION;
pub use search::{Filter, Hit, SearchStats};
pub use sqlvalue::to_json as value_to_json;
pub use status::{AckStatus, ShardStatus, StoreStatus, TableStatus};
pub use sync_state::{PeerAck, PeerCursor, PeerRecord, SyncState, TokenRecord};

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
    /// SQLite's schema cookie when this handle last compared the live
    /// tables with the catalog (see [`Store::refresh_schema`]).
    schema_seen: std::cell::Cell<i64>,
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
        // Before the first table: compaction gives pages back by
        // incremental vacuum, which needs this set while the file is empty.
        conn.pragma_update(None, "auto_vacuum", "INCREMENTAL")?;
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
            // A WAL store whose side files cannot be made: a folder this
            // user may not write.
            Err(StoreError::Sqlite(e)) if cannot_make_wal_files(&e) => {
                return Err(StoreError::ReadOnly {
                    path: path.to_path_buf(),
                })
            }
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
        let read_only = || StoreError::ReadOnly {
            path: path.to_path_buf(),
        };
        let mut conn = Connection::open(path)?;
        // SQLite falls back to reading a file it may not write: say so now,
        // not at the first write.
        if triggers::read_only(&conn)? {
            return Err(read_only());
        }
        let prepared =
            schema::configure(&conn).and_then(|_| schema::migrate(&mut conn, path, format));
        match prepared {
            // WAL needs its side files beside the store: a folder this user
            // may not write refuses them.
            Err(StoreError::Sqlite(e))
                if matches!(
                    e.sqlite_error_code(),
                    Some(rusqlite::ErrorCode::ReadOnly | rusqlite::ErrorCode::CannotOpen)
                ) =>
            {
                return Err(read_only())
            }
            other => other?,
        }
        Self::from_conn(conn, path)
    }

    /// Opens a store for reading only, as a user who may not write its file
    /// or folder can: nothing is migrated, folded or otherwise written. A
    /// store of an older format is refused (it needs a writer to migrate).
    /// When the folder refuses WAL's side files and none exist (no writer
    /// has it open), the file is read as immutable.
    pub fn open_read_only(path: impl AsRef<Path>) -> Result<Store> {
        let path = path.as_ref();
        if !path.exists() {
            return Err(StoreError::Missing {
                path: path.to_path_buf(),
            });
        }
        let flags = OpenFlags::SQLITE_OPEN_READ_ONLY | OpenFlags::SQLITE_OPEN_NO_MUTEX;
        let conn = Connection::open_with_flags(path, flags)?;
        let side_files = ["-wal", "-shm"].iter().any(|ext| {
            let mut p = path.as_os_str().to_owned();
            p.push(ext);
            Path::new(&p).exists()
        });
        let conn = match schema::format_of(&conn) {
            // Immutable only when no writer has the file open (no side
            // files): with a WAL present it would miss its commits.
            Err(StoreError::Sqlite(e)) if cannot_make_wal_files(&e) && !side_files => {
                let uri = format!("file:{}?immutable=1", uri_path(path));
                Connection::open_with_flags(uri, flags | OpenFlags::SQLITE_OPEN_URI)?
            }
            _ => conn,
        };
        let format = match schema::format_of(&conn) {
            Ok(Some(f)) => f,
            Ok(None) | Err(_) => {
                return Err(StoreError::NotAStore {
                    path: path.to_path_buf(),
                })
            }
        };
        if format != FORMAT_VERSION {
            let (path, found, supported) = (path.to_path_buf(), format, FORMAT_VERSION);
            return Err(if format > FORMAT_VERSION {
                StoreError::NewerFormat {
                    path,
                    found,
                    supported,
                }
            } else {
                StoreError::NeedsMigration {
                    path,
                    found,
                    supported,
                }
            });
        }
        conn.busy_timeout(schema::BUSY_TIMEOUT)?;
        Self::from_conn(conn, path)
    }

    /// Whether this handle can write the store.
    pub fn is_read_only(&self) -> bool {
        triggers::read_only(&self.conn).unwrap_or(true)
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
            schema_seen: std::cell::Cell::new(-1),
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
        self.set_meta("node_name", name)
    }

    /// Keeps `value` under `key` in the store's own metadata (for example
    /// the daemon's coordinator statistics, which `status` shows). The
    /// store's identity (`site_id`, `created_at`) cannot be overwritten.
    pub fn set_meta(&mut self, key: &str, value: &str) -> Result<()> {
        if matches!(key, "site_id" | "created_at") {
            return Err(StoreError::InvalidValue(format!(
                "{key} is the store's own and cannot be set"
            )));
        }
        self.conn.execute(
            "INSERT INTO quiver_meta(key, value) VALUES (?1, ?2)
             ON CONFLICT(key) DO UPDATE SET value = excluded.value",
            [key, value],
        )?;
        Ok(())
    }

    pub(crate) fn meta(&self, key: &str) -> Result<Option<String>> {
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
        self.refresh_schema()?;
        let stamp = self.clock.now(wall_ms());
        let tx = self
            .conn
            .transaction_with_behavior(rusqlite::TransactionBehavior::Immediate)?;
        tx.execute(
            "UPDATE quiver_state SET hlc_floor = max(hlc_floor, ?1)",
            [stamp.as_i64()],
        )?;
        let before: i64 = tx.query_row("SELECT dbv FROM quiver_state", [], |r| r.get(0))?;
        let out = f(&tx)?;
        let sealed = triggers::close_open_version(&tx)?;
        tx.commit()?;
        if sealed {
            self.changes += 1;
        }
        self.revision = self.read_revision()?;
        if self.events.wanted() {
            // The write has committed: a failure to list its rows must not
            // turn it into an error.
            let changes =
                events::written_rows(&self.conn, before, self.revision.0).unwrap_or_else(|e| {
                    tracing::warn!("listing a commit's rows: {e}");
                    Vec::new()
                });
            self.events.emit(StoreEvent::LocalCommit {
                site: self.site.to_hex(),
                changes,
            });
        }
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
        let before = self.revision;
        // Sealing moves the counter and the revision itself; what counts
        // is the revision before it (a write by the `sqlite3` shell is
        // only sealed here).
        let sealed = self.close_open_version()?;
        let now = self.read_revision()?;
        if now == before {
            return Ok(false);
        }
        if !sealed {
            self.changes += 1;
        }
        self.revision = now;
        let changes = if self.events.wanted() {
            events::written_rows(&self.conn, before.0, now.0).unwrap_or_else(|e| {
                tracing::warn!("listing another process's rows: {e}");
                Vec::new()
            })
        } else {
            Vec::new()
        };
        self.events.emit(StoreEvent::ExternalChange {
            local: now.0 != before.0,
            remote: now.1 != before.1,
            site: self.site.to_hex(),
            changes,
        });
        Ok(true)
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
        if self.is_read_only() || !triggers::open_version_has_writes(&self.conn)? {
            return Ok(false);
        }
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

    /// Runs SQL, any number of statements, in order: each gives its column
    /// names and rows if it returns rows, `None` otherwise. Statements that
    /// only read run as they are (on a read-only store too); anything that
    /// writes makes the whole text one local write, tracked by the triggers.
    pub fn run_sql(&mut self, sql: &str) -> Result<Vec<Option<SqlRows>>> {
        self.run_sql_with(sql, &[])
    }

    /// [`Store::run_sql`] with `?` parameters bound in order; parameters go
    /// with a text of one statement.
    pub fn run_sql_with(
        &mut self,
        sql: &str,
        params: &[quiver_core::Value],
    ) -> Result<Vec<Option<SqlRows>>> {
        let reads_only = {
            let mut batch = rusqlite::Batch::new(&self.conn, sql);
            let mut all = true;
            // A statement that cannot be prepared yet (it needs an earlier
            // one run first) counts as a write.
            while let Ok(Some(stmt)) = batch.next() {
                all &= stmt.readonly();
            }
            all && batch.next().is_ok()
        };
        if reads_only {
            // Several queries read one snapshot.
            let tx = self.conn.transaction()?;
            let out = run_statements(&tx, sql, params)?;
            tx.commit()?;
            return Ok(out);
        }
        let out = self.local_write(|tx| run_statements(tx, sql, params))?;
        // A schema change made by this text is recorded now, not at the
        // next command.
        self.refresh_schema()?;
        Ok(out)
    }
}

/// Runs each statement of `sql` in turn, collecting the rows of those that
/// return some.
fn run_statements(
    conn: &Connection,
    sql: &str,
    params: &[quiver_core::Value],
) -> Result<Vec<Option<SqlRows>>> {
    let mut out = Vec::new();
    let mut batch = rusqlite::Batch::new(conn, sql);
    while let Some(mut stmt) = batch.next()? {
        if !params.is_empty() && !out.is_empty() {
            return Err(StoreError::InvalidValue(
                "parameters go with one statement; this text has several".into(),
            ));
        }
        if stmt.parameter_count() != params.len() {
            return Err(StoreError::InvalidValue(format!(
                "the statement takes {} parameters, {} were given",
                stmt.parameter_count(),
                params.len()
            )));
        }
        for (i, v) in params.iter().enumerate() {
            stmt.raw_bind_parameter(i + 1, sqlvalue::P(v))?;
        }
        if stmt.column_count() == 0 {
            stmt.raw_execute()?;
            out.push(None);
            continue;
        }
        let names: Vec<String> = stmt.column_names().iter().map(|s| s.to_string()).collect();
        let n = names.len();
        let mut rows = Vec::new();
        let mut cursor = stmt.raw_query();
        while let Some(r) = cursor.next()? {
            rows.push(
                (0..n)
                    .map(|i| r.get_ref(i).map(sqlvalue::from_ref))
                    .collect::<rusqlite::Result<Vec<_>>>()?,
            );
        }
        out.push(Some((names, rows)));
    }
    Ok(out)
}

/// Whether a read-only connection failed because WAL's side files
/// (`-shm`, `-wal`) neither exist nor can be made: SQLite answers
/// "attempt to write a readonly database" or "unable to open".
fn cannot_make_wal_files(e: &rusqlite::Error) -> bool {
    matches!(
        e.sqlite_error_code(),
        Some(rusqlite::ErrorCode::ReadOnly | rusqlite::ErrorCode::CannotOpen)
    )
}

/// A path as an SQLite URI path: the characters URIs reserve, escaped.
fn uri_path(path: &Path) -> String {
    let mut out = String::new();
    for c in path.to_string_lossy().chars() {
        match c {
            '%' | '?' | '#' | ' ' => out.push_str(&format!("%{:02X}", c as u32)),
            c => out.push(c),
        }
    }
    out
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

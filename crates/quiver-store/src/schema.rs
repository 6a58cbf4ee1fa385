//! The store's own tables, its format version and forward migrations.

use std::path::Path;

use rusqlite::{Connection, OptionalExtension};

use crate::{Result, StoreError};

/// The newest store format this build reads and writes.
pub const FORMAT_VERSION: i64 = 7;

/// Each entry migrates from format `i` to `i + 1`.
const MIGRATIONS: &[&str] = &[
    r#"
CREATE TABLE quiver_meta(key TEXT PRIMARY KEY, value) WITHOUT ROWID;
-- Local transaction counter (the open db_version), clock floor, and the
-- flag that keeps capture off while remote changes are applied.
CREATE TABLE quiver_state(
  id INTEGER PRIMARY KEY CHECK (id = 1),
  dbv INTEGER NOT NULL,
  hlc_floor INTEGER NOT NULL,
  applying INTEGER NOT NULL
);
INSERT INTO quiver_state(id, dbv, hlc_floor, applying) VALUES (1, 1, 0, 0);
-- Site ids by a small local index; 0 is this store.
CREATE TABLE quiver_sites(ix INTEGER PRIMARY KEY, site_id BLOB NOT NULL UNIQUE);
CREATE TABLE quiver_tables(
  id INTEGER PRIMARY KEY,
  name TEXT NOT NULL UNIQUE,
  shard TEXT NOT NULL,
  strategy TEXT NOT NULL,
  kind TEXT NOT NULL,
  pk TEXT NOT NULL,
  columns TEXT NOT NULL,
  dim INTEGER,
  metric TEXT,
  schema_version INTEGER NOT NULL DEFAULT 1,
  created_at INTEGER NOT NULL
);
-- Newest version of each cell. col '' is the row record: existence (causal
-- length cl) and every column without a row of its own. ctx: what the
-- version replaced; know: every version of the row seen (row record only).
CREATE TABLE quiver_clock(
  tbl INTEGER NOT NULL,
  pk NOT NULL,
  col TEXT NOT NULL,
  site INTEGER NOT NULL,
  dbv INTEGER NOT NULL,
  hlc INTEGER NOT NULL,
  cl INTEGER NOT NULL,
  ctx TEXT,
  know TEXT,
  PRIMARY KEY (tbl, pk, col)
) WITHOUT ROWID;
CREATE INDEX quiver_clock_version ON quiver_clock(tbl, site, dbv);
-- Concurrent versions kept side by side (merge, manual), with their values.
CREATE TABLE quiver_siblings(
  tbl INTEGER NOT NULL,
  pk NOT NULL,
  col TEXT NOT NULL,
  site INTEGER NOT NULL,
  dbv INTEGER NOT NULL,
  hlc INTEGER NOT NULL,
  cl INTEGER NOT NULL,
  ctx TEXT,
  value,
  PRIMARY KEY (tbl, pk, col, site, dbv)
) WITHOUT ROWID;
CREATE INDEX quiver_siblings_version ON quiver_siblings(tbl, site, dbv);
-- Per table and origin site: the version up to which this store holds it.
CREATE TABLE quiver_vv(
  tbl INTEGER NOT NULL,
  site INTEGER NOT NULL,
  dbv INTEGER NOT NULL,
  PRIMARY KEY (tbl, site)
) WITHOUT ROWID;
CREATE TABLE quiver_conflicts(
  id INTEGER PRIMARY KEY,
  tbl INTEGER NOT NULL,
  pk NOT NULL,
  col TEXT NOT NULL,
  strategy TEXT NOT NULL,
  detected_at INTEGER NOT NULL,
  versions TEXT NOT NULL,
  resolved_at INTEGER,
  resolution TEXT
);
CREATE INDEX quiver_conflicts_open ON quiver_conflicts(tbl, pk, col) WHERE resolved_at IS NULL;
CREATE TABLE quiver_peers(
  node_id TEXT PRIMARY KEY,
  addr TEXT NOT NULL,
  shards TEXT NOT NULL,
  token TEXT,
  pin TEXT,
  last_contact INTEGER,
  status TEXT NOT NULL DEFAULT 'offline',
  last_error TEXT
);
CREATE TABLE quiver_peer_cursors(
  peer TEXT NOT NULL,
  shard TEXT NOT NULL,
  received TEXT,
  sent TEXT,
  updated_at INTEGER NOT NULL,
  PRIMARY KEY (peer, shard)
);
CREATE TABLE quiver_sync_state(
  id INTEGER PRIMARY KEY CHECK (id = 1),
  last_sync INTEGER,
  total_sent INTEGER NOT NULL DEFAULT 0,
  total_received INTEGER NOT NULL DEFAULT 0,
  sync_count INTEGER NOT NULL DEFAULT 0,
  last_error TEXT
);
INSERT INTO quiver_sync_state(id) VALUES (1);
"#,
    r#"
-- Access tokens, kept only as SHA-256 hashes; scoped to shards (empty:
-- all) and to read-only or read-write.
CREATE TABLE quiver_tokens(
  id INTEGER PRIMARY KEY,
  hash TEXT NOT NULL UNIQUE,
  shards TEXT NOT NULL,
  read_only INTEGER NOT NULL,
  label TEXT,
  created_at INTEGER NOT NULL
);
"#,
    r#"
-- Inserts captured but not yet moved into quiver_clock, in the order they
-- happened (see triggers.rs). Every table's triggers are replaced too.
CREATE TABLE quiver_pending(
  seq INTEGER PRIMARY KEY,
  tbl INTEGER NOT NULL,
  pk NOT NULL,
  dbv INTEGER NOT NULL,
  hlc INTEGER NOT NULL
);
"#,
    r#"
-- Columns dropped on this replica (what peers send for them is ignored).
ALTER TABLE quiver_tables ADD COLUMN dropped TEXT NOT NULL DEFAULT '[]';
-- Changes whose table or column this replica does not know yet, kept
-- until the schema that explains them arrives (col '' for a row record).
CREATE TABLE quiver_held(
  seq INTEGER PRIMARY KEY,
  shard TEXT NOT NULL,
  tbl TEXT NOT NULL,
  col TEXT NOT NULL,
  pk NOT NULL,
  site BLOB NOT NULL,
  dbv INTEGER NOT NULL,
  change TEXT NOT NULL,
  reason TEXT NOT NULL,
  held_at INTEGER NOT NULL,
  UNIQUE (tbl, pk, col, site, dbv)
);
-- A column a peer defines with another shape than this replica.
CREATE TABLE quiver_schema_conflicts(
  tbl TEXT NOT NULL,
  col TEXT NOT NULL,
  shard TEXT NOT NULL,
  ours TEXT NOT NULL,
  theirs TEXT NOT NULL,
  peer TEXT,
  detected_at INTEGER NOT NULL,
  PRIMARY KEY (tbl, col)
);
"#,
    r#"
-- Acknowledgements: each peer's version vector of a shard (JSON, site id
-- in hex to version) as it stood at the end of the last completed sync
-- with it, when, and the peer's node name then.
CREATE TABLE quiver_acks(
  site TEXT NOT NULL,
  shard TEXT NOT NULL,
  node TEXT NOT NULL,
  vv TEXT NOT NULL,
  at INTEGER NOT NULL,
  PRIMARY KEY (site, shard)
);
"#,
    r#"
-- Snapshots received in part: per table, the clock key up to which every
-- row has arrived and the versions the sender held (JSON), as the last
-- committed batch of the snapshot marked them. Handed back to resume.
CREATE TABLE quiver_snapshots(
  tbl INTEGER PRIMARY KEY,
  after NOT NULL,
  vv TEXT NOT NULL
);
"#,
    r#"
-- Per table, the highest version of each origin (JSON) whose tombstones
-- compaction purged: a peer holding less may lack a delete, and gets a
-- snapshot instead of history. cl: the highest causal length purged, so
-- that a row inserted here again starts a life past it.
CREATE TABLE quiver_compacted(
  tbl INTEGER PRIMARY KEY,
  vv TEXT NOT NULL,
  cl INTEGER NOT NULL DEFAULT 0
);
-- A snapshot received by a replica that already held rows of the table:
-- the keys it brought, so that at its end the rows it did not bring,
-- deleted and compacted at the source, go here too.
ALTER TABLE quiver_snapshots ADD COLUMN sweep INTEGER NOT NULL DEFAULT 0;
CREATE TABLE quiver_snapshot_seen(
  tbl INTEGER NOT NULL,
  pk NOT NULL,
  PRIMARY KEY (tbl, pk)
) WITHOUT ROWID;
-- `concurrent` (two writes to a cell) or `resurrection` (a write to a row
-- deleted and compacted away meanwhile).
ALTER TABLE quiver_conflicts ADD COLUMN kind TEXT NOT NULL DEFAULT 'concurrent';
-- Of a resurrection: the row the write would have brought back (MessagePack
-- of column to value), written again if the write is kept.
ALTER TABLE quiver_conflicts ADD COLUMN row BLOB;
-- Acknowledgements per table (JSON: table to version vector), beside
-- their meet: a site that never wrote to one table must not hide what a
-- peer holds of it in the others.
ALTER TABLE quiver_acks ADD COLUMN tables TEXT;
"#,
];

/// Formats from which the capture triggers changed: opening an older store
/// replaces every table's triggers with this build's.
const TRIGGERS_CHANGED_AT: i64 = 4;

/// How long a statement waits for another connection's write lock.
pub(crate) const BUSY_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(5);

/// Pragmas set on every connection we open.
pub(crate) fn configure(conn: &Connection) -> Result<()> {
    conn.busy_timeout(BUSY_TIMEOUT)?;
    conn.pragma_update(None, "journal_mode", "WAL")?;
    conn.pragma_update(None, "synchronous", "NORMAL")?;
    conn.pragma_update(None, "foreign_keys", "ON")?;
    conn.pragma_update(None, "cache_size", -65536)?;
    conn.pragma_update(None, "wal_autocheckpoint", 10000)?;
    conn.pragma_update(
        None,
        "journal_size_limit",
        crate::apply::WAL_CHECKPOINT_BYTES as i64,
    )?;
    Ok(())
}

/// The format of an opened file, or `None` if it holds no quiverdb store.
pub(crate) fn format_of(conn: &Connection) -> Result<Option<i64>> {
    let has_meta: bool = conn.query_row(
        "SELECT count(*) FROM sqlite_master WHERE type = 'table' AND name = 'quiver_meta'",
        [],
        |r| r.get::<_, i64>(0).map(|n| n > 0),
    )?;
    if !has_meta {
        return Ok(None);
    }
    let v: Option<i64> = conn
        .query_row(
            "SELECT value FROM quiver_meta WHERE key = 'format'",
            [],
            |r| r.get(0),
        )
        .optional()?;
    Ok(Some(v.unwrap_or(0)))
}

/// Brings a store of format `from` up to [`FORMAT_VERSION`], in one transaction.
pub(crate) fn migrate(conn: &mut Connection, path: &Path, from: i64) -> Result<()> {
    if from > FORMAT_VERSION {
        return Err(StoreError::NewerFormat {
            path: path.to_path_buf(),
            found: from,
            supported: FORMAT_VERSION,
        });
    }
    if from == FORMAT_VERSION {
        return Ok(());
    }
    let tx = conn.transaction()?;
    for (i, sql) in MIGRATIONS.iter().enumerate().skip(from as usize) {
        tx.execute_batch(sql)?;
        tx.execute(
            "INSERT INTO quiver_meta(key, value) VALUES ('format', ?1)
             ON CONFLICT(key) DO UPDATE SET value = excluded.value",
            [i as i64 + 1],
        )?;
    }
    if from > 0 && from < TRIGGERS_CHANGED_AT {
        for t in crate::catalog::load_all(&tx)? {
            // A registered table dropped behind our back has no triggers
            // to replace; it must not make the store unopenable.
            let exists: bool = tx.query_row(
                "SELECT count(*) FROM sqlite_master WHERE type = 'table' AND name = ?1",
                [&t.name],
                |r| r.get::<_, i64>(0).map(|n| n > 0),
            )?;
            if exists {
                crate::triggers::reinstall(&tx, &t)?;
            }
        }
    }
    tx.commit()?;
    Ok(())
}

//! Whole-store copies for `quiver clone`: a consistent copy of a store
//! (SQLite's `VACUUM INTO`, which reads one snapshot and works on a
//! read-only connection), and turning a received copy into a replica of
//! its own.

use std::path::Path;

use quiver_core::SiteId;
use rusqlite::{params, Connection};

use crate::{schema, triggers, wall_ms, Result, Store, StoreError};

impl Store {
    /// Writes a consistent copy of the whole store to `dest` (which must
    /// not exist), from one read snapshot; writers go on meanwhile.
    pub fn backup_into(&self, dest: &Path) -> Result<()> {
        if dest.exists() {
            return Err(StoreError::AlreadyExists(dest.display().to_string()));
        }
        self.conn
            .execute("VACUUM INTO ?1", [dest.to_string_lossy().as_ref()])?;
        Ok(())
    }

    /// Readies a copy made by [`Store::backup_into`] to leave this store:
    /// returns `false` (and leaves it be) when writes by other connections
    /// were still in the open version when it was taken, since a clone
    /// would count them as seen yet miss what that version still gains;
    /// the caller seals and copies again. Otherwise removes the secrets
    /// that never leave a store (token hashes, peers with their tokens,
    /// cursors, statistics), overwriting their pages.
    pub fn prepare_copy(copy: &Path) -> Result<bool> {
        let conn = Connection::open(copy)?;
        let unsealed: bool = conn.query_row(
            "SELECT EXISTS (SELECT 1 FROM quiver_pending p, quiver_state s WHERE p.dbv = s.dbv)
                 OR EXISTS (SELECT 1 FROM quiver_clock c, quiver_state s WHERE c.site = 0 AND c.dbv = s.dbv)
                 OR EXISTS (SELECT 1 FROM quiver_siblings c, quiver_state s WHERE c.site = 0 AND c.dbv = s.dbv)",
            [],
            |r| r.get(0),
        )?;
        if unsealed {
            return Ok(false);
        }
        conn.pragma_update(None, "secure_delete", "ON")?;
        conn.execute_batch(
            "DELETE FROM quiver_tokens; DELETE FROM quiver_peers; DELETE FROM quiver_peer_cursors;
             DELETE FROM quiver_acks;
             DELETE FROM quiver_meta WHERE key = 'coordinator_stats';",
        )?;
        Ok(true)
    }

    /// Makes the store copy at `copy` a new replica at `dest`: a fresh site
    /// id, the source's own versions re-attributed to the source's site
    /// (so the new replica claims them as received from it, keeping the
    /// source's version vector), and none of the source's tokens, peers,
    /// cursors, sync totals or node name. `dest` must not exist; the copy
    /// is moved there only once it is a replica.
    pub fn adopt_clone(copy: &Path, dest: &Path) -> Result<Store> {
        if dest.exists() {
            return Err(StoreError::AlreadyInitialised {
                path: dest.to_path_buf(),
            });
        }
        let mut conn = Connection::open(copy)?;
        // The file came over the network: none of its own SQL runs while it
        // is made a replica, and it must be a sound database.
        conn.set_db_config(
            rusqlite::config::DbConfig::SQLITE_DBCONFIG_ENABLE_TRIGGER,
            false,
        )?;
        conn.set_db_config(rusqlite::config::DbConfig::SQLITE_DBCONFIG_DEFENSIVE, true)?;
        conn.pragma_update(None, "trusted_schema", "OFF")?;
        let check: String = conn.query_row("PRAGMA quick_check", [], |r| r.get(0))?;
        if check != "ok" {
            return Err(StoreError::Corrupt(format!(
                "the received copy fails SQLite's check: {check}"
            )));
        }
        let format = schema::format_of(&conn)?.ok_or_else(|| StoreError::NotAStore {
            path: copy.to_path_buf(),
        })?;
        schema::configure(&conn)?;
        schema::migrate(&mut conn, copy, format)?;
        let tx = conn.transaction()?;
        triggers::fold_pending(&tx)?;
        let source: Vec<u8> =
            tx.query_row("SELECT site_id FROM quiver_sites WHERE ix = 0", [], |r| {
                r.get(0)
            })?;
        SiteId::from_slice(&source)
            .ok_or_else(|| StoreError::Corrupt("site id is not 16 bytes".into()))?;
        let mine = SiteId::from_bytes(rand::random());
        tx.execute(
            "UPDATE quiver_sites SET site_id = ?1 WHERE ix = 0",
            [mine.as_bytes().to_vec()],
        )?;
        tx.execute("INSERT INTO quiver_sites(site_id) VALUES (?1)", [source])?;
        let ix = tx.last_insert_rowid();
        let key = format!("$.\"{ix}\"");
        // Versions written at the source are the source's, not this site's.
        for table in ["quiver_clock", "quiver_siblings"] {
            tx.execute(
                &format!("UPDATE {table} SET site = ?1 WHERE site = 0"),
                [ix],
            )?;
            tx.execute(
                &format!(
                    "UPDATE {table} SET ctx = json_set(json_remove(ctx, '$.\"0\"'), ?1, json_extract(ctx, '$.\"0\"'))
                     WHERE ctx IS NOT NULL AND json_extract(ctx, '$.\"0\"') IS NOT NULL"
                ),
                [&key],
            )?;
        }
        tx.execute(
            "UPDATE quiver_clock SET know = json_set(json_remove(know, '$.\"0\"'), ?1, json_extract(know, '$.\"0\"'))
             WHERE know IS NOT NULL AND json_extract(know, '$.\"0\"') IS NOT NULL",
            [&key],
        )?;
        // What the source held of itself (every sealed version), per table.
        tx.execute(
            "INSERT INTO quiver_vv(tbl, site, dbv)
             SELECT id, ?1, (SELECT dbv FROM quiver_state) - 1 FROM quiver_tables
             WHERE (SELECT dbv FROM quiver_state) > 1",
            [ix],
        )?;
        tx.execute("UPDATE quiver_state SET dbv = 1, applying = 0", [])?;
        for sql in [
            "DELETE FROM quiver_tokens",
            "DELETE FROM quiver_peers",
            "DELETE FROM quiver_peer_cursors",
            "DELETE FROM quiver_acks",
            "UPDATE quiver_sync_state SET last_sync = NULL, total_sent = 0, total_received = 0, sync_count = 0, last_error = NULL",
            "DELETE FROM quiver_meta WHERE key IN ('node_name', 'coordinator_stats')",
        ] {
            tx.execute(sql, [])?;
        }
        tx.execute(
            "UPDATE quiver_meta SET value = ?1 WHERE key = 'site_id'",
            [mine.as_bytes().to_vec()],
        )?;
        tx.execute(
            "UPDATE quiver_meta SET value = ?1 WHERE key = 'created_at'",
            params![wall_ms() as i64],
        )?;
        // No trigger of the copy's may sit on quiverdb's own tables; the
        // replicated tables get this build's capture triggers.
        let foreign: Vec<String> = tx
            .prepare(
                "SELECT name FROM sqlite_master WHERE type = 'trigger' AND
                   (substr(tbl_name, 1, 7) = 'quiver_' OR substr(name, 1, 7) = 'quiver_')",
            )?
            .query_map([], |r| r.get(0))?
            .collect::<rusqlite::Result<_>>()?;
        for name in foreign {
            tx.execute_batch(&format!(
                "DROP TRIGGER IF EXISTS {}",
                crate::names::quote(&name)
            ))?;
        }
        for t in crate::catalog::load_all(&tx)? {
            triggers::install(&tx, &t)?;
        }
        tx.commit()?;
        drop(conn);
        std::fs::rename(copy, dest).map_err(|e| {
            StoreError::Corrupt(format!("moving the copy to {}: {e}", dest.display()))
        })?;
        Store::open(dest).inspect_err(|_| {
            // A failed clone leaves nothing at `dest`.
            let _ = std::fs::remove_file(dest);
        })
    }
}

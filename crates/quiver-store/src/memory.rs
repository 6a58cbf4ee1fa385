//! The agent-memory preset: AgentDB's episodes, skills and edges as
//! replicated tables of the `memory` shard.

use quiver_core::{OnDelete, Reference, Strategy};

use crate::catalog::{self, TableInfo, TableKind};
use crate::{Result, Store, StoreError};

/// The shard holding agent memory.
pub const MEMORY_SHARD: &str = "memory";

const DDL: &str = "
CREATE TABLE IF NOT EXISTS episodes(
  id TEXT PRIMARY KEY NOT NULL,
  task TEXT NOT NULL,
  input TEXT,
  output TEXT,
  critique TEXT,
  reward REAL,
  success INTEGER,
  embedding F32_BLOB,
  created INTEGER NOT NULL
);
CREATE TABLE IF NOT EXISTS skills(
  id TEXT PRIMARY KEY NOT NULL,
  name TEXT NOT NULL,
  description TEXT,
  code TEXT,
  success_rate REAL,
  uses INTEGER NOT NULL DEFAULT 0,
  embedding F32_BLOB
);
CREATE TABLE IF NOT EXISTS edges(
  id TEXT PRIMARY KEY NOT NULL,
  from_id TEXT NOT NULL,
  to_id TEXT NOT NULL,
  relation TEXT NOT NULL,
  weight REAL
);
";

/// The preset's tables, in the order the seed's sync types name them.
pub const MEMORY_TABLES: [&str; 3] = ["episodes", "skills", "edges"];

/// Edges join episodes: an edge whose episode a merge deletes goes too.
fn options(table: &str) -> catalog::TableOptions {
    let episode = || Reference {
        table: "episodes".into(),
        column: "id".into(),
        on_delete: OnDelete::Cascade,
    };
    match table {
        "edges" => catalog::TableOptions {
            references: vec![("from_id".into(), episode()), ("to_id".into(), episode())],
            ..Default::default()
        },
        _ => catalog::TableOptions::default(),
    }
}

impl Store {
    /// Creates the agent-memory tables and registers them in the `memory`
    /// shard. Running it again is refused rather than silently repeated.
    pub fn init_memory(&mut self) -> Result<Vec<TableInfo>> {
        if catalog::load(&self.conn, "episodes")?.is_some() {
            return Err(StoreError::AlreadyExists(
                "agent memory (episodes, skills, edges)".into(),
            ));
        }
        self.local_write(|tx| {
            tx.execute_batch(DDL)?;
            MEMORY_TABLES
                .iter()
                .map(|t| {
                    catalog::register(
                        tx,
                        t,
                        MEMORY_SHARD,
                        Strategy::Lww,
                        TableKind::Table,
                        None,
                        None,
                        &options(t),
                    )
                })
                .collect()
        })
    }
}

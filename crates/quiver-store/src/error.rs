use std::path::PathBuf;

use thiserror::Error;

/// Errors of the store. Each says what was wrong and, where it helps, what to do.
#[derive(Debug, Error)]
pub enum StoreError {
    #[error(transparent)]
    Sqlite(#[from] rusqlite::Error),
    #[error(transparent)]
    Core(#[from] quiver_core::CoreError),
    #[error(
        "{path} is not a quiverdb store (no quiver_meta table); create one with `quiver init`"
    )]
    NotAStore { path: PathBuf },
    #[error("{path} does not exist; create a store with `quiver init`")]
    Missing { path: PathBuf },
    #[error(
        "{path} is read-only for this user (the file, or the folder that holds it, cannot be \
         written): reading commands (get, export, search, status, lists) work, writing ones \
         need write access"
    )]
    ReadOnly { path: PathBuf },
    #[error("{path} uses store format {found}; this read-only access cannot migrate it to format {supported}: open it once with write access")]
    NeedsMigration {
        path: PathBuf,
        found: i64,
        supported: i64,
    },
    #[error("{path} already holds a quiverdb store")]
    AlreadyInitialised { path: PathBuf },
    #[error("{path} uses store format {found}, newer than this quiver understands ({supported}); upgrade quiver")]
    NewerFormat {
        path: PathBuf,
        found: i64,
        supported: i64,
    },
    #[error("invalid name {name:?}: {reason}")]
    InvalidName { name: String, reason: &'static str },
    #[error("collection {0:?} does not exist")]
    NoSuchCollection(String),
    #[error("table {0:?} is not a replicated table of this store")]
    NoSuchTable(String),
    #[error("{0:?} already exists")]
    AlreadyExists(String),
    #[error("table {table:?} cannot be replicated: {reason}")]
    TableRefused { table: String, reason: String },
    #[error("vector has {got} dimensions, collection {collection:?} expects {expected}")]
    Dimension {
        collection: String,
        expected: usize,
        got: usize,
    },
    #[error("vector component {index} is {value}: only finite numbers are allowed")]
    NotFinite { index: usize, value: f32 },
    #[error("metadata must be a JSON object: {0}")]
    Metadata(String),
    #[error("invalid value: {0}")]
    InvalidValue(String),
    #[error("batch refused, nothing applied: {0}")]
    BatchRefused(String),
    #[error("conflict {0} does not exist")]
    NoSuchConflict(i64),
    #[error("conflict {id} is already resolved")]
    ConflictResolved { id: i64 },
    #[error("conflict {id} has no version {version:?}; choose one of: {choices}")]
    NoSuchVersion {
        id: i64,
        version: String,
        choices: String,
    },
    #[error(
        "the schema of table {table:?} changed in a way quiverdb cannot carry to peers: {reason}"
    )]
    SchemaRefused { table: String, reason: String },
    #[error(
        "schema conflict on {table}.{column}: {ours} here, {theirs} at the peer; the shard is held until \
         one side gives way: `quiver schema resolve {table}.{column} --keep ours|theirs` (see the README)"
    )]
    SchemaConflict {
        table: String,
        column: String,
        ours: String,
        theirs: String,
    },
    #[error("store is corrupt: {0}")]
    Corrupt(String),
}

pub type Result<T, E = StoreError> = std::result::Result<T, E>;

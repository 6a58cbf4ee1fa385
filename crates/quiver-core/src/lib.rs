//! The sans-IO domain of quiverdb.
//!
//! Nothing here touches a socket, a file or the system clock: time is passed
//! in as an argument. The store and the network crates build on these types.

mod change;
mod error;
pub mod frame;
mod hlc;
pub mod merge;
pub mod session;
mod site;
mod table;
mod value;
mod version;
pub mod wire;

pub use change::{Change, ChangeBatch, Covered, SnapshotMark};
pub use error::CoreError;
pub use hlc::{Hlc, HlcClock, DEFAULT_MAX_DRIFT_MS};
pub use merge::{ColumnKind, Strategy};
pub use site::SiteId;
pub use table::{is_literal, vector, ColumnDef, ColumnExt, Metric, OnDelete, Reference, TableKind};
pub use value::Value;
pub use version::{Dot, VersionVector};

use serde::{Deserialize, Serialize};

use crate::{Dot, Hlc, SiteId, Value, VersionVector};

/// One replicated write to one cell, or to a row's existence.
///
/// Changes travel in row groups: every change of one `(table, pk)` that a
/// peer lacks, led by the row's existence record (`column == None`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Change {
    pub table: String,
    /// Primary-key values, in the table's key column order.
    pub pk: Vec<Value>,
    /// The column written, or `None` for the row-existence record.
    pub column: Option<String>,
    /// The cell's value (`Null` for an existence record).
    pub value: Value,
    pub hlc: Hlc,
    /// Origin of the write.
    pub site: SiteId,
    /// The origin's `db_version` of the transaction that wrote it.
    pub db_version: u64,
    /// Causal length of the row: odd while the row exists, even once deleted.
    pub cl: u64,
    /// The versions of this row the writer had seen: everything this
    /// change replaces.
    pub replaces: VersionVector,
}

impl Change {
    pub fn dot(&self) -> Dot {
        Dot::new(self.site, self.db_version)
    }

    /// Whether this is the row's existence record.
    pub fn is_existence(&self) -> bool {
        self.column.is_none()
    }

    /// Whether the row exists in the life this change belongs to.
    pub fn alive(&self) -> bool {
        self.cl % 2 == 1
    }
}

/// A claim that a batch's receiver now holds every change of `table` from
/// `site` up to `version`, so it may advance its cursor.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Covered {
    pub table: String,
    pub site: SiteId,
    pub version: u64,
}

/// A batch of changes of one shard, as applied in one transaction.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct ChangeBatch {
    pub shard: String,
    /// Row groups: every change of one row, existence record first.
    pub changes: Vec<Change>,
    /// Cursor advances the receiver may persist with this batch.
    pub covered: Vec<Covered>,
    /// In a snapshot of a table: how far it has come, for the receiver to
    /// keep with the batch and hand back to resume an interrupted one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub snapshot: Option<Box<SnapshotMark>>,
}

/// How far a snapshot of a table (its rows in key order, its claims at
/// the end) has come: every row whose clock key is at most `after` has
/// been sent (`None`: none yet), as of a state that holds at least
/// `versions`; `rows` is how many rows the stream sends in all. A receiver
/// keeps the mark of the last batch it committed and hands it back when it
/// syncs again; the sender then goes on past `after`, and claims at the end
/// only what both parts hold (the meet of `versions` and what it holds
/// then).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SnapshotMark {
    pub table: String,
    pub after: Option<Value>,
    pub versions: VersionVector,
    pub rows: u64,
    /// The receiver holds less than the sender compacted: every row the
    /// sender has comes (those the receiver holds as just their row
    /// record), and at the end the receiver takes away, or holds for
    /// review, the rows that did not come and that `versions` covers.
    /// Left out when false, so that a mark is what it was before it
    /// existed (a build without the field refuses a mark that has it).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub sweep: bool,
}

//! What a replicated table is, as both the store and the wire say it: its
//! kind, its columns, a collection's metric, and the one encoding of
//! vectors (little-endian `f32`).

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Serialize};

use crate::CoreError;

/// Whether a replicated table is a plain table or a vector collection.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum TableKind {
    Table,
    Collection,
}

impl TableKind {
    pub fn as_str(self) -> &'static str {
        match self {
            TableKind::Table => "table",
            TableKind::Collection => "collection",
        }
    }
}

impl fmt::Display for TableKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Distance metric of a collection.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum Metric {
    #[default]
    Cosine,
    L2,
    Dot,
}

impl Metric {
    pub const ALL: [Metric; 3] = [Metric::Cosine, Metric::L2, Metric::Dot];

    pub fn as_str(self) -> &'static str {
        match self {
            Metric::Cosine => "cosine",
            Metric::L2 => "l2",
            Metric::Dot => "dot",
        }
    }
}

impl fmt::Display for Metric {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for Metric {
    type Err = CoreError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Metric::ALL
            .into_iter()
            .find(|m| m.as_str() == s)
            .ok_or_else(|| CoreError::UnknownMetric(s.to_string()))
    }
}

/// One column of a replicated table, as declared.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ColumnDef {
    pub name: String,
    #[serde(rename = "type")]
    pub decl_type: String,
    pub not_null: bool,
}

/// Vectors as stored and sent: `f32`s, little-endian, back to back.
pub mod vector {
    /// A vector's bytes.
    pub fn encode(v: &[f32]) -> Vec<u8> {
        v.iter().flat_map(|x| x.to_le_bytes()).collect()
    }

    /// The numbers of a vector's bytes (a trailing part of fewer than four
    /// bytes is not a number).
    pub fn decode(b: &[u8]) -> impl ExactSizeIterator<Item = f32> + '_ {
        b.chunks_exact(4)
            .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
    }

    #[cfg(test)]
    mod tests {
        #[test]
        fn round_trip() {
            let v = [1.5f32, -0.0, f32::MAX, 3e-9];
            assert_eq!(super::decode(&super::encode(&v)).collect::<Vec<_>>(), v);
            assert_eq!(super::encode(&[1.0]), vec![0, 0, 0x80, 0x3f]);
        }
    }
}

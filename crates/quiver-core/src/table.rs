//! What a replicated table is, as both the store and the wire say it: its
//! kind, its columns, a collection's metric, and the one encoding of
//! vectors (little-endian `f32`).

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Serialize};

use crate::{CoreError, Strategy};

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
///
/// `ext` is absent for a column with nothing beyond its name and type, so
/// such a definition is encoded exactly as `quiver/1` always encoded it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ColumnDef {
    pub name: String,
    #[serde(rename = "type")]
    pub decl_type: String,
    pub not_null: bool,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ext: Option<ColumnExt>,
}

/// What a column carries beyond its name and type. Every field is always
/// encoded (the wire is positional), so none may be skipped.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ColumnExt {
    /// The column's default, as SQL literal text (`0`, `'x'`, `NULL`).
    #[serde(default)]
    pub default: Option<String>,
    /// The column's own merge rule, in place of the table's strategy.
    #[serde(default)]
    pub policy: Option<Strategy>,
    /// The row this column points to, kept whole across merges.
    #[serde(default)]
    pub references: Option<Reference>,
    /// For a column added after the table was registered: the clock stamp
    /// of the addition, which orders added columns the same way on every
    /// replica (0: the column was there from the start).
    #[serde(default)]
    pub added: u64,
}

/// A declared reference: this column holds a value of `table.column`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Reference {
    pub table: String,
    pub column: String,
    pub on_delete: OnDelete,
}

/// What a merge does to a row whose referenced row is deleted.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum OnDelete {
    /// Delete the referring row too, as a replicated delete.
    #[default]
    Cascade,
    /// Keep it, and report it as dangling.
    Keep,
}

impl OnDelete {
    pub fn as_str(self) -> &'static str {
        match self {
            OnDelete::Cascade => "cascade",
            OnDelete::Keep => "keep",
        }
    }
}

impl FromStr for OnDelete {
    type Err = CoreError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "cascade" => Ok(OnDelete::Cascade),
            "keep" => Ok(OnDelete::Keep),
            _ => Err(CoreError::Invalid(format!(
                "unknown on-delete rule {s:?}: expected cascade or keep"
            ))),
        }
    }
}

impl ColumnDef {
    /// A column with nothing beyond its name and type.
    pub fn plain(name: &str, decl_type: &str, not_null: bool) -> ColumnDef {
        ColumnDef {
            name: name.to_string(),
            decl_type: decl_type.to_string(),
            not_null,
            ext: None,
        }
    }

    /// The column's own merge rule, if it has one.
    pub fn policy(&self) -> Option<Strategy> {
        self.ext.as_ref().and_then(|e| e.policy)
    }

    pub fn default_sql(&self) -> Option<&str> {
        self.ext.as_ref().and_then(|e| e.default.as_deref())
    }

    pub fn references(&self) -> Option<&Reference> {
        self.ext.as_ref().and_then(|e| e.references.as_ref())
    }

    pub fn added(&self) -> u64 {
        self.ext.as_ref().map_or(0, |e| e.added)
    }

    /// Changes the extension, dropping it once it says nothing.
    pub fn edit_ext(&mut self, f: impl FnOnce(&mut ColumnExt)) {
        let mut ext = self.ext.take().unwrap_or_default();
        f(&mut ext);
        self.ext = (ext != ColumnExt::default()).then_some(ext);
    }

    /// Whether two definitions describe the same stored column (name, type
    /// and nullability; rules and references are compared apart).
    pub fn same_shape(&self, other: &ColumnDef) -> bool {
        self.name == other.name
            && self.decl_type.eq_ignore_ascii_case(&other.decl_type)
            && self.not_null == other.not_null
    }
}

/// Whether `sql` is a plain literal that may be used as a column default
/// in DDL built from a peer's definition: a number, a quoted string, a hex
/// blob, NULL, TRUE or FALSE. Anything else is refused, so a peer can never
/// put an expression into this replica's schema.
pub fn is_literal(sql: &str) -> bool {
    let s = sql.trim();
    let upper = s.to_ascii_uppercase();
    if matches!(upper.as_str(), "NULL" | "TRUE" | "FALSE") {
        return true;
    }
    if s.len() >= 2 && s.starts_with('\'') && s.ends_with('\'') {
        let inner = &s[1..s.len() - 1];
        return !inner.replace("''", "").contains('\'');
    }
    if (upper.starts_with("X'") && upper.ends_with('\'')) && s.len() >= 3 {
        let hex = &s[2..s.len() - 1];
        return hex.len().is_multiple_of(2) && hex.chars().all(|c| c.is_ascii_hexdigit());
    }
    let num = s.strip_prefix(['-', '+']).unwrap_or(s);
    !num.is_empty()
        && num.parse::<f64>().is_ok()
        && num
            .chars()
            .all(|c| c.is_ascii_digit() || ".eE+-".contains(c))
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
        fn round_trip_vector() {
            let v = [1.5f32, -0.0, f32::MAX, 3e-9];
            assert_eq!(super::decode(&super::encode(&v)).collect::<Vec<_>>(), v);
            assert_eq!(super::encode(&[1.0]), vec![0, 0, 0x80, 0x3f]);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_literals_are_defaults() {
        for ok in [
            "0", "-1.5", "1e3", "'x'", "'it''s'", "NULL", "true", "X'0aFF'",
        ] {
            assert!(is_literal(ok), "{ok}");
        }
        for bad in [
            "",
            "'x",
            "'a' || 'b'",
            "1; DROP TABLE t",
            "(1)",
            "abs(1)",
            "X'0'",
            "'a'b'",
            "CURRENT_TIME",
        ] {
            assert!(!is_literal(bad), "{bad}");
        }
    }

    #[test]
    fn an_empty_extension_is_dropped() {
        let mut c = ColumnDef::plain("a", "TEXT", false);
        c.edit_ext(|e| e.policy = Some(Strategy::Fww));
        assert_eq!(c.policy(), Some(Strategy::Fww));
        c.edit_ext(|e| e.policy = None);
        assert_eq!(c.ext, None);
    }
}

//! Identifier checks. Names that reach SQL text are validated here and
//! quoted; names from a peer are only ever looked up in the catalog.

use crate::{Result, StoreError};

/// The shard a table or collection belongs to unless told otherwise.
pub const DEFAULT_SHARD: &str = "default";

/// Checks a table, collection, column or shard name: letters, digits and
/// `_`, not starting with a digit, at most 64 characters, not reserved.
pub fn check(name: &str) -> Result<()> {
    let bad = |reason| {
        Err(StoreError::InvalidName {
            name: name.to_string(),
            reason,
        })
    };
    if name.is_empty() {
        return bad("must not be empty");
    }
    if name.len() > 64 {
        return bad("must be at most 64 characters");
    }
    let mut chars = name.chars();
    let first = chars.next().unwrap_or('0');
    if !(first.is_ascii_alphabetic() || first == '_') {
        return bad("must start with a letter or '_'");
    }
    if !name.chars().all(|c| c.is_ascii_alphanumeric() || c == '_') {
        return bad("may contain only letters, digits and '_'");
    }
    let lower = name.to_ascii_lowercase();
    if lower.starts_with("quiver_") || lower.starts_with("sqlite_") {
        return bad("names starting with quiver_ or sqlite_ are reserved");
    }
    Ok(())
}

/// A shard name: same rules, plus '-' and '.' allowed after the first character.
pub fn check_shard(name: &str) -> Result<()> {
    let plain: String = name.replace(['-', '.'], "_");
    let starts_well = name
        .chars()
        .next()
        .is_some_and(|c| c.is_ascii_alphabetic() || c == '_');
    if !starts_well || check(&plain).is_err() {
        return Err(StoreError::InvalidName {
            name: name.to_string(),
            reason: "a shard name uses letters, digits, '_', '-' and '.', starting with a letter",
        });
    }
    Ok(())
}

/// Quotes an identifier for SQL text. Only used on names that passed
/// [`check`] or came from SQLite's own schema.
pub fn quote(name: &str) -> String {
    format!("\"{}\"", name.replace('"', "\"\""))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn accepts_plain_names_refuses_others() {
        check("episodes").unwrap();
        check("_x1").unwrap();
        for bad in [
            "",
            "1a",
            "a b",
            "a;drop",
            "quiver_clock",
            "sqlite_master",
            "é",
        ] {
            assert!(check(bad).is_err(), "{bad} should be refused");
        }
        check_shard("memory").unwrap();
        check_shard("eu-west.1").unwrap();
        assert!(check_shard("-x").is_err());
        assert_eq!(quote("a\"b"), "\"a\"\"b\"");
    }
}

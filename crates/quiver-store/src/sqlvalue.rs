//! Conversion between quiverdb values and SQLite values.

use quiver_core::Value;
use rusqlite::types::{ToSqlOutput, Value as SqlValue, ValueRef};

pub(crate) fn from_ref(v: ValueRef<'_>) -> Value {
    match v {
        ValueRef::Null => Value::Null,
        ValueRef::Integer(i) => Value::Integer(i),
        ValueRef::Real(f) => Value::Real(f),
        ValueRef::Text(t) => Value::Text(String::from_utf8_lossy(t).into_owned()),
        ValueRef::Blob(b) => Value::Blob(b.to_vec()),
    }
}

pub(crate) fn to_sql(v: &Value) -> ToSqlOutput<'_> {
    match v {
        Value::Null => ToSqlOutput::Owned(SqlValue::Null),
        Value::Integer(i) => ToSqlOutput::Owned(SqlValue::Integer(*i)),
        Value::Real(f) => ToSqlOutput::Owned(SqlValue::Real(*f)),
        Value::Text(t) => ToSqlOutput::Borrowed(ValueRef::Text(t.as_bytes())),
        Value::Blob(b) => ToSqlOutput::Borrowed(ValueRef::Blob(b)),
    }
}

/// A borrowed value usable as a rusqlite parameter.
pub(crate) struct P<'a>(pub &'a Value);

impl rusqlite::ToSql for P<'_> {
    fn to_sql(&self) -> rusqlite::Result<ToSqlOutput<'_>> {
        Ok(to_sql(self.0))
    }
}

/// The key stored in the clock for a primary key: the value itself for a
/// one-column key, a JSON array for a composite key (as the triggers build it).
pub(crate) fn pk_key(pk: &[Value]) -> Value {
    match pk {
        [one] => one.clone(),
        many => {
            Value::Text(serde_json::Value::Array(many.iter().map(to_json).collect()).to_string())
        }
    }
}

/// Reads a clock key back into primary-key values.
pub(crate) fn pk_values(key: &Value, arity: usize) -> Option<Vec<Value>> {
    if arity == 1 {
        return Some(vec![key.clone()]);
    }
    let Value::Text(t) = key else { return None };
    let arr: Vec<serde_json::Value> = serde_json::from_str(t).ok()?;
    if arr.len() != arity {
        return None;
    }
    arr.into_iter().map(|j| from_json_scalar(&j)).collect()
}

pub fn to_json(v: &Value) -> serde_json::Value {
    match v {
        Value::Null => serde_json::Value::Null,
        Value::Integer(i) => (*i).into(),
        Value::Real(f) => serde_json::Number::from_f64(*f)
            .map(serde_json::Value::Number)
            .unwrap_or(serde_json::Value::Null),
        Value::Text(t) => serde_json::Value::String(t.clone()),
        Value::Blob(b) => serde_json::Value::String(hex(b)),
    }
}

fn from_json_scalar(j: &serde_json::Value) -> Option<Value> {
    Some(match j {
        serde_json::Value::Null => Value::Null,
        serde_json::Value::Number(n) => match n.as_i64() {
            Some(i) => Value::Integer(i),
            None => Value::Real(n.as_f64()?),
        },
        serde_json::Value::String(s) => Value::Text(s.clone()),
        _ => return None,
    })
}

pub(crate) fn hex(b: &[u8]) -> String {
    let mut s = String::with_capacity(b.len() * 2);
    for x in b {
        s.push_str(&format!("{x:02x}"));
    }
    s
}

/// Human-readable form of a key for messages and conflict listings.
pub(crate) fn display_pk(pk: &[Value]) -> String {
    match pk {
        [Value::Text(t)] => t.clone(),
        _ => serde_json::Value::Array(pk.iter().map(to_json).collect()).to_string(),
    }
}

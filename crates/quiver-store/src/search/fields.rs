//! Metadata kept in memory for filtering: each row's JSON object flattened
//! into a short sorted list of `(key, value)` pairs, keys interned.
//!
//! Nested objects are flattened into dotted paths (`{"a": {"b": 1}}` gives
//! `a` (an opaque object) and `a.b = 1`), so filters address nested fields
//! as `"a.b"`. Arrays keep their elements. The original JSON text stays in
//! SQLite; search reads it back only for the rows it returns.
//!
//! Cost: a pair is 32 bytes, plus the heap text of string values, plus 16
//! bytes per row for the list itself; a typical 5-key object of ~100 bytes
//! of JSON takes ~250 bytes.

use std::collections::HashMap;
use std::mem::size_of;

use serde_json::{Map, Value};

/// One metadata value.
#[derive(Debug, Clone, PartialEq)]
pub(crate) enum Field {
    Null,
    Bool(bool),
    Num(f64),
    Str(Box<str>),
    List(Box<[Field]>),
    /// An object: matched only by `$exists`, `$ne` and `$nin`; its members
    /// are addressed by dotted paths.
    Object,
}

impl Field {
    /// The field form of a JSON value (objects become [`Field::Object`]).
    pub(crate) fn from_json(v: &Value) -> Field {
        match v {
            Value::Null => Field::Null,
            Value::Bool(b) => Field::Bool(*b),
            Value::Number(n) => Field::Num(n.as_f64().unwrap_or(f64::NAN)),
            Value::String(s) => Field::Str(s.as_str().into()),
            Value::Array(a) => Field::List(a.iter().map(Field::from_json).collect()),
            Value::Object(_) => Field::Object,
        }
    }

    /// Heap bytes owned by the value.
    fn heap_bytes(&self) -> usize {
        match self {
            Field::Str(s) => s.len(),
            Field::List(l) => {
                l.len() * size_of::<Field>() + l.iter().map(Field::heap_bytes).sum::<usize>()
            }
            _ => 0,
        }
    }
}

/// Interned key paths of one collection.
#[derive(Debug, Default)]
pub(crate) struct Keys {
    ids: HashMap<Box<str>, u32>,
}

impl Keys {
    /// The id of `path`, if any row ever had it.
    pub(crate) fn get(&self, path: &str) -> Option<u32> {
        self.ids.get(path).copied()
    }

    fn intern(&mut self, path: &str) -> u32 {
        if let Some(id) = self.ids.get(path) {
            return *id;
        }
        // Ids are dense; four billion distinct key paths cannot fit in memory.
        let id = self.ids.len() as u32;
        self.ids.insert(path.into(), id);
        id
    }

    pub(crate) fn bytes(&self) -> usize {
        self.ids.capacity() * (size_of::<(Box<str>, u32)>() + 1)
            + self.ids.keys().map(|k| k.len()).sum::<usize>()
    }
}

/// One row's metadata: pairs sorted by key id.
#[derive(Debug, Clone, Default, PartialEq)]
pub(crate) struct Meta(Box<[(u32, Field)]>);

impl Meta {
    /// Flattens a JSON object; anything else gives an empty row.
    pub(crate) fn from_json(v: &Value, keys: &mut Keys) -> Meta {
        let mut out = Vec::new();
        if let Value::Object(m) = v {
            let mut path = String::new();
            flatten(m, &mut path, keys, &mut out);
        }
        out.sort_by_key(|(k, _)| *k);
        // `{"a.b": 1, "a": {"b": 2}}` names `a.b` twice: the first stays.
        out.dedup_by_key(|(k, _)| *k);
        Meta(out.into_boxed_slice())
    }

    /// Parses JSON text; text that is not a JSON object gives an empty row,
    /// which no filter on a field matches.
    pub(crate) fn from_text(text: &str, keys: &mut Keys) -> Meta {
        match serde_json::from_str::<Value>(text) {
            Ok(v) => Meta::from_json(&v, keys),
            Err(_) => Meta::default(),
        }
    }

    /// The value at interned key `key`.
    #[inline]
    pub(crate) fn get(&self, key: u32) -> Option<&Field> {
        // Rows have a handful of keys: a linear scan beats a binary search.
        if self.0.len() <= 8 {
            return self.0.iter().find(|(k, _)| *k == key).map(|(_, f)| f);
        }
        self.0
            .binary_search_by_key(&key, |(k, _)| *k)
            .ok()
            .map(|i| &self.0[i].1)
    }

    /// Bytes used by the row, its own list included.
    pub(crate) fn bytes(&self) -> usize {
        size_of::<Meta>()
            + self.0.len() * size_of::<(u32, Field)>()
            + self.0.iter().map(|(_, f)| f.heap_bytes()).sum::<usize>()
    }
}

fn flatten(
    m: &Map<String, Value>,
    path: &mut String,
    keys: &mut Keys,
    out: &mut Vec<(u32, Field)>,
) {
    let base = path.len();
    for (k, v) in m {
        if base > 0 {
            path.push('.');
        }
        path.push_str(k);
        out.push((keys.intern(path), Field::from_json(v)));
        if let Value::Object(inner) = v {
            flatten(inner, path, keys, out);
        }
        path.truncate(base);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn nested_objects_flatten_into_dotted_paths() {
        let mut keys = Keys::default();
        let m = Meta::from_json(
            &json!({"a": {"b": 1, "c": {"d": "x"}}, "t": [1, "y"]}),
            &mut keys,
        );
        let get = |p: &str| keys.get(p).and_then(|k| m.get(k));
        assert_eq!(get("a"), Some(&Field::Object));
        assert_eq!(get("a.b"), Some(&Field::Num(1.0)));
        assert_eq!(get("a.c.d"), Some(&Field::Str("x".into())));
        assert_eq!(
            get("t"),
            Some(&Field::List(
                vec![Field::Num(1.0), Field::Str("y".into())].into()
            ))
        );
        assert_eq!(get("b"), None);
    }

    #[test]
    fn text_that_is_not_an_object_has_no_fields() {
        let mut keys = Keys::default();
        assert_eq!(Meta::from_text("[1]", &mut keys), Meta::default());
        assert_eq!(Meta::from_text("not json", &mut keys), Meta::default());
    }

    #[test]
    fn lookups_work_past_the_linear_scan_size() {
        let mut keys = Keys::default();
        let obj: Map<String, Value> = (0..20).map(|i| (format!("k{i}"), json!(i))).collect();
        let m = Meta::from_json(&Value::Object(obj), &mut keys);
        for i in 0..20 {
            let k = keys.get(&format!("k{i}")).unwrap();
            assert_eq!(m.get(k), Some(&Field::Num(i as f64)));
        }
    }
}

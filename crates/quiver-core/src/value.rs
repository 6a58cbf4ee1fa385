use serde::{Deserialize, Serialize};

/// A SQLite value, as stored in a cell and carried in a change.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum Value {
    Null,
    Integer(i64),
    Real(f64),
    Text(String),
    Blob(#[serde(with = "bytes")] Vec<u8>),
}

impl Value {
    /// SQLite's storage class name, for error messages.
    pub fn type_name(&self) -> &'static str {
        match self {
            Value::Null => "NULL",
            Value::Integer(_) => "INTEGER",
            Value::Real(_) => "REAL",
            Value::Text(_) => "TEXT",
            Value::Blob(_) => "BLOB",
        }
    }

    /// Total order used wherever a deterministic choice between values is
    /// needed: by storage class, then by content (reals by bit pattern).
    pub fn cmp_total(&self, other: &Value) -> std::cmp::Ordering {
        fn rank(v: &Value) -> u8 {
            match v {
                Value::Null => 0,
                Value::Integer(_) => 1,
                Value::Real(_) => 2,
                Value::Text(_) => 3,
                Value::Blob(_) => 4,
            }
        }
        match (self, other) {
            (Value::Integer(a), Value::Integer(b)) => a.cmp(b),
            (Value::Real(a), Value::Real(b)) => a.total_cmp(b),
            (Value::Text(a), Value::Text(b)) => a.cmp(b),
            (Value::Blob(a), Value::Blob(b)) => a.cmp(b),
            _ => rank(self).cmp(&rank(other)),
        }
    }
}

/// Blobs travel as MessagePack `bin`, not as arrays of integers.
pub(crate) mod bytes {
    use serde::{Deserializer, Serializer};

    pub fn serialize<S: Serializer>(v: &[u8], s: S) -> Result<S::Ok, S::Error> {
        s.serialize_bytes(v)
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Vec<u8>, D::Error> {
        struct V;
        impl<'de> serde::de::Visitor<'de> for V {
            type Value = Vec<u8>;
            fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
                f.write_str("bytes")
            }
            fn visit_bytes<E: serde::de::Error>(self, v: &[u8]) -> Result<Vec<u8>, E> {
                Ok(v.to_vec())
            }
            fn visit_byte_buf<E: serde::de::Error>(self, v: Vec<u8>) -> Result<Vec<u8>, E> {
                Ok(v)
            }
            fn visit_seq<A: serde::de::SeqAccess<'de>>(
                self,
                mut a: A,
            ) -> Result<Vec<u8>, A::Error> {
                let mut out = Vec::with_capacity(a.size_hint().unwrap_or(0).min(1 << 16));
                while let Some(b) = a.next_element::<u8>()? {
                    out.push(b);
                }
                Ok(out)
            }
        }
        d.deserialize_bytes(V)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn json_round_trip_of_every_class() {
        let vals = vec![
            Value::Null,
            Value::Integer(-5),
            Value::Real(1.5),
            Value::Text("x".into()),
            Value::Blob(vec![1, 2, 3]),
        ];
        let s = serde_json::to_string(&vals).unwrap();
        let back: Vec<Value> = serde_json::from_str(&s).unwrap();
        assert_eq!(back, vals);
    }

    #[test]
    fn total_order_is_by_class_then_content() {
        use std::cmp::Ordering::*;
        assert_eq!(Value::Null.cmp_total(&Value::Integer(0)), Less);
        assert_eq!(Value::Integer(2).cmp_total(&Value::Integer(1)), Greater);
        assert_eq!(
            Value::Text("a".into()).cmp_total(&Value::Blob(vec![])),
            Less
        );
    }
}

//! Metadata filters: parsing the JSON form, resolving field paths against
//! a collection's interned keys, and evaluating rows during the scan.

use std::cmp::Ordering;
use std::fmt;

use serde_json::Value;

use super::fields::{Field, Keys, Meta};
use crate::{Result, StoreError};

const FIELD_OPS: &str = "$eq, $ne, $gt, $gte, $lt, $lte, $in, $nin, $exists";

/// A parsed metadata filter: a small MongoDB-style query language over the
/// metadata object of each record. Build one with [`Filter::from_json`]
/// (or `str::parse` on JSON text).
///
/// ```json
/// {"lang": "en", "year": {"$gte": 2020, "$lt": 2024}, "tag": {"$in": ["a", "b"]},
///  "$or": [{"draft": false}, {"author.name": "ann"}]}
/// ```
///
/// - The keys of an object are ANDed. `$and` / `$or` take a non-empty array
///   of filter objects. `{}` matches everything.
/// - A field is a top-level key or a dotted path into nested objects
///   (`"author.name"`).
/// - `"field": value` (a string, number, boolean, null or array) means
///   `$eq`. `"field": {"$op": operand, ...}` applies every operator given.
/// - `$eq` / `$ne`: JSON equality; numbers compare by value (`1 == 1.0`).
///   When the field holds an array and the operand is not one, `$eq`
///   matches if any element is equal (so `{"tags": "a"}` finds records
///   tagged `a`). `$ne` is the negation of `$eq`: it matches records
///   without the field.
/// - `$gt` `$gte` `$lt` `$lte`: the operand is a number or a string; a
///   field matches when it has the same type (or is an array with such an
///   element) and compares as asked. Strings compare by bytes.
/// - `$in` / `$nin`: the operand is an array; `$in` matches when `$eq`
///   matches one of its elements, `$nin` is its negation.
/// - `$exists`: `true` or `false`.
///
/// Numbers are compared as `f64`, so integers beyond 2^53 lose precision.
/// Unknown operators and malformed shapes are refused with
/// [`StoreError::InvalidValue`] naming the place (`filter.$or[1].year`).
#[derive(Debug, Clone, PartialEq)]
pub struct Filter {
    root: Node,
    source: Value,
}

#[derive(Debug, Clone, PartialEq)]
enum Node {
    And(Vec<Node>),
    Or(Vec<Node>),
    Cmp { path: String, op: Op },
}

#[derive(Debug, Clone, PartialEq)]
enum Op {
    Eq(Field),
    Ne(Field),
    Range(Ordering, bool, Field),
    In(Vec<Field>),
    Nin(Vec<Field>),
    Exists(bool),
}

impl Filter {
    /// Parses the JSON form. Errors name the place in the filter and what
    /// was expected there.
    pub fn from_json(v: &Value) -> Result<Filter> {
        Ok(Filter {
            root: parse_object(v, "filter")?,
            source: v.clone(),
        })
    }

    /// The JSON this filter was parsed from.
    pub fn to_json(&self) -> &Value {
        &self.source
    }

    /// Whether a metadata object passes the filter.
    pub fn matches(&self, metadata: &Value) -> bool {
        let mut keys = Keys::default();
        let meta = Meta::from_json(metadata, &mut keys);
        self.compile(&keys).matches(&meta)
    }

    /// Resolves field paths against a collection's interned keys.
    pub(crate) fn compile(&self, keys: &Keys) -> Compiled<'_> {
        Compiled(compile(&self.root, keys))
    }
}

impl std::str::FromStr for Filter {
    type Err = StoreError;
    fn from_str(s: &str) -> Result<Filter> {
        let v: Value =
            serde_json::from_str(s).map_err(|e| bad(format!("filter is not valid JSON: {e}")))?;
        Filter::from_json(&v)
    }
}

impl fmt::Display for Filter {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.source)
    }
}

fn bad(msg: String) -> StoreError {
    StoreError::InvalidValue(msg)
}

fn parse_object(v: &Value, at: &str) -> Result<Node> {
    let Value::Object(m) = v else {
        return Err(bad(format!("{at} must be a JSON object, got {v}")));
    };
    let mut all = Vec::with_capacity(m.len());
    for (key, value) in m {
        if let Some(op) = key.strip_prefix('$') {
            let list = match op {
                "and" | "or" => parse_list(value, &format!("{at}.{key}"))?,
                _ => {
                    return Err(bad(format!(
                        "{at}: unknown operator {key:?}; at this level only $and and $or are \
                         allowed (field operators such as $gt go inside a field: {{\"year\": {{\"$gt\": 2020}}}})"
                    )))
                }
            };
            all.push(if op == "and" {
                Node::And(list)
            } else {
                Node::Or(list)
            });
        } else {
            parse_field(key, value, at, &mut all)?;
        }
    }
    Ok(if all.len() == 1 {
        all.remove(0)
    } else {
        Node::And(all)
    })
}

fn parse_list(v: &Value, at: &str) -> Result<Vec<Node>> {
    match v {
        Value::Array(items) if !items.is_empty() => items
            .iter()
            .enumerate()
            .map(|(i, item)| parse_object(item, &format!("{at}[{i}]")))
            .collect(),
        _ => Err(bad(format!(
            "{at} must be a non-empty array of filter objects, got {v}"
        ))),
    }
}

fn parse_field(path: &str, v: &Value, at: &str, out: &mut Vec<Node>) -> Result<()> {
    if path.is_empty() || path.split('.').any(str::is_empty) {
        return Err(bad(format!(
            "{at}: invalid field name {path:?}; use a key, or a dotted path such as \"author.name\""
        )));
    }
    let here = format!("{at}.{path}");
    let ops = match v {
        Value::Object(ops) => ops,
        _ => {
            out.push(Node::Cmp {
                path: path.to_string(),
                op: Op::Eq(operand(v, &here, "$eq")?),
            });
            return Ok(());
        }
    };
    if ops.is_empty() {
        return Err(bad(format!(
            "{here}: empty operator object; give one of {FIELD_OPS}"
        )));
    }
    if let Some(plain) = ops.keys().find(|k| !k.starts_with('$')) {
        return Err(bad(format!(
            "{here}: the value {v} is an object without operators; to filter on a nested field \
             use a dotted path such as \"{path}.{plain}\"; operators are {FIELD_OPS}"
        )));
    }
    for (name, operand_value) in ops {
        let op = parse_op(name, operand_value, &here)?;
        out.push(Node::Cmp {
            path: path.to_string(),
            op,
        });
    }
    Ok(())
}

fn parse_op(name: &str, v: &Value, at: &str) -> Result<Op> {
    let range = |ord: Ordering, or_equal: bool| -> Result<Op> {
        match v {
            Value::Number(_) | Value::String(_) => {
                Ok(Op::Range(ord, or_equal, Field::from_json(v)))
            }
            _ => Err(bad(format!(
                "{at}.{name} needs a number or a string, got {v}"
            ))),
        }
    };
    match name {
        "$eq" => Ok(Op::Eq(operand(v, at, name)?)),
        "$ne" => Ok(Op::Ne(operand(v, at, name)?)),
        "$gt" => range(Ordering::Greater, false),
        "$gte" => range(Ordering::Greater, true),
        "$lt" => range(Ordering::Less, false),
        "$lte" => range(Ordering::Less, true),
        "$in" | "$nin" => {
            let Value::Array(items) = v else {
                return Err(bad(format!("{at}.{name} needs an array, got {v}")));
            };
            let list = items
                .iter()
                .map(|item| operand(item, at, name))
                .collect::<Result<Vec<_>>>()?;
            Ok(if name == "$in" {
                Op::In(list)
            } else {
                Op::Nin(list)
            })
        }
        "$exists" => match v {
            Value::Bool(b) => Ok(Op::Exists(*b)),
            _ => Err(bad(format!("{at}.$exists needs true or false, got {v}"))),
        },
        _ => Err(bad(format!(
            "{at}: unknown operator {name:?}; expected one of {FIELD_OPS}"
        ))),
    }
}

/// An operand for equality: anything but an object.
fn operand(v: &Value, at: &str, op: &str) -> Result<Field> {
    if v.is_object() || v.as_array().is_some_and(|a| a.iter().any(Value::is_object)) {
        return Err(bad(format!(
            "{at}: {op} cannot compare with an object ({v}); filter on nested fields with dotted paths"
        )));
    }
    Ok(Field::from_json(v))
}

/// A filter with its paths resolved to a collection's key ids. A path no
/// row has ever had resolves to `None`: the field is missing everywhere.
pub(crate) struct Compiled<'f>(CNode<'f>);

enum CNode<'f> {
    And(Vec<CNode<'f>>),
    Or(Vec<CNode<'f>>),
    Cmp { key: Option<u32>, op: &'f Op },
}

fn compile<'f>(n: &'f Node, keys: &Keys) -> CNode<'f> {
    match n {
        Node::And(l) => CNode::And(l.iter().map(|n| compile(n, keys)).collect()),
        Node::Or(l) => CNode::Or(l.iter().map(|n| compile(n, keys)).collect()),
        Node::Cmp { path, op } => CNode::Cmp {
            key: keys.get(path),
            op,
        },
    }
}

impl Compiled<'_> {
    /// Whether a row passes.
    #[inline]
    pub(crate) fn matches(&self, meta: &Meta) -> bool {
        eval(&self.0, meta)
    }
}

fn eval(n: &CNode<'_>, meta: &Meta) -> bool {
    match n {
        CNode::And(l) => l.iter().all(|n| eval(n, meta)),
        CNode::Or(l) => l.iter().any(|n| eval(n, meta)),
        CNode::Cmp { key, op } => {
            let field = key.and_then(|k| meta.get(k));
            apply(op, field)
        }
    }
}

fn apply(op: &Op, field: Option<&Field>) -> bool {
    match op {
        Op::Eq(want) => field.is_some_and(|f| eq(f, want)),
        Op::Ne(want) => !field.is_some_and(|f| eq(f, want)),
        Op::In(list) => field.is_some_and(|f| list.iter().any(|want| eq(f, want))),
        Op::Nin(list) => !field.is_some_and(|f| list.iter().any(|want| eq(f, want))),
        Op::Exists(want) => field.is_some() == *want,
        Op::Range(ord, or_equal, bound) => field.is_some_and(|f| match f {
            Field::List(items) => items.iter().any(|f| in_range(f, *ord, *or_equal, bound)),
            f => in_range(f, *ord, *or_equal, bound),
        }),
    }
}

/// `$eq`: exact equality, or membership when the field is an array and the
/// operand is not.
fn eq(field: &Field, want: &Field) -> bool {
    match (field, want) {
        (Field::List(items), Field::List(_)) => {
            same(field, want) || items.iter().any(|f| same(f, want))
        }
        (Field::List(items), _) => items.iter().any(|f| same(f, want)),
        _ => same(field, want),
    }
}

fn same(a: &Field, b: &Field) -> bool {
    match (a, b) {
        (Field::Null, Field::Null) => true,
        (Field::Bool(x), Field::Bool(y)) => x == y,
        (Field::Num(x), Field::Num(y)) => x == y,
        (Field::Str(x), Field::Str(y)) => x == y,
        (Field::List(x), Field::List(y)) => {
            x.len() == y.len() && x.iter().zip(y.iter()).all(|(a, b)| same(a, b))
        }
        _ => false,
    }
}

fn in_range(field: &Field, ord: Ordering, or_equal: bool, bound: &Field) -> bool {
    let c = match (field, bound) {
        (Field::Num(x), Field::Num(y)) => x.partial_cmp(y),
        (Field::Str(x), Field::Str(y)) => Some(x.as_bytes().cmp(y.as_bytes())),
        _ => None,
    };
    match c {
        Some(c) => c == ord || (or_equal && c == Ordering::Equal),
        None => false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn f(v: Value) -> Filter {
        Filter::from_json(&v).unwrap()
    }

    fn err(v: Value) -> String {
        Filter::from_json(&v).unwrap_err().to_string()
    }

    #[test]
    fn equality_and_implicit_and() {
        let filter = f(json!({"lang": "en", "year": 2021}));
        assert!(filter.matches(&json!({"lang": "en", "year": 2021.0, "x": 1})));
        assert!(!filter.matches(&json!({"lang": "en", "year": 2022})));
        assert!(!filter.matches(&json!({"lang": "en"})));
        assert!(!filter.matches(&json!({"lang": "EN", "year": 2021})));
        assert!(f(json!({})).matches(&json!({})));
        assert!(f(json!({"x": null})).matches(&json!({"x": null})));
        assert!(!f(json!({"x": null})).matches(&json!({})));
        assert!(!f(json!({"x": 1})).matches(&json!({"x": "1"})));
        assert!(!f(json!({"x": true})).matches(&json!({"x": 1})));
    }

    #[test]
    fn ranges_compare_numbers_with_numbers_and_strings_with_strings() {
        let filter = f(json!({"year": {"$gte": 2020, "$lt": 2024}}));
        assert!(filter.matches(&json!({"year": 2020})));
        assert!(filter.matches(&json!({"year": 2023.5})));
        assert!(!filter.matches(&json!({"year": 2024})));
        assert!(!filter.matches(&json!({"year": 2019})));
        assert!(!filter.matches(&json!({"year": "2021"})));
        assert!(!filter.matches(&json!({})));
        let after = f(json!({"d": {"$gt": "2024-01-01"}}));
        assert!(after.matches(&json!({"d": "2024-02-01"})));
        assert!(!after.matches(&json!({"d": "2024-01-01"})));
        assert!(f(json!({"d": {"$lte": "b"}})).matches(&json!({"d": "b"})));
        assert!(f(json!({"s": {"$gt": 5}})).matches(&json!({"s": [1, 9]})));
    }

    #[test]
    fn in_nin_ne_exists() {
        let tag_in = f(json!({"tag": {"$in": ["a", "b"]}}));
        assert!(tag_in.matches(&json!({"tag": "a"})));
        assert!(tag_in.matches(&json!({"tag": ["z", "b"]})));
        assert!(!tag_in.matches(&json!({"tag": "c"})));
        assert!(!tag_in.matches(&json!({})));
        let nin = f(json!({"tag": {"$nin": ["a"]}}));
        assert!(nin.matches(&json!({"tag": "c"})));
        assert!(nin.matches(&json!({})));
        assert!(!nin.matches(&json!({"tag": ["a", "c"]})));
        let ne = f(json!({"lang": {"$ne": "en"}}));
        assert!(ne.matches(&json!({"lang": "fr"})));
        assert!(ne.matches(&json!({})));
        assert!(!ne.matches(&json!({"lang": "en"})));
        assert!(f(json!({"a": {"$exists": true}})).matches(&json!({"a": null})));
        assert!(f(json!({"a": {"$exists": false}})).matches(&json!({"b": 1})));
        assert!(!f(json!({"a": {"$exists": false}})).matches(&json!({"a": 1})));
    }

    #[test]
    fn arrays_match_by_element_or_whole() {
        assert!(f(json!({"tags": "a"})).matches(&json!({"tags": ["a", "b"]})));
        assert!(f(json!({"tags": ["a", "b"]})).matches(&json!({"tags": ["a", "b"]})));
        assert!(!f(json!({"tags": ["b", "a"]})).matches(&json!({"tags": ["a", "b"]})));
        assert!(f(json!({"m": ["a"]})).matches(&json!({"m": [["a"], ["b"]]})));
    }

    #[test]
    fn or_and_nest() {
        let filter = f(json!({
            "$or": [{"lang": "en"}, {"$and": [{"lang": "fr"}, {"year": {"$gt": 2000}}]}],
            "ok": true
        }));
        assert!(filter.matches(&json!({"lang": "en", "ok": true})));
        assert!(filter.matches(&json!({"lang": "fr", "year": 2001, "ok": true})));
        assert!(!filter.matches(&json!({"lang": "fr", "year": 1999, "ok": true})));
        assert!(!filter.matches(&json!({"lang": "en", "ok": false})));
    }

    #[test]
    fn dotted_paths_reach_nested_fields() {
        let filter = f(json!({"author.name": "ann", "author": {"$exists": true}}));
        assert!(filter.matches(&json!({"author": {"name": "ann"}})));
        assert!(!filter.matches(&json!({"author": {"name": "bob"}})));
    }

    #[test]
    fn bad_filters_are_refused_with_the_place_named() {
        assert!(err(json!([1])).contains("must be a JSON object"));
        let e = err(json!({"year": {"$gtee": 1}}));
        assert!(
            e.contains("filter.year") && e.contains("unknown operator \"$gtee\""),
            "{e}"
        );
        assert!(e.contains("$gte"), "lists the operators: {e}");
        assert!(err(json!({"$nor": []})).contains("unknown operator \"$nor\""));
        assert!(err(json!({"$or": []})).contains("non-empty array"));
        assert!(err(json!({"$or": {"a": 1}})).contains("non-empty array"));
        let e = err(json!({"$or": [{"a": 1}, 3]}));
        assert!(e.contains("filter.$or[1] must be a JSON object"), "{e}");
        assert!(err(json!({"a": {"$in": "x"}})).contains("$in needs an array"));
        assert!(err(json!({"a": {"$gt": true}})).contains("needs a number or a string"));
        assert!(err(json!({"a": {"$gt": null}})).contains("needs a number or a string"));
        assert!(err(json!({"a": {"$exists": 1}})).contains("true or false"));
        assert!(err(json!({"a": {}})).contains("empty operator object"));
        assert!(err(json!({"a": {"b": 1}})).contains("dotted path such as \"a.b\""));
        assert!(err(json!({"a": {"$eq": {"b": 1}}})).contains("cannot compare with an object"));
        assert!(err(json!({"a..b": 1})).contains("invalid field name"));
        assert!(err(json!({"": 1})).contains("invalid field name"));
        assert!("{not json"
            .parse::<Filter>()
            .unwrap_err()
            .to_string()
            .contains("not valid JSON"));
    }

    #[test]
    fn parses_from_text_and_shows_its_json() {
        let filter: Filter = r#"{"a": {"$lt": 3}}"#.parse().unwrap();
        assert_eq!(filter.to_json(), &json!({"a": {"$lt": 3}}));
        assert_eq!(filter.to_string(), r#"{"a":{"$lt":3}}"#);
    }
}

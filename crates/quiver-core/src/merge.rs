//! Pure merge rules: how a cell (or a row's existence) takes an incoming
//! version, and what it shows afterwards under each conflict strategy.
//!
//! A cell holds a *set* of versions: usually one; several while concurrent
//! versions are kept (`merge`, `manual`). Every decision is computed from
//! that set and the incoming version's causal context, never from arrival
//! order, so replicas that saw the same versions show the same value.

use std::cmp::Ordering;
use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Serialize};

use crate::{CoreError, Dot, Hlc, Value, VersionVector};

/// How concurrent versions of a cell are resolved.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Strategy {
    /// Greatest `(hlc, site)` wins.
    #[default]
    Lww,
    /// Least `(hlc, site)` wins.
    Fww,
    /// Of concurrent versions, the greatest value wins (SQLite's order).
    Max,
    /// Of concurrent versions, the least value wins.
    Min,
    /// Each replica's increments add up: every site keeps its own total,
    /// and the cell shows their sum.
    Counter,
    /// Vectors: element-wise mean; JSON objects: key-wise, newest key wins.
    Merge,
    /// Shows the `lww` winner and keeps every concurrent version until resolved.
    Manual,
    /// The version held locally stays (does not converge; one-way setups).
    LocalWins,
    /// The incoming version replaces (does not converge; one-way setups).
    RemoteWins,
}

impl Strategy {
    pub const ALL: [Strategy; 9] = [
        Strategy::Lww,
        Strategy::Fww,
        Strategy::Max,
        Strategy::Min,
        Strategy::Counter,
        Strategy::Merge,
        Strategy::Manual,
        Strategy::LocalWins,
        Strategy::RemoteWins,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            Strategy::Lww => "lww",
            Strategy::Fww => "fww",
            Strategy::Max => "max",
            Strategy::Min => "min",
            Strategy::Counter => "counter",
            Strategy::Merge => "merge",
            Strategy::Manual => "manual",
            Strategy::LocalWins => "local-wins",
            Strategy::RemoteWins => "remote-wins",
        }
    }

    /// Whether replicas converge under this strategy.
    pub fn converges(self) -> bool {
        !matches!(self, Strategy::LocalWins | Strategy::RemoteWins)
    }

    /// Whether a concurrent conflict stays open until someone resolves it.
    pub fn keeps_open(self) -> bool {
        self == Strategy::Manual
    }
}

impl fmt::Display for Strategy {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for Strategy {
    type Err = CoreError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Strategy::ALL
            .into_iter()
            .find(|k| k.as_str() == s)
            .ok_or_else(|| CoreError::UnknownStrategy(s.to_string()))
    }
}

/// What a column holds, which decides how `merge` combines versions.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ColumnKind {
    /// Little-endian f32 BLOB: element-wise mean.
    Vector,
    /// JSON object text: key-wise merge, newest key wins.
    JsonObject,
    /// Anything else: the `lww` winner.
    Other,
}

/// One version of a cell or of a row's existence.
#[derive(Debug, Clone, PartialEq)]
pub struct Version {
    pub dot: Dot,
    pub hlc: Hlc,
    pub cl: u64,
    pub replaces: VersionVector,
    pub value: Value,
}

impl Version {
    /// This version as the change that carries it: of `column` of row `pk`
    /// of `table`, or the row's existence record (no value) for `None`.
    pub fn to_change(&self, table: &str, pk: &[Value], column: Option<&str>) -> crate::Change {
        crate::Change {
            table: table.to_string(),
            pk: pk.to_vec(),
            column: column.map(str::to_string),
            value: if column.is_some() {
                self.value.clone()
            } else {
                Value::Null
            },
            hlc: self.hlc,
            site: self.dot.site,
            db_version: self.dot.db_version,
            cl: self.cl,
            replaces: self.replaces.clone(),
        }
    }

    /// The order `lww`/`fww` use: `(hlc, site)`, with the origin's version
    /// as a last tiebreak so the order is total.
    pub fn order(&self, other: &Version) -> Ordering {
        (self.hlc, self.dot.site, self.dot.db_version).cmp(&(
            other.hlc,
            other.dot.site,
            other.dot.db_version,
        ))
    }
}

/// How an incoming version related to what was held.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    /// Already seen (or replaced by something held): nothing changes.
    Duplicate,
    /// Belongs to an older life of the row (deleted since): ignored.
    Stale,
    /// Its writer had seen everything held: it replaces it.
    FastForward,
    /// Neither side had seen the other: the strategy decides.
    Concurrent,
}

/// The result of merging one incoming version into a cell.
#[derive(Debug, Clone, PartialEq)]
pub struct CellOutcome {
    pub verdict: Verdict,
    /// The versions the cell holds afterwards, ascending by [`Version::order`].
    pub versions: Vec<Version>,
    /// The value the cell shows afterwards.
    pub visible: Value,
    /// For a concurrent merge: every version that took part.
    pub contenders: Vec<Version>,
}

fn sorted(mut v: Vec<Version>) -> Vec<Version> {
    v.sort_by(|a, b| a.order(b));
    v
}

fn max_version(v: &[Version]) -> Option<&Version> {
    v.iter().max_by(|a, b| a.order(b))
}

/// Merges `incoming` into a cell holding `held` (the versions of the row's
/// current life), given `known`, the row's knowledge before this row group.
pub fn merge_cell(
    held: &[Version],
    incoming: Version,
    known: &VersionVector,
    strategy: Strategy,
    kind: ColumnKind,
) -> CellOutcome {
    let row_cl = held.iter().map(|h| h.cl).max().unwrap_or(0);
    let unchanged = |verdict| CellOutcome {
        verdict,
        versions: held.to_vec(),
        visible: visible_value(held, strategy, kind),
        contenders: Vec::new(),
    };
    if incoming.cl < row_cl {
        return unchanged(Verdict::Stale);
    }
    if strategy == Strategy::Counter {
        return merge_counter(held, incoming);
    }
    if known.covers(&incoming.dot) || held.iter().any(|h| h.dot == incoming.dot) {
        return unchanged(Verdict::Duplicate);
    }
    // Versions of an older life, versions the writer had seen, and a
    // column's unwritten default (version 0) are replaced.
    let remaining: Vec<Version> = held
        .iter()
        .filter(|h| {
            h.cl >= incoming.cl && h.dot.db_version > 0 && !incoming.replaces.covers(&h.dot)
        })
        .cloned()
        .collect();
    if remaining.is_empty() {
        let visible = incoming.value.clone();
        return CellOutcome {
            verdict: Verdict::FastForward,
            versions: vec![incoming],
            visible,
            contenders: Vec::new(),
        };
    }
    let contenders = sorted(
        remaining
            .iter()
            .cloned()
            .chain([incoming.clone()])
            .collect(),
    );
    let versions = match strategy {
        // Collapsing to the winner is safe for lww only: a write that later
        // replaces the winner carries a greater stamp, so it would beat the
        // dropped versions too. Under fww a dropped version could be the
        // least again once the winner is replaced, so every one is kept.
        Strategy::Lww => vec![contenders[contenders.len() - 1].clone()],
        // Every contender is kept, as under fww: the winner by value may be
        // replaced later, and the next one must still be there.
        Strategy::Fww | Strategy::Max | Strategy::Min | Strategy::Merge | Strategy::Manual => {
            contenders.clone()
        }
        Strategy::Counter => unreachable!("counters merge per site"),
        Strategy::LocalWins => sorted(remaining),
        Strategy::RemoteWins => vec![incoming],
    };
    CellOutcome {
        verdict: Verdict::Concurrent,
        visible: visible_value(&versions, strategy, kind),
        versions,
        contenders,
    }
}

/// A counter cell holds one version per origin site, whose value is that
/// site's own running total; a site's newer version replaces its older one
/// and never touches another site's. Versions of an older life of the row
/// are gone with it.
fn merge_counter(held: &[Version], incoming: Version) -> CellOutcome {
    let (site, cl) = (incoming.dot.site, incoming.cl);
    // A site's totals only grow in its own versions: an older or equal one
    // is already counted.
    if held
        .iter()
        .any(|h| h.dot.site == site && h.cl == cl && h.dot.db_version >= incoming.dot.db_version)
    {
        return CellOutcome {
            verdict: Verdict::Duplicate,
            versions: held.to_vec(),
            visible: counter_sum(held),
            contenders: Vec::new(),
        };
    }
    let versions = sorted(
        held.iter()
            .filter(|h| h.dot.site != site && h.cl >= cl)
            .cloned()
            .chain([incoming])
            .collect(),
    );
    CellOutcome {
        verdict: Verdict::FastForward,
        visible: counter_sum(&versions),
        versions,
        contenders: Vec::new(),
    }
}

/// The sum of every site's total: integers while all are integers.
fn counter_sum(versions: &[Version]) -> Value {
    let mut int: Option<i64> = Some(0);
    let mut real = 0f64;
    let mut any = false;
    for v in versions {
        match &v.value {
            Value::Integer(i) => {
                any = true;
                int = int.and_then(|s| s.checked_add(*i));
                real += *i as f64;
            }
            Value::Real(r) => {
                any = true;
                int = None;
                real += r;
            }
            _ => {}
        }
    }
    match (any, int) {
        (false, _) => versions.first().map_or(Value::Null, |v| v.value.clone()),
        (true, Some(i)) => Value::Integer(i),
        (true, None) => Value::Real(real),
    }
}

/// SQLite's order of values: NULL, numbers, text, blobs.
fn value_cmp(a: &Value, b: &Value) -> Ordering {
    fn rank(v: &Value) -> u8 {
        match v {
            Value::Null => 0,
            Value::Integer(_) | Value::Real(_) => 1,
            Value::Text(_) => 2,
            Value::Blob(_) => 3,
        }
    }
    let num = |v: &Value| match v {
        Value::Integer(i) => *i as f64,
        Value::Real(r) => *r,
        _ => 0.0,
    };
    match (a, b) {
        (Value::Integer(x), Value::Integer(y)) => x.cmp(y),
        (Value::Text(x), Value::Text(y)) => x.cmp(y),
        (Value::Blob(x), Value::Blob(y)) => x.cmp(y),
        _ if rank(a) == 1 && rank(b) == 1 => num(a).total_cmp(&num(b)),
        _ => rank(a).cmp(&rank(b)),
    }
}

/// The value a cell holding `versions` shows.
pub fn visible_value(versions: &[Version], strategy: Strategy, kind: ColumnKind) -> Value {
    if strategy == Strategy::Counter {
        return counter_sum(versions);
    }
    match versions {
        [] => Value::Null,
        [one] => one.value.clone(),
        many => {
            let many = sorted(many.to_vec());
            let winner = || {
                let by_value = |a: &&Version, b: &&Version| {
                    value_cmp(&a.value, &b.value).then_with(|| a.order(b))
                };
                let pick = match strategy {
                    Strategy::Fww => many.first(),
                    Strategy::Max => many.iter().max_by(by_value),
                    Strategy::Min => many.iter().min_by(by_value),
                    _ => max_version(&many),
                };
                pick.map(|v| v.value.clone()).unwrap_or(Value::Null)
            };
            if strategy != Strategy::Merge {
                return winner();
            }
            let merged = match kind {
                ColumnKind::Vector => mean_vector(&many),
                ColumnKind::JsonObject => merge_json(&many),
                ColumnKind::Other => None,
            };
            merged.unwrap_or_else(winner)
        }
    }
}

/// Element-wise mean of f32 vectors, summed in f64 in a fixed order.
fn mean_vector(versions: &[Version]) -> Option<Value> {
    let blobs: Vec<&Vec<u8>> = versions
        .iter()
        .filter_map(|v| match &v.value {
            Value::Blob(b) => Some(b),
            _ => None,
        })
        .collect();
    let first = blobs.first()?;
    if first.len() % 4 != 0 || blobs.iter().any(|b| b.len() != first.len()) {
        return None;
    }
    let mut sum = vec![0f64; first.len() / 4];
    for b in &blobs {
        for (i, x) in crate::vector::decode(b).enumerate() {
            sum[i] += x as f64;
        }
    }
    let n = blobs.len() as f64;
    let mean: Vec<f32> = sum.into_iter().map(|s| (s / n) as f32).collect();
    Some(Value::Blob(crate::vector::encode(&mean)))
}

/// Key-wise merge of JSON objects: versions applied oldest first, so the
/// newest version holding a key gives its value.
fn merge_json(versions: &[Version]) -> Option<Value> {
    let mut out = serde_json::Map::new();
    let mut any = false;
    for v in versions {
        if let Value::Text(t) = &v.value {
            if let Ok(serde_json::Value::Object(map)) = serde_json::from_str(t) {
                any = true;
                for (k, val) in map {
                    out.insert(k, val);
                }
            }
        }
    }
    any.then(|| Value::Text(serde_json::Value::Object(out).to_string()))
}

/// The result of merging an incoming existence record.
#[derive(Debug, Clone, PartialEq)]
pub struct ExistenceOutcome {
    pub verdict: Verdict,
    /// The existence record held afterwards.
    pub record: Version,
    /// Whether the row moved to a new life (insert, delete or re-insert),
    /// which replaces every cell version of the older life.
    pub new_life: bool,
}

/// Merges a row's existence by causal length: the longer history wins, so a
/// delete wins over concurrent updates and an insert made after seeing the
/// delete resurrects the row. Within one life, `lww` picks the record.
pub fn merge_existence(
    held: Option<&Version>,
    incoming: Version,
    known: &VersionVector,
) -> ExistenceOutcome {
    let Some(held) = held else {
        return ExistenceOutcome {
            verdict: Verdict::FastForward,
            record: incoming,
            new_life: true,
        };
    };
    let keep = |verdict| ExistenceOutcome {
        verdict,
        record: held.clone(),
        new_life: false,
    };
    match incoming.cl.cmp(&held.cl) {
        Ordering::Less => keep(Verdict::Stale),
        Ordering::Greater => ExistenceOutcome {
            verdict: Verdict::FastForward,
            record: incoming,
            new_life: true,
        },
        Ordering::Equal => {
            if known.covers(&incoming.dot) || held.dot == incoming.dot {
                keep(Verdict::Duplicate)
            } else if incoming.replaces.covers(&held.dot) {
                ExistenceOutcome {
                    verdict: Verdict::FastForward,
                    record: incoming,
                    new_life: false,
                }
            } else if incoming.order(held) == Ordering::Greater {
                ExistenceOutcome {
                    verdict: Verdict::Concurrent,
                    record: incoming,
                    new_life: false,
                }
            } else {
                keep(Verdict::Concurrent)
            }
        }
    }
}

#[cfg(test)]
mod tests;

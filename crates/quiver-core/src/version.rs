use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use crate::SiteId;

/// The identity of one write: the origin site and that site's `db_version`
/// of the transaction that made it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct Dot {
    pub site: SiteId,
    pub db_version: u64,
}

impl Dot {
    pub fn new(site: SiteId, db_version: u64) -> Self {
        Dot { site, db_version }
    }
}

/// For each origin site, the highest `db_version` covered.
///
/// Used both as a replica's knowledge of a shard (what it holds, for sync)
/// and as a change's causal context (which versions of the row its writer
/// had seen, so a receiver can tell a fast-forward from a concurrent write).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct VersionVector(BTreeMap<SiteId, u64>);

impl VersionVector {
    pub fn new() -> Self {
        Self::default()
    }

    /// The version covered for `site` (0 when nothing is).
    pub fn get(&self, site: &SiteId) -> u64 {
        self.0.get(site).copied().unwrap_or(0)
    }

    /// Sets the entry for `site`, removing it when zero.
    pub fn set(&mut self, site: SiteId, version: u64) {
        if version == 0 {
            self.0.remove(&site);
        } else {
            self.0.insert(site, version);
        }
    }

    /// Raises the entry for `site` to at least `version`.
    pub fn advance(&mut self, site: SiteId, version: u64) {
        if version > self.get(&site) {
            self.0.insert(site, version);
        }
    }

    /// Whether the write `dot` is covered.
    pub fn covers(&self, dot: &Dot) -> bool {
        dot.db_version > 0 && self.get(&dot.site) >= dot.db_version
    }

    /// Whether every entry of `other` is covered by `self`.
    pub fn dominates(&self, other: &VersionVector) -> bool {
        other.0.iter().all(|(s, v)| self.get(s) >= *v)
    }

    /// Element-wise maximum (the join of two knowledge states).
    pub fn merge(&mut self, other: &VersionVector) {
        for (s, v) in &other.0 {
            self.advance(*s, *v);
        }
    }

    /// Element-wise minimum: what both claim.
    pub fn meet(&self, other: &VersionVector) -> VersionVector {
        let mut out = VersionVector::new();
        for (s, v) in &self.0 {
            out.set(*s, (*v).min(other.get(s)));
        }
        out
    }

    /// Sites for which `self` holds something `other` lacks, with the range
    /// `(other's version, own version]` to send.
    pub fn ahead_of(&self, other: &VersionVector) -> Vec<(SiteId, u64, u64)> {
        self.0
            .iter()
            .filter(|(s, v)| **v > other.get(s))
            .map(|(s, v)| (*s, other.get(s), *v))
            .collect()
    }

    pub fn iter(&self) -> impl Iterator<Item = (&SiteId, &u64)> {
        self.0.iter()
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    pub fn len(&self) -> usize {
        self.0.len()
    }
}

impl FromIterator<(SiteId, u64)> for VersionVector {
    fn from_iter<T: IntoIterator<Item = (SiteId, u64)>>(iter: T) -> Self {
        let mut vv = VersionVector::new();
        for (s, v) in iter {
            vv.advance(s, v);
        }
        vv
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn s(n: u8) -> SiteId {
        SiteId([n; 16])
    }

    #[test]
    fn covers_and_advance() {
        let mut vv = VersionVector::new();
        assert!(!vv.covers(&Dot::new(s(1), 1)));
        vv.advance(s(1), 5);
        vv.advance(s(1), 3);
        assert_eq!(vv.get(&s(1)), 5);
        assert!(vv.covers(&Dot::new(s(1), 5)));
        assert!(!vv.covers(&Dot::new(s(1), 6)));
        assert!(!vv.covers(&Dot::new(s(2), 1)));
    }

    #[test]
    fn merge_meet_dominates_ahead() {
        let a: VersionVector = [(s(1), 5), (s(2), 1)].into_iter().collect();
        let b: VersionVector = [(s(1), 2), (s(3), 4)].into_iter().collect();
        let mut j = a.clone();
        j.merge(&b);
        assert!(j.dominates(&a) && j.dominates(&b));
        assert!(!a.dominates(&b));
        assert_eq!(a.meet(&b), [(s(1), 2)].into_iter().collect());
        assert_eq!(a.ahead_of(&b), vec![(s(1), 2, 5), (s(2), 0, 1)]);
    }

    #[test]
    fn merge_is_commutative_associative_idempotent() {
        let a: VersionVector = [(s(1), 5), (s(2), 1)].into_iter().collect();
        let b: VersionVector = [(s(1), 2), (s(3), 4)].into_iter().collect();
        let c: VersionVector = [(s(2), 9)].into_iter().collect();
        let mut ab = a.clone();
        ab.merge(&b);
        let mut ba = b.clone();
        ba.merge(&a);
        assert_eq!(ab, ba);
        let mut ab_c = ab.clone();
        ab_c.merge(&c);
        let mut bc = b.clone();
        bc.merge(&c);
        let mut a_bc = a.clone();
        a_bc.merge(&bc);
        assert_eq!(ab_c, a_bc);
        let mut aa = a.clone();
        aa.merge(&a);
        assert_eq!(aa, a);
    }
}

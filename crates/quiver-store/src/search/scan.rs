//! Exact k-nearest-neighbour scan of a [`Matrix`]: the filter is checked
//! first for each row (a rejected row costs no distance), survivors go
//! through a bounded max-heap of the k best so far. Large matrices are cut
//! into contiguous ranges scanned on rayon's pool (threads started once,
//! not per query: starting two threads was measured at 150 µs here), and
//! the per-range winners merged, so the answer does not depend on the split.

use std::cmp::Ordering;
use std::collections::BinaryHeap;
use std::ops::Range;

use rayon::prelude::*;

use super::distance::{cosine_from, dot, l2_squared, norm};
use super::filter::Compiled;
use super::matrix::Matrix;
use crate::Metric;

/// Below this many matrix elements (rows × dim) one thread scans alone:
/// 2^19 `f32` (2 MB) take ~0.1 ms, where handing work to the pool would
/// cost a noticeable share.
const PARALLEL_MIN_ELEMENTS: usize = 1 << 19;
/// Smallest part handed to a pool thread.
const PART_MIN_ELEMENTS: usize = 1 << 18;

/// A row and its distance, ordered by (distance, id): the heap's top is
/// the worst candidate kept.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Candidate<'m> {
    pub distance: f32,
    pub slot: u32,
    pub id: &'m str,
}

impl Ord for Candidate<'_> {
    fn cmp(&self, other: &Self) -> Ordering {
        self.distance
            .total_cmp(&other.distance)
            .then_with(|| self.id.cmp(other.id))
    }
}

impl PartialOrd for Candidate<'_> {
    fn partial_cmp(&self, other: &Self) -> Option<Ordering> {
        Some(self.cmp(other))
    }
}

impl PartialEq for Candidate<'_> {
    fn eq(&self, other: &Self) -> bool {
        self.cmp(other) == Ordering::Equal
    }
}

impl Eq for Candidate<'_> {}

/// The `k` rows nearest to `query` that pass `filter`, nearest first,
/// ties broken by id ascending.
pub(crate) fn top_k<'m>(
    m: &'m Matrix,
    query: &[f32],
    k: usize,
    filter: Option<&Compiled<'_>>,
) -> Vec<Candidate<'m>> {
    let n = m.len();
    // More than n cannot come back; clamping also keeps heap capacities sane.
    let k = k.min(n);
    if k == 0 {
        return Vec::new();
    }
    let elements = n * m.dim;
    let parts = if elements >= PARALLEL_MIN_ELEMENTS {
        // A few parts per thread, so a core busy with something else does
        // not hold the whole query up: idle threads steal the rest.
        (elements / PART_MIN_ELEMENTS)
            .clamp(2, rayon::current_num_threads().max(1) * 4)
            .min(n)
    } else {
        1
    };
    let query_norm = norm(query);
    let scan = |range: Range<usize>| match m.metric {
        Metric::Cosine => scan_range(m, range, k, filter, |i| {
            cosine_from(dot(m.vector(i), query), m.norm(i), query_norm)
        }),
        Metric::L2 => scan_range(m, range, k, filter, |i| {
            l2_squared(m.vector(i), query).sqrt()
        }),
        Metric::Dot => scan_range(m, range, k, filter, |i| -dot(m.vector(i), query)),
    };
    let mut best = if parts <= 1 {
        scan(0..n)
    } else {
        let chunk = n.div_ceil(parts);
        let heaps: Vec<BinaryHeap<Candidate<'m>>> = (0..parts)
            .into_par_iter()
            .map(|p| scan(p * chunk..((p + 1) * chunk).min(n)))
            .collect();
        let mut merged = BinaryHeap::with_capacity(k + 1);
        for c in heaps.into_iter().flatten() {
            offer(&mut merged, k, c);
        }
        merged
    }
    .into_vec();
    best.sort_unstable();
    best
}

#[inline(always)]
fn scan_range<'m>(
    m: &'m Matrix,
    range: Range<usize>,
    k: usize,
    filter: Option<&Compiled<'_>>,
    distance: impl Fn(usize) -> f32,
) -> BinaryHeap<Candidate<'m>> {
    let mut heap = BinaryHeap::with_capacity(k + 1);
    // The distance a row must beat once the heap is full; checked before
    // building a candidate so the common case is one float compare.
    let mut bar = f32::INFINITY;
    for i in range {
        if let Some(f) = filter {
            if !f.matches(m.meta(i)) {
                continue;
            }
        }
        let mut d = distance(i);
        if d.is_nan() {
            // Overflowing inputs can make NaN; rank it last, never first.
            d = f32::INFINITY;
        }
        if heap.len() == k && d > bar {
            continue;
        }
        offer(
            &mut heap,
            k,
            Candidate {
                distance: d,
                slot: i as u32,
                id: m.id(i),
            },
        );
        if heap.len() == k {
            bar = heap.peek().map_or(f32::INFINITY, |c| c.distance);
        }
    }
    heap
}

/// Keeps `c` if the heap has room or `c` beats its worst.
#[inline]
fn offer<'m>(heap: &mut BinaryHeap<Candidate<'m>>, k: usize, c: Candidate<'m>) {
    if heap.len() < k {
        heap.push(c);
    } else if let Some(mut worst) = heap.peek_mut() {
        if c < *worst {
            // Dropping the PeekMut sifts the replacement down.
            *worst = c;
        }
    }
}

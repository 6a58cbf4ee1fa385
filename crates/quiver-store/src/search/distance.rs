//! Distance kernels: portable code the compiler turns into SIMD.
//!
//! Each kernel accumulates into [`LANES`] independent partial sums over
//! fixed-size chunks, which LLVM maps onto vector registers (four SSE2
//! registers on a baseline x86-64 build, NEON on aarch64) without `unsafe`
//! or target-specific code. The lane order of the final reduction is fixed,
//! so a distance is bit-for-bit the same whatever the thread split.
//!
//! Measured on the development machine (AMD EPYC, baseline x86-64 build,
//! one thread, 10,000 × 384 `f32`, which fits in cache): 0.56 ms for an L2
//! scan against 3.0 ms for the plain one-accumulator loop. AVX2 code
//! behind runtime detection would gain ~1.6× more in cache but only ~13%
//! on collections larger than the cache, where the scan is bound by memory
//! bandwidth; not worth `unsafe` dispatch.

#[cfg(test)]
use crate::Metric;

/// Partial sums kept side by side: 16 `f32` = one AVX-512 register, two AVX
/// or four SSE/NEON registers, enough to hide the add latency.
const LANES: usize = 16;

/// Sums the lanes left to right, a fixed order. (A pairwise tree was
/// measured to make LLVM vectorise the main loop only 2 lanes wide.)
#[inline(always)]
fn reduce(acc: [f32; LANES]) -> f32 {
    let mut sum = 0.0f32;
    for x in acc {
        sum += x;
    }
    sum
}

/// The dot product of two equally long slices (extra elements of the longer
/// one are ignored).
#[inline(always)]
pub(crate) fn dot(a: &[f32], b: &[f32]) -> f32 {
    let n = a.len().min(b.len());
    let (a, b) = (&a[..n], &b[..n]);
    let mut acc = [0.0f32; LANES];
    let ca = a.chunks_exact(LANES);
    let cb = b.chunks_exact(LANES);
    let (ra, rb) = (ca.remainder(), cb.remainder());
    for (x, y) in ca.zip(cb) {
        for i in 0..LANES {
            acc[i] += x[i] * y[i];
        }
    }
    let mut tail = 0.0f32;
    for (x, y) in ra.iter().zip(rb) {
        tail += x * y;
    }
    reduce(acc) + tail
}

/// The squared Euclidean distance of two equally long slices.
#[inline(always)]
pub(crate) fn l2_squared(a: &[f32], b: &[f32]) -> f32 {
    let n = a.len().min(b.len());
    let (a, b) = (&a[..n], &b[..n]);
    let mut acc = [0.0f32; LANES];
    let ca = a.chunks_exact(LANES);
    let cb = b.chunks_exact(LANES);
    let (ra, rb) = (ca.remainder(), cb.remainder());
    for (x, y) in ca.zip(cb) {
        for i in 0..LANES {
            let d = x[i] - y[i];
            acc[i] += d * d;
        }
    }
    let mut tail = 0.0f32;
    for (x, y) in ra.iter().zip(rb) {
        let d = x - y;
        tail += d * d;
    }
    reduce(acc) + tail
}

/// The Euclidean norm.
#[inline]
pub(crate) fn norm(a: &[f32]) -> f32 {
    dot(a, a).sqrt()
}

/// Cosine distance `1 - cos(a, b)` from a dot product and the two norms.
/// A zero vector has no direction: its similarity to anything is taken as
/// 0, so its distance is 1.
#[inline(always)]
pub(crate) fn cosine_from(dot: f32, norm_a: f32, norm_b: f32) -> f32 {
    let denom = norm_a * norm_b;
    if denom > 0.0 {
        1.0 - dot / denom
    } else {
        1.0
    }
}

/// The distance between `a` and `b` under `metric`; smaller is closer:
/// cosine `1 - cos`, l2 the Euclidean distance (not squared), dot the
/// negated dot product. The search kernels compute exactly this, with the
/// row norm precomputed.
#[cfg(test)]
pub(crate) fn distance(metric: Metric, a: &[f32], b: &[f32]) -> f32 {
    match metric {
        Metric::Cosine => cosine_from(dot(a, b), norm(a), norm(b)),
        Metric::L2 => l2_squared(a, b).sqrt(),
        Metric::Dot => -dot(a, b),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn naive_dot(a: &[f32], b: &[f32]) -> f64 {
        a.iter().zip(b).map(|(x, y)| *x as f64 * *y as f64).sum()
    }

    fn vector(seed: u32, len: usize) -> Vec<f32> {
        (0..len)
            .map(|i| {
                ((i as u32).wrapping_mul(2654435761).wrapping_add(seed) % 2000) as f32 / 1000.0
                    - 1.0
            })
            .collect()
    }

    #[test]
    fn kernels_match_a_double_precision_reference_for_every_length() {
        // Lengths around the lane width exercise the chunk and tail paths.
        for len in [0, 1, 3, 15, 16, 17, 31, 32, 33, 100, 384, 385] {
            let a = vector(7, len);
            let b = vector(11, len);
            let want_dot = naive_dot(&a, &b);
            let want_l2: f64 = a
                .iter()
                .zip(&b)
                .map(|(x, y)| (*x as f64 - *y as f64).powi(2))
                .sum();
            let tol = 1e-4 * (1.0 + len as f64);
            assert!((dot(&a, &b) as f64 - want_dot).abs() < tol, "dot len {len}");
            assert!(
                (l2_squared(&a, &b) as f64 - want_l2).abs() < tol,
                "l2 len {len}"
            );
        }
    }

    #[test]
    fn distances_follow_the_documented_definitions() {
        let a = [3.0, 4.0];
        let b = [4.0, 3.0];
        assert_eq!(distance(Metric::L2, &a, &b), 2f32.sqrt());
        assert_eq!(distance(Metric::Dot, &a, &b), -24.0);
        let cos = 24.0 / 25.0;
        assert!((distance(Metric::Cosine, &a, &b) - (1.0 - cos)).abs() < 1e-6);
        // Same direction: distance 0; opposite: 2; zero vector: 1.
        assert!(distance(Metric::Cosine, &a, &[6.0, 8.0]).abs() < 1e-6);
        assert!((distance(Metric::Cosine, &a, &[-3.0, -4.0]) - 2.0).abs() < 1e-6);
        assert_eq!(distance(Metric::Cosine, &a, &[0.0, 0.0]), 1.0);
    }
}

//! `quiver bench search`: k-NN queries per second through `Store::search`
//! against a plain scalar brute-force loop over the same vectors, in the
//! same process, on the same queries.

use std::cmp::Ordering;
use std::collections::BinaryHeap;
use std::path::Path;
use std::time::Instant;

use anyhow::{bail, Context, Result};
use quiver_store::{CollectionSpec, Metric, Store};

use crate::args::BenchSearchArgs;

pub fn run(db: &Path, args: BenchSearchArgs, json: bool) -> Result<()> {
    if args.queries == 0 {
        bail!("--queries must be at least 1");
    }
    if args.k == 0 {
        bail!("--k must be at least 1");
    }
    // Keeps the synthetic store's directory alive for the whole run.
    let mut _tmp = None;
    let (store, name, build_s) = match &args.collection {
        Some(c) => {
            let s = Store::open(db).with_context(|| format!("opening {}", db.display()))?;
            (s, c.clone(), None)
        }
        None => {
            if args.n == 0 || args.dim == 0 {
                bail!("--n and --dim must be at least 1");
            }
            let dir = tempfile::tempdir()?;
            let start = Instant::now();
            let s = synthetic(&dir.path().join("bench.db"), args.n, args.dim)?;
            _tmp = Some(dir);
            (s, "docs".to_string(), Some(start.elapsed().as_secs_f64()))
        }
    };
    let info = store.collection(&name)?;
    let dim = info.dim.context("collection has no dimension")?;
    let metric: Metric = info.metric.unwrap_or_default();

    // The baseline's copy of the vectors, read from the table.
    let mut ids = Vec::new();
    let mut flat = Vec::new();
    store.scan(&name, |r| {
        ids.push(r.id);
        flat.extend_from_slice(&r.vector);
        Ok(())
    })?;
    let norms: Vec<f32> = flat
        .chunks_exact(dim)
        .map(|r| scalar_dot(r, r).sqrt())
        .collect();
    let n = ids.len();
    if n == 0 {
        bail!("collection {name:?} is empty: nothing to search");
    }
    let queries = make_queries(args.queries, dim);

    // First query: loads the cache.
    let start = Instant::now();
    store.search(&name, &queries[0], args.k, None)?;
    let load_s = start.elapsed().as_secs_f64();
    let stats = store.search_stats(&name)?;

    let start = Instant::now();
    let mut quiver_ids = Vec::with_capacity(queries.len());
    for q in &queries {
        let hits = store.search(&name, q, args.k, None)?;
        quiver_ids.push(hits.into_iter().map(|h| h.id).collect::<Vec<_>>());
    }
    let quiver_s = start.elapsed().as_secs_f64();

    let start = Instant::now();
    let mut scalar_ids = Vec::with_capacity(queries.len());
    for q in &queries {
        let best = scalar_top_k(&flat, &norms, dim, q, args.k, metric);
        scalar_ids.push(best.into_iter().map(|i| ids[i].clone()).collect::<Vec<_>>());
    }
    let scalar_s = start.elapsed().as_secs_f64();

    // Same answers, up to neighbours within rounding of each other: count
    // the queries whose top-k id sets agree.
    let agree = quiver_ids
        .iter()
        .zip(&scalar_ids)
        .filter(|(a, b)| {
            let mut a: Vec<&String> = a.iter().collect();
            let mut b: Vec<&String> = b.iter().collect();
            a.sort();
            b.sort();
            a == b
        })
        .count();
    let nq = queries.len() as f64;
    let quiver_qps = nq / quiver_s;
    let scalar_qps = nq / scalar_s;
    let ratio = quiver_qps / scalar_qps;
    if json {
        crate::output::json(&serde_json::json!({
            "bench": "search", "n": n, "dim": dim, "k": args.k, "queries": queries.len(),
            "metric": metric.as_str(), "quiver_qps": quiver_qps, "scalar_qps": scalar_qps,
            "ratio": ratio, "load_s": load_s, "build_s": build_s,
            "matrix_bytes": stats.matrix_bytes, "cache_bytes": stats.total_bytes,
            "threads": std::thread::available_parallelism().map_or(1, |p| p.get()),
            "queries_agreeing": agree,
        }))?;
    } else {
        println!(
            "k-NN search: {n} x {dim}-dim ({metric}), k = {}, {} queries",
            args.k,
            queries.len()
        );
        if let Some(b) = build_s {
            println!("  synthetic store built in {b:.2} s");
        }
        println!(
            "  cache load   {load_s:>9.3} s   matrix {:.1} MB, {:.1} MB in all",
            stats.matrix_bytes as f64 / 1e6,
            stats.total_bytes as f64 / 1e6
        );
        println!(
            "  scalar loop  {scalar_qps:>9.1} qps  {:>8.3} ms/query",
            1e3 / scalar_qps
        );
        println!(
            "  quiverdb     {quiver_qps:>9.1} qps  {:>8.3} ms/query",
            1e3 / quiver_qps
        );
        println!("  ratio        {ratio:>9.2}x");
        println!(
            "  same top-{} ids on {agree} of {} queries",
            args.k,
            queries.len()
        );
    }
    Ok(())
}

fn synthetic(path: &Path, n: usize, dim: usize) -> Result<Store> {
    let mut s = Store::init(path)?;
    s.create_collection(&CollectionSpec::new("docs", dim))?;
    let rows = crate::bench::records(n, dim, 0x5eed);
    for chunk in rows.chunks(5000) {
        s.put_many("docs", chunk)?;
    }
    Ok(s)
}

/// Random query vectors in [-1, 1), deterministic.
fn make_queries(count: usize, dim: usize) -> Vec<Vec<f32>> {
    let mut state = 0x9e37_79b9_7f4a_7c15u64;
    let mut next = move || {
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        (state >> 40) as f32 / (1u64 << 24) as f32 * 2.0 - 1.0
    };
    (0..count)
        .map(|_| (0..dim).map(|_| next()).collect())
        .collect()
}

/// (distance, index) with a total order, for the baseline's heap.
struct Scored(f32, usize);

impl PartialEq for Scored {
    fn eq(&self, o: &Self) -> bool {
        self.cmp(o) == Ordering::Equal
    }
}
impl Eq for Scored {}
impl PartialOrd for Scored {
    fn partial_cmp(&self, o: &Self) -> Option<Ordering> {
        Some(self.cmp(o))
    }
}
impl Ord for Scored {
    fn cmp(&self, o: &Self) -> Ordering {
        self.0.total_cmp(&o.0).then(self.1.cmp(&o.1))
    }
}

/// The baseline: one thread, one accumulator per sum, a bounded heap. Row
/// norms for cosine are precomputed, as quiverdb does, so the comparison
/// measures the scan itself.
fn scalar_top_k(
    flat: &[f32],
    norms: &[f32],
    dim: usize,
    q: &[f32],
    k: usize,
    metric: Metric,
) -> Vec<usize> {
    let q_norm = scalar_dot(q, q).sqrt();
    let mut heap: BinaryHeap<Scored> = BinaryHeap::with_capacity(k + 1);
    for (i, row) in flat.chunks_exact(dim).enumerate() {
        let d = match metric {
            Metric::L2 => {
                let mut s = 0.0f32;
                for (a, b) in row.iter().zip(q) {
                    let t = a - b;
                    s += t * t;
                }
                s.sqrt()
            }
            Metric::Dot => -scalar_dot(row, q),
            Metric::Cosine => {
                let denom = norms[i] * q_norm;
                if denom > 0.0 {
                    1.0 - scalar_dot(row, q) / denom
                } else {
                    1.0
                }
            }
        };
        heap.push(Scored(d, i));
        if heap.len() > k {
            heap.pop();
        }
    }
    heap.into_sorted_vec().into_iter().map(|s| s.1).collect()
}

fn scalar_dot(a: &[f32], b: &[f32]) -> f32 {
    let mut s = 0.0f32;
    for (x, y) in a.iter().zip(b) {
        s += x * y;
    }
    s
}

"""Figures of the Python package against the CLI's own benchmarks, on the
same machine in one run. Prints one JSON object.

    python bindings/python/bench.py --quiver target/release/quiver [--n 100000] [--dim 384]

- put_many: N × DIM float32 rows with ~100-byte metadata, 1,000 a
  transaction, against `quiver bench write`'s `quiver_s` (the same write
  through the Rust API, in the CLI's process), each side the best of 3 runs, the two
  alternating for --rounds rounds: the best of each side, and each round's
  ratio (`put_many_round_ratios`, median `put_many_median_ratio`).
- search: queries per second on N × DIM (cosine, k=10) once the collection
  is loaded, against `quiver bench search`'s `quiver_qps`.
- sync: a fresh replica pulling SYNC_N × DIM rows from a `quiver serve`
  daemon, from Python (`db.sync`) and with `quiver sync`, best of 3 each.
"""

import argparse
import json
import os
import subprocess
import tempfile
import time

import numpy as np

import quiverdb


def cli_json(exe, *args):
    out = subprocess.run([exe, *args], capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def rows(n, dim, seed):
    rng = np.random.default_rng(seed)
    m = rng.uniform(-1, 1, size=(n, dim)).astype(np.float32)
    ids = [os.urandom(16).hex() for _ in range(n)]
    metas = [
        {"source": "bench", "index": i, "tags": ["alpha", "beta"], "score": round(float(m[i, 0]), 3),
         "text": "lorem ipsum dolor sit amet"}
        for i in range(n)
    ]
    return ids, m, metas


def bench_put_many(folder, n, dim, ids, m, metas, runs=3, tag=0):
    best = float("inf")
    for r in range(runs):
        db = quiverdb.open(os.path.join(folder, f"put{tag}-{r}.db"))
        docs = db.create_collection("docs", dim=dim)
        t = time.perf_counter()
        for i in range(0, n, 1000):
            docs.put_many(ids[i:i + 1000], m[i:i + 1000], metadatas=metas[i:i + 1000])
        best = min(best, time.perf_counter() - t)
        db.close()
    return best


def bench_search(folder, dim, ids, m, queries=100):
    db = quiverdb.open(os.path.join(folder, "search.db"))
    docs = db.create_collection("docs", dim=dim)
    for i in range(0, len(ids), 10_000):
        docs.put_many(ids[i:i + 10_000], m[i:i + 10_000])
    rng = np.random.default_rng(3)
    qs = rng.uniform(-1, 1, size=(queries, dim)).astype(np.float32)
    t = time.perf_counter()
    docs.search(qs[0], k=10)  # loads the collection into memory
    load = time.perf_counter() - t
    t = time.perf_counter()
    for q in qs:
        docs.search(q, k=10)
    qps = queries / (time.perf_counter() - t)
    db.close()
    return qps, load


def bench_sync(folder, exe, dim, n, runs=3):
    src = os.path.join(folder, "src.db")
    db = quiverdb.open(src, name="source")
    docs = db.create_collection("docs", dim=dim)
    ids, m, metas = rows(n, dim, 11)
    for i in range(0, n, 1000):
        docs.put_many(ids[i:i + 1000], m[i:i + 1000], metadatas=metas[i:i + 1000])
    db.close()
    p = subprocess.Popen([exe, "--db", src, "serve", "--listen", "127.0.0.1:0", "--http", "off"],
                         stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    try:
        addr = p.stdout.readline().split()[2]
        fp = p.stdout.readline().split()[2]
        py_best = cli_best = float("inf")
        for r in range(runs):
            dst = quiverdb.open(os.path.join(folder, f"py{r}.db"))
            t = time.perf_counter()
            dst.sync(addr, pin=fp)
            py_best = min(py_best, time.perf_counter() - t)
            assert len(dst.collection("docs")) == n
            dst.close()
            cli_db = os.path.join(folder, f"cli{r}.db")
            subprocess.run([exe, "--db", cli_db, "init"], check=True, capture_output=True)
            t = time.perf_counter()
            subprocess.run([exe, "--db", cli_db, "sync", addr, "--pin", fp], check=True, capture_output=True)
            cli_best = min(cli_best, time.perf_counter() - t)
    finally:
        p.terminate()
        p.wait()
    return py_best, cli_best


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--quiver", required=True, help="the quiver binary (a release build)")
    ap.add_argument("--n", type=int, default=100_000)
    ap.add_argument("--dim", type=int, default=384)
    ap.add_argument("--sync-n", type=int, default=20_000)
    ap.add_argument("--rounds", type=int, default=3, help="alternating put_many / bench write rounds")
    a = ap.parse_args()
    with tempfile.TemporaryDirectory() as folder:
        ids, m, metas = rows(a.n, a.dim, 1)
        # Alternate the two sides, so that a slow spell of the machine
        # weighs on both; each round's ratio counts.
        puts, writes = [], []
        for r in range(a.rounds):
            puts.append(bench_put_many(folder, a.n, a.dim, ids, m, metas, runs=3, tag=r))
            writes.append(cli_json(a.quiver, "bench", "write", "--n", str(a.n), "--dim", str(a.dim), "--json")["quiver_s"])
        ratios = sorted(p / w for p, w in zip(puts, writes))
        put, write = min(puts), {"quiver_s": min(writes)}
        qps, load = bench_search(folder, a.dim, ids, m)
        search = cli_json(a.quiver, "bench", "search", "--n", str(a.n), "--dim", str(a.dim), "--json")
        py_sync, cli_sync = bench_sync(folder, a.quiver, a.dim, a.sync_n)
    print(json.dumps({
        "n": a.n, "dim": a.dim,
        "python_put_many_s": round(put, 3), "cli_bench_write_quiver_s": round(write["quiver_s"], 3),
        "put_many_ratio": round(put / write["quiver_s"], 3),
        "put_many_round_ratios": [round(x, 3) for x in ratios],
        "put_many_median_ratio": round(ratios[len(ratios) // 2], 3),
        "python_qps": round(qps, 1), "cli_bench_search_qps": round(search["quiver_qps"], 1),
        "time_per_query_ratio": round(search["quiver_qps"] / qps, 3), "python_first_query_s": round(load, 3),
        "sync_n": a.sync_n, "python_sync_s": round(py_sync, 3), "cli_sync_s": round(cli_sync, 3),
        "sync_ratio": round(py_sync / cli_sync, 3),
    }))


if __name__ == "__main__":
    main()

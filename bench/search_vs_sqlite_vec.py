#!/usr/bin/env python3
"""k-NN queries per second: quiverdb against sqlite-vec's brute force.

Generates N random float32 vectors, loads the same vectors into

  * a quiverdb store, through `quiver import` (collection `docs`, metric l2),
  * a sqlite-vec `vec0` table (L2, its default), and a plain table scanned
    with `vec_distance_l2`,

then times k-NN queries on each: sqlite-vec in this process, quiverdb with
`quiver bench search --json` (which also times a scalar brute-force loop as
its own baseline). A few queries are also run through `quiver search` and
checked against sqlite-vec's answers.

Usage: python3 bench/search_vs_sqlite_vec.py [--quiver target/release/quiver]
       [--n 100000] [--dim 384] [--k 10] [--queries 100] [--json]

Needs the `sqlite-vec` package (installed with pip when missing) and a
Python sqlite3 that can load extensions (when the standard one cannot,
`pysqlite3-binary` is installed and used). numpy is used when present or
installable, plain `random` otherwise.
"""

import argparse
import importlib
import json
import os
import random
import shutil
import struct
import subprocess
import sys
import tempfile
import time


def pip_install(*packages):
    print(f"installing {' '.join(packages)} with pip ...", file=sys.stderr)
    subprocess.run(
        [sys.executable, "-m", "pip", "install", "--quiet", *packages], check=True
    )
    importlib.invalidate_caches()


def need(module, package):
    try:
        return importlib.import_module(module)
    except ImportError:
        pip_install(package)
        return importlib.import_module(module)


def sqlite_with_extensions():
    """A sqlite3 module whose connections can load extensions."""
    import sqlite3

    if hasattr(sqlite3.connect(":memory:"), "enable_load_extension"):
        return sqlite3
    try:
        return importlib.import_module("pysqlite3.dbapi2")
    except ImportError:
        pip_install("pysqlite3-binary")
        return importlib.import_module("pysqlite3.dbapi2")


def try_numpy():
    try:
        return importlib.import_module("numpy")
    except ImportError:
        try:
            pip_install("numpy")
            return importlib.import_module("numpy")
        except Exception:  # noqa: BLE001 - any failure means: go on without
            return None


def make_vectors(n, dim, seed):
    """Rows of floats with 4 decimals, so the JSON text and the float32
    bytes given to sqlite-vec hold the same numbers. Returns (rows as
    lists of Python floats, float32 bytes per row)."""
    np = try_numpy()
    if np is not None:
        rng = np.random.default_rng(seed)
        m = np.round(rng.uniform(-1.0, 1.0, size=(n, dim)), 4)
        f32 = m.astype(np.float32)
        return m.tolist(), [row.tobytes() for row in f32]
    rnd = random.Random(seed)
    rows = [[round(rnd.uniform(-1.0, 1.0), 4) for _ in range(dim)] for _ in range(n)]
    return rows, [struct.pack(f"<{dim}f", *r) for r in rows]


def run(cmd, **kw):
    out = subprocess.run(cmd, check=True, capture_output=True, text=True, **kw)
    return out.stdout


def find_quiver(arg):
    if arg:
        return arg
    here = os.path.dirname(os.path.abspath(__file__))
    root = os.path.dirname(here)
    candidates = [os.path.join(root, "target", "release", "quiver")]
    if os.environ.get("CARGO_TARGET_DIR"):
        candidates.insert(0, os.path.join(os.environ["CARGO_TARGET_DIR"], "release", "quiver"))
    for c in candidates:
        if os.path.exists(c):
            return c
    sys.exit(
        "quiver binary not found; build it with `cargo build --release -p quiver-cli` "
        "or pass --quiver PATH"
    )


def time_queries(conn, sql, queries):
    conn.execute(sql, (queries[0],)).fetchall()  # warm the page cache
    start = time.perf_counter()
    answers = [conn.execute(sql, (q,)).fetchall() for q in queries]
    return len(queries) / (time.perf_counter() - start), answers


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quiver", help="path of the quiver binary")
    ap.add_argument("--n", type=int, default=100_000)
    ap.add_argument("--dim", type=int, default=384)
    ap.add_argument("--k", type=int, default=10)
    ap.add_argument("--queries", type=int, default=100)
    ap.add_argument("--seed", type=int, default=7)
    ap.add_argument("--workdir", help="keep the files here instead of a temporary folder")
    ap.add_argument("--no-scan", action="store_true", help="skip the vec_distance_l2 scan")
    ap.add_argument("--json", action="store_true", help="print one JSON object")
    a = ap.parse_args()

    quiver = find_quiver(a.quiver)
    sqlite_vec = need("sqlite_vec", "sqlite-vec")
    sq = sqlite_with_extensions()
    work = a.workdir or tempfile.mkdtemp(prefix="quiver-bench-")
    os.makedirs(work, exist_ok=True)
    log = (lambda *x: None) if a.json else (lambda *x: print(*x, file=sys.stderr))
    try:
        log(f"generating {a.n} x {a.dim} vectors in {work}")
        rows, blobs = make_vectors(a.n, a.dim, a.seed)
        _, qblobs = make_vectors(a.queries, a.dim, a.seed + 1)
        jsonl = os.path.join(work, "vectors.jsonl")
        with open(jsonl, "w") as f:
            for i, r in enumerate(rows):
                f.write(json.dumps({"id": f"v{i:07d}", "vector": r, "metadata": {"i": i}}))
                f.write("\n")
        del rows

        # quiverdb: init, collection, import.
        db = os.path.join(work, "quiver.db")
        if os.path.exists(db):
            os.remove(db)
        t = time.perf_counter()
        run([quiver, "--db", db, "init"])
        run([quiver, "--db", db, "collection", "create", "docs", "--dim", str(a.dim), "--metric", "l2"])
        run([quiver, "--db", db, "import", "docs", jsonl, "--batch", "5000"])
        quiver_import_s = time.perf_counter() - t
        log(f"quiver import: {quiver_import_s:.1f} s")

        # sqlite-vec: vec0 table and a plain table, same vectors, rowid = i + 1.
        vdb = os.path.join(work, "sqlite_vec.db")
        if os.path.exists(vdb):
            os.remove(vdb)
        conn = sq.connect(vdb)
        conn.enable_load_extension(True)
        sqlite_vec.load(conn)
        conn.enable_load_extension(False)
        conn.execute("PRAGMA cache_size = -2000000")  # 2 GB: keep every page in memory
        conn.execute(f"CREATE VIRTUAL TABLE vec_docs USING vec0(embedding float[{a.dim}])")
        conn.execute("CREATE TABLE plain_docs(id INTEGER PRIMARY KEY, embedding BLOB NOT NULL)")
        t = time.perf_counter()
        with conn:
            conn.executemany(
                "INSERT INTO vec_docs(rowid, embedding) VALUES (?, ?)",
                ((i + 1, b) for i, b in enumerate(blobs)),
            )
            if not a.no_scan:
                conn.executemany(
                    "INSERT INTO plain_docs(id, embedding) VALUES (?, ?)",
                    ((i + 1, b) for i, b in enumerate(blobs)),
                )
        vec_insert_s = time.perf_counter() - t
        log(f"sqlite-vec insert: {vec_insert_s:.1f} s ({conn.execute('select vec_version()').fetchone()[0]})")

        knn_sql = f"SELECT rowid, distance FROM vec_docs WHERE embedding MATCH ? AND k = {a.k}"
        vec0_qps, vec0_answers = time_queries(conn, knn_sql, qblobs)
        log(f"sqlite-vec vec0: {vec0_qps:.1f} qps")
        scan_qps = None
        if not a.no_scan:
            scan_sql = (
                "SELECT id, vec_distance_l2(embedding, ?) AS d FROM plain_docs "
                f"ORDER BY d LIMIT {a.k}"
            )
            scan_qps, _ = time_queries(conn, scan_sql, qblobs)
            log(f"sqlite-vec scan: {scan_qps:.1f} qps")

        # The same answers: a few queries through `quiver search`.
        agree = 0
        checked = min(3, a.queries)
        for q, want in zip(qblobs[:checked], vec0_answers[:checked]):
            vec = list(struct.unpack(f"<{a.dim}f", q))
            out = json.loads(run([quiver, "--db", db, "--json", "search", "docs",
                                  "--vector", json.dumps(vec), "--k", str(a.k)]))
            got = [int(h["id"][1:]) + 1 for h in out["hits"]]
            agree += sorted(got) == sorted(r[0] for r in want)

        qb = json.loads(run([quiver, "--db", db, "--json", "bench", "search",
                             "--collection", "docs", "--k", str(a.k),
                             "--queries", str(a.queries)]))
        conn.close()

        result = {
            "n": a.n, "dim": a.dim, "k": a.k, "queries": a.queries,
            "sqlite_vec_version": sqlite_vec.__version__ if hasattr(sqlite_vec, "__version__") else None,
            "sqlite_vec_vec0_qps": vec0_qps,
            "sqlite_vec_scan_qps": scan_qps,
            "quiver_qps": qb["quiver_qps"],
            "quiver_scalar_loop_qps": qb["scalar_qps"],
            "quiver_load_s": qb["load_s"],
            "quiver_matrix_bytes": qb["matrix_bytes"],
            "quiver_cache_bytes": qb.get("cache_bytes"),
            "ratio_vs_vec0": qb["quiver_qps"] / vec0_qps,
            "ratio_vs_scan": qb["quiver_qps"] / scan_qps if scan_qps else None,
            "same_answers": f"{agree}/{checked}",
            "quiver_import_s": quiver_import_s,
            "sqlite_vec_insert_s": vec_insert_s,
        }
        if a.json:
            print(json.dumps(result))
            return
        print(f"\nk-NN, {a.n} x {a.dim} float32, L2, k = {a.k}, {a.queries} queries, exact")
        print(f"{'engine':<44}{'qps':>10}{'ms/query':>11}")
        lines = [
            ("sqlite-vec vec0 (MATCH ... AND k = ?)", vec0_qps),
            ("sqlite-vec vec_distance_l2 scan", scan_qps),
            ("quiverdb scalar loop (in-process baseline)", qb["scalar_qps"]),
            ("quiverdb Store::search", qb["quiver_qps"]),
        ]
        for name, qps in lines:
            if qps:
                print(f"{name:<44}{qps:>10.1f}{1000 / qps:>11.2f}")
        print(f"\nquiverdb / sqlite-vec vec0: {result['ratio_vs_vec0']:.2f}x")
        if scan_qps:
            print(f"quiverdb / sqlite-vec scan: {result['ratio_vs_scan']:.2f}x")
        print(f"quiverdb cache load {qb['load_s']:.2f} s, matrix {qb['matrix_bytes'] / 1e6:.1f} MB")
        print(f"same top-{a.k} as sqlite-vec on {agree} of {checked} checked queries")
    finally:
        if not a.workdir:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()

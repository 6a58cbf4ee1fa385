#!/usr/bin/env python3
"""One-shot initial syncs through the fault proxy: the network table of the
README. Builds nothing; give it the release binaries.

    python3 scripts/netbench.py [--quiver target/release/quiver]
        [--chaos target/release/quiver-chaos] [--rows 20000] [--dim 64]
        [--runs 3] [--seed 7] [--cases clean,loss5,...] [--timeout 300]

A source store of ROWS x DIM rows is served by `quiver serve`; the proxy
sits in front of it; for each case a fresh replica runs `quiver sync`
through the proxy, and the wall time of the whole process is taken (the
median of RUNS). Each case prints one JSON line; the last line is a JSON
object of all medians in seconds.
"""

import argparse
import json
import os
import random
import statistics
import struct
import subprocess
import sys
import tempfile
import time

CASES = {
    "clean": "",
    "loss5": "loss=0.05",
    "loss20": "loss=0.2",
    "dup5": "dup=0.05",
    "delay100": "delay_ms=100",
    "delay100j30": "delay_ms=100 jitter_ms=30",
    "delay100j30r": "delay_ms=100 jitter_ms=30 reorder=true",
    "delay5j5r": "delay_ms=5 jitter_ms=5 reorder=true",
    "loss10delay50": "loss=0.1 delay_ms=50",
    "loss10delay50j50dup2r": "loss=0.1 delay_ms=50 jitter_ms=50 dup=0.02 reorder=true",
}
RESET = "loss=0 burst=0 delay_ms=0 jitter_ms=0 reorder=false dup=0 corrupt=0 truncate=0"


def run(exe, db, *args, **kw):
    return subprocess.run([exe, "--db", db, *args], capture_output=True, text=True, **kw)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--quiver", default="target/release/quiver")
    ap.add_argument("--chaos", default="target/release/quiver-chaos")
    ap.add_argument("--rows", type=int, default=20_000)
    ap.add_argument("--dim", type=int, default=64)
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--seed", type=int, default=7)
    ap.add_argument("--timeout", type=float, default=300)
    ap.add_argument("--cases", default=",".join(CASES))
    ap.add_argument("--heal", default="",
                    help="instead of initial syncs: partitions of these seconds (comma-separated) on a live "
                         "link, clean and with loss 10 %%; rows written during each cross how long after the heal")
    a = ap.parse_args()
    rng = random.Random(a.seed)
    with tempfile.TemporaryDirectory() as d:
        src = os.path.join(d, "src.db")
        run(a.quiver, src, "init", check=True)
        run(a.quiver, src, "collection", "create", "docs", "--dim", str(a.dim), check=True)
        data = os.path.join(d, "rows.jsonl")
        with open(data, "w") as f:
            for i in range(a.rows):
                v = [round(rng.uniform(-1, 1), 6) for _ in range(a.dim)]
                f.write(json.dumps({"id": f"{rng.getrandbits(64):016x}{i}", "vector": v,
                                    "metadata": {"i": i}}) + "\n")
        run(a.quiver, src, "import", "docs", data, check=True)
        serve = subprocess.Popen([a.quiver, "--db", src, "serve", "--listen", "127.0.0.1:0", "--http", "off"],
                                 stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
        addr = serve.stdout.readline().split()[2]
        fp = serve.stdout.readline().split()[2]
        chaos = subprocess.Popen([a.chaos, "--upstream", addr, "--seed", str(a.seed)],
                                 stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        proxy = chaos.stdout.readline().split()[3]

        def command(line):
            chaos.stdin.write(line + "\n")
            chaos.stdin.flush()
            answer = chaos.stdout.readline().strip()
            if answer.startswith("error"):
                sys.exit(f"proxy: {answer}")
            return answer

        expected = run(a.quiver, src, "export", "docs", check=True).stdout
        medians = {}
        if a.heal:
            try:
                heal(a, d, src, proxy, fp, command)
            finally:
                chaos.kill()
                serve.terminate()
                serve.wait()
            return
        try:
            for name in a.cases.split(","):
                command(f"set both {RESET}")
                if CASES[name]:
                    command(f"set both {CASES[name]}")
                times, attempts = [], []
                for r in range(a.runs):
                    dst = os.path.join(d, f"{name}-{r}.db")
                    run(a.quiver, dst, "init", check=True)
                    t = time.perf_counter()
                    try:
                        out = run(a.quiver, dst, "--json", "sync", proxy, "--pin", fp, timeout=a.timeout)
                    except subprocess.TimeoutExpired:
                        times.append(float("inf"))
                        continue
                    took = time.perf_counter() - t
                    if out.returncode != 0:
                        sys.exit(f"{name}: sync failed: {out.stderr.strip()[-300:]}")
                    if run(a.quiver, dst, "export", "docs", check=True).stdout != expected:
                        sys.exit(f"{name}: the replica differs from the source")
                    times.append(took)
                    try:
                        attempts.append(json.loads(out.stdout.strip().splitlines()[-1]).get("attempts"))
                    except (ValueError, IndexError):
                        attempts.append(None)
                medians[name] = round(statistics.median(times), 3)
                print(json.dumps({"case": name, "faults": CASES[name], "runs_s": [round(x, 3) for x in times],
                                  "median_s": medians[name], "attempts": attempts, "proxy": json.loads(command("stats"))}), flush=True)
        finally:
            chaos.kill()
            serve.terminate()
            serve.wait()
    print(json.dumps(medians))


def heal(a, d, src, proxy, fp, command):
    """Partitions of a live link: the time from the heal until a row written
    on the source during the partition is on the replica."""
    dst = os.path.join(d, "live.db")
    run(a.quiver, dst, "init", check=True)
    link = subprocess.Popen([a.quiver, "--db", dst, "sync", proxy, "--pin", fp, "--watch"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    vec = json.dumps([0.5] * a.dim)

    def arrives(rid, limit):
        t = time.perf_counter()
        while time.perf_counter() - t < limit:
            if run(a.quiver, dst, "get", "docs", rid).returncode == 0:
                return time.perf_counter() - t
            time.sleep(0.02)
        return float("inf")

    results = {}
    try:
        run(a.quiver, src, "put", "docs", "warmup", "--vector", vec, check=True)
        if arrives("warmup", 120) == float("inf"):
            sys.exit("the live link never delivered its first row")
        for loss in ("0", "0.1"):
            for secs in [float(x) for x in a.heal.split(",")]:
                command(f"set both {RESET} loss={loss}")
                command("partition")
                rid = f"p{secs}-{loss}"
                time.sleep(min(1.0, secs / 2))
                run(a.quiver, src, "put", "docs", rid, "--vector", vec, check=True)
                time.sleep(max(0.0, secs - min(1.0, secs / 2)))
                command("heal")
                took = arrives(rid, 120)
                key = f"partition{secs:g}s_loss{loss}"
                results[key] = round(took, 3)
                print(json.dumps({"case": key, "after_heal_s": results[key]}), flush=True)
    finally:
        link.terminate()
        link.wait()
    print(json.dumps(results))


if __name__ == "__main__":
    main()

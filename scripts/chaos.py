#!/usr/bin/env python3
"""The chaos run: real `quiver serve` daemons with live links through fault
proxies, random writes from three kinds of writer, random faults, kills and
restarts; then the faults heal and the run checks what must hold.

    python3 scripts/chaos.py [--seed N] [--duration SECS] [--nodes 3..5]

Each node is a store served by `quiver serve` on a fixed port. Node i keeps a
live link to every node j > i through a `quiver-chaos` UDP relay of its own
(so every pair syncs over a link that misbehaves). While the run lasts, a
seeded schedule does, at random:

- writes to the collection `docs` with the CLI (`quiver put`, `quiver
  delete`), and to the replicated table `notes` with the `sqlite3` shell and
  with Python's `sqlite3` (upserts and deletes), on ids drawn from a small
  pool so that replicas write the same rows concurrently (conflicts), and on
  fresh ids;
- one-shot `quiver sync` between two nodes, straight, not through a relay;
- fault changes on a relay: loss, bursts, delay with jitter, reordering,
  duplication, partitions, heals;
- SIGKILL of a daemon (restarted a moment later), SIGTERM of a daemon
  (restarted too), SIGKILL and restart of a relay.

At the end every relay heals, every daemon runs, and the run waits for the
replicas to agree, then checks:

- every store's exports of `docs` and `notes` are byte-identical;
- no acknowledged write is lost: for each row, its final state is the last
  write some node made to it (a value, or its absence after a delete), and
  each row written once, on a fresh id, holds exactly that write;
- no `panicked` in any daemon's or command's output;
- every store passes `PRAGMA integrity_check`;
- each daemon's resident memory stayed under --max-rss-mib.

The seed drives every choice (the schedule, the values, the relays' own
seeds) and is printed; a failing seed can be run again. The last line is
`chaos holds: …` with the figures, or `FAIL: …` (exit 1).
"""

import argparse
import json
import os
import random
import re
import signal
import socket
import sqlite3
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def fail(msg):
    print(f"FAIL: {msg}", flush=True)
    sys.exit(1)


def ephemeral_low():
    """The lowest port the kernel hands out to outgoing connections."""
    try:
        with open("/proc/sys/net/ipv4/ip_local_port_range") as f:
            return int(f.read().split()[0])
    except (OSError, ValueError, IndexError):
        return 32768


def free_port(rng):
    """A port number free on both UDP and TCP on loopback, below the
    ephemeral range: a daemon restarted on its port must not find it taken
    by some process's outgoing connection meanwhile."""
    high = min(ephemeral_low(), 65536) - 1
    while True:
        port = rng.randrange(10000, high)
        u = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        t = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        try:
            u.bind(("127.0.0.1", port))
            t.bind(("127.0.0.1", port))
            return port
        except OSError:
            continue
        finally:
            t.close()
            u.close()


class Run:
    def __init__(self, args):
        self.a = args
        self.rng = random.Random(args.seed)
        self.dir = tempfile.mkdtemp(prefix="quiver-chaos-")
        self.nodes = []  # dicts: name, db, port, fp, proc, log
        self.relays = {}  # (i, j) -> dict: port, proc, seed
        self.writes = []  # (node, table, id, state or None, acknowledged)
        self.fresh = {}  # (table, id) -> state, rows written once
        self.counts = {"writes": 0, "acknowledged": 0, "syncs": 0, "kills": 0,
                       "terms": 0, "relay_kills": 0, "faults": 0}
        self.max_rss = {}
        self.token = 0

    # -- processes --------------------------------------------------------

    def q(self, node, *args, timeout=60):
        return subprocess.run([self.a.quiver, "--db", node["db"], *args],
                              capture_output=True, text=True, timeout=timeout)

    def init(self):
        for i in range(self.a.nodes):
            name = f"n{i}"
            db = os.path.join(self.dir, f"{name}.db")
            out = subprocess.run([self.a.quiver, "--db", db, "init", "--name", name],
                                 capture_output=True, text=True, check=True).stdout
            fp = re.search(r"\b[0-9a-f]{64}\b", out).group(0)
            node = {"i": i, "name": name, "db": db, "port": free_port(self.rng), "fp": fp,
                    "proc": None, "log": os.path.join(self.dir, f"{name}.log")}
            self.nodes.append(node)
            for args in (["collection", "create", "docs", "--dim", "4"],
                         ["sql", "CREATE TABLE notes(id TEXT PRIMARY KEY, body TEXT)"],
                         ["table", "add", "notes"]):
                r = self.q(node, *args)
                if r.returncode != 0:
                    fail(f"setting up {name}: {' '.join(args)}: {r.stderr.strip()}")
        for i in range(len(self.nodes)):
            for j in range(i + 1, len(self.nodes)):
                self.relays[(i, j)] = {"port": free_port(self.rng), "proc": None,
                                       "seed": self.rng.randrange(1 << 32)}

    def start_relay(self, key):
        r = self.relays[key]
        up = self.nodes[key[1]]["port"]
        r["proc"] = subprocess.Popen(
            [self.a.chaos, "--listen", f"127.0.0.1:{r['port']}", "--upstream",
             f"127.0.0.1:{up}", "--seed", str(r["seed"])],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        first = r["proc"].stdout.readline()
        if "seed" not in first:
            fail(f"relay {key} did not start: {first!r}")

    def relay_cmd(self, key, line):
        p = self.relays[key]["proc"]
        if p is None or p.poll() is not None:
            return
        try:
            p.stdin.write(line + "\n")
            p.stdin.flush()
            answer = p.stdout.readline().strip()
        except (BrokenPipeError, OSError):
            return
        if answer != "ok" and not answer.startswith("{"):
            fail(f"relay {key} refused {line!r}: {answer}")

    def start_node(self, node):
        peers = []
        for (i, j), r in self.relays.items():
            if i == node["i"]:
                peers += ["--peer", f"127.0.0.1:{r['port']}@{self.nodes[j]['fp']}"]
        log = open(node["log"], "a")
        node["proc"] = subprocess.Popen(
            [self.a.quiver, "--db", node["db"], "serve", "--listen",
             f"127.0.0.1:{node['port']}", "--http", "off", *peers],
            stdout=log, stderr=log)
        # Up once it listens (a restarted one may wait for the lock a moment).
        deadline = time.time() + 15
        while time.time() < deadline:
            if node["proc"].poll() is not None:
                fail(f"{node['name']} exited at start (code {node['proc'].returncode}); see {node['log']}")
            try:
                with socket.create_connection(("127.0.0.1", node["port"]), timeout=0.2):
                    return
            except OSError:
                time.sleep(0.05)
        fail(f"{node['name']} did not start listening; see {node['log']}")

    def sample_rss(self):
        for n in self.nodes:
            p = n["proc"]
            if p is None or p.poll() is not None:
                continue
            try:
                with open(f"/proc/{p.pid}/status") as f:
                    for line in f:
                        if line.startswith("VmRSS:"):
                            kib = int(line.split()[1])
                            self.max_rss[n["name"]] = max(self.max_rss.get(n["name"], 0), kib)
            except OSError:
                pass

    # -- the workload -----------------------------------------------------

    def next_token(self):
        self.token += 1
        return f"t{self.a.seed}-{self.token}"

    def row_id(self, table):
        if self.rng.random() < 0.3:
            return f"{table}-fresh-{self.next_token()}", True
        return f"{table}-{self.rng.randrange(self.a.pool)}", False

    def record(self, node, table, rid, state, ok, fresh):
        self.counts["writes"] += 1
        self.writes.append((node["i"], table, rid, state, ok))
        if ok:
            self.counts["acknowledged"] += 1
            if fresh:
                self.fresh[(table, rid)] = state

    def write_docs(self, node):
        rid, fresh = self.row_id("docs")
        if not fresh and self.rng.random() < 0.2:
            r = self.q(node, "delete", "docs", rid)
            ok = r.returncode == 0 and "not found" not in r.stderr
            self.record(node, "docs", rid, None, ok, False)
            return
        tok = self.next_token()
        vec = [round(self.rng.uniform(-1, 1), 3) for _ in range(4)]
        r = self.q(node, "put", "docs", rid, "--vector", json.dumps(vec),
                   "--meta", json.dumps({"t": tok}), "--content", tok)
        self.record(node, "docs", rid, tok, r.returncode == 0, fresh)

    def write_notes_shell(self, node):
        rid, fresh = self.row_id("notes")
        if not fresh and self.rng.random() < 0.2:
            sql, state = f"DELETE FROM notes WHERE id='{rid}';", None
        else:
            state = self.next_token()
            sql = (f"INSERT INTO notes(id, body) VALUES('{rid}', '{state}') "
                   f"ON CONFLICT(id) DO UPDATE SET body=excluded.body;")
        r = subprocess.run(["sqlite3", "-cmd", ".timeout 10000", node["db"], sql],
                           capture_output=True, text=True, timeout=30)
        self.record(node, "notes", rid, state, r.returncode == 0 and not r.stderr, fresh)

    def write_notes_python(self, node):
        rid, fresh = self.row_id("notes")
        state = None if (not fresh and self.rng.random() < 0.2) else self.next_token()
        ok = True
        try:
            c = sqlite3.connect(node["db"], timeout=10)
            if state is None:
                c.execute("DELETE FROM notes WHERE id=?", (rid,))
            else:
                c.execute("INSERT INTO notes(id, body) VALUES(?, ?) "
                          "ON CONFLICT(id) DO UPDATE SET body=excluded.body", (rid, state))
            c.commit()
            c.close()
        except sqlite3.Error:
            ok = False
        self.record(node, "notes", rid, state, ok, fresh)

    def one_shot_sync(self):
        a, b = self.rng.sample(self.nodes, 2)
        r = self.q(a, "sync", f"127.0.0.1:{b['port']}", "--pin", b["fp"], "--retries", "0")
        self.counts["syncs"] += 1
        self.scan_panic(r.stderr, f"sync {a['name']} -> {b['name']}")

    def fault(self):
        key = self.rng.choice(list(self.relays))
        choice = self.rng.random()
        if choice < 0.25:
            line = "partition " + self.rng.choice(["up", "down", "both"])
        elif choice < 0.45:
            line = "heal"
        else:
            parts = [f"loss={self.rng.choice([0, 0.02, 0.05, 0.1, 0.2])}",
                     f"delay_ms={self.rng.choice([0, 5, 20, 50, 100])}",
                     f"jitter_ms={self.rng.choice([0, 5, 30])}",
                     f"reorder={self.rng.choice(['true', 'false'])}",
                     f"dup={self.rng.choice([0, 0.01, 0.05])}",
                     f"burst={self.rng.choice([0, 0.005])}"]
            line = "set " + self.rng.choice(["up", "down", "both"]) + " " + " ".join(parts)
        self.relay_cmd(key, line)
        self.counts["faults"] += 1

    def kill_node(self, sig):
        node = self.rng.choice(self.nodes)
        p = node["proc"]
        if p is None or p.poll() is not None:
            return
        p.send_signal(sig)
        try:
            p.wait(timeout=20)
        except subprocess.TimeoutExpired:
            fail(f"{node['name']} did not stop on {sig.name} within 20 s")
        if sig == signal.SIGTERM and p.returncode != 0:
            fail(f"{node['name']} exited {p.returncode} on SIGTERM; see {node['log']}")
        self.counts["kills" if sig == signal.SIGKILL else "terms"] += 1
        time.sleep(self.rng.uniform(0.1, 2.0))
        self.start_node(node)

    def kill_relay(self):
        key = self.rng.choice(list(self.relays))
        p = self.relays[key]["proc"]
        p.kill()
        p.wait()
        self.counts["relay_kills"] += 1
        time.sleep(self.rng.uniform(0.1, 1.0))
        self.relays[key]["seed"] = self.rng.randrange(1 << 32)
        self.start_relay(key)

    def scan_panic(self, text, what):
        if "panicked" in text:
            fail(f"a panic in {what}: {text.strip()[:500]}")

    def step(self):
        x = self.rng.random()
        node = self.rng.choice(self.nodes)
        if x < 0.30:
            self.write_docs(node)
        elif x < 0.48:
            self.write_notes_shell(node)
        elif x < 0.66:
            self.write_notes_python(node)
        elif x < 0.74:
            self.one_shot_sync()
        elif x < 0.90:
            self.fault()
        elif x < 0.95:
            self.kill_node(signal.SIGKILL)
        elif x < 0.98:
            self.kill_node(signal.SIGTERM)
        else:
            self.kill_relay()

    # -- the end ----------------------------------------------------------

    def export(self, node, table):
        r = self.q(node, "export", table)
        if r.returncode != 0:
            fail(f"export {table} on {node['name']}: {r.stderr.strip()}")
        return r.stdout

    def converge(self):
        for key in self.relays:
            self.relay_cmd(key, "set both loss=0 delay_ms=0 jitter_ms=0 reorder=false dup=0 burst=0 corrupt=0 truncate=0")
            self.relay_cmd(key, "heal")
        for n in self.nodes:
            if n["proc"] is None or n["proc"].poll() is not None:
                self.start_node(n)
        started = time.time()
        while True:
            exports = [(self.export(n, "docs"), self.export(n, "notes")) for n in self.nodes]
            if all(e == exports[0] for e in exports):
                return time.time() - started, exports[0]
            if time.time() - started > self.a.settle:
                for n, e in zip(self.nodes, exports):
                    print(f"  {n['name']}: docs {len(e[0].splitlines())} rows, notes {len(e[1].splitlines())} rows")
                fail(f"the replicas did not agree within {self.a.settle} s after the faults healed")
            # Live links carry it; a round of one-shot syncs helps rows a
            # link's backoff still waits for.
            time.sleep(1.0)
            if time.time() - started > 10:
                self.one_shot_sync()

    def check_writes(self, docs, notes):
        final = {}
        for line in docs.splitlines():
            r = json.loads(line)
            final[("docs", r["id"])] = (r.get("metadata") or {}).get("t")
        for line in notes.splitlines():
            r = json.loads(line)
            final[("notes", str(r.get("id")))] = r.get("body")
        # The last write each node made to each row: the candidates for
        # its final state.
        last = {}
        for (node, table, rid, state, ok) in self.writes:
            last.setdefault((table, rid), {})[node] = (state, ok)
        for key, by_node in last.items():
            candidates = {s for (s, _ok) in by_node.values()}
            got = final.get(key)
            acked = [s for (s, ok) in by_node.values() if ok]
            if not acked:
                continue
            if got not in candidates:
                fail(f"row {key}: final state {got!r} is not the last write of any node "
                     f"({sorted(map(str, candidates))})")
        for key, state in self.fresh.items():
            if final.get(key) != state:
                fail(f"row {key}, written once and acknowledged, holds {final.get(key)!r} instead of {state!r}")

    def check_stores(self):
        for n in self.nodes:
            c = sqlite3.connect(n["db"], timeout=30)
            r = c.execute("PRAGMA integrity_check").fetchone()[0]
            c.close()
            if r != "ok":
                fail(f"{n['name']} fails integrity_check: {r}")
            with open(n["log"], errors="replace") as f:
                self.scan_panic(f.read(), f"{n['name']}'s log")
        worst = max(self.max_rss.values() or [0]) / 1024
        if worst > self.a.max_rss_mib:
            fail(f"a daemon reached {worst:.0f} MiB of resident memory (limit {self.a.max_rss_mib})")
        return worst

    def stop(self):
        for n in self.nodes:
            if n["proc"] and n["proc"].poll() is None:
                n["proc"].terminate()
        for r in self.relays.values():
            if r["proc"] and r["proc"].poll() is None:
                r["proc"].kill()
        for n in self.nodes:
            if n["proc"]:
                try:
                    n["proc"].wait(timeout=20)
                except subprocess.TimeoutExpired:
                    n["proc"].kill()

    def run(self):
        print(f"chaos: seed {self.a.seed}, {self.a.nodes} nodes, {self.a.duration} s, in {self.dir}", flush=True)
        self.init()
        for key in self.relays:
            self.start_relay(key)
        for n in self.nodes:
            self.start_node(n)
        end = time.time() + self.a.duration
        last_sample = 0
        try:
            while time.time() < end:
                self.step()
                if time.time() - last_sample > 1:
                    self.sample_rss()
                    last_sample = time.time()
                time.sleep(self.rng.uniform(0, 0.05))
            settle, (docs, notes) = self.converge()
            self.sample_rss()
            self.check_writes(docs, notes)
            worst = self.check_stores()
        finally:
            self.stop()
        c = self.counts
        print(f"chaos holds: seed {self.a.seed}, {self.a.nodes} nodes, {self.a.duration} s; "
              f"{c['writes']} writes ({c['acknowledged']} acknowledged), {c['syncs']} one-shot syncs, "
              f"{c['faults']} fault changes, {c['kills']} SIGKILL, {c['terms']} SIGTERM, "
              f"{c['relay_kills']} relay kills; {len(docs.splitlines())} docs and "
              f"{len(notes.splitlines())} notes equal on every node {settle:.1f} s after the heal; "
              f"max daemon RSS {worst:.0f} MiB", flush=True)
        if not self.a.keep:
            subprocess.run(["rm", "-rf", self.dir])


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--duration", type=int, default=600, help="seconds of chaos (default 600)")
    p.add_argument("--nodes", type=int, default=4, choices=[3, 4, 5])
    p.add_argument("--pool", type=int, default=40, help="ids shared by all writers (conflicts)")
    p.add_argument("--settle", type=int, default=180, help="seconds the replicas get to agree after the heal")
    p.add_argument("--max-rss-mib", type=int, default=512)
    p.add_argument("--quiver", default=os.path.join(ROOT, "target/release/quiver"))
    p.add_argument("--chaos", default=None, help="the quiver-chaos binary (default: beside --quiver)")
    p.add_argument("--keep", action="store_true", help="keep the stores and logs")
    a = p.parse_args()
    if a.seed is None:
        a.seed = random.randrange(1 << 31)
    if a.chaos is None:
        a.chaos = os.path.join(os.path.dirname(a.quiver), "quiver-chaos")
    for b in (a.quiver, a.chaos):
        if not os.access(b, os.X_OK):
            fail(f"no binary at {b} (cargo build --release -p quiver-cli -p quiver-chaos)")
    Run(a).run()


if __name__ == "__main__":
    main()

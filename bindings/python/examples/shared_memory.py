"""Two agents share what they learn through a server, each with its own store.

Run it after `pip install ./bindings/python`:

    python bindings/python/examples/shared_memory.py

A hub store serves on loopback. Agent "ada" and agent "bob" each open a
store of their own and keep a live link to the hub. Each records episodes
(tasks it tried, with how they went) in its agent memory, and a note with an
embedding in a vector collection. Every write travels to the other agent
through the hub within milliseconds; each agent then searches its own,
local copy of everything both have learned.
"""

import hashlib
import tempfile
import time

import numpy as np

import quiverdb

DIM = 8


def embed(text: str) -> np.ndarray:
    """A stand-in embedding: deterministic per text, unit length."""
    seed = int.from_bytes(hashlib.sha256(text.encode()).digest()[:8], "little")
    rng = np.random.default_rng(seed)
    v = rng.standard_normal(DIM).astype(np.float32)
    return v / np.linalg.norm(v)


def wait_for(what, check, timeout=10.0):
    deadline = time.monotonic() + timeout
    while not check():
        if time.monotonic() > deadline:
            raise SystemExit(f"timed out waiting for {what}")
        time.sleep(0.01)


def main() -> None:
    folder = tempfile.mkdtemp(prefix="quiverdb-agents-")
    hub = quiverdb.open(f"{folder}/hub.db", name="hub")
    hub.create_collection("notes", dim=DIM, shard="memory")
    hub.memory  # the agent-memory tables, in shard "memory"
    server = hub.serve("127.0.0.1:0", token="team-secret")
    print(f"hub serving on {server.address}")

    agents = {}
    links = []
    for name in ("ada", "bob"):
        db = quiverdb.open(f"{folder}/{name}.db", name=name)
        link = db.live(server.address, pin=server.fingerprint, token="team-secret")
        link.wait_rounds(1)
        links.append(link)
        agents[name] = db
    ada, bob = agents["ada"], agents["bob"]
    wait_for("the schema on both agents", lambda: "notes" in ada.collections() and "notes" in bob.collections())

    lessons = {
        ada: [("parse the CSV export", "use the csv module, not split(',')", True)],
        bob: [("call the billing API", "retry on 429 with the Retry-After header", True),
              ("deploy on Friday", "rolled back: no one was around", False)],
    }
    for db, items in lessons.items():
        for task, lesson, ok in items:
            db.memory.add_episode(task, output=lesson, success=ok, reward=1.0 if ok else -1.0)
            db.collection("notes").put(task, embed(task), metadata={"by": db.name, "ok": ok}, content=lesson)
            print(f"{db.name} learned: {task!r} -> {lesson}")

    wait_for("every episode on both agents", lambda: all(len(d.memory.episodes()) == 3 for d in (ada, bob)))
    for db in (ada, bob):
        others = [e for e in db.memory.episodes() if e["task"] not in {t for t, _, _ in lessons[db]}]
        for e in others:
            print(f"{db.name} now knows from the other agent: {e['task']!r} -> {e['output']}")

    query = embed("call the billing API")
    hits = ada.collection("notes").search(query, k=1, filter={"ok": True})
    print(f"ada asks her own store about billing and finds bob's note: {hits[0].id!r}: {hits[0].content}")

    for link in links:
        link.stop()
    server.stop()


if __name__ == "__main__":
    main()

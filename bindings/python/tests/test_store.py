"""The store from Python: collections, records, search, SQL, memory, events,
and bad input that writes nothing."""

import json
import threading

import numpy as np
import pytest

import quiverdb


def test_open_creates_a_store_with_its_certificate_and_reopens_it(tmp_path):
    path = tmp_path / "agent.db"
    db = quiverdb.open(str(path), name="laptop")
    assert db.name == "laptop"
    assert len(db.site_id) == 32
    assert (tmp_path / "agent.db.cert.pem").exists()
    site = db.site_id
    db.close()
    with pytest.raises(quiverdb.Error):
        db.collections()
    with quiverdb.open(path) as again:
        assert again.site_id == site
        assert again.path == str(path)


def test_records_put_get_delete_and_len(db):
    notes = db.create_collection("notes", dim=3, metric="l2", strategy="lww")
    notes.put("a", np.array([1, 2, 3], dtype=np.float32), metadata={"lang": "en"}, content="hi")
    notes.put("b", [4.0, 5.0, 6.0])
    assert len(notes) == 2
    r = notes.get("a")
    assert r.id == "a" and r.content == "hi" and r.metadata == {"lang": "en"}
    assert r.vector.dtype == np.float32
    np.testing.assert_array_equal(r.vector, [1, 2, 3])
    assert notes.get("nosuch") is None
    assert notes.delete("a") is True
    assert notes.delete("a") is False
    assert len(notes) == 1
    assert db.collection("notes").dim == 3
    assert db.collections() == ["notes"]
    with pytest.raises(quiverdb.NotFound):
        db.collection("nosuch")
    with pytest.raises(quiverdb.ValidationError):
        db.create_collection("notes", dim=3)


def test_put_many_from_a_matrix_and_again_changes_nothing(db, rng):
    notes = db.create_collection("notes", dim=16)
    m = rng.standard_normal((500, 16)).astype(np.float32)
    ids = [f"n{i}" for i in range(500)]
    metas = [{"i": i} for i in range(500)]
    contents = [f"text {i}" for i in range(500)]
    assert notes.put_many(ids, m, metadatas=metas, contents=contents) == 500
    assert len(notes) == 500
    version = db.status()["db_version"]
    assert notes.put_many(ids, m, metadatas=metas, contents=contents) == 0
    assert db.status()["db_version"] == version
    np.testing.assert_array_equal(notes.get("n42").vector, m[42])
    assert notes.get("n42").content == "text 42"


def test_search_with_filters(db, rng):
    notes = db.create_collection("notes", dim=8)
    m = rng.standard_normal((300, 8)).astype(np.float32)
    metas = [{"year": 2000 + i % 30, "tag": "ab"[i % 2], "author": {"name": f"p{i % 3}"}} for i in range(300)]
    notes.put_many([f"n{i}" for i in range(300)], m, metadatas=metas)
    hits = notes.search(m[5], k=3)
    assert [type(h) for h in hits] == [quiverdb.Hit] * 3
    assert hits[0].id == "n5" and hits[0].score == pytest.approx(0, abs=1e-5)
    assert hits[0].distance == hits[0].score
    assert hits[0].score <= hits[1].score <= hits[2].score
    f = {"year": {"$gte": 2010, "$lt": 2020}, "tag": {"$in": ["a"]}}
    for h in notes.search(m[0], k=20, filter=f):
        assert 2010 <= h.metadata["year"] < 2020 and h.metadata["tag"] == "a"
    either = notes.search(m[0], k=50, filter={"$or": [{"author.name": "p1"}, {"tag": "b"}]})
    assert either and all(h.metadata["author"]["name"] == "p1" or h.metadata["tag"] == "b" for h in either)
    with pytest.raises(quiverdb.ValidationError, match=r"\$bogus"):
        notes.search(m[0], filter={"year": {"$bogus": 1}})
    with pytest.raises(quiverdb.ValidationError):
        notes.search(m[0][:4])
    assert "$gte" in quiverdb.Collection.search.__doc__


def test_bad_input_is_refused_and_writes_nothing(db, rng):
    notes = db.create_collection("notes", dim=4)
    notes.put("ok", np.ones(4, dtype=np.float32))
    m = rng.standard_normal((4, 8)).astype(np.float32)
    bad = {
        "wrong dimension": np.ones(3, dtype=np.float32),
        "NaN": np.array([1, np.nan, 1, 1], dtype=np.float32),
        "infinity": np.array([1, np.inf, 1, 1], dtype=np.float32),
        "float64": np.ones(4),
        "non-contiguous": m[:, ::2][0],
        "2-D": np.ones((1, 4), dtype=np.float32),
        "a string": "1,2,3,4",
    }
    for what, v in bad.items():
        with pytest.raises(quiverdb.ValidationError):
            notes.put("x", v)
            pytest.fail(f"{what} was accepted")
    for meta in ([1, 2], "text", 3):
        with pytest.raises(quiverdb.ValidationError, match="metadata"):
            notes.put("x", np.ones(4, dtype=np.float32), metadata=meta)
    with pytest.raises(quiverdb.ValidationError):
        notes.put("x", np.ones(4, dtype=np.float32), metadata={"f": float("nan")})
    with pytest.raises(quiverdb.ValidationError):
        notes.put("x", np.ones(4, dtype=np.float32), metadata={1: "not a str key"})
    # A batch with one bad row writes none of it.
    rows = np.ones((3, 4), dtype=np.float32)
    rows[2, 1] = np.nan
    with pytest.raises(quiverdb.ValidationError, match="NaN"):
        notes.put_many(["p", "q", "r"], rows)
    with pytest.raises(quiverdb.ValidationError, match="float32"):
        notes.put_many(["p"], np.ones((1, 4)))
    with pytest.raises(quiverdb.ValidationError, match="contiguous"):
        notes.put_many(["p", "q", "r", "s"], np.ones((4, 8), dtype=np.float32)[:, ::2])
    with pytest.raises(quiverdb.ValidationError, match="rows"):
        notes.put_many(["p", "q"], np.ones((3, 4), dtype=np.float32))
    with pytest.raises(quiverdb.ValidationError, match="metadatas"):
        notes.put_many(["p"], np.ones((1, 4), dtype=np.float32), metadatas=[{}, {}])
    with pytest.raises(quiverdb.ValidationError, match="must be a dict"):
        notes.put_many(["p", "q"], np.ones((2, 4), dtype=np.float32), metadatas=[{}, ["x"]])
    with pytest.raises(quiverdb.ValidationError, match="metadatas"):
        notes.put_many(["p"], np.ones((1, 4), dtype=np.float32), metadatas=[{"f": float("nan")}])
    with pytest.raises(quiverdb.ValidationError, match="metadatas"):
        notes.put_many(["p"], np.ones((1, 4), dtype=np.float32), metadatas=[{"o": object()}])
    with pytest.raises(quiverdb.ValidationError, match="same once written as strings"):
        notes.put_many(["p"], np.ones((1, 4), dtype=np.float32), metadatas=[{1: "a", "1": "b"}])
    with pytest.raises(quiverdb.ValidationError, match="columns"):
        notes.put_many(["p"], np.ones((1, 0), dtype=np.float32))
    assert len(notes) == 1
    assert [r["id"] for r in db.sql("SELECT id FROM notes")] == ["ok"]
    # numpy scalars in metadata are numbers, in a batch as in a single put.
    notes.put_many(["np"], np.ones((1, 4), dtype=np.float32), metadatas=[{"s": np.float32(0.5), "n": np.int64(3)}])
    assert notes.get("np").metadata == {"s": 0.5, "n": 3}


def test_put_many_writes_metadata_as_put_does(db):
    notes = db.create_collection("notes", dim=2)
    meta = {"z": 1, "a": {"é": "ü\n", "b": [1, 2.5, None, True]}, "m": "x", "f": 1.5e-7, "g": 0.00001}
    nested = {"a": [{1: "x"}, {"k": {2: "y", 10: "z"}}]}
    notes.put("one", np.ones(2, dtype=np.float32), metadata=meta)
    notes.put_many(["many", "none", "ints"], np.ones((3, 2), dtype=np.float32),
                   metadatas=[meta, None, {1: "a", None: "b"}])
    text = {r["id"]: r["metadata"] for r in db.sql("SELECT id, metadata FROM notes")}
    assert json.loads(text["many"]) == json.loads(text["one"])
    assert list(json.loads(text["many"])) == sorted(meta), "keys sorted"
    assert text["none"] == "{}"
    assert notes.get("many").metadata == meta
    assert notes.get("ints").metadata == {"1": "a", "null": "b"}
    notes.put_many(["nested"], np.ones((1, 2), dtype=np.float32), metadatas=[nested])
    with pytest.raises(quiverdb.ValidationError, match="same once written as strings"):
        notes.put_many(["dup"], np.ones((1, 2), dtype=np.float32), metadatas=[{"a": [{1: "x", "1": "y"}]}])
    assert notes.get("nested").metadata == {"a": [{"1": "x"}, {"k": {"10": "z", "2": "y"}}]}
    # What the store could not read back is refused, and nothing is written.
    deep = {}
    for _ in range(200):
        deep = {"d": deep}
    for bad in ({"n": 10**400}, deep):
        with pytest.raises(quiverdb.ValidationError, match="out of range|recursion"):
            notes.put_many(["bad1", "bad2"], np.ones((2, 2), dtype=np.float32), metadatas=[{}, bad])
    assert notes.get("bad1") is None


def test_sql_with_parameters(db):
    db.sql("CREATE TABLE tasks(id TEXT PRIMARY KEY, title TEXT, done INTEGER, blob BLOB)")
    assert db.sql("INSERT INTO tasks VALUES (?, ?, ?, ?)", ["t1", "ship", 0, b"\x00\x01"]) == []
    db.sql("INSERT INTO tasks VALUES (?, ?, ?, NULL)", ("t2", "test", True))
    rows = db.sql("SELECT id, done, blob FROM tasks WHERE done = ? ORDER BY id", [0])
    assert rows == [{"id": "t1", "done": 0, "blob": b"\x00\x01"}]
    assert db.sql("SELECT 1 AS a; SELECT 2 AS b") == [{"b": 2}]
    with pytest.raises(quiverdb.ValidationError, match="parameters"):
        db.sql("SELECT ?", [1, 2])
    with pytest.raises(quiverdb.ValidationError):
        db.sql("SELECT ?", [object()])
    with pytest.raises(quiverdb.Error, match="no such table"):
        db.sql("SELECT * FROM nosuch")


def test_agent_memory(db):
    mem = db.memory
    e1 = mem.add_episode("summarise a paper", output="done", reward=0.9, success=True)
    e2 = mem.add_episode("write tests", embedding=np.ones(4, dtype=np.float32))
    s1 = mem.add_skill("summarise", description="read, then write", success_rate=0.8)
    edge = mem.add_edge(e1, e2, "led_to", weight=0.5)
    assert len(e1) == 36 and e1 != e2
    eps = {e["id"]: e for e in mem.episodes()}
    assert eps[e1]["task"] == "summarise a paper" and eps[e1]["success"] == 1
    assert eps[e2]["embedding"] == np.ones(4, dtype=np.float32).tobytes()
    assert mem.skills()[0]["id"] == s1
    assert mem.edges()[0] == {"id": edge, "from_id": e1, "to_id": e2, "relation": "led_to", "weight": 0.5}
    tables = {t["name"]: t for t in db.status()["shards"][0]["tables"]}
    assert set(tables) >= {"episodes", "skills", "edges"}


def test_events_say_what_happened(tmp_path):
    db = quiverdb.open(str(tmp_path / "e.db"))
    notes = db.create_collection("notes", dim=2, strategy="manual")
    list(db.events(timeout=0.2))
    notes.put("x", [1.0, 2.0])
    local = [e for e in db.events(timeout=0.3) if e["event"] == "local_commit"]
    assert local and local[-1]["site"] == db.site_id
    assert local[-1]["changes"] == [{"shard": "default", "table": "notes", "rows": 1, "keys": ["x"]}]
    # Remote changes and conflicts, as `quiver watch` prints them.
    other = quiverdb.open(str(tmp_path / "o.db"))
    other.create_collection("notes", dim=2, strategy="manual")
    other.collection("notes").put("x", [3.0, 4.0])
    other.collection("notes").put("y", [5.0, 6.0])
    with other.serve() as srv:
        db.sync(srv.address, pin=srv.fingerprint)
    seen = list(db.events(timeout=0.5))
    assert {"event": "remote_change", "table": "notes", "shard": "default", "pk": "y", "deleted": False} in seen, seen
    assert any(e["event"] == "conflict" and e["pk"] == "x" and e["open"] for e in seen), seen
    assert json.dumps(seen)
    with pytest.raises(quiverdb.ValidationError):
        db.events(timeout=-1)


def test_the_gil_is_released_while_rust_works(db, rng):
    notes = db.create_collection("notes", dim=64)
    m = rng.standard_normal((60_000, 64)).astype(np.float32)
    ids = [f"n{i}" for i in range(len(m))]
    done = threading.Event()
    ticks = 0

    def load():
        notes.put_many(ids, m)
        for _ in range(20):
            notes.search(m[0], k=10)
        done.set()

    t = threading.Thread(target=load)
    t.start()
    while not done.is_set():
        ticks += 1
    t.join()
    assert len(notes) == len(m)
    # The main thread kept running Python the whole time.
    assert ticks > 1000, ticks

"""Sync from Python over real QUIC on loopback: between Python stores,
between processes, with the `quiver` CLI and daemon both ways, live links,
refusals, and Ctrl-C."""

import json
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

import quiverdb
from conftest import run_python


def two(tmp_path, strategy="lww"):
    a = quiverdb.open(str(tmp_path / "a.db"), name="a")
    b = quiverdb.open(str(tmp_path / "b.db"), name="b")
    for d in (a, b):
        d.create_collection("notes", dim=3, strategy=strategy)
    return a, b


def test_two_stores_sync_both_ways(tmp_path):
    a, b = two(tmp_path)
    a.collection("notes").put("from-a", [1, 2, 3], metadata={"by": "a"})
    b.collection("notes").put("from-b", [3, 2, 1], metadata={"by": "b"})
    with a.serve("127.0.0.1:0", token="secret") as srv:
        r = b.sync(srv.address, pin=srv.fingerprint, token="secret")
        assert isinstance(r, quiverdb.SyncResult)
        assert r.peer_node == "a" and r.changes_received > 0 and r.changes_sent > 0
        assert r.to_dict()["applied"] == r.applied
        assert b.collection("notes").get("from-a").metadata == {"by": "a"}
        assert a.collection("notes").get("from-b").metadata == {"by": "b"}
        again = b.sync(srv.address, pin=srv.fingerprint, token="secret", shards=["default"])
        assert again.changes_received == 0 and again.changes_sent == 0
        with pytest.raises(AttributeError):
            again.no_such_field


def test_refusals_are_exceptions_of_their_kind(tmp_path):
    a, b = two(tmp_path)
    with a.serve(token="secret") as srv:
        with pytest.raises(quiverdb.Unauthorized, match="token"):
            b.sync(srv.address, pin=srv.fingerprint, token="wrong")
        with pytest.raises(quiverdb.Untrusted, match="--pin"):
            b.sync(srv.address, token="secret")
        with pytest.raises(quiverdb.ValidationError, match="fingerprint"):
            b.sync(srv.address, pin="xyz", token="secret")
        with pytest.raises(quiverdb.ValidationError, match="bad address"):
            b.sync("127.0.0.1:notaport", insecure=True)
        with pytest.raises(quiverdb.ValidationError):
            b.sync(srv.address, pin=srv.fingerprint, insecure=True)
    # Nothing listens there any more: said within a few seconds.
    t = time.monotonic()
    with pytest.raises(quiverdb.SyncError, match="no QUIC server answered"):
        b.sync(srv.address, insecure=True)
    assert time.monotonic() - t < 10


def test_conflicts_are_kept_and_resolved_from_python(tmp_path):
    a, b = two(tmp_path, strategy="manual")
    a.collection("notes").put("same", [1, 1, 1], metadata={"by": "a"})
    b.collection("notes").put("same", [2, 2, 2], metadata={"by": "b"})
    with a.serve() as srv:
        r = b.sync(srv.address, pin=srv.fingerprint)
        assert r.conflicts_detected + r.peer_conflicts_detected > 0
        open_ = b.conflicts()
        assert open_ and all(c["pk"] == "same" for c in open_)
        meta = next(c for c in open_ if c["column"] == "metadata")
        b.resolve(meta["id"], value={"by": "both"})
        vec = next((c for c in open_ if c["column"] == "vector"), None)
        if vec:
            keep = next(v["version"] for v in vec["versions"] if v["value"] == [1.0, 1.0, 1.0])
            b.resolve(vec["id"], keep=keep)
        with pytest.raises(quiverdb.ValidationError):
            b.resolve(meta["id"], value={"again": 1})
        with pytest.raises(quiverdb.ValidationError):
            b.resolve(meta["id"])
        b.sync(srv.address, pin=srv.fingerprint)
    for d in (a, b):
        got = d.collection("notes").get("same")
        assert got.metadata == {"by": "both"}
    assert not b.conflicts()
    assert b.conflicts(all=True)


def test_a_live_link_pushes_writes_as_they_commit(tmp_path):
    a, b = two(tmp_path)
    with a.serve() as srv:
        with b.live(srv.address, pin=srv.fingerprint) as link:
            assert link.wait_rounds(1, timeout=20)
            a.collection("notes").put("live", [7, 7, 7])
            deadline = time.monotonic() + 10
            while b.collection("notes").get("live") is None:
                assert time.monotonic() < deadline, "the write did not arrive"
                time.sleep(0.01)
            b.collection("notes").put("back", [8, 8, 8])
            while a.collection("notes").get("back") is None:
                assert time.monotonic() < deadline, "the write did not go back"
                time.sleep(0.01)
            assert link.running and link.received > 0 and link.sent > 0
        assert not link.running
    refused = b.live(srv.address, pin=srv.fingerprint, token="t")
    # The server is gone: the link keeps trying in the background until stopped.
    time.sleep(0.3)
    assert refused.running
    refused.stop()


A_SIDE = r"""
import sys, quiverdb
db = quiverdb.open(sys.argv[1], name="alpha")
notes = db.create_collection("notes", dim=2, strategy="lww")
for i in range(50):
    notes.put(f"shared{i}", [1.0, float(i)], metadata={"by": "alpha"})
    notes.put(f"alpha{i}", [0.0, float(i)])
srv = db.serve("127.0.0.1:0", token="tok")
print(srv.address, srv.fingerprint, flush=True)
sys.stdin.readline()
srv.stop()
print("stopped", len(notes), flush=True)
"""

B_SIDE = r"""
import sys, json, quiverdb
db = quiverdb.open(sys.argv[1], name="beta")
notes = db.create_collection("notes", dim=2, strategy="lww")
for i in range(50):
    notes.put(f"shared{i}", [2.0, float(i)], metadata={"by": "beta"})
    notes.put(f"beta{i}", [0.0, float(i)])
r = db.sync(sys.argv[2], pin=sys.argv[3], token="tok")
print(json.dumps(r.to_dict()))
"""


def test_two_python_processes_sync_with_conflicts(tmp_path):
    a = subprocess.Popen(
        [sys.executable, "-c", A_SIDE, str(tmp_path / "a.db")],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        addr, fp = a.stdout.readline().split()
        b = run_python(B_SIDE, str(tmp_path / "b.db"), addr, fp)
        assert b.returncode == 0, b.stderr
        r = json.loads(b.stdout)
        assert r["conflicts_detected"] + r["peer_conflicts_detected"] > 0
        a.stdin.write("\n")
        a.stdin.flush()
        assert a.stdout.readline().split() == ["stopped", "150"]
    finally:
        a.kill()
        a.wait()
    da, db_ = quiverdb.open(str(tmp_path / "a.db")), quiverdb.open(str(tmp_path / "b.db"))
    rows = lambda d: d.sql("SELECT id, vector, metadata FROM notes ORDER BY id")
    assert rows(da) == rows(db_)
    assert len(rows(da)) == 150


def serve_cli(quiver, db, *extra):
    p = subprocess.Popen(
        [quiver.exe, "--db", db, "serve", "--listen", "127.0.0.1:0", "--http", "off", *extra],
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
    )
    addr = p.stdout.readline().split()[2]
    fp = p.stdout.readline().split()[2]
    return p, addr, fp


def test_python_syncs_with_quiver_serve(tmp_path, quiver):
    cli = str(tmp_path / "cli.db")
    quiver("--db", cli, "init", "--name", "cli")
    quiver("--db", cli, "collection", "create", "docs", "--dim", "3")
    quiver("--db", cli, "put", "docs", "from-cli", "--vector", "[1,2,3]", "--meta", '{"by":"cli"}')
    p, addr, fp = serve_cli(quiver, cli, "--token", "tok")
    try:
        py = quiverdb.open(str(tmp_path / "py.db"), name="py")
        r = py.sync(addr, pin=fp, token="tok")
        assert r.peer_node == "cli"
        assert py.collection("docs").get("from-cli").metadata == {"by": "cli"}
        py.collection("docs").put("from-py", np.array([3, 2, 1], dtype=np.float32))
        py.sync(addr, pin=fp, token="tok")
    finally:
        p.terminate()
        p.wait()
    exported = quiver("--db", cli, "export", "docs").stdout.splitlines()
    assert [json.loads(line)["id"] for line in exported] == ["from-cli", "from-py"]


def test_the_cli_syncs_with_a_python_server(tmp_path, quiver):
    py = quiverdb.open(str(tmp_path / "py.db"), name="py")
    py.create_collection("docs", dim=3).put("from-py", [1, 1, 1], content="python")
    cli = str(tmp_path / "cli.db")
    quiver("--db", cli, "init", "--name", "cli")
    with py.serve(token="tok") as srv:
        out = quiver("--db", cli, "--json", "sync", srv.address, "--pin", srv.fingerprint, "--token", "tok").stdout
        assert json.loads(out)["peer_node"] == "py"
        quiver("--db", cli, "put", "docs", "from-cli", "--vector", "[2,2,2]")
        quiver("--db", cli, "sync", srv.address, "--pin", srv.fingerprint, "--token", "tok")
    assert py.collection("docs").get("from-cli") is not None
    assert '"content":"python"' in quiver("--db", cli, "export", "docs").stdout


CTRL_C = r"""
import sys, time, quiverdb
a = quiverdb.open(sys.argv[1] + "/a.db")
b = quiverdb.open(sys.argv[1] + "/b.db")
srv = a.serve()
try:
    with b.live(srv.address, pin=srv.fingerprint) as link:
        link.wait_rounds(1, timeout=20)
        print("ready", flush=True)
        time.sleep(60)
except KeyboardInterrupt:
    print("interrupted; running:", link.running, flush=True)
srv.stop()
"""


def test_ctrl_c_stops_a_live_link(tmp_path):
    p = subprocess.Popen(
        [sys.executable, "-c", CTRL_C, str(tmp_path)], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    try:
        assert p.stdout.readline().strip() == "ready"
        t = time.monotonic()
        p.send_signal(signal.SIGINT)
        out, err = p.communicate(timeout=20)
        assert p.returncode == 0, err
        assert "interrupted; running: False" in out, out + err
        assert time.monotonic() - t < 10
    finally:
        p.kill()


SYNC_CTRL_C = r"""
import sys, quiverdb
b = quiverdb.open(sys.argv[1] + "/b.db")
print("syncing", flush=True)
try:
    # Nothing answers at this address, and retries were asked for.
    b.sync(sys.argv[2], insecure=True, retries=50)
except KeyboardInterrupt:
    print("interrupted", flush=True)
"""


def test_ctrl_c_interrupts_a_waiting_sync(tmp_path):
    import socket

    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    s.bind(("127.0.0.1", 0))
    addr = "127.0.0.1:%d" % s.getsockname()[1]
    s.close()
    p = subprocess.Popen(
        [sys.executable, "-c", SYNC_CTRL_C, str(tmp_path), addr], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    try:
        assert p.stdout.readline().strip() == "syncing"
        time.sleep(0.5)
        p.send_signal(signal.SIGINT)
        out, err = p.communicate(timeout=10)
        assert "interrupted" in out, out + err
    finally:
        p.kill()


def test_close_stops_the_stores_links_and_servers(tmp_path):
    a, b = two(tmp_path)
    srv = a.serve()
    link = b.live(srv.address, pin=srv.fingerprint)
    assert link.wait_rounds(1, timeout=20)
    b.close()
    assert not link.running
    a.close()
    assert not srv.running


LEFT_RUNNING = r"""
import sys, quiverdb
a = quiverdb.open(sys.argv[1] + "/a.db")
b = quiverdb.open(sys.argv[1] + "/b.db")
srv = a.serve()
link = b.live(srv.address, pin=srv.fingerprint)
link.wait_rounds(1, timeout=20)
print("leaving them running", flush=True)
"""


def test_the_interpreter_exits_cleanly_with_links_and_servers_running(tmp_path):
    t = time.monotonic()
    out = run_python(LEFT_RUNNING, str(tmp_path), timeout=30)
    assert out.returncode == 0, out.stderr
    assert "leaving them running" in out.stdout
    assert "panicked" not in out.stderr and "Error" not in out.stderr, out.stderr
    assert time.monotonic() - t < 20

"""quiverdb: multi-master sync for SQLite files that hold vectors and agent memory.

Open (or create) a store, write vectors from numpy, search them, and sync
with other replicas over QUIC, from this process::

    import numpy as np, quiverdb
    db = quiverdb.open("agent.db", name="laptop")
    notes = db.create_collection("notes", dim=384, metric="cosine")
    notes.put("n1", vec, metadata={"lang": "en"}, content="hello")
    hits = notes.search(query, k=10, filter={"lang": "en"})
    db.sync("host:4433", pin="…", token="…")

The store, the sync client and the server are the Rust crates of quiverdb,
embedded; the GIL is released while they work.
"""

import atexit as _atexit

from ._native import (
    Collection,
    Database,
    Error,
    Events,
    Hit,
    LiveLink,
    Memory,
    NotFound,
    ReadOnly,
    Record,
    ServerHandle,
    SyncError,
    SyncResult,
    Unauthorized,
    Untrusted,
    ValidationError,
    _shutdown,
    open,
)

__all__ = [
    "open",
    "Database",
    "Collection",
    "Record",
    "Hit",
    "Memory",
    "SyncResult",
    "LiveLink",
    "ServerHandle",
    "Events",
    "Error",
    "ValidationError",
    "NotFound",
    "ReadOnly",
    "SyncError",
    "Unauthorized",
    "Untrusted",
]

# Live links and servers run on the package's own threads: stop them, and
# let them close their connections, before the interpreter goes.
_atexit.register(_shutdown)

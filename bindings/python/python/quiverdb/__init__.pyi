"""Type stubs of quiverdb."""

from os import PathLike
from typing import Any, Iterator, Optional, Sequence, Union

import numpy as np
import numpy.typing as npt

Vector = Union[npt.NDArray[np.float32], Sequence[float]]
JSON = Any

class Error(Exception):
    """Every error quiverdb raises."""

class ValidationError(Error):
    """Bad input (dimension, NaN, dtype, layout, metadata, filter, address, pin); nothing was written."""

class NotFound(Error):
    """No such store, collection, table or conflict."""

class ReadOnly(Error):
    """The store cannot be written by this user."""

class SyncError(Error):
    """A sync, live link or server failed."""

class Unauthorized(SyncError):
    """The peer refused the token."""

class Untrusted(SyncError):
    """The peer's certificate is not trusted: pin its fingerprint or give its CA."""

def open(path: Union[str, PathLike[str]], name: Optional[str] = None) -> Database:
    """Opens the store at `path`, creating it (and its certificate) if missing."""

class Record:
    id: str
    vector: npt.NDArray[np.float32]
    metadata: dict[str, JSON]
    content: Optional[str]

class Hit:
    id: str
    score: float
    """The distance under the collection's metric: smaller is closer."""
    distance: float
    metadata: dict[str, JSON]
    content: Optional[str]

class Collection:
    name: str
    dim: int
    def put(
        self,
        id: str,
        vector: Vector,
        metadata: Optional[dict[str, JSON]] = None,
        content: Optional[str] = None,
    ) -> None: ...
    def put_many(
        self,
        ids: Sequence[str],
        vectors: npt.NDArray[np.float32],
        metadatas: Optional[Sequence[Optional[dict[str, JSON]]]] = None,
        contents: Optional[Sequence[Optional[str]]] = None,
    ) -> int: ...
    def get(self, id: str) -> Optional[Record]: ...
    def delete(self, id: str) -> bool: ...
    def __len__(self) -> int: ...
    def search(
        self,
        query: Vector,
        k: int = 10,
        filter: Optional[dict[str, JSON]] = None,
    ) -> list[Hit]:
        """The k nearest records, closest first.

        filter: {"lang": "en"}, {"year": {"$gte": 2020, "$lt": 2024}},
        {"tag": {"$in": ["a", "b"]}}, $ne, $gt, $lt, $lte, $nin, $exists,
        {"$or": [...]}, {"$and": [...]}, dotted paths ("author.name").
        """

class Memory:
    def add_episode(
        self,
        task: str,
        input: Optional[str] = None,
        output: Optional[str] = None,
        critique: Optional[str] = None,
        reward: Optional[float] = None,
        success: Optional[bool] = None,
        embedding: Optional[Vector] = None,
        id: Optional[str] = None,
    ) -> str: ...
    def add_skill(
        self,
        name: str,
        description: Optional[str] = None,
        code: Optional[str] = None,
        success_rate: Optional[float] = None,
        embedding: Optional[Vector] = None,
        id: Optional[str] = None,
    ) -> str: ...
    def add_edge(
        self,
        from_id: str,
        to_id: str,
        relation: str,
        weight: Optional[float] = None,
        id: Optional[str] = None,
    ) -> str: ...
    def episodes(self) -> list[dict[str, Any]]: ...
    def skills(self) -> list[dict[str, Any]]: ...
    def edges(self) -> list[dict[str, Any]]: ...

class SyncResult:
    peer_node: str
    peer_site: str
    changes_sent: int
    changes_received: int
    applied: int
    conflicts_detected: int
    conflicts_resolved: int
    conflicts_open: int
    peer_conflicts_detected: int
    bytes_sent: int
    bytes_received: int
    duration_ms: int
    attempts: int
    shards: list[dict[str, Any]]
    def to_dict(self) -> dict[str, Any]: ...
    def __getattr__(self, name: str) -> Any: ...

class LiveLink:
    address: str
    rounds: int
    sent: int
    received: int
    error: Optional[str]
    running: bool
    def wait_rounds(self, rounds: int = 1, timeout: float = 10.0) -> bool: ...
    def stop(self) -> None: ...
    def __enter__(self) -> LiveLink: ...
    def __exit__(self, *args: Any) -> bool: ...

class ServerHandle:
    address: str
    fingerprint: str
    running: bool
    def stop(self) -> None: ...
    def __enter__(self) -> ServerHandle: ...
    def __exit__(self, *args: Any) -> bool: ...

class Events:
    def __iter__(self) -> Iterator[dict[str, Any]]: ...
    def __next__(self) -> dict[str, Any]: ...

class Database:
    path: str
    site_id: str
    name: Optional[str]
    memory: Memory
    def create_collection(
        self,
        name: str,
        dim: int,
        metric: str = "cosine",
        strategy: str = "lww",
        shard: str = "default",
    ) -> Collection: ...
    def collection(self, name: str) -> Collection: ...
    def collections(self) -> list[str]: ...
    def sql(self, sql: str, params: Optional[Sequence[Any]] = None) -> list[dict[str, Any]]: ...
    def conflicts(self, shard: Optional[str] = None, all: bool = False) -> list[dict[str, Any]]: ...
    def resolve(self, id: int, keep: Optional[str] = None, value: Any = None) -> None: ...
    def status(self) -> dict[str, Any]: ...
    def sync(
        self,
        address: str,
        pin: Optional[str] = None,
        token: Optional[str] = None,
        ca: Optional[str] = None,
        insecure: bool = False,
        shards: Optional[Sequence[str]] = None,
        tables: Optional[Sequence[str]] = None,
        retries: int = 4,
    ) -> SyncResult: ...
    def live(
        self,
        address: str,
        pin: Optional[str] = None,
        token: Optional[str] = None,
        ca: Optional[str] = None,
        insecure: bool = False,
        shards: Optional[Sequence[str]] = None,
    ) -> LiveLink: ...
    def serve(
        self,
        listen: str = "127.0.0.1:0",
        token: Optional[str] = None,
        client_ca: Optional[str] = None,
    ) -> ServerHandle: ...
    def events(self, timeout: float = 1.0) -> Events:
        """The store's events, kept from the first call to events() on."""
    def close(self) -> None: ...
    def __enter__(self) -> Database: ...
    def __exit__(self, *args: Any) -> None: ...

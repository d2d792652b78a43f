"""The key-value store contract shared by every backend.

Semantics follow etcd v3 so that code written against the embedded SQLite
store behaves the same against a real etcd cluster:

* one global revision counter; every mutating operation that changes
  something bumps it by exactly one, and all events it causes carry that
  revision (a no-op delete does not bump it);
* an empty store is at revision 1, so the first write returns 2;
* keys are compared and sorted as UTF-8 bytes;
* watch(prefix, rev) delivers every event with revision >= rev in order, so
  ``items, rev = await s.list(p)`` followed by ``s.watch(p, rev + 1)`` loses
  nothing; a start revision older than the retained history raises
  Compacted, and the caller must re-list;
* a transaction holds at most MAX_TXN_OPS operations on every backend,
  because that is etcd's default server limit and code tested on SQLite must
  not start failing on etcd.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import AsyncIterator, Literal, Protocol, runtime_checkable
from urllib.parse import parse_qs, urlsplit

# etcd's default --max-txn-ops.
MAX_TXN_OPS = 128


@dataclass(frozen=True)
class KV:
    key: str
    value: bytes
    create_revision: int
    mod_revision: int
    lease: int  # 0 = none


@dataclass(frozen=True)
class Event:
    type: Literal["PUT", "DELETE"]
    key: str
    value: bytes | None  # None for DELETE
    revision: int
    prev_value: bytes | None = None  # the value before this event, if the key existed


class KVStoreError(Exception):
    """Base of every error the kvstore raises on purpose."""


class StoreUnavailable(KVStoreError):
    """The backend cannot be reached (etcd down, SQLite file unopenable)."""


class Compacted(KVStoreError):
    """The requested history is gone; re-list and watch from the new revision."""

    def __init__(self, requested: int, compact_revision: int):
        self.requested = requested
        self.compact_revision = compact_revision
        super().__init__(
            f"revision {requested} is compacted; oldest available revision is {compact_revision}"
        )


class LeaseNotFound(KVStoreError):
    """The lease expired, was revoked, or never existed."""

    def __init__(self, lease: int):
        self.lease = lease
        super().__init__(f"lease {lease:#x} not found")


@runtime_checkable
class Store(Protocol):
    async def get(self, key: str) -> KV | None: ...

    async def put(self, key: str, value: bytes, lease: int = 0) -> int: ...

    async def delete(self, key: str) -> bool: ...

    async def delete_prefix(self, prefix: str) -> int: ...

    async def list(self, prefix: str) -> tuple[list[KV], int]: ...

    def watch(self, prefix: str, start_revision: int) -> AsyncIterator[Event]: ...

    async def cas(self, key: str, value: bytes, expected_mod_revision: int, lease: int = 0) -> bool: ...

    async def cas_delete(self, key: str, expected_mod_revision: int) -> bool: ...

    async def txn_put_many(self, items: list[tuple[str, bytes]], deletes: list[str] = []) -> int: ...

    async def lease_grant(self, ttl_seconds: int) -> int: ...

    async def lease_keepalive(self, lease: int) -> None: ...

    async def lease_revoke(self, lease: int) -> None: ...

    async def revision(self) -> int: ...

    async def compact(self, revision: int) -> None: ...

    async def status(self) -> dict: ...

    async def close(self) -> None: ...


def prefix_end(prefix: bytes) -> bytes | None:
    """Smallest byte string greater than every string starting with prefix (None: no bound)."""
    b = bytearray(prefix)
    while b:
        if b[-1] < 0xFF:
            b[-1] += 1
            return bytes(b)
        b.pop()
    return None


def check_txn(items: list[tuple[str, bytes]], deletes: list[str]) -> None:
    """Argument checks every backend applies before touching the store."""
    if len(items) + len(deletes) > MAX_TXN_OPS:
        raise ValueError(f"transaction has {len(items) + len(deletes)} operations; limit is {MAX_TXN_OPS}")
    for key, value in items:
        check_key(key)
        if not isinstance(value, (bytes, bytearray)):
            raise TypeError(f"value for {key!r} must be bytes, not {type(value).__name__}")
    for key in deletes:
        check_key(key)


def check_key(key: str) -> None:
    if not isinstance(key, str) or not key:
        raise ValueError(f"key must be a non-empty str, got {key!r}")


def _query_float(q: dict[str, list[str]], name: str, default: float) -> float:
    return float(q[name][-1]) if name in q else default


def open_store(url: str) -> Store:
    """Open a store from a URL; nothing is contacted until the first operation.

    sqlite:///abs/path.db[?poll_interval=0.05&compact_keep=100000&busy_timeout=30]
    etcd://host:port[,host:port...][?timeout=5]
    etcd+unix:///abs/dir/host:port[?timeout=5]   (etcd's unix listener; reachable from any netns)
    """
    parts = urlsplit(url)
    q = parse_qs(parts.query)
    if parts.scheme == "sqlite":
        if parts.netloc or not parts.path.startswith("/"):
            raise ValueError(f"sqlite URL needs an absolute path (sqlite:///abs/path.db): {url!r}")
        from .sqlite import SQLiteStore

        return SQLiteStore(
            parts.path,
            poll_interval=_query_float(q, "poll_interval", 0.05),
            compact_keep=int(_query_float(q, "compact_keep", 100_000)),
            busy_timeout=_query_float(q, "busy_timeout", 30.0),
        )
    if parts.scheme == "etcd":
        endpoints: list[tuple[str, int]] = []
        for ep in parts.netloc.split(","):
            host, sep, port = ep.rpartition(":")
            if not sep or not host or not port.isdigit():
                raise ValueError(f"etcd endpoint must be host:port, got {ep!r} in {url!r}")
            endpoints.append((host.strip("[]"), int(port)))
        from .etcd import EtcdStore

        return EtcdStore(endpoints, timeout=_query_float(q, "timeout", 5.0))
    if parts.scheme == "etcd+unix":
        # etcd names a unix listener host:port (a file "host:port" in its working dir);
        # gRPC dials "unix:<path>", so the path splits into host "unix:<dir>/<host>" + port.
        base, sep, port = parts.path.rpartition(":")
        if not sep or not port.isdigit() or not base.startswith("/"):
            raise ValueError(f"etcd+unix URL needs an absolute socket path ending in :port: {url!r}")
        from .etcd import EtcdStore

        return EtcdStore([(f"unix:{base}", int(port))], timeout=_query_float(q, "timeout", 5.0))
    raise ValueError(f"unknown store URL scheme in {url!r} (want sqlite://, etcd:// or etcd+unix://)")

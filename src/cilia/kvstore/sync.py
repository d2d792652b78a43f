"""Blocking facade over a Store for the CLI and other synchronous callers.

The async store runs on a private event loop in a daemon thread, so the
facade works the same whether or not the caller's thread already runs an
event loop (gRPC channels are bound to the loop that created them).
"""

from __future__ import annotations

import asyncio
import threading
from typing import Any, Coroutine, TypeVar

from .api import KV, Store, open_store

T = TypeVar("T")


class SyncStore:
    def __init__(self, url: str):
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="kvstore-sync", daemon=True)
        self._thread.start()
        self._store: Store = open_store(url)

    def _run(self, coro: Coroutine[Any, Any, T]) -> T:
        if not self._thread.is_alive():
            coro.close()
            raise RuntimeError("SyncStore is closed")
        return asyncio.run_coroutine_threadsafe(coro, self._loop).result()

    def get(self, key: str) -> KV | None:
        return self._run(self._store.get(key))

    def put(self, key: str, value: bytes, lease: int = 0) -> int:
        return self._run(self._store.put(key, value, lease))

    def delete(self, key: str) -> bool:
        return self._run(self._store.delete(key))

    def delete_prefix(self, prefix: str) -> int:
        return self._run(self._store.delete_prefix(prefix))

    def list(self, prefix: str) -> tuple[list[KV], int]:
        return self._run(self._store.list(prefix))

    def cas(self, key: str, value: bytes, expected_mod_revision: int, lease: int = 0) -> bool:
        return self._run(self._store.cas(key, value, expected_mod_revision, lease))

    def cas_delete(self, key: str, expected_mod_revision: int) -> bool:
        return self._run(self._store.cas_delete(key, expected_mod_revision))

    def txn_put_many(self, items: list[tuple[str, bytes]], deletes: list[str] = []) -> int:
        return self._run(self._store.txn_put_many(items, deletes))

    def lease_grant(self, ttl_seconds: int) -> int:
        return self._run(self._store.lease_grant(ttl_seconds))

    def lease_keepalive(self, lease: int) -> None:
        return self._run(self._store.lease_keepalive(lease))

    def lease_revoke(self, lease: int) -> None:
        return self._run(self._store.lease_revoke(lease))

    def revision(self) -> int:
        return self._run(self._store.revision())

    def compact(self, revision: int) -> None:
        return self._run(self._store.compact(revision))

    def status(self) -> dict:
        return self._run(self._store.status())

    def close(self) -> None:
        if not self._thread.is_alive():
            return
        try:
            self._run(self._store.close())
        finally:
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._thread.join()
            self._loop.close()

    def __enter__(self) -> "SyncStore":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

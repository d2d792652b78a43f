"""List + watch of one prefix, re-listing after compaction or an outage.

The consumer sees a stream of (key, value or None) changes and never a gap: after a re-list
the keys that vanished meanwhile are reported as deletions, so a consumer's derived state
(engine, maps) converges without a full rebuild.
"""
from __future__ import annotations

import asyncio
import logging
from typing import Callable

from .api import Compacted, StoreUnavailable

log = logging.getLogger("cilia.kvstore.watch")

OnChange = Callable[[str, "bytes | None", int], None]   # key, value (None: deleted), mod revision


class WatchCache:
    def __init__(self, store, prefix: str, on_change: OnChange,
                 on_listed: Callable[[], None] | None = None):
        self.store = store
        self.prefix = prefix
        self.on_change = on_change
        self.on_listed = on_listed
        self.revisions: dict[str, int] = {}   # key -> mod revision as last seen
        self.listed = False
        self.error: str | None = None

    def _put(self, key: str, value: bytes | None, rev: int) -> None:
        if value is None:
            if self.revisions.pop(key, None) is None:
                return
        else:
            if self.revisions.get(key) == rev:
                return
            self.revisions[key] = rev
        self.on_change(key, value, rev)

    async def run(self) -> None:
        while True:
            try:
                kvs, rev = await self.store.list(self.prefix)
                fresh = {kv.key: kv for kv in kvs}
                for k in [k for k in self.revisions if k not in fresh]:
                    self._put(k, None, rev)
                for kv in kvs:
                    self._put(kv.key, kv.value, kv.mod_revision)
                self.listed, self.error = True, None
                if self.on_listed:
                    self.on_listed()
                async for ev in self.store.watch(self.prefix, rev + 1):
                    self._put(ev.key, ev.value if ev.type == "PUT" else None, ev.revision)
                raise RuntimeError(f"watch on {self.prefix} ended (store closed?)")
            except Compacted:
                log.info("watch on %s compacted; relisting", self.prefix)
            except StoreUnavailable as e:
                self.error = str(e)
                await asyncio.sleep(1.0)

    async def current(self) -> tuple[bool, int]:
        """(our view equals the store's now, the store's revision): what `policy wait`
        needs to know that nothing written before that revision is still unseen."""
        kvs, rev = await self.store.list(self.prefix)
        return {kv.key: kv.mod_revision for kv in kvs} == self.revisions, rev

"""The agent's feed for LBReconciler: a watch cache of Services and EndpointSlices.

Root task `run()`: list + watch both prefixes (re-listing after compaction or an outage),
and after each burst of events call reconciler.sync() with the cache. Cached objects are
replaced only when their key changes, so the reconciler's identity check skips every
service that did not change.
"""
from __future__ import annotations

import asyncio
import functools
import json
import logging
import time

from cilia.kvstore.watchcache import WatchCache
from cilia.objects import prefix

from .reconciler import LBReconciler

log = logging.getLogger("cilia.lb.watch")

SERVICES = prefix("services")            # /cilia/k8s/services/
ENDPOINTSLICES = prefix("endpointslices")  # /cilia/k8s/endpointslices/


class ServiceWatcher:
    def __init__(self, store, reconciler: LBReconciler, *, debounce: float = 0.02):
        self.store = store
        self.reconciler = reconciler
        self.debounce = debounce
        self.caches: dict[str, dict[str, dict]] = {SERVICES: {}, ENDPOINTSLICES: {}}
        self._dirty = asyncio.Event()
        self.last_sync = 0.0

    def kick(self) -> None:
        """Re-sync soon although no service changed (e.g. the node addresses did)."""
        self._dirty.set()

    def _apply(self, pfx: str, key: str, value: bytes | None) -> None:
        cache = self.caches[pfx]
        if value is None:
            cache.pop(key, None)
            return
        try:
            cache[key] = json.loads(value)
        except ValueError:
            log.warning("ignoring undecodable object at %s", key)
            cache.pop(key, None)

    def _on_change(self, pfx: str, key: str, value: bytes | None, _rev: int) -> None:
        self._apply(pfx, key, value)
        self._dirty.set()

    async def run(self) -> None:
        watches = [WatchCache(self.store, p, functools.partial(self._on_change, p), self._dirty.set)
                   for p in self.caches]
        watchers = [asyncio.create_task(w.run(), name=f"lb-watch{w.prefix}") for w in watches]
        try:
            while True:
                await self._dirty.wait()
                await asyncio.sleep(self.debounce)  # coalesce a burst into one sync
                self._dirty.clear()
                for w in watchers:
                    if w.done():
                        w.result()  # a dead watcher is a dead agent: raise
                if not all(w.listed for w in watches):
                    continue  # programming from half a picture would delete good frontends
                await self.reconciler.sync(self.caches[SERVICES], self.caches[ENDPOINTSLICES])
                self.last_sync = time.time()
        finally:
            for w in watchers:
                w.cancel()
            await asyncio.gather(*watchers, return_exceptions=True)

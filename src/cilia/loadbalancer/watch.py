"""The agent's feed for LBReconciler: a watch cache of Services and EndpointSlices.

Root task `run()`: list + watch both prefixes (re-listing after compaction or an outage),
and after each burst of events call reconciler.sync() with the cache. Cached objects are
replaced only when their key changes, so the reconciler's identity check skips every
service that did not change.
"""
from __future__ import annotations

import asyncio
import json
import logging
import time

from cilia.kvstore import Compacted, StoreUnavailable
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
        self._listed: set[str] = set()
        self.error: str | None = None
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

    async def _watch(self, pfx: str) -> None:
        while True:
            try:
                kvs, rev = await self.store.list(pfx)
                fresh = {kv.key: kv.value for kv in kvs}
                cache = self.caches[pfx]
                for k in [k for k in cache if k not in fresh]:
                    del cache[k]
                for k, v in fresh.items():
                    self._apply(pfx, k, v)
                self._listed.add(pfx)
                self._dirty.set()
                async for ev in self.store.watch(pfx, rev + 1):
                    self._apply(pfx, ev.key, ev.value if ev.type == "PUT" else None)
                    self._dirty.set()
                raise RuntimeError(f"watch on {pfx} ended (store closed?)")
            except Compacted:
                log.info("watch on %s compacted; relisting", pfx)
            except StoreUnavailable as e:
                # The maps keep their last content meanwhile; resync on return.
                self.error = str(e)
                await asyncio.sleep(1.0)

    async def run(self) -> None:
        watchers = [asyncio.create_task(self._watch(p), name=f"lb-watch{p}") for p in self.caches]
        try:
            while True:
                await self._dirty.wait()
                await asyncio.sleep(self.debounce)  # coalesce a burst into one sync
                self._dirty.clear()
                for w in watchers:
                    if w.done():
                        w.result()  # a dead watcher is a dead agent: raise
                if len(self._listed) < len(self.caches):
                    continue  # programming from half a picture would delete good frontends
                await self.reconciler.sync(self.caches[SERVICES], self.caches[ENDPOINTSLICES])
                self.error = None
                self.last_sync = time.time()
        finally:
            for w in watchers:
                w.cancel()
            await asyncio.gather(*watchers, return_exceptions=True)

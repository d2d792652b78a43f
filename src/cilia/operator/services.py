"""cilia-operator's service controller: addresses for Services, EndpointSlices from selectors.

An informer-style cache per prefix (services, pods, endpointslices, address claims) is fed
by list + watch; every event marks the services it can affect dirty, and the reconcile loop
handles only those (planning in src/cilia/loadbalancer/ipam.py and endpointslices.py). All
writes are compare-and-swap against the cached revision: a lost race just means the cache
is behind, and the watch event that made it so marks the service dirty again. Several
operators may run at once; claim keys make double allocation impossible.
"""
from __future__ import annotations

import asyncio
import json
import logging
import time
import uuid
from collections import defaultdict
from dataclasses import dataclass

from cilia.kvstore import Compacted, StoreUnavailable
from cilia.loadbalancer.endpointslices import desired_slices, is_managed, same_slice
from cilia.loadbalancer.ipam import (ALLOC_PREFIX, Ranges, ServiceKey, claim_key, claim_unused,
                                     owner_of, parse_claim_key, plan_allocations)
from cilia.k8s.services import SERVICE_NAME_LABEL
from cilia.objects import decode, encode, key as obj_key, parse_key, prefix

log = logging.getLogger("cilia.operator.services")

SERVICES = prefix("services")
PODS = prefix("pods")
SLICES = prefix("endpointslices")
PREFIXES = (SERVICES, PODS, SLICES, ALLOC_PREFIX)
_RETRY_MAX = 2.0


def _now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())


def _nsname(k: str) -> ServiceKey:
    _, ns, name = parse_key(k)
    return ns or "default", name


@dataclass
class Cached:
    obj: dict
    rev: int


class ServiceController:
    def __init__(self, store, ranges: Ranges | None = None):
        self.store = store
        self.ranges = ranges or Ranges()
        self.services: dict[ServiceKey, Cached] = {}
        self.by_ns: dict[str, set[ServiceKey]] = defaultdict(set)
        self.pods: dict[ServiceKey, dict] = {}
        self.pods_by_ns: dict[str, set[ServiceKey]] = defaultdict(set)
        self.slices: dict[ServiceKey, Cached] = {}
        self.slices_of: dict[ServiceKey, set[ServiceKey]] = defaultdict(set)  # service -> slices
        self.claims: dict[str, dict[str, tuple[dict, int]]] = defaultdict(dict)
        self.dirty: set[ServiceKey] = set()
        self.blocked: set[ServiceKey] = set()   # allocation failed: retry when claims move
        self._event = asyncio.Event()
        self._listed: set[str] = set()
        self.passes = 0

    # --- cache ---------------------------------------------------------------------------

    def _mark(self, key: ServiceKey) -> None:
        self.dirty.add(key)
        self._event.set()

    def _on_service(self, k: str, value: bytes | None, rev: int) -> None:
        key = _nsname(k)
        if value is None:
            self.services.pop(key, None)
            self.by_ns[key[0]].discard(key)
        else:
            self.services[key] = Cached(decode(value), rev)
            self.by_ns[key[0]].add(key)
        self._mark(key)

    def _on_pod(self, k: str, value: bytes | None) -> None:
        key = _nsname(k)
        old = self.pods.get(key)
        new = decode(value) if value is not None else None
        if new is None:
            self.pods.pop(key, None)
            self.pods_by_ns[key[0]].discard(key)
        else:
            self.pods[key] = new
            self.pods_by_ns[key[0]].add(key)
        labels = [((p.get("metadata") or {}).get("labels") or {}) for p in (old, new) if p]
        for skey in self.by_ns.get(key[0], ()):
            sel = (self.services[skey].obj.get("spec") or {}).get("selector")
            if sel and any(all(lb.get(a) == b for a, b in sel.items()) for lb in labels):
                self._mark(skey)

    def _slice_service(self, obj: dict | None, key: ServiceKey) -> ServiceKey | None:
        name = (((obj or {}).get("metadata") or {}).get("labels") or {}).get(SERVICE_NAME_LABEL)
        return (key[0], name) if name else None

    def _on_slice(self, k: str, value: bytes | None, rev: int) -> None:
        key = _nsname(k)
        old = self.slices.pop(key, None)
        owner = self._slice_service(old.obj if old else None, key)
        if owner:
            self.slices_of[owner].discard(key)
            self._mark(owner)
        if value is not None:
            obj = decode(value)
            self.slices[key] = Cached(obj, rev)
            owner = self._slice_service(obj, key)
            if owner:
                self.slices_of[owner].add(key)
                self._mark(owner)

    def _on_claim(self, k: str, value: bytes | None, rev: int) -> None:
        parsed = parse_claim_key(k)
        if parsed is None:
            return
        kind, v = parsed
        old = self.claims[kind].pop(v, None)
        new = None
        if value is not None:
            try:
                new = json.loads(value)
            except ValueError:
                new = {}
            self.claims[kind][v] = (new, rev)
        for o in (old[0] if old else None, new):
            if o and o.get("name"):
                self._mark((o.get("namespace") or "default", o["name"]))
        # A freed value may be what a blocked service was waiting for.
        for b in list(self.blocked):
            self._mark(b)

    def _dispatch(self, pfx: str, k: str, value: bytes | None, rev: int) -> None:
        if pfx == SERVICES:
            self._on_service(k, value, rev)
        elif pfx == PODS:
            self._on_pod(k, value)
        elif pfx == SLICES:
            self._on_slice(k, value, rev)
        else:
            self._on_claim(k, value, rev)

    def _forget(self, pfx: str) -> None:
        if pfx == SERVICES:
            for key in list(self.services):
                self._on_service(obj_key("services", *key), None, 0)
        elif pfx == PODS:
            self.pods.clear()
            self.pods_by_ns.clear()
            self.dirty |= set(self.services)
        elif pfx == SLICES:
            for key in list(self.slices):
                self._on_slice(obj_key("endpointslices", *key), None, 0)
        else:
            for kind in list(self.claims):
                for v in list(self.claims[kind]):
                    self._on_claim(claim_key(kind, v), None, 0)

    async def watch(self, pfx: str) -> None:
        """Root task: list + watch one prefix into the cache; never polls."""
        while True:
            try:
                kvs, rev = await self.store.list(pfx)
                self._forget(pfx)
                for kv in kvs:
                    self._dispatch(pfx, kv.key, kv.value, kv.mod_revision)
                self._listed.add(pfx)
                self._event.set()
                async for ev in self.store.watch(pfx, rev + 1):
                    self._dispatch(pfx, ev.key, ev.value if ev.type == "PUT" else None, ev.revision)
            except Compacted:
                log.info("watch on %s compacted; relisting", pfx)
                continue
            except StoreUnavailable as e:
                log.warning("watch on %s: store unavailable (%s); retrying", pfx, e)
                await asyncio.sleep(1.0)
                continue
            raise RuntimeError(f"watch on {pfx} ended (store closed?)")

    # --- reconcile ------------------------------------------------------------------------

    async def reconcile_loop(self) -> None:
        backoff = 0.05
        while True:
            await self._event.wait()
            self._event.clear()
            if len(self._listed) < len(PREFIXES):
                continue  # deciding from half a picture could delete good slices
            await asyncio.sleep(0.01)  # let a burst of events coalesce
            try:
                clean = await self.reconcile_once()
                backoff = 0.05
            except StoreUnavailable as e:
                log.warning("service reconcile: store unavailable (%s); retrying", e)
                clean = False
                backoff = min(backoff * 4, _RETRY_MAX)
            if not clean:
                await asyncio.sleep(backoff)
                self._event.set()

    async def reconcile_once(self) -> bool:
        keys, self.dirty = self.dirty, set()
        self.passes += 1
        if not keys:
            return True
        clean = True
        services = {k: c.obj for k, c in self.services.items()}
        claims = {kind: {v: o for v, (o, _) in c.items()} for kind, c in self.claims.items()}
        for alloc in plan_allocations(services, claims, sorted(keys), self.ranges, _now()):
            ok = await self._apply_allocation(alloc)
            clean &= ok
            if not ok:
                self.dirty.add(alloc.key)
            elif alloc.problems:
                self.blocked.add(alloc.key)
            else:
                self.blocked.discard(alloc.key)
        for key in sorted(keys):
            if not await self._sync_slices(key):
                self.dirty.add(key)
                clean = False
        clean &= await self._collect_claims(keys)
        return clean

    async def _apply_allocation(self, alloc) -> bool:
        cached = self.services.get(alloc.key)
        if cached is None:
            return True
        owner = json.dumps(owner_of(cached.obj), sort_keys=True).encode()
        for kind, value in alloc.claims:
            if not await self.store.cas(claim_key(kind, value), owner, 0):
                log.debug("claim %s/%s for %s/%s lost to another writer", kind, value, *alloc.key)
                return False
        if alloc.problems:
            log.error("service %s/%s: %s", *alloc.key, "; ".join(alloc.problems))
        if not alloc.changed:
            return True
        alloc.obj.get("metadata", {}).pop("resourceVersion", None)
        k = obj_key("services", *alloc.key)
        if not await self.store.cas(k, encode(alloc.obj), cached.rev):
            return False
        spec = alloc.obj.get("spec") or {}
        log.info("service %s/%s: clusterIP %s, nodePorts %s, LB %s", *alloc.key, spec.get("clusterIP"),
                 [p.get("nodePort") for p in spec.get("ports") or [] if p.get("nodePort")] or "-",
                 [i["ip"] for i in ((alloc.obj.get("status") or {}).get("loadBalancer") or {})
                  .get("ingress") or []] or "-")
        return True

    async def _sync_slices(self, key: ServiceKey) -> bool:
        cached = self.services.get(key)
        svc = cached.obj if cached else None
        has_selector = bool(svc and (svc.get("spec") or {}).get("selector"))
        pods = [self.pods[p] for p in self.pods_by_ns.get(key[0], ())] if has_selector else []
        want = {(key[0], s["metadata"]["name"]): s for s in (desired_slices(svc, pods) if svc else [])}
        clean = True
        for skey, sl in want.items():
            have = self.slices.get(skey)
            if have is not None and same_slice(have.obj, sl):
                continue
            if have is not None:
                sl["metadata"]["uid"] = have.obj["metadata"].get("uid")
                sl["metadata"]["creationTimestamp"] = have.obj["metadata"].get("creationTimestamp")
            else:
                sl["metadata"]["uid"] = str(uuid.uuid4())
                sl["metadata"]["creationTimestamp"] = _now()
            ok = await self.store.cas(obj_key("endpointslices", *skey), encode(sl), have.rev if have else 0)
            clean &= ok
        for skey in list(self.slices_of.get(key, ())):
            have = self.slices.get(skey)
            # Slices a user wrote (selector-less services) are theirs alone.
            if have is None or skey in want or not is_managed(have.obj):
                continue
            clean &= await self.store.cas_delete(obj_key("endpointslices", *skey), have.rev)
        return clean

    async def _collect_claims(self, keys: set[ServiceKey]) -> bool:
        """Free the claims of dirty services that no longer use them (re-reading the owner
        first: the cache of services may lag the cache of claims)."""
        clean = True
        for kind, entries in list(self.claims.items()):
            for value, (owner, rev) in list(entries.items()):
                okey = (owner.get("namespace") or "default", owner.get("name") or "")
                if okey not in keys:
                    continue
                if not claim_unused(kind, value, owner, self.services[okey].obj if okey in self.services else None):
                    continue
                kv = await self.store.get(obj_key("services", *okey))
                fresh = decode(kv.value) if kv is not None else None
                if not claim_unused(kind, value, owner, fresh):
                    continue
                if await self.store.cas_delete(claim_key(kind, value), rev):
                    log.info("released %s %s of service %s/%s", kind, value, *okey)
                else:
                    clean = False
        return clean

    def add_tasks(self, sup) -> None:
        for pfx in PREFIXES:
            sup.add(f"watch {pfx}", lambda p=pfx: self.watch(p))
        sup.add("services", self.reconcile_loop)

"""Cluster-wide identity allocation with compare-and-swap in the store (Cilium's kvstore
allocator, adapted to a store that offers single-key CAS only).

Key layout (JSON values):
  /cilia/identities/v1/id/<id>              {"labels": [...], "created": t[, "deleting": true]}
  /cilia/identities/v1/value/<labels_key>   {"id": n}
  /cilia/identities/v1/refs/<id>/<node>     ""  (written with the node's lease)

The id key is the authority for id -> labels; the value key is the index labels -> id.
Creating: CAS-create the id key (an id is never taken twice), then CAS-create the value key
(a label set never gets two ids); the loser of the value race deletes its unused id key.

Using an identity needs a ref. The operator's GC first marks an unreferenced id key
"deleting", then re-checks the refs, and only then deletes it. An allocator writes its ref
first and then checks that the id key is unmarked (or un-marks it itself with CAS), so
either the GC sees the ref after marking, or the allocator sees the mark/deletion and
retries: an identity in use is never collected, and a collected id is never used.
"""
from __future__ import annotations

import asyncio
import json
import logging
import random
import time
from typing import Callable, Iterable

from cilia.kvstore.api import KV, LeaseNotFound, Store, StoreUnavailable

from .labels import labels_from_key, labels_key, normalize
from .reserved import (
    LOCAL_IDENTITY_FLAG,
    MAX_GLOBAL,
    MAX_LOCAL,
    MIN_GLOBAL,
    Identity,
    reserved_by_labels,
    reserved_identity,
)

log = logging.getLogger("cilia.identity")

PREFIX = "/cilia/identities/v1/"
ID_PREFIX = PREFIX + "id/"
VALUE_PREFIX = PREFIX + "value/"
REFS_PREFIX = PREFIX + "refs/"

_MAX_ATTEMPTS = 64


class AllocationError(Exception):
    """Allocation did not converge (pathological contention) or was refused."""


class IdentityExhausted(AllocationError):
    pass


def id_key(n: int) -> str:
    return f"{ID_PREFIX}{n}"


def value_key(labels: Iterable[str]) -> str:
    return VALUE_PREFIX + labels_key(labels)


def refs_prefix(n: int) -> str:
    # The trailing '/' keeps refs of 25 from matching refs of 256.
    return f"{REFS_PREFIX}{n}/"


def ref_key(n: int, node: str) -> str:
    return f"{refs_prefix(n)}{node}"


def encode_id_value(labels: Iterable[str], deleting: bool = False, created: float | None = None) -> bytes:
    d: dict = {"labels": list(labels), "created": round(time.time() if created is None else created, 3)}
    if deleting:
        d["deleting"] = True
    return json.dumps(d, sort_keys=True, separators=(",", ":")).encode()


def decode_id_value(value: bytes) -> dict:
    d = json.loads(value)
    if not isinstance(d, dict) or not isinstance(d.get("labels"), list):
        raise ValueError(f"malformed identity value {value!r}")
    return d


def parse_id_kv(key: str, value: bytes) -> Identity | None:
    """An id key and its value -> Identity (None for keys outside the id prefix or garbage)."""
    if not key.startswith(ID_PREFIX):
        return None
    try:
        n = int(key[len(ID_PREFIX):])
        return Identity(n, tuple(decode_id_value(value)["labels"]))
    except (ValueError, TypeError, KeyError):
        return None


def parse_value_kv(key: str, value: bytes) -> tuple[tuple[str, ...], int] | None:
    if not key.startswith(VALUE_PREFIX):
        return None
    try:
        return labels_from_key(key[len(VALUE_PREFIX):]), int(json.loads(value)["id"])
    except (ValueError, TypeError, KeyError):
        return None


def _value_id(value: bytes) -> int | None:
    try:
        return int(json.loads(value)["id"])
    except (ValueError, TypeError, KeyError):
        return None


def parse_ref_key(key: str) -> tuple[int, str] | None:
    if not key.startswith(REFS_PREFIX):
        return None
    n, sep, node = key[len(REFS_PREFIX):].partition("/")
    if not sep or not n.isdigit() or not node:
        return None
    return int(n), node


_OK, _GONE, _MISMATCH, _BUSY = "ok", "gone", "mismatch", "busy"


class IdentityAllocator:
    """Global (pod) identities of one node.

    Local refcounts decide when this node's ref is written (first user) and dropped (last
    user), so a repeated allocation of a held label set is a dict lookup.
    """

    def __init__(self, store: Store, node: str, lease_ttl: int = 15, *,
                 min_id: int = MIN_GLOBAL, max_id: int = MAX_GLOBAL,
                 on_change: Callable[[dict[int, Identity]], None] | None = None) -> None:
        if not node or "/" in node:
            raise ValueError(f"invalid node name {node!r}")
        if not (MIN_GLOBAL <= min_id <= max_id <= MAX_GLOBAL):
            raise ValueError(f"id range {min_id}..{max_id} outside {MIN_GLOBAL}..{MAX_GLOBAL}")
        self.store = store
        self.node = node
        self.lease_ttl = lease_ttl
        self.min_id = min_id
        self.max_id = max_id
        # Called after a resync had to give up identities (old id -> replacement).
        self.on_change = on_change
        self.lease = 0
        self._by_key: dict[str, Identity] = {}
        self._by_id: dict[int, Identity] = {}
        self._refcount: dict[int, int] = {}
        self._locks: dict[str, asyncio.Lock] = {}
        self._resync_lock = asyncio.Lock()
        self._taken: set[int] = set()  # ids seen in use; a hint for picking, never trusted
        self._keepalive: asyncio.Task | None = None
        self._closed = False

    # ---- lifecycle ----

    async def start(self) -> None:
        if self.lease:
            return
        self.lease = await self.store.lease_grant(self.lease_ttl)
        self._keepalive = asyncio.create_task(self._keepalive_loop(), name=f"identity-lease-{self.node}")

    async def close(self) -> None:
        self._closed = True
        if self._keepalive is not None:
            self._keepalive.cancel()
            try:
                await self._keepalive
            except asyncio.CancelledError:
                pass
            self._keepalive = None
        lease, self.lease = self.lease, 0
        if lease:
            try:
                await self.store.lease_revoke(lease)  # drops every ref of this node at once
            except (LeaseNotFound, StoreUnavailable) as e:
                log.warning("identity allocator %s: lease revoke failed: %s", self.node, e)
        self._by_key.clear()
        self._by_id.clear()
        self._refcount.clear()

    async def __aenter__(self) -> "IdentityAllocator":
        await self.start()
        return self

    async def __aexit__(self, *exc) -> None:
        await self.close()

    async def _keepalive_loop(self) -> None:
        interval = max(self.lease_ttl / 3.0, 0.2)
        while True:
            await asyncio.sleep(interval)
            try:
                await self.store.lease_keepalive(self.lease)
                interval = max(self.lease_ttl / 3.0, 0.2)
            except LeaseNotFound:
                log.warning("identity allocator %s: lease lost; re-writing refs", self.node)
                try:
                    await self.resync()
                except Exception as e:  # keep trying on the next tick; never die silently
                    log.warning("identity allocator %s: resync failed: %r", self.node, e)
                    interval = 0.5
            except StoreUnavailable as e:
                log.warning("identity allocator %s: keepalive failed: %s", self.node, e)
                interval = 0.5
            except Exception:
                log.exception("identity allocator %s: keepalive error", self.node)
                interval = 1.0

    # ---- public API ----

    def held(self) -> list[Identity]:
        """Identities this node currently holds a reference on."""
        return sorted((self._by_id[n] for n in self._refcount), key=lambda i: i.id)

    def refcount(self, n: int) -> int:
        return self._refcount.get(n, 0)

    async def allocate(self, labels: Iterable[str]) -> Identity:
        norm = normalize(labels)
        if not norm:
            raise ValueError("cannot allocate an identity for an empty label set")
        reserved = reserved_by_labels(norm)
        if reserved is not None:
            return reserved
        if not self.lease:
            raise RuntimeError("IdentityAllocator.start() was not called")
        key = labels_key(norm)
        lock = self._locks.get(key)
        if lock is None:
            lock = self._locks[key] = asyncio.Lock()
        async with lock:
            ident = self._by_key.get(key)
            if ident is not None:
                self._refcount[ident.id] += 1
                return ident
            ident, lease_used = await self._acquire(norm)
            self._by_key[key] = ident
            self._by_id[ident.id] = ident
            self._refcount[ident.id] = 1
            # A resync that started before the refcount existed re-wrote every ref except
            # this one; re-write it under the current lease until the two agree.
            while lease_used != self.lease:
                lease_used = await self._put_ref(ident.id)
            return ident

    async def release(self, n: int) -> bool:
        """Drop one local use of identity n; True when this node's ref was removed."""
        ident = self._by_id.get(n)
        if ident is None:
            if reserved_identity(n) is not None:
                return False
            raise KeyError(f"identity {n} is not held by node {self.node}")
        key = labels_key(ident.labels)
        async with self._locks[key]:
            count = self._refcount.get(n, 0)
            if count > 1:
                self._refcount[n] = count - 1
                return False
            if count == 0:
                raise KeyError(f"identity {n} is not held by node {self.node}")
            # Delete before forgetting it locally, so a failed delete leaves a consistent
            # state the caller can retry.
            await self.store.delete(ref_key(n, self.node))
            del self._refcount[n]
            del self._by_id[n]
            del self._by_key[key]
            return True

    async def lookup(self, n: int) -> Identity | None:
        reserved = reserved_identity(n)
        if reserved is not None:
            return reserved
        cached = self._by_id.get(n)
        if cached is not None:
            return cached
        kv = await self.store.get(id_key(n))
        return parse_id_kv(kv.key, kv.value) if kv else None

    async def lookup_labels(self, labels: Iterable[str]) -> Identity | None:
        """The identity of a label set if one exists, without taking a reference."""
        norm = normalize(labels)
        reserved = reserved_by_labels(norm)
        if reserved is not None:
            return reserved
        cached = self._by_key.get(labels_key(norm))
        if cached is not None:
            return cached
        kv = await self.store.get(value_key(norm))
        n = _value_id(kv.value) if kv is not None else None
        if n is None:
            return None
        ident = await self.lookup(n)
        return ident if ident is not None and ident.labels == norm else None

    async def list(self) -> list[Identity]:
        kvs, _ = await self.store.list(ID_PREFIX)
        out = [i for i in (parse_id_kv(kv.key, kv.value) for kv in kvs) if i is not None]
        return sorted(out, key=lambda i: i.id)

    async def resync(self) -> dict[int, Identity]:
        """Re-establish this node's lease and refs after a store outage or lease loss.

        Every held identity is re-referenced and checked; one that was collected meanwhile
        is re-created under the same id when that is still possible. The rare identity that
        cannot be kept (its id or label set was taken over) is replaced by a fresh
        allocation with the same local refcount; returns {old id: new identity}.
        """
        async with self._resync_lock:
            try:
                if not self.lease:
                    raise LeaseNotFound(0)
                await self.store.lease_keepalive(self.lease)
            except LeaseNotFound:
                self.lease = await self.store.lease_grant(self.lease_ttl)
            if self._keepalive is None and not self._closed:
                self._keepalive = asyncio.create_task(self._keepalive_loop(), name=f"identity-lease-{self.node}")
            lease = self.lease
            lost: dict[int, Identity] = {}
            for n in sorted(self._refcount):
                ident = self._by_id[n]
                await self.store.put(ref_key(n, self.node), b"", lease=lease)
                if not await self._repair(ident):
                    lost[n] = ident
        changed: dict[int, Identity] = {}
        for n, old in lost.items():
            key = labels_key(old.labels)
            async with self._locks[key]:
                count = self._refcount.pop(n, 0)
                self._by_id.pop(n, None)
                self._by_key.pop(key, None)
                await self.store.delete(ref_key(n, self.node))
            if count:
                new = await self.allocate(old.labels)
                for _ in range(count - 1):
                    await self.allocate(old.labels)
                changed[n] = new
                log.warning("identity %d of %s was lost while the lease was gone; now %d",
                            n, ",".join(old.labels), new.id)
        if changed and self.on_change is not None:
            self.on_change(changed)
        return changed

    # ---- internals ----

    async def _put_ref(self, n: int) -> int:
        """Write this node's ref on n with the current lease; returns the lease used."""
        for _ in range(3):
            lease = self.lease
            try:
                await self.store.put(ref_key(n, self.node), b"", lease=lease)
                return lease
            except LeaseNotFound:
                if self.lease == lease:
                    await self.resync()
        raise AllocationError(f"could not write a reference on identity {n}: lease keeps vanishing")

    async def _acquire(self, labels: tuple[str, ...]) -> tuple[Identity, int]:
        vkey = value_key(labels)
        backoff = 0.002
        for _ in range(_MAX_ATTEMPTS):
            vkv = await self.store.get(vkey)
            if vkv is None:
                n = await self._create(labels, vkey)
                if n is None:
                    continue  # lost the value race: the winner's key is there now
            else:
                n = _value_id(vkv.value)
                if n is None:
                    # Unreadable index entry: without removing it this label set could
                    # never be allocated again.
                    await self.store.cas_delete(vkey, vkv.mod_revision)
                    continue
                other = self._by_id.get(n)
                if other is not None and other.labels != labels:
                    # We hold n for other labels, so this index entry outlived its identity.
                    await self.store.cas_delete(vkey, vkv.mod_revision)
                    continue
            lease = await self._put_ref(n)
            state = await self._verify(n, labels)
            if state == _OK:
                self._taken.add(n)
                return Identity(n, labels), lease
            if self._refcount.get(n, 0) == 0:
                await self.store.delete(ref_key(n, self.node))
            if vkv is not None and state in (_GONE, _MISMATCH):
                # The index pointed at an id that is gone or re-used: it is stale.
                await self.store.cas_delete(vkey, vkv.mod_revision)
            # Collected under our feet (or being collected): let the GC finish, then retry.
            await asyncio.sleep(backoff * (1 + random.random()))
            backoff = min(backoff * 2, 0.2)
        raise AllocationError(f"identity allocation for {list(labels)} did not converge")

    async def _verify(self, n: int, labels: tuple[str, ...]) -> str:
        """With our ref already written: is id n alive and ours to use?"""
        for _ in range(8):
            kv = await self.store.get(id_key(n))
            if kv is None:
                return _GONE
            d = decode_id_value(kv.value)
            if tuple(d["labels"]) != labels:
                return _MISMATCH
            if not d.get("deleting"):
                return _OK
            # The GC marked it before seeing our ref; un-marking with CAS makes its
            # final CAS-delete fail, and it will see our ref on its next pass.
            unmarked = encode_id_value(labels, created=d.get("created"))
            if await self.store.cas(id_key(n), unmarked, kv.mod_revision):
                return _OK
        return _BUSY

    def _pick(self) -> int:
        span = self.max_id - self.min_id + 1
        if len(self._taken) < span // 2:
            while True:
                n = random.randint(self.min_id, self.max_id)
                if n not in self._taken:
                    return n
        free = [n for n in range(self.min_id, self.max_id + 1) if n not in self._taken]
        if not free:
            raise IdentityExhausted(f"no free identity in {self.min_id}..{self.max_id}")
        return random.choice(free)

    async def _refresh_taken(self) -> None:
        kvs, _ = await self.store.list(ID_PREFIX)
        self._taken = {i.id for i in (parse_id_kv(kv.key, kv.value) for kv in kvs) if i is not None}

    async def _create(self, labels: tuple[str, ...], vkey: str) -> int | None:
        """Create id + value keys; None when another allocator created the value first."""
        # Random picks keep racing allocators on different nodes from colliding on the
        # same "lowest free" id again and again.
        for attempt in range(_MAX_ATTEMPTS):
            if attempt and attempt % 8 == 0:
                await self._refresh_taken()
            try:
                n = self._pick()
            except IdentityExhausted:
                await self._refresh_taken()
                n = self._pick()
            if await self.store.cas(id_key(n), encode_id_value(labels), 0):
                break
            self._taken.add(n)
        else:
            raise AllocationError(f"no id could be reserved for {list(labels)}")
        self._taken.add(n)
        if await self.store.cas(vkey, json.dumps({"id": n}).encode(), 0):
            return n
        # Nobody can have used n: its value key never existed.
        await self.store.delete(id_key(n))
        self._taken.discard(n)
        return None

    async def _repair(self, ident: Identity) -> bool:
        """Make sure id key and value key of a held identity exist; False if impossible."""
        n, labels = ident.id, ident.labels
        kv = await self.store.get(id_key(n))
        if kv is None:
            if not await self.store.cas(id_key(n), encode_id_value(labels), 0):
                return False
            log.info("identity %d re-created after it was collected", n)
        state = await self._verify(n, labels)
        if state != _OK:
            return False
        vkey = value_key(labels)
        vkv = await self.store.get(vkey)
        if vkv is None:
            if await self.store.cas(vkey, json.dumps({"id": n}).encode(), 0):
                return True
            vkv = await self.store.get(vkey)
        if vkv is not None and _value_id(vkv.value) == n:
            return True
        # The label set got another id meanwhile: ours is the duplicate; remove it if it
        # is only ours (it was re-created by us above or nobody else refers to it).
        refs, _ = await self.store.list(refs_prefix(n))
        if all(parse_ref_key(r.key) == (n, self.node) for r in refs):
            cur = await self.store.get(id_key(n))
            if cur is not None:
                await self.store.cas_delete(id_key(n), cur.mod_revision)
        return False


class LocalIdentityAllocator:
    """Node-local identities (CIDR and FQDN selectors): lowest free number from 1<<24.

    They never leave the node, so a dict is the whole state; refcounted like the global
    allocator so callers can treat both the same.
    """

    def __init__(self, min_id: int = LOCAL_IDENTITY_FLAG, max_id: int = MAX_LOCAL) -> None:
        self.min_id = min_id
        self.max_id = max_id
        self._by_key: dict[str, Identity] = {}
        self._by_id: dict[int, Identity] = {}
        self._refcount: dict[int, int] = {}
        self._next = min_id

    def allocate(self, labels: Iterable[str]) -> Identity:
        norm = normalize(labels)
        if not norm:
            raise ValueError("cannot allocate an identity for an empty label set")
        key = labels_key(norm)
        ident = self._by_key.get(key)
        if ident is None:
            n = self._next
            while n in self._by_id:
                n += 1
            if n > self.max_id:
                raise IdentityExhausted(f"no free local identity in {self.min_id}..{self.max_id}")
            ident = Identity(n, norm)
            self._by_key[key] = ident
            self._by_id[n] = ident
            self._refcount[n] = 0
            self._next = n + 1
        self._refcount[ident.id] += 1
        return ident

    def release(self, n: int) -> bool:
        """True when the last user is gone and the number is free again."""
        if n not in self._refcount:
            raise KeyError(f"local identity {n} is not allocated")
        self._refcount[n] -= 1
        if self._refcount[n] > 0:
            return False
        ident = self._by_id.pop(n)
        del self._refcount[n]
        del self._by_key[labels_key(ident.labels)]
        self._next = min(self._next, n)
        return True

    def lookup(self, n: int) -> Identity | None:
        return self._by_id.get(n)

    def list(self) -> list[Identity]:
        return sorted(self._by_id.values(), key=lambda i: i.id)


def kv_identity(kv: KV) -> Identity | None:
    return parse_id_kv(kv.key, kv.value)

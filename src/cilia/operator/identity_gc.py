"""Garbage collection of global identities nobody references any more.

An identity is collected once this operator has seen it without any ref for at least the
grace period (its own observation, not the creator's clock: nodes' clocks may disagree, and
a just-created identity gets its ref a moment after its id key).

Deletion is a three-step handshake with the allocators (see cilia.identity.allocator):
mark the id key "deleting" with CAS, re-check the refs, then CAS-delete the id key at the
marked revision and the value key at its revision. An allocator that wrote its ref and
found the mark un-marks the key, which makes the final CAS-delete fail.
"""
from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass, field

from cilia.identity.allocator import (
    ID_PREFIX,
    REFS_PREFIX,
    VALUE_PREFIX,
    decode_id_value,
    encode_id_value,
    id_key,
    parse_id_kv,
    parse_ref_key,
    parse_value_kv,
    refs_prefix,
    value_key,
)
from cilia.kvstore.api import Store

log = logging.getLogger("cilia.operator.identitygc")

DEFAULT_INTERVAL = 10.0
DEFAULT_GRACE = 30.0


def gc_candidates(ids: set[int] | dict, referenced: set[int], unref_since: dict[int, float],
                  now: float, grace: float) -> tuple[list[int], dict[int, float]]:
    """Pure: which ids to collect now, and the updated first-seen-unreferenced times."""
    since: dict[int, float] = {}
    due: list[int] = []
    for n in sorted(ids):
        if n in referenced:
            continue
        first = unref_since.get(n, now)
        since[n] = first
        if now - first >= grace:
            due.append(n)
    return due, since


@dataclass
class GCResult:
    deleted: list[int] = field(default_factory=list)
    kept: list[int] = field(default_factory=list)  # due, but a ref appeared or CAS lost
    stale_values: list[str] = field(default_factory=list)


class IdentityGC:
    def __init__(self, store: Store, grace: float = DEFAULT_GRACE) -> None:
        self.store = store
        self.grace = grace
        self._unref_since: dict[int, float] = {}
        self._stale_since: dict[str, float] = {}

    async def run_once(self, now: float | None = None) -> GCResult:
        now = time.monotonic() if now is None else now
        # ids before refs: a ref written after the refs read is caught by the re-check.
        id_kvs, _ = await self.store.list(ID_PREFIX)
        ref_kvs, _ = await self.store.list(REFS_PREFIX)
        value_kvs, _ = await self.store.list(VALUE_PREFIX)
        ids = {}
        for kv in id_kvs:
            ident = parse_id_kv(kv.key, kv.value)
            if ident is not None:
                ids[ident.id] = ident.labels
        referenced = {p[0] for p in (parse_ref_key(kv.key) for kv in ref_kvs) if p is not None}
        due, self._unref_since = gc_candidates(ids, referenced, self._unref_since, now, self.grace)
        res = GCResult()
        for kv in id_kvs:
            n = int(kv.key[len(ID_PREFIX):]) if kv.key[len(ID_PREFIX):].isdigit() else None
            if n in referenced and n in ids:
                d = decode_id_value(kv.value)
                if d.get("deleting"):
                    # A GC that died between mark and delete; the identity is in use.
                    await self.store.cas(kv.key, encode_id_value(ids[n], created=d.get("created")), kv.mod_revision)
        for n in due:
            if await self.collect(n):
                res.deleted.append(n)
                self._unref_since.pop(n, None)
            else:
                res.kept.append(n)

        # Index entries whose identity is gone (a GC that stopped between its two deletes)
        # would only cost allocators a retry, but they would never go away on their own.
        stale_now: dict[str, float] = {}
        for kv in value_kvs:
            parsed = parse_value_kv(kv.key, kv.value)
            if parsed is None:
                continue
            labels, n = parsed
            if ids.get(n) == labels:
                continue
            first = self._stale_since.get(kv.key, now)
            stale_now[kv.key] = first
            if now - first < self.grace:
                continue
            cur = await self.store.get(id_key(n))
            cur_ident = parse_id_kv(cur.key, cur.value) if cur is not None else None
            if cur_ident is not None and cur_ident.labels == labels:
                continue
            if await self.store.cas_delete(kv.key, kv.mod_revision):
                res.stale_values.append(kv.key)
                stale_now.pop(kv.key, None)
        self._stale_since = stale_now
        if res.deleted:
            log.info("identity GC: deleted %d unreferenced identities: %s", len(res.deleted),
                     " ".join(map(str, res.deleted)))
        return res

    async def collect(self, n: int) -> bool:
        kv = await self.store.get(id_key(n))
        if kv is None:
            return False
        d = decode_id_value(kv.value)
        labels = tuple(d["labels"])
        if not d.get("deleting"):
            marked = encode_id_value(labels, deleting=True, created=d.get("created"))
            if not await self.store.cas(kv.key, marked, kv.mod_revision):
                return False
            kv = await self.store.get(id_key(n))
            if kv is None or kv.value != marked:
                return False
        refs, _ = await self.store.list(refs_prefix(n))
        if refs:
            # Someone took a ref between our two reads: hand the identity back.
            await self.store.cas(kv.key, encode_id_value(labels, created=d.get("created")), kv.mod_revision)
            return False
        if not await self.store.cas_delete(kv.key, kv.mod_revision):
            return False
        vkv = await self.store.get(value_key(labels))
        if vkv is not None:
            try:
                points_here = int(json.loads(vkv.value)["id"]) == n
            except (ValueError, TypeError, KeyError):
                points_here = False
            if points_here:
                await self.store.cas_delete(vkv.key, vkv.mod_revision)
        return True

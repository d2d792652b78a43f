"""Kubernetes-shaped objects in the cluster store: the one place that knows the key layout.

/cilia/k8s/<plural>/<namespace>/<name> for namespaced kinds, /cilia/k8s/<plural>/<name> for
cluster-scoped ones. Values are the objects' JSON. Writers that race (the CLI writing spec,
a node runtime writing status) use compare-and-swap on the key's mod revision."""
from __future__ import annotations

import json
from typing import Any, Callable

from cilia.kvstore.api import Store

PREFIX = "/cilia/k8s/"
CLUSTER_SCOPED = {"nodes", "namespaces", "ciliumclusterwidenetworkpolicies"}


def key(plural: str, namespace: str | None, name: str) -> str:
    if plural in CLUSTER_SCOPED or not namespace:
        return f"{PREFIX}{plural}/{name}"
    return f"{PREFIX}{plural}/{namespace}/{name}"


def prefix(plural: str, namespace: str | None = None) -> str:
    if plural in CLUSTER_SCOPED or namespace is None:
        return f"{PREFIX}{plural}/"
    return f"{PREFIX}{plural}/{namespace}/"


def parse_key(k: str) -> tuple[str, str | None, str]:
    parts = k[len(PREFIX):].split("/")
    if len(parts) == 2:
        return parts[0], None, parts[1]
    return parts[0], parts[1], parts[2]


def encode(obj: dict) -> bytes:
    return json.dumps(obj, sort_keys=True, separators=(",", ":")).encode()


def decode(value: bytes) -> dict:
    return json.loads(value)


class Conflict(Exception):
    pass


class Objects:
    def __init__(self, store: Store):
        self.store = store

    async def get(self, plural: str, namespace: str | None, name: str) -> tuple[dict, int] | None:
        kv = await self.store.get(key(plural, namespace, name))
        if kv is None:
            return None
        obj = decode(kv.value)
        obj.setdefault("metadata", {})["resourceVersion"] = str(kv.mod_revision)
        return obj, kv.mod_revision

    async def list(self, plural: str, namespace: str | None = None) -> tuple[list[dict], int]:
        kvs, rev = await self.store.list(prefix(plural, namespace))
        out = []
        for kv in kvs:
            obj = decode(kv.value)
            obj.setdefault("metadata", {})["resourceVersion"] = str(kv.mod_revision)
            out.append(obj)
        return out, rev

    async def put(self, plural: str, obj: dict, expected_rev: int | None = None) -> int:
        md = obj["metadata"]
        k = key(plural, md.get("namespace"), md["name"])
        md.pop("resourceVersion", None)
        if expected_rev is None:
            return await self.store.put(k, encode(obj))
        if not await self.store.cas(k, encode(obj), expected_rev):
            raise Conflict(k)
        return expected_rev

    async def mutate(self, plural: str, namespace: str | None, name: str,
                     fn: Callable[[dict], dict | None], attempts: int = 20) -> dict | None:
        """Read-modify-write with CAS; fn returns the new object, or None to leave it."""
        for _ in range(attempts):
            got = await self.get(plural, namespace, name)
            if got is None:
                return None
            obj, rev = got
            new = fn(obj)
            if new is None:
                return obj
            new.get("metadata", {}).pop("resourceVersion", None)
            if await self.store.cas(key(plural, namespace, name), encode(new), rev):
                return new
        raise Conflict(key(plural, namespace, name))

    async def delete(self, plural: str, namespace: str | None, name: str) -> bool:
        return await self.store.delete(key(plural, namespace, name))


def ref(obj: dict[str, Any]) -> str:
    md = obj.get("metadata", {})
    ns = md.get("namespace")
    return f"{ns}/{md.get('name')}" if ns else str(md.get("name"))

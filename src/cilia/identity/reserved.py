"""Cilium's numeric identity space, so policies, flows and `identity list` read the same.

Reserved identities are fixed numbers every node agrees on without asking the store.
Global identities (pods) are allocated cluster-wide in [MIN_GLOBAL, MAX_GLOBAL]; CIDR
identities are node-local and carry bit 24 (Cilium's LocalIdentityFlag), so they can never
collide with a global identity another node allocated.
"""
from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Identity:
    id: int
    labels: tuple[str, ...]  # sorted "source:key=value" strings

    @property
    def reserved(self) -> bool:
        return is_reserved(self.id)

    @property
    def local(self) -> bool:
        return is_local(self.id)

    def to_json(self) -> dict:
        return {"id": self.id, "labels": list(self.labels)}


UNKNOWN = 0
HOST = 1
WORLD = 2
UNMANAGED = 3
HEALTH = 4
INIT = 5
REMOTE_NODE = 6
KUBE_APISERVER = 7
INGRESS = 8

# Cilium's cluster-local range: below 256 is reserved, and 16 bits leave room for the
# cluster id in the upper bits of a ClusterMesh identity.
MIN_GLOBAL = 256
MAX_GLOBAL = 65535

LOCAL_IDENTITY_FLAG = 1 << 24
MIN_LOCAL = LOCAL_IDENTITY_FLAG
MAX_LOCAL = (1 << 25) - 1

_NAMES = {
    UNKNOWN: "unknown",
    HOST: "host",
    WORLD: "world",
    UNMANAGED: "unmanaged",
    HEALTH: "health",
    INIT: "init",
    REMOTE_NODE: "remote-node",
    KUBE_APISERVER: "kube-apiserver",
    INGRESS: "ingress",
}

RESERVED: dict[int, Identity] = {n: Identity(n, (f"reserved:{name}",)) for n, name in _NAMES.items()}
_BY_LABELS: dict[tuple[str, ...], Identity] = {i.labels: i for i in RESERVED.values()}
_BY_NAME: dict[str, Identity] = {name: RESERVED[n] for n, name in _NAMES.items()}


def is_reserved(n: int) -> bool:
    return 0 <= n < MIN_GLOBAL


def is_global(n: int) -> bool:
    return MIN_GLOBAL <= n <= MAX_GLOBAL


def is_local(n: int) -> bool:
    return MIN_LOCAL <= n <= MAX_LOCAL


def reserved_identity(n: int) -> Identity | None:
    return RESERVED.get(n)


def reserved_by_name(name: str) -> Identity | None:
    """'host' or 'reserved:host' -> Identity(1, ('reserved:host',))."""
    return _BY_NAME.get(name.removeprefix("reserved:"))


def reserved_by_labels(labels) -> Identity | None:
    """The reserved identity whose label set is exactly `labels`, if any."""
    return _BY_LABELS.get(tuple(sorted(set(labels))))


def reserved_identities(include_unknown: bool = False) -> list[Identity]:
    return [i for n, i in sorted(RESERVED.items()) if include_unknown or n != UNKNOWN]


def name_of(n: int) -> str | None:
    return _NAMES.get(n)

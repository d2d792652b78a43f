"""Cilium's entities as identity predicates.

world   = reserved:world (2) and every CIDR identity (they all carry reserved:world)
cluster = host, remote-node, health, init, unmanaged, kube-apiserver, ingress and every
          global (pod) identity
all     = everything; the engine emits it as one identity-0 entry, never through here
"""
from __future__ import annotations

from dataclasses import dataclass

from cilia.identity import reserved as R
from cilia.identity.reserved import Identity

RESERVED_ENTITIES = {
    "host": R.HOST, "remote-node": R.REMOTE_NODE, "health": R.HEALTH, "init": R.INIT,
    "unmanaged": R.UNMANAGED, "kube-apiserver": R.KUBE_APISERVER, "ingress": R.INGRESS,
}
CLUSTER_RESERVED = frozenset(RESERVED_ENTITIES.values())
ENTITIES = ("all", "world", "cluster", *RESERVED_ENTITIES)


def entity_matches(entity: str, ident: Identity) -> bool:
    if entity == "all":
        return True
    if entity == "world":
        return ident.id == R.WORLD or "reserved:world" in ident.labels
    if entity == "cluster":
        return ident.id in CLUSTER_RESERVED or R.is_global(ident.id)
    return ident.id == RESERVED_ENTITIES[entity]


@dataclass(frozen=True)
class EntitySelector:
    entity: str

    def matches(self, ident: Identity, idx: object = None) -> bool:
        return entity_matches(self.entity, ident)

    def __str__(self) -> str:
        return f"entity:{self.entity}"

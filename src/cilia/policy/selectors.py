"""Selectors over security identities: label selectors, entities, CIDR sets, wildcard.

Identity labels are "source:key=value" strings (identity/labels.py). A label selector
requirement names a source ("k8s", "reserved", ...) or "any", as Cilium's
EndpointSelector does: `app: web` in a CiliumNetworkPolicy is "any:app=web" and matches
"k8s:app=web"; NetworkPolicy selectors are translated with the "k8s" source.
"""
from __future__ import annotations

import ipaddress
from dataclasses import dataclass
from typing import Iterable, Mapping

from cilia.identity import reserved as R
from cilia.identity.labels import parse_label
from cilia.identity.reserved import Identity

from .entities import EntitySelector

SOURCE_ANY = "any"
POD_NAMESPACE_KEY = "io.kubernetes.pod.namespace"
NAMESPACE_LABELS_PREFIX = "io.cilium.k8s.namespace.labels"

IN, NOT_IN, EXISTS, DOES_NOT_EXIST = "In", "NotIn", "Exists", "DoesNotExist"


class LabelIndex:
    """key -> [(source, value)] of one label set, so a requirement is a dict lookup."""

    __slots__ = ("labels", "by_key")

    def __init__(self, labels: Iterable[str]):
        self.labels = frozenset(labels)
        self.by_key: dict[str, list[tuple[str, str]]] = {}
        for label in self.labels:
            source, key, value = parse_label(label)
            self.by_key.setdefault(key, []).append((source, value))

    def values(self, source: str, key: str) -> list[str]:
        return [v for s, v in self.by_key.get(key, ()) if source == SOURCE_ANY or s == source]


def as_index(labels: "LabelIndex | Iterable[str]") -> LabelIndex:
    return labels if isinstance(labels, LabelIndex) else LabelIndex(labels)


@dataclass(frozen=True, order=True)
class Requirement:
    source: str
    key: str
    op: str
    values: tuple[str, ...] = ()

    def matches(self, idx: LabelIndex) -> bool:
        # Hot: every endpoint computation evaluates every distinct policy subject.
        pairs = idx.by_key.get(self.key)
        op = self.op
        if op == IN or op == NOT_IN:
            hit = False
            if pairs:
                src, values = self.source, self.values
                for s, v in pairs:
                    if v in values and (src == SOURCE_ANY or s == src):
                        hit = True
                        break
            return hit if op == IN else not hit
        present = False
        if pairs:
            src = self.source
            present = src == SOURCE_ANY or any(s == src for s, _ in pairs)
        return present if op == EXISTS else not present

    def __str__(self) -> str:
        k = f"{self.source}:{self.key}"
        if self.op == IN:
            return f"{k}={self.values[0]}" if len(self.values) == 1 else f"{k} in ({','.join(self.values)})"
        if self.op == NOT_IN:
            return f"{k} notin ({','.join(self.values)})"
        return k if self.op == EXISTS else f"!{k}"


def split_key(key: str, default_source: str) -> tuple[str, str]:
    """'k8s:app' -> ('k8s', 'app'); 'app' -> (default_source, 'app')."""
    source, sep, rest = key.partition(":")
    return (source, rest) if sep else (default_source, key)


def requirement(source: str, key: str, op: str, values: Iterable[str] = ()) -> Requirement:
    return Requirement(source, key, op, tuple(sorted(set(values))))


@dataclass(frozen=True)
class LabelSelector:
    """AND of requirements; no requirements selects every identity (Cilium's wildcard)."""
    requirements: tuple[Requirement, ...] = ()

    # Selectors are dict keys on every compute(); hashing the requirement tuple each time
    # was a third of the computation.
    def __hash__(self) -> int:
        h = self.__dict__.get("_hash")
        if h is None:
            h = hash(self.requirements)
            object.__setattr__(self, "_hash", h)
        return h

    @classmethod
    def of(cls, reqs: Iterable[Requirement]) -> "LabelSelector":
        return cls(tuple(sorted(set(reqs))))

    @classmethod
    def from_k8s(cls, selector: Mapping | None, default_source: str,
                 key_prefix: str = "") -> "LabelSelector":
        """A (validated) metav1.LabelSelector; keys get `key_prefix` and a source."""
        return cls.of(k8s_requirements(selector, default_source, key_prefix))

    def with_requirements(self, reqs: Iterable[Requirement]) -> "LabelSelector":
        return LabelSelector.of((*self.requirements, *reqs))

    @property
    def wildcard(self) -> bool:
        return not self.requirements

    def has_key(self, key: str, sources: Iterable[str]) -> bool:
        sources = set(sources)
        return any(r.key == key and r.source in sources for r in self.requirements)

    def has_source(self, source: str) -> bool:
        return any(r.source == source for r in self.requirements)

    def matches_labels(self, labels: "LabelIndex | Iterable[str]") -> bool:
        idx = labels if type(labels) is LabelIndex else as_index(labels)
        for r in self.requirements:
            if not r.matches(idx):
                return False
        return True

    def matches(self, ident: Identity, idx: LabelIndex) -> bool:
        for r in self.requirements:
            if not r.matches(idx):
                return False
        return True

    def index_keys(self) -> list[tuple[str, str, str]]:
        """(source, key, value) one of which an identity must carry to match, if any."""
        for r in self.requirements:
            if r.op == IN:
                return [(r.source, r.key, v) for v in r.values]
        return []

    def __str__(self) -> str:
        return ",".join(str(r) for r in self.requirements) or "<all>"


def k8s_requirements(selector: Mapping | None, default_source: str, key_prefix: str = "") -> list[Requirement]:
    out = []
    selector = selector or {}
    for key, value in (selector.get("matchLabels") or {}).items():
        source, k = split_key(key, default_source)
        out.append(requirement(source, _join(key_prefix, k), IN, (value,)))
    for expr in selector.get("matchExpressions") or []:
        source, k = split_key(expr["key"], default_source)
        out.append(requirement(source, _join(key_prefix, k), expr["operator"], expr.get("values") or ()))
    return out


def _join(prefix: str, key: str) -> str:
    return f"{prefix}.{key}" if prefix else key


@dataclass(frozen=True)
class CIDRSelector:
    """Addresses in `cidr` but not in any of `excepts`, as CIDR identities see them.

    A CIDR identity carries "cidr:<p>" for its own prefix and every policy prefix that
    contains it (cidr.py), so "has cidr:<cidr> and none of cidr:<except>" is exact for the
    most specific prefix an LPM lookup returns. Addresses no policy prefix covers are
    reserved:world, which only a /0 contains.
    """
    cidr: str
    excepts: tuple[str, ...] = ()

    @classmethod
    def of(cls, cidr: str, excepts: Iterable[str] = ()) -> "CIDRSelector":
        return cls(normalize_prefix(cidr), tuple(sorted({normalize_prefix(e) for e in excepts})))

    @property
    def prefixes(self) -> tuple[str, ...]:
        return (self.cidr, *self.excepts)

    def matches(self, ident: Identity, idx: LabelIndex) -> bool:
        if ident.id == R.WORLD:
            return ipaddress.ip_network(self.cidr).prefixlen == 0
        labels = idx.labels
        if f"cidr:{self.cidr}" not in labels:
            return False
        return not any(f"cidr:{e}" in labels for e in self.excepts)

    def __str__(self) -> str:
        return self.cidr + (f" except {','.join(self.excepts)}" if self.excepts else "")


@dataclass(frozen=True)
class Wildcard:
    """Every identity, known or not: one identity-0 map entry instead of one per identity."""

    def matches(self, ident: Identity, idx: LabelIndex) -> bool:
        return True

    def __str__(self) -> str:
        return "<all>"


WILDCARD = Wildcard()
Selector = LabelSelector | EntitySelector | CIDRSelector | Wildcard


def is_wildcard(sel: Selector) -> bool:
    return isinstance(sel, Wildcard) or (isinstance(sel, LabelSelector) and sel.wildcard)


def normalize_prefix(cidr: str) -> str:
    """'10.1.2.3/8' -> '10.0.0.0/8'; a bare address is a host prefix."""
    return str(ipaddress.ip_network(cidr, strict=False))

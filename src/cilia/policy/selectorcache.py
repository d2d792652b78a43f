"""Selector -> identities currently matching it, maintained incrementally.

Policies register the selectors they use (refcounted); identities come and go. Adding or
removing an identity re-evaluates only candidate selectors (indexed by one label each
needs), and returns the selectors whose selection changed, so only endpoints whose policy
uses one of those selectors need recomputation.
"""
from __future__ import annotations

from typing import Iterable

from cilia.identity.reserved import Identity

from .selectors import LabelIndex, LabelSelector, Selector, is_wildcard


class SelectorCache:
    def __init__(self) -> None:
        self._identities: dict[int, tuple[Identity, LabelIndex]] = {}
        self._selections: dict[Selector, set[int]] = {}
        self._refs: dict[Selector, int] = {}
        self._canonical: dict[Selector, Selector] = {}
        # (source, key, value) -> label selectors that need that label; "any" sources are
        # looked up under "any". Selectors without an equality requirement are unindexed.
        self._index: dict[tuple[str, str, str], set[Selector]] = {}
        self._unindexed: set[Selector] = set()

    # ---- selectors ----

    def add_selector(self, sel: Selector) -> None:
        n = self._refs.get(sel, 0)
        self._refs[sel] = n + 1
        if n:
            return
        self._canonical[sel] = sel
        self._selections[sel] = {i for i, (ident, idx) in self._identities.items() if sel.matches(ident, idx)}
        keys = sel.index_keys() if isinstance(sel, LabelSelector) else []
        if keys:
            for k in keys:
                self._index.setdefault(k, set()).add(sel)
        else:
            self._unindexed.add(sel)

    def remove_selector(self, sel: Selector) -> None:
        n = self._refs.get(sel, 0)
        if n > 1:
            self._refs[sel] = n - 1
            return
        if n == 0:
            return
        del self._refs[sel]
        del self._selections[sel]
        del self._canonical[sel]
        keys = sel.index_keys() if isinstance(sel, LabelSelector) else []
        for k in keys:
            bucket = self._index.get(k)
            if bucket is not None:
                bucket.discard(sel)
                if not bucket:
                    del self._index[k]
        self._unindexed.discard(sel)

    def canonical(self, sel: Selector) -> Selector:
        """The registered selector equal to `sel` (the first one added)."""
        return self._canonical[sel]

    def selections(self, sel: Selector) -> set[int]:
        """Identities the selector matches now (the selector must be registered)."""
        return self._selections[sel]

    def selectors(self) -> list[Selector]:
        return list(self._selections)

    # ---- identities ----

    def add_identity(self, ident: Identity) -> set[Selector]:
        old = self._identities.get(ident.id)
        changed: set[Selector] = set()
        if old is not None:
            if old[0].labels == ident.labels:
                return changed
            changed |= self.remove_identity(ident.id)
        idx = LabelIndex(ident.labels)
        self._identities[ident.id] = (ident, idx)
        for sel in self._candidates(idx):
            if sel.matches(ident, idx):
                self._selections[sel].add(ident.id)
                changed.add(sel)
        return changed

    def remove_identity(self, n: int) -> set[Selector]:
        if self._identities.pop(n, None) is None:
            return set()
        changed = set()
        for sel, ids in self._selections.items():
            if n in ids:
                ids.discard(n)
                changed.add(sel)
        return changed

    def identity(self, n: int) -> Identity | None:
        entry = self._identities.get(n)
        return entry[0] if entry else None

    def identities(self) -> list[Identity]:
        return [ident for ident, _ in self._identities.values()]

    def _candidates(self, idx: LabelIndex) -> Iterable[Selector]:
        seen: set[Selector] = set(self._unindexed)
        for key, pairs in idx.by_key.items():
            for source, value in pairs:
                seen |= self._index.get((source, key, value), set())
                seen |= self._index.get(("any", key, value), set())
        return [s for s in seen if not is_wildcard(s)]

"""The policy engine: policies + identities -> per-endpoint policy map state.

What an agent calls
-------------------
    engine = PolicyEngine(enforcement="default", audit=False)
    engine.upsert_policy(obj) / engine.delete_policy(kind, namespace, name)   -> Update
    engine.add_identity(identity) / engine.remove_identity(id)                -> Update
    engine.set_named_ports(owner, {name: (proto, port)}) / remove_named_ports -> Update
    engine.upsert_endpoint(Endpoint(...)) / engine.remove_endpoint(ep_id)
    engine.regenerate() -> {ep_id: EndpointUpdate(policy, upserts, deletes)}   (changed only)
    engine.cidr_identities() -> {prefix: Identity}   (for the ipcache; Update says what changed)
    engine.compute(identity, labels, named_ports, ...) -> EndpointPolicy      (stateless)
    engine.explain(src, dst, port, proto) -> Verdict                          (explain.py)

Every change of an input (policy, identity, named port) increments `revision`; an
EndpointPolicy carries the revision it reflects. regenerate() recomputes only endpoints
the changes can affect: a policy change affects endpoints its old or new subjects select,
an identity change affects endpoints whose policy uses a selector whose selection changed.

Why a full recompute is cheap (1,000 endpoints x 500 rules with a rule selecting every
identity: ~1M map entries): an endpoint's entries are built per *signature* (the set of
rule contributions reaching an identity; mapstate.template), not per identity, then stamped
out; endpoints selected by exactly the same rules share one computation within a
regenerate() call; each distinct policy subject is matched once per endpoint. Identity
patches find the churned identity's keys through the endpoint's key shapes instead of
scanning its entries.
"""
from __future__ import annotations

import dataclasses
import gc
from dataclasses import dataclass, field
from typing import Iterable, Mapping

from cilia.identity import reserved as R
from cilia.identity.allocator import LocalIdentityAllocator
from cilia.identity.reserved import Identity, reserved_identities

from .cidr import CIDRIdentities
from .mapstate import (ALLOW, COOKIE_ALLOW_LOCALHOST, COOKIE_NOT_ENFORCED, DENY,
                       FIRST_RULE_COOKIE, Contribution, EntryKey, EntryValue, Entries,
                       Folded, Provenance, partition, stamp, template)
from .models import (DIRECTION_NAMES, DIRECTIONS, EGRESS, ENFORCEMENT_MODES, INGRESS,
                     PROTO_ANY, NormalizedPolicy, Rule, RuleSource, Selects, proto_number)
from .ports import NamedPorts, Resolver, expand, own_named_ports
from .selectors import LabelIndex, LabelSelector, Selector, is_wildcard
from .selectorcache import SelectorCache
from .translate import policy_prefixes, translate

NOT_ENFORCED_SOURCE = RuleSource("<not enforced>", "", "allow-all")
ANY_L4 = ((PROTO_ANY, 0, 0),)
ALLOW_LOCALHOST_SOURCE = RuleSource("<allow-localhost>", "", "host")


@dataclass(frozen=True)
class Endpoint:
    """A local endpoint as the engine needs it. enforcement/audit None: the agent's mode."""
    ep_id: int
    identity: int
    labels: tuple[str, ...]
    named_ports: Mapping[str, tuple[str | int, int]] = field(default_factory=dict, compare=False)
    enforcement: str | None = None
    audit: bool | None = None


@dataclass(frozen=True)
class DirectionState:
    enforced: bool
    # Policies whose rules select the endpoint in this direction with default deny.
    selected_by: tuple[RuleSource, ...]
    reason: str


@dataclass
class EndpointPolicy:
    ep_id: int
    identity: int
    labels: tuple[str, ...]
    revision: int
    enforcement: str
    audit: bool
    ingress: DirectionState
    egress: DirectionState
    entries: Entries            # exactly what goes into cilia_policy for this endpoint
    provenance: Provenance      # every rule contribution before LPM folding and pruning
    selectors: frozenset        # selectors the entries depend on (incremental updates)
    egress_named_ports: bool    # resolved through the cluster-wide named-port map
    rules: tuple = ()           # the rules selecting the endpoint (identity patches reuse them)
    allow_localhost: bool = True
    # (direction, proto, port, plen) of every provenance key: the keys an identity can
    # have, so an identity patch finds them without scanning every entry.
    shapes: frozenset = field(default=frozenset(), compare=False, repr=False)

    def direction(self, d: int) -> DirectionState:
        return self.ingress if d == INGRESS else self.egress

    def map_entries(self) -> list[tuple[bytes, bytes]]:
        return [(k.pack(self.ep_id), v.pack()) for k, v in sorted(self.entries.items())]

    def diff(self, old: "EndpointPolicy | None") -> tuple[dict[EntryKey, EntryValue], list[EntryKey]]:
        """(entries to write, keys to delete) to turn `old`'s map state into this one."""
        prev = old.entries if old is not None and old.ep_id == self.ep_id else {}
        if not prev:
            return dict(self.entries), []
        # Set operations on the views run in C: a patched endpoint differs in a few entries.
        return dict(self.entries.items() - prev.items()), sorted(prev.keys() - self.entries.keys())


@dataclass(frozen=True)
class EndpointUpdate:
    policy: EndpointPolicy
    upserts: dict[EntryKey, EntryValue]
    deletes: list[EntryKey]


@dataclass
class Update:
    revision: int
    changed_selectors: set = field(default_factory=set)
    subjects: set = field(default_factory=set)          # subjects of changed policies
    cidr_added: dict[str, Identity] = field(default_factory=dict)
    cidr_removed: dict[str, Identity] = field(default_factory=dict)
    named_ports_changed: bool = False


class PolicyEngine:
    def __init__(self, *, enforcement: str = "default", audit: bool = False,
                 allow_localhost: bool = True, local_allocator: LocalIdentityAllocator | None = None,
                 prune: bool = True) -> None:
        if enforcement not in ENFORCEMENT_MODES:
            raise ValueError(f"enforcement must be one of {ENFORCEMENT_MODES}, got {enforcement!r}")
        self.enforcement = enforcement
        self.audit = audit
        # Cilium's allow-localhost: the node may always reach its endpoints (kubelet probes).
        self.allow_localhost = allow_localhost
        self.prune = prune
        self.revision = 0
        self.cache = SelectorCache()
        self.cidr = CIDRIdentities(local_allocator)
        self._policies: dict[tuple[str, str, str], NormalizedPolicy] = {}
        self._selector_refs: dict[tuple[str, str, str], list[Selector]] = {}
        self._cookies: dict[int, RuleSource] = {COOKIE_NOT_ENFORCED: NOT_ENFORCED_SOURCE,
                                                 COOKIE_ALLOW_LOCALHOST: ALLOW_LOCALHOST_SOURCE}
        self._next_cookie = FIRST_RULE_COOKIE
        self._named: dict[str, dict[str, tuple[int, int]]] = {}
        self._endpoints: dict[int, Endpoint] = {}
        self._realized: dict[int, EndpointPolicy] = {}
        self._dirty: set[int] = set()
        # ep_id -> identities whose entries alone must be recomputed (identity churn)
        self._patches: dict[int, set[int]] = {}
        # Policies flattened in order, subjects deduplicated (rebuilt after a policy change).
        self._flat: tuple | None = None
        # Per policy, the CIDR prefixes it names; the union the CIDR identities reflect.
        self._prefixes: dict[tuple[str, str, str], set[str]] = {}
        self._synced_prefixes: set[str] = set()
        # Endpoint labels, parsed once, and (key, value) -> endpoints carrying that label.
        self._ep_labels: dict[int, LabelIndex] = {}
        self._ep_by_label: dict[tuple[str, str], set[int]] = {}
        # Live only inside regenerate(): endpoints selected by the same rules share one
        # map-state computation (inputs cannot change during the call).
        self._memo: dict | None = None
        for ident in reserved_identities():
            self.cache.add_identity(ident)

    # ---- policies ----

    def upsert_policy(self, obj: dict) -> Update:
        """Add or replace a validated policy object (k8s/policies.py output)."""
        return self._replace(translate(obj))

    def delete_policy(self, kind: str, namespace: str, name: str) -> Update:
        key = (kind, namespace if kind != "CiliumClusterwideNetworkPolicy" else "", name)
        return self._replace(None, key)

    def policies(self) -> list[NormalizedPolicy]:
        return list(self._policies.values())

    def rule_source(self, cookie: int) -> RuleSource | None:
        return self._cookies.get(cookie)

    def _replace(self, new: NormalizedPolicy | None, key=None) -> Update:
        key = new.key if new is not None else key
        old = self._policies.pop(key, None)
        self._flat = None
        self._prefixes.pop(key, None)
        old_selectors = self._selector_refs.pop(key, [])
        self.revision += 1
        update = Update(self.revision)
        if old is not None:
            update.subjects |= old.subjects
            for r in old.rules:
                self._cookies.pop(r.cookie, None)
        if new is not None:
            selectors = [p for r in new.rules for p in r.peers if not is_wildcard(p)]
            # Register the new selectors before releasing the old ones, so a selector both
            # versions use keeps its selection instead of being recomputed.
            for sel in selectors:
                self.cache.add_selector(sel)
            self._selector_refs[key] = selectors
            rules = []
            canonical = self.cache.canonical
            for r in new.rules:
                # Equal selectors become the cache's own object: selection lookups then
                # hit on identity instead of comparing requirement tuples.
                peers = tuple(p if is_wildcard(p) else canonical(p) for p in r.peers)
                rules.append(dataclasses.replace(r, cookie=self._next_cookie, peers=peers))
                self._cookies[self._next_cookie] = r.source
                self._next_cookie += 1
            new = dataclasses.replace(new, rules=tuple(rules))
            self._policies[key] = new
            prefixes = policy_prefixes([new])
            if prefixes:
                self._prefixes[key] = prefixes
            update.subjects |= new.subjects
        for sel in old_selectors:
            self.cache.remove_selector(sel)
        churned = self._sync_cidr(update)
        self._mark_subjects(update.subjects)
        self._mark_selectors(update.changed_selectors, churned)
        return update

    def _sync_cidr(self, update: Update) -> set[int]:
        wanted = set().union(*self._prefixes.values())
        if wanted == self._synced_prefixes:
            return set()  # most policy changes name no new prefix: nothing to reallocate
        self._synced_prefixes = wanted
        before = self.cidr.identities()
        added, removed = self.cidr.update(wanted)
        for ident in added:
            update.changed_selectors |= self.cache.add_identity(ident)
        for ident in removed:
            update.changed_selectors |= self.cache.remove_identity(ident.id)
        after = self.cidr.identities()
        update.cidr_added = {p: i for p, i in after.items() if before.get(p) != i}
        update.cidr_removed = {p: i for p, i in before.items() if after.get(p) != i}
        return {i.id for i in added} | {i.id for i in removed}

    # ---- identities and named ports ----

    def add_identity(self, ident: Identity) -> Update:
        self.revision += 1
        update = Update(self.revision, changed_selectors=self.cache.add_identity(ident))
        self._mark_selectors(update.changed_selectors, {ident.id})
        return update

    def remove_identity(self, n: int) -> Update:
        self.revision += 1
        update = Update(self.revision, changed_selectors=self.cache.remove_identity(n))
        self._mark_selectors(update.changed_selectors, {n})
        return update

    def set_named_ports(self, owner: str, ports: NamedPorts | None) -> Update:
        """Named container ports of a pod anywhere in the cluster (egress rules use them)."""
        norm = {name: (proto_number(p), int(n)) for name, (p, n) in (ports or {}).items()}
        changed = self._named.get(owner, {}) != norm
        if norm:
            self._named[owner] = norm
        else:
            self._named.pop(owner, None)
        if changed:
            self.revision += 1
            for ep_id, pol in self._realized.items():
                if pol.egress_named_ports:
                    self._dirty.add(ep_id)
        return Update(self.revision, named_ports_changed=changed)

    def remove_named_ports(self, owner: str) -> Update:
        return self.set_named_ports(owner, None)

    def _egress_resolver(self) -> Resolver:
        def resolve(name: str, proto: int) -> list[tuple[int, int]]:
            by_proto: dict[int, set[int]] = {}
            for ports in self._named.values():
                hit = ports.get(name)
                if hit is not None and proto in (PROTO_ANY, hit[0]):
                    by_proto.setdefault(hit[0], set()).add(hit[1])
            # As Cilium: a name that means different ports on different pods resolves to
            # nothing rather than to all of them.
            return [(p, next(iter(ns))) for p, ns in sorted(by_proto.items()) if len(ns) == 1]
        return resolve

    # ---- endpoints ----

    def upsert_endpoint(self, ep: Endpoint) -> None:
        self._unindex_endpoint(ep.ep_id)
        self._endpoints[ep.ep_id] = ep
        idx = self._ep_labels[ep.ep_id] = LabelIndex(ep.labels)
        for key, pairs in idx.by_key.items():
            for _, value in pairs:
                self._ep_by_label.setdefault((key, value), set()).add(ep.ep_id)
        self._dirty.add(ep.ep_id)
        self.set_named_ports(f"endpoint/{ep.ep_id}", ep.named_ports)

    def _unindex_endpoint(self, ep_id: int) -> None:
        idx = self._ep_labels.pop(ep_id, None)
        if idx is None:
            return
        for key, pairs in idx.by_key.items():
            for _, value in pairs:
                eps = self._ep_by_label.get((key, value))
                if eps is not None:
                    eps.discard(ep_id)
                    if not eps:
                        del self._ep_by_label[(key, value)]

    def remove_endpoint(self, ep_id: int) -> EndpointPolicy | None:
        self._unindex_endpoint(ep_id)
        self._endpoints.pop(ep_id, None)
        self._dirty.discard(ep_id)
        self._patches.pop(ep_id, None)
        self.set_named_ports(f"endpoint/{ep_id}", None)
        return self._realized.pop(ep_id, None)

    def endpoint(self, ep_id: int) -> Endpoint | None:
        return self._endpoints.get(ep_id)

    def realized(self, ep_id: int) -> EndpointPolicy | None:
        return self._realized.get(ep_id)

    def pending(self) -> set[int]:
        return set(self._dirty) | set(self._patches)

    def regenerate(self) -> dict[int, EndpointUpdate]:
        """Recompute the endpoints the changes since the last call can affect.

        Policy changes recompute an endpoint; identity churn only recomputes the entries
        of the identities that came or went (exact: an identity's entries fold only within
        its own buckets and are pruned only against wildcard buckets, which identity churn
        never changes).
        """
        out: dict[int, EndpointUpdate] = {}
        self._memo = {}
        # A full recompute allocates ~1M small tuples that form no cycles; cyclic collections
        # triggered by their sheer number were half its time. One collection afterwards
        # (when the interpreter next wants one) scans them once and untracks them.
        gc_was_enabled = gc.isenabled()
        gc.disable()
        try:
            for ep_id in sorted(self._dirty | set(self._patches)):
                ep = self._endpoints.get(ep_id)
                if ep is None:
                    continue
                old = self._realized.get(ep_id)
                if ep_id in self._dirty or old is None:
                    new = self.compute_endpoint(ep)
                    upserts, deletes = new.diff(old)
                else:
                    new, upserts, deletes = self._patch(old, ep, self._patches[ep_id])
                self._realized[ep_id] = new
                out[ep_id] = EndpointUpdate(new, upserts, deletes)
        finally:
            self._memo = None
            if gc_was_enabled:
                gc.enable()
        self._dirty.clear()
        self._patches.clear()
        # Untouched endpoints are provably unaffected, so they now reflect this revision too.
        for pol in self._realized.values():
            pol.revision = self.revision
        return out

    def _mark_subjects(self, subjects: set) -> None:
        if not subjects:
            return
        for s in subjects:
            # A subject with an In requirement can only select endpoints carrying one of
            # its (key, value) labels: look at those instead of every endpoint.
            keys = s.index_keys() if isinstance(s, LabelSelector) else ()
            if keys:
                candidates = set().union(*(self._ep_by_label.get((k, v), ()) for _, k, v in keys))
            else:
                candidates = self._endpoints.keys()
            for ep_id in candidates:
                if ep_id not in self._dirty and s.matches_labels(self._ep_labels[ep_id]):
                    self._dirty.add(ep_id)

    def _mark_selectors(self, changed: set, identities: set[int]) -> None:
        if not changed:
            return
        for ep_id, pol in self._realized.items():
            if pol.selectors & changed:
                self._patches.setdefault(ep_id, set()).update(identities)

    # ---- computation ----

    def compute_endpoint(self, ep: Endpoint) -> EndpointPolicy:
        return self.compute(ep.identity, ep.labels, ep.named_ports, ep_id=ep.ep_id,
                            enforcement=ep.enforcement, audit=ep.audit)

    def compute(self, endpoint_identity: int, endpoint_labels, named_ports: NamedPorts | None = None, *,
                ep_id: int = 0, enforcement: str | None = None, audit: bool | None = None,
                allow_localhost: bool | None = None) -> EndpointPolicy:
        mode = enforcement or self.enforcement
        if mode not in ENFORCEMENT_MODES:
            raise ValueError(f"enforcement must be one of {ENFORCEMENT_MODES}, got {mode!r}")
        audit = self.audit if audit is None else audit
        allow_localhost = self.allow_localhost if allow_localhost is None else allow_localhost
        labels = tuple(sorted(endpoint_labels))
        idx = LabelIndex(labels)
        subjects, select_items, rule_items, named_items = self._flat_policies()
        hit = [s.matches_labels(idx) for s in subjects]
        selects: dict[int, list[Selects]] = {INGRESS: [], EGRESS: []}
        for si, s in select_items:
            if hit[si]:
                selects[s.direction].append(s)
        rules = [r for si, r in rule_items if hit[si]]
        memo = self._memo
        if memo is None:
            states = {d: self._direction_state(d, mode, selects[d]) for d in DIRECTIONS}
        else:
            states = {}
            for d in DIRECTIONS:
                key = (d, mode, tuple([id(s) for s in selects[d]]))
                st = memo.get(key)
                if st is None:
                    st = memo[key] = self._direction_state(d, mode, selects[d])
                states[d] = st
        enforced = (states[INGRESS].enforced, states[EGRESS].enforced)

        memo_key = None
        if memo is not None:
            # Ingress named ports resolve on the endpoint's own ports: part of the key only
            # when a selected rule uses one.
            own = None
            if any(hit[si] for si in named_items):
                own = frozenset((k, tuple(v)) for k, v in (named_ports or {}).items())
            memo_key = (tuple([r.cookie for r in rules]), mode == "never", enforced, allow_localhost, own)
            state = memo.get(memo_key)
            if state is not None:
                entries, provenance, used, egress_named, shapes = state
                return EndpointPolicy(ep_id, endpoint_identity, labels, self.revision, mode, audit,
                                      states[INGRESS], states[EGRESS], dict(entries), dict(provenance),
                                      used, egress_named, tuple(rules), allow_localhost, shapes)

        contribs, reach, used, egress_named = self._contributions(
            rules, named_ports, None, mode == "never", enforced, allow_localhost)
        entries: Entries = {}
        provenance: Provenance = {}
        shapes = frozenset(self._realize(contribs, reach, entries, provenance))
        used = frozenset(used)
        if memo_key is not None:
            memo[memo_key] = (entries, provenance, used, egress_named, shapes)
            entries, provenance = dict(entries), dict(provenance)
        return EndpointPolicy(ep_id, endpoint_identity, labels, self.revision, mode, audit,
                              states[INGRESS], states[EGRESS], entries, provenance,
                              used, egress_named, tuple(rules), allow_localhost, shapes)

    def _flat_policies(self) -> tuple:
        """(distinct subjects, [(subject index, Selects)], [(subject index, Rule)], subject
        indexes of rules using an ingress named port), in policy order: an endpoint
        evaluates each subject once."""
        if self._flat is None:
            subjects: dict = {}
            select_items, rule_items, named_items = [], [], set()
            for pol in self._policies.values():
                for s in pol.selects:
                    select_items.append((subjects.setdefault(s.subject, len(subjects)), s))
                for r in pol.rules:
                    si = subjects.setdefault(r.subject, len(subjects))
                    rule_items.append((si, r))
                    if _ingress_named(r):
                        named_items.add(si)
            self._flat = (tuple(subjects), tuple(select_items), tuple(rule_items), tuple(named_items))
        return self._flat

    def _contributions(self, rules, named_ports: NamedPorts | None, only: set[int] | None,
                       never: bool, enforced: tuple[bool, bool], allow_localhost: bool):
        """-> (contributions, [(contribution index, identities)], selectors used, egress named).

        Identity 0 stands for wildcard peers and the not-enforced entries. With `only`, just
        the identities in it (identity churn patches). The identity collections may be the
        selector cache's own sets: read them, never change them."""
        contribs: list[Contribution] = []
        reach: list[tuple[int, Iterable[int]]] = []
        used: set = set()
        egress_named = False
        if not never:
            own = egress = None
            selections = self.cache.selections
            for r in rules:
                peers = r.peers
                if _wildcard_rule(r):
                    if only is not None:
                        continue
                    ids: Iterable[int] = (0,)
                elif only is not None:
                    if len(peers) == 1:
                        sel = selections(peers[0])
                        ids = [i for i in only if i in sel]
                    else:
                        ids = [i for i in only if any(i in selections(p) for p in peers)]
                    if not ids:
                        continue
                else:
                    used.update(peers)
                    if len(peers) == 1:
                        ids = selections(peers[0])
                    else:
                        ids = set().union(*(selections(p) for p in peers))
                if r.ports:
                    l4 = []
                    for spec in r.ports:
                        if r.direction == INGRESS:
                            own = own or own_named_ports(named_ports)
                            l4 += expand(spec, own)
                        else:
                            if spec.name:
                                egress_named = True
                            egress = egress or self._egress_resolver()
                            l4 += expand(spec, egress)
                    if not l4:
                        continue
                    l4 = tuple(l4)
                else:
                    l4 = ANY_L4
                if ids:
                    reach.append((len(contribs), ids))
                    contribs.append((r.direction, DENY if r.deny else ALLOW, r.cookie, l4))
        if only is None:
            for d in DIRECTIONS:
                if not enforced[d]:
                    reach.append((len(contribs), (0,)))
                    contribs.append((d, ALLOW, COOKIE_NOT_ENFORCED, ANY_L4))
        if enforced[INGRESS] and allow_localhost and (only is None or R.HOST in only):
            reach.append((len(contribs), (R.HOST,)))
            contribs.append((INGRESS, ALLOW, COOKIE_ALLOW_LOCALHOST, ANY_L4))
        return contribs, reach, used, egress_named

    def _realize(self, contribs, reach, entries: Entries, provenance: Provenance,
                 wild: Folded | None = None) -> set:
        """Stamp the entries of every identity `reach` names into entries/provenance;
        returns their (direction, proto, port, plen) shapes. `wild`: identity 0's folded
        state when identity 0 is not among them (patches)."""
        groups = partition(reach)
        shapes: set = set()
        for n, (sig, ids) in enumerate(groups):
            if 0 in ids:
                ids.discard(0)
                if not ids:
                    del groups[n]
                tmpl, wild = template(contribs, sig, None, self.prune)
                stamp(tmpl, (0,), entries, provenance)
                shapes.update(t[:4] for t in tmpl)
                break
        if wild is None:
            wild = template(contribs, (), None, self.prune)[1]
        for sig, ids in groups:
            tmpl, _ = template(contribs, sig, wild, self.prune)
            stamp(tmpl, ids, entries, provenance)
            shapes.update(t[:4] for t in tmpl)
        return shapes

    def _wild_state(self, old: EndpointPolicy, ep: Endpoint) -> Folded:
        """Identity 0's folded state of `old` (what pruning other identities depends on)."""
        selections = self.cache.selections
        reach_zero = [r for r in old.rules
                      if _wildcard_rule(r) or any(0 in selections(p) for p in r.peers)]
        contribs, reach, _, _ = self._contributions(
            reach_zero, ep.named_ports, None, old.enforcement == "never",
            (old.ingress.enforced, old.egress.enforced), False)
        return template(contribs, [ci for ci, ids in reach if 0 in ids], None, self.prune)[1]

    def _patch(self, old: EndpointPolicy, ep: Endpoint,
               idents: set[int]) -> tuple[EndpointPolicy, dict[EntryKey, EntryValue], list[EntryKey]]:
        """-> (policy, upserts, deletes): old's entries with those of `idents` recomputed;
        the diff is old.diff's, found without comparing every entry."""
        keep, prov = dict(old.entries), dict(old.provenance)  # copies run in C
        removed: dict[EntryKey, EntryValue] = {}
        if old.shapes or not old.provenance:
            # Only the keys the churned identities can have are looked at.
            for ident in idents:
                for d, proto, port, plen in old.shapes:
                    k = (d, ident, proto, port, plen)
                    v = keep.pop(k, None)
                    if v is not None:
                        removed[k] = v
                    prov.pop(k, None)
            shapes = set(old.shapes)
        else:
            for k in [k for k in prov if k[1] in idents]:
                del prov[k]
                v = keep.pop(k, None)
                if v is not None:
                    removed[k] = v
            shapes = {(k[0], k[2], k[3], k[4]) for k in old.provenance}
        enforced = (old.ingress.enforced, old.egress.enforced)
        memo, memo_key, state = self._memo, None, None
        if memo is not None:
            # Endpoints selected by the same rules get the same entries for these identities.
            own = None
            if any(_ingress_named(r) for r in old.rules):
                own = frozenset((k, tuple(v)) for k, v in (ep.named_ports or {}).items())
            memo_key = ("patch", tuple([r.cookie for r in old.rules]), frozenset(idents),
                        old.enforcement == "never", enforced, old.allow_localhost, own)
            state = memo.get(memo_key)
        if state is None:
            contribs, reach, _, _ = self._contributions(
                old.rules, ep.named_ports, idents, old.enforcement == "never", enforced,
                old.allow_localhost)
            added: Entries = {}
            added_prov: Provenance = {}
            added_shapes: set = set()
            if reach:
                wild = None if 0 in idents else self._wild_state(old, ep)
                added_shapes = self._realize(contribs, reach, added, added_prov, wild)
            state = (added, added_prov, added_shapes)
            if memo_key is not None:
                memo[memo_key] = state
        added, added_prov, added_shapes = state
        keep.update(added)
        prov.update(added_prov)
        shapes |= added_shapes
        new = dataclasses.replace(old, revision=self.revision, entries=keep, provenance=prov,
                                  shapes=frozenset(shapes))
        upserts = {k: v for k, v in added.items() if removed.get(k) != v}
        deletes = sorted(k for k in removed if k not in added)
        return new, upserts, deletes

    @staticmethod
    def _direction_state(d: int, mode: str, selects: list[Selects]) -> DirectionState:
        deny_sources = tuple(dict.fromkeys(s.source for s in selects if s.default_deny))
        name = DIRECTION_NAMES[d]
        if mode == "never":
            return DirectionState(False, (), "policy enforcement mode is never")
        if mode == "always":
            return DirectionState(True, deny_sources, "policy enforcement mode is always")
        if deny_sources:
            verb = "selects" if len({s.ref for s in deny_sources}) == 1 else "select"
            return DirectionState(True, deny_sources, f"{_policy_names(deny_sources)} {verb} the endpoint for {name}")
        if selects:
            return DirectionState(False, (), f"only policies with enableDefaultDeny.{name}=false select the endpoint")
        return DirectionState(False, (), f"no policy selects the endpoint for {name}")

    # ---- ipcache side ----

    def cidr_identities(self) -> dict[str, Identity]:
        return self.cidr.identities()

    def identity_of_address(self, address: str) -> Identity:
        """The identity an address outside the cluster has: LPM over policy prefixes."""
        return self.cidr.lookup(address)

    def explain(self, src, dst, port: int, proto: str | int = "TCP"):
        from .explain import explain
        return explain(self, src, dst, port, proto)


def _wildcard_rule(r: Rule) -> bool:
    """A rule with a wildcard peer has one identity-0 entry (memoized on the frozen rule:
    identity patches ask for every rule of every endpoint)."""
    w = r.__dict__.get("_wildcard")
    if w is None:
        w = any(is_wildcard(p) for p in r.peers)
        object.__setattr__(r, "_wildcard", w)
    return w


def _ingress_named(r: Rule) -> bool:
    """An ingress rule naming a port: resolved on each selected endpoint's own ports."""
    w = r.__dict__.get("_ingress_named")
    if w is None:
        w = r.direction == INGRESS and any(p.name for p in r.ports)
        object.__setattr__(r, "_ingress_named", w)
    return w


def _policy_names(sources) -> str:
    names = list(dict.fromkeys(str(s) for s in sources))
    return " and ".join(names[:3]) + (f" and {len(names) - 3} more" if len(names) > 3 else "")

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
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Mapping

from cilia.identity import reserved as R
from cilia.identity.allocator import LocalIdentityAllocator
from cilia.identity.reserved import Identity, reserved_identities

from .cidr import CIDRIdentities
from .mapstate import (ALLOW, COOKIE_ALLOW_LOCALHOST, COOKIE_NOT_ENFORCED, DENY,
                       FIRST_RULE_COOKIE, EntryKey, EntryValue, MapStateBuilder, Entries,
                       Provenance)
from .models import (DIRECTION_NAMES, DIRECTIONS, EGRESS, ENFORCEMENT_MODES, INGRESS,
                     PROTO_ANY, NormalizedPolicy, Rule, RuleSource, Selects, proto_number)
from .ports import NamedPorts, Resolver, expand, own_named_ports
from .selectors import LabelIndex, LabelSelector, Selector, is_wildcard
from .selectorcache import SelectorCache
from .translate import policy_prefixes, translate

NOT_ENFORCED_SOURCE = RuleSource("<not enforced>", "", "allow-all")
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

    def direction(self, d: int) -> DirectionState:
        return self.ingress if d == INGRESS else self.egress

    def map_entries(self) -> list[tuple[bytes, bytes]]:
        return [(k.pack(self.ep_id), v.pack()) for k, v in sorted(self.entries.items())]

    def diff(self, old: "EndpointPolicy | None") -> tuple[dict[EntryKey, EntryValue], list[EntryKey]]:
        """(entries to write, keys to delete) to turn `old`'s map state into this one."""
        prev = old.entries if old is not None and old.ep_id == self.ep_id else {}
        upserts = {k: v for k, v in self.entries.items() if prev.get(k) != v}
        deletes = sorted(k for k in prev if k not in self.entries)
        return upserts, deletes


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
        old_selectors = self._selector_refs.pop(key, [])
        self.revision += 1
        update = Update(self.revision)
        if old is not None:
            update.subjects |= old.subjects
            for r in old.rules:
                self._cookies.pop(r.cookie, None)
        if new is not None:
            rules = []
            for r in new.rules:
                rules.append(dataclasses.replace(r, cookie=self._next_cookie))
                self._cookies[self._next_cookie] = r.source
                self._next_cookie += 1
            new = dataclasses.replace(new, rules=tuple(rules))
            self._policies[key] = new
            update.subjects |= new.subjects
            selectors = [p for r in new.rules for p in r.peers if not is_wildcard(p)]
            # Register the new selectors before releasing the old ones, so a selector both
            # versions use keeps its selection instead of being recomputed.
            for sel in selectors:
                self.cache.add_selector(sel)
            self._selector_refs[key] = selectors
        for sel in old_selectors:
            self.cache.remove_selector(sel)
        churned = self._sync_cidr(update)
        self._mark_subjects(update.subjects)
        self._mark_selectors(update.changed_selectors, churned)
        return update

    def _sync_cidr(self, update: Update) -> set[int]:
        before = self.cidr.identities()
        added, removed = self.cidr.update(policy_prefixes(self._policies.values()))
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
        self._endpoints[ep.ep_id] = ep
        self._dirty.add(ep.ep_id)
        self.set_named_ports(f"endpoint/{ep.ep_id}", ep.named_ports)

    def remove_endpoint(self, ep_id: int) -> EndpointPolicy | None:
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
        for ep_id in sorted(self._dirty | set(self._patches)):
            ep = self._endpoints.get(ep_id)
            if ep is None:
                continue
            old = self._realized.get(ep_id)
            if ep_id in self._dirty or old is None:
                new = self.compute_endpoint(ep)
            else:
                new = self._patch(old, ep, self._patches[ep_id])
            upserts, deletes = new.diff(old)
            self._realized[ep_id] = new
            out[ep_id] = EndpointUpdate(new, upserts, deletes)
        self._dirty.clear()
        self._patches.clear()
        # Untouched endpoints are provably unaffected, so they now reflect this revision too.
        for pol in self._realized.values():
            pol.revision = self.revision
        return out

    def _mark_subjects(self, subjects: set) -> None:
        if not subjects:
            return
        for ep_id, ep in self._endpoints.items():
            idx = LabelIndex(ep.labels)
            if any(s.matches_labels(idx) for s in subjects):
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
        memo: dict[LabelSelector, bool] = {}

        def selected(s: LabelSelector) -> bool:
            hit = memo.get(s)
            if hit is None:
                hit = memo[s] = s.matches_labels(idx)
            return hit

        selects: dict[int, list[Selects]] = {INGRESS: [], EGRESS: []}
        rules: list[Rule] = []
        for pol in self._policies.values():
            for s in pol.selects:
                if selected(s.subject):
                    selects[s.direction].append(s)
            for r in pol.rules:
                if selected(r.subject):
                    rules.append(r)

        states = {d: self._direction_state(d, mode, selects[d]) for d in DIRECTIONS}
        builder = MapStateBuilder()
        used: set = set()
        egress_named = False
        if mode != "never":
            used, egress_named = self._rule_entries(builder, rules, named_ports, None)
        for d in DIRECTIONS:
            if not states[d].enforced:
                builder.add(EntryKey(d, 0, PROTO_ANY, 0, 0), ALLOW, COOKIE_NOT_ENFORCED)
        if states[INGRESS].enforced and allow_localhost:
            builder.add(EntryKey(INGRESS, R.HOST, PROTO_ANY, 0, 0), ALLOW, COOKIE_ALLOW_LOCALHOST)
        entries, provenance = builder.finalize(prune=self.prune)
        return EndpointPolicy(ep_id, endpoint_identity, labels, self.revision, mode, audit,
                              states[INGRESS], states[EGRESS], entries, provenance,
                              frozenset(used), egress_named, tuple(rules), allow_localhost)

    def _rule_entries(self, builder: MapStateBuilder, rules, named_ports: NamedPorts | None,
                      only: set[int] | None) -> tuple[set, bool]:
        """Add the entries of `rules`; with `only`, just those for these identities."""
        own = own_named_ports(named_ports)
        egress = self._egress_resolver()
        used: set = set()
        egress_named = False
        for r in rules:
            if any(is_wildcard(p) for p in r.peers):
                if only is not None:
                    continue
                ids: set[int] | list[int] = [0]
            else:
                ids = set()
                for p in r.peers:
                    used.add(p)
                    ids |= self.cache.selections(p)
                if only is not None:
                    ids &= only
                    if not ids:
                        continue
            if r.ports:
                l4 = []
                for spec in r.ports:
                    if spec.name and r.direction == EGRESS:
                        egress_named = True
                    l4 += expand(spec, own if r.direction == INGRESS else egress)
            else:
                l4 = [(PROTO_ANY, 0, 0)]
            flag = DENY if r.deny else ALLOW
            for ident in ids:
                for proto, port, plen in l4:
                    builder.add(EntryKey(r.direction, ident, proto, port, plen), flag, r.cookie)
        return used, egress_named

    def _patch(self, old: EndpointPolicy, ep: Endpoint, idents: set[int]) -> EndpointPolicy:
        keep = {k: v for k, v in old.entries.items() if k.identity not in idents}
        builder = MapStateBuilder()
        if old.enforcement != "never":
            self._rule_entries(builder, old.rules, ep.named_ports, idents)
        if R.HOST in idents and old.ingress.enforced and old.allow_localhost:
            builder.add(EntryKey(INGRESS, R.HOST, PROTO_ANY, 0, 0), ALLOW, COOKIE_ALLOW_LOCALHOST)
        entries, provenance = builder.finalize(prune=self.prune, context=keep)
        prov = {k: v for k, v in old.provenance.items() if k.identity not in idents}
        prov.update(provenance)
        keep.update(entries)
        return dataclasses.replace(old, revision=self.revision, entries=keep, provenance=prov)

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


def _policy_names(sources) -> str:
    names = list(dict.fromkeys(str(s) for s in sources))
    return " and ".join(names[:3]) + (f" and {len(names) - 3} more" if len(names) > 3 else "")

"""Building blocks of the policy engine: port prefixes, translation, selector cache, CIDR
identities, map ABI packing, incremental regeneration, revisions, explain wording."""
from __future__ import annotations

import struct

from hypothesis import given, strategies as st

from cilia.identity import Identity, pod_security_labels
from cilia.policy import ALLOWED, AUDIT, DENIED, Endpoint, PolicyEngine
from cilia.policy.cidr import CIDRIdentities
from cilia.policy.mapstate import (ALLOW, DENY, EntryKey, EntryValue, MapStateBuilder, lookup4,
                                   lookup_key, unpack_key, unpack_value)
from cilia.policy.models import EGRESS, INGRESS
from cilia.policy.ports import range_prefixes
from cilia.policy.selectorcache import SelectorCache
from cilia.policy.selectors import EntitySelector, LabelSelector, WILDCARD, CIDRSelector
from cilia.policy.translate import translate

from .test_policy_support import NAMED_PORTS, Model, ccnp, cnp, np_, simulate


def pod(name):
    return {"matchLabels": {"pod": name}}


# ---- ports ----

@given(st.integers(0, 65535), st.integers(0, 65535))
def test_range_prefixes_cover_exactly_the_range(a, b):
    lo, hi = min(a, b), max(a, b)
    covered = []
    for port, plen in range_prefixes(lo, hi):
        size = 1 << (16 - plen)
        assert port % size == 0  # aligned, so it is a real prefix
        covered.append((port, port + size - 1))
    covered.sort()
    assert covered[0][0] == lo and covered[-1][1] == hi
    for (_, end), (start, _) in zip(covered, covered[1:]):
        assert start == end + 1
    assert len(covered) <= 30  # at most two prefixes per bit level


def test_range_prefixes_known_values():
    assert range_prefixes(80, 80) == [(80, 16)]
    assert range_prefixes(0, 65535) == [(0, 0)]
    assert range_prefixes(8000, 8080) == [(8000, 10), (8064, 12), (8080, 16)]
    assert range_prefixes(1024, 2047) == [(1024, 6)]


# ---- translation ----

def _peers(obj, i=0):
    return [str(p) for p in translate(obj).rules[i].peers]


def test_network_policy_peers_translate_as_cilium_does():
    obj = np_("p", "x", {"podSelector": pod("a"), "ingress": [{"from": [
        {"podSelector": pod("b")},
        {"namespaceSelector": {"matchLabels": {"team": "blue"}}},
        {"namespaceSelector": {}},
        {"namespaceSelector": {"matchExpressions": [{"key": "team", "operator": "NotIn", "values": ["red"]}]},
         "podSelector": pod("c")},
        {"ipBlock": {"cidr": "10.0.0.0/8", "except": ["10.1.0.0/16"]}},
    ]}]})
    assert _peers(obj) == [
        "k8s:io.kubernetes.pod.namespace=x,k8s:pod=b",
        "k8s:io.cilium.k8s.namespace.labels.team=blue,k8s:io.kubernetes.pod.namespace",
        "k8s:io.kubernetes.pod.namespace",
        "k8s:io.cilium.k8s.namespace.labels.team notin (red),k8s:io.kubernetes.pod.namespace,k8s:pod=c",
        "10.0.0.0/8 except 10.1.0.0/16",
    ]
    assert str(translate(obj).rules[0].subject) == "k8s:io.kubernetes.pod.namespace=x,k8s:pod=a"


def test_negative_namespace_selectors_select_only_endpoints():
    # cilium/cilium#46949: NotIn alone would also select host, world and CIDR identities.
    m = Model([np_("out", "x", {"podSelector": pod("a"), "policyTypes": ["Egress"], "egress": [
        {"to": [{"namespaceSelector": {"matchExpressions": [{"key": "team", "operator": "NotIn", "values": ["red"]}]}}]}]}),
        cnp("out2", "x", {"endpointSelector": pod("b"), "egress": [{"toEndpoints": [
            {"matchExpressions": [{"key": "io.kubernetes.pod.namespace", "operator": "NotIn", "values": ["x"]}]}]}]})])
    assert [m.reach("x/a", d, 80) for d in ("y/a", "x/b", "host", "203.0.113.5")] == [".", "X", "X", "X"]
    assert [m.reach("x/b", d, 80) for d in ("y/a", "x/a", "host", "203.0.113.5")] == [".", "X", "X", "X"]


def test_network_policy_rule_without_peers_selects_everything():
    obj = np_("p", "x", {"podSelector": {}, "ingress": [{"ports": [{"port": 80}]}]})
    assert translate(obj).rules[0].peers == (WILDCARD,)


def test_cilium_endpoint_selectors_are_scoped_like_cilium():
    rule = {"endpointSelector": pod("a"), "ingress": [{"fromEndpoints": [
        pod("b"), {}, {"matchLabels": {"reserved:host": ""}},
        {"matchLabels": {"io.kubernetes.pod.namespace": "y"}}]}]}
    assert _peers(cnp("p", "x", rule)) == [
        "any:pod=b,k8s:io.kubernetes.pod.namespace=x",
        "k8s:io.kubernetes.pod.namespace=x",
        "reserved:host=",
        "any:io.kubernetes.pod.namespace=y",
    ]
    assert _peers(ccnp("p", rule)) == [
        "any:pod=b,k8s:io.kubernetes.pod.namespace",
        "k8s:io.kubernetes.pod.namespace",
        "reserved:host=",
        "any:io.kubernetes.pod.namespace=y",
    ]
    assert str(translate(cnp("p", "x", rule)).rules[0].subject) == "any:pod=a,k8s:io.kubernetes.pod.namespace=x"
    assert str(translate(ccnp("p", rule)).rules[0].subject) == "any:pod=a"


def test_cilium_l4_only_rule_is_every_peer_and_empty_rule_is_none():
    pol = translate(cnp("p", "x", {"endpointSelector": {}, "ingress": [
        {"toPorts": [{"ports": [{"port": "80"}]}]}, {}], "egress": [{"toEntities": ["all", "world"]}]}))
    assert [r.peers for r in pol.rules] == [(WILDCARD,), (WILDCARD, EntitySelector("world"))]
    assert [s.default_deny for s in pol.selects] == [True, True]


# ---- selector cache ----

def _ident(n, **labels):
    return Identity(n, tuple(sorted(f"k8s:{k}={v}" for k, v in labels.items())))


def test_selector_cache_is_incremental():
    cache = SelectorCache()
    web = LabelSelector.from_k8s({"matchLabels": {"app": "web"}}, "any")
    not_db = LabelSelector.from_k8s({"matchExpressions": [{"key": "app", "operator": "NotIn", "values": ["db"]}]}, "k8s")
    world = EntitySelector("world")
    for s in (web, not_db, world):
        cache.add_selector(s)
    assert cache.add_identity(_ident(300, app="web")) == {web, not_db}
    assert cache.add_identity(_ident(301, app="db")) == set()
    assert cache.add_identity(Identity(2, ("reserved:world",))) == {not_db, world}
    assert cache.selections(web) == {300} and cache.selections(not_db) == {300, 2}
    assert cache.remove_identity(300) == {web, not_db}
    assert cache.remove_identity(300) == set()
    # A selector added later sees the identities already there.
    db = LabelSelector.from_k8s({"matchLabels": {"k8s:app": "db"}}, "any")
    cache.add_selector(db)
    assert cache.selections(db) == {301}
    # Refcounted: the second registration survives one removal.
    cache.add_selector(db)
    cache.remove_selector(db)
    assert cache.selections(db) == {301}
    cache.remove_selector(db)
    assert db not in cache.selectors()


def test_selector_source_must_match_unless_any():
    k8s_only = LabelSelector.from_k8s({"matchLabels": {"k8s:app": "web"}}, "any")
    other = Identity(400, ("container:app=web",))
    assert not k8s_only.matches_labels(other.labels)
    assert LabelSelector.from_k8s({"matchLabels": {"app": "web"}}, "any").matches_labels(other.labels)


# ---- CIDR identities ----

def test_cidr_identities_carry_every_containing_policy_prefix():
    c = CIDRIdentities()
    added, removed = c.update(["198.51.100.0/24", "198.51.100.128/25", "10.0.0.0/8", "0.0.0.0/0", "2001:db8::/32"])
    ids = c.identities()
    assert set(ids) == {"198.51.100.0/24", "198.51.100.128/25", "10.0.0.0/8", "2001:db8::/32"}  # /0 is world
    assert ids["198.51.100.128/25"].labels == ("cidr:0.0.0.0/0", "cidr:198.51.100.0/24",
                                               "cidr:198.51.100.128/25", "reserved:world")
    assert "cidr:0.0.0.0/0" not in ids["2001:db8::/32"].labels
    assert all(i.id >= 1 << 24 for i in ids.values()) and len(added) == 4 and not removed
    assert c.lookup("198.51.100.200") == ids["198.51.100.128/25"]
    assert c.lookup("198.51.100.1") == ids["198.51.100.0/24"]
    assert c.lookup("192.0.2.1").id == 2
    # A new wider prefix changes the labels, hence the identity, of the narrower ones.
    old24 = ids["198.51.100.0/24"]
    added, removed = c.update(["198.51.0.0/16", "198.51.100.0/24"])
    new = c.identities()
    assert "cidr:198.51.0.0/16" in new["198.51.100.0/24"].labels and new["198.51.100.0/24"] != old24
    assert old24 in removed and {i.labels for i in added} == {new["198.51.0.0/16"].labels, new["198.51.100.0/24"].labels}
    added, removed = c.update([])
    assert added == [] and sorted(removed, key=lambda i: i.id) == sorted(new.values(), key=lambda i: i.id)
    assert c.identities() == {} and c.allocator.list() == []


def test_cidr_selector_with_excepts_on_identities():
    c = CIDRIdentities()
    c.update(["198.51.100.0/24", "198.51.100.128/25", "198.51.100.192/26"])
    sel = CIDRSelector.of("198.51.100.0/24", ["198.51.100.128/25"])
    from cilia.policy.selectors import LabelIndex
    hit = {p for p, i in c.identities().items() if sel.matches(i, LabelIndex(i.labels))}
    assert hit == {"198.51.100.0/24"}


# ---- map ABI ----

def test_map_key_and_value_layout():
    key = EntryKey(EGRESS, 0x01020304, 6, 0x1F40, 10).pack(0x0A0B)
    assert len(key) == 16
    assert key == struct.pack("<I", 74) + bytes([0x0A, 0x0B, 1, 6, 1, 2, 3, 4, 0x1F, 0x40, 0, 0])
    assert unpack_key(key) == (74, 0x0A0B, 1, 6, 0x01020304, 0x1F40)
    assert unpack_key(lookup_key(7, INGRESS, 300, 17, 53))[0] == 80
    value = EntryValue(ALLOW | DENY, 0xDEADBEEF).pack()
    assert value == bytes([3, 0, 0, 0]) + struct.pack("<I", 0xDEADBEEF)
    assert unpack_value(value) == EntryValue(3, 0xDEADBEEF)


def test_lpm_folding_and_pruning():
    b = MapStateBuilder()
    b.add(EntryKey(INGRESS, 300, 6, 80, 16), ALLOW, 20)
    b.add(EntryKey(INGRESS, 300, 6, 64, 10), DENY, 21)      # 64..127
    b.add(EntryKey(INGRESS, 301, 6, 443, 16), ALLOW, 22)
    b.add(EntryKey(INGRESS, 0, 6, 0, 0), ALLOW, 23)         # makes 301's allow redundant
    b.add(EntryKey(INGRESS, 302, 0, 0, 0), DENY, 24)
    b.add(EntryKey(INGRESS, 302, 6, 22, 16), DENY, 25)      # redundant: 302 denied on all
    entries, prov = b.finalize()
    assert entries[EntryKey(INGRESS, 300, 6, 80, 16)] == EntryValue(ALLOW | DENY, 21)
    assert EntryKey(INGRESS, 301, 6, 443, 16) not in entries
    assert EntryKey(INGRESS, 302, 6, 22, 16) not in entries
    assert len(prov) == 6
    full, _ = b.finalize(prune=False)

    def verdict(e, ident, port):
        flags = 0
        for _, v in lookup4(e, INGRESS, ident, 6, port):
            flags |= v.flags
        return "DENY" if flags & DENY else ("ALLOW" if flags else "DROP")

    for ident in (300, 301, 302, 303):
        for port in (22, 80, 100, 443, 9000):
            assert verdict(entries, ident, port) == verdict(full, ident, port), (ident, port)
    assert verdict(entries, 300, 80) == "DENY" and verdict(entries, 300, 128) == "ALLOW"


# ---- engine: wildcards, incremental regeneration, revisions ----

def test_entity_all_is_one_wildcard_entry():
    m = Model([cnp("open", "x", {"endpointSelector": pod("a"), "ingress": [{"fromEntities": ["all"]}],
                                 "egress": [{"toEntities": ["all"], "toPorts": [{"ports": [{"port": "53", "protocol": "UDP"}]}]}]})])
    entries = m.policy("x/a").entries
    assert sorted(entries) == [EntryKey(INGRESS, 0, 0, 0, 0), EntryKey(EGRESS, 0, 17, 53, 16)]


def test_regenerate_touches_only_affected_endpoints():
    m = Model([cnp("a-from-b", "x", {"endpointSelector": pod("a"), "ingress": [{"fromEndpoints": [pod("b")]}]}),
               np_("c-from-world", "x", {"podSelector": pod("c"), "ingress": [{"from": [{"ipBlock": {"cidr": "0.0.0.0/0"}}]}]})])
    e = m.engine
    assert e.regenerate() == {}
    rev = e.revision
    # A new pod with pod=b in x: only x/a's policy selects it as a peer.
    newb = Identity(900, tuple(pod_security_labels({"pod": "b", "v": "2"}, "x", {"team": "red"})))
    upd = e.add_identity(newb)
    assert upd.revision == rev + 1 and len(upd.changed_selectors) == 1
    out = e.regenerate()
    assert set(out) == {m.endpoints["x/a"].ep_id}
    u = out[m.endpoints["x/a"].ep_id]
    assert list(u.upserts) == [EntryKey(INGRESS, 900, 0, 0, 0)] and u.deletes == []
    assert all(e.realized(ep.ep_id).revision == e.revision for ep in m.endpoints.values())
    # A policy change recomputes the endpoints its subjects select, nothing else.
    e.upsert_policy(cnp("a-from-b", "x", {"endpointSelector": pod("a"), "ingress": [{"fromEndpoints": [pod("c")]}]}))
    out = e.regenerate()
    assert set(out) == {m.endpoints["x/a"].ep_id}
    assert EntryKey(INGRESS, 900, 0, 0, 0) in out[m.endpoints["x/a"].ep_id].deletes
    # Removing the identity no longer touches x/a (its selector does not select it now).
    e.remove_identity(900)
    assert e.regenerate() == {}
    # Deleting a policy reverts its endpoints to allow-all.
    upd = e.delete_policy("CiliumNetworkPolicy", "x", "a-from-b")
    out = e.regenerate()
    assert set(out) == {m.endpoints["x/a"].ep_id}
    assert out[m.endpoints["x/a"].ep_id].policy.entries == {
        EntryKey(INGRESS, 0, 0, 0, 0): EntryValue(ALLOW, 1), EntryKey(EGRESS, 0, 0, 0, 0): EntryValue(ALLOW, 1)}


def test_diff_applied_to_old_entries_gives_new_entries():
    m = Model([np_("a", "x", {"podSelector": pod("a"), "ingress": [{"from": [{"podSelector": pod("b")}]}]})])
    e = m.engine
    old = dict(m.policy("x/a").entries)
    e.upsert_policy(np_("a", "x", {"podSelector": pod("a"), "ingress": [{"from": [{"namespaceSelector": {}}], "ports": [{"port": 80}]}]}))
    upd = e.regenerate()[m.endpoints["x/a"].ep_id]
    for k in upd.deletes:
        del old[k]
    old.update(upd.upserts)
    assert old == m.policy("x/a").entries and upd.upserts and upd.deletes


def test_policy_cidr_changes_are_reported_for_the_ipcache():
    e = PolicyEngine()
    upd = e.upsert_policy(cnp("n", "x", {"endpointSelector": {}, "egress": [{"toCIDRSet": [
        {"cidr": "10.0.0.0/8", "except": ["10.1.0.0/16"]}]}]}))
    assert set(upd.cidr_added) == {"10.0.0.0/8", "10.1.0.0/16"} and not upd.cidr_removed
    assert set(e.cidr_identities()) == {"10.0.0.0/8", "10.1.0.0/16"}
    upd = e.delete_policy("CiliumNetworkPolicy", "x", "n")
    assert set(upd.cidr_removed) == {"10.0.0.0/8", "10.1.0.0/16"} and e.cidr_identities() == {}


def test_egress_named_ports_resolve_cluster_wide_and_ambiguity_resolves_to_nothing():
    m = Model([np_("a-out", "x", {"podSelector": pod("a"), "policyTypes": ["Egress"],
                                  "egress": [{"ports": [{"port": "serve-81-tcp"}]}]})])
    assert m.reach("x/a", "y/b", 81) == "." and m.reach("x/a", "y/b", 80) == "X"
    m.engine.set_named_ports("remote/pod", {"serve-81-tcp": ("TCP", 9081)})
    assert m.engine.pending() == {m.endpoints["x/a"].ep_id}
    m.engine.regenerate()
    assert m.reach("x/a", "y/b", 81) == "X"  # two different ports under one name


def test_rule_cookie_names_the_rule():
    m = Model([np_("a-from-b", "x", {"podSelector": pod("a"), "ingress": [{"from": [{"podSelector": pod("b")}]}]})])
    pol = m.policy("x/a")
    (key, value), = [(k, v) for k, v in pol.entries.items() if k.identity == m.endpoints["x/b"].identity]
    src = m.engine.rule_source(value.cookie)
    assert (src.kind, src.namespace, src.name, src.path) == ("NetworkPolicy", "x", "a-from-b", "spec.ingress[0]")


def test_compute_modes_are_inputs():
    m = Model([np_("deny", "x", {"podSelector": {}})])
    e, ep = m.engine, m.endpoints["x/a"]
    assert e.compute(ep.identity, ep.labels).ingress.enforced
    assert not e.compute(ep.identity, ep.labels, enforcement="never").ingress.enforced
    assert e.compute(ep.identity, ep.labels, enforcement="always").egress.enforced
    assert e.compute(ep.identity, ep.labels, audit=True).audit
    entries = e.compute(ep.identity, ep.labels, ep_id=5).map_entries()
    assert simulate(entries, 5, INGRESS, m.endpoints["y/b"].identity, 6, 80) == "DROP"
    assert simulate(entries, 5, INGRESS, 1, 6, 80) == "ALLOW"  # allow-localhost


# ---- explain wording ----

def test_explain_names_rules_and_reasons():
    m = Model([
        np_("a-from-b", "x", {"podSelector": pod("a"), "ingress": [{"from": [{"podSelector": pod("b")}], "ports": [{"port": 80}]}]}),
        cnp("no-c", "x", {"endpointSelector": pod("a"), "ingressDeny": [{"fromEndpoints": [pod("c")]}]}),
    ])
    e, ep = m.engine, m.endpoints
    v = e.explain(ep["x/b"], ep["x/a"], 80, "TCP")
    assert v.result == ALLOWED and v.directions == ("ingress",)
    assert v.allow_rules == (("NetworkPolicy", "x", "a-from-b"),) and v.deny_rule is None
    v = e.explain(ep["x/c"], ep["x/a"], 80)
    assert v.result == DENIED and v.deny_rule == ("CiliumNetworkPolicy", "x", "no-c")
    assert "denied by CiliumNetworkPolicy x/no-c spec.ingressDeny[0]" in v.reason
    v = e.explain(ep["y/a"], ep["x/a"], 80)
    assert v.result == DENIED and v.directions == ("ingress",)
    assert v.reason == ("ingress: no rule selects the peer; default deny because "
                        "NetworkPolicy x/a-from-b and CiliumNetworkPolicy x/no-c select the endpoint for ingress")
    v = e.explain(ep["x/b"], ep["x/a"], 81)
    assert "no rule allows the peer on TCP/81" in v.reason
    v = e.explain(ep["x/a"], ep["x/b"], 80)
    assert v.result == ALLOWED and v.allow_rules == ()
    assert "not enforced: no policy selects the endpoint" in v.reason
    v = e.explain(1, ep["x/a"], 80)
    assert v.result == ALLOWED and "allow-localhost" in v.reason
    audit = Endpoint(99, ep["x/a"].identity, ep["x/a"].labels, NAMED_PORTS, audit=True)
    v = e.explain(ep["y/a"], audit, 80)
    assert v.result == AUDIT and "audit mode" in v.reason
    v = e.explain("203.0.113.9", "198.51.100.1", 80)
    assert v.result == ALLOWED and v.egress is None and v.ingress is None

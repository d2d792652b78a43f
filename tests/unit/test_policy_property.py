"""Random policies and label sets: the engine's emitted map entries, run through the
simulated datapath, must give the verdict a reference evaluator derives directly from
the manifests' semantics.

The reference below is written independently of the engine: it never sees identities,
selectors, CIDR identities or map entries; it matches labels, namespaces and IP addresses
against the manifests as the Kubernetes and Cilium documentation describe them.
"""
from __future__ import annotations

import ipaddress

from hypothesis import HealthCheck, given, settings, strategies as st

from cilia.identity import Identity, pod_security_labels
from cilia.policy import ALLOWED, AUDIT, DENIED, Endpoint, PolicyEngine

from .test_policy_support import ccnp, cnp, lpm_identity, np_, simulate

NAMED = {"http": ("TCP", 80), "alt": ("UDP", 81)}
EXTERNAL = ("10.0.0.1", "10.0.1.1", "10.1.0.1", "192.0.2.1", "198.51.100.1", "host")
CIDRS = ("10.0.0.0/8", "10.0.0.0/16", "192.0.2.0/24", "0.0.0.0/0")
EXCEPTS = ("10.0.0.0/16", "10.0.0.0/24", "10.1.0.0/16", "192.0.2.0/25", "10.0.0.0/8")
PROTO_N = {"TCP": 6, "UDP": 17}

# ---- strategies ----

values = {"app": ["a", "b"], "tier": ["f", "g"], "team": ["red", "blue"],
          "kubernetes.io/metadata.name": ["x", "y"]}


def selector(keys):
    def expr(key):
        return st.one_of(
            st.builds(lambda v, op: {"key": key, "operator": op, "values": v},
                      st.lists(st.sampled_from(values[key]), min_size=1, max_size=2, unique=True),
                      st.sampled_from(["In", "NotIn"])),
            st.builds(lambda op: {"key": key, "operator": op}, st.sampled_from(["Exists", "DoesNotExist"])))
    labels = st.dictionaries(st.sampled_from(keys), st.none(), max_size=2).flatmap(
        lambda d: st.fixed_dictionaries({k: st.sampled_from(values[k]) for k in d}))
    exprs = st.lists(st.sampled_from(keys).flatmap(expr), max_size=2)
    return st.builds(lambda ml, me: {**({"matchLabels": ml} if ml else {}),
                                     **({"matchExpressions": me} if me else {})}, labels, exprs)


pod_sel = selector(["app", "tier"])
ns_sel = selector(["team", "kubernetes.io/metadata.name"])


@st.composite
def cidr_block(draw):
    cidr = draw(st.sampled_from(CIDRS))
    net = ipaddress.ip_network(cidr)
    inside = [e for e in EXCEPTS if ipaddress.ip_network(e).subnet_of(net) and ipaddress.ip_network(e) != net]
    exc = draw(st.lists(st.sampled_from(inside), max_size=2, unique=True)) if inside else []
    return {"cidr": cidr, **({"except": exc} if exc else {})}


@st.composite
def np_port(draw):
    proto = draw(st.sampled_from(["TCP", "UDP"]))
    port = draw(st.sampled_from([None, 80, 81, "http", "alt"]))
    out = {"protocol": proto}
    if port is not None:
        out["port"] = port
        if isinstance(port, int) and draw(st.booleans()):
            out["endPort"] = draw(st.sampled_from([p for p in (81, 82) if p >= port]))
    return out


np_peer = st.one_of(
    st.builds(lambda s: {"podSelector": s}, pod_sel),
    st.builds(lambda s: {"namespaceSelector": s}, ns_sel),
    st.builds(lambda p, n: {"podSelector": p, "namespaceSelector": n}, pod_sel, ns_sel),
    st.builds(lambda b: {"ipBlock": b}, cidr_block()))


def np_rules(peer_key):
    rule = st.builds(lambda peers, ports: {**({peer_key: peers} if peers is not None else {}),
                                           **({"ports": ports} if ports is not None else {})},
                     st.none() | st.lists(np_peer, min_size=1, max_size=2),
                     st.none() | st.lists(np_port(), min_size=1, max_size=2))
    return st.none() | st.lists(rule, max_size=2)


@st.composite
def network_policy(draw, i):
    spec = {"podSelector": draw(pod_sel)}
    types = draw(st.sampled_from([None, ["Ingress"], ["Egress"], ["Ingress", "Egress"]]))
    if types:
        spec["policyTypes"] = types
    for key, peer_key in (("ingress", "from"), ("egress", "to")):
        rules = draw(np_rules(peer_key))
        if rules is not None:
            spec[key] = rules
    return np_(f"np{i}", draw(st.sampled_from(["x", "y"])), spec)


@st.composite
def cilium_port(draw):
    out = {}
    proto = draw(st.sampled_from([None, "TCP", "UDP", "ANY"]))
    if proto:
        out["protocol"] = proto
    port = draw(st.sampled_from([None, "0", "80", "81", "http", "alt"]))
    if port is not None:
        out["port"] = port
        if port.isdigit() and port != "0" and draw(st.booleans()):
            out["endPort"] = draw(st.sampled_from([p for p in (81, 82) if p >= int(port)]))
    return out


def cilium_endpoint_sel():
    return st.builds(lambda s, ns: {**s, "matchLabels": {**s.get("matchLabels", {}),
                                                           **({"k8s:io.kubernetes.pod.namespace": ns} if ns else {})}}
                     if ns else s, pod_sel, st.sampled_from([None, None, "x", "y"]))


@st.composite
def cilium_rule(draw, p):
    out = {}
    l3 = draw(st.sampled_from(["none", "endpoints", "entities", "cidrset", "cidr"]))
    if l3 == "endpoints":
        out[f"{p}Endpoints"] = draw(st.lists(cilium_endpoint_sel(), max_size=2))
    elif l3 == "entities":
        out[f"{p}Entities"] = draw(st.lists(st.sampled_from(["all", "world", "cluster", "host"]),
                                            min_size=1, max_size=2, unique=True))
    elif l3 == "cidrset":
        out[f"{p}CIDRSet"] = draw(st.lists(cidr_block(), min_size=1, max_size=2))
    elif l3 == "cidr":
        out[f"{p}CIDR"] = draw(st.lists(st.sampled_from(CIDRS), min_size=1, max_size=2, unique=True))
    if l3 in ("none", "endpoints", "entities") and draw(st.booleans()):
        out["toPorts"] = [{"ports": draw(st.lists(cilium_port(), min_size=1, max_size=2))}]
    return out


@st.composite
def cilium_policy(draw, i):
    spec = {"endpointSelector": draw(cilium_endpoint_sel() if draw(st.booleans()) else pod_sel)}
    for key, p in (("ingress", "from"), ("ingressDeny", "from"), ("egress", "to"), ("egressDeny", "to")):
        if draw(st.booleans()):
            spec[key] = draw(st.lists(cilium_rule(p), max_size=2))
    for key in ("ingress", "egress"):
        # Same peers, other ports: allow and deny entries land in one (identity, proto)
        # bucket with nested port prefixes, where the LPM folding matters.
        if spec.get(key) and draw(st.booleans()):
            mirror = dict(draw(st.sampled_from(spec[key])))
            mirror["toPorts"] = [{"ports": draw(st.lists(cilium_port(), min_size=1, max_size=2))}]
            if not any(k.endswith(("CIDR", "CIDRSet")) for k in mirror):
                spec.setdefault(f"{key}Deny", []).append(mirror)
    dd = draw(st.fixed_dictionaries({}, optional={"ingress": st.booleans(), "egress": st.booleans()}))
    if dd or draw(st.booleans()):
        spec["enableDefaultDeny"] = dd
    if draw(st.booleans()):
        return ccnp(f"ccnp{i}", spec)
    return cnp(f"cnp{i}", draw(st.sampled_from(["x", "y"])), spec)


@st.composite
def world(draw):
    ns_labels = {ns: draw(st.sampled_from([{}, {"team": "red"}, {"team": "blue"}])) for ns in ("x", "y")}
    pods = []
    for i in range(draw(st.integers(2, 4))):
        labels = draw(st.fixed_dictionaries({}, optional={"app": st.sampled_from(["a", "b"]),
                                                          "tier": st.sampled_from(["f", "g"])}))
        pods.append({"name": f"p{i}", "ns": draw(st.sampled_from(["x", "y"])), "labels": labels,
                     "named": dict(NAMED) if draw(st.booleans()) else {}})
    n = draw(st.integers(1, 3))
    policies = [draw(st.one_of(network_policy(i), cilium_policy(i))) for i in range(n)]
    mode = draw(st.sampled_from(["default", "default", "always", "never"]))
    return ns_labels, pods, policies, mode, draw(st.booleans())


# ---- the reference evaluator ----

class Reference:
    def __init__(self, ns_labels, pods, policies, mode, audit):
        self.ns_labels = {ns: {**labels, "kubernetes.io/metadata.name": ns} for ns, labels in ns_labels.items()}
        self.pods, self.policies, self.mode, self.audit = pods, policies, mode, audit

    @staticmethod
    def match(sel, labels):
        for k, v in (sel.get("matchLabels") or {}).items():
            if labels.get(k) != v:
                return False
        for e in sel.get("matchExpressions") or []:
            k, op, vals = e["key"], e["operator"], e.get("values") or []
            present = k in labels
            if op == "In" and not (present and labels[k] in vals):
                return False
            if op == "NotIn" and present and labels[k] in vals:
                return False
            if op == "Exists" and not present:
                return False
            if op == "DoesNotExist" and present:
                return False
        return True

    def cilium_view(self, pod):
        """A pod's labels as a CiliumNetworkPolicy selector sees them (k8s: prefix optional)."""
        labels = dict(pod["labels"])
        labels["io.kubernetes.pod.namespace"] = pod["ns"]
        for k, v in self.ns_labels[pod["ns"]].items():
            labels[f"io.cilium.k8s.namespace.labels.{k}"] = v
        return labels

    def cilium_match(self, sel, pod):
        strip = lambda k: k[4:] if k.startswith("k8s:") else k  # noqa: E731
        norm = {"matchLabels": {strip(k): v for k, v in (sel.get("matchLabels") or {}).items()},
                "matchExpressions": [{**e, "key": strip(e["key"])} for e in sel.get("matchExpressions") or []]}
        return self.match(norm, self.cilium_view(pod))

    @staticmethod
    def in_block(peer, cidr, excepts=()):
        if not isinstance(peer, str) or peer == "host":
            return False
        ip = ipaddress.ip_address(peer)
        return ip in ipaddress.ip_network(cidr) and not any(ip in ipaddress.ip_network(e) for e in excepts)

    def named(self, name, proto, owner, egress):
        if not egress:
            hit = owner["named"].get(name)
            return [hit[1]] if hit and hit[0] == proto else []
        ports = {p["named"][name][1] for p in self.pods if name in p["named"] and p["named"][name][0] == proto}
        return list(ports) if len(ports) == 1 else []

    def port_ok(self, ports, proto, port, owner, egress, np_style):
        if not ports:
            return True
        for p in ports:
            pproto = p.get("protocol") or ("TCP" if np_style else "ANY")
            if pproto != "ANY" and pproto != proto:
                continue
            value = p.get("port")
            if value is None or str(value) == "0":
                return True
            if isinstance(value, str) and not value.isdigit():
                if port in self.named(value, proto, owner, egress):
                    return True
                continue
            lo = int(value)
            hi = int(p.get("endPort") or lo)
            if lo <= port <= max(lo, hi):
                return True
        return False

    def np_peer_ok(self, pol, peer_spec, peer):
        ns = pol["metadata"]["namespace"]
        if "ipBlock" in peer_spec:
            return self.in_block(peer, peer_spec["ipBlock"]["cidr"], peer_spec["ipBlock"].get("except", ()))
        if not isinstance(peer, dict):
            return False
        if "namespaceSelector" in peer_spec:
            if not self.match(peer_spec["namespaceSelector"], self.ns_labels[peer["ns"]]):
                return False
        elif peer["ns"] != ns:
            return False
        return self.match(peer_spec.get("podSelector") or {}, peer["labels"])

    def cilium_peer_ok(self, pol, rule, p, peer):
        keys = [f"{p}Endpoints", f"{p}CIDR", f"{p}CIDRSet", f"{p}Entities"]
        if all(k not in rule for k in keys):
            return bool(rule.get("toPorts"))
        ns = pol["metadata"].get("namespace") if pol["kind"] == "CiliumNetworkPolicy" else None
        for sel in rule.get(f"{p}Endpoints", []):
            if isinstance(peer, dict) and self.cilium_match(sel, peer):
                names_ns = any(k.endswith("io.kubernetes.pod.namespace") for k in sel.get("matchLabels", {}))
                if names_ns or ns is None or peer["ns"] == ns:
                    return True
        for c in rule.get(f"{p}CIDR", []):
            if self.in_block(peer, c):
                return True
        for c in rule.get(f"{p}CIDRSet", []):
            if self.in_block(peer, c["cidr"], c.get("except", ())):
                return True
        for e in rule.get(f"{p}Entities", []):
            if e == "all" or (e == "world" and isinstance(peer, str) and peer != "host") \
                    or (e == "cluster" and (isinstance(peer, dict) or peer == "host")) \
                    or (e == "host" and peer == "host"):
                return True
        return False

    def rules_for(self, subject, egress):
        """(policy, rules[(peer_fn, ports, deny, np_style)], default_deny) selecting subject."""
        d = "egress" if egress else "ingress"
        for pol in self.policies:
            spec_list = [pol["spec"]] if "spec" in pol else []
            spec_list += pol.get("specs", [])
            if pol["kind"] == "NetworkPolicy":
                spec = pol["spec"]
                if pol["metadata"]["namespace"] != subject["ns"] or not self.match(spec["podSelector"], subject["labels"]):
                    continue
                if d.capitalize() not in spec["policyTypes"]:
                    continue
                peer_key = "to" if egress else "from"
                rules = []
                for r in spec.get(d) or []:
                    peers = r.get(peer_key)
                    fn = (lambda peer, peers=peers, pol=pol: not peers or any(self.np_peer_ok(pol, ps, peer) for ps in peers))
                    rules.append((fn, r.get("ports"), False, True))
                yield rules, True
                continue
            for spec in spec_list:
                if not self.cilium_match(spec["endpointSelector"], subject):
                    continue
                if pol["kind"] == "CiliumNetworkPolicy" and subject["ns"] != pol["metadata"]["namespace"]:
                    continue
                p = "to" if egress else "from"
                allow, deny = spec.get(d) or [], spec.get(f"{d}Deny") or []
                explicit = (spec.get("enableDefaultDeny") or {}).get(d)
                default_deny = explicit if explicit is not None else bool(allow or deny)
                rules = []
                for r, is_deny in [(r, False) for r in allow] + [(r, True) for r in deny]:
                    ports = [pp for tp in r.get("toPorts") or [] for pp in tp["ports"]]
                    fn = (lambda peer, r=r, pol=pol: self.cilium_peer_ok(pol, r, p, peer))
                    rules.append((fn, ports, is_deny, False))
                yield rules, default_deny

    def direction(self, subject, egress, peer, proto, port):
        if self.mode == "never":
            return "ALLOW"
        # Ports are checked against the destination: the subject on ingress, the peer on egress.
        owner = peer if egress else subject
        enforced = self.mode == "always"
        allowed = denied = False
        for rules, default_deny in self.rules_for(subject, egress):
            enforced |= default_deny
            for fn, ports, is_deny, np_style in rules:
                if fn(peer) and self.port_ok(ports, proto, port, owner if isinstance(owner, dict) else {"named": {}},
                                             egress, np_style):
                    if is_deny:
                        denied = True
                    else:
                        allowed = True
        if denied:
            return "DENY"
        if allowed or not enforced:
            return "ALLOW"
        if not egress and peer == "host":
            return "ALLOW"  # allow-localhost
        return "DROP"

    def reach(self, src, dst, proto, port):
        marks = []
        if isinstance(src, dict) and self.direction(src, True, dst, proto, port) != "ALLOW":
            marks.append("A" if self.audit else "X")
        if isinstance(dst, dict) and self.direction(dst, False, src, proto, port) != "ALLOW":
            marks.append("A" if self.audit else "X")
        return "X" if "X" in marks else ("A" if marks else ".")


# ---- the property ----

def build_engine(ns_labels, pods, policies, mode, audit):
    engine = PolicyEngine(enforcement=mode, audit=audit)
    by_labels: dict[tuple, int] = {}
    eps = {}
    for i, pod in enumerate(pods):
        labels = tuple(pod_security_labels(pod["labels"], pod["ns"], ns_labels[pod["ns"]]))
        if labels not in by_labels:
            by_labels[labels] = 300 + len(by_labels)
            engine.add_identity(Identity(by_labels[labels], labels))
        eps[pod["name"]] = Endpoint(i + 1, by_labels[labels], labels, pod["named"])
        engine.upsert_endpoint(eps[pod["name"]])
    for p in policies:
        engine.upsert_policy(p)
    engine.regenerate()
    return engine, eps


_CHAR = {ALLOWED: ".", DENIED: "X", AUDIT: "A"}


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(world(), st.sampled_from([80, 81, 82]), st.sampled_from(["TCP", "UDP"]))
def test_engine_matches_reference(w, port, proto):
    ns_labels, pods, policies, mode, audit = w
    engine, eps = build_engine(*w)
    ref = Reference(*w)
    parties = list(pods) + list(EXTERNAL)
    cidrs = engine.cidr_identities()

    def ident(p):
        if isinstance(p, dict):
            return eps[p["name"]].identity
        return 1 if p == "host" else lpm_identity(cidrs, p)

    def engine_reach(src, dst):
        marks = []
        for party, direction, peer in ((src, 1, dst), (dst, 0, src)):
            if not isinstance(party, dict):
                continue
            pol = engine.realized(eps[party["name"]].ep_id)
            if simulate(pol.map_entries(), pol.ep_id, direction, ident(peer), PROTO_N[proto], port) != "ALLOW":
                marks.append("A" if pol.audit else "X")
        return "X" if "X" in marks else ("A" if marks else ".")

    def arg(p):
        return eps[p["name"]] if isinstance(p, dict) else (1 if p == "host" else p)

    for s in parties:
        for d in parties:
            if not isinstance(s, dict) and not isinstance(d, dict):
                continue
            want = ref.reach(s, d, proto, port)
            got = engine_reach(s, d)
            sname = s["name"] if isinstance(s, dict) else s
            dname = d["name"] if isinstance(d, dict) else d
            assert got == want, f"{sname} -> {dname} {proto}/{port}: engine {got}, reference {want}"
            assert _CHAR[engine.explain(arg(s), arg(d), port, proto).result] == got


# ---- focused: many port rules between two pods, every port of a window ----

@st.composite
def port_window_rule(draw):
    out = {}
    proto = draw(st.sampled_from([None, "TCP", "UDP", "ANY"]))
    if proto:
        out["protocol"] = proto
    lo = draw(st.sampled_from([0, 76, 78, 79, 80, 81, 84]))
    out["port"] = str(lo)
    if lo and draw(st.booleans()):
        out["endPort"] = draw(st.integers(lo, 86))
    return out


@st.composite
def port_window_policies(draw):
    def rules():
        l3 = st.sampled_from([{"fromEndpoints": [{"matchLabels": {"app": "b"}}]}, {}, {"fromEntities": ["all"]}])
        rule = st.builds(lambda base, ports: {**base, "toPorts": [{"ports": ports}]} if ports else base,
                         l3, st.lists(port_window_rule(), max_size=3))
        return st.lists(rule, max_size=3)
    spec = {"endpointSelector": {"matchLabels": {"app": "a"}}, "ingress": draw(rules()),
            "ingressDeny": draw(rules())}
    return [cnp("ports", "x", spec)]


@settings(max_examples=300, deadline=None)
@given(port_window_policies())
def test_port_rules_match_reference_on_every_port(policies):
    """LPM folding, range decomposition and pruning, against the reference port logic."""
    pods = [{"name": "p0", "ns": "x", "labels": {"app": "a"}, "named": {}},
            {"name": "p1", "ns": "x", "labels": {"app": "b"}, "named": {}}]
    w = ({"x": {}, "y": {}}, pods, policies, "default", False)
    engine, eps = build_engine(*w)
    ref = Reference(*w)
    pol = engine.realized(eps["p0"].ep_id)
    entries = pol.map_entries()
    for port in range(74, 88):
        for proto in ("TCP", "UDP"):
            got = simulate(entries, pol.ep_id, 0, eps["p1"].identity, PROTO_N[proto], port)
            want = ref.direction(pods[0], False, pods[1], proto, port)
            assert (got == "ALLOW") == (want == "ALLOW"), (proto, port, got, want)


# ---- incremental patches equal recomputation ----

@st.composite
def churn(draw):
    """Identities coming and going after the policies are in place."""
    ops = []
    for i in range(draw(st.integers(1, 6))):
        if ops and draw(st.booleans()):
            ops.append(("remove", draw(st.sampled_from([o[1] for o in ops if o[0] == "add"] or [300]))))
        else:
            labels = draw(st.fixed_dictionaries({}, optional={"app": st.sampled_from(["a", "b"]),
                                                              "tier": st.sampled_from(["f", "g"])}))
            ops.append(("add", 600 + i, draw(st.sampled_from(["x", "y"])), labels))
    return ops


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(world(), churn())
def test_identity_patches_equal_recomputation(w, ops):
    ns_labels = w[0]
    engine, eps = build_engine(*w)
    for op in ops:
        if op[0] == "add":
            _, n, ns, labels = op
            engine.add_identity(Identity(n, tuple(pod_security_labels({**labels, "n": str(n)}, ns, ns_labels[ns]))))
        else:
            engine.remove_identity(op[1])
        engine.regenerate()
        for ep in eps.values():
            realized = engine.realized(ep.ep_id)
            fresh = engine.compute_endpoint(ep)
            assert realized.entries == fresh.entries
            assert {k: (set(a), set(d)) for k, (a, d) in realized.provenance.items()} == \
                   {k: (set(a), set(d)) for k, (a, d) in fresh.provenance.items()}

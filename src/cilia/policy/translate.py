"""Validated policy manifests -> NormalizedPolicy, with Cilium's implicit scoping.

Kubernetes NetworkPolicy peers become Cilium label selectors exactly as Cilium's
k8s/network_policy.go builds them:
  podSelector               -> k8s:<k>=<v> AND k8s:io.kubernetes.pod.namespace=<policy ns>
  namespaceSelector         -> k8s:io.cilium.k8s.namespace.labels.<k>=<v> (no namespace pin)
  namespaceSelector {}      -> k8s:io.kubernetes.pod.namespace exists (every namespace)
  both                      -> the AND of the two
  ipBlock                   -> a CIDR peer with its excepts
  rule without from/to      -> every peer (world included)
Cilium policies: the endpointSelector of a CiliumNetworkPolicy is pinned to its
namespace; from/toEndpoints selectors too unless they name a namespace or a reserved
label (clusterwide policies get "a namespace label exists" instead, so {} means every pod).
"""
from __future__ import annotations

from typing import Iterable

from cilia.k8s.policies import ICMP_TYPE_NAMES

from .models import (EGRESS, INGRESS, KIND_CCNP, KIND_CNP, KIND_NP, PROTO_ICMP,
                     PROTO_ICMPV6, NormalizedPolicy, PortSpec, Rule, RuleSource, Selects,
                     proto_number)
from .selectors import (EXISTS, IN, NAMESPACE_LABELS_PREFIX, POD_NAMESPACE_KEY, WILDCARD,
                        CIDRSelector, EntitySelector, LabelSelector, k8s_requirements,
                        requirement)

def policy_key(obj: dict) -> tuple[str, str, str]:
    meta = obj.get("metadata") or {}
    ns = meta.get("namespace", "default") if obj["kind"] != KIND_CCNP else ""
    return (obj["kind"], ns, meta["name"])

def translate(obj: dict) -> NormalizedPolicy:
    kind = obj["kind"]
    if kind == KIND_NP:
        return _network_policy(obj)
    if kind in (KIND_CNP, KIND_CCNP):
        return _cilium_policy(obj)
    raise ValueError(f"not a policy kind: {kind}")

def _ns_pin(ns: str):
    return requirement("k8s", POD_NAMESPACE_KEY, IN, (ns,))

# ---- NetworkPolicy ----

def _np_peer(peer: dict, ns: str):
    if "ipBlock" in peer:
        return CIDRSelector.of(peer["ipBlock"]["cidr"], peer["ipBlock"].get("except") or ())
    reqs = k8s_requirements(peer.get("podSelector"), "k8s")
    if "namespaceSelector" in peer:
        reqs += k8s_requirements(peer["namespaceSelector"], "k8s", NAMESPACE_LABELS_PREFIX)
        # Always, not only for {}: a selector made of NotIn/DoesNotExist alone would also
        # match host, world and CIDR identities, which carry no namespace labels (Cilium
        # bug #46949, fixed the same way in cilium/cilium#46996).
        reqs.append(requirement("k8s", POD_NAMESPACE_KEY, EXISTS))
    else:
        reqs.append(_ns_pin(ns))
    return LabelSelector.of(reqs)

def _np_port(p: dict) -> PortSpec:
    proto = proto_number(p.get("protocol", "TCP"))
    port = p.get("port")
    if isinstance(port, str):
        return PortSpec(proto, name=port)
    return PortSpec(proto, port or 0, p.get("endPort") or 0)

def _network_policy(obj: dict) -> NormalizedPolicy:
    key = policy_key(obj)
    kind, ns, name = key
    spec = obj.get("spec") or {}
    subject = LabelSelector.of([*k8s_requirements(spec.get("podSelector"), "k8s"), _ns_pin(ns)])
    types = spec.get("policyTypes") or ["Ingress"]
    selects, rules = [], []
    for type_, direction, section, peer_key in (("Ingress", INGRESS, "ingress", "from"),
                                                ("Egress", EGRESS, "egress", "to")):
        if type_ not in types:
            # Kubernetes: rules of a direction the policy does not declare are ignored.
            continue
        selects.append(Selects(direction, subject, True, RuleSource(kind, ns, name, "spec.policyTypes")))
        for i, r in enumerate(spec.get(section) or []):
            peers = tuple(_np_peer(p, ns) for p in r.get(peer_key) or []) or (WILDCARD,)
            ports = tuple(_np_port(p) for p in r.get("ports") or [])
            rules.append(Rule(direction, subject, peers, ports, False,
                              RuleSource(kind, ns, name, f"spec.{section}[{i}]")))
    return NormalizedPolicy(key, tuple(selects), tuple(rules))

# ---- CiliumNetworkPolicy / CiliumClusterwideNetworkPolicy ----

def _endpoint_peer(sel: dict, ns: str) -> LabelSelector:
    es = LabelSelector.from_k8s(sel, "any")
    if es.has_source("reserved"):
        return es
    ns_reqs = [r for r in es.requirements if r.key == POD_NAMESPACE_KEY and r.source in ("k8s", "any")]
    if any(r.op in (IN, EXISTS) for r in ns_reqs):
        return es
    if ns and not ns_reqs:
        return es.with_requirements([_ns_pin(ns)])
    # Clusterwide, or a namespace named only negatively (NotIn): still only endpoints.
    return es.with_requirements([requirement("k8s", POD_NAMESPACE_KEY, EXISTS)])

def _entity(name: str):
    return WILDCARD if name == "all" else EntitySelector(name)

def _cilium_ports(rule: dict) -> tuple[PortSpec, ...]:
    out: list[PortSpec] = []
    for pr in rule.get("toPorts") or []:
        ports = pr.get("ports") or [{}]
        for p in ports:
            proto = proto_number(p.get("protocol") or "ANY")
            value = str(p.get("port") or "0")
            if value.isdigit():
                out.append(PortSpec(proto, int(value), int(p.get("endPort") or 0)))
            else:
                out.append(PortSpec(proto, name=value))
    for icmp in rule.get("icmps") or []:
        for f in icmp.get("fields") or []:
            family = f.get("family") or "IPv4"
            t = f["type"]
            code = t if isinstance(t, int) else ICMP_TYPE_NAMES[family][t]
            out.append(PortSpec(PROTO_ICMP if family == "IPv4" else PROTO_ICMPV6, code))
    return tuple(out)

def _cilium_peers(rule: dict, p: str, ns: str) -> tuple:
    l3_keys = (f"{p}Endpoints", f"{p}CIDR", f"{p}CIDRSet", f"{p}Entities")
    if all(rule.get(k) is None for k in l3_keys):
        # An L4-only rule applies to every peer; `{}` (no L4 either) selects nothing and
        # only puts the endpoint into default deny, as Cilium documents.
        return (WILDCARD,) if rule.get("toPorts") or rule.get("icmps") else ()
    peers: list = []
    peers += [_endpoint_peer(s, ns) for s in rule.get(f"{p}Endpoints") or []]
    peers += [CIDRSelector.of(c) for c in rule.get(f"{p}CIDR") or []]
    peers += [CIDRSelector.of(c["cidr"], c.get("except") or ()) for c in rule.get(f"{p}CIDRSet") or []]
    peers += [_entity(e) for e in rule.get(f"{p}Entities") or []]
    return tuple(dict.fromkeys(peers))

def _cilium_rules(spec: dict, path: str, kind: str, ns: str, name: str) -> tuple[list, list]:
    subject = LabelSelector.from_k8s(spec.get("endpointSelector"), "any")
    if ns:
        subject = subject.with_requirements([_ns_pin(ns)])
    dd = spec.get("enableDefaultDeny") or {}
    selects, rules = [], []
    for direction, allow_key, deny_key, p in ((INGRESS, "ingress", "ingressDeny", "from"),
                                              (EGRESS, "egress", "egressDeny", "to")):
        dname = "ingress" if direction == INGRESS else "egress"
        has_rules = bool(spec.get(allow_key)) or bool(spec.get(deny_key))
        explicit = dd.get(dname)
        if has_rules or explicit is not None:
            default_deny = explicit if explicit is not None else has_rules
            src_path = f"{path}.enableDefaultDeny.{dname}" if explicit is not None else f"{path}.{allow_key if spec.get(allow_key) else deny_key}"
            selects.append(Selects(direction, subject, default_deny, RuleSource(kind, ns, name, src_path)))
        for key, deny in ((allow_key, False), (deny_key, True)):
            for i, r in enumerate(spec.get(key) or []):
                peers = _cilium_peers(r, p, ns)
                if not peers:
                    continue
                rules.append(Rule(direction, subject, peers, _cilium_ports(r), deny,
                                  RuleSource(kind, ns, name, f"{path}.{key}[{i}]")))
    return selects, rules

def _cilium_policy(obj: dict) -> NormalizedPolicy:
    key = policy_key(obj)
    kind, ns, name = key
    specs: list[tuple[str, dict]] = []
    if obj.get("spec") is not None:
        specs.append(("spec", obj["spec"]))
    specs += [(f"specs[{i}]", s) for i, s in enumerate(obj.get("specs") or [])]
    selects, rules = [], []
    for path, spec in specs:
        s, r = _cilium_rules(spec, path, kind, ns, name)
        selects += s
        rules += r
    return NormalizedPolicy(key, tuple(selects), tuple(rules))

def policy_prefixes(policies: Iterable[NormalizedPolicy]) -> set[str]:
    out: set[str] = set()
    for pol in policies:
        for r in pol.rules:
            for p in r.peers:
                if isinstance(p, CIDRSelector):
                    out.update(p.prefixes)
    return out

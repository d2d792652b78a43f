"""The network-policy truth-table model (as Kubernetes' netpol e2e): namespaces x, y, z,
pods a, b, c in each, every pod serving TCP and UDP on 80 and 81, one ClusterIP
Service per pod; expectations as readable reachability rules and matrices printed side
by side when they differ.

Names: pods are "ns/pod" ("x/a"); lab hosts are "node1", "node2" (probes from a node's
netns) and "world" (198.51.100.100). Patterns are fnmatch globs over these names:
"x/*" is every pod in x, "*/a" every pod a, "*/*" every pod, "*" everything.
"""
from __future__ import annotations

import fnmatch
import json
from dataclasses import dataclass, field
from typing import Callable, Iterable

NAMESPACES = ("x", "y", "z")
POD_NAMES = ("a", "b", "c")
PODS = tuple(f"{ns}/{p}" for ns in NAMESPACES for p in POD_NAMES)
NODES = ("node1", "node2")
WORLD = "world"
WORLD_IP = "198.51.100.100"
PORTS = (80, 81)
PROTOCOLS = ("TCP", "UDP")
PORT_PROTOS = tuple((port, proto) for port in PORTS for proto in PROTOCOLS)
# ICMP probes are echo requests; their "port" is the ICMP type, as `policy explain` takes it.
ICMP_ECHO = (8, "ICMP")
# Through the pod IP, through the pod's ClusterIP, and (from the world host only) through
# the pod's NodePort on the pod's own node, which keeps the client address.
VIAS = ("pod", "svc", "nodeport")
VIA_NAMES = {"pod": "pod IPs", "svc": "ClusterIPs", "nodeport": "NodePorts (on the backend's node)"}

# Pods alternate over the nodes so every namespace has pods on both and every pair of
# namespaces is probed within a node and across the tunnel.
PLACEMENT = {pod: NODES[i % len(NODES)] for i, pod in enumerate(PODS)}
# Labels the cases select on besides pod=<name> and the namespace name: NotIn and
# DoesNotExist need objects without the key (x has no team, c no tier).
NS_LABELS = {"x": {}, "y": {"team": "blue"}, "z": {"team": "red"}}
POD_LABELS = {"a": {"tier": "front"}, "b": {"tier": "back"}, "c": {}}


def port_name(port: int, proto: str) -> str:
    return f"serve-{port}-{proto.lower()}"


# ---- manifests ------------------------------------------------------------------------

def namespace_doc(ns: str, extra_labels: dict | None = None) -> dict:
    labels = {"kubernetes.io/metadata.name": ns, "ns": ns, **NS_LABELS[ns], **(extra_labels or {})}
    return {"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": ns, "labels": labels}}


def pod_doc(pod: str, extra_labels: dict | None = None) -> dict:
    ns, name = pod.split("/")
    ports = [{"containerPort": port, "name": port_name(port, proto), "protocol": proto}
             for port, proto in PORT_PROTOS]
    return {"apiVersion": "v1", "kind": "Pod",
            "metadata": {"name": name, "namespace": ns,
                         "labels": {"pod": name, **POD_LABELS[name], **(extra_labels or {})}},
            "spec": {"nodeName": PLACEMENT[pod],
                     "containers": [{"name": "echo", "image": "cilia/echo", "ports": ports}]}}


def service_doc(pod: str) -> dict:
    ns, name = pod.split("/")
    ports = [{"name": f"p{port}-{proto.lower()}", "port": port, "targetPort": port,
              "protocol": proto} for port, proto in PORT_PROTOS]
    # NodePort: the ClusterIP as any Service, plus a way in for the world host.
    return {"apiVersion": "v1", "kind": "Service",
            "metadata": {"name": f"s-{name}", "namespace": ns},
            "spec": {"type": "NodePort", "selector": {"pod": name}, "ports": ports}}


def manifest(docs: Iterable[dict]) -> str:
    # JSON is YAML: no quoting surprises (a bare `on`, `80:81`) in generated documents.
    return "\n---\n".join(json.dumps(d) for d in docs) + "\n"


def model_manifest() -> str:
    return manifest([*(namespace_doc(ns) for ns in NAMESPACES), *(pod_doc(p) for p in PODS),
                     *(service_doc(p) for p in PODS)])


def netpol(name: str, ns: str, pod_selector: dict | None = None, *, ingress=None, egress=None,
           types: list[str] | None = None) -> dict:
    spec: dict = {"podSelector": pod_selector or {}}
    if ingress is not None:
        spec["ingress"] = ingress
    if egress is not None:
        spec["egress"] = egress
    if types is not None:
        spec["policyTypes"] = types
    return {"apiVersion": "networking.k8s.io/v1", "kind": "NetworkPolicy",
            "metadata": {"name": name, "namespace": ns}, "spec": spec}


def cnp(name: str, ns: str, spec: dict) -> dict:
    return {"apiVersion": "cilium.io/v2", "kind": "CiliumNetworkPolicy",
            "metadata": {"name": name, "namespace": ns}, "spec": spec}


def ccnp(name: str, spec: dict) -> dict:
    return {"apiVersion": "cilium.io/v2", "kind": "CiliumClusterwideNetworkPolicy",
            "metadata": {"name": name}, "spec": spec}


def labels(**kv: str) -> dict:
    return {"matchLabels": dict(kv)}


def expr(key: str, op: str, *values: str) -> dict:
    e: dict = {"key": key, "operator": op}
    if values:
        e["values"] = list(values)
    return e


# ---- expectations ---------------------------------------------------------------------

Patterns = str | tuple[str, ...] | list[str]


def _match(name: str, patterns: Patterns) -> bool:
    if isinstance(patterns, str):
        patterns = (patterns,)
    return any(fnmatch.fnmatchcase(name, p) for p in patterns)


@dataclass(frozen=True)
class _Rule:
    value: bool
    frm: Patterns
    to: Patterns
    ports: tuple[int, ...] | None   # None: every port
    protos: tuple[str, ...] | None  # None: every protocol
    via: tuple[str, ...]

    def covers(self, src: str, dst: str, port: int, proto: str, via: str) -> bool:
        return (_match(src, self.frm) and _match(dst, self.to)
                and (self.ports is None or port in self.ports)
                and (self.protos is None or proto in self.protos) and via in self.via)


@dataclass
class Expect:
    """Expected reachability: a default, then rules where the last one that covers a
    probe wins (as Reachability.ExpectPeer in Kubernetes' netpol e2e).

    A pod always reaches itself: through its own IP the packet never leaves the pod
    (loopback), and through its ClusterIP Cilium skips policy for the hairpinned flow
    (bpf_lxc.c: "when an endpoint connects to itself via service clusterIP, we need to
    skip the policy enforcement").
    """
    default: bool = True
    rules: list[_Rule] = field(default_factory=list)

    def _add(self, value: bool, frm: Patterns, to: Patterns, ports, protos, via) -> "Expect":
        ports = None if ports is None else tuple([ports] if isinstance(ports, int) else ports)
        protos = None if protos is None else tuple([protos] if isinstance(protos, str) else protos)
        via = tuple(VIAS if via is None else ([via] if isinstance(via, str) else via))
        self.rules.append(_Rule(value, frm, to, ports, protos, via))
        return self

    def allow(self, frm: Patterns = "*", to: Patterns = "*", *, ports=None, protos=None,
              via=None) -> "Expect":
        return self._add(True, frm, to, ports, protos, via)

    def deny(self, frm: Patterns = "*", to: Patterns = "*", *, ports=None, protos=None,
             via=None) -> "Expect":
        return self._add(False, frm, to, ports, protos, via)

    def __call__(self, src: str, dst: str, port: int, proto: str, via: str) -> bool:
        if src == dst:
            return True
        value = self.default
        for r in self.rules:
            if r.covers(src, dst, port, proto, via):
                value = r.value
        return value


def deny_all() -> Expect:
    return Expect(default=False)


# ---- probes ---------------------------------------------------------------------------

@dataclass(frozen=True, order=True)
class Probe:
    src: str
    dst: str
    port: int
    proto: str
    via: str

    @property
    def key(self) -> str:
        return f"{self.src}>{self.dst}:{self.port}/{self.proto}@{self.via}"


def icmp_probes(sources: Iterable[str], targets: Iterable[str]) -> list[Probe]:
    """Echo requests pod to pod through pod IPs (a ClusterIP balances no ICMP)."""
    return [Probe(s, d, *ICMP_ECHO, "pod") for s in sources for d in targets
            if "/" in s and "/" in d]


def probes_for(sources: Iterable[str], targets: Iterable[str]) -> list[Probe]:
    """Pod to pod through pod IPs and ClusterIPs; a node probes through pod IPs (no
    socket LB on the nodes, so a node's own traffic to a ClusterIP is not translated);
    the world host through NodePorts (pod IPs are not routed outside the cluster); pods
    reach the world host at its address."""
    out = []
    for s in sources:
        for d in targets:
            if s == WORLD and d == WORLD:
                continue
            if s == WORLD:
                vias: tuple[str, ...] = ("nodeport",)
            elif "/" in s and "/" in d:
                vias = ("pod", "svc")
            else:
                vias = ("pod",)
            for port, proto in PORT_PROTOS:
                for via in vias:
                    out.append(Probe(s, d, port, proto, via))
    return out


def render_matrix(result: Callable[[Probe], bool | None], sources: list[str], targets: list[str],
                  port: int, proto: str, via: str) -> list[str]:
    """Rows are sources, columns targets: '.' reaches, 'X' does not, ' ' not probed."""
    width = max(len(t) for t in targets + sources)
    lines = [" " * width + " " + " ".join(t.rjust(width) for t in targets)]
    for s in sources:
        cells = []
        for t in targets:
            v = result(Probe(s, t, port, proto, via))
            cells.append((" " if v is None else "." if v else "X").rjust(width))
        lines.append(s.rjust(width) + " " + " ".join(cells))
    return lines


def side_by_side(left: list[str], right: list[str], titles=("expected", "observed")) -> str:
    w = max(len(line) for line in left + [titles[0]])
    out = [titles[0].ljust(w) + "    " + titles[1]]
    for i in range(max(len(left), len(right))):
        a = left[i] if i < len(left) else ""
        b = right[i] if i < len(right) else ""
        out.append(a.ljust(w) + "    " + b)
    return "\n".join(out)


def mismatch_report(expected: dict[Probe, bool], observed: dict[Probe, bool],
                    details: dict[Probe, str] | None = None) -> str:
    bad = sorted(p for p in expected if expected[p] != observed.get(p))
    if not bad:
        return ""
    sources = sorted({p.src for p in expected}, key=_order)
    targets = sorted({p.dst for p in expected}, key=_order)
    parts = [f"{len(bad)} of {len(expected)} probes differ from the expectation"]
    for port, proto in sorted({(p.port, p.proto) for p in expected}, key=lambda pp: (pp[1] == "ICMP", pp)):
        for via in VIAS:
            if not any(p.port == port and p.proto == proto and p.via == via for p in bad):
                continue
            parts.append(f"\n--- {port}/{proto} through {VIA_NAMES[via]}")
            srcs = [s for s in sources if any(p.src == s and p.via == via for p in expected)]
            dsts = [t for t in targets if any(p.dst == t and p.via == via for p in expected)]
            parts.append(side_by_side(
                render_matrix(expected.get, srcs, dsts, port, proto, via),
                render_matrix(observed.get, srcs, dsts, port, proto, via)))
    parts.append("\ndiffering probes (expected -> observed [detail]):")
    for p in bad[:60]:
        d = (details or {}).get(p, "")
        parts.append(f"  {p.key}: {expected[p]} -> {observed.get(p)} [{d}]")
    if len(bad) > 60:
        parts.append(f"  ... and {len(bad) - 60} more")
    return "\n".join(parts)


def _order(name: str) -> tuple:
    if "/" in name:
        return (0, name)
    return (1, name)

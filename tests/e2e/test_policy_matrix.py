"""Network-policy truth tables on a 2-node lab (as Kubernetes' netpol e2e, Cilium's semantics).

Namespaces x, y, z with pods a, b, c (label pod=<name>) spread over both nodes, every pod
serving TCP and UDP on 80 and 81 (named containerPorts serve-<port>-<proto>) behind its
own NodePort Service. Every case applies its policies (`apply --wait`) and probes, on every
port and protocol: the 9x9 pod matrix through pod IPs and through ClusterIPs, every pod to
the world host (198.51.100.100), the world host to every pod through the NodePort on the
pod's node (client address kept), and where the case asks, the nodes to every pod and ICMP
echo pod to pod. It compares with the expectation written in the case (printing expected
and observed matrices side by side on a mismatch), checks `policy explain --batch` against
what the datapath did on every pair that crossed it and, where the case asks, the policy
drop counters of both nodes; then deletes its policies (`delete --wait`).

Besides pod=<name> and the namespace name, namespaces y and z carry team=blue and team=red
and pods a and b tier=front and tier=back (policy_model.py), for NotIn/DoesNotExist.
"""
from __future__ import annotations

import fnmatch
import os
import signal
import subprocess
import time
from dataclasses import dataclass, field
from typing import Callable

import pytest

from tests.e2e.conftest import Lab
from tests.e2e.policy_model import (NODES, PLACEMENT, PODS, WORLD, WORLD_IP, Expect, Probe,
                                    ccnp, cnp, deny_all, expr, icmp_probes, labels, manifest,
                                    mismatch_report, model_manifest, namespace_doc, netpol,
                                    pod_doc, probes_for)
from tests.e2e.policy_runner import PYTHON, Matrix, wait_until

pytestmark = pytest.mark.root

# Cilium: a CIDR peer (ipBlock, fromCIDR) never selects pods, whose traffic carries their
# endpoint identity (docs "known missing features", cilium#9209).
IPBLOCK_SELECTS_PODS = False
DROP_POLICY, DROP_POLICY_DENY = 133, 181
REACHABLE = ("ALLOWED", "AUDIT")


def on(node: str, pattern: str = "*/*") -> tuple[str, ...]:
    """The pods matching `pattern` that run on `node`."""
    return tuple(p for p in PODS if PLACEMENT[p] == node and fnmatch.fnmatchcase(p, pattern))


# ---- cases ----------------------------------------------------------------------------

@dataclass
class Step:
    expect: Expect
    apply: list[dict] = field(default_factory=list)
    before: Callable[[Matrix], None] | None = None
    title: str = ""
    # Label changes have no revision to wait for: re-probe mismatches until this many
    # seconds have passed before calling them failures.
    settle: float = 0.0
    # Audit mode: the probes policy would have dropped (explain must say AUDIT for them).
    audited: Expect | None = None
    # More checks once probed: returns what went wrong.
    check: Callable[[Matrix], list[str]] | None = None
    # (src, dst, port, proto) -> the policies `explain` must name: {"allowed_by": {"Kind
    # ns/name", ...}} and/or {"denied_by": "Kind ns/name" or None}.
    provenance: dict[tuple, dict] = field(default_factory=dict)


@dataclass
class Case:
    name: str
    steps: list[Step]
    nodes: bool = False   # probe from node1 and node2 as well
    icmp: bool = False    # ICMP echo pod to pod as well
    # (reason, direction) drop counters the case's probes must raise; with `drops` or
    # `audit` set (or metrics=True) the policy drop counters are checked against the probes.
    drops: tuple[tuple[int, str], ...] = ()
    audit: bool = False   # would-be drops are forwarded and counted as audit
    metrics: bool = False
    cleanup: Callable[[Matrix], None] | None = None

    @property
    def checks_drops(self) -> bool:
        return self.metrics or self.audit or bool(self.drops)


def case(name: str, policies: list[dict], expect: Expect, provenance: dict | None = None, **kw) -> Case:
    return Case(name, [Step(expect, apply=policies, provenance=provenance or {})], **kw)


def ingress_np(name: str, ns: str, pod_selector: dict | None, *rules: dict) -> dict:
    return netpol(name, ns, pod_selector, ingress=list(rules), types=["Ingress"])


ALL_NS = {"namespaceSelector": {}}
TCP80 = [{"ports": [{"port": "80", "protocol": "TCP"}]}]


def relabel_pod(pod: str, **extra: str) -> Callable[[Matrix], None]:
    def run(m: Matrix) -> None:
        ip = m.pod_ip[pod]
        m.apply(manifest([pod_doc(pod, extra)]), wait=False)
        m.refresh()
        assert m.pod_ip[pod] == ip, f"{pod}: a label change restarted the pod (IP {ip} -> {m.pod_ip[pod]})"
    return run


def relabel_ns(ns: str, **extra: str) -> Callable[[Matrix], None]:
    return lambda m: m.apply(manifest([namespace_doc(ns, extra)]), wait=False)


def set_config(**kv: str) -> Callable[[Matrix], None]:
    def run(m: Matrix) -> None:
        for k, v in kv.items():
            m.config(k.replace("_", "-"), v)
    return run


def stored_ports(m: Matrix, ns: str, name: str, want: list[dict]) -> list[str]:
    got = m.cli("get", "netpol", name, "-n", ns, "-o", "json").json()["spec"]["ingress"][0]["ports"]
    return [] if got == want else [f"stored NetworkPolicy {ns}/{name} ports {got}, applied {want}"]


def endpoint_audit(pod: str, value: str) -> Callable[[Matrix], None]:
    def run(m: Matrix) -> None:
        ep, node = m.endpoint_id(pod)
        m.cli("endpoint", "config", str(ep), f"PolicyAuditMode={value}", "--node", node)
    return run


def ipblock_pods(m: Matrix) -> None:
    """Fills the ipBlock case's policy with live pod IPs (known only once the lab runs)."""
    pol = CASES_BY_NAME["np-ipblock-pod-cidr-except"].steps[0].apply[0]
    pol["spec"]["ingress"][0]["from"][0]["ipBlock"]["except"] = [f"{m.pod_ip['y/a']}/32"]


def ipblock_expect() -> Expect:
    e = Expect().deny(to="x/*")
    if IPBLOCK_SELECTS_PODS:
        e.allow(frm="*/*", to="x/*").deny(frm="y/a", to="x/*")
    return e


CASES = [
    case("default-allow", [], Expect(), metrics=True, icmp=True),

    case("np-deny-all-ingress-x",
         [ingress_np("deny-all", "x", {})],
         Expect().deny(to="x/*"), drops=((DROP_POLICY, "INGRESS"),), icmp=True),

    case("np-allow-same-namespace",
         [ingress_np("same-ns", "x", {}, {"from": [{"podSelector": {}}]})],
         Expect().deny(to="x/*").allow(frm="x/*", to="x/*")),

    case("np-pod-and-namespace-selector-and",
         [ingress_np("and", "x", labels(pod="a"),
                     {"from": [{"namespaceSelector": labels(ns="y"), "podSelector": labels(pod="b")}]})],
         Expect().deny(to="x/a").allow(frm="y/b", to="x/a")),

    case("np-several-peers-or",
         [ingress_np("or", "x", labels(pod="a"),
                     {"from": [{"namespaceSelector": labels(ns="y")}, {"podSelector": labels(pod="c")}]})],
         Expect().deny(to="x/a").allow(frm=("y/*", "x/c"), to="x/a")),

    case("np-match-expressions-in",
         [ingress_np("in", "x", {},
                     {"from": [{"namespaceSelector": {"matchExpressions": [expr("ns", "In", "y")]},
                                "podSelector": {"matchExpressions": [expr("pod", "In", "a", "b")]}}]})],
         Expect().deny(to="x/*").allow(frm=("y/a", "y/b"), to="x/*")),

    # NotIn also matches a namespace without the key (x has no team label).
    case("np-match-expressions-notin",
         [ingress_np("notin", "x", {},
                     {"from": [{"namespaceSelector": {"matchExpressions": [expr("team", "NotIn", "red")]}}]})],
         Expect().deny(to="x/*").allow(frm=("x/*", "y/*"), to="x/*")),

    case("np-match-expressions-exists",
         [ingress_np("exists", "y", labels(pod="a"),
                     {"from": [{"namespaceSelector": {"matchExpressions": [expr("team", "Exists")]}}]})],
         Expect().deny(to="y/a").allow(frm=("y/*", "z/*"), to="y/a")),

    case("np-match-expressions-doesnotexist",
         [ingress_np("dne", "z", {},
                     {"from": [{**ALL_NS, "podSelector": {"matchExpressions": [expr("tier", "DoesNotExist")]}}]})],
         Expect().deny(to="z/*").allow(frm="*/c", to="z/*")),

    case("np-ipblock-pod-cidr-except",
         [ingress_np("ipblock", "x", {},
                     {"from": [{"ipBlock": {"cidr": "10.244.0.0/16", "except": []}}]})],
         ipblock_expect()),

    Case("np-ipblock-egress-world-except", steps=[
        Step(Expect().deny(frm="x/*").allow(frm="x/*", to=WORLD),
             apply=[netpol("to-world", "x", {}, types=["Egress"], egress=[
                 {"to": [{"ipBlock": {"cidr": "198.51.100.0/24", "except": ["198.51.100.128/25"]}}]}])],
             title="except misses the world host"),
        Step(Expect().deny(frm="x/*"),
             apply=[netpol("to-world", "x", {}, types=["Egress"], egress=[
                 {"to": [{"ipBlock": {"cidr": "198.51.100.0/24", "except": ["198.51.100.96/27"]}}]}])],
             title="except covers the world host"),
    ]),

    Case("np-ipblock-ingress-world-except", steps=[
        Step(Expect().deny(to="x/*").allow(frm=WORLD, to="x/*"),
             apply=[ingress_np("from-world", "x", {}, {"from": [{"ipBlock": {
                 "cidr": "198.51.100.0/24", "except": ["198.51.100.128/25"]}}]})],
             title="except misses the world host"),
        Step(Expect().deny(to="x/*"),
             apply=[ingress_np("from-world", "x", {}, {"from": [{"ipBlock": {
                 "cidr": "198.51.100.0/24", "except": ["198.51.100.64/26"]}}]})],
             title="except covers the world host"),
    ]),

    case("np-port-number",
         [ingress_np("port-80", "x", {}, {"ports": [{"port": 80, "protocol": "TCP"}]})],
         Expect().deny(to="x/*").allow(to="x/*", ports=80, protos="TCP"), icmp=True),

    case("np-port-name",
         [ingress_np("named", "x", {},
                     {"from": [{"namespaceSelector": labels(ns="y")}],
                      "ports": [{"port": "serve-81-udp", "protocol": "UDP"}, {"port": "serve-80-tcp"}]})],
         Expect().deny(to="x/*").allow(frm="y/*", to="x/*", ports=81, protos="UDP")
                 .allow(frm="y/*", to="x/*", ports=80, protos="TCP")),

    case("np-end-port-range",
         [ingress_np("range", "x", {},
                     {"ports": [{"port": 81, "endPort": 1000, "protocol": "TCP"},
                                {"port": 1, "endPort": 80, "protocol": "UDP"}]})],
         Expect().deny(to="x/*").allow(to="x/*", ports=81, protos="TCP")
                 .allow(to="x/*", ports=80, protos="UDP")),

    case("np-udp-only",
         [ingress_np("udp", "x", {}, {"ports": [{"protocol": "UDP"}]})],
         Expect().deny(to="x/*").allow(to="x/*", protos="UDP")),

    # This kernel has no SCTP: the policy is accepted and enforced, and it opens neither
    # TCP nor UDP on the same port.
    Case("np-sctp-opens-no-tcp", steps=[
        Step(Expect().deny(to="x/*"), check=lambda m: stored_ports(m, "x", "sctp", [{"port": 80, "protocol": "SCTP"}]),
             apply=[ingress_np("sctp", "x", {}, {"ports": [{"port": 80, "protocol": "SCTP"}]})])]),

    # Egress only: the ingress section is ignored because policyTypes does not name it.
    case("np-egress-policy-type",
         [netpol("egress-y", "x", {}, types=["Egress"],
                 ingress=[{"from": [{"podSelector": labels(pod="nobody")}]}],
                 egress=[{"to": [{"namespaceSelector": labels(ns="y")}]}])],
         Expect().deny(frm="x/*").allow(frm="x/*", to="y/*"), drops=((DROP_POLICY, "EGRESS"),)),

    case("np-empty-rules-allow-all",
         [netpol("empty", "x", {}, types=["Ingress", "Egress"], ingress=[{}], egress=[{}])],
         Expect()),

    Case("np-policies-add-up", steps=[Step(
        Expect().deny(to="x/a").allow(frm=("y/*", "x/b"), to="x/a"),
        apply=[ingress_np("from-y", "x", labels(pod="a"), {"from": [{"namespaceSelector": labels(ns="y")}]}),
               ingress_np("from-b", "x", labels(pod="a"), {"from": [{"podSelector": labels(pod="b")}]})],
        provenance={("y/a", "x/a", 80, "TCP"): {"allowed_by": {"NetworkPolicy x/from-y"}, "denied_by": None},
                    ("x/b", "x/a", 81, "UDP"): {"allowed_by": {"NetworkPolicy x/from-b"}, "denied_by": None},
                    ("z/a", "x/a", 80, "TCP"): {"allowed_by": set(), "denied_by": None}})]),

    Case("np-update-in-place", steps=[
        Step(Expect().deny(to="x/*").allow(frm="y/*", to="x/*"),
             apply=[ingress_np("moving", "x", {}, {"from": [{"namespaceSelector": labels(ns="y")}]})]),
        Step(Expect().deny(to="x/*").allow(frm="z/*", to="x/*", ports=81),
             apply=[ingress_np("moving", "x", {}, {"from": [{"namespaceSelector": labels(ns="z")}],
                                                   "ports": [{"port": 81}, {"port": 81, "protocol": "UDP"}]})],
             title="same policy, other namespace and port"),
    ]),

    Case("pod-label-change", steps=[
        Step(Expect().deny(to="x/*"),
             apply=[ingress_np("clients", "x", {}, {"from": [{**ALL_NS, "podSelector": labels(role="client")}]})]),
        Step(Expect().deny(to="x/*").allow(frm="y/b", to="x/*"),
             before=relabel_pod("y/b", role="client"), settle=10, title="y/b gets role=client"),
        Step(Expect().deny(to="x/*"),
             before=relabel_pod("y/b"), settle=10, title="y/b loses role=client"),
    ], cleanup=relabel_pod("y/b")),

    Case("namespace-label-change", steps=[
        Step(Expect().deny(to="x/*"),
             apply=[ingress_np("green", "x", {}, {"from": [{"namespaceSelector": labels(team="green")}]})]),
        Step(Expect().deny(to="x/*").allow(frm="z/*", to="x/*"),
             before=relabel_ns("z", team="green"), settle=10, title="z: team red -> green"),
    ], cleanup=relabel_ns("z")),

    case("cnp-endpoint-selector-from-endpoints",
         [cnp("from-eps", "x", {"endpointSelector": labels(pod="a"), "ingress": [{"fromEndpoints": [
             labels(pod="b"),
             {"matchLabels": {"k8s:io.kubernetes.pod.namespace": "z", "pod": "c"}}]}]})],
         Expect().deny(to="x/a").allow(frm=("x/b", "z/c"), to="x/a")),

    case("cnp-to-ports-protocol-any-and-end-port",
         [cnp("any-81", "x", {"endpointSelector": {}, "ingress": [
             {"toPorts": [{"ports": [{"port": "81", "protocol": "ANY"},
                                     {"port": "70", "endPort": 80, "protocol": "UDP"}]}]}]})],
         Expect().deny(to="x/*").allow(to="x/*", ports=81).allow(to="x/*", ports=80, protos="UDP")),

    case("cnp-icmps", icmp=True,
         policies=[cnp("echo", "x", {"endpointSelector": {}, "ingress": [
             {"icmps": [{"fields": [{"type": 8, "family": "IPv4"}]}]},
             {"fromEndpoints": [labels(pod="a")], "toPorts": TCP80}]})],
         expect=Expect().deny(to="x/*").allow(to="x/*", protos="ICMP")
                        .allow(frm="x/a", to="x/*", ports=80, protos="TCP")),

    # Deny wins over allows from the same and from other policies.
    case("cnp-ingress-deny-overrides-allow",
         [cnp("deny-y-80", "x", {"endpointSelector": {},
                                 "ingress": [{"fromEntities": ["all"]}],
                                 "ingressDeny": [{"fromEndpoints": [{"matchLabels": {
                                     "k8s:io.kubernetes.pod.namespace": "y"}}], "toPorts": TCP80}]}),
          ingress_np("allow-y", "x", {}, {"from": [{"namespaceSelector": labels(ns="y")}]})],
         Expect().deny(frm="y/*", to="x/*", ports=80, protos="TCP"),
         drops=((DROP_POLICY_DENY, "INGRESS"),),
         provenance={("y/a", "x/b", 80, "TCP"): {"denied_by": "CiliumNetworkPolicy x/deny-y-80"},
                     ("y/a", "x/b", 81, "TCP"): {"denied_by": None, "allowed_by": {
                         "CiliumNetworkPolicy x/deny-y-80", "NetworkPolicy x/allow-y"}}}),

    case("ccnp-clusterwide",
         [ccnp("b-to-a", {"endpointSelector": labels(pod="a"),
                          "ingress": [{"fromEndpoints": [labels(pod="b")]}]})],
         Expect().deny(to="*/a").allow(frm="*/b", to="*/a")),

    case("cnp-entities-cluster", nodes=True,
         policies=[cnp("cluster", "x", {"endpointSelector": {},
                                        "ingress": [{"fromEntities": ["cluster"]}],
                                        "egress": [{"toEntities": ["cluster"]}]})],
         expect=Expect().deny(frm="x/*", to=WORLD).deny(frm=WORLD, to="x/*")),

    # The local node is host; the other node arrives through the tunnel as remote-node.
    case("cnp-entities-host", nodes=True, drops=((DROP_POLICY, "INGRESS"),),
         policies=[cnp("host", "x", {"endpointSelector": {}, "ingress": [{"fromEntities": ["host"]}]})],
         expect=Expect().deny(to="x/*").allow(frm="node1", to=on("node1", "x/*"))
                        .allow(frm="node2", to=on("node2", "x/*"))),

    case("cnp-entities-remote-node", nodes=True,
         policies=[cnp("remote", "x", {"endpointSelector": {}, "ingress": [{"fromEntities": ["remote-node"]}]})],
         expect=Expect().deny(to="x/*").allow(frm=NODES, to="x/*")),

    # Entities nothing in the lab carries (no health endpoint, init or unmanaged pods):
    # accepted, and they admit nobody.
    case("cnp-entities-without-traffic", nodes=True,
         policies=[cnp("nobody", "x", {"endpointSelector": {}, "ingress": [
             {"fromEntities": ["health", "init", "unmanaged", "kube-apiserver", "ingress"]}]})],
         expect=Expect().deny(to="x/*").allow(frm="node1", to=on("node1", "x/*"))
                        .allow(frm="node2", to=on("node2", "x/*"))),

    case("cnp-from-entities-world",
         policies=[cnp("from-world", "x", {"endpointSelector": {}, "ingress": [{"fromEntities": ["world"]}]})],
         expect=Expect().deny(to="x/*").allow(frm=WORLD, to="x/*")),

    Case("cnp-from-cidr-and-cidrset-except", steps=[
        Step(Expect().deny(to="x/*").allow(frm=WORLD, to="x/*", ports=81),
             apply=[cnp("from-cidr", "x", {"endpointSelector": {}, "ingress": [
                 {"fromCIDR": [f"{WORLD_IP}/32"], "toPorts": [{"ports": [{"port": "81", "protocol": "ANY"}]}]}]})],
             title="fromCIDR with toPorts"),
        Step(Expect().deny(to="x/*"),
             apply=[cnp("from-cidr", "x", {"endpointSelector": {}, "ingress": [
                 {"fromCIDRSet": [{"cidr": "198.51.100.0/24", "except": [f"{WORLD_IP}/32"]}]}]})],
             title="fromCIDRSet whose except is the world host"),
    ]),

    case("cnp-egress-deny-overrides-allow", drops=((DROP_POLICY_DENY, "EGRESS"),),
         policies=[cnp("no-z", "x", {"endpointSelector": {},
                                     "egress": [{"toEntities": ["all"]}],
                                     "egressDeny": [{"toEndpoints": [{"matchLabels": {
                                         "k8s:io.kubernetes.pod.namespace": "z"}}],
                                         "toPorts": [{"ports": [{"port": "80", "endPort": 81,
                                                                 "protocol": "UDP"}]}]}]})],
         expect=Expect().deny(frm="x/*", to="z/*", protos="UDP"),
         provenance={("x/c", "z/b", 81, "UDP"): {"denied_by": "CiliumNetworkPolicy x/no-z"},
                     ("x/c", "z/b", 81, "TCP"): {"denied_by": None, "allowed_by": {"CiliumNetworkPolicy x/no-z"}}}),

    case("cnp-entities-world", drops=((DROP_POLICY, "EGRESS"),),
         policies=[cnp("world", "x", {"endpointSelector": {}, "egress": [{"toEntities": ["world"]}]})],
         expect=Expect().deny(frm="x/*").allow(frm="x/*", to=WORLD)),

    Case("cnp-to-cidr-and-cidrset-except", steps=[
        Step(Expect().deny(frm="x/*").allow(frm="x/*", to=WORLD),
             apply=[cnp("cidr", "x", {"endpointSelector": {}, "egress": [{"toCIDR": [f"{WORLD_IP}/32"]}]})]),
        Step(Expect().deny(frm="x/*"),
             apply=[cnp("cidr", "x", {"endpointSelector": {}, "egress": [
                 {"toCIDRSet": [{"cidr": "198.51.100.0/24", "except": [f"{WORLD_IP}/32"]}]}]})],
             title="CIDRSet whose except is the world host"),
        Step(Expect().deny(frm="x/*").allow(frm="x/*", to=WORLD),
             apply=[cnp("cidr", "x", {"endpointSelector": {}, "egress": [
                 {"toCIDRSet": [{"cidr": "198.51.100.0/24", "except": ["198.51.100.0/26"]}]}]})],
             title="CIDRSet whose except misses the world host"),
    ]),

    Case("cnp-enable-default-deny-false", steps=[
        Step(Expect(),
             apply=[cnp("no-dd", "x", {"endpointSelector": {}, "enableDefaultDeny": {"ingress": False},
                                       "ingress": [{"fromEndpoints": [labels(pod="a")]}]})],
             title="an allow that does not isolate"),
        Step(Expect().deny(to="x/*").allow(frm="x/a", to="x/*"),
             apply=[ingress_np("deny-all", "x", {})],
             title="with a deny-all NetworkPolicy the allow adds up"),
    ]),

    Case("audit-mode", audit=True, steps=[
        Step(Expect(), audited=deny_all().allow(to="x/*").allow(frm="y/*"),
             before=set_config(policy_audit_mode="true"),
             apply=[ingress_np("deny-all", "x", {}),
                    netpol("no-egress", "y", {}, types=["Egress"])]),
    ], cleanup=set_config(policy_audit_mode="false")),

    # Per endpoint: only x/a's drops turn into audits.
    Case("endpoint-audit-mode", audit=True, steps=[
        Step(Expect().deny(to=("x/b", "x/c")), audited=deny_all().allow(to="x/a"),
             before=endpoint_audit("x/a", "Enabled"),
             apply=[ingress_np("deny-all", "x", {})]),
    ], cleanup=endpoint_audit("x/a", "Disabled")),

    # Everything needs an allow, in both directions; the node still reaches its own pods
    # (Cilium's allow-localhost) and, not being an endpoint, the world.
    Case("enforcement-always", nodes=True, steps=[
        Step(deny_all().allow(frm="node1", to=on("node1")).allow(frm="node2", to=on("node2"))
                       .allow(frm=NODES, to=WORLD),
             before=set_config(enable_policy="always")),
        Step(deny_all().allow(frm="node1", to=on("node1")).allow(frm="node2", to=on("node2"))
                       .allow(frm=NODES, to=WORLD).allow(frm="x/*", to="x/*"),
             apply=[cnp("x-inside", "x", {"endpointSelector": {},
                                          "ingress": [{"fromEndpoints": [{}]}],
                                          "egress": [{"toEndpoints": [{}]}]})],
             title="x may talk inside x"),
    ], cleanup=set_config(enable_policy="default")),
]
CASES_BY_NAME = {c.name: c for c in CASES}
CASES_BY_NAME["np-ipblock-pod-cidr-except"].steps[0].before = ipblock_pods


# ---- the lab --------------------------------------------------------------------------

@pytest.fixture(scope="module")
def matrix(lab_factory):
    # Developing cases: CILIA_POLICY_MATRIX_LAB=<name> reuses a running 2-node lab that
    # already holds the model (it is left running).
    reuse = os.environ.get("CILIA_POLICY_MATRIX_LAB")
    t0 = time.monotonic()
    if reuse:
        lab = Lab(reuse)
    else:
        lab = lab_factory(nodes=2, routing="tunnel", prefix="pm", store="etcd")
    lab.apply(model_manifest())
    lab.cilia("wait", "--for=condition=Ready", "pods", "--all", "-A", "--timeout", "120s", timeout=150)
    world = subprocess.Popen(
        ["nsenter", f"--net=/run/netns/{lab.name}-world", "--", PYTHON, "-m", "cilia.lab.workloads",
         "echo", "--ports", "80/TCP,80/UDP,81/TCP,81/UDP", "--name", "world", "--namespace", "world"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        m = Matrix(lab)
        # Services and the world listener are ready once the no-policy matrix is all green.
        probes = probes_for([*PODS, WORLD], [*PODS, WORLD])
        wait_until(lambda: all(v == "ok" for v in m.probe(probes).values()), 60,
                   "the model to be fully reachable without policy")
        print(f"\nmodel ready in {time.monotonic() - t0:.1f}s (lab {lab.name})")
        yield m
    finally:
        os.killpg(world.pid, signal.SIGTERM)
        world.wait(10)


def run_step(m: Matrix, c: Case, step: Step) -> list[str]:
    """Probe, compare, explain, count drops; returns what went wrong (empty: all good)."""
    sources = [*PODS, *(NODES if c.nodes else ()), WORLD]
    targets = [*PODS, WORLD]
    probes = probes_for(sources, targets) + (icmp_probes(PODS, PODS) if c.icmp else [])
    expected = {p: step.expect(p.src, p.dst, p.port, p.proto, p.via) for p in probes}
    # A pod's own IP never leaves the pod, so the datapath has no say there.
    pairs = [p for p in probes if p.via in ("pod", "nodeport") and p.src != p.dst]
    before = m.metrics() if c.checks_drops else None
    # explain runs beside the probes, except after label changes, which it must see.
    explained = m.pool.submit(m.explain, pairs) if not step.settle else None
    t0 = time.monotonic()
    details = m.probe(probes)
    observed = {p: v == "ok" for p, v in details.items()}
    stats = {"probes": len(probes), "first": time.monotonic() - t0, "retried": 0, "flipped": 0}
    # A lost datagram or a SYN retransmit can turn one reachable probe into a miss; a
    # drop by policy is deterministic. So probes that missed are probed again (fresh
    # source ports, longer timeout); label changes get until `settle` to take effect.
    deadline = time.monotonic() + step.settle
    while True:
        settling = time.monotonic() < deadline
        retry = [p for p in probes if expected[p] != observed[p] and (settling or not observed[p])]
        if not retry:
            break
        more = m.probe(retry, timeout=2.0)
        stats["retried"] += len(retry)
        stats["flipped"] += sum(1 for p in retry if (more[p] == "ok") != observed[p])
        details.update(more)
        observed.update({p: v == "ok" for p, v in more.items()})
        if not settling:
            break
        if any(expected[p] != observed[p] for p in retry):
            time.sleep(0.5)
    stats["probe_s"] = time.monotonic() - t0
    m.stats = stats
    problems = []
    report = mismatch_report(expected, observed, details)
    if report:
        involved = {q for p in probes if expected[p] != observed[p] for q in (p.src, p.dst)}
        eps = m.endpoints()
        agent = {k: v for k, v in m.cli("policy", "get", "-o", "json").json().items() if k != "items"}
        problems.append(f"reachability: {report}\nendpoints involved:\n  "
                        + "\n  ".join(eps[q] for q in sorted(involved) if q in eps)
                        + f"\npolicy get (node1): {agent}")
    answers = explained.result() if explained else m.explain(pairs)
    problems += explain_problems(step, pairs, observed, answers)
    if before is not None:
        problems += drop_problems(c, before, m.metrics(), details)
    return problems


def explain_problems(step: Step, pairs: list[Probe], observed: dict[Probe, bool],
                     answers: dict[Probe, dict]) -> list[str]:
    wrong = []
    for p in pairs:
        verdict = answers[p].get("verdict")
        audited = step.audited is not None and step.audited(p.src, p.dst, p.port, p.proto, p.via)
        if (verdict in REACHABLE) != observed[p] or (verdict == "AUDIT") != audited:
            wrong.append(f"  {p.key}: datapath {'reached' if observed[p] else 'dropped'}, explain "
                         f"{verdict}{' (audit expected)' if audited else ''}: {answers[p].get('reason')}")
    by_query = {(p.src, p.dst, p.port, p.proto): answers[p] for p in pairs if p.via == "pod"}
    for q, want in step.provenance.items():
        ans = by_query[q]
        if "allowed_by" in want:
            got = {_policy_name(a) for a in ans.get("allowed_by") or []}
            if got != want["allowed_by"]:
                wrong.append(f"  {q}: explain allowed_by {sorted(got)}, want {sorted(want['allowed_by'])}")
        if "denied_by" in want:
            got = _policy_name(ans["denied_by"]) if ans.get("denied_by") else None
            if got != want["denied_by"]:
                wrong.append(f"  {q}: explain denied_by {got}, want {want['denied_by']}")
    if not wrong:
        return []
    return [f"policy explain disagrees with the datapath on {len(wrong)} of {len(pairs)} pairs:\n"
            + "\n".join(wrong[:40])]


def _policy_name(ref: dict) -> str:
    return f"{ref['kind']} {ref['namespace'] + '/' if ref.get('namespace') else ''}{ref['name']}"


def drop_problems(c: Case, before: dict, after: dict, details: dict[Probe, str]) -> list[str]:
    delta = {k: v - before.get(k, 0) for k, v in after.items() if v != before.get(k, 0)}
    policy = (DROP_POLICY, DROP_POLICY_DENY)
    dropped = sum(v for (r, _, a), v in delta.items() if r in policy and not a)
    audited = sum(v for (r, _, a), v in delta.items() if r in policy and a)
    timed_out = [p for p, d in details.items() if d == "timeout" and p.src != p.dst]
    shown = {f"{r}/{d}{'/audit' if a else ''}": v for (r, d, a), v in sorted(delta.items()) if r}
    out = []
    if c.audit and not audited:
        out.append(f"audit mode, yet no audited packet was counted: {shown}")
    if timed_out and not dropped:
        out.append(f"{len(timed_out)} probes timed out but no policy drop was counted: {shown}")
    elif not timed_out and dropped:
        out.append(f"nothing timed out, yet {dropped} policy drops were counted: {shown}")
    for reason, direction in c.drops:
        if not delta.get((reason, direction, False)):
            out.append(f"no drop counted with reason {reason} direction {direction}: {shown}")
    return out


@pytest.mark.parametrize("c", CASES, ids=[c.name for c in CASES])
def test_policy_case(matrix: Matrix, c: Case):
    applied: dict[tuple, dict] = {}
    problems = []
    try:
        for step in c.steps:
            t0 = time.monotonic()
            if step.before:
                step.before(matrix)
            if step.apply:
                matrix.apply(manifest(step.apply))
                applied.update({_key(p): p for p in step.apply})
            t1 = time.monotonic()
            found = run_step(matrix, c, step)
            if step.check:
                found += step.check(matrix)
            problems += [f"[{c.name}{' / ' + step.title if step.title else ''}] {p}" for p in found]
            st = matrix.stats
            print(f"\n{c.name} {step.title}: apply {t1 - t0:.1f}s, {st['probes']} probes "
                  f"{st['probe_s']:.1f}s (first round {st['first']:.1f}s, {st['retried']} retried, "
                  f"{st['flipped']} flipped), total {time.monotonic() - t0:.1f}s")
    finally:
        if applied:
            matrix.delete(manifest(applied.values()))
        if c.cleanup:
            c.cleanup(matrix)
            matrix.refresh()
    assert not problems, "\n\n".join(problems)


def _key(obj: dict) -> tuple:
    md = obj["metadata"]
    return (obj["kind"], md.get("namespace"), md["name"])


@pytest.mark.parametrize("rule", [
    {"toPorts": [{"ports": [{"port": "80", "protocol": "TCP"}], "rules": {"http": [{"method": "GET"}]}}]},
    {"toFQDNs": [{"matchName": "example.com"}]},
], ids=["http", "fqdn"])
def test_l7_rules_are_refused_and_nothing_is_applied(matrix: Matrix, rule: dict):
    good = ingress_np("l7-good", "x", {}, {"from": [{"podSelector": {}}]})
    bad = cnp("l7", "x", {"endpointSelector": {}, "egress": [rule]})
    r = matrix.cli("apply", "-f", "-", input=manifest([good, bad]), check=False)
    assert r.rc != 0 and "not supported yet" in r.err and len(r.err.strip().splitlines()) == 1, r
    assert "spec.egress[0]" in r.err, r.err
    for kind in ("netpol", "cnp"):
        assert matrix.cli("get", kind, "-n", "x", "-o", "json").json()["items"] == []

"""desired_entries(): which frontends a node programs, with which backends and flags."""
from __future__ import annotations

import copy

import pytest

from cilia.loadbalancer.desired import desired_entries, node_addresses, service_entries
from cilia.loadbalancer.model import Backend, Frontend, LBConfig

NODE_IPS = ["172.29.0.11", "10.244.1.1"]   # node IP, router IP


def service(name="web", stype="ClusterIP", cip="10.96.0.10", ports=None, **spec):
    s = {"apiVersion": "v1", "kind": "Service",
         "metadata": {"name": name, "namespace": "default", "uid": f"uid-{name}"},
         "spec": {"type": stype, "clusterIP": cip,
                  "ports": ports or [{"name": "http", "port": 80, "protocol": "TCP", "nodePort": 30080}],
                  **spec},
         "status": {"loadBalancer": {}}}
    if stype == "ClusterIP":
        for p in s["spec"]["ports"]:
            p.pop("nodePort", None)
    return s


def ep(ip, node, ready=True, serving=None, terminating=False):
    cond = {"ready": ready, "serving": ready if serving is None else serving, "terminating": terminating}
    return {"addresses": [ip], "conditions": cond, "nodeName": node}


def eslice(svc="web", endpoints=(), ports=(("http", 8080, "TCP"),), name=None):
    return {"apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice",
            "metadata": {"name": name or f"{svc}-x", "namespace": "default",
                         "labels": {"kubernetes.io/service-name": svc}},
            "addressType": "IPv4", "endpoints": list(endpoints),
            "ports": [{"name": n, "port": p, "protocol": pr} for n, p, pr in ports]}


SLICE = eslice(endpoints=[ep("10.244.1.5", "node1"), ep("10.244.2.5", "node2"),
                          ep("10.244.2.6", "node2", ready=False, serving=True, terminating=True),
                          ep("10.244.2.7", "node2", ready=False, serving=False)])

B_LOCAL = Backend("10.244.1.5", 8080, 6, "active", "node1")
B_REMOTE = Backend("10.244.2.5", 8080, 6, "active", "node2")
B_TERM = Backend("10.244.2.6", 8080, 6, "terminating", "node2")


def entries(svc, slices=(SLICE,), cfg=LBConfig()):
    return desired_entries([svc], list(slices), "node1", NODE_IPS, cfg)


def summary(d):
    return {(str(fe), e.kind): (tuple(b.address for b in e.backends), e.local_only) for fe, e in d.items()}


def test_cluster_ip_backends_and_states():
    d = entries(service())
    assert list(d) == [Frontend("10.96.0.10", 80, 6)]
    e = d[Frontend("10.96.0.10", 80, 6)]
    # ready -> active, terminating-but-serving -> terminating, neither -> left out
    assert e.backends == (B_LOCAL, B_REMOTE, B_TERM)
    assert e.kind == "ClusterIP" and e.algorithm == "random" and e.affinity_timeout == 0
    assert (e.service.namespace, e.service.name, e.service.port_name) == ("default", "web", "http")


def test_internal_traffic_policy_local_keeps_local_backends():
    d = entries(service(internalTrafficPolicy="Local"))
    [e] = d.values()
    assert e.backends == (B_LOCAL,) and e.local_only


def test_node_port_on_node_and_router_ip():
    d = entries(service(stype="NodePort", externalTrafficPolicy="Cluster"))
    assert summary(d) == {
        ("10.96.0.10:80/TCP", "ClusterIP"): (("10.244.1.5", "10.244.2.5", "10.244.2.6"), False),
        ("172.29.0.11:30080/TCP", "NodePort"): (("10.244.1.5", "10.244.2.5", "10.244.2.6"), False),
        ("10.244.1.1:30080/TCP", "NodePort"): (("10.244.1.5", "10.244.2.5", "10.244.2.6"), False),
    }
    assert all(fe.scope == "external" for fe in d if fe.port == 30080)


def test_external_traffic_policy_local_has_local_external_and_full_internal_twin():
    d = entries(service(stype="NodePort", externalTrafficPolicy="Local"))
    ext = d[Frontend("172.29.0.11", 30080, 6, "external")]
    twin = d[Frontend("172.29.0.11", 30080, 6, "internal")]
    assert ext.backends == (B_LOCAL,) and ext.local_only and ext.ext_traffic_policy == "Local"
    assert twin.backends == (B_LOCAL, B_REMOTE, B_TERM) and not twin.local_only
    # ClusterIP is not affected by ETP.
    assert len(d[Frontend("10.96.0.10", 80, 6)].backends) == 3
    # On a node without local backends the external frontend exists and has none (drop).
    other = desired_entries([service(stype="NodePort", externalTrafficPolicy="Local")],
                            [eslice(endpoints=[ep("10.244.2.5", "node2")])], "node1", NODE_IPS)
    assert other[Frontend("172.29.0.11", 30080, 6)].backends == ()


def test_load_balancer_ingress_and_external_ips():
    svc = service(stype="LoadBalancer", externalIPs=["198.51.100.20"])
    svc["status"]["loadBalancer"] = {"ingress": [{"ip": "172.30.0.1", "ipMode": "VIP"}]}
    d = entries(svc)
    kinds = {(str(fe), e.kind) for fe, e in d.items()}
    assert kinds == {("10.96.0.10:80/TCP", "ClusterIP"), ("172.29.0.11:30080/TCP", "NodePort"),
                     ("10.244.1.1:30080/TCP", "NodePort"), ("172.30.0.1:80/TCP", "LoadBalancer"),
                     ("198.51.100.20:80/TCP", "ExternalIPs")}
    # ExternalIPs on a ClusterIP service too.
    d = entries(service(externalIPs=["198.51.100.21"]))
    assert {e.kind for e in d.values()} == {"ClusterIP", "ExternalIPs"}


def test_no_node_ports_when_disabled_or_not_allocated():
    svc = service(stype="LoadBalancer")
    del svc["spec"]["ports"][0]["nodePort"]
    assert {e.kind for e in entries(svc).values()} == {"ClusterIP"}
    assert {e.kind for e in entries(service(stype="NodePort"), cfg=LBConfig(nodeport=False)).values()} == {"ClusterIP"}


def test_affinity_and_algorithm_annotation():
    svc = service(sessionAffinity="ClientIP", sessionAffinityConfig={"clientIP": {"timeoutSeconds": 60}})
    svc["metadata"]["annotations"] = {"service.cilium.io/lb-algorithm": "maglev"}
    [e] = entries(svc).values()
    assert e.affinity_timeout == 60 and e.algorithm == "maglev"
    [e] = entries(service(sessionAffinity="ClientIP")).values()
    assert e.affinity_timeout == 10800 and e.algorithm == "random"
    [e] = entries(service(), cfg=LBConfig(algorithm="maglev")).values()
    assert e.algorithm == "maglev"
    svc["metadata"]["annotations"]["service.cilium.io/lb-algorithm"] = "random"
    [e] = entries(svc, cfg=LBConfig(algorithm="maglev")).values()
    assert e.algorithm == "random"
    [e] = entries(svc, cfg=LBConfig(algorithm="maglev", algorithm_annotation=False)).values()
    assert e.algorithm == "maglev"


def test_ports_match_by_name_and_protocol_and_udp_numbers():
    svc = service(ports=[{"name": "dns", "port": 53, "protocol": "UDP"},
                         {"name": "dns-tcp", "port": 53, "protocol": "TCP"}])
    sl = eslice(endpoints=[ep("10.244.1.9", "node1")],
                ports=(("dns", 5353, "UDP"), ("dns-tcp", 5354, "TCP")))
    d = entries(svc, [sl])
    assert d[Frontend("10.96.0.10", 53, 17)].backends == (Backend("10.244.1.9", 5353, 17, "active", "node1"),)
    assert d[Frontend("10.96.0.10", 53, 6)].backends == (Backend("10.244.1.9", 5354, 6, "active", "node1"),)


def test_backends_from_several_slices_and_unset_conditions():
    a = eslice(endpoints=[ep("10.244.1.5", "node1")], name="web-a")
    b = eslice(endpoints=[{"addresses": ["10.244.3.5"], "conditions": {}}], name="web-b")
    # A slice of another service and one without the service-name label count for nothing.
    c = eslice(svc="other", endpoints=[ep("10.244.9.9", "node1")])
    d_ = copy.deepcopy(a)
    d_["metadata"]["labels"] = {}
    [e] = entries(service(), [a, b, c, d_]).values()
    assert [x.address for x in e.backends] == ["10.244.1.5", "10.244.3.5"]
    assert all(x.state == "active" for x in e.backends)


@pytest.mark.parametrize("svc", [
    service(cip="None"),
    {**service(), "status": {"conditions": [{"type": "cilia.io/AddressesAllocated", "status": "False"}]}},
])
def test_headless_and_conflicting_services_get_nothing(svc):
    assert entries(svc) == {}


def test_service_without_cluster_ip_yet_has_only_external_frontends():
    svc = service(stype="NodePort", cip="")
    assert {e.kind for e in entries(svc).values()} == {"NodePort"}


def test_two_services_claiming_one_frontend_first_by_name_wins():
    a, b = service("a", externalIPs=["198.51.100.9"], cip="10.96.0.1"), service("b", externalIPs=["198.51.100.9"], cip="10.96.0.2")
    slices = [eslice("a", [ep("10.244.1.1", "node1")]), eslice("b", [ep("10.244.1.2", "node1")])]
    for order in ([a, b], [b, a]):
        d = desired_entries(order, slices, "node1", NODE_IPS)
        assert d[Frontend("198.51.100.9", 80, 6)].service.name == "a"


def test_service_entries_is_pure_and_node_addresses_dedupes():
    svc = service(stype="NodePort")
    before = copy.deepcopy(svc)
    assert service_entries(svc, [SLICE], "node1", NODE_IPS) == service_entries(svc, [SLICE], "node1", NODE_IPS)
    assert svc == before
    assert node_addresses("172.29.0.11", None, "10.244.1.1", "172.29.0.11") == ["172.29.0.11", "10.244.1.1"]


def test_policies_decide_scopes():
    # ETP Cluster, ITP Local: all backends from outside, only local ones east-west.
    d = entries(service(stype="NodePort", externalTrafficPolicy="Cluster", internalTrafficPolicy="Local"))
    assert d[Frontend("172.29.0.11", 30080, 6)].backends == (B_LOCAL, B_REMOTE, B_TERM)
    twin = d[Frontend("172.29.0.11", 30080, 6, "internal")]
    assert twin.backends == (B_LOCAL,) and twin.local_only
    assert d[Frontend("10.96.0.10", 80, 6)].backends == (B_LOCAL,)
    # Both Local: one set, so one (external) entry per frontend.
    d = entries(service(stype="NodePort", externalTrafficPolicy="Local", internalTrafficPolicy="Local"))
    assert all(fe.scope == "external" for fe in d) and all(e.backends == (B_LOCAL,) for e in d.values())


def test_sctp_ports_are_not_programmed():
    svc = service(ports=[{"name": "s", "port": 9, "protocol": "SCTP"}, {"name": "http", "port": 80, "protocol": "TCP"}])
    assert list(entries(svc)) == [Frontend("10.96.0.10", 80, 6)]

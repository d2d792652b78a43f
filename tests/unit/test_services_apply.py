"""`cilia apply|delete` of Services and EndpointSlices against a real SQLite store."""
from __future__ import annotations

import json

import pytest

from cilia.cluster import ApplyError
from cilia.loadbalancer.ipam import CLUSTER_IPS, NODE_PORTS, claim_key
from cilia.objects import decode, encode
from tests.unit.test_cluster_apply import cl, objs  # noqa: F401  (fixture)

SVC = """
apiVersion: v1
kind: Service
metadata: {{name: {name}}}
spec:
  type: {type}
  {extra}
  selector: {{app: web}}
  ports: [{{name: http, port: 80, targetPort: 8080{nodeport}}}]
"""


def service(name="web", type="ClusterIP", extra="", nodeport=""):
    return SVC.format(name=name, type=type, extra=extra, nodeport=nodeport)


SLICE = """
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata: {name: ext-1, labels: {kubernetes.io/service-name: ext}}
addressType: IPv4
endpoints: [{addresses: [198.51.100.10], conditions: {ready: true}}]
ports: [{name: http, port: 80}]
"""


def test_create_unchanged_configured(cl, tmp_path):
    assert [str(c) for c in cl.apply(objs(tmp_path, service()))] == ["service/web created"]
    assert [str(c) for c in cl.apply(objs(tmp_path, service()))] == ["service/web unchanged"]
    got = cl.get("Service", "default", "web")
    assert got["status"] == {"loadBalancer": {}} and got["metadata"]["uid"]
    assert "clusterIP" not in got["spec"]   # the operator fills it
    assert [str(c) for c in cl.apply(objs(tmp_path, SLICE))] == ["endpointslice.discovery.k8s.io/ext-1 created"]
    assert [str(c) for c in cl.apply(objs(tmp_path, SLICE))] == ["endpointslice.discovery.k8s.io/ext-1 unchanged"]


def simulate_operator(cl, name, cip=None, node_port=None):
    """What the operator writes: allocated fields plus their claims."""
    o = cl.get("Service", "default", name)
    uid = o["metadata"]["uid"]
    if cip:
        o["spec"]["clusterIP"], o["spec"]["clusterIPs"] = cip, [cip]
        cl.store.put(claim_key(CLUSTER_IPS, cip), json.dumps({"namespace": "default", "name": name, "uid": uid}).encode())
    if node_port:
        o["spec"]["ports"][0]["nodePort"] = node_port
        cl.store.put(claim_key(NODE_PORTS, node_port), json.dumps({"namespace": "default", "name": name, "uid": uid}).encode())
    o["metadata"].pop("resourceVersion")
    cl.store.put(f"/cilia/k8s/services/default/{name}", encode(o))


def test_reapply_keeps_allocated_fields_and_cluster_ip_is_immutable(cl, tmp_path):
    cl.apply(objs(tmp_path, service(type="NodePort")))
    simulate_operator(cl, "web", "10.96.0.7", 30123)
    assert [str(c) for c in cl.apply(objs(tmp_path, service(type="NodePort")))] == ["service/web unchanged"]
    # Re-applying with the allocated value spelled out is fine too.
    assert [str(c) for c in cl.apply(objs(tmp_path, service(type="NodePort", extra="clusterIP: 10.96.0.7")))] == \
        ["service/web unchanged"]
    with pytest.raises(ApplyError, match=r'Service default/web: spec.clusterIP: Invalid value: "10.96.0.8": field is immutable'):
        cl.apply(objs(tmp_path, service(type="NodePort", extra="clusterIP: 10.96.0.8")))
    # Switching to ClusterIP drops the nodePort (the operator then frees its claim).
    assert [str(c) for c in cl.apply(objs(tmp_path, service()))] == ["service/web configured"]
    assert "nodePort" not in cl.get("Service", "default", "web")["spec"]["ports"][0]


@pytest.mark.parametrize("extra,nodeport,message", [
    ("clusterIP: 10.97.0.5", "", 'spec.clusterIP: Invalid value: "10.97.0.5": provided IP is not in the valid range. The range of valid IPs is 10.96.0.0/16'),
    ("clusterIP: 10.96.0.0", "", "provided IP is not in the valid range"),
    ("clusterIP: 10.96.0.7", "", 'spec.clusterIP: Invalid value: "10.96.0.7": provided IP is already allocated'),
    ("", ", nodePort: 30123", "spec.ports[0].nodePort: Invalid value: 30123: provided port is already allocated"),
])
def test_taken_or_invalid_requests_are_refused_up_front(cl, tmp_path, extra, nodeport, message):
    cl.apply(objs(tmp_path, service("owner", type="NodePort")))
    simulate_operator(cl, "owner", "10.96.0.7", 30123)
    rev = cl.store.revision()
    bad = service("other", type="NodePort", extra=extra, nodeport=nodeport)
    with pytest.raises(ApplyError) as e:
        cl.apply(objs(tmp_path, service("fine", type="NodePort")) + objs(tmp_path, bad))
    assert str(e.value).startswith("Service default/other: ") and message in str(e.value)
    assert cl.store.revision() == rev   # nothing half-applied


def test_two_services_in_one_apply_requesting_the_same_ip(cl, tmp_path):
    text = service("a", extra="clusterIP: 10.96.0.9") + "---\n" + service("b", extra="clusterIP: 10.96.0.9")
    with pytest.raises(ApplyError, match="Service default/b: .*already allocated"):
        cl.apply(objs(tmp_path, text))


def test_delete_service_slice_and_namespace(cl, tmp_path):
    cl.apply(objs(tmp_path, service() + "---\n" + SLICE))
    cl.delete("Service", "default", "web")
    assert cl.get("Service", "default", "web") is None
    with pytest.raises(ApplyError, match='services "web" not found'):
        cl.delete("Service", "default", "web")
    cl.delete("EndpointSlice", "default", "ext-1")
    with pytest.raises(ApplyError, match='endpointslices.discovery.k8s.io "ext-1" not found'):
        cl.delete("EndpointSlice", "default", "ext-1")
    cl.apply(objs(tmp_path, "apiVersion: v1\nkind: Namespace\nmetadata: {name: prod}\n"))
    cl.apply(objs(tmp_path, service().replace("metadata: {name: web}", "metadata: {name: web, namespace: prod}")))
    cl.delete("Namespace", None, "prod")
    assert cl.list("Service", "prod") == []


def test_operator_ranges_come_from_its_status(cl, tmp_path):
    cl.store.put("/cilia/operator/v1/status", encode({"serviceCIDR": "10.100.0.0/24", "lbPool": "172.30.0.0/24"}))
    with pytest.raises(ApplyError, match="The range of valid IPs is 10.100.0.0/24"):
        cl.apply(objs(tmp_path, service(extra="clusterIP: 10.96.0.5")))
    assert [str(c) for c in cl.apply(objs(tmp_path, service(extra="clusterIP: 10.100.0.5")))] == ["service/web created"]
    assert decode(cl.store.get("/cilia/k8s/services/default/web").value)["spec"]["clusterIP"] == "10.100.0.5"

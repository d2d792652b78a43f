"""Service and EndpointSlice manifests: defaults, one-line errors naming file/object/field,
and kubectl's `get svc` / `get endpointslices` columns."""
from __future__ import annotations

import copy
from datetime import datetime, timedelta, timezone

import pytest
import yaml

from cilia.k8s import ManifestError, load_manifests, print_table
from cilia.k8s.printers import dump, to_list

NOW = datetime(2024, 5, 1, 12, 0, 0, tzinfo=timezone.utc)

SERVICE = {
    "apiVersion": "v1", "kind": "Service",
    "metadata": {"name": "web"},
    "spec": {"selector": {"app": "web"},
             "ports": [{"name": "http", "port": 80, "targetPort": "http"},
                       {"name": "dns", "port": 53, "protocol": "UDP", "targetPort": 5353}]},
}

SLICE = {
    "apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice",
    "metadata": {"name": "ext-1", "labels": {"kubernetes.io/service-name": "ext"}},
    "addressType": "IPv4",
    "endpoints": [{"addresses": ["198.51.100.10"], "conditions": {"ready": True}, "nodeName": "node1"}],
    "ports": [{"name": "http", "port": 8080}],
}


def load(tmp_path, obj) -> dict:
    (tmp_path / "app.yaml").write_text(yaml.safe_dump(obj))
    [out] = load_manifests([str(tmp_path / "app.yaml")])
    return out


def error_of(tmp_path, obj) -> str:
    with pytest.raises(ManifestError) as exc:
        load(tmp_path, obj)
    msg = str(exc.value)
    assert "\n" not in msg
    return msg


def with_(base, path, value):
    obj = copy.deepcopy(base)
    keys = [int(k) if k.isdigit() else k for k in path.split(".")]
    cur = obj
    for k in keys[:-1]:
        cur = cur[k]
    if value is None:
        del cur[keys[-1]]
    else:
        cur[keys[-1]] = value
    return obj


def test_service_defaults(tmp_path):
    svc = load(tmp_path, SERVICE)
    spec = svc["spec"]
    assert spec["type"] == "ClusterIP" and spec["sessionAffinity"] == "None"
    assert spec["internalTrafficPolicy"] == "Cluster" and "externalTrafficPolicy" not in spec
    assert spec["ports"][0] == {"name": "http", "port": 80, "protocol": "TCP", "targetPort": "http"}
    assert spec["ports"][1]["targetPort"] == 5353
    assert "clusterIP" not in spec  # the operator allocates it
    assert svc["metadata"]["namespace"] == "default"


def test_service_defaults_for_node_port_and_affinity(tmp_path):
    obj = with_(SERVICE, "spec.type", "NodePort")
    obj = with_(obj, "spec.sessionAffinity", "ClientIP")
    obj = with_(obj, "spec.ports.0.targetPort", None)
    spec = load(tmp_path, obj)["spec"]
    assert spec["externalTrafficPolicy"] == "Cluster"
    assert spec["sessionAffinityConfig"] == {"clientIP": {"timeoutSeconds": 10800}}
    assert spec["ports"][0]["targetPort"] == 80


def test_headless_and_requested_addresses_are_kept(tmp_path):
    spec = load(tmp_path, with_(SERVICE, "spec.clusterIP", "None"))["spec"]
    assert spec["clusterIP"] == "None" and spec["clusterIPs"] == ["None"]
    obj = with_(with_(SERVICE, "spec.clusterIP", "10.96.0.50"), "spec.type", "LoadBalancer")
    obj["spec"]["ports"][0]["nodePort"] = 30080
    obj["metadata"]["annotations"] = {"service.cilium.io/lb-algorithm": "maglev"}
    svc = load(tmp_path, obj)
    assert svc["spec"]["clusterIPs"] == ["10.96.0.50"] and svc["spec"]["ports"][0]["nodePort"] == 30080
    assert svc["spec"]["allocateLoadBalancerNodePorts"] is True


@pytest.mark.parametrize("path,value,expected", [
    ("spec.ports.0.port", 0, "spec.ports[0].port: must be between 1 and 65535, got 0"),
    ("spec.ports.0.port", "80", 'spec.ports[0].port: must be an integer, got string "80"'),
    ("spec.ports.0.protocol", "ICMP", 'spec.ports[0].protocol: unsupported value "ICMP": supported values: "SCTP", "TCP", "UDP"'),
    ("spec.ports.1.name", "http", 'spec.ports[1].name: duplicate value "http"'),
    ("spec.ports.1.name", None, "spec.ports[1].name: field is required when a service has more than one port"),
    ("spec.ports.0.name", "Http", 'spec.ports[0].name: invalid value "Http": a lowercase RFC 1123 label'),
    ("spec.ports.0.targetPort", "my_port", 'spec.ports[0].targetPort: invalid value "my_port": must contain only alpha-numeric'),
    ("spec.ports.0.targetPort", "8080", 'spec.ports[0].targetPort: invalid value "8080": a port number must be an integer'),
    ("spec.ports.0.targetPort", 70000, "spec.ports[0].targetPort: must be between 1 and 65535, got 70000"),
    ("spec.ports.0.targetPort", "a-very-long-port-name", 'must be no more than 15 characters'),
    ("spec.ports.0.nodePort", 30080, "spec.ports[0].nodePort: may not be used when `type` is 'ClusterIP'"),
    ("spec.type", "ExternalName", 'spec.type: unsupported value "ExternalName"'),
    ("spec.type", "Foo", 'spec.type: unsupported value "Foo": supported values: "ClusterIP", "LoadBalancer", "NodePort"'),
    ("spec.clusterIP", "10.96.0.256", 'spec.clusterIP: invalid value "10.96.0.256": must be a valid IPv4 address'),
    ("spec.externalIPs", ["1.2.3"], 'spec.externalIPs[0]: invalid value "1.2.3"'),
    ("spec.externalIPs", ["1.2.3.4", "1.2.3.4"], 'spec.externalIPs: duplicate value "1.2.3.4"'),
    ("spec.sessionAffinity", "Cookie", 'spec.sessionAffinity: unsupported value "Cookie"'),
    ("spec.sessionAffinityConfig", {"clientIP": {"timeoutSeconds": 10}}, "spec.sessionAffinityConfig: must not be set when session affinity is None"),
    ("spec.internalTrafficPolicy", "Nearby", 'spec.internalTrafficPolicy: unsupported value "Nearby"'),
    ("spec.externalTrafficPolicy", "Local", "spec.externalTrafficPolicy: may only be set for externally-accessible services"),
    ("spec.loadBalancerIP", "172.30.0.9", "spec.loadBalancerIP: may only be used when `type` is 'LoadBalancer'"),
    ("spec.ports", [], "spec.ports: field is required"),
    ("spec.selector", {"app": "bad value"}, 'spec.selector[app]: invalid value "bad value"'),
    ("spec.bogus", 1, 'spec.bogus: unknown field "bogus"'),
    ("metadata.name", "9web", 'metadata.name: invalid value "9web": a DNS-1035 label'),
    ("spec.ipFamilies", ["IPv6"], 'spec.ipFamilies: unsupported value "IPv6"'),
])
def test_service_errors(tmp_path, monkeypatch, path, value, expected):
    monkeypatch.chdir(tmp_path)
    msg = error_of(tmp_path, with_(SERVICE, path, value))
    assert msg.startswith(f"error: {tmp_path}/app.yaml: Service default/") or msg.startswith("error: ")
    assert "Service default/" in msg
    assert expected in msg, msg


@pytest.mark.parametrize("mutate,expected", [
    (lambda o: (o["spec"].update(type="NodePort"), o["spec"]["ports"][0].update(nodePort=29999)),
     'spec.ports[0].nodePort: invalid value 29999: provided port is not in the valid range. The range of valid ports is 30000-32767'),
    (lambda o: (o["spec"].update(type="NodePort"), o["spec"]["ports"][0].update(nodePort=32768)),
     "The range of valid ports is 30000-32767"),
    (lambda o: (o["spec"].update(type="NodePort"), o["spec"]["ports"][0].update(nodePort=30001),
                o["spec"]["ports"][1].update(nodePort=30001, protocol="TCP")),
     'spec.ports[1].nodePort: duplicate value 30001'),
    (lambda o: o["spec"]["ports"][1].update(port=80, protocol="TCP"), 'spec.ports[1]: duplicate value "80/TCP"'),
    (lambda o: o["spec"].update(type="NodePort", clusterIP="None"),
     "spec.clusterIP: invalid value \"None\": may not be set to 'None' for NodePort services"),
    (lambda o: o["spec"].update(sessionAffinity="ClientIP", sessionAffinityConfig={"clientIP": {"timeoutSeconds": 86401}}),
     "spec.sessionAffinityConfig.clientIP.timeoutSeconds: invalid value 86401"),
    (lambda o: o["metadata"].update(annotations={"service.cilium.io/lb-algorithm": "round-robin"}),
     'metadata.annotations[service.cilium.io/lb-algorithm]: unsupported value "round-robin": supported values: "maglev", "random"'),
    (lambda o: o["spec"].update(clusterIP="10.96.0.5", clusterIPs=["10.96.0.6"]),
     'spec.clusterIPs[0]: invalid value "10.96.0.6": must be equal to spec.clusterIP'),
])
def test_service_cross_field_errors(tmp_path, mutate, expected):
    obj = copy.deepcopy(SERVICE)
    mutate(obj)
    assert expected in error_of(tmp_path, obj)


def test_endpointslice_valid_and_defaults(tmp_path):
    sl = load(tmp_path, SLICE)
    assert sl["ports"] == [{"name": "http", "port": 8080, "protocol": "TCP"}]
    assert sl["endpoints"][0]["addresses"] == ["198.51.100.10"]


@pytest.mark.parametrize("path,value,expected", [
    ("addressType", "IPv6", 'addressType: unsupported value "IPv6": cilia services are IPv4 only'),
    ("addressType", "IPX", 'addressType: unsupported value "IPX"'),
    ("addressType", None, "addressType: field is required"),
    ("endpoints.0.addresses", [], "endpoints[0].addresses: must contain at least 1 address"),
    ("endpoints.0.addresses", ["10.0.0.300"], 'endpoints[0].addresses[0]: invalid value "10.0.0.300"'),
    ("endpoints.0.conditions", {"ready": "yes"}, 'endpoints[0].conditions.ready: must be a boolean, got string "yes"'),
    ("endpoints.0.conditions", {"healthy": True}, 'endpoints[0].conditions.healthy: unknown field "healthy"'),
    ("ports.0.port", 0, "ports[0].port: must be between 1 and 65535, got 0"),
    ("ports.0.protocol", "icmp", 'ports[0].protocol: unsupported value "icmp"'),
    ("metadata.labels", {"kubernetes.io/service-name": "Web"}, "metadata.labels[kubernetes.io/service-name]: invalid value \"Web\""),
])
def test_endpointslice_errors(tmp_path, path, value, expected):
    msg = error_of(tmp_path, with_(SLICE, path, value))
    assert "EndpointSlice default/ext-1" in msg
    assert expected in msg, msg


def test_duplicate_slice_port_names(tmp_path):
    obj = with_(SLICE, "ports", [{"name": "a", "port": 1}, {"name": "a", "port": 2}])
    assert 'ports[1].name: duplicate value "a"' in error_of(tmp_path, obj)


# --- kubectl tables ------------------------------------------------------------------------

def ts(seconds_ago: float) -> str:
    return (NOW - timedelta(seconds=seconds_ago)).strftime("%Y-%m-%dT%H:%M:%SZ")


def svc(name, stype="ClusterIP", cip="10.96.0.10", ports=(), ingress=(), external=(), age=60, selector=None):
    return {"kind": "Service", "metadata": {"name": name, "namespace": "default", "creationTimestamp": ts(age)},
            "spec": {"type": stype, "clusterIP": cip, "ports": list(ports), "externalIPs": list(external),
                     "selector": selector or {}},
            "status": {"loadBalancer": {"ingress": [{"ip": i} for i in ingress]}}}


def test_service_table_matches_kubectl():
    objs = [
        svc("web", "NodePort", ports=[{"port": 80, "protocol": "TCP", "nodePort": 30080},
                                      {"port": 53, "protocol": "UDP", "nodePort": 30053}], selector={"app": "web"}),
        svc("lb", "LoadBalancer", cip="10.96.0.11", ports=[{"port": 443, "protocol": "TCP", "nodePort": 31443}],
            ingress=["172.30.0.1"], external=["198.51.100.7"]),
        svc("pending", "LoadBalancer", cip="10.96.0.12", ports=[{"port": 80, "protocol": "TCP"}]),
        svc("headless", cip="None", ports=[]),
        svc("plain", cip="", ports=[{"port": 8080, "protocol": "SCTP"}], external=["198.51.100.8"], age=7200),
    ]
    assert print_table("svc", objs, now=NOW) == (
        "NAME       TYPE           CLUSTER-IP   EXTERNAL-IP               PORT(S)                     AGE\n"
        "headless   ClusterIP      None         <none>                    <none>                      60s\n"
        "lb         LoadBalancer   10.96.0.11   172.30.0.1,198.51.100.7   443:31443/TCP               60s\n"
        "pending    LoadBalancer   10.96.0.12   <pending>                 80/TCP                      60s\n"
        "plain      ClusterIP      <none>       198.51.100.8              8080/SCTP                   120m\n"
        "web        NodePort       10.96.0.10   <none>                    80:30080/TCP,53:30053/UDP   60s\n")
    wide = print_table("services", objs[:1], wide=True, now=NOW)
    assert wide.splitlines()[0].endswith("AGE   SELECTOR") and wide.splitlines()[1].endswith("app=web")


def test_endpointslice_table_matches_kubectl():
    eps = [{"addresses": [f"10.244.1.{i}"]} for i in range(1, 6)]
    objs = [{"kind": "EndpointSlice", "metadata": {"name": "web-abc", "namespace": "default",
                                                   "creationTimestamp": ts(5)},
             "addressType": "IPv4", "endpoints": eps, "ports": [{"port": 8080}, {"port": 53}]},
            {"kind": "EndpointSlice", "metadata": {"name": "empty", "namespace": "default",
                                                   "creationTimestamp": ts(5)},
             "addressType": "IPv4", "endpoints": [], "ports": []}]
    assert print_table("endpointslices", objs, now=NOW) == (
        "NAME      ADDRESSTYPE   PORTS     ENDPOINTS                                      AGE\n"
        "empty     IPv4          <unset>   <unset>                                        5s\n"
        "web-abc   IPv4          8080,53   10.244.1.1,10.244.1.2,10.244.1.3 + 2 more...   5s\n")


def test_service_json_is_kubectl_shaped():
    o = svc("lb", "LoadBalancer", ports=[{"port": 80, "protocol": "TCP", "nodePort": 30080}], ingress=["172.30.0.1"])
    import json
    out = json.loads(dump(to_list([o]), "json"))
    item = out["items"][0]
    assert out["kind"] == "List"
    assert item["spec"]["clusterIP"] == "10.96.0.10"
    assert item["spec"]["ports"][0]["nodePort"] == 30080
    assert item["status"]["loadBalancer"]["ingress"] == [{"ip": "172.30.0.1"}]

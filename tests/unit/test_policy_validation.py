"""NetworkPolicy / CiliumNetworkPolicy / CiliumClusterwideNetworkPolicy validation:
every accepted feature, every refusal, one line naming the field."""
from __future__ import annotations

import copy

import pytest
import yaml

from cilia.k8s import KINDS, KindSpec, ManifestError, load_manifests
from cilia.k8s.errors import FieldError
from cilia.k8s.policies import (POLICY_TABLES, register_policy_kinds,
                                validate_cilium_clusterwide_network_policy,
                                validate_cilium_network_policy, validate_network_policy)

L7 = "not supported yet (L7/FQDN policy is planned)"

NP = {
    "apiVersion": "networking.k8s.io/v1", "kind": "NetworkPolicy",
    "metadata": {"name": "web", "namespace": "prod"},
    "spec": {
        "podSelector": {"matchLabels": {"app": "web"}},
        "ingress": [{"from": [{"podSelector": {"matchLabels": {"app": "fe"}}},
                              {"namespaceSelector": {"matchLabels": {"team": "a"}},
                               "podSelector": {"matchExpressions": [{"key": "tier", "operator": "In",
                                                                     "values": ["x"]}]}},
                              {"ipBlock": {"cidr": "10.0.0.0/8", "except": ["10.1.0.0/16"]}}],
                     "ports": [{"port": 80}, {"protocol": "UDP", "port": "dns"},
                               {"protocol": "SCTP", "port": 1000, "endPort": 2000}, {"protocol": "TCP"}]}],
        "egress": [{"to": [{"namespaceSelector": {}}]}],
    },
}

CNP = {
    "apiVersion": "cilium.io/v2", "kind": "CiliumNetworkPolicy",
    "metadata": {"name": "web", "namespace": "prod"},
    "spec": {
        "endpointSelector": {"matchLabels": {"app": "web", "k8s:tier": "fe"}},
        "ingress": [{"fromEndpoints": [{"matchLabels": {"app": "fe"}},
                                       {"matchExpressions": [{"key": "k8s:io.kubernetes.pod.namespace",
                                                              "operator": "Exists"}]}],
                     "toPorts": [{"ports": [{"port": "80", "protocol": "TCP"},
                                            {"port": "8000", "endPort": 8080},
                                            {"port": "http", "protocol": "tcp"}]}]},
                    {"fromCIDRSet": [{"cidr": "10.0.0.0/8", "except": ["10.1.0.0/16"]}]},
                    {"fromCIDR": ["192.0.2.0/24", "198.51.100.7"]},
                    {"fromEntities": ["world", "cluster", "host", "remote-node", "health", "init",
                                      "unmanaged", "kube-apiserver", "ingress", "all"]},
                    {"fromEndpoints": [{}], "icmps": [{"fields": [{"type": 8}, {"type": "EchoReply"},
                                                                  {"type": 128, "family": "IPv6"}]}]}],
        "ingressDeny": [{"fromEntities": ["world"], "toPorts": [{"ports": [{"port": "22", "protocol": "ANY"}]}]}],
        "egress": [{"toEndpoints": [{"matchLabels": {"reserved:host": ""}}]}, {}],
        "egressDeny": [{"toCIDR": ["203.0.113.0/24"]}],
        "enableDefaultDeny": {"ingress": True, "egress": False},
        "description": "web tier",
        "labels": [{"key": "team", "value": "web", "source": "k8s"}],
    },
}

CCNP = {
    "apiVersion": "cilium.io/v2", "kind": "CiliumClusterwideNetworkPolicy",
    "metadata": {"name": "everyone"},
    "specs": [{"endpointSelector": {}, "egress": [{"toEntities": ["cluster"]}]},
              {"endpointSelector": {"matchLabels": {"app": "db"}}, "ingressDeny": [{"fromEntities": ["world"]}]}],
}


def mutate(base, path, value):
    """Set a dotted path ('spec.ingress.0.from'); value None deletes it."""
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


def error(validator, obj) -> str:
    with pytest.raises(FieldError) as exc:
        validator(obj)
    msg = str(exc.value)
    assert "\n" not in msg
    return msg


def test_valid_objects_are_accepted_and_normalized():
    np_ = validate_network_policy(NP)
    assert np_["spec"]["policyTypes"] == ["Ingress", "Egress"]  # the API server's defaulting
    assert np_["spec"]["ingress"][0]["ports"][0] == {"protocol": "TCP", "port": 80}
    assert np_["spec"]["ingress"][0]["ports"][3] == {"protocol": "TCP"}
    assert np_["spec"]["ingress"][0]["from"][2] == {"ipBlock": {"cidr": "10.0.0.0/8", "except": ["10.1.0.0/16"]}}
    cnp = validate_cilium_network_policy(CNP)
    ports = cnp["spec"]["ingress"][0]["toPorts"][0]["ports"]
    assert ports[2] == {"port": "http", "protocol": "TCP"}  # Cilium upper-cases protocols
    assert cnp["spec"]["ingress"][4]["icmps"][0]["fields"][2] == {"family": "IPv6", "type": 128}
    assert cnp["spec"]["enableDefaultDeny"] == {"ingress": True, "egress": False}
    assert cnp["spec"]["egress"][1] == {}
    ccnp = validate_cilium_clusterwide_network_policy(CCNP)
    assert "namespace" not in ccnp["metadata"] and len(ccnp["specs"]) == 2


@pytest.mark.parametrize("types,egress,want", [
    (None, None, ["Ingress"]),
    (None, [], ["Ingress"]),
    (["Egress"], None, ["Egress"]),
    (["Ingress", "Egress"], None, ["Ingress", "Egress"]),
])
def test_np_policy_types_defaulting(types, egress, want):
    spec = {"podSelector": {}}
    if types is not None:
        spec["policyTypes"] = types
    if egress is not None:
        spec["egress"] = egress
    obj = {**NP, "spec": spec}
    assert validate_network_policy(obj)["spec"]["policyTypes"] == want


NP_ERRORS = [
    ("metadata.name", "Web_1", "metadata.name: invalid value \"Web_1\""),
    ("spec.podSelector.matchLabels", {"bad key!": "x"}, "spec.podSelector.matchLabels: invalid value \"bad key!\""),
    ("spec.policyTypes", ["Both"], 'spec.policyTypes[0]: unsupported value "Both": supported values: "Ingress", "Egress"'),
    ("spec.policyTypes", ["Ingress", "Ingress"], 'spec.policyTypes[1]: duplicate value "Ingress"'),
    ("spec.ingress.0.from.0", {}, "spec.ingress[0].from[0]: must specify a peer"),
    ("spec.ingress.0.from.0", {"podSelector": {}, "ipBlock": {"cidr": "10.0.0.0/8"}},
     "spec.ingress[0].from[0]: may not specify both ipBlock and another peer"),
    ("spec.ingress.0.from.2.ipBlock.cidr", "10.0.0.0", "spec.ingress[0].from[2].ipBlock.cidr: invalid value \"10.0.0.0\": must be a valid CIDR"),
    ("spec.ingress.0.from.2.ipBlock.cidr", None, "spec.ingress[0].from[2].ipBlock.cidr: field is required"),
    ("spec.ingress.0.from.2.ipBlock.except", ["192.168.0.0/16"],
     "spec.ingress[0].from[2].ipBlock.except[0]: invalid value \"192.168.0.0/16\": must be a strict subset of `cidr`"),
    ("spec.ingress.0.from.2.ipBlock.except", ["10.0.0.0/8"],
     "spec.ingress[0].from[2].ipBlock.except[0]: invalid value \"10.0.0.0/8\": must be a strict subset of `cidr`"),
    ("spec.ingress.0.from.1.namespaceSelector.matchExpressions",
     [{"key": "team", "operator": "Near"}], "spec.ingress[0].from[1].namespaceSelector.matchExpressions[0].operator: unsupported value \"Near\""),
    ("spec.ingress.0.from.1.podSelector.matchExpressions", [{"key": "tier", "operator": "In"}],
     "spec.ingress[0].from[1].podSelector.matchExpressions[0].values: must be specified when `operator` is 'In' or 'NotIn'"),
    ("spec.ingress.0.ports.0.protocol", "ICMP", 'spec.ingress[0].ports[0].protocol: unsupported value "ICMP": supported values: "SCTP", "TCP", "UDP"'),
    ("spec.ingress.0.ports.0.port", 0, "spec.ingress[0].ports[0].port: must be between 1 and 65535, got 0"),
    ("spec.ingress.0.ports.0.port", 70000, "spec.ingress[0].ports[0].port: must be between 1 and 65535, got 70000"),
    ("spec.ingress.0.ports.0.port", "HTTP", "spec.ingress[0].ports[0].port: invalid value \"HTTP\""),
    ("spec.ingress.0.ports.0.port", 1.5, "spec.ingress[0].ports[0].port: must be an integer or a port name, got number 1.5"),
    ("spec.ingress.0.ports.1.endPort", 90, "spec.ingress[0].ports[1].endPort: invalid value 90: may not be specified when `port` is non-numeric"),
    ("spec.ingress.0.ports.3.endPort", 90, "spec.ingress[0].ports[3].port: must be specified when `endPort` is specified"),
    ("spec.ingress.0.ports.2.endPort", 999, "spec.ingress[0].ports[2].endPort: invalid value 999: must be greater than or equal to `port`"),
    ("spec.egress.0.from", [], 'spec.egress[0].from: unknown field "from"'),
    ("spec.ingress.0.to", [], 'spec.ingress[0].to: unknown field "to"'),
    ("spec.ingressRules", [], 'spec.ingressRules: unknown field "ingressRules"'),
]


@pytest.mark.parametrize("path,value,want", NP_ERRORS, ids=[f"{p}={v!r}" for p, v, _ in NP_ERRORS])
def test_network_policy_errors(path, value, want):
    assert error(validate_network_policy, mutate(NP, path, value)).startswith(want)


CNP_ERRORS = [
    # refusals: L7 / FQDN / services / groups / auth
    ("spec.ingress.0.toPorts.0.rules", {"http": [{"method": "GET"}]}, "spec.ingress[0].toPorts[0].rules: " + L7),
    ("spec.ingressDeny.0.toPorts.0.rules", {"http": [{}]}, "spec.ingressDeny[0].toPorts[0].rules: " + L7),
    ("spec.ingress.0.toPorts.0.listener", {"envoyConfig": {"name": "x"}, "name": "l"}, "spec.ingress[0].toPorts[0].listener: " + L7),
    ("spec.ingress.0.toPorts.0.terminatingTLS", {"secret": {"name": "s"}}, "spec.ingress[0].toPorts[0].terminatingTLS: " + L7),
    ("spec.ingress.0.toPorts.0.originatingTLS", {"secret": {"name": "s"}}, "spec.ingress[0].toPorts[0].originatingTLS: " + L7),
    ("spec.ingress.0.toPorts.0.serverNames", ["a.example"], "spec.ingress[0].toPorts[0].serverNames: " + L7),
    ("spec.egress.1.toFQDNs", [{"matchName": "example.com"}], "spec.egress[1].toFQDNs: " + L7),
    ("spec.egress.1.toServices", [{"k8sService": {"serviceName": "a", "namespace": "b"}}], "spec.egress[1].toServices: " + L7),
    ("spec.egress.1.toGroups", [{"aws": {}}], "spec.egress[1].toGroups: " + L7),
    ("spec.ingress.1.fromGroups", [{"aws": {}}], "spec.ingress[1].fromGroups: " + L7),
    ("spec.ingress.1.authentication", {"mode": "required"}, "spec.ingress[1].authentication: " + L7),
    ("spec.egressDeny.0.toServices", [{}], "spec.egressDeny[0].toServices: " + L7),
    # refusals: not supported yet
    ("spec.nodeSelector", {"matchLabels": {"a": "b"}}, "spec.nodeSelector: not supported yet"),
    ("spec.ingress.1.fromRequires", [{}], "spec.ingress[1].fromRequires: not supported yet"),
    ("spec.egress.1.toRequires", [{}], "spec.egress[1].toRequires: not supported yet"),
    ("spec.ingress.1.fromNodes", [{}], "spec.ingress[1].fromNodes: not supported yet"),
    ("spec.egress.1.toNodes", [{}], "spec.egress[1].toNodes: not supported yet"),
    ("spec.ingress.1.fromCIDRSet.0.cidrGroupRef", "grp", "spec.ingress[1].fromCIDRSet[0].cidrGroupRef: not supported yet"),
    # structure
    ("spec", None, "spec: field is required (or specs)"),
    ("spec.endpointSelector", None, "spec.endpointSelector: field is required"),
    ("spec.endpointSelector.matchLabels", {"K8S:app": "web"}, "spec.endpointSelector.matchLabels: invalid value \"K8S:app\": label source"),
    ("spec.endpointSelector.matchLabels", {"k8s:-app": "web"}, "spec.endpointSelector.matchLabels: invalid value \"k8s:-app\""),
    ("spec.endpointSelector.matchLabels", {"app": "a b"}, "spec.endpointSelector.matchLabels[app]: invalid value \"a b\""),
    ("spec.ingress.0.fromEndpoints.1.matchExpressions.0.values", ["x"],
     "spec.ingress[0].fromEndpoints[1].matchExpressions[0].values: may not be specified when `operator` is 'Exists' or 'DoesNotExist'"),
    ("spec.ingress.0.fromCIDR", ["10.0.0.0/8"], "spec.ingress[0]: combining fromEndpoints and fromCIDR is not supported yet"),
    ("spec.ingress.3.fromCIDRSet", [{"cidr": "10.0.0.0/8"}], "spec.ingress[3]: combining fromCIDRSet and fromEntities is not supported yet"),
    ("spec.ingress.0.icmps", [{"fields": [{"type": 8}]}], "spec.ingress[0].icmps: may only be present without toPorts"),
    ("spec.ingress.3.fromEntities", ["everything"], 'spec.ingress[3].fromEntities[0]: unsupported value "everything": supported values: "all", "world"'),
    ("spec.ingress.0.toPorts.0.ports.0.protocol", "ICMP", 'spec.ingress[0].toPorts[0].ports[0].protocol: unsupported value "ICMP": supported values: "TCP", "UDP", "SCTP", "ANY"'),
    ("spec.ingress.0.toPorts.0.ports.0.port", "70000", "spec.ingress[0].toPorts[0].ports[0].port: must be between 0 and 65535, got 70000"),
    ("spec.ingress.0.toPorts.0.ports.0.port", "web_port", "spec.ingress[0].toPorts[0].ports[0].port: invalid value \"web_port\""),
    ("spec.ingress.0.toPorts.0.ports.2.endPort", 90, "spec.ingress[0].toPorts[0].ports[2].endPort: invalid value 90: may only be specified with a numeric `port`"),
    ("spec.ingress.0.toPorts.0.ports.1.endPort", 7000, "spec.ingress[0].toPorts[0].ports[1].endPort: invalid value 7000: must be greater than or equal to `port`"),
    ("spec.ingress.0.toPorts.0.ports.0.host", "x", 'spec.ingress[0].toPorts[0].ports[0].host: unknown field "host"'),
    ("spec.ingress.4.icmps.0.fields.0.type", 300, "spec.ingress[4].icmps[0].fields[0].type: must be between 0 and 255, got 300"),
    ("spec.ingress.4.icmps.0.fields.0.type", "Ping", 'spec.ingress[4].icmps[0].fields[0].type: unsupported value "Ping"'),
    ("spec.ingress.4.icmps.0.fields.0.type", None, "spec.ingress[4].icmps[0].fields[0].type: field is required"),
    ("spec.ingress.4.icmps.0.fields.0.family", "IPv5", 'spec.ingress[4].icmps[0].fields[0].family: unsupported value "IPv5": supported values: "IPv4", "IPv6"'),
    ("spec.ingress.2.fromCIDR", ["not-an-ip"], 'spec.ingress[2].fromCIDR[0]: invalid value "not-an-ip": must be a valid CIDR'),
    ("spec.ingress.1.fromCIDRSet.0.except", ["11.0.0.0/16"], 'spec.ingress[1].fromCIDRSet[0].except[0]: invalid value "11.0.0.0/16": must be a strict subset of `cidr`'),
    ("spec.ingress.1.fromCIDRSet.0.cidr", "10.0.0.1", 'spec.ingress[1].fromCIDRSet[0].cidr: invalid value "10.0.0.1": must be a valid CIDR'),
    ("spec.enableDefaultDeny.ingress", "yes", 'spec.enableDefaultDeny.ingress: must be a boolean, got string "yes"'),
    ("spec.enableDefaultDeny.both", True, 'spec.enableDefaultDeny.both: unknown field "both"'),
    ("spec.ingress.0.fromEndpoint", [{}], 'spec.ingress[0].fromEndpoint: unknown field "fromEndpoint"'),
    ("spec.ingressDeny.0.fromFQDN", [], 'spec.ingressDeny[0].fromFQDN: unknown field "fromFQDN"'),
    ("spec.egress.0.fromEndpoints", [{}], 'spec.egress[0].fromEndpoints: unknown field "fromEndpoints"'),
    ("spec.ingress", {"fromEndpoints": []}, "spec.ingress: must be a list, got object"),
]


@pytest.mark.parametrize("path,value,want", CNP_ERRORS, ids=[f"{p}={v!r}" for p, v, _ in CNP_ERRORS])
def test_cilium_network_policy_errors(path, value, want):
    assert error(validate_cilium_network_policy, mutate(CNP, path, value)).startswith(want)


CCNP_ERRORS = [
    ("specs.1.endpointSelector", None, "specs[1].endpointSelector: field is required"),
    ("specs.0.nodeSelector", {}, "specs[0].nodeSelector: not supported yet"),
    ("specs.0.egress.0.toFQDNs", [{"matchPattern": "*"}], "specs[0].egress[0].toFQDNs: " + L7),
    ("specs", None, "spec: field is required (or specs)"),
]


@pytest.mark.parametrize("path,value,want", CCNP_ERRORS, ids=[p for p, _, _ in CCNP_ERRORS])
def test_clusterwide_policy_errors(path, value, want):
    assert error(validate_cilium_clusterwide_network_policy, mutate(CCNP, path, value)).startswith(want)


@pytest.fixture
def policy_kinds(monkeypatch):
    register_policy_kinds(lambda spec: monkeypatch.setitem(KINDS, spec.kind, spec), KindSpec)


def test_loader_reports_one_line_with_file_object_and_field(tmp_path, monkeypatch, policy_kinds):
    monkeypatch.chdir(tmp_path)
    bad = mutate(CNP, "spec.egress.1.toFQDNs", [{"matchName": "example.com"}])
    (tmp_path / "p.yaml").write_text(yaml.safe_dump_all([NP, CCNP, bad]))
    with pytest.raises(ManifestError) as exc:
        load_manifests(["p.yaml"])
    assert str(exc.value) == ("error: p.yaml: CiliumNetworkPolicy prod/web: spec.egress[1].toFQDNs: "
                              "not supported yet (L7/FQDN policy is planned)")
    (tmp_path / "p.yaml").write_text(yaml.safe_dump_all([NP, CNP, CCNP]))
    kinds = [o["kind"] for o in load_manifests(["p.yaml"])]
    assert kinds == ["NetworkPolicy", "CiliumNetworkPolicy", "CiliumClusterwideNetworkPolicy"]


def test_registration_and_table_specs(policy_kinds):
    assert KINDS["NetworkPolicy"].namespaced and "netpol" in KINDS["NetworkPolicy"].short_names
    assert "cnp" in KINDS["CiliumNetworkPolicy"].short_names
    assert not KINDS["CiliumClusterwideNetworkPolicy"].namespaced
    assert KINDS["CiliumClusterwideNetworkPolicy"].api_versions == ("cilium.io/v2",)
    cols, row, _, _ = POLICY_TABLES["NetworkPolicy"]
    assert cols == ("NAME", "POD-SELECTOR", "AGE")
    assert row(validate_network_policy(NP), None)[:2] == ["web", "app=web"]
    cols, row, _, _ = POLICY_TABLES["CiliumNetworkPolicy"]
    assert cols == ("NAME", "AGE", "VALID") and row(CNP, None)[2] == "True"

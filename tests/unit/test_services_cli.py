"""`cilia service list|get`, `cilia bpf lb list`, `cilia bpf ct list global`: Cilium's
shapes, from what the agent API returns (the API is replaced by canned answers here; the
reconciler's real services_view() feeds them)."""
from __future__ import annotations

import asyncio
import json
from types import SimpleNamespace

import pytest
from click.testing import CliRunner

from cilia.cli import agent_cmd, service_cmd
from cilia.cli.main import cli
from cilia.loadbalancer.datapath import DatapathBackend
from cilia.loadbalancer.reconciler import LBReconciler
from tests.unit.test_lb_desired import NODE_IPS, ep, eslice, service
from tests.unit.test_lb_reconciler import RecordingDatapath

# NodeDatapath.services() / ct_entries() shapes (src/cilia/datapath/lb.py).
LB_MAP = [
    {"frontend": "10.96.0.10:80/TCP", "address": "10.96.0.10", "port": 80, "proto": "TCP", "scope": "external",
     "kind": "ClusterIP", "rev_nat": 2, "count": 1, "flags": ["SessionAffinity"], "algorithm": "maglev",
     "affinity_timeout": 30, "backends": [
         {"slot": 1, "id": 1, "address": "10.244.1.5", "port": 8080, "state": "active"}]},
    {"frontend": "172.29.0.11:30080/UDP", "address": "172.29.0.11", "port": 30080, "proto": "UDP",
     "scope": "internal", "kind": "NodePort", "rev_nat": 1, "count": 0, "flags": ["NodePort", "Routable"],
     "algorithm": "random", "affinity_timeout": 0, "backends": [
         {"slot": 1, "id": 7, "address": "10.244.2.6", "port": 53, "state": "missing"}]},
]
CT = [{"type": "service", "tuple": "TCP 10.244.1.5:43562 -> 10.96.0.10:80", "proto": "TCP",
       "saddr": "10.244.1.5", "sport": 43562, "daddr": "10.96.0.10", "dport": 80, "rev_nat": 2,
       "backend": 1, "flags": ["hairpin"], "created": 100, "last_seen": 103, "age": 5, "idle": 2}]


@pytest.fixture
def api(monkeypatch, tmp_path):
    dp = RecordingDatapath()
    r = LBReconciler(dp, str(tmp_path), "node1", NODE_IPS, backend_factory=DatapathBackend)
    asyncio.run(r.sync([service(stype="NodePort")],
                       [eslice(endpoints=[ep("10.244.1.5", "node1"), ep("10.244.2.5", "node2")])]))
    answers = {"/v1/service": r.services_view(), "/v1/bpf/lb": LB_MAP, "/v1/bpf/ct": CT}
    asked = []

    def agent_get(spec, node, path):
        asked.append((node, path))
        return answers[path]

    # Listings are built by agent_cmd.node_listing; service get / bpf ct live in service_cmd.
    for mod in (service_cmd, agent_cmd):
        monkeypatch.setattr(mod, "agent_get", agent_get)
        monkeypatch.setattr(mod, "lab_spec", lambda ctx: SimpleNamespace(name="t"))
        monkeypatch.setattr(mod, "node_name", lambda spec, node: node or "node1")
    return asked


def invoke(*args):
    res = CliRunner().invoke(cli, list(args), catch_exceptions=False)
    return res


def test_service_list_columns(api):
    res = invoke("service", "list", "--node", "node2")
    assert res.exit_code == 0
    lines = res.output.splitlines()
    assert lines[0].split() == ["ID", "Frontend", "Service", "Type", "Backend"]
    assert lines[1].split() == ["1", "10.244.1.1:30080/TCP", "NodePort", "1", "=>", "10.244.1.5:8080/TCP", "(active)"]
    assert lines[2].strip() == "2 => 10.244.2.5:8080/TCP (active)"
    assert any("10.96.0.10:80/TCP" in line and "ClusterIP" in line for line in lines)
    assert api == [("node2", "/v1/service")]


def test_service_get_json_is_ciliums_model(api):
    res = invoke("service", "get", "2", "-o", "json")
    body = json.loads(res.output)
    assert set(body) == {"spec", "status"}
    assert body["spec"]["id"] == 2 and body["spec"]["frontend-address"]["scope"] == "external"
    assert body["spec"]["flags"]["type"] == "ClusterIP"
    assert body["status"]["realized"]["backend-addresses"][1]["nodeName"] == "node2"
    res = CliRunner().invoke(cli, ["service", "get", "99"])
    assert res.exit_code != 0 and "service 99 not found" in res.output


def test_service_list_json(api):
    assert len(json.loads(invoke("service", "list", "-o", "json").output)) == 3


def test_bpf_lb_list(api):
    out = invoke("bpf", "lb", "list").output.splitlines()
    assert out[0].split() == ["SERVICE", "ADDRESS", "BACKEND", "ADDRESS", "(REVNAT_ID)", "(SLOT)"]
    assert out[1].split()[:2] == ["10.96.0.10:80/TCP", "(2)"]
    assert out[1].endswith("0.0.0.0:0 (2) (0) [SessionAffinity, Maglev, affinity 30s]")
    assert out[2].split() == ["10.244.1.5:8080/TCP", "(2)", "(1)"]
    assert out[3].startswith("172.29.0.11:30080/UDP/i (1)") and out[3].endswith("[NodePort, Routable]")
    assert out[4].split() == ["10.244.2.6:53/UDP", "(1)", "(1)", "[missing]"]
    assert json.loads(invoke("bpf", "lb", "list", "-o", "json").output) == LB_MAP


def test_bpf_ct_list_global(api):
    out = invoke("bpf", "ct", "list", "global").output
    assert out == ("TCP SVC 10.244.1.5:43562 -> 10.96.0.10:80 RevNAT=2 BackendID=1 Flags=[hairpin] "
                   "Created=100 LastSeen=103 Age=5 Idle=2\n")
    assert json.loads(invoke("bpf", "ct", "list", "global", "-o", "json").output) == CT


@pytest.mark.parametrize("word,kind", [("svc", "Service"), ("services", "Service"), ("service", "Service"),
                                       ("endpointslices", "EndpointSlice"), ("endpointslice", "EndpointSlice"),
                                       ("endpointslices.discovery.k8s.io", "EndpointSlice")])
def test_get_resolves_service_kinds(word, kind):
    from cilia.cluster import kind_of
    assert kind_of(word) == kind

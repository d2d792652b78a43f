"""`cilia service list|get`, `cilia bpf lb list`, `cilia bpf ct list global`: Cilium's
shapes, from what the agent API returns (the API is replaced by canned answers here; the
reconciler's real services_view() feeds them)."""
from __future__ import annotations

import asyncio
import json
from types import SimpleNamespace

import pytest
from click.testing import CliRunner

from cilia.cli import service_cmd
from cilia.cli.main import cli
from cilia.loadbalancer.datapath import DatapathBackend
from cilia.loadbalancer.reconciler import LBReconciler
from tests.unit.test_lb_desired import NODE_IPS, ep, eslice, service
from tests.unit.test_lb_reconciler import RecordingDatapath

LB_MAP = [
    {"address": "10.96.0.10", "port": 80, "proto": 6, "scope": "internal", "rev_nat_index": 2,
     "kind": "ClusterIP", "algorithm": "maglev", "backends": [
         {"id": 1, "address": "10.244.1.5", "port": 8080, "proto": 6, "state": "active"},
         {"id": 2, "address": "10.244.2.6", "port": 8080, "proto": 6, "state": "terminating"}]},
    {"address": "172.29.0.11", "port": 30080, "proto": 17, "scope": "external", "rev_nat_index": 1,
     "kind": "NodePort", "local_only": True, "backends": []},
]
CT = [{"proto": 6, "direction": "out", "saddr": "10.244.1.5", "sport": 43562, "daddr": "10.96.0.10",
       "dport": 80, "expires": 17, "rev_nat": 2, "backend_id": 1}]


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

    monkeypatch.setattr(service_cmd, "agent_get", agent_get)
    monkeypatch.setattr(service_cmd, "lab_spec", lambda ctx: SimpleNamespace(name="t"))
    monkeypatch.setattr(service_cmd, "node_name", lambda spec, node: node or "node1")
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
    assert any("10.96.0.10:80/TCP/i" in line and "ClusterIP" in line for line in lines)
    assert api == [("node2", "/v1/service")]


def test_service_get_json_is_ciliums_model(api):
    res = invoke("service", "get", "2", "-o", "json")
    body = json.loads(res.output)
    assert set(body) == {"spec", "status"}
    assert body["spec"]["id"] == 2 and body["spec"]["frontend-address"]["scope"] == "internal"
    assert body["spec"]["flags"]["type"] == "ClusterIP"
    assert body["status"]["realized"]["backend-addresses"][1]["nodeName"] == "node2"
    res = CliRunner().invoke(cli, ["service", "get", "99"])
    assert res.exit_code != 0 and "service 99 not found" in res.output


def test_service_list_json(api):
    assert len(json.loads(invoke("service", "list", "-o", "json").output)) == 3


def test_bpf_lb_list(api):
    out = invoke("bpf", "lb", "list").output.splitlines()
    assert out[0].split() == ["SERVICE", "ADDRESS", "BACKEND", "ADDRESS", "(REVNAT_ID)", "(SLOT)"]
    assert out[1].split()[:2] == ["10.96.0.10:80/TCP/i", "(2)"] and "[ClusterIP, maglev]" in out[1]
    assert out[2].split() == ["10.244.1.5:8080/TCP", "(2)", "(1)"]
    assert out[3].split() == ["10.244.2.6:8080/TCP", "(2)", "(2)", "[terminating]"]
    assert out[4].startswith("172.29.0.11:30080/UDP (1)") and "[NodePort, local]" in out[4]
    assert json.loads(invoke("bpf", "lb", "list", "-o", "json").output) == LB_MAP


def test_bpf_ct_list_global(api):
    out = invoke("bpf", "ct", "list", "global").output
    assert out == "TCP OUT 10.244.1.5:43562 -> 10.96.0.10:80 expires=17 rev_nat=2 backend_id=1\n"
    assert json.loads(invoke("bpf", "ct", "list", "global", "-o", "json").output) == CT


@pytest.mark.parametrize("word,kind", [("svc", "Service"), ("services", "Service"), ("service", "Service"),
                                       ("endpointslices", "EndpointSlice"), ("endpointslice", "EndpointSlice"),
                                       ("endpointslices.discovery.k8s.io", "EndpointSlice")])
def test_get_resolves_service_kinds(word, kind):
    from cilia.cluster import kind_of
    assert kind_of(word) == kind

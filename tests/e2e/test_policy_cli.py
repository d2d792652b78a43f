"""The policy user contract on a 2-node lab: revisions and --wait, explain, bpf policy get,
endpoint enforcement columns, audit per endpoint, live config, bad input, agent restart.
(The reachability truth tables are in test_policy_matrix.py.)"""
from __future__ import annotations

import json
import os
import signal
import time

import pytest

pytestmark = pytest.mark.root

PODS = """
apiVersion: v1
kind: Namespace
metadata: {name: pc}
---
apiVersion: v1
kind: Pod
metadata: {name: client, namespace: pc, labels: {app: client}}
spec:
  nodeName: node1
  containers: [{name: c, image: idle}]
---
apiVersion: v1
kind: Pod
metadata: {name: server, namespace: pc, labels: {app: server}}
spec:
  nodeName: node2
  containers: [{name: c, image: echo, ports: [{containerPort: 8080, name: http}]}]
"""

DENY_INGRESS = """
apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata: {name: server-ingress, namespace: pc}
spec:
  podSelector: {matchLabels: {app: server}}
  policyTypes: [Ingress]
"""

ALLOW_CLIENT = """
apiVersion: cilium.io/v2
kind: CiliumNetworkPolicy
metadata: {name: allow-client, namespace: pc}
spec:
  endpointSelector: {matchLabels: {app: server}}
  ingress:
  - fromEndpoints: [{matchLabels: {app: client}}]
    toPorts: [{ports: [{port: "8080", protocol: TCP}]}]
"""


@pytest.fixture(scope="module")
def lab(lab_factory):
    lab = lab_factory(nodes=2, prefix="pc")
    lab.apply(PODS)
    lab.cilia("wait", "--for=condition=Ready", "pod/client", "pod/server", "-n", "pc",
              "--timeout", "60s")
    return lab


def reach(lab, port: int = 8080) -> bool:
    ip = lab.pod_ip("server", "pc")
    r = lab.exec("client", "curl", "-s", "-m", "1", "-o", "/dev/null", f"http://{ip}:{port}/",
                 ns="pc", check=False)
    return r.rc == 0


def server_endpoint(lab) -> dict:
    eps = lab.cilia("endpoint", "list", "--node", "node2", "-o", "json").json()
    return next(e for e in eps if e["status"]["external-identifiers"]["pod-name"] == "pc/server")


def explain(lab, port: int = 8080) -> dict:
    return lab.cilia("policy", "explain", "--from", "pc/client", "--to", "pc/server",
                     "--port", str(port), "-o", "json").json()


def test_apply_wait_enforces_and_reports_revision(lab):
    assert reach(lab)
    r = lab.cilia("apply", "--wait", "-f", "-", input=DENY_INGRESS)
    assert "networkpolicy.networking.k8s.io/server-ingress created" in r.out
    rev = int(r.out.split("Revision:")[1].split()[0])
    assert not reach(lab)
    # Every node already enforces it: policy wait returns at once, and for older revisions.
    assert lab.cilia("policy", "wait", str(rev), "--timeout", "10").rc == 0
    got = lab.cilia("get", "netpol", "-n", "pc").out
    assert "server-ingress" in got and "app=server" in got
    v = explain(lab)
    assert v["verdict"] == "DENIED"
    assert v["ingress"]["enforced"] and "no rule selects the peer" in v["reason"]
    assert {"kind": "NetworkPolicy", "namespace": "pc", "name": "server-ingress"} not in v["allowed_by"]
    ep = server_endpoint(lab)
    assert ep["status"]["policy"]["realized"]["ingress-enforcement"] == "Enabled"
    assert ep["status"]["policy"]["realized"]["egress-enforcement"] == "Disabled"
    table = lab.cilia("endpoint", "list", "--node", "node2").out
    assert "Enabled" in table


def test_allow_rule_named_and_in_bpf_map(lab):
    lab.cilia("apply", "--wait", "-f", "-", input=ALLOW_CLIENT)
    assert reach(lab)
    v = explain(lab)
    assert v["verdict"] == "ALLOWED"
    assert {"kind": "CiliumNetworkPolicy", "namespace": "pc", "name": "allow-client"} in v["allowed_by"]
    ep = server_endpoint(lab)
    client_id = next(e for e in lab.cilia("endpoint", "list", "--node", "node1", "-o", "json").json()
                     if e["status"]["external-identifiers"]["pod-name"] == "pc/client")["status"]["identity"]["id"]
    entries = lab.cilia("bpf", "policy", "get", str(ep["id"]), "--node", "node2", "-o", "json").json()
    assert any(e["direction"] == "ingress" and e["identity"] == client_id and e["port"] == 8080
               and e["protocol"] == "TCP" and e["verdict"] == "allow" for e in entries), entries
    # Another port is still dropped, and the drop is counted as a policy drop.
    assert explain(lab, 9090)["verdict"] == "DENIED"


def test_endpoint_audit_mode_forwards_would_be_drops(lab):
    ep = server_endpoint(lab)
    lab.cilia("delete", "-f", "-", input=ALLOW_CLIENT)
    assert not reach(lab)
    lab.cilia("endpoint", "config", str(ep["id"]), "PolicyAuditMode=Enabled", "--node", "node2")
    try:
        assert reach(lab)
        assert explain(lab)["verdict"] == "AUDIT"
        ep = server_endpoint(lab)
        assert ep["status"]["policy"]["realized"]["ingress-enforcement"] == "Enabled (Audit)"
        metrics = lab.cilia("bpf", "metrics", "list", "--node", "node2", "-o", "json").json()
        assert any(m.get("audit") and m["packets"] > 0 for m in metrics), metrics
    finally:
        lab.cilia("endpoint", "config", str(ep["id"]), "PolicyAuditMode=Disabled", "--node", "node2")
    assert not reach(lab)
    metrics = lab.cilia("bpf", "metrics", "list", "--node", "node2", "-o", "json").json()
    assert any(m["reason"] == 133 and m["packets"] > 0 for m in metrics), metrics


def test_config_enable_policy_always_and_back(lab):
    lab.cilia("delete", "-f", "-", input=DENY_INGRESS)
    assert reach(lab)
    lab.cilia("config", "set", "enable-policy", "always")
    try:
        assert not reach(lab)
        assert "enable-policy                           always" in lab.cilia("config", "view").out
    finally:
        lab.cilia("config", "set", "enable-policy", "default")
    assert reach(lab)
    bad = lab.cilia("config", "set", "enable-policy", "sometimes", check=False)
    assert bad.rc != 0 and "not one of" in bad.err


def test_l7_rule_refused_and_nothing_applied(lab):
    doc = DENY_INGRESS + """---
apiVersion: cilium.io/v2
kind: CiliumNetworkPolicy
metadata: {name: l7, namespace: pc}
spec:
  endpointSelector: {}
  egress:
  - toPorts: [{ports: [{port: "80"}], rules: {http: [{method: GET}]}}]
"""
    r = lab.cilia("apply", "-f", "-", input=doc, check=False)
    assert r.rc != 0
    assert len(r.err.strip().splitlines()) == 1
    assert "CiliumNetworkPolicy pc/l7" in r.err and "rules" in r.err and "not supported" in r.err
    assert lab.cilia("get", "netpol", "-n", "pc", check=False).out.strip() == ""
    assert reach(lab)


def test_agent_restart_keeps_enforcement(lab):
    lab.cilia("apply", "--wait", "-f", "-", input=DENY_INGRESS)
    assert not reach(lab)
    pidfile = f"/run/cilia/{lab.name}/node2/agent.pid"
    with open(pidfile) as f:
        old = json.load(f)["pid"]
    os.kill(old, signal.SIGKILL)
    # Pinned maps keep enforcing while no agent runs.
    assert not reach(lab)
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        with open(pidfile) as f:
            new = json.load(f)["pid"]
        if new != old and lab.cilia("policy", "wait", "1", "--timeout", "1", check=False).rc == 0:
            break
        time.sleep(0.2)
    else:
        pytest.fail("agent did not come back with its policy")
    assert not reach(lab)
    lab.cilia("delete", "-f", "-", input=DENY_INGRESS)
    assert reach(lab)

"""Flows across two nodes (tunnel routing): the sending node reports the packet going into
the overlay, the receiving node its delivery, and each names the pod on the other node
(from the cluster's ipcache and identities, not from local endpoints)."""
from __future__ import annotations

import time

import pytest

from tests.e2e.test_flows import api_lines, dst

pytestmark = pytest.mark.root

PODS = """
apiVersion: v1
kind: Pod
metadata: {name: far, labels: {app: far}}
spec:
  nodeName: node2
  containers:
  - {name: echo, image: cilia/echo, ports: [{containerPort: 8080}]}
---
apiVersion: v1
kind: Pod
metadata: {name: near, labels: {app: near}}
spec:
  nodeName: node1
  containers:
  - {name: echo, image: cilia/echo, ports: [{containerPort: 9000}]}
"""


@pytest.fixture(scope="module")
def lab(lab_factory):
    lab = lab_factory(nodes=2, routing="tunnel", prefix="fm")
    lab.apply(PODS)
    lab.cilia("wait", "--for=condition=Ready", "pods", "--all", "--timeout", "90s", timeout=120)
    return lab


def wait_on(lab, node: str, pred, timeout: float = 15.0) -> list[dict]:
    deadline = time.monotonic() + timeout
    while True:
        got = [r["flow"] for r in api_lines(lab, "/v1/flows", node) if pred(r["flow"])]
        if got or time.monotonic() > deadline:
            return got
        time.sleep(0.5)


def test_cross_node_flows_on_both_nodes(lab):
    pods = lab.pods()
    far_ip = pods["far"]["status"]["podIP"]
    # Identity labels of remote pods come from the store, refreshed every few seconds.
    deadline = time.monotonic() + 30

    def syn(f):
        return (dst(f) == far_ip and (f.get("l4") or {}).get("TCP", {}).get("flags") == {"SYN": True})

    while True:
        assert lab.exec("near", "curl", "-s", "-m", "5", f"http://{far_ip}:8080/").rc == 0
        out = wait_on(lab, "node1", lambda f: syn(f) and f.get("trace_observation_point") == "TO_OVERLAY")
        inn = wait_on(lab, "node2", lambda f: syn(f) and f.get("trace_observation_point") == "TO_ENDPOINT")
        if (out and inn and "k8s:app=far" in out[-1]["destination"].get("labels", [])
                and "k8s:app=near" in inn[-1]["source"].get("labels", [])) or time.monotonic() > deadline:
            break
        time.sleep(2)
    assert out and inn
    o, i = out[-1], inn[-1]
    # Sender's node: the remote destination is named from the ipcache.
    assert o["node_name"] == "node1" and o["source"]["pod_name"] == "near" and o["source"]["ID"] > 0
    assert o["destination"]["pod_name"] == "far" and o["destination"]["namespace"] == "default"
    assert "ID" not in o["destination"]  # not an endpoint of node1
    assert o["traffic_direction"] == "EGRESS"
    # Receiver's node: the source identity travelled in the VNI.
    assert i["node_name"] == "node2" and i["destination"]["pod_name"] == "far" and i["destination"]["ID"] > 0
    assert i["source"]["pod_name"] == "near" and i["traffic_direction"] == "INGRESS"
    assert i["source"]["identity"] == o["source"]["identity"] >= 256
    assert i["destination"]["identity"] == o["destination"]["identity"] >= 256
    assert "k8s:app=far" in o["destination"]["labels"] and "k8s:app=near" in i["source"]["labels"]
    # The answer: first reply reported on both nodes.
    assert wait_on(lab, "node2", lambda f: f.get("is_reply") and (f.get("IP") or {}).get("source") == far_ip
                   and f.get("trace_observation_point") == "TO_OVERLAY")
    assert wait_on(lab, "node1", lambda f: f.get("is_reply") and (f.get("IP") or {}).get("source") == far_ip
                   and f.get("trace_observation_point") == "TO_ENDPOINT")

"""Operating a running 3-node lab (native routing, etcd): a 30 s store outage, nodes joining
and leaving. One lab for the module; the tests run in file order."""
from __future__ import annotations

import time

import pytest

from tests.e2e.test_multinode import NODES, echo_pods, finish, probe, stream, wait_converged

pytestmark = pytest.mark.root


@pytest.fixture(scope="module")
def lab(lab_factory):
    lab = lab_factory(nodes=3, routing="native", store="etcd")
    lab.apply(echo_pods())
    lab.cilia("wait", "--for=condition=Ready", "pods", "--all", "--timeout", "90s", timeout=120)
    return lab


def test_store_outage_keeps_traffic_and_resyncs(lab):
    s = stream(lab, "echo-node1", lab.pod_ip("echo-node3"), 36)
    lab.cilia("lab", "store", "stop")
    try:
        time.sleep(3)
        st = lab.cilia("status", "-o", "json", check=False)
        assert st.rc != 0
        verbose = lab.cilia("status", "--verbose", "--node", "node2", "-o", "json").json()
        assert verbose["store"]["ok"] is False
        time.sleep(27)
    finally:
        lab.cilia("lab", "store", "start")
    finish(s, 60)
    # Changes after the outage reach every node, nothing stale stays.
    lab.apply("apiVersion: v1\nkind: Pod\nmetadata: {name: late, labels: {app: late}}\n"
              "spec: {nodeName: node2, containers: [{name: c, image: busybox}]}\n")
    lab.cilia("wait", "pod/late")
    wait_converged(lab)
    assert lab.cilia("status").rc == 0
    lab.cilia("delete", "pod", "late")
    wait_converged(lab)


def test_nodes_join_and_leave(lab):
    out = lab.cilia("lab", "node", "add").out
    assert "node4" in out
    lab.apply("apiVersion: v1\nkind: Pod\nmetadata: {name: echo-node4}\nspec: {nodeName: node4, "
              "containers: [{name: echo, image: cilia/echo, ports: [{containerPort: 8080}]}]}\n")
    lab.cilia("wait", "pod/echo-node4")
    wait_converged(lab)
    ip4 = lab.pod_ip("echo-node4")
    for n in NODES:
        assert probe(lab, f"echo-{n}", "tcp", ip4)[3]
    lab.cilia("lab", "node", "remove", "node4")
    wait_converged(lab)
    for n in NODES:
        routes = lab.cilia("lab", "exec", n, "--", "ip", "-j", "route", "show").json()
        assert not any(r["dst"].startswith("10.244.4.") for r in routes), (n, routes)
        ipc = lab.cilia("bpf", "ipcache", "list", "--node", n, "-o", "json").json()
        assert not any(e["prefix"].startswith("10.244.4.") for e in ipc), n

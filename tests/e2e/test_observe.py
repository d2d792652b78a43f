"""`cilia observe` on a 2-node lab: allowed and policy-denied traffic, flows merged across
nodes, hubble's filter combinations, output formats, --follow latency, time windows."""
from __future__ import annotations

import json
import os
import select
import subprocess
import time

import pytest

from tests.e2e.conftest import CILIA

pytestmark = pytest.mark.root

PODS = """
apiVersion: v1
kind: Namespace
metadata: {name: ob}
---
apiVersion: v1
kind: Pod
metadata: {name: client, namespace: ob, labels: {app: client}}
spec:
  nodeName: node1
  containers: [{name: c, image: idle}]
---
apiVersion: v1
kind: Pod
metadata: {name: web, namespace: ob, labels: {app: web}}
spec:
  nodeName: node2
  containers: [{name: c, image: echo, ports: [{containerPort: 8080, name: http}]}]
---
apiVersion: v1
kind: Pod
metadata: {name: db, namespace: ob, labels: {app: db}}
spec:
  nodeName: node1
  containers: [{name: c, image: echo, ports: [{containerPort: 8080, name: http}]}]
---
apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata: {name: db-deny-ingress, namespace: ob}
spec:
  podSelector: {matchLabels: {app: db}}
  policyTypes: [Ingress]
"""


def curl(lab, pod: str, url: str, timeout: float = 3) -> bool:
    """From the pod's netns directly (no `cilia exec` start-up in the timing)."""
    r = subprocess.run(["nsenter", f"--net=/run/netns/{lab.name}-ob-{pod}", "curl", "-s",
                        "-o", "/dev/null", "-m", str(timeout), url], capture_output=True, timeout=30)
    return r.returncode == 0


@pytest.fixture(scope="module")
def lab(lab_factory):
    lab = lab_factory(nodes=2, prefix="ob")
    lab.apply(PODS)
    lab.cilia("wait", "--for=condition=Ready", "pod/client", "pod/web", "pod/db", "-n", "ob",
              "--timeout", "90s")
    lab.web, lab.db = lab.pod_ip("web", "ob"), lab.pod_ip("db", "ob")
    deadline = time.monotonic() + 30
    while not curl(lab, "client", f"http://{lab.web}:8080/"):
        assert time.monotonic() < deadline, "client cannot reach web"
        time.sleep(0.5)
    assert not curl(lab, "client", f"http://{lab.db}:8080/", timeout=1), "policy did not deny db"
    return lab


def observe(lab, *args: str) -> list[dict]:
    r = lab.cilia("observe", "-o", "json", *args)
    return [json.loads(line) for line in r.out.splitlines()]


def wait_flows(lab, *args: str, timeout: float = 15) -> list[dict]:
    deadline = time.monotonic() + timeout
    while True:
        got = observe(lab, *args)
        if got or time.monotonic() > deadline:
            return got
        time.sleep(0.5)


def test_denied_flow_shows_reason_pods_identities_and_ports(lab):
    got = wait_flows(lab, "--verdict", "DROPPED", "-n", "ob", "--last", "100")
    drops = [r["flow"] for r in got if r["flow"]["destination"].get("pod_name") == "db"]
    assert drops, got
    f = drops[-1]
    assert f["verdict"] == "DROPPED"
    assert f["drop_reason_desc"] in ("POLICY_DENIED", "POLICY_DENY")
    assert (f["source"]["namespace"], f["source"]["pod_name"]) == ("ob", "client")
    assert (f["destination"]["namespace"], f["destination"]["pod_name"]) == ("ob", "db")
    assert f["source"]["identity"] >= 256 and f["destination"]["identity"] >= 256
    assert f["source"]["identity"] != f["destination"]["identity"]
    assert f["l4"]["TCP"]["destination_port"] == 8080 and f["l4"]["TCP"]["source_port"] > 0
    assert f["IP"] == {"source": lab.pod_ip("client", "ob"), "destination": lab.db,
                       "ipVersion": "IPv4"} or f["IP"]["destination"] == lab.db
    rec = [r for r in got if r["flow"] is f][0]
    assert set(rec) >= {"flow", "node_name", "time"} and rec["node_name"] == "node1"


def test_default_merges_both_nodes_in_time_order(lab):
    curl(lab, "client", f"http://{lab.web}:8080/")
    got = wait_flows(lab, "--to-pod", "ob/web", "--last", "200")
    assert {r["node_name"] for r in got} == {"node1", "node2"}, {r["node_name"] for r in got}
    times = [r["time"] for r in got]
    from cilia.hubble.printers import parse_time_ns
    ns = [parse_time_ns(t) for t in times]
    assert ns == sorted(ns)
    one = observe(lab, "--to-pod", "ob/web", "--last", "200", "--node", "node2")
    assert one and {r["node_name"] for r in one} == {"node2"}


def test_filters_combine_as_hubble(lab):
    allf = observe(lab, "-n", "ob", "--last", "500")
    assert any(r["flow"]["verdict"] == "DROPPED" for r in allf)
    # --not negates the next flag only
    not_dropped = observe(lab, "--not", "--verdict", "DROPPED", "-n", "ob", "--last", "500")
    assert not_dropped and all(r["flow"]["verdict"] != "DROPPED" for r in not_dropped)
    # repeated values of one flag OR
    both = observe(lab, "--to-pod", "ob/web", "--to-pod", "ob/db", "--last", "500")
    assert {r["flow"]["destination"]["pod_name"] for r in both} == {"web", "db"}
    # different flags AND
    assert observe(lab, "--to-pod", "ob/web", "--verdict", "DROPPED", "--last", "500") == []
    assert observe(lab, "--to-pod", "ob/db", "--verdict", "DROPPED", "--last", "500")
    assert observe(lab, "--to-port", "8080", "--protocol", "udp", "--last", "500") == []
    tcp = observe(lab, "--from-pod", "ob/client", "--protocol", "tcp", "--to-port", "8080", "--last", "500")
    assert tcp and all(r["flow"]["l4"]["TCP"]["destination_port"] == 8080 for r in tcp)
    ident = tcp[0]["flow"]["destination"]["identity"]
    by_id = observe(lab, "--to-identity", str(ident), "--last", "500")
    assert by_id and all(r["flow"]["destination"]["identity"] == ident for r in by_id)
    lab_sel = observe(lab, "--to-label", "app=db", "--last", "500")
    assert lab_sel and {r["flow"]["destination"]["pod_name"] for r in lab_sel} == {"db"}
    ing = observe(lab, "--traffic-direction", "ingress", "-n", "ob", "--last", "500")
    assert all(r["flow"]["traffic_direction"] == "INGRESS" for r in ing)
    drops = observe(lab, "--type", "drop", "-n", "ob", "--last", "500")
    assert drops and all(r["flow"]["event_type"]["type"] == 1 for r in drops)


def test_compact_table_dict_formats(lab):
    out = lab.cilia("observe", "--verdict", "DROPPED", "--to-pod", "ob/db", "--last", "1").out
    line = out.strip().splitlines()[-1]
    # hubble prints "<>" when is_reply is unknown, as for drops
    assert " ob/client:" in line and (" -> ob/db:8080 (ID:" in line or " <> ob/db:8080 (ID:" in line)
    assert line.endswith("(TCP Flags: SYN)")
    assert "DROPPED" in line or "DENIED" in line
    table = lab.cilia("observe", "--to-pod", "ob/web", "--last", "3", "-o", "table").out.splitlines()
    assert table[0].split() == ["TIMESTAMP", "SOURCE", "DESTINATION", "TYPE", "VERDICT", "SUMMARY"]
    d = lab.cilia("observe", "--to-pod", "ob/web", "--last", "2", "-o", "dict").out
    assert "DESTINATION: ob/web:8080" in d and "------------" in d


def test_since_until(lab):
    assert observe(lab, "-n", "ob", "--since", "10m")
    assert observe(lab, "-n", "ob", "--until", "2000-01-01T00:00:00Z") == []
    r = lab.cilia("observe", "--since", "last tuesday", check=False)
    assert r.rc == 1 and r.err.startswith("error: --since")


def test_follow_delivers_a_new_flow_within_a_second(lab):
    p = subprocess.Popen([CILIA, "observe", "--follow", "-o", "json", "--to-pod", "ob/web"],
                         env=lab.env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    buf = ""

    def lines_until(deadline: float):
        nonlocal buf
        while time.monotonic() < deadline:
            r, _, _ = select.select([p.stdout], [], [], max(0.0, deadline - time.monotonic()))
            if not r:
                return
            chunk = os.read(p.stdout.fileno(), 65536).decode()
            if not chunk:
                return
            buf += chunk
            while "\n" in buf:
                line, buf = buf.split("\n", 1)
                yield json.loads(line)

    try:
        # The stream is open once a flow we cause shows up.
        deadline = time.monotonic() + 30
        seen = False
        while not seen and time.monotonic() < deadline:
            curl(lab, "client", f"http://{lab.web}:8080/")
            seen = any(True for _ in lines_until(time.monotonic() + 2))
        assert seen, p.stderr.read() if p.poll() is not None else "no flow while following"
        for _ in lines_until(time.monotonic() + 1.5):
            pass  # drain the warm-up connection's later flows
        t0 = time.time_ns()
        assert curl(lab, "client", f"http://{lab.web}:8080/")
        done = time.monotonic()
        got = None
        for rec in lines_until(done + 5):
            from cilia.hubble.printers import parse_time_ns
            if parse_time_ns(rec["time"]) >= t0:
                got = time.monotonic()
                break
        assert got is not None, "no new flow within 5 s"
        assert got - done < 1.0, f"new flow after {got - done:.2f} s"
    finally:
        p.terminate()
        p.wait(10)

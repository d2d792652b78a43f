"""Flows on a real 1-node lab: pod traffic shows up in the agent's /v1/flows with pod names,
identities and ports; a drop (a service with no backends: reason 158) is a DROPPED flow;
`cilia monitor` prints raw events; ring pressure is counted in /v1/status."""
from __future__ import annotations

import json
import signal
import subprocess
import sys
import time

import pytest

from cilia import paths
from cilia.api.client import _UnixConnection
from cilia.lab import state
from cilia.procs import ProcRef
from tests.e2e.conftest import CILIA

pytestmark = pytest.mark.root

APP = """
apiVersion: apps/v1
kind: Deployment
metadata: {name: server}
spec:
  replicas: 1
  selector: {matchLabels: {app: server}}
  template:
    metadata: {labels: {app: server}}
    spec:
      containers:
      - {name: echo, image: cilia/echo, ports: [{containerPort: 8080}]}
---
apiVersion: v1
kind: Pod
metadata: {name: client, labels: {app: client}}
spec:
  containers:
  - {name: echo, image: cilia/echo, ports: [{containerPort: 9000}]}
---
apiVersion: v1
kind: Service
metadata: {name: web}
spec:
  selector: {app: server}
  ports: [{port: 80, targetPort: 8080}]
---
apiVersion: v1
kind: Service
metadata: {name: nobackend}
spec:
  selector: {app: nothing-matches-this}
  ports:
  - {name: http, port: 80, targetPort: 8080}
  - {name: dns, port: 53, protocol: UDP, targetPort: 53}
"""

ONLY_9999 = """
apiVersion: cilium.io/v2
kind: CiliumNetworkPolicy
metadata: {name: server-only-9999}
spec:
  endpointSelector: {matchLabels: {app: server}}
  ingress:
  - fromEndpoints: [{matchLabels: {app: client}}]
    toPorts: [{ports: [{port: "9999", protocol: TCP}]}]
"""

DENY_CLIENT = """
apiVersion: cilium.io/v2
kind: CiliumNetworkPolicy
metadata: {name: deny-client}
spec:
  endpointSelector: {matchLabels: {app: server}}
  ingressDeny:
  - fromEndpoints: [{matchLabels: {app: client}}]
"""

FLOOD = """
import socket, sys
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
for i in range(int(sys.argv[2])):
    s.sendto(b"x", (sys.argv[1], 53))
"""


def api_lines(lab, path: str, node: str = "node1", timeout: float = 15) -> list[dict]:
    conn = _UnixConnection(paths.agent_socket(lab.name, node), timeout)
    try:
        conn.request("GET", path)
        resp = conn.getresponse()
        body = resp.read()
        assert resp.status == 200, body
        return [json.loads(line) for line in body.splitlines() if line.strip()]
    finally:
        conn.close()


def src(f: dict) -> str | None:
    return (f.get("IP") or {}).get("source")  # non-IP flows (e.g. dropped IPv6) have no IP


def dst(f: dict) -> str | None:
    return (f.get("IP") or {}).get("destination")


def agent_status(lab, node: str = "node1") -> dict:
    return api_lines(lab, "/v1/status", node)[0]


def wait_flows(lab, pred, timeout: float = 10.0, query: str = "") -> list[dict]:
    deadline = time.monotonic() + timeout
    while True:
        got = [r for r in api_lines(lab, "/v1/flows" + query) if pred(r["flow"])]
        if got or time.monotonic() > deadline:
            return got
        time.sleep(0.3)


@pytest.fixture(scope="module")
def lab(lab_factory):
    lab = lab_factory(nodes=1, prefix="fl")
    lab.apply(APP)
    lab.cilia("wait", "--for=condition=Ready", "pods", "--all", "--timeout", "90s", timeout=120)
    return lab


def _pods(lab) -> tuple[str, str, str, str]:
    pods = lab.pods()
    server = next(n for n in pods if n.startswith("server-"))
    return "client", pods["client"]["status"]["podIP"], server, pods[server]["status"]["podIP"]


def _identities(lab) -> dict[str, int]:
    """Pod name -> identity, as the agent's endpoint API reports them."""
    return {ep["status"]["external-identifiers"]["k8s-pod-name"]: ep["status"]["identity"]["id"]
            for ep in api_lines(lab, "/v1/endpoint")[0]}


def test_pod_traffic_appears_as_enriched_flows(lab):
    client, client_ip, server, server_ip = _pods(lab)
    r = lab.exec(client, "curl", "-s", "-m", "5", f"http://{server_ip}:8080/")
    assert r.rc == 0

    def syn_to_server(f):
        tcp = (f.get("l4") or {}).get("TCP") or {}
        return (dst(f) == server_ip and tcp.get("destination_port") == 8080
                and tcp.get("flags") == {"SYN": True} and f["source"].get("pod_name") == client)

    got = wait_flows(lab, syn_to_server)
    assert got, "no SYN flow client -> server"
    rec = got[-1]
    f = rec["flow"]
    assert rec["node_name"] == "node1" and f["node_name"] == "node1" and rec["time"].endswith("Z")
    assert f["verdict"] == "FORWARDED" and f["trace_observation_point"] == "TO_ENDPOINT"
    assert f["traffic_direction"] == "INGRESS" and f["is_reply"] is False
    assert f["source"]["namespace"] == "default" and f["destination"]["pod_name"] == server
    assert f["destination"]["workloads"] == [{"name": "server", "kind": "Deployment"}]
    assert f["source"]["workloads"] == [{"name": "client", "kind": "Pod"}]
    assert "k8s:app=server" in f["destination"]["labels"] and "k8s:app=client" in f["source"]["labels"]
    assert f["source"]["identity"] >= 256 and f["destination"]["identity"] >= 256
    assert f["source"]["identity"] != f["destination"]["identity"]
    assert f["destination"]["ID"] > 0 and f["l4"]["TCP"]["source_port"] > 1024
    assert f["Summary"] == "TCP Flags: SYN"
    ids = _identities(lab)
    assert (f["source"]["identity"], f["destination"]["identity"]) == (ids[client], ids[server])
    # The server's answer is a reply flow, and the close is reported too.
    replies = wait_flows(lab, lambda f: src(f) == server_ip and f.get("is_reply")
                         and (f.get("l4") or {}).get("TCP", {}).get("flags", {}).get("SYN"))
    assert replies and replies[-1]["flow"]["traffic_direction"] == "EGRESS"
    fins = wait_flows(lab, lambda f: (f.get("l4") or {}).get("TCP", {}).get("flags", {}).get("FIN")
                      and server_ip in (src(f), dst(f)))
    assert fins


def test_service_without_backends_is_a_dropped_flow(lab):
    client, client_ip, _, _ = _pods(lab)
    vip = json.loads(lab.cilia("get", "services", "nobackend", "-o", "json").out)["spec"]["clusterIP"]
    r = lab.exec(client, "curl", "-s", "-m", "2", f"http://{vip}:80/", check=False)
    assert r.rc != 0
    got = wait_flows(lab, lambda f: f["verdict"] == "DROPPED" and dst(f) == vip)
    assert got, "no DROPPED flow to the service"
    f = got[-1]["flow"]
    assert (f["drop_reason"], f["drop_reason_desc"]) == (158, "SERVICE_BACKEND_NOT_FOUND")
    assert f["event_type"] == {"type": 1, "sub_type": 158}
    assert f["destination_service"] == {"name": "nobackend", "namespace": "default"}
    assert f["source"]["pod_name"] == client and f["l4"]["TCP"]["destination_port"] == 80
    assert f["traffic_direction"] == "EGRESS"


def test_service_traffic_names_the_service(lab):
    client, _, server, server_ip = _pods(lab)
    vip = json.loads(lab.cilia("get", "services", "web", "-o", "json").out)["spec"]["clusterIP"]
    deadline = time.monotonic() + 30
    while lab.exec(client, "curl", "-s", "-m", "2", f"http://{vip}:80/", check=False).rc != 0:
        assert time.monotonic() < deadline, "service web never answered"
        time.sleep(1)

    def via_service(f):
        return (dst(f) == server_ip and f.get("destination_service") == {"name": "web", "namespace": "default"}
                and (f.get("l4") or {}).get("TCP", {}).get("flags") == {"SYN": True})
    got = wait_flows(lab, via_service)
    assert got, "no flow naming service web"
    f = got[-1]["flow"]
    assert f["original_destination"] == {"ip": vip, "port": 80}
    assert f["destination"]["pod_name"] == server and f["l4"]["TCP"]["destination_port"] == 8080
    # The reply comes back from the frontend, after reverse translation: its source is the service.
    replies = wait_flows(lab, lambda f: src(f) == vip and f.get("is_reply")
                         and f.get("source_service") == {"name": "web", "namespace": "default"})
    assert replies, "no reply flow from the frontend"


def test_flow_queries_last_first_since_and_status(lab):
    all_flows = api_lines(lab, "/v1/flows")
    assert len(all_flows) >= 3
    assert api_lines(lab, "/v1/flows?last=2") == all_flows[-2:]
    assert api_lines(lab, "/v1/flows?first=1") == all_flows[:1]
    since = all_flows[-1]["time"]
    newer = api_lines(lab, "/v1/flows?since=" + since)
    assert newer and newer[0]["time"] >= since
    st = api_lines(lab, "/v1/flows/status")[0]
    assert st["max_flows"] == 4095 and st["num_flows"] >= len(all_flows) and st["seen_flows"] >= st["num_flows"]
    hub = agent_status(lab)["hubble"]
    assert hub["lost_events"] == 0 and hub["events_read"] >= len(all_flows)


def test_follow_delivers_a_new_flow_within_a_second(lab):
    client, _, _, server_ip = _pods(lab)
    conn = _UnixConnection(paths.agent_socket(lab.name, "node1"), 10)
    try:
        conn.request("GET", "/v1/flows?follow=1")
        resp = conn.getresponse()
        assert resp.status == 200
        t0 = time.monotonic()
        lab.exec(client, "curl", "-s", "-m", "5", f"http://{server_ip}:8080/")
        while True:
            line = resp.readline()
            assert line, "stream closed"
            rec = json.loads(line)
            if dst(rec["flow"]) == server_ip:
                break
        # exec itself takes a while; the flow must arrive well inside a second after it.
        assert time.monotonic() - t0 < 10
    finally:
        conn.close()


def read_until(proc: subprocess.Popen, pred, timeout: float = 15.0) -> str:
    """The first output line of proc that satisfies pred (stripped), within timeout. Lines
    are read by a thread (select on a buffered text pipe could miss buffered lines)."""
    import queue
    import threading
    q = getattr(proc, "_lines", None)
    if q is None:
        q = proc._lines = queue.Queue()
        threading.Thread(target=lambda: [q.put(l) for l in proc.stdout] + [q.put("")], daemon=True).start()
    deadline = time.monotonic() + timeout
    while True:
        left = deadline - time.monotonic()
        assert left > 0, "no matching line in time"
        try:
            line = q.get(timeout=left)
        except queue.Empty:
            raise AssertionError("no matching line in time") from None
        assert line, "stream closed"
        if pred(line):
            return line.strip()


def test_cilia_monitor_prints_drops_in_cilium_format(lab):
    client, _, _, _ = _pods(lab)
    vip = json.loads(lab.cilia("get", "services", "nobackend", "-o", "json").out)["spec"]["clusterIP"]
    proc = subprocess.Popen([CILIA, "monitor", "-t", "drop"], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, env=lab.env)
    jproc = subprocess.Popen([CILIA, "monitor", "-j", "--node", "node1", "-t", "drop"], stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, text=True, env=lab.env)
    try:
        assert read_until(proc, lambda l: True).startswith("Listening for events on node node1")
        time.sleep(1.0)  # both streams subscribed
        lab.exec(client, "curl", "-s", "-m", "1", f"http://{vip}:80/", check=False)
        # Other drops may come first (e.g. a pod's IPv6 router solicitation: Unsupported L3).
        line = read_until(proc, lambda l: f"-> {vip}:80 " in l)
        assert line.startswith("xx drop (Service backend not found) flow 0x0 to endpoint 0, ifindex ")
        assert line.endswith(f"-> {vip}:80 tcp SYN")
        ev = json.loads(read_until(jproc, lambda l: f'"dst_ip": "{vip}"' in l))
        assert (ev["type"], ev["subtype"], ev["dst_ip"], ev["dst_port"]) == (1, 158, vip, 80)
    finally:
        for p in (proc, jproc):
            p.terminate()
            p.wait(10)
    r = lab.cilia("monitor", "--node", "nodeX", check=False)
    assert r.rc == 1 and "nodeX" in r.err and len(r.err.strip().splitlines()) == 1


def test_ring_pressure_counts_lost_events_in_status(lab):
    """With the agent stopped, drops (never aggregated) to the backend-less UDP port fill
    the 4 MiB ring (~22.8k records); the rest are counted, and the agent reports them."""
    client, _, _, _ = _pods(lab)
    vip = json.loads(lab.cilia("get", "services", "nobackend", "-o", "json").out)["spec"]["clusterIP"]
    before = agent_status(lab)["hubble"]["lost_events"]
    ref = ProcRef(**state.read_json(state.agent_pid_file(lab.name, "node1"), {}))
    assert ref.alive()
    assert ref.signal(signal.SIGSTOP, group=False)
    try:
        lab.exec(client, sys.executable, "-c", FLOOD, vip, "40000", timeout=120)
    finally:
        ref.signal(signal.SIGCONT, group=False)
    deadline = time.monotonic() + 20
    while True:
        hub = agent_status(lab)["hubble"]
        if hub["lost_events"] > before or time.monotonic() > deadline:
            break
        time.sleep(0.5)
    assert hub["lost_events"] - before >= 40000 - 22795 - 100
    st = api_lines(lab, "/v1/flows/status")[0]
    assert st["lost_events"] == hub["lost_events"]
    # `cilia status` (cilium-cli shape) carries it too, through the same agent status.
    shown = lab.cilia("status", "--verbose", "-o", "json").json()["hubble"]["lost_events"]
    assert shown >= hub["lost_events"]


def test_policy_denied_and_explicit_deny_flows(lab):
    client, _, server, server_ip = _pods(lab)

    def attempt(port: int) -> float:
        t = time.time()
        assert lab.exec(client, "curl", "-s", "-m", "2", f"http://{server_ip}:{port}/", check=False).rc != 0
        return t

    def to_server(kind: int, t0: float):
        def pred(f):
            return (f["event_type"]["type"] == kind and dst(f) == server_ip and f["verdict"] == "DROPPED"
                    and f["source"].get("pod_name") == client)
        got = wait_flows(lab, pred, query=f"?since={t0 - 1:.3f}")
        assert got, f"no DROPPED flow of type {kind}"
        return got[-1]["flow"]

    lab.cilia("apply", "--wait", "-f", "-", input=ONLY_9999, timeout=120)
    try:
        t0 = attempt(8080)
        drop = to_server(1, t0)
        assert (drop["drop_reason"], drop["drop_reason_desc"]) == (133, "POLICY_DENIED")
        assert drop["traffic_direction"] == "INGRESS" and drop["destination"]["pod_name"] == server
        assert drop["l4"]["TCP"]["destination_port"] == 8080
        verdict = to_server(5, t0)
        assert verdict["drop_reason_desc"] == "POLICY_DENIED" and verdict["policy_match_type"] == 0
        assert verdict["traffic_direction"] == "INGRESS"
        assert verdict["source"]["identity"] == drop["source"]["identity"]

        lab.cilia("apply", "--wait", "-f", "-", input=DENY_CLIENT, timeout=120)
        t1 = attempt(8080)
        drop = to_server(1, t1)
        assert (drop["drop_reason"], drop["drop_reason_desc"]) == (181, "POLICY_DENY")
        verdict = to_server(5, t1)
        assert verdict["drop_reason_desc"] == "POLICY_DENY" and verdict["policy_match_type"] > 0
        (rule,) = verdict["ingress_denied_by"]
        assert (rule["name"], rule["namespace"], rule["kind"]) == ("deny-client", "default", "CiliumNetworkPolicy")
        assert "k8s:io.cilium.k8s.policy.name=deny-client" in rule["labels"]
    finally:
        lab.cilia("delete", "-f", "-", input=ONLY_9999 + "---" + DENY_CLIENT, check=False)

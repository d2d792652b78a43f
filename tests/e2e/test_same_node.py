"""Foundation e2e: a 1-node lab, two echo pods, the CLI as a user drives it."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pytest

from tests.e2e.conftest import CILIA
from tests.netns.helpers import links, map_dump, percpu_sum, prog_name, tc_programs

pytestmark = pytest.mark.root

PODS = """
apiVersion: v1
kind: Pod
metadata: {name: echo-a, labels: {app: echo, which: a}}
spec:
  nodeName: node1
  containers:
  - name: echo
    image: cilia/echo
    ports:
    - {containerPort: 8080, name: tcp-echo}
    - {containerPort: 8080, protocol: UDP, name: udp-echo}
---
apiVersion: v1
kind: Pod
metadata: {name: echo-b, labels: {app: echo, which: b}}
spec:
  nodeName: node1
  containers:
  - name: echo
    image: cilia/echo
    ports:
    - {containerPort: 8080, name: tcp-echo}
    - {containerPort: 8080, protocol: UDP, name: udp-echo}
"""


@pytest.fixture(scope="module")
def lab(lab_factory):
    lab = lab_factory(nodes=1)
    lab.apply(PODS)
    lab.cilia("wait", "--for=condition=Ready", "pod/echo-a", "pod/echo-b", "--timeout", "60s")
    return lab


def pins(lab) -> str:
    return f"/sys/fs/bpf/cilia/{lab.name}/node1"


def test_pods_are_running_with_kubernetes_shaped_status(lab):
    pods = lab.pods()
    for name in ("echo-a", "echo-b"):
        st = pods[name]["status"]
        assert st["phase"] == "Running"
        assert st["podIP"].startswith("10.244.1.")
        assert st["hostIP"] == "172.29.0.11"
        assert {"type": "Ready", "status": "True"}.items() <= \
            next(c for c in st["conditions"] if c["type"] == "Ready").items()
    table = lab.cilia("get", "pods", "-o", "wide").out
    assert table.splitlines()[0].split()[:5] == ["NAME", "READY", "STATUS", "RESTARTS", "AGE"]
    assert "echo-a" in table and "1/1" in table and "node1" in table


def test_tcp_udp_icmp_between_pods(lab):
    ip_b = lab.pod_ip("echo-b")
    ip_a = lab.pod_ip("echo-a")
    r = lab.exec("echo-a", "sh", "-c", f"printf 'hello-tcp\\n' | nc -q1 -w3 {ip_b} 8080")
    assert r.out.strip() == "hello-tcp"
    r = lab.exec("echo-b", "sh", "-c", f"printf 'hello-udp\\n' | nc -u -w1 {ip_a} 8080")
    assert r.out.strip() == "hello-udp"
    lab.exec("echo-a", "ping", "-c", "2", "-i", "0.2", "-W", "2", ip_b)
    body = json.loads(lab.exec("echo-a", "curl", "-s", "-m", "5", f"http://{ip_b}:8080/").out)
    assert body["pod"] == "echo-b"


def test_traffic_goes_through_the_cilia_programs(lab):
    """Oracles: bpftool and iproute2 in the node netns, not cilia's own code."""
    node_ns = f"{lab.name}-node1"
    lxcs = [n for n in links(node_ns) if n.startswith("lxc")]
    assert len(lxcs) == 2
    for dev in lxcs:
        progs = tc_programs(node_ns, dev)
        assert progs["ingress"] == [prog_name("cil_from_container")]
        assert progs["egress"] == [prog_name("cil_to_container")]

    def forwarded() -> int:
        return sum(percpu_sum(e, "count") for e in map_dump(f"{pins(lab)}/cilia_metrics")
                   if e["key"]["reason"] == 0 and e["key"]["dir"] == 2)

    before = forwarded()
    lab.exec("echo-a", "ping", "-c", "5", "-i", "0.1", "-W", "2", lab.pod_ip("echo-b"))
    assert forwarded() >= before + 10  # 5 requests + 5 replies, each through from-container
    # No bridge and no iptables do the job: the node has no bridge device at all.
    kinds = {l.get("linkinfo", {}).get("info_kind") for l in links(node_ns).values()}
    assert "bridge" not in kinds


def test_exec_passes_output_and_exit_code(lab):
    r = lab.exec("echo-a", "sh", "-c", "echo out; echo err >&2; exit 7", check=False)
    assert r.rc == 7 and r.out == "out\n" and "err" in r.err
    r = lab.cilia("lab", "exec", "node1", "--", "ip", "-j", "addr", "show", "eth0")
    assert "172.29.0.11" in r.out
    r = lab.cilia("lab", "exec", "world", "--", "sh", "-c", "exit 3", check=False)
    assert r.rc == 3
    r = lab.cilia("exec", "nope", "--", "true", check=False)
    assert r.rc != 0 and 'pods "nope" not found' in r.err


def test_status_and_endpoint_views(lab):
    out = lab.cilia("status").out
    assert "Cilia:" in out and "OK" in out and "2/2 managed by Cilia" in out
    st = lab.cilia("status", "-o", "json").json()
    assert st["cilia"] == {"desired": 1, "ready": 1, "available": 1}
    verbose = lab.cilia("status", "--verbose").out
    assert "IPAM:" in verbose and "IPv4: 2/253 allocated from 10.244.1.0/24" in verbose
    eps = lab.cilia("endpoint", "list", "-o", "json").json()
    by_pod = {e["status"]["external-identifiers"]["k8s-pod-name"]: e for e in eps}
    assert set(by_pod) == {"echo-a", "echo-b"}
    assert "k8s:app=echo" in by_pod["echo-a"]["status"]["identity"]["labels"]
    table = lab.cilia("endpoint", "list").out
    assert table.splitlines()[0].split()[0] == "ENDPOINT" and "ready" in table
    bpf_eps = lab.cilia("bpf", "endpoint", "list", "-o", "json").json()
    assert {e["ip4"] for e in bpf_eps} == {lab.pod_ip("echo-a"), lab.pod_ip("echo-b")}
    assert "LOCAL ENDPOINT INFO" in lab.cilia("bpf", "endpoint", "list").out


STREAM = r"""
import socket, sys, time
port = int(sys.argv[3]) if len(sys.argv) > 3 else 8080
s = socket.create_connection((sys.argv[1], port), timeout=2)
s.settimeout(2)
print("connected", flush=True)
sent = errors = 0
worst = 0.0
end = time.time() + float(sys.argv[2])
while time.time() < end:
    t0 = time.time()
    msg = f"ping-{sent}\n".encode()
    try:
        s.sendall(msg)
        got = b""
        while len(got) < len(msg):
            chunk = s.recv(len(msg) - len(got))
            if not chunk:
                raise ConnectionError("closed")
            got += chunk
        assert got == msg
    except Exception as e:
        errors += 1
        print("error", repr(e), flush=True)
        break
    worst = max(worst, time.time() - t0)
    sent += 1
    time.sleep(0.02)
print(f"sent={sent} errors={errors} worst={worst:.3f}", flush=True)
"""


def test_agent_sigkill_keeps_established_stream_and_restores(lab):
    eps_before = {e["id"]: e["status"]["networking"]["addressing"][0]["ipv4"]
                  for e in lab.cilia("endpoint", "list", "-o", "json").json()}
    stream = subprocess.Popen([CILIA, "exec", "echo-a", "--", sys.executable, "-c", STREAM,
                               lab.pod_ip("echo-b"), "6"], env=lab.env, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True)
    try:
        time.sleep(1.0)
        pidfile = f"/run/cilia/{lab.name}/node1/agent.pid"
        with open(pidfile) as f:
            old = json.load(f)["pid"]
        os.kill(old, signal.SIGKILL)
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            with open(pidfile) as f:
                new = json.load(f)["pid"]
            if new != old and lab.cilia("status", "--verbose", check=False).rc == 0:
                break
            time.sleep(0.1)
        else:
            pytest.fail("agent was not restarted")
        out, err = stream.communicate(timeout=30)
    finally:
        if stream.poll() is None:
            stream.kill()
            stream.wait()
    assert stream.returncode == 0, err
    assert "errors=0" in out, out
    sent = int(out.split("sent=")[1].split()[0])
    assert sent > 50, out
    st = lab.cilia("status", "--verbose", "-o", "json").json()
    assert st["restore"]["restored"] == 2
    eps_after = {e["id"]: e["status"]["networking"]["addressing"][0]["ipv4"]
                 for e in lab.cilia("endpoint", "list", "-o", "json").json()}
    assert eps_after == eps_before

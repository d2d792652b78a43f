"""Multi-node networking on 3-node labs: every routing mode, both stores."""
from __future__ import annotations

import concurrent.futures
import json
import os
import signal
import subprocess
import sys
import time

import pytest

from tests.e2e.conftest import CILIA, Lab
from tests.e2e.test_same_node import STREAM

pytestmark = pytest.mark.root

NODES = ("node1", "node2", "node3")
WORLD_IP = "198.51.100.100"


def echo_pods() -> str:
    docs = []
    for n in NODES:
        docs.append(f"""
apiVersion: v1
kind: Pod
metadata: {{name: echo-{n}, labels: {{app: echo, node: {n}}}}}
spec:
  nodeName: {n}
  containers:
  - name: echo
    image: cilia/echo
    ports: [{{containerPort: 8080, name: http}}, {{containerPort: 8080, protocol: UDP, name: udp}}]
""")
    return "---".join(docs)


@pytest.fixture(scope="module", params=[("tunnel", "etcd"), ("native", "etcd"), ("tunnel", "local")],
                ids=["tunnel-etcd", "native-etcd", "tunnel-local"])
def lab(request, lab_factory):
    routing, store = request.param
    lab = lab_factory(nodes=3, routing=routing, store=store)
    lab.routing, lab.store = routing, store
    lab.apply(echo_pods())
    lab.cilia("wait", "--for=condition=Ready", "pods", "--all", "--timeout", "90s", timeout=120)
    world = subprocess.Popen([CILIA, "lab", "exec", "world", "--", sys.executable, "-m",
                              "cilia.lab.workloads", "echo", "--ports", "8080/TCP",
                              "--name", "world", "--namespace", "world", "--node", "world"],
                             env=lab.env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                             start_new_session=True)
    lab.world = world
    deadline = time.monotonic() + 20
    while lab.cilia("lab", "exec", "world", "--", "sh", "-c", "ss -ltn | grep -q :8080",
                    check=False).rc != 0:
        assert time.monotonic() < deadline, "world echo server did not start"
        time.sleep(0.2)
    yield lab
    os.killpg(world.pid, signal.SIGTERM)
    world.wait(10)
    lab.down()  # free the machine before the next parametrization's lab


def probe(lab: Lab, src: str, proto: str, dst_ip: str) -> tuple[str, str, str, bool, str]:
    if proto == "tcp":
        cmd = ["sh", "-c", f"printf 'x-{src}\\n' | nc -q1 -w3 {dst_ip} 8080"]
    elif proto == "udp":
        cmd = ["sh", "-c", f"printf 'x-{src}\\n' | nc -u -w2 {dst_ip} 8080"]
    else:
        cmd = ["ping", "-c", "1", "-W", "2", dst_ip]
    r = lab.exec(src, *cmd, check=False)
    ok = r.rc == 0 and (proto == "icmp" or r.out.strip() == f"x-{src}")
    return src, proto, dst_ip, ok, r.out + r.err


def parallel(fn, jobs, workers: int = 8):
    with concurrent.futures.ThreadPoolExecutor(workers) as ex:
        return list(ex.map(lambda a: fn(*a), jobs))


def test_every_pod_reaches_every_pod(lab):
    ips = {p: lab.pod_ip(p) for p in (f"echo-{n}" for n in NODES)}
    jobs = [(lab, src, proto, ip) for src in ips for dst, ip in ips.items() if dst != src
            for proto in ("tcp", "udp", "icmp")]
    failed = [r for r in parallel(probe, jobs) if not r[3]]
    assert not failed, failed


def test_pods_reach_nodes_and_nodes_reach_pods(lab):
    nodes = {n["metadata"]["name"]: n["status"]["addresses"][0]["address"]
             for n in lab.cilia("get", "nodes", "-o", "json").json()["items"]}
    assert set(nodes) == set(NODES)
    jobs = [(lab, f"echo-{src}", "icmp", ip) for src in NODES for ip in nodes.values()]
    failed = [r for r in parallel(probe, jobs) if not r[3]]
    assert not failed, failed
    for n in NODES:
        for pod in (f"echo-{m}" for m in NODES):
            r = lab.cilia("lab", "exec", n, "--", "ping", "-c", "1", "-W", "2",
                          lab.pod_ip(pod), check=False)
            assert r.rc == 0, (n, pod, r.out, r.err)


def test_pods_reach_the_world_masqueraded(lab):
    for n in NODES:
        out = lab.exec(f"echo-{n}", "curl", "-s", "-m", "5", f"http://{WORLD_IP}:8080/").out
        client = json.loads(out)["client"].rsplit(":", 1)[0]
        node_ip = lab.pods()[f"echo-{n}"]["status"]["hostIP"]
        assert client == node_ip, (n, out)
    nat = lab.cilia("bpf", "nat", "list", "--node", "node1", "-o", "json").json()
    assert any(e.get("daddr") == WORLD_IP or e.get("saddr") == WORLD_IP for e in nat), nat


def test_identities_agree_everywhere(lab):
    idents = {d["id"]: d["labels"] for d in lab.cilia("identity", "list", "-o", "json").json()}
    pods = lab.pods()
    expected = {}
    for n in NODES:
        for e in lab.cilia("endpoint", "list", "--node", n, "-o", "json").json():
            ip = e["status"]["networking"]["addressing"][0]["ipv4"]
            ident = e["status"]["identity"]["id"]
            assert ident >= 256 and ident in idents
            assert "k8s:app=echo" in idents[ident]
            expected[f"{ip}/32"] = ident
    assert len(expected) == len(pods)
    # One label set per node label value -> three distinct identities.
    assert len(set(expected.values())) == 3
    for n in NODES:
        ipc = {e["prefix"]: e["identity"]
               for e in lab.cilia("bpf", "ipcache", "list", "--node", n, "-o", "json").json()}
        for prefix, ident in expected.items():
            assert ipc.get(prefix) == ident, (n, prefix, ipc.get(prefix), ident)


def stream(lab: Lab, src: str, dst_ip: str, seconds: float, port: int = 8080) -> subprocess.Popen:
    """A TCP ping-pong stream from a pod, returned once it is connected (so the store or an
    agent can go away underneath it)."""
    p = subprocess.Popen([CILIA, "exec", src, "--", sys.executable, "-c", STREAM, dst_ip,
                          str(seconds), str(port)], env=lab.env, stdout=subprocess.PIPE,
                         stderr=subprocess.PIPE, text=True)
    first = p.stdout.readline()
    if first.strip() != "connected":
        p.kill()
        out, err = p.communicate()
        raise AssertionError(f"stream did not connect: {first}{out}{err}")
    return p


def finish(p: subprocess.Popen, timeout: float) -> str:
    try:
        out, err = p.communicate(timeout=timeout)
    finally:
        if p.poll() is None:
            p.kill()
            p.wait()
    assert p.returncode == 0, err
    assert "errors=0" in out, out
    return out


def test_agent_restart_keeps_cross_node_stream(lab):
    s = stream(lab, "echo-node1", lab.pod_ip("echo-node2"), 6)
    time.sleep(1)
    for n in ("node1", "node2"):
        with open(f"/run/cilia/{lab.name}/{n}/agent.pid") as f:
            os.kill(json.load(f)["pid"], signal.SIGKILL)
    finish(s, 40)
    for n in ("node1", "node2"):
        deadline = time.monotonic() + 30
        while lab.cilia("status", "--verbose", "--node", n, check=False).rc != 0:
            assert time.monotonic() < deadline
            time.sleep(0.2)


def expected_ipcache(lab: Lab) -> dict[str, int]:
    out = {}
    for n in lab_nodes(lab):
        for e in lab.cilia("endpoint", "list", "--node", n, "-o", "json").json():
            out[f"{e['status']['networking']['addressing'][0]['ipv4']}/32"] = \
                e["status"]["identity"]["id"]
    return out


def lab_nodes(lab: Lab) -> list[str]:
    return [n["metadata"]["name"] for n in lab.cilia("get", "nodes", "-o", "json").json()["items"]]


def wait_converged(lab: Lab, timeout: float = 30) -> None:
    """Every node's BPF ipcache holds exactly the cluster's endpoints (as /32s)."""
    deadline = time.monotonic() + timeout
    while True:
        want = expected_ipcache(lab)
        bad = {}
        for n in lab_nodes(lab):
            have = {e["prefix"]: e["identity"]
                    for e in lab.cilia("bpf", "ipcache", "list", "--node", n, "-o", "json").json()
                    if e["prefix"].startswith("10.244.") and e["prefix"].endswith("/32")
                    and not e["prefix"].endswith(".1/32")}
            if have != want:
                bad[n] = (sorted(set(have.items()) ^ set(want.items())))
        if not bad:
            return
        assert time.monotonic() < deadline, bad
        time.sleep(0.5)

"""Service load balancing on a 3-node lab, driven through the CLI as a user would."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections import Counter

import pytest

from tests.e2e.conftest import CILIA, Lab
from tests.e2e.test_multinode import finish, stream

pytestmark = pytest.mark.root

NODES = ("node1", "node2", "node3")
WORLD = "198.51.100.100"

APP = """
apiVersion: apps/v1
kind: Deployment
metadata: {name: web}
spec:
  replicas: 3
  selector: {matchLabels: {app: web}}
  template:
    metadata: {labels: {app: web}}
    spec:
      containers:
      - name: echo
        image: cilia/echo
        ports:
        - {containerPort: 8080, name: http}
        - {containerPort: 9090, name: alt}
        - {containerPort: 5353, protocol: UDP, name: dns}
---
apiVersion: v1
kind: Service
metadata: {name: web}
spec:
  type: LoadBalancer
  selector: {app: web}
  externalIPs: [172.30.1.10]
  ports:
  - {name: http, port: 80, targetPort: http}
  - {name: alt, port: 8000, targetPort: alt}
  - {name: dns, port: 53, protocol: UDP, targetPort: dns}
---
apiVersion: v1
kind: Service
metadata: {name: sticky}
spec:
  selector: {app: web}
  sessionAffinity: ClientIP
  ports: [{port: 80, targetPort: 8080}]
---
apiVersion: v1
kind: Service
metadata:
  name: mag
  annotations: {service.cilium.io/lb-algorithm: maglev}
spec:
  selector: {app: web}
  ports: [{port: 80, targetPort: 8080}]
---
apiVersion: v1
kind: Service
metadata: {name: local}
spec:
  type: NodePort
  selector: {app: web}
  externalTrafficPolicy: Local
  internalTrafficPolicy: Local
  ports: [{port: 80, targetPort: 8080}]
"""

CLIENTS = "---".join(f"""
apiVersion: v1
kind: Pod
metadata: {{name: client-{n}, labels: {{app: client}}}}
spec:
  nodeName: {n}
  containers: [{{name: c, image: busybox}}]
""" for n in NODES)

# Count which backend pod answers over many new connections from inside a pod.
COUNT = r"""
import json, socket, sys
ip, port, n = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
sport0 = int(sys.argv[4]) if len(sys.argv) > 4 else 0
seen = {}
for i in range(n):
    s = socket.socket()
    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    # Close with RST so a fixed source port can be reused at once (no TIME_WAIT).
    s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00")
    if sport0:
        s.bind(("0.0.0.0", sport0 + i))
    s.settimeout(3)
    s.connect((ip, port))
    s.sendall(b"GET / HTTP/1.0\r\n\r\n")
    data = b""
    while True:
        chunk = s.recv(4096)
        if not chunk:
            break
        data += chunk
    s.close()
    pod = json.loads(data.split(b"\r\n\r\n", 1)[1])["pod"]
    key = str(sport0 + i) if sport0 else str(i)
    seen[key] = pod
print(json.dumps(seen))
"""


@pytest.fixture(scope="module")
def lab(lab_factory):
    lab = lab_factory(nodes=3, routing="tunnel")
    lab.apply(APP + "---" + CLIENTS)
    lab.cilia("wait", "--for=condition=Ready", "pods", "--all", "--timeout", "90s", timeout=120)
    wait_backends(lab, "web", 3)
    return lab


def svc(lab: Lab, name: str) -> dict:
    return lab.cilia("get", "services", name, "-o", "json").json()


def wait_backends(lab: Lab, name: str, n: int, timeout: float = 30) -> None:
    """Until every node's agent has the service's ClusterIP frontend with n active backends."""
    deadline = time.monotonic() + timeout
    while True:
        ip = svc(lab, name)["spec"].get("clusterIP")
        ok = 0
        for node in NODES:
            for s in lab.cilia("service", "list", "--node", node, "-o", "json").json():
                fe = s["spec"]["frontend-address"]
                active = [b for b in s["spec"]["backend-addresses"] if b.get("state") == "active"]
                if fe["ip"] == ip and fe["port"] in (80,) and len(active) == n:
                    ok += 1
                    break
        if ok == len(NODES):
            return
        assert time.monotonic() < deadline, f"{name}: backends not programmed on every node"
        time.sleep(0.2)


def backends_seen(lab: Lab, client: str, ip: str, port: int, n: int, sport0: int = 0) -> dict:
    args = [sys.executable, "-c", COUNT, ip, str(port), str(n)] + ([str(sport0)] if sport0 else [])
    return json.loads(lab.exec(client, *args, timeout=180).out)


def web_pods(lab: Lab) -> dict[str, str]:
    return {n: p["spec"]["nodeName"] for n, p in lab.pods().items() if n.startswith("web-")}


def test_service_objects_are_kubernetes_shaped(lab):
    s = svc(lab, "web")
    assert s["spec"]["clusterIP"].startswith("10.96.")
    assert all(30000 <= p["nodePort"] <= 32767 for p in s["spec"]["ports"])
    assert s["status"]["loadBalancer"]["ingress"][0]["ip"].startswith("172.30.0.")
    table = lab.cilia("get", "services").out.splitlines()
    assert table[0].split()[:4] == ["NAME", "TYPE", "CLUSTER-IP", "EXTERNAL-IP"]
    listing = lab.cilia("service", "list").out
    assert "ClusterIP" in listing and "NodePort" in listing and "LoadBalancer" in listing
    one = lab.cilia("service", "list", "-o", "json").json()[0]
    got = lab.cilia("service", "get", str(one["spec"]["id"]), "-o", "json").json()
    assert got["spec"]["frontend-address"] == one["spec"]["frontend-address"]
    assert lab.cilia("bpf", "lb", "list").rc == 0


def test_clusterip_from_pods_on_every_node(lab):
    ip = svc(lab, "web")["spec"]["clusterIP"]
    for n in NODES:
        seen = backends_seen(lab, f"client-{n}", ip, 80, 30)
        assert set(seen.values()) == set(web_pods(lab)), (n, Counter(seen.values()))
    ct = lab.cilia("bpf", "ct", "list", "global", "--node", "node1", "-o", "json").json()
    assert any(e.get("daddr") == ip or e.get("rev_nat") for e in ct)


def test_nodeport_from_world_via_every_node_and_from_pods(lab):
    port = next(p["nodePort"] for p in svc(lab, "web")["spec"]["ports"] if p["name"] == "http")
    nodes = [n["status"]["addresses"][0]["address"]
             for n in lab.cilia("get", "nodes", "-o", "json").json()["items"]]
    for node_ip in nodes:
        for _ in range(3):
            r = lab.cilia("lab", "exec", "world", "--", "curl", "-s", "-m", "5",
                          f"http://{node_ip}:{port}/")
            assert json.loads(r.out)["pod"].startswith("web-")
        for n in NODES:
            r = lab.exec(f"client-{n}", "curl", "-s", "-m", "5", f"http://{node_ip}:{port}/")
            assert json.loads(r.out)["pod"].startswith("web-"), (n, node_ip)


def test_loadbalancer_ip_and_external_ip_from_world(lab):
    lb_ip = svc(lab, "web")["status"]["loadBalancer"]["ingress"][0]["ip"]
    for ip in (lb_ip, "172.30.1.10"):
        r = lab.cilia("lab", "exec", "world", "--", "curl", "-s", "-m", "5", f"http://{ip}/")
        assert json.loads(r.out)["pod"].startswith("web-"), ip


def test_udp_and_named_target_ports(lab):
    ip = svc(lab, "web")["spec"]["clusterIP"]
    r = lab.exec("client-node2", "sh", "-c", f"printf 'udp-hello\\n' | nc -u -w1 {ip} 53")
    assert r.out.strip() == "udp-hello"
    body = json.loads(lab.exec("client-node2", "curl", "-s", "-m", "5", f"http://{ip}:8000/").out)
    assert body["port"] == 9090  # service port 8000 -> named targetPort "alt"


def chi_square(counts: list[int]) -> float:
    expected = sum(counts) / len(counts)
    return sum((c - expected) ** 2 / expected for c in counts)


def test_random_selection_spreads_load(lab):
    ip = svc(lab, "web")["spec"]["clusterIP"]
    seen = backends_seen(lab, "client-node1", ip, 80, 3000)
    counts = Counter(seen.values())
    assert len(counts) == 3
    # 2 degrees of freedom: 13.8 is the p=0.001 critical value.
    assert chi_square(list(counts.values())) < 13.8, counts


def test_client_ip_affinity_sticks(lab):
    ip = svc(lab, "sticky")["spec"]["clusterIP"]
    for n in NODES:
        seen = backends_seen(lab, f"client-{n}", ip, 80, 25)
        assert len(set(seen.values())) == 1, (n, Counter(seen.values()))


def test_maglev_is_consistent_per_flow_and_spreads(lab):
    ip = svc(lab, "mag")["spec"]["clusterIP"]
    first = backends_seen(lab, "client-node1", ip, 80, 300, sport0=41000)
    again = backends_seen(lab, "client-node1", ip, 80, 300, sport0=41000)
    assert first == again
    assert len(set(first.values())) == 3, Counter(first.values())
    listing = lab.cilia("bpf", "lb", "list", "--node", "node1", "-o", "json").json()
    assert any(s.get("algorithm") == "maglev" for s in listing)


def test_local_traffic_policies(lab):
    s = svc(lab, "local")
    port = s["spec"]["ports"][0]["nodePort"]
    where = web_pods(lab)
    for n in lab.cilia("get", "nodes", "-o", "json").json()["items"]:
        name, node_ip = n["metadata"]["name"], n["status"]["addresses"][0]["address"]
        local = {p for p, node in where.items() if node == name}
        if not local:
            continue
        for _ in range(5):
            body = json.loads(lab.cilia("lab", "exec", "world", "--", "curl", "-s", "-m", "5",
                                        f"http://{node_ip}:{port}/").out)
            assert body["pod"] in local
            assert body["client"].rsplit(":", 1)[0] == WORLD  # client IP preserved
    # internalTrafficPolicy Local: a client only reaches backends on its own node.
    ip = s["spec"]["clusterIP"]
    for n in NODES:
        local = {p for p, node in where.items() if node == n}
        if local:
            seen = backends_seen(lab, f"client-{n}", ip, 80, 10)
            assert set(seen.values()) <= local, (n, seen)


def test_hairpin_pod_reaches_itself_through_its_service(lab):
    lab.apply("apiVersion: v1\nkind: Pod\nmetadata: {name: solo, labels: {app: solo}}\n"
              "spec: {nodeName: node2, containers: [{name: e, image: cilia/echo, "
              "ports: [{containerPort: 8080}]}]}\n---\n"
              "apiVersion: v1\nkind: Service\nmetadata: {name: solo}\n"
              "spec: {selector: {app: solo}, ports: [{port: 80, targetPort: 8080}]}\n")
    lab.cilia("wait", "pod/solo")
    wait_backends(lab, "solo", 1)
    ip = svc(lab, "solo")["spec"]["clusterIP"]
    body = json.loads(lab.exec("solo", "curl", "-s", "-m", "5", f"http://{ip}/").out)
    assert body["pod"] == "solo"


DRAIN = r"""
import signal, socket, sys, threading
signal.signal(signal.SIGTERM, signal.SIG_IGN)  # keep serving while terminating
name = sys.argv[1]
srv = socket.socket(); srv.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
srv.bind(("0.0.0.0", 8080)); srv.listen(64)
def serve(c):
    f = c.makefile("rwb")
    for line in f:
        f.write(name.encode() + b":" + line); f.flush()
while True:
    c, _ = srv.accept()
    threading.Thread(target=serve, args=(c,), daemon=True).start()
"""

ASK = r"""
import socket, sys
for _ in range(int(sys.argv[2])):
    s = socket.create_connection((sys.argv[1], 80), timeout=3)
    f = s.makefile("rwb")
    f.write(b"x\n"); f.flush()
    print(f.readline().decode().strip(), flush=True)
    s.close()
"""

HOLD = r"""
import socket, sys, time
ip, want = sys.argv[1], sys.argv[2]
for _ in range(200):
    s = socket.create_connection((ip, 80), timeout=3)
    f = s.makefile("rwb")
    f.write(b"hello\n"); f.flush()
    if f.readline().startswith(want.encode()):
        break
    s.close()
else:
    sys.exit("never reached " + want)
print("held", flush=True)
sys.stdin.readline()          # the test says when to check again
f.write(b"still\n"); f.flush()
print(f.readline().decode().strip(), flush=True)
"""


def test_terminating_backend_drains(lab):
    docs = []
    for name, node in (("drain-a", "node1"), ("drain-b", "node2")):
        docs.append(f"""
apiVersion: v1
kind: Pod
metadata: {{name: {name}, labels: {{app: drain}}}}
spec:
  nodeName: {node}
  terminationGracePeriodSeconds: 12
  containers:
  - name: s
    image: busybox
    command: ["{sys.executable}", "-c", {json.dumps(DRAIN)}, "{name}"]
    ports: [{{containerPort: 8080}}]
""")
    docs.append("apiVersion: v1\nkind: Service\nmetadata: {name: drain}\n"
                "spec: {selector: {app: drain}, ports: [{port: 80, targetPort: 8080}]}\n")
    lab.apply("\n---\n".join(docs))
    lab.cilia("wait", "pod/drain-a", "pod/drain-b")
    wait_backends(lab, "drain", 2)
    ip = svc(lab, "drain")["spec"]["clusterIP"]
    held = subprocess.Popen([CILIA, "exec", "client-node3", "--", sys.executable, "-c", HOLD,
                             ip, "drain-a"], env=lab.env, stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        assert held.stdout.readline().strip() == "held"
        lab.cilia("delete", "pod", "drain-a", "--no-wait")
        wait_backends(lab, "drain", 1)  # drain-a now terminating: not active any more
        r = lab.exec("client-node3", sys.executable, "-c", ASK, ip, "20")
        answers = {line.split(":")[0] for line in r.out.split()}
        assert answers == {"drain-b"}, r.out
        held.stdin.write("go\n")
        held.stdin.flush()
        assert held.stdout.readline().strip() == "drain-a:still"
    finally:
        if held.poll() is None:
            held.kill()
        held.wait()
    lab.cilia("delete", "pod", "drain-b", "--no-wait")


def test_agent_restart_keeps_service_connection(lab):
    ip = svc(lab, "web")["spec"]["clusterIP"]
    # The echo server speaks raw TCP echo after a non-HTTP first line.
    s = stream(lab, "client-node1", ip, 6, port=80)
    with open(f"/run/cilia/{lab.name}/node1/agent.pid") as f:
        os.kill(json.load(f)["pid"], signal.SIGKILL)
    finish(s, 40)

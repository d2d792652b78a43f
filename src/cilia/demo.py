"""`make demo`: a guided tour on a fresh lab, every step a real `cilia` command."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import time

LAB = os.environ.get("CILIA_DEMO_LAB", "demo")
CILIA = os.path.join(os.path.dirname(sys.executable), "cilia")

APP = """
apiVersion: v1
kind: Namespace
metadata: {name: shop, labels: {team: shop}}
---
apiVersion: apps/v1
kind: Deployment
metadata: {name: backend, namespace: shop}
spec:
  replicas: 2
  selector: {matchLabels: {app: backend}}
  template:
    metadata: {labels: {app: backend, tier: api}}
    spec:
      containers:
      - name: echo
        image: cilia/echo
        ports: [{containerPort: 8080, name: http}, {containerPort: 8080, protocol: UDP, name: udp}]
---
apiVersion: v1
kind: Pod
metadata: {name: frontend, namespace: shop, labels: {app: frontend, tier: web}}
spec:
  nodeName: node1
  containers: [{name: client, image: busybox}]
"""


def run(*args: str, input: str | None = None, show: bool = True, check: bool = True) -> str:
    if show:
        print(f"\n\033[1m$ cilia {' '.join(args)}\033[0m", flush=True)
    p = subprocess.run([CILIA, "--lab", LAB, *args], input=input, capture_output=True, text=True)
    if show:
        sys.stdout.write(p.stdout)
        sys.stdout.flush()
    if check and p.returncode != 0:
        sys.stderr.write(p.stderr)
        raise SystemExit(f"demo step failed: cilia {' '.join(args)}")
    return p.stdout


def main() -> int:
    t0 = time.monotonic()
    labs = json.loads(subprocess.run([CILIA, "lab", "list", "-o", "json"], capture_output=True,
                                     text=True).stdout or "[]")
    if any(l["name"] == LAB for l in labs):
        print(f"(removing the previous {LAB} lab)")
        run("lab", "down", "--name", LAB, show=False)
    run("lab", "up", "--name", LAB, "--nodes", "2")
    print("\nA sample app: a frontend pod on node1 and two backend echo pods spread over the nodes.")
    run("apply", "-f", "-", input=APP)
    run("wait", "--for=condition=Ready", "pods", "--all", "-n", "shop", "--timeout", "60s")
    run("get", "pods", "-n", "shop", "-o", "wide")
    pods = json.loads(run("get", "pods", "-n", "shop", "-o", "json", show=False))["items"]
    backends = [p["status"]["podIP"] for p in pods if p["metadata"]["labels"].get("app") == "backend"]
    print("\nThe frontend talks to each backend: on the same node BPF redirects packets straight "
          "into the peer pod; across nodes it encapsulates them in VXLAN with the source "
          "identity in the VNI (no bridge, no iptables).")
    for ip in backends:
        run("exec", "-n", "shop", "frontend", "--", "curl", "-s", "-m", "3", f"http://{ip}:8080/hello")
        print()
    run("exec", "-n", "shop", "frontend", "--", "sh", "-c",
        f"printf 'hello over UDP\\n' | nc -u -w1 {backends[0]} 8080")
    run("exec", "-n", "shop", "frontend", "--", "ping", "-c", "2", "-i", "0.2", backends[1])
    run("status")
    run("identity", "list")
    run("endpoint", "list", "--node", "node1")
    run("bpf", "ipcache", "list", "--node", "node1")
    run("bpf", "metrics", "list", "--node", "node1")
    print(f"\n✅ demo finished in {time.monotonic() - t0:.1f}s. The lab '{LAB}' is still running. Try:")
    print(f"   export CILIA_LAB={LAB}")
    print("   cilia get pods -A -o wide")
    print("   cilia exec -n shop frontend -- curl -s http://<backend IP>:8080/")
    print("   cilia status --verbose --node node1     # one agent, cilium-dbg style")
    print("   cilia bpf endpoint list --node node1")
    print("   cilia lab node add                       # grow the cluster; watch the ipcache")
    print("   cilia lab exec node1 -- bpftool net show   # the programs on each lxc veth")
    print(f"   cilia lab down --name {LAB}               # remove everything")
    return 0


if __name__ == "__main__":
    sys.exit(main())

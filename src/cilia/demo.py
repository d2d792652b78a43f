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
apiVersion: v1
kind: Pod
metadata: {name: frontend, namespace: shop, labels: {app: frontend, tier: web}}
spec:
  nodeName: node1
  containers: [{name: client, image: busybox}]
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
        ports: [{containerPort: 8080, name: http}]
---
apiVersion: v1
kind: Service
metadata: {name: backend, namespace: shop}
spec:
  selector: {app: backend}
  ports: [{port: 80, targetPort: http}]
---
apiVersion: v1
kind: Pod
metadata: {name: database, namespace: shop, labels: {app: database, tier: db}}
spec:
  nodeName: node2
  containers: [{name: db, image: cilia/echo, ports: [{containerPort: 5432, name: sql}]}]
---
apiVersion: v1
kind: Service
metadata: {name: database, namespace: shop}
spec:
  selector: {app: database}
  ports: [{port: 5432, targetPort: sql}]
"""

POLICY = """
apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata: {name: database-from-backend, namespace: shop}
spec:
  podSelector: {matchLabels: {app: database}}
  ingress:
  - from: [{podSelector: {matchLabels: {app: backend}}}]
    ports: [{port: sql}]
---
apiVersion: cilium.io/v2
kind: CiliumNetworkPolicy
metadata: {name: backend-from-frontend, namespace: shop}
spec:
  endpointSelector: {matchLabels: {app: backend}}
  ingress:
  - fromEndpoints: [{matchLabels: {app: frontend}}]
    toPorts: [{ports: [{port: "8080", protocol: TCP}]}]
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


def curl(pod: str, url: str) -> bool:
    out = run("exec", "-n", "shop", pod, "--", "curl", "-s", "-m", "2", "-o", "/dev/null", "-w",
              "%{http_code}\\n", url, check=False)
    return out.strip() == "200"


def main() -> int:
    t0 = time.monotonic()
    labs = json.loads(subprocess.run([CILIA, "lab", "list", "-o", "json"], capture_output=True,
                                     text=True).stdout or "[]")
    if any(l["name"] == LAB for l in labs):
        print(f"(removing the previous {LAB} lab)")
        run("lab", "down", "--name", LAB, show=False)
    run("lab", "up", "--name", LAB, "--nodes", "2")
    print("\nA sample shop: frontend -> backend (2 replicas behind a ClusterIP service) -> database.")
    run("apply", "-f", "-", input=APP)
    run("wait", "--for=condition=Ready", "pods", "--all", "-n", "shop", "--timeout", "60s")
    run("get", "pods", "-n", "shop", "-o", "wide")
    run("get", "services", "-n", "shop")
    svcs = json.loads(run("get", "services", "-n", "shop", "-o", "json", show=False))["items"]
    vip = {s["metadata"]["name"]: s["spec"]["clusterIP"] for s in svcs}
    pods = json.loads(run("get", "pods", "-n", "shop", "-o", "json", show=False))["items"]
    backend = next(p["metadata"]["name"] for p in pods if p["metadata"]["labels"].get("app") == "backend")
    print("\nService load balancing in eBPF: the frontend reaches the backend service, the backend "
          "its database; across nodes in VXLAN with the source identity in the VNI.")
    curl("frontend", f"http://{vip['backend']}:80/")
    curl(backend, f"http://{vip['database']}:5432/")
    curl("frontend", f"http://{vip['database']}:5432/")
    print("\nNow a policy: only the backend may reach the database, only the frontend the backend.")
    run("apply", "--wait", "-f", "-", input=POLICY)
    ok = [curl("frontend", f"http://{vip['backend']}:80/"),
          curl(backend, f"http://{vip['database']}:5432/"),
          not curl("frontend", f"http://{vip['database']}:5432/")]
    print("\nWhy was frontend -> database dropped? One command:")
    run("policy", "explain", "--from", "shop/frontend", "--to", "shop/database", "--port", "5432")
    run("observe", "-n", "shop", "--verdict", "DROPPED", "--last", "3")
    run("observe", "--to-pod", "shop/database", "--last", "4")
    run("endpoint", "list", "--node", "node2")
    print("\nCilium's connectivity test, against this lab:")
    run("connectivity", "test")
    run("status")
    took = time.monotonic() - t0
    if not all(ok):
        raise SystemExit("demo: the policy did not behave as shown above")
    print(f"\n✅ demo finished in {took:.0f}s. The lab '{LAB}' is still running. Try:")
    print(f"   export CILIA_LAB={LAB}")
    print("   cilia get pods -A -o wide")
    print("   cilia observe -n shop --follow                  # live flows (Ctrl-C to stop)")
    print("   cilia policy explain --from shop/frontend --to shop/backend --port 8080")
    print("   cilia hubble enable --ui                        # service map on http://127.0.0.1:12000")
    print("   cilia monitor -t drop --node node2              # raw datapath events")
    print("   cilia status --verbose --node node1             # one agent, cilium-dbg style")
    print("   cilia bpf policy get --all --node node2         # the policy map as the kernel has it")
    print("   cilia lab node add                              # grow the cluster")
    print(f"   cilia lab down --name {LAB}                      # remove everything")
    return 0


if __name__ == "__main__":
    sys.exit(main())

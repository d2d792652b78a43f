"""Drives the truth-table model on a lab: probes in parallel from every source's netns,
`policy explain` in batch, and the drop counters of every node.

The `cilia` commands of the hot path run in this process: the same click application,
arguments, output and exit code as the `cilia` executable, without starting an
interpreter and importing the CLI for each of the ~150 calls of the suite. Measured here
with other sessions loading the machine (load 12): `cilia bpf metrics list` 5 s as a
process, 0.03 s in process.
"""
from __future__ import annotations

import json
import os
import random
import subprocess
import sys
import threading
import time
from collections import defaultdict
from concurrent.futures import ThreadPoolExecutor

from tests.e2e.conftest import Lab, Result
from tests.e2e.policy_model import NODES, PODS, WORLD, WORLD_IP, Probe

PROBER = os.path.join(os.path.dirname(os.path.abspath(__file__)), "prober.py")
PYTHON = sys.executable
# UDP probes bind their own source port and ICMP probes use it as echo id, a fresh one
# per probe and source (see prober.py).
SPORT_FIRST, SPORT_LAST = 10000, 32000


class InProcessCLI:
    """`cilia ARGS` as Lab.cilia runs it, through the click app in this process."""

    def __init__(self, lab_name: str):
        self.env = {"CILIA_LAB": lab_name}
        # CliRunner swaps sys.stdin/stdout for the call: one call at a time.
        self.lock = threading.Lock()

    def __call__(self, *args: str, input: str | None = None, check: bool = True) -> Result:
        from click.testing import CliRunner

        from cilia.cli.main import cli
        with self.lock:
            r = CliRunner(mix_stderr=False).invoke(cli, list(args), input=input, env=self.env)
        if r.exception is not None and not isinstance(r.exception, SystemExit):
            raise AssertionError(f"cilia {' '.join(args)} raised {r.exception!r}") from r.exception
        res = Result(r.exit_code, r.stdout, r.stderr)
        if check and r.exit_code != 0:
            raise AssertionError(f"cilia {' '.join(args)} -> {r.exit_code}\n{r.stdout}\n{r.stderr}")
        return res


class Matrix:
    def __init__(self, lab: Lab):
        self.lab = lab
        self.cli = InProcessCLI(lab.name)
        self.pool = ThreadPoolExecutor(1)
        # A random start: a lab reused across runs still holds the conntrack entries of the
        # last run's source ports.
        first = random.randrange(SPORT_FIRST, SPORT_LAST)
        self._sport: dict[str, int] = defaultdict(lambda: first)
        self.refresh()

    # ---- addresses ----

    def refresh(self) -> None:
        pods = self.cli("get", "pods", "-A", "-o", "json").json()["items"]
        self.pod_ip = {f"{p['metadata']['namespace']}/{p['metadata']['name']}": p["status"]["podIP"]
                       for p in pods}
        self.pod_node = {f"{p['metadata']['namespace']}/{p['metadata']['name']}": p["spec"]["nodeName"]
                         for p in pods}
        svcs = self.cli("get", "services", "-A", "-o", "json").json()["items"]
        ours = {f"{s['metadata']['namespace']}/{s['metadata']['name'][2:]}": s for s in svcs
                if s["metadata"]["name"].startswith("s-")}
        self.cluster_ip = {pod: s["spec"]["clusterIP"] for pod, s in ours.items()}
        self.node_port = {(pod, p["port"], p.get("protocol", "TCP")): p["nodePort"]
                          for pod, s in ours.items() for p in s["spec"]["ports"]}
        nodes = self.cli("get", "nodes", "-o", "json").json()["items"]
        self.node_ip = {n["metadata"]["name"]: next(a["address"] for a in n["status"]["addresses"]
                                                    if a["type"] == "InternalIP")
                        for n in nodes}
        missing = [p for p in PODS if not self.pod_ip.get(p) or not self.cluster_ip.get(p)]
        assert not missing, f"pods without IP or ClusterIP: {missing}"

    def address(self, name: str, via: str = "pod") -> str:
        if name == WORLD:
            return WORLD_IP
        if name in NODES:
            return self.node_ip[name]
        if via == "nodeport":
            return self.node_ip[self.pod_node[name]]
        return self.cluster_ip[name] if via == "svc" else self.pod_ip[name]

    def port(self, p: Probe) -> int:
        return self.node_port[(p.dst, p.port, p.proto)] if p.via == "nodeport" else p.port

    def netns(self, name: str) -> str:
        if "/" in name:
            ns, pod = name.split("/")
            return f"/run/netns/{self.lab.name}-{ns}-{pod}"
        return f"/run/netns/{self.lab.name}-{name}"

    def _next_sport(self, src: str) -> int:
        port = self._sport[src]
        self._sport[src] = port + 1 if port < SPORT_LAST else SPORT_FIRST
        return port

    # ---- probing ----

    def probe(self, probes: list[Probe], timeout: float = 1.0) -> dict[Probe, str]:
        """Every probe at once from one prober process, each socket made in its source's
        netns (prober.py says why one process and not one per source)."""
        spec = {"timeout": timeout, "targets": [
            {"id": p.key, "netns": self.netns(p.src), "ip": self.address(p.dst, p.via),
             "port": self.port(p), "proto": p.proto,
             "sport": self._next_sport(p.src) if p.proto != "TCP" else 0} for p in probes]}
        r = subprocess.run([PYTHON, PROBER, "-"], input=json.dumps(spec), capture_output=True,
                           text=True, timeout=timeout + 60)
        assert r.returncode == 0, f"prober exited {r.returncode}: {r.stderr.strip()[-800:]}"
        results = json.loads(r.stdout)
        return {p: results[p.key] for p in probes}

    # ---- the agents' view ----

    def explain(self, probes: list[Probe]) -> dict[Probe, dict]:
        """`policy explain --batch` for pod-IP probes (a ClusterIP probe has the same
        verdict as its backend pod, so asking per pod pair covers both)."""
        queries = []
        for p in probes:
            frm = p.src if "/" in p.src else self.address(p.src)
            to = p.dst if "/" in p.dst else self.address(p.dst)
            queries.append((p, {"from": frm, "to": to, "port": p.port, "protocol": p.proto}))
        if not queries:
            return {}
        r = self.cli("policy", "explain", "--batch", "-", "-o", "json",
                           input="".join(json.dumps(q) + "\n" for _, q in queries))
        lines = [json.loads(line) for line in r.out.splitlines() if line.strip()]
        assert len(lines) == len(queries), \
            f"policy explain --batch: {len(queries)} queries, {len(lines)} answers"
        return {p: ans for (p, _), ans in zip(queries, lines)}

    def metrics(self) -> dict[tuple[int, str, bool], int]:
        """(reason, direction, audit) -> packets, summed over the nodes."""
        total: dict[tuple[int, str, bool], int] = defaultdict(int)
        for node in NODES:
            for m in self.cli("bpf", "metrics", "list", "--node", node, "-o", "json").json():
                total[(int(m["reason"]), str(m["direction"]).upper(), bool(m.get("audit")))] += int(m["packets"])
        return dict(total)

    def endpoints(self) -> dict[str, str]:
        """pod -> one line of what its agent realized (for failure reports)."""
        out = {}
        for node in NODES:
            for ep in self.cli("endpoint", "list", "--node", node, "-o", "json").json():
                st = ep["status"]
                pol = st.get("policy", {}).get("realized", {})
                name = st.get("external-identifiers", {}).get("pod-name", "?")
                out[name] = (f"{name}: endpoint {ep['id']} on {node}, identity {st['identity']['id']}, "
                             f"policy revision {pol.get('policy-revision')}, ingress "
                             f"{pol.get('ingress-enforcement')}, egress {pol.get('egress-enforcement')}")
        return out

    def endpoint_id(self, pod: str) -> tuple[int, str]:
        node = self.pod_node[pod]
        for ep in self.cli("endpoint", "list", "--node", node, "-o", "json").json():
            if ep["status"].get("external-identifiers", {}).get("pod-name") == pod:
                return int(ep["id"]), node
        raise AssertionError(f"no endpoint for {pod} on {node}")

    # ---- objects ----

    def apply(self, manifest: str, wait: bool = True) -> int | None:
        args = ["apply"] + (["--wait"] if wait else []) + ["-f", "-"]
        r = self.cli(*args, input=manifest)
        for line in r.out.splitlines():
            if line.startswith("Revision:"):
                return int(line.split(":", 1)[1])
        return None

    def delete(self, manifest: str) -> None:
        self.cli("delete", "--wait", "-f", "-", input=manifest)

    def config(self, key: str, value: str) -> None:
        self.cli("config", "set", key, value)


def wait_until(fn, timeout: float, what: str, interval: float = 0.2):
    deadline = time.monotonic() + timeout
    while True:
        v = fn()
        if v:
            return v
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(interval)

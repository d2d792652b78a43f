"""Shared plumbing for the benchmarks: unique names, labs that always go away, processes we
started (and only those) stopped by id, statistics, machine facts and result files."""
from __future__ import annotations

import contextlib
import json
import os
import platform
import re
import signal
import statistics
import subprocess
import sys
import time
import uuid
from typing import Iterator, Sequence

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RESULTS_DIR = os.path.join(ROOT, "bench", "results")
BIN = os.path.dirname(sys.executable)
CILIA = os.path.join(BIN, "cilia")
CILIA_CNI = os.path.join(BIN, "cilia-cni")
NETNS_DIR = "/run/netns"


class BenchError(Exception):
    pass


def unique_name(prefix: str = "b") -> str:
    # Lab names are 1-10 lowercase letters/digits; the name prefixes every netns we create.
    return prefix + uuid.uuid4().hex[:7]


def log(msg: str) -> None:
    print(f"  [{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


# --- processes ---------------------------------------------------------------------------

def sh(*argv: str, timeout: float = 60, check: bool = True, input: str | None = None,
       env: dict | None = None) -> subprocess.CompletedProcess:
    p = subprocess.run(list(argv), capture_output=True, text=True, timeout=timeout, input=input,
                       env=env)
    if check and p.returncode != 0:
        raise BenchError(f"{' '.join(argv)} -> rc {p.returncode}\n{p.stdout}\n{p.stderr}")
    return p


def in_netns(ns: str, argv: Sequence[str], cpu: int | None = None) -> list[str]:
    """argv run inside a named netns (nsenter, not `ip netns exec`: design.md §2), optionally
    pinned to one CPU; the pin is inherited through nsenter's exec."""
    out = ["nsenter", f"--net={os.path.join(NETNS_DIR, ns)}", "--", *argv]
    return (["taskset", "-c", str(cpu)] + out) if cpu is not None else out


class Procs:
    """Background processes this benchmark started. Each runs in its own session, so stopping
    one means signalling exactly its process group (by its id), nothing else."""

    def __init__(self) -> None:
        self.live: list[subprocess.Popen] = []

    def start(self, argv: Sequence[str], **kw) -> subprocess.Popen:
        p = subprocess.Popen(list(argv), stdout=kw.pop("stdout", subprocess.PIPE),
                             stderr=kw.pop("stderr", subprocess.STDOUT), text=True,
                             start_new_session=True, **kw)
        self.live.append(p)
        return p

    def stop(self, p: subprocess.Popen, grace: float = 2.0) -> str:
        out = ""
        if p.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(p.pid, signal.SIGTERM)
        try:
            out, _ = p.communicate(timeout=grace)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(p.pid, signal.SIGKILL)
            out, _ = p.communicate(timeout=5)
        if p in self.live:
            self.live.remove(p)
        return out or ""

    def stop_all(self) -> None:
        for p in list(self.live):
            with contextlib.suppress(Exception):
                self.stop(p, 1.0)


@contextlib.contextmanager
def no_interrupts() -> Iterator[None]:
    """Teardown must finish even if the user presses Ctrl-C again."""
    old_int = signal.signal(signal.SIGINT, signal.SIG_IGN)
    old_term = signal.signal(signal.SIGTERM, signal.SIG_IGN)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, old_int)
        signal.signal(signal.SIGTERM, old_term)


def _term_as_interrupt(signum, frame):
    raise KeyboardInterrupt(f"signal {signum}")


def install_signal_handlers() -> None:
    signal.signal(signal.SIGTERM, _term_as_interrupt)
    signal.signal(signal.SIGHUP, _term_as_interrupt)


# --- labs ----------------------------------------------------------------------------------

class Lab:
    def __init__(self, name: str, nodes: int, routing: str):
        self.name, self.nodes, self.routing = name, nodes, routing
        self.env = {**os.environ, "CILIA_LAB": name}

    def cilia(self, *args: str, timeout: float = 120, input: str | None = None,
              check: bool = True) -> subprocess.CompletedProcess:
        p = subprocess.run([CILIA, *args], capture_output=True, text=True, timeout=timeout,
                           env=self.env, input=input)
        if check and p.returncode != 0:
            raise BenchError(f"cilia {' '.join(args)} -> rc {p.returncode}\n{p.stdout}{p.stderr}")
        return p

    def pod_netns(self, pod: str, namespace: str = "default") -> str:
        return f"{self.name}-{namespace}-{pod}"

    def node_netns(self, node: str = "node1") -> str:
        return f"{self.name}-{node}"

    def agent_socket(self, node: str = "node1") -> str:
        from cilia import paths
        return paths.agent_socket(self.name, node)

    def store_url(self) -> str:
        from cilia.lab import state
        return state.store_url(self.name)

    def pods(self) -> dict[str, dict]:
        items = json.loads(self.cilia("get", "pods", "-o", "json").stdout)["items"]
        return {p["metadata"]["name"]: p for p in items}


@contextlib.contextmanager
def lab(name: str, nodes: int = 1, routing: str = "tunnel") -> Iterator[Lab]:
    lb = Lab(name, nodes, routing)
    try:
        log(f"lab up {name} ({nodes} node(s), {routing} routing)")
        lb.cilia("lab", "up", "--name", name, "--nodes", str(nodes), "--routing", routing,
                 timeout=180)
        yield lb
    finally:
        with no_interrupts():
            p = subprocess.run([CILIA, "lab", "down", "--name", name], capture_output=True,
                               text=True, timeout=180)
            log(f"lab down {name}: rc {p.returncode}")
            leftovers = [n for n in list_netns() if n.startswith(f"{name}-")]
            for ns in leftovers:  # lab down removes these; belt and braces for ours.
                subprocess.run(["ip", "netns", "del", ns], capture_output=True, timeout=30)


def list_netns() -> list[str]:
    try:
        return sorted(os.listdir(NETNS_DIR))
    except FileNotFoundError:
        return []


# --- statistics ----------------------------------------------------------------------------

def percentile(xs: Sequence[float], q: float) -> float:
    """Linear interpolation between closest ranks (numpy's default)."""
    if not xs:
        return float("nan")
    s = sorted(xs)
    k = (len(s) - 1) * q / 100.0
    lo, hi = int(k), min(int(k) + 1, len(s) - 1)
    return s[lo] + (s[hi] - s[lo]) * (k - lo)


def summary(xs: Sequence[float]) -> dict:
    xs = list(xs)
    if not xs:
        return {"n": 0}
    return {"n": len(xs), "min": min(xs), "p50": percentile(xs, 50), "p90": percentile(xs, 90),
            "p99": percentile(xs, 99), "max": max(xs), "mean": statistics.fmean(xs)}


def median(xs: Sequence[float]) -> float:
    return statistics.median(xs) if xs else float("nan")


# --- machine and results ---------------------------------------------------------------------

def machine() -> dict:
    model = ""
    with contextlib.suppress(OSError), open("/proc/cpuinfo") as f:
        for line in f:
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    def ver(argv):
        with contextlib.suppress(Exception):
            p = subprocess.run(argv, capture_output=True, text=True, timeout=10)
            return (p.stdout + p.stderr).strip().splitlines()[0]
        return ""
    # The cilia that was measured: wherever the package is imported from (PYTHONPATH may
    # point at a clean worktree while /work/main is being edited).
    import cilia
    src = os.path.dirname(os.path.abspath(cilia.__file__))
    commit = ver(["git", "-C", src, "rev-parse", "--short", "HEAD"])
    dirty = bool(ver(["git", "-C", src, "status", "--porcelain", "--untracked-files=no",
                      "--", "src", "bpf"]))
    mem = ""
    with contextlib.suppress(OSError), open("/proc/meminfo") as f:
        mem = f.readline().split(":", 1)[1].strip()
    return {"nproc": os.cpu_count(), "kernel": platform.release(), "cpu_model": model,
            "memory": mem, "python": platform.python_version(),
            "sockperf": ver(["sockperf", "--version"]), "iperf3": ver(["iperf3", "--version"]),
            "git_commit": commit + ("-dirty" if dirty else ""), "cilia_src": src,
            "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}


def write_result(name: str, data: dict) -> str:
    os.makedirs(RESULTS_DIR, exist_ok=True)
    path = os.path.join(RESULTS_DIR, f"{name}.json")
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(data, f, indent=1, sort_keys=True)
    os.replace(tmp, path)
    return path


ANSI = re.compile(r"\x1b\[[0-9;]*m")


def table(headers: Sequence[str], rows: Sequence[Sequence[object]], left: int = 1) -> str:
    """A plain-text table, also valid Markdown; the first `left` columns align left."""
    cells = [[str(h) for h in headers]] + [[str(c) for c in r] for r in rows]
    w = [max(len(r[i]) for r in cells) for i in range(len(headers))]
    line = lambda r: "| " + " | ".join(c.rjust(w[i]) if i >= left else c.ljust(w[i])
                                       for i, c in enumerate(r)) + " |"
    sep = "|" + "|".join(("-" * (w[i] + 1) + ":") if i >= left else ("-" * (w[i] + 2))
                         for i in range(len(w))) + "|"
    return "\n".join([line(cells[0]), sep] + [line(r) for r in cells[1:]])


def fmt(x: float, digits: int = 1) -> str:
    if x is None or x != x:
        return "-"
    return f"{x:.{digits}f}"


def bench_pods(server_node: str = "node1", client_node: str = "node1") -> str:
    """The two idle pods every request/response benchmark runs its tools in."""
    return f"""apiVersion: v1
kind: Pod
metadata: {{name: srv, labels: {{app: bench, role: server}}}}
spec:
  nodeName: {server_node}
  containers:
  - {{name: idle, image: busybox}}
---
apiVersion: v1
kind: Pod
metadata: {{name: cli, labels: {{app: bench, role: client}}}}
spec:
  nodeName: {client_node}
  containers:
  - {{name: idle, image: busybox}}
"""

"""Identity allocations per second on the embedded SQLite store and on a real etcd.

Cases, each measured on both backends in the same run (median of RUNS runs, fresh store
contents per run):
  new        one node allocates label sets nobody has allocated yet
             (value miss, CAS id, CAS value, ref put, id check: 5 round trips)
  existing   a second node allocates the same label sets (value get, ref put, id check)
  cached     the first node allocates label sets it already holds (local refcount only)
  new x8     8 nodes, each with its own connection, allocate 50 new label sets each at once
             (aggregate rate; includes CAS conflicts between nodes)

SQLite lives in a file under /tmp (the lab's default store is a file on disk); etcd is
started here on free loopback ports with its data dir under /tmp, and stopped afterwards.

Run: python -m bench.identity_alloc [--runs 3] [--count 300]
Writes bench/results/identity_alloc.json.
"""
from __future__ import annotations

import argparse
import asyncio
import ctypes
import json
import os
import platform
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request

from cilia.identity.allocator import IdentityAllocator
from cilia.kvstore import open_store

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RESULT = os.path.join(ROOT, "bench", "results", "identity_alloc.json")
CASES = ("new", "existing", "cached", "new x8")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _die_with_parent() -> None:
    # If the benchmark is killed, the kernel stops the etcd it started.
    ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG


class Etcd:
    def __init__(self, base: str) -> None:
        self.dir = tempfile.mkdtemp(prefix="etcd-", dir=base)
        self.port, self.peer = _free_port(), _free_port()
        self.proc: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"etcd://127.0.0.1:{self.port}"

    def start(self) -> None:
        etcd = shutil.which("etcd") or "/usr/bin/etcd"
        client, peer = f"http://127.0.0.1:{self.port}", f"http://127.0.0.1:{self.peer}"
        with open(os.path.join(self.dir, "etcd.log"), "wb") as log:
            self.proc = subprocess.Popen(
                [etcd, "--name", "b", "--data-dir", os.path.join(self.dir, "data"),
                 "--listen-client-urls", client, "--advertise-client-urls", client,
                 "--listen-peer-urls", peer, "--initial-advertise-peer-urls", peer,
                 "--initial-cluster", f"b={peer}", "--log-level", "warn", "--logger", "zap"],
                stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                preexec_fn=_die_with_parent)
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"etcd exited with {self.proc.returncode}")
            try:
                with urllib.request.urlopen(f"{client}/health", timeout=1) as r:
                    if json.load(r).get("health") == "true":
                        return
            except OSError:
                pass
            time.sleep(0.05)
        raise RuntimeError("etcd did not become healthy")

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)


def labels(run: int, i: int, node: int = 0) -> list[str]:
    return [f"k8s:app=bench{run}-{node}-{i}", "k8s:io.kubernetes.pod.namespace=default",
            f"k8s:tier=t{i % 5}"]


async def one_run(url: str, run: int, count: int) -> dict[str, float]:
    stores = [open_store(url) for _ in range(8)]
    allocs = [IdentityAllocator(s, f"node{k}") for k, s in enumerate(stores)]
    try:
        await stores[0].delete_prefix("/cilia/identities/")
        for a in allocs:
            await a.start()
        a, b = allocs[0], allocs[1]
        out: dict[str, float] = {}

        t = time.perf_counter()
        for i in range(count):
            await a.allocate(labels(run, i))
        out["new"] = count / (time.perf_counter() - t)

        t = time.perf_counter()
        for i in range(count):
            await b.allocate(labels(run, i))
        out["existing"] = count / (time.perf_counter() - t)

        reps = 20 * count
        t = time.perf_counter()
        for i in range(reps):
            await a.allocate(labels(run, i % count))
        out["cached"] = reps / (time.perf_counter() - t)

        async def node(k: int) -> None:
            for i in range(50):
                await allocs[k].allocate(labels(run, i, node=k + 1))

        t = time.perf_counter()
        await asyncio.gather(*(node(k) for k in range(8)))
        out["new x8"] = 8 * 50 / (time.perf_counter() - t)
        return out
    finally:
        for al in allocs:
            await al.close()
        for s in stores:
            await s.close()


def measure(url: str, runs: int, count: int) -> dict:
    samples = [asyncio.run(one_run(url, r, count)) for r in range(runs)]
    return {c: {"median_per_s": statistics.median(s[c] for s in samples),
                "runs_per_s": [round(s[c], 1) for s in samples]} for c in CASES}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--runs", type=int, default=3)
    p.add_argument("--count", type=int, default=300, help="label sets per run (new/existing)")
    args = p.parse_args(argv)

    base = tempfile.mkdtemp(prefix="cilia-bench-identity-")
    etcd = Etcd(base)
    results: dict[str, dict] = {}
    try:
        print(f"sqlite: {args.runs} runs x {args.count} label sets ...", file=sys.stderr, flush=True)
        results["sqlite"] = measure(f"sqlite://{base}/kv.db", args.runs, args.count)
        etcd.start()
        print(f"etcd:   {args.runs} runs x {args.count} label sets ...", file=sys.stderr, flush=True)
        results["etcd"] = measure(etcd.url, args.runs, args.count)
    finally:
        etcd.stop()
        shutil.rmtree(base, ignore_errors=True)

    print(f"\nidentity allocations per second (median of {args.runs} runs)")
    print(f"{'case':<10} {'sqlite':>12} {'etcd':>12} {'etcd/sqlite':>12}")
    for c in CASES:
        sq, et = results["sqlite"][c]["median_per_s"], results["etcd"][c]["median_per_s"]
        print(f"{c:<10} {sq:>12,.0f} {et:>12,.0f} {et / sq:>12.2f}")

    doc = {
        "benchmark": "identity_alloc",
        "time": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "runs": args.runs,
        "count": args.count,
        "machine": {"python": platform.python_version(), "kernel": platform.release(),
                    "cpus": os.cpu_count()},
        "results": results,
    }
    os.makedirs(os.path.dirname(RESULT), exist_ok=True)
    with open(RESULT, "w") as f:
        json.dump(doc, f, indent=1, sort_keys=True)
    print(f"\nwrote {os.path.relpath(RESULT, ROOT)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

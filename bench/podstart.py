"""Pod start latency.

(a) apply -> Ready: 100 idle pods in one manifest through `cilia apply`; each pod's Ready time
    is taken by reading the lab's store directly in a tight loop (the Kubernetes timestamps are
    second-granularity). Also: the same pods applied one at a time (unloaded latency), and the
    time for `cilia delete` until every pod is gone.
(b) CNI ADD alone: the real cilia-cni binary, ADD against node1's agent for 100 fresh netns
    that we create (named with the lab prefix), one call at a time; then DEL for each.
    `CNI_COMMAND=VERSION` calls (no agent round trip) give the process-start floor.
"""
from __future__ import annotations

import json
import os
import subprocess
import tempfile
import time
import uuid

from bench.common import (CILIA, CILIA_CNI, BenchError, Lab, Procs, fmt, lab, log, median,
                          sh, summary, table, unique_name)

POLL_SLEEP = 0.005


def manifest(prefix: str, names: list[str]) -> str:
    docs = []
    for n in names:
        docs.append(
            "apiVersion: v1\nkind: Pod\n"
            f"metadata: {{name: {n}, labels: {{app: bench, run: {prefix}}}}}\n"
            "spec:\n  containers:\n  - {name: idle, image: busybox}\n")
    return "---\n".join(docs)


def _ready(pod: dict) -> bool:
    for c in (pod.get("status") or {}).get("conditions") or []:
        if c.get("type") == "Ready":
            return c.get("status") == "True"
    return False


class StoreWatch:
    """Reads pods straight from the lab's store (no CLI in the loop)."""

    def __init__(self, lb: Lab):
        from cilia.cluster import Cluster
        self.cluster = Cluster(lb.store_url())
        self.polls = 0
        self.poll_time = 0.0
        self.last = 0.0

    def pods(self) -> tuple[float, dict[str, dict]]:
        t = time.monotonic()
        items = self.cluster.list("Pod", "default")
        now = time.monotonic()
        self.polls += 1
        self.poll_time += now - t
        self.last = now - t
        return now, {p["metadata"]["name"]: p for p in items}

    def close(self) -> None:
        self.cluster.close()


def apply_and_wait(lb: Lab, watch: StoreWatch, procs: Procs, names: list[str], path: str,
                   timeout: float) -> dict:
    """`cilia apply -f path`, then poll until every pod in names is Ready.
    Returns per-pod times (s) from the apply invocation: seen in the store and Ready."""
    want = set(names)
    seen: dict[str, float] = {}
    ready: dict[str, float] = {}
    addr: dict[str, float] = {}
    t0 = time.monotonic()
    p = procs.start([CILIA, "apply", "-f", path], env=lb.env)
    apply_done = None
    deadline = t0 + timeout
    while len(ready) < len(want):
        t, pods = watch.pods()
        for n in want & pods.keys():
            seen.setdefault(n, t)
            if n not in addr and (pods[n].get("status") or {}).get("podIP"):
                addr[n] = t
            if n not in ready and _ready(pods[n]):
                ready[n] = t
        if apply_done is None and p.poll() is not None:
            apply_done = time.monotonic()
            out = procs.stop(p)
            if p.returncode != 0:
                raise BenchError(f"cilia apply failed: {out}")
        if t > deadline:
            raise BenchError(f"{len(want) - len(ready)} of {len(want)} pods not Ready after "
                             f"{timeout:.0f}s")
        # Keep the watcher's share of the 2 CPUs small: sleep 3x what a poll costs.
        time.sleep(max(POLL_SLEEP, 3 * watch.last))
    if apply_done is None:
        procs.stop(p, 30)
        apply_done = time.monotonic()
    return {"t0": t0, "apply_cli_s": apply_done - t0,
            "seen": {n: seen[n] - t0 for n in names},
            "ip": {n: addr.get(n, ready[n]) - t0 for n in names}, "ready": {n: ready[n] - t0 for n in names}}


def delete_and_wait(lb: Lab, watch: StoreWatch, names: list[str], path: str,
                    timeout: float) -> float:
    t0 = time.monotonic()
    lb.cilia("delete", "-f", path)
    deadline = t0 + timeout
    want = set(names)
    while True:
        t, pods = watch.pods()
        if not (want & pods.keys()):
            return t - t0
        if t > deadline:
            raise BenchError(f"pods still present {timeout:.0f}s after delete")
        time.sleep(0.02)


def bench_burst(lb: Lab, watch: StoreWatch, procs: Procs, tmp: str, n: int, rep: int) -> dict:
    prefix = f"r{rep}"
    names = [f"{prefix}-p{i:03d}" for i in range(n)]
    path = os.path.join(tmp, f"burst{rep}.yaml")
    with open(path, "w") as f:
        f.write(manifest(prefix, names))
    watch.polls, watch.poll_time = 0, 0.0
    r = apply_and_wait(lb, watch, procs, names, path, timeout=180)
    poll_ms = 1e3 * watch.poll_time / max(watch.polls, 1)
    period_ms = 1e3 * max(r["ready"].values()) / max(watch.polls, 1)
    lat = [r["ready"][x] * 1e3 for x in names]
    seen_to_ready = [(r["ready"][x] - r["seen"][x]) * 1e3 for x in names]
    ip = [r["ip"][x] * 1e3 for x in names]
    del_s = delete_and_wait(lb, watch, names, path, timeout=180)
    out = {"pods": n, "apply_cli_ms": r["apply_cli_s"] * 1e3,
           "apply_to_ready_ms": summary(lat), "store_to_ready_ms": summary(seen_to_ready),
           "apply_to_ip_ms": summary(ip), "last_ip_s": max(r["ip"].values()),
           "first_ip_s": min(r["ip"].values()), "total_s": max(r["ready"].values()), "first_ready_s": min(r["ready"].values()),
           "delete_all_s": del_s, "poll_ms": poll_ms, "poll_period_ms": period_ms,
           "ready_s_sorted": sorted(r["ready"].values()), "ip_s_sorted": sorted(r["ip"].values()),
           "pods_per_s": n / max(r["ready"].values())}
    log(f"burst rep {rep}: {n} pods Ready in {out['total_s']:.2f}s "
        f"(p50 {out['apply_to_ready_ms']['p50']:.0f} ms, p99 {out['apply_to_ready_ms']['p99']:.0f} ms), "
        f"deleted in {del_s:.2f}s")
    return out


def bench_single(lb: Lab, watch: StoreWatch, procs: Procs, tmp: str, k: int) -> dict:
    """One pod per apply, waiting for Ready before the next: the unloaded latency."""
    lat, s2r, cli, ip = [], [], [], []
    names = []
    for i in range(k):
        name = f"s-p{i:03d}"
        path = os.path.join(tmp, f"single{i}.yaml")
        with open(path, "w") as f:
            f.write(manifest("single", [name]))
        r = apply_and_wait(lb, watch, procs, [name], path, timeout=60)
        lat.append(r["ready"][name] * 1e3)
        s2r.append((r["ready"][name] - r["seen"][name]) * 1e3)
        cli.append(r["apply_cli_s"] * 1e3)
        ip.append(r["ip"][name] * 1e3)
        names.append(name)
    allpath = os.path.join(tmp, "single-all.yaml")
    with open(allpath, "w") as f:
        f.write(manifest("single", names))
    delete_and_wait(lb, watch, names, allpath, timeout=120)
    out = {"pods": k, "apply_to_ready_ms": summary(lat), "store_to_ready_ms": summary(s2r),
           "apply_cli_ms": summary(cli), "apply_to_ip_ms": summary(ip)}
    log(f"single: {k} pods, apply->Ready p50 {out['apply_to_ready_ms']['p50']:.0f} ms, "
        f"store->Ready p50 {out['store_to_ready_ms']['p50']:.0f} ms")
    return out


def _cni(command: str, socket: str, cid: str, ns: str | None, name: str) -> tuple[float, dict]:
    env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "CNI_COMMAND": command,
           "CNI_CONTAINERID": cid, "CNI_IFNAME": "eth0",
           "CNI_PATH": os.path.dirname(CILIA_CNI),
           "CNI_ARGS": f"IgnoreUnknown=1;K8S_POD_NAMESPACE=default;K8S_POD_NAME={name}"}
    if ns:
        env["CNI_NETNS"] = f"/run/netns/{ns}"
    conf = json.dumps({"cniVersion": "1.0.0", "name": "cilia", "type": "cilia-cni",
                       "agent-socket": socket})
    t = time.monotonic()
    p = subprocess.run([CILIA_CNI], input=conf, capture_output=True, text=True, env=env,
                       timeout=60)
    dt = time.monotonic() - t
    if p.returncode != 0:
        raise BenchError(f"cilia-cni {command} {cid}: rc {p.returncode}: {p.stdout}{p.stderr}")
    return dt * 1e3, (json.loads(p.stdout) if p.stdout.strip() else {})


def bench_cni(lb: Lab, n: int) -> dict:
    socket = lb.agent_socket("node1")
    version = [_cni("VERSION", socket, "x", None, "x")[0] for _ in range(20)]
    tag = uuid.uuid4().hex[:6]
    nss = [f"{lb.name}-cni{tag}-{i:03d}" for i in range(n)]
    created: list[str] = []
    added: list[tuple[str, str]] = []
    add, dele, ips = [], [], set()
    try:
        t = time.monotonic()
        for ns in nss:
            sh("ip", "netns", "add", ns)
            created.append(ns)
        netns_s = time.monotonic() - t
        t_all = time.monotonic()
        for i, ns in enumerate(nss):
            cid = f"bench{tag}{i:03d}"
            dt, res = _cni("ADD", socket, cid, ns, f"cni-{i:03d}")
            added.append((cid, ns))
            add.append(dt)
            ips.add(res["ips"][0]["address"])
        add_total = time.monotonic() - t_all
        if len(ips) != n:
            raise BenchError(f"CNI ADD handed out {len(ips)} distinct addresses for {n} pods")
        t_all = time.monotonic()
        for i, (cid, ns) in enumerate(list(added)):
            dt, _ = _cni("DEL", socket, cid, ns, f"cni-{i:03d}")
            dele.append(dt)
            added.remove((cid, ns))
        del_total = time.monotonic() - t_all
    finally:
        for i, (cid, ns) in enumerate(added):  # only after a failure
            try:
                _cni("DEL", socket, cid, ns, "cleanup")
            except Exception as e:
                log(f"cleanup DEL {cid}: {e}")
        for ns in created:
            subprocess.run(["ip", "netns", "del", ns], capture_output=True, timeout=30)
    out = {"pods": n, "add_ms": summary(add), "del_ms": summary(dele),
           "version_ms": summary(version), "add_total_s": add_total, "del_total_s": del_total,
           "netns_create_s": netns_s}
    log(f"CNI: ADD p50 {out['add_ms']['p50']:.1f} ms p99 {out['add_ms']['p99']:.1f} ms; "
        f"DEL p50 {out['del_ms']['p50']:.1f} ms; VERSION p50 {out['version_ms']['p50']:.1f} ms")
    return out


def run(quick: bool = False, pods: int = 100, reps: int | None = None, nodes: int = 1) -> dict:
    reps = reps or (1 if quick else 3)
    singles = 5 if quick else 20
    name = unique_name()
    procs = Procs()
    res: dict = {"benchmark": "podstart", "lab": name, "nodes": nodes, "routing": "tunnel",
                 "pods": pods, "reps": reps, "poll_sleep_ms": POLL_SLEEP * 1e3}
    try:
        with lab(name, nodes=nodes) as lb, tempfile.TemporaryDirectory() as tmp:
            res["cni"] = bench_cni(lb, pods)
            watch = StoreWatch(lb)
            try:
                res["single"] = bench_single(lb, watch, procs, tmp, singles)
                res["burst"] = [bench_burst(lb, watch, procs, tmp, pods, r) for r in range(reps)]
            finally:
                watch.close()
    finally:
        procs.stop_all()
    b = res["burst"]
    res["burst_median"] = {
        "apply_to_ready_p50_ms": median([x["apply_to_ready_ms"]["p50"] for x in b]),
        "apply_to_ready_p99_ms": median([x["apply_to_ready_ms"]["p99"] for x in b]),
        "store_to_ready_p50_ms": median([x["store_to_ready_ms"]["p50"] for x in b]),
        "apply_to_ip_p50_ms": median([x["apply_to_ip_ms"]["p50"] for x in b]),
        "apply_to_ip_p99_ms": median([x["apply_to_ip_ms"]["p99"] for x in b]),
        "first_ready_s": median([x["first_ready_s"] for x in b]),
        "last_ip_s": median([x["last_ip_s"] for x in b]),
        "total_s": median([x["total_s"] for x in b]),
        "delete_all_s": median([x["delete_all_s"] for x in b]),
        "apply_cli_ms": median([x["apply_cli_ms"] for x in b]),
    }
    return res


def render(res: dict) -> str:
    c, s, bm = res["cni"], res["single"], res["burst_median"]
    rows = [
        [f"CNI ADD (cilia-cni binary, {c['pods']} netns, one at a time)", fmt(c["add_ms"]["p50"]),
         fmt(c["add_ms"]["p99"]), f"{c['add_total_s']:.2f} s"],
        [f"CNI DEL ({c['pods']})", fmt(c["del_ms"]["p50"]), fmt(c["del_ms"]["p99"]),
         f"{c['del_total_s']:.2f} s"],
        ["cilia-cni VERSION (process start floor, no agent)", fmt(c["version_ms"]["p50"]),
         fmt(c["version_ms"]["p99"]), "-"],
        [f"apply -> Ready, one pod at a time ({s['pods']} pods)",
         fmt(s["apply_to_ready_ms"]["p50"], 0), fmt(s["apply_to_ready_ms"]["p99"], 0), "-"],
        ["  of which: apply -> podIP set (CNI ADD done)", fmt(s["apply_to_ip_ms"]["p50"], 0),
         fmt(s["apply_to_ip_ms"]["p99"], 0), "-"],
        ["  of which: in store -> Ready", fmt(s["store_to_ready_ms"]["p50"], 0),
         fmt(s["store_to_ready_ms"]["p99"], 0), "-"],
        [f"apply -> Ready, {res['pods']} pods in one manifest (median of {res['reps']})",
         fmt(bm["apply_to_ready_p50_ms"], 0), fmt(bm["apply_to_ready_p99_ms"], 0),
         f"{bm['total_s']:.2f} s"],
        ["  of which: apply -> podIP set (CNI ADD done)", fmt(bm["apply_to_ip_p50_ms"], 0),
         fmt(bm["apply_to_ip_p99_ms"], 0), f"{bm['last_ip_s']:.2f} s"],
        [f"delete {res['pods']} pods until gone from the store", "-", "-",
         f"{bm['delete_all_s']:.2f} s"],
    ]
    return table(["pod start", "p50 ms", "p99 ms", "total"], rows)

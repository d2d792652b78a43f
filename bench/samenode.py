"""Same-node pod-to-pod: the cilia datapath vs plain kernel routing, side by side in one run.

cilia path: two idle pods on node1 of a 1-node lab with `--routing native` (pod MTU 1500; in
tunnel mode pods get 1450). Traffic leaves the client pod's veth, the BPF program on the host
side (tc ingress on lxc...) redirects it with bpf_redirect_peer straight into the server pod.

baseline: our own namespaces built with iproute2 and no BPF at all: a "node" netns and two "pod"
netns joined by veth pairs; pods have a /32 and a default route via an onlink gateway (static
neighbour entry for it), the node has a /32 route per pod over its veth (static neighbours),
ip_forward=1. The baseline MTU is set to the cilia pod's MTU, read from the pod.

Measurements (each N times, alternating which path goes first, medians reported):
  TCP and UDP request/response: sockperf ping-pong, 64-byte messages, round-trip times
  (--full-rtt); throughput: iperf3 TCP, one stream. Both ends are pinned to the same CPU
  (design.md §8: a cross-CPU wake-up costs ~100 us in this VM and would swamp the datapath).
"""
from __future__ import annotations

import json
import re
import subprocess
import time

from bench.common import (bench_pods, ANSI, BenchError, Lab, Procs, fmt, in_netns, lab, log, median,
                          no_interrupts, sh, table, unique_name)

CPU = 0
PATHS = ("cilia", "baseline")
TESTS = ("tcp_rr", "udp_rr", "tcp_stream")
MSG_SIZE = 64

PODS = bench_pods()


class Pair:
    def __init__(self, client_ns: str, server_ns: str, server_ip: str, mtu: int):
        self.client_ns, self.server_ns, self.server_ip, self.mtu = (client_ns, server_ns,
                                                                   server_ip, mtu)

    def to_json(self) -> dict:
        return dict(vars(self))


def link_info(ns: str, dev: str) -> dict:
    return json.loads(sh(*in_netns(ns, ["ip", "-j", "link", "show", "dev", dev])).stdout)[0]


def tc_progs(ns: str, dev: str, direction: str) -> list[str]:
    p = sh(*in_netns(ns, ["tc", "-j", "filter", "show", "dev", dev, direction]), check=False)
    try:
        filters = json.loads(p.stdout or "[]")
    except ValueError:
        return []
    return [f["options"]["bpf_name"] for f in filters
            if f.get("kind") == "bpf" and "bpf_name" in f.get("options", {})]


def setup_cilia(lb: Lab) -> tuple[Pair, dict]:
    lb.cilia("apply", "-f", "-", input=PODS)
    lb.cilia("wait", "--for=condition=Ready", "pods", "--all", "--timeout", "120s", timeout=150)
    pods = lb.pods()
    srv_ns, cli_ns = lb.pod_netns("srv"), lb.pod_netns("cli")
    mtu = int(link_info(srv_ns, "eth0")["mtu"])
    # Which BPF programs sit on the host-side veths (the path the packets take).
    node = lb.node_netns("node1")
    lxc = {}
    for l in json.loads(sh(*in_netns(node, ["ip", "-j", "link", "show"])).stdout):
        if l["ifname"].startswith("lxc"):
            lxc[l["ifname"]] = {"ingress": tc_progs(node, l["ifname"], "ingress"),
                                "egress": tc_progs(node, l["ifname"], "egress")}
    info = {"pods": {n: p["status"]["podIP"] for n, p in pods.items()}, "pod_mtu": mtu,
            "host_veth_tc": lxc}
    if not all(v["ingress"] for v in lxc.values()) or len(lxc) < 2:
        raise BenchError(f"expected BPF on every lxc device's tc ingress, found {lxc}")
    return Pair(cli_ns, srv_ns, pods["srv"]["status"]["podIP"], mtu), info


class Baseline:
    """node + two pods, veth pairs, /32 routes, static neighbours, ip_forward: no BPF."""
    GW = "10.250.0.1"
    IPS = {"a": "10.250.0.2", "b": "10.250.0.3"}  # a = client, b = server

    def __init__(self, prefix: str, mtu: int):
        self.node = f"{prefix}-base-node"
        self.pods = {k: f"{prefix}-base-{k}" for k in self.IPS}
        self.mtu = mtu
        self.created: list[str] = []

    def up(self) -> Pair:
        for ns in (self.node, *self.pods.values()):
            sh("ip", "netns", "add", ns)
            self.created.append(ns)
            sh("ip", "-n", ns, "link", "set", "lo", "up")
        n = self.node
        for k, ns in self.pods.items():
            host = f"veth{k}"
            sh("ip", "-n", n, "link", "add", host, "mtu", str(self.mtu), "type", "veth",
               "peer", "name", "eth0", "mtu", str(self.mtu), "netns", ns)
            sh("ip", "-n", n, "link", "set", host, "up")
            sh("ip", "-n", ns, "link", "set", "eth0", "up")
            sh("ip", "-n", ns, "addr", "add", f"{self.IPS[k]}/32", "dev", "eth0")
            sh("ip", "-n", ns, "route", "add", "default", "via", self.GW, "dev", "eth0",
               "onlink")
            host_mac = link_info(n, host)["address"]
            pod_mac = link_info(ns, "eth0")["address"]
            sh("ip", "-n", ns, "neigh", "replace", self.GW, "lladdr", host_mac, "dev", "eth0",
               "nud", "permanent")
            sh("ip", "-n", n, "route", "add", f"{self.IPS[k]}/32", "dev", host)
            sh("ip", "-n", n, "neigh", "replace", self.IPS[k], "lladdr", pod_mac, "dev", host,
               "nud", "permanent")
        sh(*in_netns(n, ["sysctl", "-q", "-w", "net.ipv4.ip_forward=1",
                         "net.ipv4.conf.all.rp_filter=0", "net.ipv4.conf.default.rp_filter=0"]))
        # Sanity: the path works and carries no BPF.
        sh(*in_netns(self.pods["a"], ["ping", "-c", "1", "-W", "2", self.IPS["b"]]))
        for k in self.pods:
            if tc_progs(n, f"veth{k}", "ingress") or tc_progs(n, f"veth{k}", "egress"):
                raise BenchError("baseline veth unexpectedly has BPF attached")
        return Pair(self.pods["a"], self.pods["b"], self.IPS["b"], self.mtu)

    def down(self) -> None:
        with no_interrupts():
            for ns in reversed(self.created):
                subprocess.run(["ip", "netns", "del", ns], capture_output=True, timeout=30)
            self.created.clear()


def wait_listening(ns: str, proto: str, port: int, timeout: float = 10) -> None:
    flag = "-Hltn" if proto == "tcp" else "-Hlun"
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        p = sh(*in_netns(ns, ["ss", flag, f"sport = :{port}"]), check=False)
        if p.stdout.strip():
            return
        time.sleep(0.05)
    raise BenchError(f"no {proto} listener on port {port} in {ns} after {timeout:.0f}s")


_PCT = re.compile(r"percentile\s+([\d.]+)\s*=\s*([\d.]+)")
_SUM = re.compile(r"Summary: (?:Round trip|Latency) is ([\d.]+) usec")
_OBS = re.compile(r"Total (\d+) observations")


def parse_sockperf(text: str) -> dict:
    text = ANSI.sub("", text)
    pct = {float(a): float(b) for a, b in _PCT.findall(text)}
    m, o = _SUM.search(text), _OBS.search(text)
    if not m or 50.0 not in pct:
        raise BenchError(f"cannot parse sockperf output:\n{text[-1500:]}")
    return {"avg_us": float(m.group(1)), "p50_us": pct[50.0], "p99_us": pct.get(99.0),
            "p999_us": pct.get(99.9), "observations": int(o.group(1)) if o else None}


class Runner:
    def __init__(self, procs: Procs, secs: int):
        self.procs, self.secs = procs, secs
        self.port = 7100

    def next_port(self) -> int:
        self.port += 1
        return self.port

    def sockperf(self, pair: Pair, proto: str) -> dict:
        port = self.next_port()
        tcp = ["--tcp"] if proto == "tcp" else []
        server = self.procs.start(in_netns(pair.server_ns, ["sockperf", "server", *tcp, "-i",
                                                            pair.server_ip, "-p", str(port)],
                                           cpu=CPU))
        try:
            wait_listening(pair.server_ns, proto, port)
            p = sh(*in_netns(pair.client_ns, ["sockperf", "ping-pong", *tcp, "-i",
                                              pair.server_ip, "-p", str(port), "-t",
                                              str(self.secs), "-m", str(MSG_SIZE),
                                              "--full-rtt"], cpu=CPU),
                   timeout=self.secs + 30)
        finally:
            self.procs.stop(server)
        return parse_sockperf(p.stdout + p.stderr)

    def iperf3(self, pair: Pair) -> dict:
        port = self.next_port()
        server = self.procs.start(in_netns(pair.server_ns, ["iperf3", "-s", "-1", "-B",
                                                            pair.server_ip, "-p", str(port)],
                                           cpu=CPU))
        try:
            wait_listening(pair.server_ns, "tcp", port)
            p = sh(*in_netns(pair.client_ns, ["iperf3", "-c", pair.server_ip, "-p", str(port),
                                              "-t", str(self.secs), "-J"], cpu=CPU),
                   timeout=self.secs + 30)
        finally:
            self.procs.stop(server, 5)
        d = json.loads(p.stdout)
        return {"gbit_s": d["end"]["sum_received"]["bits_per_second"] / 1e9,
                "retransmits": d["end"]["sum_sent"].get("retransmits")}

    def measure(self, test: str, pair: Pair) -> dict:
        if test == "tcp_rr":
            return self.sockperf(pair, "tcp")
        if test == "udp_rr":
            return self.sockperf(pair, "udp")
        return self.iperf3(pair)


PRIMARY = {"tcp_rr": "p50_us", "udp_rr": "p50_us", "tcp_stream": "gbit_s"}


def run(quick: bool = False, reps: int | None = None, secs: int = 5) -> dict:
    reps = reps or (2 if quick else 5)
    name = unique_name()
    procs = Procs()
    samples: dict = {t: {p: [] for p in PATHS} for t in TESTS}
    res: dict = {"benchmark": "samenode", "lab": name, "routing": "native", "reps": reps,
                 "seconds": secs, "msg_size": MSG_SIZE, "cpu_pin": CPU}
    base = None
    try:
        with lab(name, nodes=1, routing="native") as lb:
            cilia_pair, res["cilia"] = setup_cilia(lb)
            base = Baseline(name, cilia_pair.mtu)
            base_pair = base.up()
            res["baseline"] = {"mtu": base.mtu, "pair": base_pair.to_json()}
            res["cilia"]["pair"] = cilia_pair.to_json()
            pairs = {"cilia": cilia_pair, "baseline": base_pair}
            runner = Runner(procs, secs)
            for rep in range(reps):
                order = PATHS if rep % 2 == 0 else PATHS[::-1]
                for test in TESTS:
                    for path in order:
                        m = runner.measure(test, pairs[path])
                        samples[test][path].append(m)
                        log(f"rep {rep + 1}/{reps} {test:10s} {path:8s} "
                            + ", ".join(f"{k}={v:.2f}" if isinstance(v, float) else f"{k}={v}"
                                        for k, v in m.items()))
    finally:
        procs.stop_all()
        if base is not None:
            base.down()
    res["samples"] = samples
    med: dict = {}
    for test in TESTS:
        med[test] = {}
        for path in PATHS:
            keys = samples[test][path][0].keys()
            med[test][path] = {k: median([s[k] for s in samples[test][path]
                                          if s[k] is not None]) for k in keys}
        key = PRIMARY[test]
        med[test]["ratio"] = {k: med[test]["cilia"][k] / med[test]["baseline"][k]
                              for k in med[test]["cilia"]
                              if med[test]["baseline"].get(k)}
        med[test]["primary"] = key
    res["medians"] = med
    return res


def render(res: dict) -> str:
    m = res["medians"]
    rows = []
    for test, label in (("tcp_rr", "TCP RR"), ("udp_rr", "UDP RR")):
        for k, what in (("p50_us", "p50 RTT µs"), ("avg_us", "mean RTT µs"),
                        ("p99_us", "p99 RTT µs")):
            rows.append([f"{label} {what}", fmt(m[test]["cilia"][k]),
                         fmt(m[test]["baseline"][k]), fmt(m[test]["ratio"][k], 2)])
    rows.append(["TCP stream Gbit/s (iperf3)", fmt(m["tcp_stream"]["cilia"]["gbit_s"], 2),
                 fmt(m["tcp_stream"]["baseline"]["gbit_s"], 2),
                 fmt(m["tcp_stream"]["ratio"]["gbit_s"], 2)])
    return table([f"same node, median of {res['reps']} × {res['seconds']} s", "cilia",
                  "baseline", "cilia ÷ baseline"], rows)

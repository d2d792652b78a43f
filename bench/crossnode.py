"""Cross-node pod-to-pod: the cilia datapath vs the kernel without BPF, side by side in one run,
for both routing modes.

cilia path: a 2-node lab per routing mode (`cilia lab up --nodes 2 --routing tunnel|native`,
etcd store), an idle client pod pinned to node1 and an idle server pod pinned to node2.
  tunnel: cil_from_container on the client's lxc veth encapsulates into cilia_vxlan (external
          mode, VNI = source identity), the underlay carries UDP/4789 over the fabric bridge,
          cil_from_overlay on node2's cilia_vxlan delivers to the server pod. Pods MTU 1450.
  native: the kernel routes `10.244.2.0/24 via 172.29.0.12 dev eth0` with BPF on the lxc veths
          and on eth0 (cil_from_netdev / cil_to_netdev). Pods MTU 1500.

baseline: our own namespaces built with iproute2 and no BPF, same address plan as the lab:
`<bench>-base-fabric` with a bridge br0, `<bench>-base-node1/2` (eth0 172.29.0.11/12 on br0,
ip_forward=1), a pod netns per node (`<bench>-base-pod1/2`, 10.244.i.2/32 on a veth to its node,
default via 10.244.i.1 onlink with a static neighbour; the node has a /32 route to its pod).
  routing (native's baseline): `10.244.j.0/24 via 172.29.0.1j dev eth0`. Pods MTU 1500.
  vxlan (tunnel's baseline): a plain `vxlan42` per node (id 42, local/remote the two node IPs,
          dstport 4789, udpcsum and nolearning like cilia_vxlan), `10.244.j.0/24 via 10.244.j.1 dev vxlan42
          onlink` with a static neighbour to the peer's vxlan MAC. Pods and vxlan MTU 1450.

Measurements (samenode's runner: sockperf TCP/UDP ping-pong, 64-byte messages, --full-rtt;
iperf3 one TCP stream; every process pinned to CPU 0), each N times alternating which path goes
first, medians per path, ratio = median(cilia) ÷ median(baseline).
"""
from __future__ import annotations

import json
import subprocess

from bench.common import (bench_pods, BenchError, Lab, Procs, fmt, in_netns, lab, log, median, no_interrupts,
                          sh, table, unique_name)
from bench.samenode import CPU, MSG_SIZE, PRIMARY, TESTS, Pair, Runner, link_info, tc_progs

MODES = ("tunnel", "native")
BASELINE_OF = {"tunnel": "vxlan", "native": "routing"}
BASELINE_LABEL = {"vxlan": "kernel vxlan", "routing": "kernel routing"}
PATHS = ("cilia", "baseline")
VNI = 42
VXLAN_PORT = 4789

PODS = bench_pods("node2", "node1")


def _routes(ns: str) -> list[str]:
    return sh(*in_netns(ns, ["ip", "route", "show"])).stdout.strip().splitlines()


def _bpf_on(ns: str, devs: list[str]) -> dict:
    return {d: {"ingress": tc_progs(ns, d, "ingress"), "egress": tc_progs(ns, d, "egress")}
            for d in devs}


def setup_cilia(lb: Lab) -> tuple[Pair, dict]:
    lb.cilia("apply", "-f", "-", input=PODS)
    lb.cilia("wait", "--for=condition=Ready", "pods", "--all", "--timeout", "120s", timeout=150)
    pods = lb.pods()
    if pods["cli"]["spec"].get("nodeName") != "node1" or pods["srv"]["spec"].get("nodeName") != "node2":
        raise BenchError("pods did not land on node1/node2")
    srv_ns, cli_ns = lb.pod_netns("srv"), lb.pod_netns("cli")
    mtu = int(link_info(srv_ns, "eth0")["mtu"])
    info: dict = {"pods": {n: p["status"]["podIP"] for n, p in pods.items()}, "pod_mtu": mtu,
                  "nodes": {}}
    for node in ("node1", "node2"):
        ns = lb.node_netns(node)
        links = json.loads(sh(*in_netns(ns, ["ip", "-j", "-d", "link", "show"])).stdout)
        devs = [l["ifname"] for l in links
                if l["ifname"].startswith("lxc") or l["ifname"] in ("eth0", "cilia_vxlan")]
        vx = next((l for l in links if l["ifname"] == "cilia_vxlan"), None)
        info["nodes"][node] = {"tc": _bpf_on(ns, devs), "routes": _routes(ns),
                               "vxlan": (vx or {}).get("linkinfo", {}).get("info_data")}
    for node, n in info["nodes"].items():
        lxc = {d: v for d, v in n["tc"].items() if d.startswith("lxc")}
        if not lxc or not all(v["ingress"] for v in lxc.values()):
            raise BenchError(f"{node}: expected BPF on every lxc device's tc ingress: {lxc}")
        if lb.routing == "tunnel" and not n["tc"].get("cilia_vxlan", {}).get("ingress"):
            raise BenchError(f"{node}: no BPF on cilia_vxlan ingress in tunnel mode")
        if lb.routing == "native" and not n["tc"].get("eth0", {}).get("ingress"):
            raise BenchError(f"{node}: no BPF on eth0 ingress in native mode")
    # The path really crosses nodes: a ping before measuring (also warms neighbour entries).
    sh(*in_netns(cli_ns, ["ping", "-c", "2", "-i", "0.2", "-W", "2",
                          pods["srv"]["status"]["podIP"]]))
    return Pair(cli_ns, srv_ns, pods["srv"]["status"]["podIP"], mtu), info


class Baseline:
    """fabric bridge + two nodes + a pod per node; kernel routing or kernel VXLAN; no BPF."""

    def __init__(self, prefix: str, kind: str):
        if kind not in ("routing", "vxlan"):
            raise ValueError(kind)
        self.kind = kind
        self.mtu = 1450 if kind == "vxlan" else 1500
        self.fabric = f"{prefix}-base-fabric"
        self.nodes = {i: f"{prefix}-base-node{i}" for i in (1, 2)}
        self.pods = {i: f"{prefix}-base-pod{i}" for i in (1, 2)}
        self.created: list[str] = []

    @staticmethod
    def node_ip(i: int) -> str:
        return f"172.29.0.{10 + i}"

    @staticmethod
    def pod_ip(i: int) -> str:
        return f"10.244.{i}.2"

    @staticmethod
    def gw(i: int) -> str:
        return f"10.244.{i}.1"

    def _ip(self, ns: str, *args: str) -> None:
        sh("ip", "-n", ns, *args)

    def up(self) -> Pair:
        for ns in (self.fabric, *self.nodes.values(), *self.pods.values()):
            sh("ip", "netns", "add", ns)
            self.created.append(ns)
            self._ip(ns, "link", "set", "lo", "up")
        f = self.fabric
        self._ip(f, "link", "add", "br0", "type", "bridge")
        self._ip(f, "link", "set", "br0", "up")
        for i, n in self.nodes.items():
            # underlay: node eth0 <-> fabric node<i> on br0, MTU 1500 like the lab
            self._ip(f, "link", "add", f"node{i}", "type", "veth", "peer", "name", "eth0",
                     "netns", n)
            self._ip(f, "link", "set", f"node{i}", "master", "br0", "up")
            self._ip(n, "addr", "add", f"{self.node_ip(i)}/16", "dev", "eth0")
            self._ip(n, "link", "set", "eth0", "up")
            sh(*in_netns(n, ["sysctl", "-q", "-w", "net.ipv4.ip_forward=1",
                             "net.ipv4.conf.all.rp_filter=0",
                             "net.ipv4.conf.default.rp_filter=0"]))
            # pod: /32, default via an onlink gateway (static neighbour), /32 route back
            p, host = self.pods[i], "vethpod"
            self._ip(n, "link", "add", host, "mtu", str(self.mtu), "type", "veth", "peer",
                     "name", "eth0", "mtu", str(self.mtu), "netns", p)
            self._ip(n, "link", "set", host, "up")
            self._ip(p, "link", "set", "eth0", "up")
            self._ip(p, "addr", "add", f"{self.pod_ip(i)}/32", "dev", "eth0")
            self._ip(p, "route", "add", "default", "via", self.gw(i), "dev", "eth0", "onlink")
            self._ip(p, "neigh", "replace", self.gw(i), "lladdr", link_info(n, host)["address"],
                     "dev", "eth0", "nud", "permanent")
            self._ip(n, "route", "add", f"{self.pod_ip(i)}/32", "dev", host)
            self._ip(n, "neigh", "replace", self.pod_ip(i), "lladdr",
                     link_info(p, "eth0")["address"], "dev", host, "nud", "permanent")
        for i, n in self.nodes.items():
            j = 3 - i
            if self.kind == "routing":
                self._ip(n, "route", "add", f"10.244.{j}.0/24", "via", self.node_ip(j),
                         "dev", "eth0")
            else:
                self._ip(n, "link", "add", "vxlan42", "mtu", str(self.mtu), "type", "vxlan",
                         "id", str(VNI), "local", self.node_ip(i), "remote", self.node_ip(j),
                         "dstport", str(VXLAN_PORT), "dev", "eth0", "udpcsum", "nolearning")
                self._ip(n, "link", "set", "vxlan42", "up")
        if self.kind == "vxlan":
            for i, n in self.nodes.items():
                j = 3 - i
                peer_mac = link_info(self.nodes[j], "vxlan42")["address"]
                self._ip(n, "neigh", "replace", self.gw(j), "lladdr", peer_mac, "dev", "vxlan42",
                         "nud", "permanent")
                self._ip(n, "route", "add", f"10.244.{j}.0/24", "via", self.gw(j), "dev",
                         "vxlan42", "onlink")
        # Sanity: the path works and no BPF sits anywhere on it.
        sh(*in_netns(self.pods[1], ["ping", "-c", "2", "-i", "0.2", "-W", "2",
                                    self.pod_ip(2)]))
        for n in self.nodes.values():
            devs = ["eth0", "vethpod"] + (["vxlan42"] if self.kind == "vxlan" else [])
            if any(v["ingress"] or v["egress"] for v in _bpf_on(n, devs).values()):
                raise BenchError(f"baseline {n} unexpectedly has BPF attached")
        return Pair(self.pods[1], self.pods[2], self.pod_ip(2), self.mtu)

    def describe(self) -> dict:
        out = {"kind": self.kind, "mtu": self.mtu, "routes": {}}
        for i, n in self.nodes.items():
            out["routes"][f"node{i}"] = _routes(n)
        if self.kind == "vxlan":
            d = json.loads(sh(*in_netns(self.nodes[1], ["ip", "-j", "-d", "link", "show",
                                                         "dev", "vxlan42"])).stdout)[0]
            out["vxlan"] = d.get("linkinfo", {}).get("info_data")
        return out

    def down(self) -> None:
        with no_interrupts():
            for ns in reversed(self.created):
                subprocess.run(["ip", "netns", "del", ns], capture_output=True, timeout=30)
            self.created.clear()


def medians(samples: dict) -> dict:
    med: dict = {}
    for test in TESTS:
        med[test] = {}
        for path in PATHS:
            keys = samples[test][path][0].keys()
            med[test][path] = {k: median([s[k] for s in samples[test][path]
                                          if s[k] is not None]) for k in keys}
        med[test]["ratio"] = {k: med[test]["cilia"][k] / med[test]["baseline"][k]
                              for k in med[test]["cilia"] if med[test]["baseline"].get(k)}
        med[test]["primary"] = PRIMARY[test]
    return med


def run_mode(mode: str, reps: int, secs: int, procs: Procs) -> dict:
    name = unique_name()
    samples: dict = {t: {p: [] for p in PATHS} for t in TESTS}
    out: dict = {"lab": name, "routing": mode, "baseline_kind": BASELINE_OF[mode]}
    with lab(name, nodes=2, routing=mode) as lb:
        cilia_pair, out["cilia"] = setup_cilia(lb)
        base = Baseline(name, BASELINE_OF[mode])
        try:
            base_pair = base.up()
            if base.mtu != cilia_pair.mtu:
                raise BenchError(f"MTU mismatch: cilia pods {cilia_pair.mtu}, baseline {base.mtu}")
            out["baseline"] = base.describe()
            out["cilia"]["pair"], out["baseline"]["pair"] = (cilia_pair.to_json(),
                                                             base_pair.to_json())
            pairs = {"cilia": cilia_pair, "baseline": base_pair}
            runner = Runner(procs, secs)
            for rep in range(reps):
                order = PATHS if rep % 2 == 0 else PATHS[::-1]
                for test in TESTS:
                    for path in order:
                        m = runner.measure(test, pairs[path])
                        samples[test][path].append(m)
                        log(f"{mode} rep {rep + 1}/{reps} {test:10s} {path:8s} "
                            + ", ".join(f"{k}={v:.2f}" if isinstance(v, float) else f"{k}={v}"
                                        for k, v in m.items()))
        finally:
            procs.stop_all()
            base.down()
    out["samples"] = samples
    out["medians"] = medians(samples)
    return out


def run(quick: bool = False, reps: int | None = None, secs: int = 5,
        modes: tuple[str, ...] = MODES) -> dict:
    reps = reps or (2 if quick else 3)
    procs = Procs()
    res: dict = {"benchmark": "crossnode", "reps": reps, "seconds": secs, "msg_size": MSG_SIZE,
                 "cpu_pin": CPU, "modes": {}}
    try:
        for mode in modes:
            res["modes"][mode] = run_mode(mode, reps, secs, procs)
    finally:
        procs.stop_all()
    return res


ROWS = [("tcp_rr", "p50_us", "TCP RR p50 RTT µs", 1), ("tcp_rr", "avg_us", "TCP RR mean RTT µs", 1),
        ("tcp_rr", "p99_us", "TCP RR p99 RTT µs", 1), ("udp_rr", "p50_us", "UDP RR p50 RTT µs", 1),
        ("udp_rr", "avg_us", "UDP RR mean RTT µs", 1), ("udp_rr", "p99_us", "UDP RR p99 RTT µs", 1),
        ("tcp_stream", "gbit_s", "TCP stream Gbit/s (iperf3)", 2)]


def render(res: dict) -> str:
    modes = [m for m in MODES if m in res["modes"]]
    headers = [f"cross node, median of {res['reps']} × {res['seconds']} s"]
    for mode in modes:
        kind = res["modes"][mode]["baseline_kind"]
        headers += [f"cilia {mode}", BASELINE_LABEL[kind], "÷"]
    rows = []
    for test, key, label, digits in ROWS:
        row = [label]
        for mode in modes:
            m = res["modes"][mode]["medians"][test]
            row += [fmt(m["cilia"].get(key), digits), fmt(m["baseline"].get(key), digits),
                    fmt(m["ratio"].get(key), 2)]
        rows.append(row)
    return table(headers, rows)


def render_samples(res: dict) -> str:
    rows = []
    for mode in MODES:
        if mode not in res["modes"]:
            continue
        r = res["modes"][mode]
        for test, key in PRIMARY.items():
            for path in PATHS:
                label = f"cilia {mode}" if path == "cilia" else BASELINE_LABEL[r["baseline_kind"]]
                vals = [s[key] for s in r["samples"][test][path]]
                rows.append([test, label, " ".join(fmt(v, 2 if key == "gbit_s" else 1)
                                                   for v in vals)])
    return table(["test", "path", "per repetition"], rows, left=3)


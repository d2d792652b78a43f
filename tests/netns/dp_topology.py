"""Nodes, pods and a world host in real namespaces, wired like tests/netns/
test_datapath_overlay.py but with any number of pods per node, for service tests.

    pods -- lxcN -- node1 --eth0--+                       +--eth0-- node2 -- lxcN -- pods
                                  +-- br0 (fabric netns) -+
                                  +--eth0-- world (198.51.100.10 on lo, no pod routes)

Every name carries a per-topology tag; close() removes namespaces, helper processes
(by pid) and pins, also after a failure."""

from __future__ import annotations

import json
import secrets
import subprocess
import sys

from cilia.datapath import abi
from cilia.datapath.netns import NetnsExecutor
from cilia.datapath.node import EndpointEntry, NodeConfig, NodeDatapath

NODE_IPS = {1: "172.30.0.11", 2: "172.30.0.12"}
WORLD_UNDERLAY, WORLD_IP = "172.30.0.100", "198.51.100.10"
ROUTERS = {1: "10.245.1.1", 2: "10.245.2.1"}
CLUSTER_CIDR = "10.245.0.0/16"


def sh(*args: str, check: bool = True, timeout: float = 60) -> str:
    p = subprocess.run(args, capture_output=True, text=True, timeout=timeout)
    if check and p.returncode != 0:
        raise AssertionError(f"{' '.join(args)} -> {p.returncode}: {p.stderr.strip()}")
    return p.stdout


def in_ns(ns: str, *args: str, check: bool = True, timeout: float = 60) -> str:
    return sh("nsenter", f"--net=/run/netns/{ns}", "--", *args, check=check, timeout=timeout)


def ifindex(ns: str, dev: str) -> int:
    return json.loads(sh("ip", "-n", ns, "-j", "link", "show", dev))[0]["ifindex"]


def py(ns: str, script: str, *args: str, timeout: float = 60) -> str:
    return in_ns(ns, sys.executable, "-c", script, *args, timeout=timeout)


class Topology:
    def __init__(self, routing: str = "tunnel", nodes: int = 1):
        self.routing = routing
        self.n_nodes = nodes
        self.tag = secrets.token_hex(3)
        self.netns: list[str] = []
        self.pins: dict[int, str] = {}
        self.dps: dict[int, NodeDatapath] = {}
        self.exs: dict[int, NetnsExecutor] = {}
        self.procs: list[subprocess.Popen] = []
        self.nodes: dict[int, str] = {}
        self.pods: dict[str, dict] = {}  # name -> {ns, ip, node}

    # -- building --------------------------------------------------------------
    def _ns(self, role: str) -> str:
        name = f"tlb{role}{self.tag}"
        sh("ip", "netns", "add", name)
        self.netns.append(name)
        in_ns(name, "ip", "link", "set", "lo", "up")
        return name

    def build(self) -> "Topology":
        self.fabric = self._ns("fab")
        in_ns(self.fabric, "ip", "link", "add", "br0", "type", "bridge")
        in_ns(self.fabric, "ip", "link", "set", "br0", "up")
        self.world = self._ns("w")
        self._uplink(self.world, "pw", WORLD_UNDERLAY)
        sh("ip", "-n", self.world, "addr", "add", f"{WORLD_IP}/32", "dev", "lo")
        for n in range(1, self.n_nodes + 1):
            node = self.nodes[n] = self._ns(f"n{n}")
            self._uplink(node, f"pn{n}", NODE_IPS[n])
            in_ns(node, "sysctl", "-qw", "net.ipv4.ip_forward=1")
            in_ns(node, "sysctl", "-qw", "net.ipv4.conf.all.rp_filter=1", "net.ipv4.conf.default.rp_filter=1")
            if self.routing == "tunnel":
                sh("ip", "-n", node, "link", "add", "cilia_vxlan", "type", "vxlan", "external", "dstport", "4789")
                sh("ip", "-n", node, "link", "set", "cilia_vxlan", "arp", "off", "up")
            sh("ip", "-n", node, "route", "add", f"{WORLD_IP}/32", "via", WORLD_UNDERLAY, "dev", "eth0")
        for n in self.nodes:
            for peer in self.nodes:
                if peer == n:
                    continue
                cidr = f"10.245.{peer}.0/24"
                if self.routing == "tunnel":
                    sh("ip", "-n", self.nodes[n], "route", "add", cidr, "dev", "cilia_vxlan")
                else:
                    sh("ip", "-n", self.nodes[n], "route", "add", cidr, "via", NODE_IPS[peer], "dev", "eth0")
        return self

    def _uplink(self, ns: str, port: str, addr: str) -> None:
        sh("ip", "-n", self.fabric, "link", "add", port, "type", "veth", "peer", "name", "eth0", "netns", ns)
        sh("ip", "-n", self.fabric, "link", "set", port, "master", "br0", "up")
        sh("ip", "-n", ns, "addr", "add", f"{addr}/16", "dev", "eth0")
        sh("ip", "-n", ns, "link", "set", "eth0", "up")

    def add_pod(self, name: str, node: int, host: int) -> str:
        ip = f"10.245.{node}.{host}"
        mtu = "1450" if self.routing == "tunnel" else "1500"
        ns = self._ns(f"p{name}")
        nodens = self.nodes[node]
        lxc = f"lxc{host}"
        sh("ip", "-n", nodens, "link", "add", lxc, "mtu", mtu, "type", "veth", "peer", "name", "eth0", "mtu", mtu,
           "netns", ns)
        sh("ip", "-n", nodens, "link", "set", lxc, "up")
        for cmd in (("link", "set", "eth0", "up"), ("addr", "add", f"{ip}/32", "dev", "eth0"),
                    ("route", "add", ROUTERS[node], "dev", "eth0", "scope", "link"),
                    ("route", "add", "default", "via", ROUTERS[node], "dev", "eth0")):
            sh("ip", "-n", ns, *cmd)
        sh("ip", "-n", nodens, "route", "add", f"{ip}/32", "dev", lxc, "scope", "link")
        self.pods[name] = {"ns": ns, "ip": ip, "node": node, "lxc": lxc, "id": 1000 + len(self.pods)}
        return ip

    def load(self, **cfg) -> "Topology":
        for n, node in self.nodes.items():
            self.pins[n] = f"/sys/fs/bpf/cilia/test-{secrets.token_hex(4)}"
            tunnel = ifindex(node, "cilia_vxlan") if self.routing == "tunnel" else 0
            config = NodeConfig(node_ip4=NODE_IPS[n], router_ip4=ROUTERS[n], pod_cidr4=f"10.245.{n}.0/24",
                                routing=self.routing, tunnel_ifindex=tunnel, native_ifindex=ifindex(node, "eth0"),
                                cluster_cidr4=CLUSTER_CIDR, masquerade=True, **cfg)
            dp = self.dps[n] = NodeDatapath(self.pins[n], config).load()
            ex = self.exs[n] = NetnsExecutor(f"/run/netns/{node}")
            ex.run(dp.attach_netdev, ifindex(node, "eth0"))
            if tunnel:
                ex.run(dp.attach_overlay, tunnel)
            ipc = {}
            for name, p in self.pods.items():
                local = p["node"] == n
                ipc[p["ip"]] = (p["id"], None if local else NODE_IPS[p["node"]], 0)
                if local:
                    lxc = json.loads(sh("ip", "-n", node, "-j", "link", "show", p["lxc"]))[0]
                    mac = json.loads(sh("ip", "-n", p["ns"], "-j", "link", "show", "eth0"))[0]["address"]
                    dp.upsert_endpoint(EndpointEntry(p["ip"], lxc["ifindex"], p["id"], mac, lxc["address"],
                                                     sec_id=p["id"]))
                    ex.run(dp.attach_endpoint, lxc["ifindex"])
            for peer in self.nodes:
                if peer != n:
                    ipc[NODE_IPS[peer]] = (abi.IDENTITY_REMOTE_NODE, NODE_IPS[peer] if tunnel else None,
                                           abi.IPCACHE_F_REMOTE_NODE)
            dp.sync_ipcache(ipc)
        return self

    # -- helpers -----------------------------------------------------------------
    def start(self, ns: str, script: str, *args: str) -> subprocess.Popen:
        p = subprocess.Popen(["nsenter", f"--net=/run/netns/{ns}", "--", sys.executable, "-c", script, *args],
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        self.procs.append(p)
        line = p.stdout.readline().strip()
        assert line == "ready", (line, p.stderr.read() if p.poll() is not None else "")
        return p

    def close(self) -> None:
        for p in self.procs:
            if p.poll() is None:
                p.kill()
                p.wait(10)
        for ex in self.exs.values():
            ex.close()
        for dp in self.dps.values():
            dp.close()
        for ns in self.netns:
            subprocess.run(["ip", "netns", "del", ns], capture_output=True)
        for pins in self.pins.values():
            NodeDatapath.remove_pins(pins)

"""Two nodes, a pod on each and a "world" host, in real namespaces: pod-to-pod traffic
across nodes in tunnel mode (VXLAN collect_md, identity in the VNI) and native routing,
and pod-to-world with BPF masquerade.

Topology (every name carries a per-test prefix; everything is deleted, also on failure):

    pod1 -- lxc -- node1 --eth0--+                       +--eth0-- node2 -- lxc -- pod2
                                 +-- br0 (fabric netns) -+
                                 +--eth0-- world (198.51.100.10, no route to pods)

Oracles do not import cilia: ping, python sockets in the pod/world netns printing what
they see, a raw-socket sniffer decoding VXLAN headers, `ip -j` and `bpftool -j`."""

from __future__ import annotations

import json
import os
import secrets
import socket
import struct
import subprocess
import sys
import time

import pytest

from cilia.datapath import abi
from cilia.datapath.netns import NetnsExecutor
from cilia.datapath.node import EndpointEntry, NodeConfig, NodeDatapath

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="needs root")

NODE_IPS = {1: "172.29.0.11", 2: "172.29.0.12"}
WORLD_UNDERLAY, WORLD_IP = "172.29.0.100", "198.51.100.10"
POD_IPS = {1: "10.244.1.11", 2: "10.244.2.22"}
POD_IDS = {1: 1000, 2: 2000}
ROUTERS = {1: "10.244.1.1", 2: "10.244.2.1"}

SERVER = r"""
import socket, sys
s = socket.socket()
s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind(("0.0.0.0", int(sys.argv[1])))
s.listen(16)
print("ready", flush=True)
while True:
    c, peer = s.accept()
    data = b""
    while True:
        d = c.recv(65536)
        if not d:
            break
        data += d
    c.sendall(b"peer=%s len=%d data=%s" % (peer[0].encode(), len(data), data[:8]))
    c.close()
"""

CLIENT = r"""
import socket, sys
c = socket.create_connection((sys.argv[1], int(sys.argv[2])), timeout=5)
c.sendall(sys.argv[3].encode() * int(sys.argv[4]))
c.shutdown(socket.SHUT_WR)
buf = b""
while True:
    d = c.recv(65536)
    if not d:
        break
    buf += d
print(buf.decode()[:200])
"""

# Prints "vni inner_src inner_dst" for every VXLAN packet seen on a device, both ways
# (ETH_P_ALL: protocol-specific packet sockets do not see outgoing frames).
SNIFFER = r"""
import socket, struct, sys
s = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.htons(3))
s.bind((sys.argv[1], 0))
print("ready", flush=True)
while True:
    f = s.recv(65535)
    if f[12:14] != b"\x08\x00":
        continue
    ihl = (f[14] & 0xF) * 4
    if f[23] != 17:
        continue
    u = 14 + ihl
    if struct.unpack("!H", f[u + 2:u + 4])[0] != 4789:
        continue
    vni = struct.unpack("!I", f[u + 12:u + 16])[0] >> 8
    inner = f[u + 16:]
    if len(inner) >= 34 and inner[12:14] == b"\x08\x00":
        print(vni, socket.inet_ntoa(inner[26:30]), socket.inet_ntoa(inner[30:34]), flush=True)
"""


def sh(*args: str, check: bool = True) -> str:
    p = subprocess.run(args, capture_output=True, text=True, timeout=60)
    if check and p.returncode != 0:
        raise AssertionError(f"{' '.join(args)} -> {p.returncode}: {p.stderr.strip()}")
    return p.stdout


def in_ns(ns: str, *args: str, check: bool = True) -> str:
    return sh("nsenter", f"--net=/run/netns/{ns}", "--", *args, check=check)


def ping(ns: str, dst: str, count: int = 3) -> bool:
    return subprocess.run(["nsenter", f"--net=/run/netns/{ns}", "--", "ping", "-c", str(count), "-i", "0.2",
                           "-W", "2", dst], capture_output=True, timeout=30).returncode == 0


def ifindex(ns: str, dev: str) -> int:
    return json.loads(sh("ip", "-n", ns, "-j", "link", "show", dev))[0]["ifindex"]


def link_stats(ns: str, dev: str) -> dict:
    return json.loads(sh("ip", "-n", ns, "-s", "-j", "link", "show", dev))[0]["stats64"]


class Procs:
    """Background helpers started by this test, stopped by pid at the end."""

    def __init__(self):
        self.procs: list[subprocess.Popen] = []

    def start(self, ns: str, script: str, *args: str) -> subprocess.Popen:
        p = subprocess.Popen(["nsenter", f"--net=/run/netns/{ns}", "--", sys.executable, "-c", script, *args],
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        self.procs.append(p)
        assert p.stdout.readline().strip() == "ready", p.stderr.read() if p.poll() is not None else ""
        return p

    def stop(self, p: subprocess.Popen) -> str:
        p.terminate()
        out, _ = p.communicate(timeout=10)
        return out

    def close(self):
        for p in self.procs:
            if p.poll() is None:
                p.kill()
                p.wait(10)


def tcp(ns: str, dst: str, port: int, word: str = "hello", repeat: int = 1) -> str:
    return in_ns(ns, sys.executable, "-c", CLIENT, dst, str(port), word, str(repeat)).strip()


class Cluster:
    def __init__(self, routing: str):
        self.routing = routing
        self.tag = secrets.token_hex(3)
        self.netns: list[str] = []
        self.pins: list[str] = []
        self.dps: dict[int, NodeDatapath] = {}
        self.exs: list[NetnsExecutor] = []
        self.procs = Procs()

    def ns(self, role: str) -> str:
        name = f"tdo{role}{self.tag}"
        sh("ip", "netns", "add", name)
        self.netns.append(name)
        in_ns(name, "ip", "link", "set", "lo", "up")
        return name

    def build(self) -> "Cluster":
        mtu = "1450" if self.routing == "tunnel" else "1500"
        self.fabric = self.ns("fab")
        in_ns(self.fabric, "ip", "link", "add", "br0", "type", "bridge")
        in_ns(self.fabric, "ip", "link", "set", "br0", "up")
        self.nodes, self.pods = {}, {}

        def uplink(ns: str, port: str, addr: str):
            sh("ip", "-n", self.fabric, "link", "add", port, "type", "veth", "peer", "name", "eth0", "netns", ns)
            sh("ip", "-n", self.fabric, "link", "set", port, "master", "br0", "up")
            sh("ip", "-n", ns, "addr", "add", f"{addr}/16", "dev", "eth0")
            sh("ip", "-n", ns, "link", "set", "eth0", "up")

        self.world = self.ns("w")
        uplink(self.world, "pw", WORLD_UNDERLAY)
        # The world knows nothing about pod addresses: only masquerade lets replies back.
        sh("ip", "-n", self.world, "addr", "add", f"{WORLD_IP}/24", "dev", "lo")

        for n in (1, 2):
            node = self.nodes[n] = self.ns(f"n{n}")
            uplink(node, f"pn{n}", NODE_IPS[n])
            in_ns(node, "sysctl", "-qw", "net.ipv4.ip_forward=1")
            # Strict reverse-path filtering, the strictest a real host may have.
            in_ns(node, "sysctl", "-qw", "net.ipv4.conf.all.rp_filter=1", "net.ipv4.conf.default.rp_filter=1")
            if self.routing == "tunnel":
                sh("ip", "-n", node, "link", "add", "cilia_vxlan", "type", "vxlan", "external", "dstport", "4789")
                sh("ip", "-n", node, "link", "set", "cilia_vxlan", "arp", "off", "up")
            pod = self.pods[n] = self.ns(f"p{n}")
            sh("ip", "-n", node, "link", "add", "lxc0", "mtu", mtu, "type", "veth", "peer", "name", "eth0",
               "mtu", mtu, "netns", pod)
            sh("ip", "-n", node, "link", "set", "lxc0", "up")
            for cmd in (("link", "set", "eth0", "up"),
                        ("addr", "add", f"{POD_IPS[n]}/32", "dev", "eth0"),
                        ("route", "add", ROUTERS[n], "dev", "eth0", "scope", "link"),
                        ("route", "add", "default", "via", ROUTERS[n], "dev", "eth0")):
                sh("ip", "-n", pod, *cmd)
            # What the agent does per pod: the node routes to it through its veth.
            sh("ip", "-n", node, "route", "add", f"{POD_IPS[n]}/32", "dev", "lxc0", "scope", "link")
            sh("ip", "-n", node, "route", "add", f"{WORLD_IP}/32", "via", WORLD_UNDERLAY, "dev", "eth0")

        for n, peer in ((1, 2), (2, 1)):
            node = self.nodes[n]
            peer_cidr = f"10.244.{peer}.0/24"
            if self.routing == "tunnel":
                sh("ip", "-n", node, "route", "add", peer_cidr, "dev", "cilia_vxlan")
            else:
                sh("ip", "-n", node, "route", "add", peer_cidr, "via", NODE_IPS[peer], "dev", "eth0")
        return self

    def load(self) -> "Cluster":
        for n in (1, 2):
            node = self.nodes[n]
            pins = f"/sys/fs/bpf/cilia/test-{secrets.token_hex(4)}"
            self.pins.append(pins)
            tunnel = ifindex(node, "cilia_vxlan") if self.routing == "tunnel" else 0
            cfg = NodeConfig(node_ip4=NODE_IPS[n], router_ip4=ROUTERS[n], pod_cidr4=f"10.244.{n}.0/24",
                             routing=self.routing, tunnel_ifindex=tunnel, native_ifindex=ifindex(node, "eth0"),
                             cluster_cidr4="10.244.0.0/16", masquerade=True)
            dp = self.dps[n] = NodeDatapath(pins, cfg).load()
            ex = NetnsExecutor(f"/run/netns/{node}")
            self.exs.append(ex)
            lxc = json.loads(sh("ip", "-n", node, "-j", "link", "show", "lxc0"))[0]
            pod_mac = json.loads(sh("ip", "-n", self.pods[n], "-j", "link", "show", "eth0"))[0]["address"]
            dp.upsert_endpoint(EndpointEntry(POD_IPS[n], lxc["ifindex"], n, pod_mac, lxc["address"],
                                             sec_id=POD_IDS[n]))
            ex.run(dp.attach_endpoint, lxc["ifindex"])
            ex.run(dp.attach_netdev, ifindex(node, "eth0"))
            if tunnel:
                ex.run(dp.attach_overlay, tunnel)
            peer = 3 - n
            dp.sync_ipcache({
                POD_IPS[n]: (POD_IDS[n], None, 0),
                POD_IPS[peer]: (POD_IDS[peer], NODE_IPS[peer], 0),
                # As Cilium does in tunnel mode: pod -> remote node goes through the tunnel
                # too, so replies to the node's host come back on the device the node
                # routes that pod CIDR to (strict rp_filter accepts them).
                NODE_IPS[peer]: (abi.IDENTITY_REMOTE_NODE, NODE_IPS[peer] if tunnel else None,
                                 abi.IPCACHE_F_REMOTE_NODE),
            })
        return self

    def close(self):
        self.procs.close()
        for ex in self.exs:
            ex.close()
        for dp in self.dps.values():
            dp.close()
        for ns in self.netns:
            subprocess.run(["ip", "netns", "del", ns], capture_output=True)
        for pins in self.pins:
            NodeDatapath.remove_pins(pins)


@pytest.fixture
def cluster():
    made: list[Cluster] = []

    def make(routing: str) -> Cluster:
        c = Cluster(routing)
        made.append(c)
        return c.build().load()

    yield make
    for c in made:
        c.close()
    listed = sh("ip", "netns", "list")
    for c in made:
        assert not any(ns in listed for ns in c.netns)
        assert not any(os.path.exists(p) for p in c.pins)


def forwarded(pin_dir: str, direction: int) -> int:
    total = 0
    for e in json.loads(sh("bpftool", "-j", "map", "dump", "pinned", f"{pin_dir}/cilia_metrics")):
        f = e["formatted"]
        if f["key"]["reason"] == 0 and f["key"]["dir"] == direction:
            total += sum(v["value"]["count"] for v in f["values"])
    return total


def test_tunnel_mode_pods_talk_across_nodes_with_identity_in_the_vni(cluster):
    c = cluster("tunnel")
    p1, p2 = c.pods[1], c.pods[2]
    sniffer = c.procs.start(c.nodes[2], SNIFFER, "eth0")
    before = link_stats(c.nodes[1], "cilia_vxlan")["tx"]["packets"]

    assert ping(p1, POD_IPS[2]), "pod1 -> pod2 over VXLAN"
    assert ping(p2, POD_IPS[1]), "pod2 -> pod1 over VXLAN"
    server = c.procs.start(p2, SERVER, "8080")
    # Large enough to need several segments: checksum offload state survives the tunnel.
    reply = tcp(p1, POD_IPS[2], 8080, "x", 20000)
    assert reply.startswith(f"peer={POD_IPS[1]} len=20000 data=xxxx"), reply  # in-cluster: no masquerade
    # The node's own traffic to a remote pod: routed into cilia_vxlan, keyed by cil_to_overlay.
    assert ping(c.nodes[1], POD_IPS[2])
    assert ping(p1, NODE_IPS[2]), "pod -> remote node, through the tunnel"
    c.procs.stop(server)

    assert link_stats(c.nodes[1], "cilia_vxlan")["tx"]["packets"] >= before + 6
    seen = {tuple(line.split()) for line in c.procs.stop(sniffer).splitlines()}
    assert (str(POD_IDS[1]), POD_IPS[1], POD_IPS[2]) in seen, seen
    assert (str(POD_IDS[2]), POD_IPS[2], POD_IPS[1]) in seen, seen
    assert (str(abi.IDENTITY_HOST), NODE_IPS[1], POD_IPS[2]) in seen, seen
    assert (str(POD_IDS[1]), POD_IPS[1], NODE_IPS[2]) in seen, seen
    assert forwarded(c.pins[1], abi.METRIC_INGRESS) > 0, "node2 delivered through cil_from_overlay"
    # No underlay route exists for pod CIDRs: the tunnel was the only way.
    assert "10.244.2.0/24 dev cilia_vxlan" in in_ns(c.nodes[1], "ip", "route", "show", "10.244.2.0/24")


def test_tunnel_endpoint_missing_drops_host_traffic(cluster):
    c = cluster("tunnel")
    c.dps[1].delete_ipcache(POD_IPS[2])
    assert not ping(c.nodes[1], POD_IPS[2], count=1)
    drops = {(m["reason"], m["direction"]): m["packets"] for m in c.dps[1].metrics()}
    assert drops.get((160, "EGRESS"), 0) >= 1
    # Pod traffic without a tunnel endpoint falls back to the stack, which routes it into
    # cilia_vxlan too: dropped there the same way, never sent without a key.
    assert not ping(c.pods[1], POD_IPS[2], count=1)


def test_native_routing_pods_talk_across_nodes(cluster):
    c = cluster("native")
    p1, p2 = c.pods[1], c.pods[2]
    before = forwarded(c.pins[1], abi.METRIC_INGRESS)
    assert ping(p1, POD_IPS[2])
    assert ping(p2, POD_IPS[1])
    server = c.procs.start(p2, SERVER, "8081")
    reply = tcp(p1, POD_IPS[2], 8081, "y", 20000)
    assert reply.startswith(f"peer={POD_IPS[1]} len=20000 data=yyyy"), reply
    c.procs.stop(server)
    assert forwarded(c.pins[1], abi.METRIC_INGRESS) >= before + 3, "node2's cil_from_netdev delivered"
    assert ping(c.nodes[1], POD_IPS[2]), "node host -> remote pod"
    assert ping(p1, NODE_IPS[2]), "pod -> remote node"
    assert "cilia_vxlan" not in in_ns(c.nodes[1], "ip", "link", "show")


@pytest.mark.parametrize("routing", ["tunnel", "native"])
def test_pod_to_world_is_masqueraded_and_replies_return(cluster, routing):
    c = cluster(routing)
    p1 = c.pods[1]
    server = c.procs.start(c.world, SERVER, "8082")
    reply = tcp(p1, WORLD_IP, 8082, "z", 20000)
    assert reply.startswith(f"peer={NODE_IPS[1]} len=20000 data=zzzz"), reply
    reply2 = tcp(p1, WORLD_IP, 8082, "w")
    assert reply2.startswith(f"peer={NODE_IPS[1]} len=1 data=w"), reply2
    assert ping(p1, WORLD_IP)
    c.procs.stop(server)

    def be(ip: str) -> int:
        return struct.unpack("=I", socket.inet_aton(ip))[0]

    def port_be(port: int) -> int:
        return struct.unpack("=H", struct.pack("!H", port))[0]

    fwd = [e["formatted"] for e in json.loads(sh("bpftool", "-j", "map", "dump", "pinned",
                                                  f"{c.pins[0]}/cilia_snat_v4"))]
    rev = [e["formatted"] for e in json.loads(sh("bpftool", "-j", "map", "dump", "pinned",
                                                  f"{c.pins[0]}/cilia_snat_v4_rev"))]
    tcp_out = [e for e in fwd if e["key"]["nexthdr"] == 6 and e["key"]["dport"] == port_be(8082)]
    assert len(tcp_out) == 2, fwd
    for e in tcp_out:
        assert (e["key"]["saddr"], e["key"]["daddr"], e["value"]["to_addr"]) == \
            (be(POD_IPS[1]), be(WORLD_IP), be(NODE_IPS[1]))
    assert any(e["key"]["nexthdr"] == 1 for e in fwd), "ICMP echo entry"
    tcp_in = [e for e in rev if e["key"]["nexthdr"] == 6 and e["key"]["sport"] == port_be(8082)]
    assert {e["value"]["to_addr"] for e in tcp_in} == {be(POD_IPS[1])}
    assert {e["key"]["daddr"] for e in tcp_in} == {be(NODE_IPS[1])}
    # Pod-to-pod traffic never created NAT state.
    assert not any(e["key"]["daddr"] == be(POD_IPS[2]) for e in fwd)


def test_world_reply_without_masquerade_never_arrives(cluster):
    # Control for the test above: the same pod and server, masquerade off on node1.
    c = cluster("native")
    cfg = c.dps[1].config
    cfg.masquerade = False
    dp = NodeDatapath(c.pins[0], cfg).load()
    try:
        ex = c.exs[0]
        ex.run(dp.attach_netdev, ifindex(c.nodes[1], "eth0"))
        server = c.procs.start(c.world, SERVER, "8083")
        p = subprocess.run(["nsenter", f"--net=/run/netns/{c.pods[1]}", "--", sys.executable, "-c", CLIENT,
                            WORLD_IP, "8083", "v", "1"], capture_output=True, text=True, timeout=30)
        assert p.returncode != 0, p.stdout
        c.procs.stop(server)
    finally:
        dp.close()

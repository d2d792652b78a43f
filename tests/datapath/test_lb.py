"""Service load balancing through BPF_PROG_TEST_RUN: packet in -> verdict + packet out.

East-west (cil_from_container), reverse translation wherever a pod gets a packet,
hairpin, and north-south (cil_from_netdev) to local and remote backends. Checksums are
recomputed in Python (tests/datapath/packets.py), never trusted from the helpers; the
Maglev expectation comes from a table the test builds itself."""

from __future__ import annotations

import collections
import ctypes
import json
import os
import random
import statistics
import time

import pytest

from cilia.datapath import abi, reasons
from cilia.datapath import libbpf as lb
from cilia.datapath.lb import LBBackend, LBService, maglev_slot
from cilia.datapath.node import EndpointEntry, NodeConfig
from cilia.datapath.testrun import TC_ACT_OK, TC_ACT_REDIRECT, TC_ACT_SHOT, prog_test_run, skb_ctx

from . import packets as P
from .conftest import _sh

NODE_IP = "192.168.80.11"
GATEWAY, GATEWAY_MAC = "192.168.80.1", "02:00:00:00:99:01"
PEER_NODE = "192.168.80.12"
ROUTER = "10.244.1.1"
WORLD = "198.51.100.10"
VIP, LB_IP = "10.96.0.10", "203.0.113.50"
HAIRPIN = "169.254.42.1"
PODS = {  # name: (ip, mac, node-side mac)
    "a": ("10.244.1.11", "0a:00:00:01:00:11", "ee:00:00:01:00:11"),
    "b1": ("10.244.1.21", "0a:00:00:01:00:21", "ee:00:00:01:00:21"),
    "b2": ("10.244.1.22", "0a:00:00:01:00:22", "ee:00:00:01:00:22"),
    "b3": ("10.244.1.23", "0a:00:00:01:00:23", "ee:00:00:01:00:23"),
}
REMOTE = "10.244.2.7"  # a backend pod on PEER_NODE
A = PODS["a"][0]
FROM_LXC, TO_LXC = "cil_from_container", "cil_to_container"
FROM_NET, FROM_OVL = "cil_from_netdev", "cil_from_overlay"
TCP, UDP = 6, 17
MAGIC = 0x7E57C0DE


class Node:
    """A loaded datapath with pods a, b1..b3, an uplink with a default route through a
    gateway whose MAC is known, and a collect_md VXLAN device."""

    def __init__(self, netns, mkdp, run):
        self.ns, self.mkdp, self.run = netns, mkdp, run
        self.uplink = netns.veth()
        n = netns.name
        # bpf_fib_lookup refuses to route on a device that does not forward.
        _sh("ip", "netns", "exec", n, "sysctl", "-qw", "net.ipv4.ip_forward=1")
        _sh("ip", "-n", n, "link", "set", f"tdpb{netns._n}", "up")
        _sh("ip", "-n", n, "addr", "add", f"{NODE_IP}/24", "dev", f"tdpa{netns._n}")
        _sh("ip", "-n", n, "neigh", "add", GATEWAY, "lladdr", GATEWAY_MAC, "dev", f"tdpa{netns._n}",
            "nud", "permanent")
        _sh("ip", "-n", n, "route", "add", "default", "via", GATEWAY)
        self.uplink_mac = json.loads(_sh("ip", "-n", n, "-j", "link", "show", f"tdpa{netns._n}"))[0]["address"]
        _sh("ip", "-n", n, "link", "add", "cilia_vxlan", "type", "vxlan", "external", "dstport", "4789")
        _sh("ip", "-n", n, "link", "set", "cilia_vxlan", "arp", "off", "up")
        self.vxlan = json.loads(_sh("ip", "-n", n, "-j", "link", "show", "cilia_vxlan"))[0]["ifindex"]
        self.ifindex = {name: netns.veth() for name in PODS}

    def load(self, routing="native", obj_dir=None, **kw):
        cfg = NodeConfig(node_ip4=NODE_IP, router_ip4=ROUTER, pod_cidr4="10.244.1.0/24", routing=routing,
                         tunnel_ifindex=self.vxlan if routing == "tunnel" else 0, native_ifindex=self.uplink,
                         cluster_cidr4="10.244.0.0/16", **kw)
        self.dp = self.mkdp(cfg, obj_dir)
        for i, (name, (ip, mac, node_mac)) in enumerate(PODS.items()):
            self.dp.upsert_endpoint(EndpointEntry(ip, self.ifindex[name], 10 + i, mac, node_mac, sec_id=1000 + i))
        self.dp.upsert_ipcache(REMOTE, 5000, PEER_NODE)
        self.run.dp = self.dp
        return self.dp

    def send(self, prog, frame, pod=None, cb=None):
        return self.run(prog, frame, self.ifindex[pod] if pod else self.uplink, cb=cb)


@pytest.fixture
def node(netns, mkdp, run):
    return Node(netns, mkdp, run)


def be(name: str, id_: int, port: int = 8080, proto: int = TCP, state: str = "active") -> LBBackend:
    return LBBackend(id_, PODS[name][0], port, proto, state)


def tcp_frame(src, dst, sport, dport, payload=b"GET / HTTP/1.1\r\n\r\n", ttl=64):
    return P.frame4(src, dst, P.IPPROTO_TCP, P.tcp(src, dst, sport, dport, payload), ttl=ttl)


def udp_frame(src, dst, sport, dport, payload=b"\x12\x34 query", csum=True):
    l4 = P.udp_csum(src, dst, sport, dport, payload) if csum else P.udp(sport, dport, payload)
    return P.frame4(src, dst, P.IPPROTO_UDP, l4)


def checked(r, verdict=TC_ACT_REDIRECT) -> dict:
    assert r.retval == verdict, r.retval
    assert P.ip_csum_ok(r.data_out), "IP header checksum"
    assert P.l4_csum_ok(r.data_out), "L4 checksum"
    return P.parse4(r.data_out)


def metric(dp, reason: int, direction: str) -> int:
    return sum(m["packets"] for m in dp.metrics() if m["reason"] == reason and m["direction"] == direction)


def pod_of(ip: str) -> str:
    return next(n for n, p in PODS.items() if p[0] == ip)


# --- east-west ------------------------------------------------------------------

def test_clusterip_tcp_is_dnated_with_valid_checksums_and_delivered(node):
    dp = node.load()
    dp.upsert_service(1, VIP, 80, TCP, [be("b1", 1)])
    frame = tcp_frame(A, VIP, 40000, 80)
    out = checked(node.send(FROM_LXC, frame, "a"))
    assert (out["src"], out["sport"], out["dst"], out["dport"]) == (A, 40000, PODS["b1"][0], 8080)
    assert out["l4"][20:] == P.parse4(frame)["l4"][20:], "payload untouched"
    assert out["ttl"] == 63
    r = node.send(FROM_LXC, frame, "a")
    assert P.parse_eth(r.data_out)[:2] == (P.mac(PODS["b1"][1]), P.mac(PODS["b1"][2]))
    assert metric(dp, 0, "EGRESS") == 2


@pytest.mark.parametrize("csum", [True, False])
def test_clusterip_udp_dnat(node, csum):
    dp = node.load()
    dp.upsert_service(2, VIP, 53, UDP, [be("b2", 2, 5353, UDP)])
    out = checked(node.send(FROM_LXC, udp_frame(A, VIP, 33333, 53, csum=csum), "a"))
    assert (out["dst"], out["dport"], out["sport"]) == (PODS["b2"][0], 5353, 33333)
    assert (out["l4"][6:8] == b"\0\0") == (not csum), "a zero UDP checksum means none and stays zero"
    # TCP to the same address and port is another frontend, which does not exist.
    frame = tcp_frame(A, VIP, 33333, 53)
    assert node.send(FROM_LXC, frame, "a").data_out == frame


def test_reply_gets_the_frontend_back_on_local_delivery(node):
    dp = node.load()
    dp.upsert_service(1, VIP, 80, TCP, [be("b1", 1)])
    checked(node.send(FROM_LXC, tcp_frame(A, VIP, 40000, 80), "a"))
    reply = tcp_frame(PODS["b1"][0], A, 8080, 40000, b"HTTP/1.1 200 OK\r\n")
    out = checked(node.send(FROM_LXC, reply, "b1"))
    assert (out["src"], out["sport"], out["dst"], out["dport"]) == (VIP, 80, A, 40000)
    assert P.parse_eth(node.send(FROM_LXC, reply, "b1").data_out)[0] == P.mac(PODS["a"][1])
    # Another client port was never balanced: its packets pass untranslated.
    other = tcp_frame(PODS["b1"][0], A, 8080, 40001)
    assert P.parse4(node.send(FROM_LXC, other, "b1").data_out)["src"] == PODS["b1"][0]
    # Through the stack into the pod (cil_to_container) the same translation applies.
    r = node.send(TO_LXC, reply, "a")
    assert r.retval == TC_ACT_OK and P.parse4(r.data_out)["src"] == VIP and P.l4_csum_ok(r.data_out)


def test_direct_connection_reusing_a_finished_service_flows_ports_is_not_translated(node):
    dp = node.load()
    dp.upsert_service(1, VIP, 80, TCP, [be("b1", 1)])
    checked(node.send(FROM_LXC, tcp_frame(A, VIP, 40100, 80), "a"))
    # Later the same client port opens a direct connection to the backend (a SYN).
    syn = P.frame4(A, PODS["b1"][0], P.IPPROTO_TCP, P.tcp(A, PODS["b1"][0], 40100, 8080, flags=0x02))
    out = checked(node.send(FROM_LXC, syn, "a"))
    assert (out["dst"], out["dport"]) == (PODS["b1"][0], 8080)
    # Its replies keep the backend's address: the old flow's reply entry is gone.
    reply = tcp_frame(PODS["b1"][0], A, 8080, 40100, b"")
    out = P.parse4(node.send(FROM_LXC, reply, "b1").data_out)
    assert (out["src"], out["sport"]) == (PODS["b1"][0], 8080)


@pytest.mark.parametrize("routing", ["tunnel", "native"])
def test_remote_backend_reply_is_reversed_where_it_reaches_the_client(node, test_build_dir, routing):
    dp = node.load(routing, obj_dir=test_build_dir)
    dp.upsert_service(1, VIP, 80, TCP, [LBBackend(9, REMOTE, 8080)])
    r = node.send(FROM_LXC, tcp_frame(A, VIP, 40000, 80), "a", cb=())
    out = P.parse4(r.data_out)
    assert (out["dst"], out["dport"]) == (REMOTE, 8080)
    if routing == "tunnel":
        assert r.retval == TC_ACT_REDIRECT and r.cb[3] == MAGIC and r.cb[0] == 1000, "encapsulated as pod a"
    else:
        assert r.retval == TC_ACT_OK, "native: the stack routes to the peer node"
    reply = tcp_frame(REMOTE, A, 8080, 40000, b"pong", ttl=63)
    prog, cb = (FROM_OVL, (5000, 0, 0, MAGIC)) if routing == "tunnel" else (FROM_NET, None)
    out = checked(node.send(prog, reply, cb=cb))
    assert (out["src"], out["sport"], out["dst"], out["dport"]) == (VIP, 80, A, 40000)


def test_a_flow_keeps_its_backend(node):
    dp = node.load()
    dp.upsert_service(1, VIP, 80, TCP, [be("b1", 1), be("b2", 2), be("b3", 3)])
    for sport in range(41000, 41010):
        dsts = {P.parse4(node.send(FROM_LXC, tcp_frame(A, VIP, sport, 80, bytes([i])), "a").data_out)["dst"]
                for i in range(15)}
        assert len(dsts) == 1, dsts
    ct = dp.ct_entries()
    assert len([e for e in ct if e["type"] == "service"]) == 10
    assert len([e for e in ct if e["type"] == "reply"]) == 10
    assert all(e["rev_nat"] == 1 for e in ct)


def test_random_selection_is_even_over_three_backends(node):
    dp = node.load()
    dp.upsert_service(1, VIP, 80, TCP, [be("b1", 1), be("b2", 2), be("b3", 3)])
    n = 3000
    counts = collections.Counter(
        P.parse4(node.send(FROM_LXC, tcp_frame(A, VIP, 10000 + i, 80), "a").data_out)["dst"] for i in range(n))
    assert set(counts) == {PODS[b][0] for b in ("b1", "b2", "b3")}
    chi2 = sum((c - n / 3) ** 2 / (n / 3) for c in counts.values())
    # 2 degrees of freedom: P(chi2 > 18.4) = 1e-4 for a fair choice.
    assert chi2 < 18.4, (counts, chi2)


def test_maglev_follows_the_table_it_was_given(node):
    dp = node.load(maglev_table_size=251)
    rng = random.Random(7)
    table = [rng.choice([1, 2, 3]) for _ in range(251)]
    dp.upsert_service(4, VIP, 443, TCP, [be("b1", 1), be("b2", 2), be("b3", 3)], algorithm="maglev",
                      maglev_table=table)
    assert dp.maglev_table(4) == table
    ids = {PODS[b][0]: i for i, b in ((1, "b1"), (2, "b2"), (3, "b3"))}
    for i in range(300):
        sport = 20000 + i * 7
        out = P.parse4(node.send(FROM_LXC, tcp_frame(A, VIP, sport, 443), "a").data_out)
        assert ids[out["dst"]] == table[maglev_slot(A, VIP, sport, 443, TCP, 251)], i
    # A new table for the same service replaces the old one whole.
    dp.upsert_service(4, VIP, 443, TCP, [be("b1", 1), be("b2", 2), be("b3", 3)], algorithm="maglev",
                      maglev_table=[2] * 251)
    dp.lb.flush_ct()
    assert {P.parse4(node.send(FROM_LXC, tcp_frame(A, VIP, 30000 + i, 443), "a").data_out)["dst"]
            for i in range(30)} == {PODS["b2"][0]}
    with pytest.raises(ValueError, match="M is 251"):
        dp.upsert_service(4, VIP, 443, TCP, [be("b1", 1)], algorithm="maglev", maglev_table=[1] * 16381)
    with pytest.raises(ValueError, match="not active"):
        dp.upsert_service(4, VIP, 443, TCP, [be("b1", 1)], algorithm="maglev", maglev_table=[2] * 251)
    # Back to random: the table goes away after the service entry stops naming it.
    dp.upsert_service(4, VIP, 443, TCP, [be("b1", 1)])
    assert dp.maglev_table(4) is None


def test_terminating_backend_keeps_its_flow_and_gets_no_new_ones(node):
    dp = node.load()
    dp.upsert_service(1, VIP, 80, TCP, [be("b1", 1)])
    old = tcp_frame(A, VIP, 45000, 80)
    assert P.parse4(node.send(FROM_LXC, old, "a").data_out)["dst"] == PODS["b1"][0]
    dp.upsert_service(1, VIP, 80, TCP, [be("b1", 1, state="terminating"), be("b2", 2), be("b3", 3)])
    assert [b["id"] for b in dp.services()[0]["backends"]] == [2, 3]
    for _ in range(5):
        assert P.parse4(node.send(FROM_LXC, old, "a").data_out)["dst"] == PODS["b1"][0]
    new = {P.parse4(node.send(FROM_LXC, tcp_frame(A, VIP, 46000 + i, 80), "a").data_out)["dst"]
           for i in range(200)}
    assert new == {PODS["b2"][0], PODS["b3"][0]}
    # Once the control plane deletes the backend, its established flow moves on.
    assert dp.delete_backend(1)
    assert P.parse4(node.send(FROM_LXC, old, "a").data_out)["dst"] in new


def test_service_without_active_backends_drops_with_cilium_reason(node):
    dp = node.load()
    dp.upsert_service(1, VIP, 80, TCP, [be("b1", 1, state="terminating")])
    frame = tcp_frame(A, VIP, 40000, 80)
    r = node.send(FROM_LXC, frame, "a")
    assert r.retval == TC_ACT_SHOT
    dp.upsert_service(1, VIP, 80, TCP, [])
    assert node.send(FROM_LXC, frame, "a").retval == TC_ACT_SHOT
    assert metric(dp, reasons.DROP_NO_SERVICE, "EGRESS") == 2
    assert reasons.reason_name(reasons.DROP_NO_SERVICE) == "Service backend not found"
    assert dp.ct_entries() == []


def test_session_affinity_sticks_per_client(node):
    dp = node.load()
    dp.upsert_service(1, VIP, 80, TCP, [be("b1", 1), be("b2", 2), be("b3", 3)], affinity_timeout=300)
    assert "SessionAffinity" in dp.services()[0]["flags"]
    dsts = {P.parse4(node.send(FROM_LXC, tcp_frame(A, VIP, 50000 + i, 80), "a").data_out)["dst"]
            for i in range(60)}
    assert len(dsts) == 1
    # The same number of flows without affinity spreads (control for the assertion above).
    dp.upsert_service(5, "10.96.0.11", 80, TCP, [be("b1", 1), be("b2", 2), be("b3", 3)])
    spread = {P.parse4(node.send(FROM_LXC, tcp_frame(A, "10.96.0.11", 50000 + i, 80), "a").data_out)["dst"]
              for i in range(60)}
    assert len(spread) == 3
    # An expired affinity entry lets the next flow be balanced anew.
    aff = dp._map("cilia_lb4_affinity")
    (k, v), = aff.lookup_batch()
    v.last_used -= 301
    aff.update(k, v)
    seen = set()
    for i in range(60):
        v = aff.lookup(k)
        v.last_used -= 301
        aff.update(k, v)
        seen.add(P.parse4(node.send(FROM_LXC, tcp_frame(A, VIP, 52000 + i, 80), "a").data_out)["dst"])
    assert len(seen) > 1


def test_hairpin_through_own_service(node):
    dp = node.load()
    dp.upsert_service(1, VIP, 80, TCP, [be("a", 7)])
    out = checked(node.send(FROM_LXC, tcp_frame(A, VIP, 40000, 80), "a"))
    assert (out["src"], out["sport"], out["dst"], out["dport"]) == (HAIRPIN, 40000, A, 8080)
    assert P.parse_eth(node.send(FROM_LXC, tcp_frame(A, VIP, 40000, 80), "a").data_out)[0] == P.mac(PODS["a"][1])
    back = checked(node.send(FROM_LXC, tcp_frame(A, HAIRPIN, 8080, 40000, b"hi"), "a"))
    assert (back["src"], back["sport"], back["dst"], back["dport"]) == (VIP, 80, A, 40000)
    assert [e["flags"] for e in dp.ct_entries() if e["type"] == "reply"] == [["hairpin"]]


def test_internal_traffic_policy_local_uses_the_internal_scope(node):
    dp = node.load()
    # NodePort with ETP=Local: outside clients only reach local b1; pods reach everything.
    dp.upsert_service(3, NODE_IP, 30080, TCP, [be("b1", 1)], kind="NodePort", local_only=True)
    dp.upsert_service(3, NODE_IP, 30080, TCP, [LBBackend(9, REMOTE, 8080)], kind="NodePort", scope="internal")
    rows = {r["scope"]: r for r in dp.services()}
    assert "TwoScopes" in rows["external"]["flags"] and "ETP-Local" in rows["external"]["flags"]
    assert P.parse4(node.send(FROM_LXC, tcp_frame(A, NODE_IP, 40000, 30080), "a").data_out)["dst"] == REMOTE
    assert P.parse4(node.send(FROM_NET, tcp_frame(WORLD, NODE_IP, 40000, 30080)).data_out)["dst"] == PODS["b1"][0]
    dp.delete_service(NODE_IP, 30080, TCP, scope="internal")
    assert "TwoScopes" not in dp.services()[0]["flags"]
    assert P.parse4(node.send(FROM_LXC, tcp_frame(A, NODE_IP, 40001, 30080), "a").data_out)["dst"] == PODS["b1"][0]


# --- north-south ----------------------------------------------------------------

def test_nodeport_to_local_backend_keeps_client_ip_and_reply_leaves_by_the_uplink(node):
    dp = node.load()
    dp.upsert_service(3, NODE_IP, 30080, TCP, [be("b1", 1)], kind="NodePort")
    out = checked(node.send(FROM_NET, tcp_frame(WORLD, NODE_IP, 50000, 30080, ttl=60)))
    assert (out["src"], out["sport"], out["dst"], out["dport"], out["ttl"]) == (WORLD, 50000, PODS["b1"][0], 8080, 59)
    r = node.send(FROM_LXC, tcp_frame(PODS["b1"][0], WORLD, 8080, 50000, b"ok"), "b1")
    back = checked(r)
    assert (back["src"], back["sport"], back["dst"], back["dport"]) == (NODE_IP, 30080, WORLD, 50000)
    assert P.parse_eth(r.data_out)[:2] == (P.mac(GATEWAY_MAC), P.mac(node.uplink_mac)), "routed by the FIB"
    assert [e["flags"] for e in dp.ct_entries() if e["type"] == "reply"] == [["nodeport"]]


def test_loadbalancer_ip_and_external_ip_frontends(node):
    dp = node.load()
    dp.upsert_service(6, LB_IP, 443, TCP, [be("b2", 2, 8443)], kind="LoadBalancer")
    dp.upsert_service(7, "203.0.113.60", 80, TCP, [be("b3", 3)], kind="ExternalIP")
    assert checked(node.send(FROM_NET, tcp_frame(WORLD, LB_IP, 50000, 443)))["dst"] == PODS["b2"][0]
    assert checked(node.send(FROM_NET, tcp_frame(WORLD, "203.0.113.60", 50000, 80)))["dst"] == PODS["b3"][0]
    assert {s["kind"] for s in dp.services()} == {"LoadBalancer", "ExternalIP"}


def test_clusterip_is_not_a_frontend_from_outside(node):
    dp = node.load()
    dp.upsert_service(1, VIP, 80, TCP, [be("b1", 1)])
    frame = tcp_frame(WORLD, VIP, 50000, 80)
    r = node.send(FROM_NET, frame)
    assert (r.retval, r.data_out) == (TC_ACT_OK, frame)
    assert dp.ct_entries() == []


def test_nodeport_to_remote_backend_over_the_tunnel_snats_and_reverses(node, test_build_dir):
    dp = node.load("tunnel", obj_dir=test_build_dir)
    dp.upsert_service(3, NODE_IP, 30080, TCP, [LBBackend(9, REMOTE, 8080)], kind="NodePort")
    r = node.send(FROM_NET, tcp_frame(WORLD, NODE_IP, 50000, 30080), cb=())
    out = checked(r)
    assert (out["src"], out["dst"], out["dport"]) == (NODE_IP, REMOTE, 8080)
    nat_port = out["sport"]
    assert r.cb[3] == MAGIC and r.cb[0] == abi.IDENTITY_WORLD
    assert r.cb[1] == int.from_bytes(P.ip(PEER_NODE), "big")
    nat = {(e["direction"], e["saddr"], e["sport"]): (e["to_addr"], e["to_port"]) for e in dp.nat_entries()}
    assert nat[("OUT", WORLD, 50000)] == (NODE_IP, nat_port)
    # The backend answers the node IP; it arrives decapsulated.
    reply = tcp_frame(REMOTE, NODE_IP, 8080, nat_port, b"HTTP/1.1 200 OK\r\n", ttl=63)
    r = node.send(FROM_OVL, reply, cb=(5000, 0, 0, MAGIC))
    back = checked(r)
    assert (back["src"], back["sport"], back["dst"], back["dport"]) == (NODE_IP, 30080, WORLD, 50000)
    assert P.parse_eth(r.data_out)[:2] == (P.mac(GATEWAY_MAC), P.mac(node.uplink_mac))
    assert {tuple(e["flags"]) for e in dp.ct_entries() if e["type"] == "reply"} == {("nodeport", "snat")}


def test_nodeport_to_remote_backend_native_routes_by_fib_and_reverses(node):
    dp = node.load("native")
    _sh("ip", "-n", node.ns.name, "neigh", "add", PEER_NODE, "lladdr", "02:00:00:00:99:12", "dev",
        f"tdpa{1}", "nud", "permanent")
    _sh("ip", "-n", node.ns.name, "route", "add", "10.244.2.0/24", "via", PEER_NODE)
    dp.upsert_service(3, NODE_IP, 30080, UDP, [LBBackend(9, REMOTE, 5353, UDP)], kind="NodePort")
    r = node.send(FROM_NET, udp_frame(WORLD, NODE_IP, 5000, 30080))
    out = checked(r)
    assert (out["src"], out["dst"], out["dport"]) == (NODE_IP, REMOTE, 5353)
    assert P.parse_eth(r.data_out)[0] == P.mac("02:00:00:00:99:12"), "to the backend's node"
    back = checked(node.send(FROM_NET, udp_frame(REMOTE, NODE_IP, 5353, out["sport"], b"answer")))
    assert (back["src"], back["sport"], back["dst"], back["dport"]) == (NODE_IP, 30080, WORLD, 5000)
    # Masquerade is off here: the NodePort reverse SNAT does not depend on it.
    assert not dp.config.masquerade


def test_etp_local_never_snats_and_refuses_remote_backends(node):
    dp = node.load()
    dp.upsert_service(3, NODE_IP, 30080, TCP, [be("b1", 1)], kind="NodePort", local_only=True)
    out = checked(node.send(FROM_NET, tcp_frame(WORLD, NODE_IP, 50000, 30080)))
    assert (out["src"], out["dst"]) == (WORLD, PODS["b1"][0])
    assert dp.nat_entries() == []
    dp.upsert_service(3, NODE_IP, 30080, TCP, [LBBackend(9, REMOTE, 8080)], kind="NodePort", local_only=True)
    r = node.send(FROM_NET, tcp_frame(WORLD, NODE_IP, 50001, 30080))
    assert r.retval == TC_ACT_SHOT
    assert metric(dp, reasons.DROP_NO_SERVICE, "INGRESS") == 1
    assert dp.nat_entries() == []


def test_host_traffic_to_the_node_ip_is_untouched(node):
    dp = node.load()
    dp.upsert_service(3, NODE_IP, 30080, TCP, [be("b1", 1)], kind="NodePort")
    for frame in (tcp_frame(WORLD, NODE_IP, 50000, 22), udp_frame(WORLD, NODE_IP, 5000, 30080),
                  P.frame4(WORLD, NODE_IP, P.IPPROTO_ICMP, P.icmp_echo(7))):
        r = node.send(FROM_NET, frame)
        assert (r.retval, r.data_out) == (TC_ACT_OK, frame)


# --- control plane API ------------------------------------------------------------

def test_lb_list_and_shrinking_removes_stale_slots(node):
    dp = node.load()
    dp.upsert_service(1, VIP, 80, TCP, [be("b1", 1), be("b2", 2), be("b3", 3)])
    svc, = dp.services()
    assert (svc["frontend"], svc["kind"], svc["rev_nat"], svc["scope"]) == (f"{VIP}:80/TCP", "ClusterIP", 1, "external")
    assert [(b["id"], b["address"], b["port"], b["state"]) for b in svc["backends"]] == \
        [(1, PODS["b1"][0], 8080, "active"), (2, PODS["b2"][0], 8080, "active"), (3, PODS["b3"][0], 8080, "active")]
    dp.upsert_service(1, VIP, 80, TCP, [be("b3", 3)])
    slots = sorted(k.backend_slot for k, _ in dp._map("cilia_lb4_services").lookup_batch())
    assert slots == [0, 1]
    assert dp.lb.reverse_nat() == {1: f"{VIP}:80"}
    assert dp.delete_service(VIP, 80, TCP)
    assert not dp.delete_service(VIP, 80, TCP)
    assert dp._map("cilia_lb4_services").lookup_batch() == []
    assert dp.lb.reverse_nat() == {}
    assert sorted(dp.lb_backends()) == [1, 2, 3], "backends outlive the service until delete_backend"
    for bad in (dict(kind="Ingress"), dict(scope="both"), dict(algorithm="rr"), dict(algorithm="maglev")):
        with pytest.raises(ValueError):
            dp.upsert_service(1, VIP, 80, TCP, [be("b1", 1)], **bad)
    with pytest.raises(ValueError):
        dp.upsert_service(0, VIP, 80, TCP, [be("b1", 1)])


def test_maps_as_bpftool_sees_them(node):
    # An oracle that does not go through cilia's map code: kernel types and BTF dumps.
    dp = node.load()
    dp.upsert_service(1, VIP, 80, TCP, [be("b1", 1), be("b2", 2)], kind="ClusterIP")
    types = {}
    for name in ("cilia_lb4_services", "cilia_lb4_backends", "cilia_lb4_reverse_nat", "cilia_lb4_maglev",
                 "cilia_lb4_affinity", "cilia_ct4_global"):
        fd = lb.obj_get(f"{dp.pin_dir}/{name}")
        try:
            info = lb.map_info_by_fd(fd)
        finally:
            os.close(fd)
        types[name] = (info.type, info.key_size, info.value_size)
    assert types == {
        "cilia_lb4_services": (lb.BPF_MAP_TYPE_HASH, 12, 16),
        "cilia_lb4_backends": (lb.BPF_MAP_TYPE_HASH, 4, 8),
        "cilia_lb4_reverse_nat": (lb.BPF_MAP_TYPE_HASH, 2, 8),
        "cilia_lb4_maglev": (lb.BPF_MAP_TYPE_HASH_OF_MAPS, 4, 4),
        "cilia_lb4_affinity": (lb.BPF_MAP_TYPE_LRU_HASH, 8, 8),
        "cilia_ct4_global": (lb.BPF_MAP_TYPE_LRU_HASH, 16, 16),
    }
    dump = json.loads(_sh("bpftool", "-j", "map", "dump", "pinned", f"{dp.pin_dir}/cilia_lb4_services"))
    entry = next(e["formatted"] for e in dump if e["formatted"]["key"]["backend_slot"] == 0)
    assert entry["value"]["count"] == 2 and entry["value"]["rev_nat_index"] == 1
    assert entry["key"]["address"] == int.from_bytes(P.ip(VIP), "little")


# --- cost -------------------------------------------------------------------------

def _median_ns(node, prog, frames, pod=None, repeat=1):
    fd = node.dp.program_fd(prog)
    ctx = skb_ctx(ifindex=node.ifindex[pod] if pod else node.uplink)
    return statistics.median(node.ns.ex.run(prog_test_run, fd, f, repeat=repeat, ctx=ctx).duration_ns
                             for f in frames)


def test_per_packet_cost_printout(node, capsys):
    dp = node.load()
    dp.upsert_service(1, VIP, 80, TCP, [be("b1", 1), be("b2", 2), be("b3", 3)])
    # Two frontends that are each other's backend: every repeat is a service hit with
    # an established CT entry and a full DNAT (test-run reuses the rewritten packet).
    dp.upsert_service(8, "10.96.0.20", 80, TCP, [LBBackend(20, "10.96.0.21", 80)])
    dp.upsert_service(9, "10.96.0.21", 80, TCP, [LBBackend(21, "10.96.0.20", 80)])
    established = node.ns.ex.run(prog_test_run, dp.program_fd(FROM_LXC), tcp_frame(A, "10.96.0.20", 40000, 80),
                                 repeat=20000, ctx=skb_ctx(ifindex=node.ifindex["a"])).duration_ns
    new = _median_ns(node, FROM_LXC, [tcp_frame(A, VIP, 1000 + i, 80) for i in range(2000)], "a")
    plain_local = _median_ns(node, FROM_LXC, [tcp_frame(A, PODS["b1"][0], 1000 + i, 80) for i in range(2000)], "a")
    plain_remote = node.ns.ex.run(prog_test_run, dp.program_fd(FROM_LXC), tcp_frame(A, "10.250.0.1", 1, 80),
                                  repeat=20000, ctx=skb_ctx(ifindex=node.ifindex["a"])).duration_ns
    # Single runs carry test-run's own overhead: this is the same path as plain_remote.
    plain_remote_single = _median_ns(node, FROM_LXC, [tcp_frame(A, "10.250.0.1", 1000 + i, 80) for i in range(2000)],
                                     "a")
    dp.upsert_service(3, NODE_IP, 30080, TCP, [be("b1", 1)], kind="NodePort")
    nodeport_new = _median_ns(node, FROM_NET, [tcp_frame(WORLD, NODE_IP, 1000 + i, 30080) for i in range(2000)])
    with capsys.disabled():
        print(f"\n[lb cost] from_container: established service flow (DNAT, CT hit) {established} ns/pkt "
              f"(repeat 20000); new service flow {new} ns (median of 2000 single runs); "
              f"pod->local pod (no service, CT reply miss) {plain_local} ns (median); pod->stack {plain_remote} "
              f"ns/pkt (repeat), {plain_remote_single} ns (median of single runs: the single-run baseline); "
              f"from_netdev NodePort new flow to local backend {nodeport_new} ns (median)")
    assert established > 0 and new > 0


def test_programming_10k_services_printout(node, capsys):
    dp = node.load()
    specs = [LBService(i + 1, f"10.{96 + (i >> 16)}.{(i >> 8) & 255}.{i & 255}", 80, TCP,
                       [LBBackend(3 * i + j + 1, f"10.244.{1 + (i >> 8) % 200}.{(i * 3 + j) % 250 + 1}", 8080)
                        for j in range(3)])
             for i in range(10000)]
    t0 = time.perf_counter()
    dp.upsert_services(specs)
    batched = time.perf_counter() - t0
    assert len(dp._map("cilia_lb4_services").lookup_batch()) == 40000
    assert len(dp.lb_backends()) == 30000
    t0 = time.perf_counter()
    for s in specs[:2000]:
        dp.upsert_service(s.rev_nat_index, s.address, s.port, s.proto, s.backends)
    one_by_one = (time.perf_counter() - t0) * 5
    t0 = time.perf_counter()
    rows = dp.services()
    listing = time.perf_counter() - t0
    assert len(rows) == 10000 and all(r["count"] == 3 for r in rows)
    with capsys.disabled():
        print(f"\n[lb programming] 10,000 services x 3 backends: upsert_services (batched) {batched:.2f} s; "
              f"upsert_service one at a time {one_by_one:.2f} s (extrapolated from 2,000); "
              f"services() listing {listing:.2f} s")
    # ctypes keeps no reference to kernel state; nothing to release beyond the fixture.
    assert ctypes.sizeof(abi.lb4_key) == 12

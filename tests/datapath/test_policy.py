"""Network policy enforcement through BPF_PROG_TEST_RUN: crafted packet in -> verdict out.

Egress policy of the sender in cil_from_container (after service DNAT), ingress policy of
the receiver wherever a packet enters a pod (local delivery, cil_from_overlay,
cil_from_netdev with NodePort, cil_to_container), the policy conntrack that lets replies
through, audit mode, and the map API. Expectations are written from the map ABI
(bpf/include/abi.h), never computed by the code under test; bpftool is the independent
reader of the maps."""

from __future__ import annotations

import ctypes
import json
import os
import struct

import pytest

from cilia.datapath import abi, reasons
from cilia.datapath import libbpf as lb
from cilia.datapath.lb import LBBackend
from cilia.datapath.node import EndpointEntry, NodeConfig, NodeDatapath, PolicyEntry
from cilia.datapath.policy import PolicyTable, pack_key
from cilia.datapath.testrun import TC_ACT_OK, TC_ACT_REDIRECT, TC_ACT_SHOT, prog_test_run, skb_ctx

from . import packets as P
from .conftest import _sh

NODE_IP = "192.168.90.11"
PEER_NODE = "192.168.90.12"
ROUTER = "10.244.1.1"
WORLD = "198.51.100.10"
VIP = "10.96.0.10"
PODS = {  # name: (ip, mac, node-side mac, ep_id, identity)
    "a": ("10.244.1.11", "0a:00:00:01:00:11", "ee:00:00:01:00:11", 11, 1000),
    "b": ("10.244.1.22", "0a:00:00:01:00:22", "ee:00:00:01:00:22", 22, 2000),
    "c": ("10.244.1.33", "0a:00:00:01:00:33", "ee:00:00:01:00:33", 33, 3000),
}
A, B, C = (PODS[n][0] for n in "abc")
EP = {n: PODS[n][3] for n in PODS}
ID = {n: PODS[n][4] for n in PODS}
REMOTE, REMOTE_ID = "10.244.2.7", 5000
FROM_LXC, TO_LXC, FROM_NET, FROM_OVL = "cil_from_container", "cil_to_container", "cil_from_netdev", "cil_from_overlay"
TCP, UDP, ICMP = 6, 17, 1
IN, EG = abi.POLICY_INGRESS, abi.POLICY_EGRESS
SYN, SYNACK, ACK, PSHACK = 0x02, 0x12, 0x10, 0x18
MAGIC = 0x7E57C0DE
DENIED, DENYLIST = reasons.DROP_POLICY, reasons.DROP_POLICY_DENY


def allow(direction, identity, proto, port, plen=16, cookie=0):
    return PolicyEntry(direction, identity, proto, port, plen, False, cookie)


def deny(direction, identity, proto, port, plen=16, cookie=0):
    return PolicyEntry(direction, identity, proto, port, plen, True, cookie)


class Node:
    """Pods a, b, c on veths, an uplink and a collect_md VXLAN device."""

    def __init__(self, netns, mkdp, run):
        self.ns, self.mkdp, self.run = netns, mkdp, run
        self.uplink = netns.veth()
        _sh("ip", "-n", netns.name, "link", "add", "cilia_vxlan", "type", "vxlan", "external", "dstport", "4789")
        _sh("ip", "-n", netns.name, "link", "set", "cilia_vxlan", "arp", "off", "up")
        self.vxlan = json.loads(_sh("ip", "-n", netns.name, "-j", "link", "show", "cilia_vxlan"))[0]["ifindex"]
        self.ifindex = {name: netns.veth() for name in PODS}

    def load(self, routing="native", obj_dir=None) -> NodeDatapath:
        cfg = NodeConfig(node_ip4=NODE_IP, router_ip4=ROUTER, pod_cidr4="10.244.1.0/24", routing=routing,
                         tunnel_ifindex=self.vxlan if routing == "tunnel" else 0, native_ifindex=self.uplink,
                         cluster_cidr4="10.244.0.0/16")
        self.dp = self.mkdp(cfg, obj_dir)
        for name, (ip, mac, node_mac, ep_id, ident) in PODS.items():
            self.dp.upsert_endpoint(EndpointEntry(ip, self.ifindex[name], ep_id, mac, node_mac, sec_id=ident))
        self.dp.upsert_ipcache(REMOTE, REMOTE_ID, PEER_NODE if routing == "tunnel" else None)
        self.run.dp = self.dp
        return self.dp

    def enforce(self, pod, ingress=False, egress=False, audit=False):
        self.dp.set_endpoint_policy_flags(PODS[pod][0], self.ifindex[pod], ingress, egress, audit)

    def send(self, prog, frame, pod=None, cb=None, ingress_ifindex=0):
        return self.run(prog, frame, self.ifindex[pod] if pod else self.uplink, cb=cb,
                        ingress_ifindex=ingress_ifindex)

    def verdict(self, prog, frame, pod=None, **kw) -> int:
        return self.send(prog, frame, pod, **kw).retval


@pytest.fixture
def node(netns, mkdp, run):
    return Node(netns, mkdp, run)


def tcp(src, dst, sport, dport, flags=PSHACK, payload=b"x"):
    return P.frame4(src, dst, P.IPPROTO_TCP, P.tcp(src, dst, sport, dport, payload, flags=flags))


def udp(src, dst, sport, dport):
    return P.frame4(src, dst, P.IPPROTO_UDP, P.udp_csum(src, dst, sport, dport, b"q"))


def icmp(src, dst, type_, ident=0x4242, code=0, body=b"ping"):
    msg = struct.pack("!BBHHH", type_, code, 0, ident, 1) + body
    msg = msg[:2] + struct.pack("!H", P.csum16(msg)) + msg[4:]
    return P.frame4(src, dst, P.IPPROTO_ICMP, msg)


def icmp_error(src, dst, quoted: bytes, type_=3, code=3):
    """An ICMP error quoting the IP header and first 8 L4 bytes of ``quoted`` (a frame)."""
    ihl = (quoted[14] & 0xF) * 4
    body = quoted[14:14 + ihl + 8]
    msg = struct.pack("!BBHI", type_, code, 0, 0) + body
    msg = msg[:2] + struct.pack("!H", P.csum16(msg)) + msg[4:]
    return P.frame4(src, dst, P.IPPROTO_ICMP, msg)


def metric(dp, reason: int, direction: str, audit: bool = False) -> int:
    return sum(m["packets"] for m in dp.metrics()
               if m["reason"] == reason and m["direction"] == direction and m["audit"] == audit)


# --- the four lookups -----------------------------------------------------------------

def test_allow_by_identity_and_port(node):
    dp = node.load()
    node.enforce("a", egress=True)
    dp.sync_policy(EP["a"], [allow(EG, ID["b"], TCP, 80)])
    assert node.verdict(FROM_LXC, tcp(A, B, 40000, 80, SYN), "a") == TC_ACT_REDIRECT
    assert node.verdict(FROM_LXC, tcp(A, B, 40001, 81, SYN), "a") == TC_ACT_SHOT, "other port"
    assert node.verdict(FROM_LXC, tcp(A, C, 40002, 80, SYN), "a") == TC_ACT_SHOT, "other identity"
    assert node.verdict(FROM_LXC, udp(A, B, 40003, 80), "a") == TC_ACT_SHOT, "other protocol"
    assert metric(dp, DENIED, "EGRESS") == 3
    assert metric(dp, DENYLIST, "EGRESS") == 0
    assert metric(dp, 0, "EGRESS") == 1
    assert reasons.reason_name(DENIED) == "Policy denied"


def test_port_range_is_a_port_prefix(node):
    dp = node.load()
    node.enforce("a", egress=True)
    # 8080/12: the top 12 bits of 8080 (0x1f90), i.e. 8080..8095; 8085 is masked to 8080.
    dp.sync_policy(EP["a"], [allow(EG, ID["b"], TCP, 8085, 12)])
    passed = {port for port in range(8070, 8110)
              if node.verdict(FROM_LXC, tcp(A, B, 30000 + port, port, SYN), "a") == TC_ACT_REDIRECT}
    assert passed == set(range(8080, 8096))
    assert [(e["port"], e["prefix_len"], e["port_range"]) for e in dp.policy_entries(EP["a"])] == \
        [(8080, 12, (8080, 8095))]


def test_any_port(node):
    dp = node.load()
    node.enforce("a", egress=True)
    dp.sync_policy(EP["a"], [allow(EG, ID["b"], TCP, 0, 0)])
    for port in (1, 80, 65535):
        assert node.verdict(FROM_LXC, tcp(A, B, 40000, port, SYN), "a") == TC_ACT_REDIRECT, port
    assert node.verdict(FROM_LXC, tcp(A, C, 40000, 80, SYN), "a") == TC_ACT_SHOT
    assert node.verdict(FROM_LXC, udp(A, B, 40000, 80), "a") == TC_ACT_SHOT


def test_any_identity(node):
    dp = node.load()
    node.enforce("a", egress=True)
    dp.sync_policy(EP["a"], [allow(EG, 0, TCP, 443)])
    assert node.verdict(FROM_LXC, tcp(A, B, 40000, 443, SYN), "a") == TC_ACT_REDIRECT
    assert node.verdict(FROM_LXC, tcp(A, C, 40000, 443, SYN), "a") == TC_ACT_REDIRECT
    assert node.verdict(FROM_LXC, tcp(A, WORLD, 40000, 443, SYN), "a") == TC_ACT_OK, "to the stack (world)"
    assert node.verdict(FROM_LXC, tcp(A, WORLD, 40000, 444, SYN), "a") == TC_ACT_SHOT
    assert metric(dp, DENIED, "EGRESS") == 1


def test_any_protocol(node):
    dp = node.load()
    node.enforce("a", egress=True)
    dp.sync_policy(EP["a"], [allow(EG, ID["b"], 0, 53)])
    assert node.verdict(FROM_LXC, udp(A, B, 40000, 53), "a") == TC_ACT_REDIRECT
    assert node.verdict(FROM_LXC, tcp(A, B, 40000, 53, SYN), "a") == TC_ACT_REDIRECT
    assert node.verdict(FROM_LXC, udp(A, B, 40000, 54), "a") == TC_ACT_SHOT
    assert node.verdict(FROM_LXC, udp(A, C, 40000, 53), "a") == TC_ACT_SHOT


def test_explicit_deny_beats_allow(node):
    dp = node.load()
    node.enforce("a", egress=True)
    dp.sync_policy(EP["a"], [
        allow(EG, 0, 0, 0, 0),             # everything ...
        deny(EG, ID["b"], TCP, 80),         # ... but b on TCP/80
        allow(EG, ID["c"], TCP, 22),        # c on 22 is allowed by a more specific entry,
        deny(EG, ID["c"], 0, 0, 0),         # but a deny on any proto/port of c wins
    ])
    assert node.verdict(FROM_LXC, tcp(A, B, 40000, 80, SYN), "a") == TC_ACT_SHOT
    assert node.verdict(FROM_LXC, tcp(A, B, 40000, 81, SYN), "a") == TC_ACT_REDIRECT
    assert node.verdict(FROM_LXC, udp(A, B, 40000, 80), "a") == TC_ACT_REDIRECT
    assert node.verdict(FROM_LXC, tcp(A, C, 40000, 22, SYN), "a") == TC_ACT_SHOT
    assert metric(dp, DENYLIST, "EGRESS") == 2
    assert metric(dp, DENIED, "EGRESS") == 0
    assert reasons.reason_name(DENYLIST) == "Policy denied by denylist"


def test_unenforced_direction_allows_all_and_ignores_entries(node):
    dp = node.load()
    node.enforce("a", ingress=True)
    dp.sync_policy(EP["a"], [deny(EG, 0, 0, 0, 0)])  # egress is not enforced: never looked at
    assert node.verdict(FROM_LXC, tcp(A, B, 40000, 80, SYN), "a") == TC_ACT_REDIRECT
    # b is enforced nowhere; a's ingress is, and has nothing to allow b.
    assert node.verdict(FROM_LXC, tcp(B, A, 40000, 80, SYN), "b") == TC_ACT_SHOT
    assert metric(dp, DENIED, "INGRESS") == 1
    flags = {e.ip4: e.flags for e in dp.endpoints()}
    assert flags == {A: abi.EP_F_POLICY_INGRESS_ENFORCED, B: 0, C: 0}


def test_local_delivery_judges_ingress_with_the_senders_identity(node):
    dp = node.load()
    node.enforce("b", ingress=True)
    dp.sync_policy(EP["b"], [allow(IN, ID["a"], TCP, 80)])
    assert node.verdict(FROM_LXC, tcp(A, B, 40000, 80, SYN), "a") == TC_ACT_REDIRECT
    assert node.verdict(FROM_LXC, tcp(C, B, 40000, 80, SYN), "c") == TC_ACT_SHOT
    assert node.verdict(FROM_LXC, tcp(A, B, 40001, 81, SYN), "a") == TC_ACT_SHOT
    assert metric(dp, DENIED, "INGRESS") == 2 and metric(dp, DENIED, "EGRESS") == 0


# --- audit --------------------------------------------------------------------------

def test_audit_mode_forwards_and_counts_would_be_drops(node):
    dp = node.load()
    node.enforce("a", egress=True, audit=True)
    node.enforce("b", ingress=True, audit=True)
    dp.sync_policy(EP["b"], [deny(IN, ID["a"], TCP, 0, 0)])
    assert node.verdict(FROM_LXC, tcp(A, B, 40000, 80, SYN), "a") == TC_ACT_REDIRECT
    assert metric(dp, DENIED, "EGRESS", audit=True) == 1, "a's egress: no allow"
    assert metric(dp, DENYLIST, "INGRESS", audit=True) == 1, "b's ingress: the deny"
    assert metric(dp, DENIED, "EGRESS") == 0 and metric(dp, DENYLIST, "INGRESS") == 0, "no real drop"
    assert metric(dp, 0, "EGRESS") == 1
    names = {m["reason_name"] for m in dp.metrics() if m["audit"]}
    assert names == {"Policy denied (audit)", "Policy denied by denylist (audit)"}
    [ct] = dp.policy_ct_entries()
    assert (ct["saddr"], ct["daddr"], ct["dport"], ct["audited"]) == (A, B, 80, True)
    # The audit counters have their own metrics key (flags = METRIC_F_AUDIT), as bpftool reads it.
    dump = json.loads(_sh("bpftool", "-j", "map", "dump", "pinned", f"{dp.pin_dir}/cilia_metrics"))
    keys = {(e["formatted"]["key"]["reason"], e["formatted"]["key"]["dir"], e["formatted"]["key"]["flags"])
            for e in dump}
    assert keys == {(0, abi.METRIC_EGRESS, 0), (DENIED, abi.METRIC_EGRESS, abi.METRIC_F_AUDIT),
                    (DENYLIST, abi.METRIC_INGRESS, abi.METRIC_F_AUDIT)}
    # Audit off: the same policy drops.
    node.enforce("a", egress=True)
    assert node.verdict(FROM_LXC, tcp(A, B, 40001, 80, SYN), "a") == TC_ACT_SHOT
    assert metric(dp, DENIED, "EGRESS") == 1


# --- connection tracking --------------------------------------------------------------

def test_replies_of_an_allowed_connection_pass_both_ways(node):
    dp = node.load()
    for pod in ("a", "b"):
        node.enforce(pod, ingress=True, egress=True)
    # Only a -> b:80 is allowed, on both sides; nothing for b -> a in either policy.
    dp.sync_policy(EP["a"], [allow(EG, ID["b"], TCP, 80), allow(EG, ID["b"], ICMP, 8)])
    dp.sync_policy(EP["b"], [allow(IN, ID["a"], TCP, 80), allow(IN, ID["a"], ICMP, 8)])
    assert node.verdict(FROM_LXC, tcp(A, B, 40000, 80, SYN), "a") == TC_ACT_REDIRECT
    assert node.verdict(FROM_LXC, tcp(B, A, 80, 40000, SYNACK), "b") == TC_ACT_REDIRECT
    assert node.verdict(FROM_LXC, tcp(A, B, 40000, 80, ACK), "a") == TC_ACT_REDIRECT
    for _ in range(3):
        assert node.verdict(FROM_LXC, tcp(B, A, 80, 40000, PSHACK), "b") == TC_ACT_REDIRECT
        assert node.verdict(FROM_LXC, tcp(A, B, 40000, 80, PSHACK), "a") == TC_ACT_REDIRECT
    assert metric(dp, DENIED, "EGRESS") == metric(dp, DENIED, "INGRESS") == 0
    # Not part of the connection: another port, or a SYN (a new connection) the other way.
    assert node.verdict(FROM_LXC, tcp(B, A, 81, 40000, PSHACK), "b") == TC_ACT_SHOT
    assert node.verdict(FROM_LXC, tcp(B, A, 80, 40000, SYN), "b") == TC_ACT_SHOT
    # ICMP echo: the reply with the request's id passes, another id does not.
    assert node.verdict(FROM_LXC, icmp(A, B, 8, ident=77), "a") == TC_ACT_REDIRECT
    assert node.verdict(FROM_LXC, icmp(B, A, 0, ident=77), "b") == TC_ACT_REDIRECT
    assert node.verdict(FROM_LXC, icmp(B, A, 0, ident=78), "b") == TC_ACT_SHOT
    assert metric(dp, DENIED, "EGRESS") == 3
    # The conntrack entry was what let the replies through: without it they are judged.
    assert dp.flush_policy_ct() == 2
    assert node.verdict(FROM_LXC, tcp(B, A, 80, 40000, PSHACK), "b") == TC_ACT_SHOT


def test_established_connection_outlives_a_policy_change_but_a_new_syn_does_not(node):
    dp = node.load()
    node.enforce("a", egress=True)
    dp.sync_policy(EP["a"], [allow(EG, ID["b"], TCP, 80)])
    assert node.verdict(FROM_LXC, tcp(A, B, 40000, 80, SYN), "a") == TC_ACT_REDIRECT
    assert dp.sync_policy(EP["a"], []) == (0, 1)
    assert node.verdict(FROM_LXC, tcp(A, B, 40000, 80, ACK), "a") == TC_ACT_REDIRECT
    # The same tuple opened again is a new connection, judged by today's policy.
    assert node.verdict(FROM_LXC, tcp(A, B, 40000, 80, SYN), "a") == TC_ACT_SHOT
    assert node.verdict(FROM_LXC, tcp(A, B, 40001, 80, SYN), "a") == TC_ACT_SHOT


def test_icmp_errors_about_a_tracked_connection_are_related(node):
    dp = node.load()
    for pod in ("a", "b"):
        node.enforce(pod, ingress=True, egress=True)
    dp.sync_policy(EP["a"], [allow(EG, ID["b"], UDP, 53)])
    dp.sync_policy(EP["b"], [allow(IN, ID["a"], UDP, 53)])
    query = udp(A, B, 40000, 53)
    assert node.verdict(FROM_LXC, query, "a") == TC_ACT_REDIRECT
    assert node.verdict(FROM_LXC, icmp_error(B, A, query), "b") == TC_ACT_REDIRECT
    # Quoting a datagram no connection sent: an ICMP type 3 like any other, not allowed.
    assert node.verdict(FROM_LXC, icmp_error(B, A, udp(A, B, 40000, 54)), "b") == TC_ACT_SHOT
    assert metric(dp, DENIED, "EGRESS") == 1


def test_icmp_rules_match_the_type(node):
    dp = node.load()
    node.enforce("a", egress=True)
    dp.sync_policy(EP["a"], [allow(EG, ID["b"], ICMP, 8)])  # echo request only
    assert node.verdict(FROM_LXC, icmp(A, B, 8), "a") == TC_ACT_REDIRECT
    assert node.verdict(FROM_LXC, icmp(A, B, 13), "a") == TC_ACT_SHOT, "timestamp request"
    dp.sync_policy(EP["a"], [allow(EG, ID["b"], ICMP, 8), allow(EG, ID["b"], ICMP, 13)])
    assert node.verdict(FROM_LXC, icmp(A, B, 13, ident=9), "a") == TC_ACT_REDIRECT
    # The type is the "port": a TCP rule for port 8 does not allow an echo request.
    dp.sync_policy(EP["a"], [allow(EG, ID["b"], TCP, 8)])
    assert node.verdict(FROM_LXC, icmp(A, B, 8, ident=10), "a") == TC_ACT_SHOT


# --- services: policy sees the backend ------------------------------------------------

def test_egress_policy_judges_the_translated_packet(node):
    dp = node.load()
    dp.upsert_service(1, VIP, 80, TCP, [LBBackend(1, B, 8080)])
    node.enforce("a", egress=True)
    node.enforce("b", egress=True)  # b answers without any egress entry: replies pass
    # Rules written against the frontend do not match: policy sees b:8080, not VIP:80.
    for sport, entries in ((41000, [allow(EG, ID["b"], TCP, 80)]),          # backend identity, frontend port
                           (41001, [allow(EG, abi.IDENTITY_WORLD, TCP, 80)]),  # what the VIP itself is
                           (41002, [allow(EG, 0, TCP, 80)])):               # anyone on the frontend port
        dp.sync_policy(EP["a"], entries)
        r = node.send(FROM_LXC, tcp(A, VIP, sport, 80, SYN), "a")
        assert r.retval == TC_ACT_SHOT, entries
    assert metric(dp, DENIED, "EGRESS") == 3
    dp.sync_policy(EP["a"], [allow(EG, ID["b"], TCP, 8080)])
    r = node.send(FROM_LXC, tcp(A, VIP, 41003, 80, SYN), "a")
    assert r.retval == TC_ACT_REDIRECT
    out = P.parse4(r.data_out)
    assert (out["dst"], out["dport"]) == (B, 8080) and P.l4_csum_ok(r.data_out)
    r = node.send(FROM_LXC, tcp(B, A, 8080, 41003, SYNACK), "b")
    assert r.retval == TC_ACT_REDIRECT
    out = P.parse4(r.data_out)
    assert (out["src"], out["sport"]) == (VIP, 80), "reply reverse-translated after policy let it pass"
    assert [(c["saddr"], c["daddr"], c["dport"]) for c in dp.policy_ct_entries()] == [(A, B, 8080)]


def test_hairpin_skips_policy_as_in_cilium(node):
    """A pod reaching itself through a service is not judged by policy (Cilium skips
    enforcement for hairpin flows), even with both directions enforced and no entry; its
    reply passes too. A different pod through the same service is still judged."""
    dp = node.load()
    dp.upsert_service(1, VIP, 80, TCP, [LBBackend(1, A, 8080)])
    node.enforce("a", ingress=True, egress=True)
    node.enforce("b", ingress=True, egress=True)
    dp.sync_policy(EP["a"], [])
    dp.sync_policy(EP["b"], [])
    r = node.send(FROM_LXC, tcp(A, VIP, 42000, 80, SYN), "a")
    assert r.retval == TC_ACT_REDIRECT
    assert P.parse4(r.data_out)["src"] == "169.254.42.1"
    r = node.send(FROM_LXC, tcp(A, "169.254.42.1", 8080, 42000, SYNACK), "a")
    assert r.retval == TC_ACT_REDIRECT
    assert (P.parse4(r.data_out)["src"], P.parse4(r.data_out)["sport"]) == (VIP, 80)
    assert metric(dp, DENIED, "INGRESS") == 0 and metric(dp, DENIED, "EGRESS") == 0
    assert node.verdict(FROM_LXC, tcp(B, VIP, 42001, 80, SYN), "b") == TC_ACT_SHOT


# --- ingress outside cil_from_container -------------------------------------------------

def test_ingress_from_overlay_takes_the_identity_from_the_vni(node, test_build_dir):
    dp = node.load("tunnel", obj_dir=test_build_dir)
    node.enforce("b", ingress=True, egress=True)
    dp.sync_policy(EP["b"], [allow(IN, REMOTE_ID, TCP, 80), allow(IN, abi.IDENTITY_REMOTE_NODE, ICMP, 8)])

    def vni(identity):
        return (identity, 0, 0, MAGIC)

    assert node.verdict(FROM_OVL, tcp(REMOTE, B, 40000, 80, SYN), cb=vni(REMOTE_ID)) == TC_ACT_REDIRECT
    assert node.verdict(FROM_OVL, tcp(REMOTE, B, 40001, 80, SYN), cb=vni(6000)) == TC_ACT_SHOT
    # Another node's host says "host" in the VNI; here that is a remote node.
    assert node.verdict(FROM_OVL, icmp(PEER_NODE, B, 8), cb=vni(abi.IDENTITY_HOST)) == TC_ACT_REDIRECT
    assert node.verdict(FROM_OVL, tcp(PEER_NODE, B, 40002, 80, SYN), cb=vni(abi.IDENTITY_HOST)) == TC_ACT_SHOT
    assert metric(dp, DENIED, "INGRESS") == 2
    # b's reply to the allowed connection leaves (encapsulated, as b) without an egress entry.
    r = node.send(FROM_LXC, tcp(B, REMOTE, 80, 40000, SYNACK), "b", cb=())
    assert r.retval == TC_ACT_REDIRECT and r.cb[0] == ID["b"] and r.cb[3] == MAGIC
    assert node.verdict(FROM_LXC, tcp(B, REMOTE, 80, 40009, SYNACK), "b", cb=()) == TC_ACT_SHOT


def test_ingress_from_netdev_takes_the_identity_from_the_ipcache(node):
    dp = node.load()
    cidr_identity = (1 << 24) + 1  # a node-local CIDR identity
    dp.upsert_ipcache("203.0.113.0/24", cidr_identity)
    node.enforce("b", ingress=True)
    dp.sync_policy(EP["b"], [allow(IN, REMOTE_ID, TCP, 80), allow(IN, abi.IDENTITY_WORLD, TCP, 443),
                             allow(IN, cidr_identity, TCP, 22)])
    assert node.verdict(FROM_NET, tcp(REMOTE, B, 40000, 80, SYN)) == TC_ACT_REDIRECT
    assert node.verdict(FROM_NET, tcp(REMOTE, B, 40001, 443, SYN)) == TC_ACT_SHOT
    assert node.verdict(FROM_NET, tcp(WORLD, B, 40002, 443, SYN)) == TC_ACT_REDIRECT, "unknown source: world"
    assert node.verdict(FROM_NET, tcp(WORLD, B, 40003, 80, SYN)) == TC_ACT_SHOT
    assert node.verdict(FROM_NET, tcp("203.0.113.9", B, 40004, 22, SYN)) == TC_ACT_REDIRECT
    assert node.verdict(FROM_NET, tcp("203.0.113.9", B, 40005, 443, SYN)) == TC_ACT_SHOT, "CIDR, not world"
    assert metric(dp, DENIED, "INGRESS") == 3


def test_nodeport_to_a_local_backend_is_judged_by_its_ingress_policy(node):
    dp = node.load()
    dp.upsert_service(3, NODE_IP, 30080, TCP, [LBBackend(1, B, 8080)], kind="NodePort")
    node.enforce("b", ingress=True)
    dp.sync_policy(EP["b"], [allow(IN, abi.IDENTITY_WORLD, TCP, 30080)])  # the frontend port: no match
    assert node.verdict(FROM_NET, tcp(WORLD, NODE_IP, 40000, 30080, SYN)) == TC_ACT_SHOT
    assert metric(dp, DENIED, "INGRESS") == 1
    dp.sync_policy(EP["b"], [allow(IN, abi.IDENTITY_WORLD, TCP, 8080)])
    r = node.send(FROM_NET, tcp(WORLD, NODE_IP, 40001, 30080, SYN))
    assert r.retval == TC_ACT_REDIRECT
    out = P.parse4(r.data_out)
    assert (out["src"], out["dst"], out["dport"]) == (WORLD, B, 8080)


def test_ingress_at_to_container_from_the_node_stack(node):
    dp = node.load()
    node.enforce("b", ingress=True, egress=True)
    dp.sync_policy(EP["b"], [allow(IN, abi.IDENTITY_HOST, TCP, 80)])
    # Originated by the host (no input device), or from the node's own addresses: host.
    assert node.verdict(TO_LXC, tcp(NODE_IP, B, 40000, 80, SYN), "b") == TC_ACT_OK
    assert node.verdict(TO_LXC, tcp(ROUTER, B, 40001, 80, SYN), "b", ingress_ifindex=node.uplink) == TC_ACT_OK
    assert node.verdict(TO_LXC, tcp(WORLD, B, 40002, 80, SYN), "b") == TC_ACT_OK
    # Routed by the stack from elsewhere: the ipcache decides (unknown: world).
    assert node.verdict(TO_LXC, tcp(WORLD, B, 40003, 80, SYN), "b", ingress_ifindex=node.uplink) == TC_ACT_SHOT
    assert node.verdict(TO_LXC, tcp(REMOTE, B, 40004, 80, SYN), "b", ingress_ifindex=node.uplink) == TC_ACT_SHOT
    dp.sync_policy(EP["b"], [allow(IN, abi.IDENTITY_HOST, TCP, 80), allow(IN, REMOTE_ID, TCP, 80)])
    assert node.verdict(TO_LXC, tcp(REMOTE, B, 40005, 80, SYN), "b", ingress_ifindex=node.uplink) == TC_ACT_OK
    assert metric(dp, DENIED, "INGRESS") == 2
    # b answers the host without any egress entry (the stack takes the reply).
    assert node.verdict(FROM_LXC, tcp(B, NODE_IP, 80, 40000, SYNACK), "b") == TC_ACT_OK
    assert node.verdict(FROM_LXC, tcp(B, NODE_IP, 80, 40099, SYNACK), "b") == TC_ACT_SHOT


# --- the map and its API ---------------------------------------------------------------

def test_policy_map_abi_as_bpftool_reads_it(node):
    dp = node.load()
    dp.sync_policy(0x0A0B, [PolicyEntry(EG, 0x01020304, TCP, 0x1F40, 10, False, 0xDEADBEEF),
                            PolicyEntry(IN, 0, 0, 0, 0, True)])
    fd = lb.obj_get(f"{dp.pin_dir}/cilia_policy")
    try:
        info = lb.map_info_by_fd(fd)
    finally:
        os.close(fd)
    assert (info.type, info.key_size, info.value_size, info.max_entries, info.map_flags) == \
        (lb.BPF_MAP_TYPE_LPM_TRIE, 16, 8, 1 << 20, 1)  # BPF_F_NO_PREALLOC
    dump = json.loads(_sh("bpftool", "-j", "map", "dump", "pinned", f"{dp.pin_dir}/cilia_policy"))
    raw = {bytes(int(b, 16) for b in e["key"]): bytes(int(b, 16) for b in e["value"]) for e in dump}
    # Written out from the ABI: prefixlen host order, the rest network order.
    assert raw == {
        struct.pack("<I", 74) + bytes([0x0A, 0x0B, 1, 6, 1, 2, 3, 4, 0x1F, 0x40, 0, 0]):
            bytes([1, 0, 0, 0]) + struct.pack("<I", 0xDEADBEEF),
        struct.pack("<I", 64) + bytes([0x0A, 0x0B, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0]): bytes([2, 0, 0, 0, 0, 0, 0, 0]),
    }
    ct = lb.obj_get(f"{dp.pin_dir}/cilia_ct4_policy")
    try:
        info = lb.map_info_by_fd(ct)
    finally:
        os.close(ct)
    assert (info.type, info.key_size, info.value_size) == (lb.BPF_MAP_TYPE_LRU_HASH, 16, 12)


def test_sync_policy_writes_the_difference_and_survives_a_restart(node):
    dp = node.load()
    entries = [allow(EG, 1000 + i, TCP, 80 + i % 7, cookie=i) for i in range(200)]
    assert dp.sync_policy(EP["a"], entries) == (200, 0)
    assert dp.sync_policy(EP["a"], entries) == (0, 0)
    dp.sync_policy(EP["b"], [allow(IN, 0, 0, 0, 0)])
    changed = entries[1:] + [deny(EG, 1000, TCP, 80, cookie=0), allow(EG, 7, UDP, 53)]
    changed[5] = PolicyEntry(EG, changed[5].identity, TCP, changed[5].port, 16, False, cookie=999)
    assert dp.sync_policy(EP["a"], changed) == (3, 0)  # deny replaces allow in place; cookie; new
    changed.pop()
    assert dp.sync_policy(EP["a"], changed) == (0, 1)
    got = dp.policy_entries(EP["a"])
    assert len(got) == 200 and len(dp.policy_entries()) == 201
    assert next(e for e in got if e["identity"] == 1000)["verdict"] == "deny"
    # A restarted agent (new NodeDatapath on the same pins) diffs against the kernel.
    dp2 = NodeDatapath(dp.pin_dir, dp.config).load()
    try:
        assert dp2.sync_policy(EP["a"], changed[:50]) == (0, 150)
        assert dp2.delete_policy(EP["b"]) == 1
        assert dp2.delete_policy(EP["b"]) == 0
        assert len(dp2.policy_entries()) == 50
    finally:
        dp2.close()


def test_sync_policy_validates_and_merges_duplicates(node):
    dp = node.load()
    for bad in (PolicyEntry(2, 0, 6, 80, 16, False), PolicyEntry(0, -1, 6, 80, 16, False),
                PolicyEntry(0, 0, 256, 80, 16, False), PolicyEntry(0, 0, 6, 65536, 16, False),
                PolicyEntry(0, 0, 6, 80, 17, False)):
        with pytest.raises(ValueError):
            dp.sync_policy(1, [bad])
    with pytest.raises(ValueError):
        dp.sync_policy(70000, [])
    assert dp.policy_entries() == []
    # The same key twice (8081/15 is 8080/15): both verdicts kept, deny decides.
    assert dp.sync_policy(1, [allow(EG, 5, TCP, 8080, 15, cookie=1), deny(EG, 5, TCP, 8081, 15, cookie=2)]) == (1, 0)
    [e] = dp.policy_entries(1)
    assert (e["flags"], e["verdict"], e["cookie"]) == (abi.POLICY_F_ALLOW | abi.POLICY_F_DENY, "deny", 2)


class _RecordingMap:
    """A policy map in a dict that checks, whenever the table deletes, that every entry
    the new policy wants is already present: what a datapath reader sees in between."""

    def __init__(self):
        self.data: dict[bytes, bytes] = {}
        self.ops: list[str] = []
        self.must_hold: set[bytes] = set()

    def lookup_batch(self):
        return []

    def update_batch(self, pairs):
        self.ops.append("update")
        for k, v in pairs:
            self.data[bytes(k)] = bytes(v)

    def delete_batch(self, keys):
        self.ops.append("delete")
        assert self.must_hold <= set(self.data), "an entry that stays was missing while deleting"
        for k in keys:
            del self.data[bytes(k)]


def test_sync_never_removes_before_it_writes():
    m = _RecordingMap()
    table = PolicyTable(lambda name: m)
    old = [allow(EG, 1, TCP, 80), allow(EG, 2, TCP, 0, 0), deny(EG, 3, 0, 0, 0)]
    table.sync(9, old)
    new = [allow(EG, 1, TCP, 80), allow(EG, 2, TCP, 443), allow(EG, 3, 0, 0, 0)]
    m.must_hold = {bytes(pack_key(9, e.key())) for e in new}
    assert table.sync(9, new) == (2, 1)
    assert m.ops == ["update", "delete", "update", "delete"]
    assert set(m.data) == m.must_hold


def test_endpoint_policy_flags_reach_both_maps_and_survive_an_endpoint_rewrite(node):
    dp = node.load()
    node.enforce("a", ingress=True, egress=False, audit=True)
    want = abi.EP_F_POLICY_INGRESS_ENFORCED | abi.EP_F_POLICY_AUDIT
    lxc_if = dp._map("cilia_lxc_if")
    assert lxc_if.lookup(ctypes.c_uint32(node.ifindex["a"])).flags == want
    # The agent rewrites the endpoint (new identity): enforcement stays.
    ip, mac, node_mac, ep_id, _ = PODS["a"]
    dp.upsert_endpoint(EndpointEntry(ip, node.ifindex["a"], ep_id, mac, node_mac, sec_id=1111))
    assert next(e for e in dp.endpoints() if e.ip4 == A).flags == want
    assert lxc_if.lookup(ctypes.c_uint32(node.ifindex["a"])).flags == want
    node.enforce("a")
    assert next(e for e in dp.endpoints() if e.ip4 == A).flags == 0
    with pytest.raises(KeyError):
        dp.set_endpoint_policy_flags("10.244.1.99", 0, True, True, False)
    with pytest.raises(ValueError):
        dp.set_endpoint_policy_flags(A, node.ifindex["b"], True, True, False)


# --- cost -------------------------------------------------------------------------------

def test_per_packet_cost_printout(node, capsys):
    dp = node.load()
    # Entries of 2,000 other endpoints in the same trie: the lookups do not depend on them.
    for ep in range(1000, 3000):
        dp.sync_policy(ep, [allow(EG, 2, TCP, 80), allow(IN, 0, UDP, 53)])
    fd = dp.program_fd(FROM_LXC)
    ctx = skb_ctx(ifindex=node.ifindex["a"])

    def per_pkt(frame, repeat=20000):
        return node.ns.ex.run(prog_test_run, fd, frame, repeat=repeat, ctx=ctx).duration_ns

    # To the stack (the packet is not rewritten, so every repeat is the same decision).
    ack = tcp(A, WORLD, 40000, 80, ACK)
    node.send(FROM_LXC, ack, "a")
    unenforced_established = per_pkt(ack)
    node.enforce("a", egress=True)
    dp.sync_policy(EP["a"], [allow(EG, abi.IDENTITY_WORLD, TCP, 80)])
    enforced_established = per_pkt(ack)
    new_allowed = per_pkt(tcp(A, WORLD, 40001, 80, SYN))   # SYN: always judged, 4 lookups + CT write
    new_denied = per_pkt(tcp(A, WORLD, 40002, 81, SYN))    # 4 lookups + drop
    # A reply (to a port egress policy does not allow): the forward lookup misses, the
    # reverse one hits.
    node.send(FROM_NET, tcp(WORLD, A, 81, 40003, SYN))
    reply = per_pkt(tcp(A, WORLD, 40003, 81, SYNACK))
    node.enforce("a")
    unenforced_new = per_pkt(tcp(A, WORLD, 40005, 80, SYN))  # tracking only: CT write
    with capsys.disabled():
        print(f"\n[policy cost] from_container pod->stack, ns/pkt (repeat 20000, {len(dp.policy_entries())} "
              f"entries in the trie): established, unenforced {unenforced_established}; established, "
              f"egress enforced {enforced_established}; reply (2 CT lookups) {reply}; "
              f"new (SYN) unenforced {unenforced_new}; new allowed "
              f"(4 LPM lookups + CT insert) {new_allowed}; new denied (4 LPM lookups + drop) {new_denied}")
    assert metric(dp, DENIED, "EGRESS") == 20000
    assert metric(dp, 0, "EGRESS") == 5 * 20000 + 1


def test_apply_diff_writes_only_the_change(node):
    """The agent writes the engine's diff after the first full sync; the kernel map ends
    up as a full sync of the new state would leave it."""
    dp = node.load()
    ep = EP["b"]
    dp.sync_policy(ep, [allow(IN, ID["a"], TCP, 80), allow(IN, ID["a"], TCP, 81)])
    up, dels = dp.apply_policy_diff(ep, {(IN, ID["a"], TCP, 90, 16): (abi.POLICY_F_DENY, 7)},
                                    [(IN, ID["a"], TCP, 81, 16)])
    assert (up, dels) == (1, 1)
    got = {(e["identity"], e["port"], e["verdict"], e["cookie"]) for e in dp.policy_entries(ep)}
    assert got == {(ID["a"], 80, "allow", 0), (ID["a"], 90, "deny", 7)}
    with pytest.raises(ValueError):
        dp.apply_policy_diff(ep, {(IN, ID["a"], TCP, 81, 8): (abi.POLICY_F_ALLOW, 0)}, [])
    # A later full sync still sees the diff's result as what the map holds.
    assert dp.sync_policy(ep, [allow(IN, ID["a"], TCP, 80)]) == (0, 1)

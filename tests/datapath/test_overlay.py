"""Cross-node decisions: encapsulation in cil_from_container, the VXLAN device programs
(cil_from_overlay / cil_to_overlay), and the ipcache API they read.

The key a program hands to bpf_skb_set_tunnel_key is read back from skb->cb of objects
built with -DCILIA_TEST_TUNNEL (test_build_dir); the production objects are run too, so
the real helper is exercised against a real collect_md VXLAN device."""

from __future__ import annotations

import json
import socket
import struct

import pytest

from cilia.datapath import abi, reasons
from cilia.datapath.node import EndpointEntry, IpcacheEntry, NodeConfig
from cilia.datapath.testrun import TC_ACT_OK, TC_ACT_REDIRECT, TC_ACT_SHOT

from . import packets as P
from .conftest import _sh

NODE_IP = "192.168.60.11"
PEER_NODE = "192.168.60.12"
ROUTER = "10.244.1.1"
A_IP, A_MAC, A_NODE_MAC = "10.244.1.11", "0a:00:00:01:00:11", "ee:00:00:01:00:11"
REMOTE_POD = "10.244.2.7"
MAGIC = 0x7E57C0DE


def vxlan(netns) -> int:
    _sh("ip", "-n", netns.name, "link", "add", "cilia_vxlan", "type", "vxlan", "external", "dstport", "4789")
    _sh("ip", "-n", netns.name, "link", "set", "cilia_vxlan", "arp", "off", "up")
    return json.loads(_sh("ip", "-n", netns.name, "-j", "link", "show", "cilia_vxlan"))[0]["ifindex"]


def config(routing: str = "tunnel", tunnel_ifindex: int = 0, **kw) -> NodeConfig:
    return NodeConfig(node_ip4=NODE_IP, router_ip4=ROUTER, pod_cidr4="10.244.1.0/24", routing=routing,
                      tunnel_ifindex=tunnel_ifindex, **kw)


def metric(dp, reason: int, direction: str) -> int:
    return sum(m["packets"] for m in dp.metrics() if m["reason"] == reason and m["direction"] == direction)


def host_order(ip: str) -> int:
    return struct.unpack("!I", socket.inet_aton(ip))[0]


@pytest.fixture
def node(netns, mkdp):
    """(make(routing, obj_dir) -> dp with pod A on a veth, ifindex of A's veth, vxlan ifindex)"""
    vx = vxlan(netns)
    ia = netns.veth()

    def make(routing="tunnel", obj_dir=None, tunnel_ifindex=vx):
        dp = mkdp(config(routing, tunnel_ifindex), obj_dir)
        dp.upsert_endpoint(EndpointEntry(A_IP, ia, 11, A_MAC, A_NODE_MAC, sec_id=1000))
        dp.upsert_ipcache(REMOTE_POD, 5000, PEER_NODE)
        return dp

    return make, ia, vx


def from_a(dst: str = REMOTE_POD) -> bytes:
    return P.udp4_frame(A_NODE_MAC, A_MAC, A_IP, dst)


# --- cil_from_container ----------------------------------------------------------

def test_tunnel_mode_encapsulates_with_the_real_helper(node, run, netns):
    make, ia, _ = node
    dp = make()
    run.dp = dp
    frame = from_a()
    r = run("cil_from_container", frame, ia)
    # DROP_WRITE_ERROR would mean bpf_skb_set_tunnel_key refused the key.
    assert r.retval == TC_ACT_REDIRECT
    assert r.data_out == frame, "the inner packet leaves unchanged (TTL is the receiver's job)"
    assert metric(dp, 0, "EGRESS") == 1
    assert metric(dp, reasons.DROP_WRITE_ERROR, "EGRESS") == 0


def test_tunnel_key_carries_source_identity_and_node(node, run, test_build_dir):
    make, ia, _ = node
    run.dp = make(obj_dir=test_build_dir)
    r = run("cil_from_container", from_a(), ia, cb=())
    assert r.retval == TC_ACT_REDIRECT
    tunnel_id, remote, ttl, magic, _ = r.cb
    assert magic == MAGIC
    assert tunnel_id == 1000, "the sending pod's identity travels in the VNI"
    assert remote == host_order(PEER_NODE), "bpf_tunnel_key wants the remote IPv4 in host order"
    assert ttl == 64


def test_longest_prefix_wins(node, run, test_build_dir):
    # A node-wide /24 to one node, a /32 override to another: the LPM trie picks the /32.
    make, ia, _ = node
    dp = make(obj_dir=test_build_dir)
    run.dp = dp
    dp.upsert_ipcache("10.244.2.0/24", abi.IDENTITY_REMOTE_NODE, "192.168.60.99")
    assert run("cil_from_container", from_a(REMOTE_POD), ia, cb=()).cb[1] == host_order(PEER_NODE)
    assert run("cil_from_container", from_a("10.244.2.8"), ia, cb=()).cb[1] == host_order("192.168.60.99")


def test_unmanaged_device_sends_unmanaged_identity(node, run, netns, test_build_dir):
    make, _, _ = node
    run.dp = make(obj_dir=test_build_dir)
    r = run("cil_from_container", P.udp4_frame(A_NODE_MAC, A_MAC, "10.99.0.1", REMOTE_POD), netns.veth(), cb=())
    assert r.retval == TC_ACT_REDIRECT
    assert r.cb[0] == abi.IDENTITY_UNMANAGED


def test_endpoint_without_identity_yet_sends_init_identity(node, run, test_build_dir):
    # sec_id 0 (identity not allocated yet) would be refused by the receiver as VNI 0.
    make, ia, _ = node
    dp = make(obj_dir=test_build_dir)
    run.dp = dp
    dp.upsert_endpoint(EndpointEntry(A_IP, ia, 11, A_MAC, A_NODE_MAC, sec_id=0))
    r = run("cil_from_container", from_a(), ia, cb=())
    assert r.retval == TC_ACT_REDIRECT
    assert r.cb[0] == abi.IDENTITY_INIT


@pytest.mark.parametrize("case", ["native", "no-ipcache-entry", "no-tunnel-endpoint", "no-tunnel-device"])
def test_to_the_stack_instead_of_the_tunnel(node, run, test_build_dir, case):
    make, ia, _ = node
    dp = make(routing="native" if case == "native" else "tunnel", obj_dir=test_build_dir,
              **({"tunnel_ifindex": 0} if case == "no-tunnel-device" else {}))
    run.dp = dp
    dst = REMOTE_POD
    if case == "no-ipcache-entry":
        dst = "198.51.100.10"
    elif case == "no-tunnel-endpoint":
        dst = "198.51.100.10"
        dp.upsert_ipcache("198.51.100.0/24", abi.IDENTITY_WORLD)
    frame = from_a(dst)
    r = run("cil_from_container", frame, ia, cb=())
    assert (r.retval, r.data_out) == (TC_ACT_OK, frame)
    assert r.cb[3] != MAGIC, "no tunnel key may be set on the way to the stack"
    assert metric(dp, 0, "EGRESS") == 1


def test_local_pod_still_wins_over_ipcache(node, run, netns):
    make, ia, _ = node
    dp = make()
    run.dp = dp
    ib = netns.veth()
    dp.upsert_endpoint(EndpointEntry("10.244.1.22", ib, 22, "0a:00:00:01:00:22", "ee:00:00:01:00:22", sec_id=2000))
    dp.upsert_ipcache("10.244.1.22", 2000, PEER_NODE)  # stale or wrong ipcache must not matter
    out = run("cil_from_container", from_a("10.244.1.22"), ia)
    assert out.retval == TC_ACT_REDIRECT
    assert P.parse_eth(out.data_out)[0] == P.mac("0a:00:00:01:00:22")


# --- cil_from_overlay -------------------------------------------------------------

def inner(src: str, dst: str, ttl: int = 63) -> bytes:
    # Inner MACs as the sending node left them: meaningless here.
    return P.udp4_frame("ee:00:00:02:00:07", "0a:00:00:02:00:07", src, dst, ttl=ttl)


def test_from_overlay_delivers_to_local_pod(node, run, test_build_dir, netns):
    make, ia, vx = node
    dp = make(obj_dir=test_build_dir)
    run.dp = dp
    frame = inner(REMOTE_POD, A_IP, ttl=63)
    r = run("cil_from_overlay", frame, vx, cb=(5000, host_order(PEER_NODE), 64, MAGIC))
    assert r.retval == TC_ACT_REDIRECT
    dst, src, proto = P.parse_eth(r.data_out)
    assert (dst, src, proto) == (P.mac(A_MAC), P.mac(A_NODE_MAC), P.ETH_P_IP)
    assert r.data_out[22] == 62 and P.ip_csum_ok(r.data_out)
    assert r.data_out[34:] == frame[34:]
    assert metric(dp, 0, "INGRESS") == 1


@pytest.mark.parametrize("dst", [NODE_IP, ROUTER, "10.244.1.200"])
def test_from_overlay_passes_the_rest_to_the_stack(node, run, test_build_dir, dst):
    make, _, vx = node
    dp = make(obj_dir=test_build_dir)
    run.dp = dp
    frame = inner(REMOTE_POD, dst)
    r = run("cil_from_overlay", frame, vx, cb=(5000, host_order(PEER_NODE), 64, MAGIC))
    assert (r.retval, r.data_out) == (TC_ACT_OK, frame)
    assert metric(dp, 0, "INGRESS") == 1


def test_from_overlay_without_tunnel_key_is_dropped(node, run):
    # Production object, a test packet has no tunnel metadata.
    make, _, vx = node
    dp = make()
    run.dp = dp
    r = run("cil_from_overlay", inner(REMOTE_POD, A_IP), vx)
    assert r.retval == TC_ACT_SHOT
    assert metric(dp, reasons.DROP_NO_TUNNEL_KEY, "INGRESS") == 1
    assert reasons.reason_name(reasons.DROP_NO_TUNNEL_KEY) == "Error retrieving tunnel key"


def test_from_overlay_refuses_identity_zero(node, run, test_build_dir):
    make, _, vx = node
    dp = make(obj_dir=test_build_dir)
    run.dp = dp
    r = run("cil_from_overlay", inner(REMOTE_POD, A_IP), vx, cb=(0, host_order(PEER_NODE), 64, MAGIC))
    assert r.retval == TC_ACT_SHOT
    assert metric(dp, reasons.DROP_INVALID_IDENTITY, "INGRESS") == 1


# --- cil_to_overlay ---------------------------------------------------------------

def test_to_overlay_without_tunnel_endpoint_drops(node, run, test_build_dir):
    make, _, vx = node
    dp = make(obj_dir=test_build_dir)
    run.dp = dp
    dp.upsert_ipcache("10.244.3.0/24", abi.IDENTITY_REMOTE_NODE)  # known, but no tunnel endpoint
    for dst in ("10.244.3.9", "10.244.9.9"):
        r = run("cil_to_overlay", P.udp4_frame("02:00:00:00:00:01", "02:00:00:00:00:02", NODE_IP, dst), vx, cb=())
        assert r.retval == TC_ACT_SHOT, dst
        assert r.cb[3] != MAGIC
    assert metric(dp, reasons.DROP_NO_TUNNEL_ENDPOINT, "EGRESS") == 2
    assert reasons.reason_name(reasons.DROP_NO_TUNNEL_ENDPOINT) == "No tunnel/encapsulation endpoint (datapath BUG!)"


def test_to_overlay_keys_host_traffic_with_host_identity(node, run, test_build_dir):
    make, _, vx = node
    dp = make(obj_dir=test_build_dir)
    run.dp = dp
    frame = P.udp4_frame("02:00:00:00:00:01", "02:00:00:00:00:02", NODE_IP, REMOTE_POD)
    r = run("cil_to_overlay", frame, vx, cb=())
    assert (r.retval, r.data_out) == (TC_ACT_OK, frame)
    assert r.cb[:4] == (abi.IDENTITY_HOST, host_order(PEER_NODE), 64, MAGIC)
    # A pod's packet that took the stack path keeps the pod's identity.
    r = run("cil_to_overlay", P.udp4_frame("02:00:00:00:00:01", "02:00:00:00:00:02", A_IP, REMOTE_POD), vx, cb=())
    assert r.cb[0] == 1000
    assert metric(dp, 0, "EGRESS") == 2


def test_to_overlay_keeps_a_key_set_by_from_container(node, run, test_build_dir):
    make, _, vx = node
    run.dp = make(obj_dir=test_build_dir)
    pre = (4242, host_order("192.168.60.77"), 64, MAGIC)
    r = run("cil_to_overlay", from_a(), vx, cb=pre)
    assert r.retval == TC_ACT_OK
    assert r.cb[:4] == pre


def test_to_overlay_with_real_helper(node, run):
    make, _, vx = node
    dp = make()
    run.dp = dp
    r = run("cil_to_overlay", P.udp4_frame("02:00:00:00:00:01", "02:00:00:00:00:02", NODE_IP, REMOTE_POD), vx)
    assert r.retval == TC_ACT_OK
    assert metric(dp, reasons.DROP_WRITE_ERROR, "EGRESS") == 0


# --- ipcache API ------------------------------------------------------------------

def test_ipcache_upsert_list_delete(dp):
    dp.upsert_ipcache("10.244.2.7", 5000, "192.168.60.12")
    dp.upsert_ipcache("10.244.2.99/24", abi.IDENTITY_REMOTE_NODE, "192.168.60.12")  # host bits masked
    dp.upsert_ipcache("192.168.60.12", abi.IDENTITY_REMOTE_NODE, flags=abi.IPCACHE_F_REMOTE_NODE)
    assert dp.ipcache() == [
        IpcacheEntry("10.244.2.0/24", 6, "192.168.60.12", 0),
        IpcacheEntry("10.244.2.7/32", 5000, "192.168.60.12", 0),
        IpcacheEntry("192.168.60.12/32", 6, None, 1),
    ]
    # Oracle that does not import cilia: bpftool decodes the pinned map with its BTF.
    dumped = json.loads(_sh("bpftool", "-j", "map", "dump", "pinned", f"{dp.pin_dir}/cilia_ipcache"))
    got = sorted((e["formatted"]["key"]["prefixlen"], e["formatted"]["value"]["sec_identity"]) for e in dumped)
    assert got == [(24, 6), (32, 6), (32, 5000)]
    assert dp.delete_ipcache("10.244.2.7/32") is True
    assert dp.delete_ipcache("10.244.2.7") is False
    assert [e.prefix for e in dp.ipcache()] == ["10.244.2.0/24", "192.168.60.12/32"]


def test_sync_ipcache_writes_only_the_difference(dp):
    desired = {f"10.244.{i // 200}.{i % 200 + 2}": (1000 + i, "192.168.60.12", 0) for i in range(1000)}
    assert dp.sync_ipcache(desired) == (1000, 0)
    assert dp.sync_ipcache(desired) == (0, 0)
    desired["10.244.0.2/32"] = (7777, "192.168.60.13", 0)       # changed
    del desired["10.244.0.3"]                                     # gone
    desired["198.51.100.0/24"] = (abi.IDENTITY_WORLD, None, 0)   # new
    assert dp.sync_ipcache(desired) == (2, 1)
    got = {e.prefix: (e.identity, e.tunnel_endpoint, e.flags) for e in dp.ipcache()}
    assert len(got) == 1000
    assert got["10.244.0.2/32"] == (7777, "192.168.60.13", 0)
    assert "10.244.0.3/32" not in got
    assert got["198.51.100.0/24"] == (2, None, 0)
    assert dp.sync_ipcache({}) == (0, 1000)
    assert dp.ipcache() == []


def test_config_defaults_keep_old_callers_working():
    c = NodeConfig(node_ip4="1.2.3.4", router_ip4="10.244.1.1", pod_cidr4="10.244.1.0/24")
    a = c.to_abi()
    assert (a.routing, a.tunnel_ifindex, a.native_ifindex, a.masquerade) == (abi.ROUTING_NATIVE, 0, 0, 0)
    assert (a.nat_port_min, a.nat_port_max) == (32768, 60999)
    assert socket.inet_ntoa(struct.pack("=I", a.cluster_cidr4)) == "10.244.0.0"
    assert socket.inet_ntoa(struct.pack("=I", a.cluster_cidr4_mask)) == "255.255.0.0"
    with pytest.raises(ValueError, match="routing"):
        NodeConfig("1.2.3.4", "10.244.1.1", "10.244.1.0/24", routing="geneve").to_abi()
    with pytest.raises(ValueError, match="NAT port range"):
        NodeConfig("1.2.3.4", "10.244.1.1", "10.244.1.0/24", nat_port_min=5, nat_port_max=4).to_abi()

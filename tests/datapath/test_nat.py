"""BPF masquerade on the uplink: cil_to_netdev (SNAT to the node IP) and cil_from_netdev
(reverse SNAT, then delivery to the pod). Checksums are verified by full recomputation
in tests/datapath/packets.py, not by trusting the incremental helpers."""

from __future__ import annotations

import os

import pytest

from cilia.datapath import libbpf as lb

from cilia.datapath import abi, reasons
from cilia.datapath.node import MAP_SNAT, MAP_SNAT_REV, EndpointEntry, NodeConfig
from cilia.datapath.testrun import TC_ACT_OK, TC_ACT_REDIRECT, TC_ACT_SHOT

from . import packets as P

NODE_IP = "192.168.70.11"
A_IP, A_MAC, A_NODE_MAC = "10.244.1.11", "0a:00:00:01:00:11", "ee:00:00:01:00:11"
B_IP, B_MAC, B_NODE_MAC = "10.244.1.12", "0a:00:00:01:00:12", "ee:00:00:01:00:12"
WORLD = "198.51.100.10"
TO, FROM = "cil_to_netdev", "cil_from_netdev"


def config(**kw) -> NodeConfig:
    kw.setdefault("masquerade", True)
    return NodeConfig(node_ip4=NODE_IP, router_ip4="10.244.1.1", pod_cidr4="10.244.1.0/24",
                      cluster_cidr4="10.244.0.0/16", **kw)


@pytest.fixture
def host(mkdp, netns, run):
    """make(**config) -> dp with pods A and B; run is bound to it."""
    ia, ib = netns.veth(), netns.veth()

    def make(**kw):
        dp = mkdp(config(**kw))
        dp.upsert_endpoint(EndpointEntry(A_IP, ia, 11, A_MAC, A_NODE_MAC, sec_id=1000))
        dp.upsert_endpoint(EndpointEntry(B_IP, ib, 12, B_MAC, B_NODE_MAC, sec_id=1001))
        run.dp = dp
        return dp

    return make


def metric(dp, reason: int, direction: str) -> int:
    return sum(m["packets"] for m in dp.metrics() if m["reason"] == reason and m["direction"] == direction)


def tcp_out(src=A_IP, sport=40000, dst=WORLD, dport=80, payload=b"GET / HTTP/1.0\r\n\r\n") -> bytes:
    return P.frame4(src, dst, P.IPPROTO_TCP, P.tcp(src, dst, sport, dport, payload))


def tcp_back(dport: int, src=WORLD, sport=80, payload=b"HTTP/1.0 200 OK\r\n") -> bytes:
    return P.frame4(src, NODE_IP, P.IPPROTO_TCP, P.tcp(src, NODE_IP, sport, dport, payload), ttl=60)


def snat(run, frame: bytes) -> dict:
    r = run(TO, frame)
    assert r.retval == TC_ACT_OK
    assert P.ip_csum_ok(r.data_out), "IP header checksum"
    assert P.l4_csum_ok(r.data_out), "L4 checksum"
    assert len(r.data_out) == len(frame)
    return P.parse4(r.data_out)


def in_range(port: int, lo=32768, hi=60999) -> bool:
    return lo <= port <= hi


# --- SNAT -----------------------------------------------------------------------

def test_tcp_is_masqueraded_to_the_node_ip(host, run):
    dp = host()
    frame = tcp_out()
    out = snat(run, frame)
    assert (out["src"], out["dst"], out["sport"], out["dport"]) == (NODE_IP, WORLD, 40000, 80)
    assert out["l4"][20:] == P.parse4(frame)["l4"][20:], "payload untouched"
    assert metric(dp, 0, "EGRESS") == 1
    entries = {(e["direction"], e["protocol"], e["saddr"], e["sport"], e["daddr"], e["dport"]):
               (e["xlate"], e["to_addr"], e["to_port"]) for e in dp.nat_entries()}
    assert entries == {
        ("OUT", "TCP", A_IP, 40000, WORLD, 80): ("XLATE_SRC", NODE_IP, 40000),
        ("IN", "TCP", WORLD, 80, NODE_IP, 40000): ("XLATE_DST", A_IP, 40000),
    }


def test_udp_is_masqueraded_with_valid_checksum(host, run):
    host()
    frame = P.frame4(A_IP, "203.0.113.5", P.IPPROTO_UDP, P.udp_csum(A_IP, "203.0.113.5", 1234, 53, b"\x12\x34dns"))
    out = snat(run, frame)
    assert out["src"] == NODE_IP
    assert in_range(out["sport"]), "a port outside the range is not kept"
    assert out["l4"][6:8] != b"\0\0"


def test_udp_without_checksum_stays_without(host, run):
    host()
    frame = P.frame4(A_IP, WORLD, P.IPPROTO_UDP, P.udp(40001, 53, b"no checksum"))
    out = snat(run, frame)
    assert out["src"] == NODE_IP and out["sport"] == 40001
    assert out["l4"][6:8] == b"\0\0", "UDP checksum 0 means none and must stay 0"


def test_every_packet_of_a_flow_gets_the_same_translation(host, run):
    dp = host()
    ports = {snat(run, tcp_out(sport=999, payload=bytes([i]) * i))["sport"] for i in range(20)}
    assert len(ports) == 1 and in_range(ports.pop())
    assert len(dp.nat_entries()) == 2


def test_port_collision_picks_another_port_and_replies_find_their_pod(host, run):
    dp = host()
    a = snat(run, tcp_out(src=A_IP, sport=40000))
    b = snat(run, tcp_out(src=B_IP, sport=40000))
    assert a["sport"] == 40000
    assert b["sport"] != 40000 and in_range(b["sport"])
    # Same pod port to another remote endpoint does not collide: the port is per remote.
    c = snat(run, tcp_out(src=B_IP, sport=40000, dport=443))
    assert c["sport"] == 40000
    for port, pod_ip, pod_mac in ((a["sport"], A_IP, A_MAC), (b["sport"], B_IP, B_MAC)):
        r = run(FROM, tcp_back(port))
        assert r.retval == TC_ACT_REDIRECT
        back = P.parse4(r.data_out)
        assert (back["dst"], back["dport"], back["src"], back["sport"]) == (pod_ip, 40000, WORLD, 80)
        assert P.parse_eth(r.data_out)[0] == P.mac(pod_mac)
    assert len(dp.nat_entries()) == 6


def test_reverse_nat_delivers_reply_with_valid_checksums(host, run):
    dp = host()
    snat(run, tcp_out(sport=45000))
    reply = tcp_back(45000)
    r = run(FROM, reply)
    assert r.retval == TC_ACT_REDIRECT
    out = P.parse4(r.data_out)
    assert (out["src"], out["sport"], out["dst"], out["dport"]) == (WORLD, 80, A_IP, 45000)
    assert out["ttl"] == 59
    assert P.ip_csum_ok(r.data_out) and P.l4_csum_ok(r.data_out)
    dst_mac, src_mac, _ = P.parse_eth(r.data_out)
    assert (dst_mac, src_mac) == (P.mac(A_MAC), P.mac(A_NODE_MAC))
    assert metric(dp, 0, "INGRESS") == 1


def test_traffic_to_the_node_ip_without_nat_entry_is_the_hosts(host, run):
    host()
    snat(run, tcp_out(sport=45000))
    for frame in (tcp_back(45001), tcp_back(45000, sport=81), tcp_back(45000, src="198.51.100.11")):
        r = run(FROM, frame)
        assert (r.retval, r.data_out) == (TC_ACT_OK, frame)


def test_icmp_echo_is_masqueraded_by_identifier(host, run):
    dp = host()
    req = P.frame4(A_IP, WORLD, P.IPPROTO_ICMP, P.icmp_echo(0x1234, seq=7))
    out = snat(run, req)
    assert out["src"] == NODE_IP and out["icmp_type"] == 8
    nat_id = out["icmp_id"]
    assert in_range(nat_id)
    assert snat(run, req)["icmp_id"] == nat_id
    reply = P.frame4(WORLD, NODE_IP, P.IPPROTO_ICMP, P.icmp_echo(nat_id, seq=7, reply=True), ttl=60)
    r = run(FROM, reply)
    assert r.retval == TC_ACT_REDIRECT
    back = P.parse4(r.data_out)
    assert (back["dst"], back["icmp_type"], back["icmp_id"]) == (A_IP, 0, 0x1234)
    assert P.ip_csum_ok(r.data_out) and P.l4_csum_ok(r.data_out)
    assert {(e["direction"], e["protocol"]) for e in dp.nat_entries()} == {("OUT", "ICMP"), ("IN", "ICMP")}


def test_exhausted_port_range_drops_with_nat_reason(host, run):
    dp = host(nat_port_min=40000, nat_port_max=40003)
    ports = {snat(run, tcp_out(sport=1000 + i))["sport"] for i in range(4)}
    assert ports == {40000, 40001, 40002, 40003}
    frame = tcp_out(sport=2000)
    r = run(TO, frame)
    assert r.retval == TC_ACT_SHOT
    assert metric(dp, reasons.DROP_NAT_NO_MAPPING, "EGRESS") == 1
    assert reasons.reason_name(reasons.DROP_NAT_NO_MAPPING) == "No mapping for NAT masquerade"
    # Established flows keep working; another remote endpoint has its own port space.
    assert snat(run, tcp_out(sport=1000))["sport"] in ports
    assert snat(run, tcp_out(sport=2000, dport=443))["src"] == NODE_IP


def test_evicted_reverse_entry_is_reclaimed_with_the_same_port(host, run):
    dp = host()
    first = snat(run, tcp_out(sport=50000))["sport"]
    rev = dp._map(MAP_SNAT_REV)
    (key, _), = rev.lookup_batch()
    assert rev.delete(key)  # what LRU eviction does
    assert snat(run, tcp_out(sport=50000))["sport"] == first
    r = run(FROM, tcp_back(first))
    assert r.retval == TC_ACT_REDIRECT


def test_port_taken_by_another_flow_after_eviction_moves_the_flow(host, run):
    dp = host(nat_port_min=40000, nat_port_max=40001)
    a = snat(run, tcp_out(src=A_IP, sport=40000))["sport"]
    rev = dp._map(MAP_SNAT_REV)
    (key, _), = rev.lookup_batch()
    rev.delete(key)
    b = snat(run, tcp_out(src=B_IP, sport=40000))["sport"]
    assert a == b == 40000, "B may take the port A's lost reverse entry freed"
    a2 = snat(run, tcp_out(src=A_IP, sport=40000))["sport"]
    assert a2 == 40001
    assert P.parse4(run(FROM, tcp_back(40000)).data_out)["dst"] == B_IP
    assert P.parse4(run(FROM, tcp_back(40001)).data_out)["dst"] == A_IP


# --- no SNAT --------------------------------------------------------------------

@pytest.mark.parametrize("dst,entry", [
    ("10.244.2.5", None),                                                      # pod pool
    ("172.29.0.12", (abi.IDENTITY_REMOTE_NODE, None, abi.IPCACHE_F_REMOTE_NODE)),  # a node
    ("172.29.0.13", (abi.IDENTITY_HOST, None, 0)),
    ("172.29.0.14", (abi.IDENTITY_REMOTE_NODE, None, 0)),
    ("10.250.0.9", (5000, "172.29.0.12", 0)),                                  # pod outside the pool
])
def test_in_cluster_destinations_are_not_masqueraded(host, run, dst, entry):
    dp = host()
    if entry:
        dp.upsert_ipcache(dst, entry[0], entry[1], entry[2])
    frame = tcp_out(dst=dst)
    r = run(TO, frame)
    assert (r.retval, r.data_out) == (TC_ACT_OK, frame)
    assert dp.nat_entries() == []


@pytest.mark.parametrize("identity", [abi.IDENTITY_WORLD, (1 << 24) + 5])
def test_world_and_cidr_identities_are_masqueraded(host, run, identity):
    dp = host()
    dp.upsert_ipcache("198.51.100.0/24", identity)
    assert snat(run, tcp_out())["src"] == NODE_IP


@pytest.mark.parametrize("src", [NODE_IP, "10.244.2.5", "10.0.0.1"])
def test_only_this_nodes_pods_are_masqueraded(host, run, src):
    dp = host()
    frame = tcp_out(src=src)
    assert run(TO, frame).data_out == frame
    assert dp.nat_entries() == []


def test_masquerade_off_changes_nothing(host, run):
    dp = host(masquerade=False)
    frame = tcp_out()
    assert (run(TO, frame).retval, run(TO, frame).data_out) == (TC_ACT_OK, frame)
    assert dp.nat_entries() == []


def test_unsupported_protocols_and_fragments_are_dropped_not_leaked(host, run):
    dp = host()
    gre = P.frame4(A_IP, WORLD, 47, b"\0" * 16)
    timestamp = P.frame4(A_IP, WORLD, P.IPPROTO_ICMP, bytes([13, 0, 0xF2, 0xFF]) + b"\0" * 16)
    frag = P.frame4(A_IP, WORLD, P.IPPROTO_UDP, P.udp(40000, 53, b"x" * 8), flags_frag=0x2000)
    assert run(TO, gre).retval == TC_ACT_SHOT
    assert run(TO, timestamp).retval == TC_ACT_SHOT
    assert run(TO, frag).retval == TC_ACT_SHOT
    assert metric(dp, reasons.DROP_NAT_UNSUPP_PROTO, "EGRESS") == 2
    assert metric(dp, reasons.DROP_FRAG_NOSUPPORT, "EGRESS") == 1
    assert dp.nat_entries() == []


def test_arp_and_ipv6_pass_the_uplink(host, run):
    host()
    arp = P.arp_request_frame("02:00:00:00:00:02", WORLD, NODE_IP)
    v6 = P.ipv6_frame("02:00:00:00:00:01", "02:00:00:00:00:02")
    for prog in (TO, FROM):
        for frame in (arp, v6):
            r = run(prog, frame)
            assert (r.retval, r.data_out) == (TC_ACT_OK, frame)


# --- native routing delivery ----------------------------------------------------

def test_from_netdev_delivers_pod_traffic_from_other_nodes(host, run):
    dp = host(masquerade=False)
    frame = P.frame4("10.244.2.7", A_IP, P.IPPROTO_TCP, P.tcp("10.244.2.7", A_IP, 33000, 8080), ttl=63)
    r = run(FROM, frame)
    assert r.retval == TC_ACT_REDIRECT
    assert P.parse_eth(r.data_out)[:2] == (P.mac(A_MAC), P.mac(A_NODE_MAC))
    assert r.data_out[22] == 62 and P.ip_csum_ok(r.data_out)
    for dst in (NODE_IP, "10.244.1.99"):
        other = P.frame4("10.244.2.7", dst, P.IPPROTO_TCP, P.tcp("10.244.2.7", dst, 33000, 8080))
        assert run(FROM, other).data_out == other
    assert metric(dp, 0, "INGRESS") == 3


def test_nat_maps_are_lru_and_ipcache_is_an_lpm_trie(host):
    dp = host()
    for name in (MAP_SNAT, MAP_SNAT_REV):
        fd = lb.obj_get(f"{dp.pin_dir}/{name}")
        try:
            info = lb.map_info_by_fd(fd)
        finally:
            os.close(fd)
        assert info.type == lb.BPF_MAP_TYPE_LRU_HASH
        assert (info.key_size, info.value_size) == (16, 16)
    fd = lb.obj_get(f"{dp.pin_dir}/cilia_ipcache")
    try:
        info = lb.map_info_by_fd(fd)
    finally:
        os.close(fd)
    assert (info.type, info.max_entries, info.map_flags & 1) == (lb.BPF_MAP_TYPE_LPM_TRIE, 512000, 1)

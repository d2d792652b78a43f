"""Datapath events through BPF_PROG_TEST_RUN: crafted packet in -> ring buffer records out.

Each test loads its own node (own pins, so its own ring), sends packets through the real
programs and reads the ring through its mmapped pages (cilia.datapath.events). Expected
values come from the test's own setup (addresses, identities, endpoint ids), and Cilium's
numbers (observation points, drop reasons) are spelled out here, not imported."""

from __future__ import annotations

import os
import time

import pytest

from cilia.datapath import abi
from cilia.datapath import events as E
from cilia.datapath.lb import LBBackend
from cilia.datapath.node import EndpointEntry, NodeConfig, find_object
from cilia.datapath.testrun import TC_ACT_REDIRECT, TC_ACT_SHOT, prog_test_run, skb_ctx

from .test_policy import (A, B, EP, FROM_LXC, FROM_NET, FROM_OVL, ID, MAGIC, NODE_IP, PEER_NODE, PODS, REMOTE,
                          REMOTE_ID, ROUTER, SYN,
                          SYNACK, ACK, PSHACK, TCP, UDP, VIP, WORLD, IN, EG, Node, allow, deny, icmp, tcp, udp)

FIN_ACK = 0x11
RST = 0x04


class EvNode(Node):
    def load(self, routing="native", obj_dir=None, flags=0):
        cfg = NodeConfig(node_ip4=NODE_IP, router_ip4=ROUTER, pod_cidr4="10.244.1.0/24", routing=routing,
                         tunnel_ifindex=self.vxlan if routing == "tunnel" else 0, native_ifindex=self.uplink,
                         cluster_cidr4="10.244.0.0/16", flags=flags)
        self.dp = self.mkdp(cfg, obj_dir)
        for name, (ip, mac, node_mac, ep_id, ident) in PODS.items():
            self.dp.upsert_endpoint(EndpointEntry(ip, self.ifindex[name], ep_id, mac, node_mac, sec_id=ident))
        self.dp.upsert_ipcache(REMOTE, REMOTE_ID, PEER_NODE if routing == "tunnel" else None)
        self.run.dp = self.dp
        self.events = E.EventSource(self.dp.pin_dir)
        return self.dp

    def take(self) -> list[E.Event]:
        return self.events.read()


@pytest.fixture
def enode(netns, mkdp, run):
    n = EvNode(netns, mkdp, run)
    yield n
    if hasattr(n, "events"):
        n.events.close()


def test_event_struct_matches_btf():
    objs = [find_object(o) for o in ("bpf_lxc.o", "bpf_overlay.o", "bpf_host.o")]
    assert abi.check_objects_against_btf(objs, mirrors=(E.cilia_event,)) == []


def test_maps_pinned_by_name(enode):
    dp = enode.load()
    assert os.path.exists(os.path.join(dp.pin_dir, "cilia_events"))
    assert os.path.exists(os.path.join(dp.pin_dir, "cilia_events_lost"))
    assert enode.events.ring.size == 4 << 20


def test_pod_to_pod_syn_traced_to_endpoint(enode):
    enode.load()
    assert enode.send(FROM_LXC, tcp(A, B, 40000, 80, SYN), "a").retval == TC_ACT_REDIRECT
    evs = enode.take()
    assert len(evs) == 1
    ev = evs[0]
    assert (ev.type, ev.subtype) == (4, 0)  # CILIUM_NOTIFY_TRACE, TRACE_TO_LXC
    assert ev.ep_id == EP["b"] and ev.ifindex == enode.ifindex["b"]
    assert (ev.src_identity, ev.dst_identity) == (ID["a"], ID["b"])
    assert ev.ct_state == 0 and not ev.is_reply
    assert (ev.src_ip, ev.dst_ip, ev.src_port, ev.dst_port, ev.ip_proto) == (A, B, 40000, 80, TCP)
    assert ev.tcp_flag_names() == ["SYN"]
    assert ev.orig_ip == "" and ev.ktime_ns > 0 and ev.orig_len > 54


def test_aggregation_reports_new_flags_and_close_only(enode):
    enode.load()
    enode.send(FROM_LXC, tcp(A, B, 40001, 80, SYN), "a")
    enode.send(FROM_LXC, tcp(B, A, 80, 40001, SYNACK), "b")
    for _ in range(5):
        enode.send(FROM_LXC, tcp(A, B, 40001, 80, PSHACK), "a")
        enode.send(FROM_LXC, tcp(B, A, 80, 40001, ACK), "b")
    enode.send(FROM_LXC, tcp(A, B, 40001, 80, FIN_ACK), "a")
    enode.send(FROM_LXC, tcp(B, A, 80, 40001, RST), "b")
    evs = enode.take()
    got = [(e.src_ip, e.tcp_flag_names(), e.ct_state) for e in evs]
    assert got == [(A, ["SYN"], 0), (B, ["SYN", "ACK"], 2), (A, ["FIN", "ACK"], 1), (B, ["RST"], 2)]
    assert [e.is_reply for e in evs] == [False, True, False, True]


def test_udp_and_icmp_aggregated_to_first_packet_and_first_reply(enode):
    enode.load()
    for _ in range(3):
        enode.send(FROM_LXC, udp(A, B, 5353, 53), "a")
        enode.send(FROM_LXC, udp(B, A, 53, 5353), "b")
    evs = enode.take()
    assert [(e.ip_proto, e.src_ip, e.ct_state) for e in evs] == [(UDP, A, 0), (UDP, B, 2)]
    for _ in range(2):
        enode.send(FROM_LXC, icmp(A, B, 8, ident=0x77), "a")
        enode.send(FROM_LXC, icmp(B, A, 0, ident=0x77), "b")
    evs = enode.take()
    assert [(e.icmp_type, e.is_reply) for e in evs] == [(8, False), (0, True)]


def test_per_packet_config_traces_every_packet(enode):
    enode.load(flags=E.CONFIG_F_EVENTS_PER_PACKET)
    enode.send(FROM_LXC, tcp(A, B, 40002, 80, SYN), "a")
    for _ in range(4):
        enode.send(FROM_LXC, tcp(A, B, 40002, 80, PSHACK), "a")
    evs = enode.take()
    assert len(evs) == 5 and [e.ct_state for e in evs] == [0, 1, 1, 1, 1]


def test_events_off_config_emits_nothing(enode):
    enode.load(flags=E.CONFIG_F_EVENTS_OFF)
    enode.send(FROM_LXC, tcp(A, B, 40003, 80, SYN), "a")
    enode.node_b = enode.enforce("b", ingress=True)
    assert enode.send(FROM_LXC, tcp(A, B, 40004, 80, SYN), "a").retval == TC_ACT_SHOT
    assert enode.take() == [] and enode.events.lost() == 0


def test_to_stack_and_world(enode):
    enode.load()
    enode.send(FROM_LXC, tcp(A, WORLD, 40005, 443, SYN), "a")
    (ev,) = enode.take()
    assert ev.subtype == 3 and ev.ep_id == EP["a"]  # TRACE_TO_STACK, from the sender
    assert ev.src_identity == ID["a"] and ev.dst_ip == WORLD


def test_policy_drop_yields_drop_and_verdict(enode):
    enode.load()
    enode.enforce("b", ingress=True)  # enforced, no rule: default deny
    r = enode.send(FROM_LXC, tcp(A, B, 40006, 8080, SYN), "a")
    assert r.retval == TC_ACT_SHOT
    evs = enode.take()
    assert [e.type for e in evs] == [5, 1]  # policy verdict, then the drop
    pv, drop = evs
    assert pv.action == E.ACTION_DENY and pv.flags & E.EVT_F_INGRESS
    assert pv.ep_id == EP["b"] and pv.src_identity == ID["a"] and pv.dst_identity == ID["b"]
    assert (pv.proto, pv.dport, pv.match_type, pv.rule_cookie) == (TCP, 8080, 0, 0)
    assert drop.subtype == 133 and drop.flags & E.EVT_F_INGRESS
    assert (drop.src_ip, drop.dst_ip, drop.dst_port) == (A, B, 8080)


def test_policy_allow_verdict_names_rule_cookie_and_match(enode):
    dp = enode.load()
    enode.enforce("a", egress=True)
    dp.sync_policy(EP["a"], [allow(EG, ID["b"], TCP, 80, cookie=4242), allow(EG, 0, 0, 0, plen=0, cookie=7)])
    assert enode.send(FROM_LXC, tcp(A, B, 40007, 80, SYN), "a").retval == TC_ACT_REDIRECT
    pv, trace = enode.take()
    assert pv.type == 5 and pv.action == E.ACTION_ALLOW and pv.flags & E.EVT_F_EGRESS
    assert (pv.rule_cookie, pv.match_type) == (4242, 2)  # L3-L4 hit is the most specific
    assert pv.src_identity == ID["a"] and pv.dst_identity == ID["b"]
    assert trace.type == 4
    # The established connection is judged no more: no verdict, no trace.
    enode.send(FROM_LXC, tcp(A, B, 40007, 80, PSHACK), "a")
    assert enode.take() == []


def test_explicit_deny_and_audit_verdicts(enode):
    dp = enode.load()
    enode.enforce("b", ingress=True)
    dp.sync_policy(EP["b"], [allow(IN, 0, 0, 0, plen=0, cookie=1), deny(IN, ID["a"], 0, 0, plen=0, cookie=99)])
    assert enode.send(FROM_LXC, tcp(A, B, 40008, 80, SYN), "a").retval == TC_ACT_SHOT
    pv, drop = enode.take()
    assert (pv.action, pv.rule_cookie, pv.match_type) == (E.ACTION_DENY, 99, 1)
    assert drop.subtype == 181
    enode.enforce("b", ingress=True, audit=True)
    assert enode.send(FROM_LXC, tcp(A, B, 40009, 80, SYN), "a").retval == TC_ACT_REDIRECT
    pv, trace = enode.take()
    assert pv.action == E.ACTION_AUDIT and trace.type == 4


def test_service_trace_carries_frontend(enode):
    dp = enode.load()
    dp.upsert_service(1, VIP, 80, TCP, [LBBackend(1, B, 8080)])
    assert enode.send(FROM_LXC, tcp(A, VIP, 40010, 80, SYN), "a").retval == TC_ACT_REDIRECT
    (ev,) = enode.take()
    assert (ev.dst_ip, ev.dst_port) == (B, 8080)
    assert (ev.orig_ip, ev.orig_port) == (VIP, 80)


def test_service_without_backend_drop_158(enode):
    dp = enode.load()
    dp.upsert_service(2, VIP, 81, TCP, [])
    assert enode.send(FROM_LXC, tcp(A, VIP, 40011, 81, SYN), "a").retval == TC_ACT_SHOT
    (ev,) = enode.take()
    assert (ev.type, ev.subtype) == (1, 158) and ev.flags & E.EVT_F_EGRESS
    assert (ev.src_ip, ev.dst_ip, ev.dst_port) == (A, VIP, 81)


def test_from_network_delivery_traced(enode):
    enode.load()
    r = enode.send(FROM_NET, tcp(WORLD, A, 5555, 80, SYN))
    assert r.retval == TC_ACT_REDIRECT
    (ev,) = enode.take()
    assert ev.subtype == 0 and ev.ep_id == EP["a"] and ev.dst_identity == ID["a"]
    assert ev.src_identity == abi.IDENTITY_WORLD


def test_ring_full_counts_lost_events(enode):
    enode.load(flags=E.CONFIG_F_EVENTS_PER_PACKET)
    capacity = (4 << 20) // ((E.EVENT_SIZE + 8 + 7) & ~7)
    # To the stack: the program leaves the packet as it is, so every repetition (which
    # reuses the same skb) is the same packet and raises exactly one trace.
    frame = tcp(A, WORLD, 40012, 80, PSHACK)
    ctx = skb_ctx(ifindex=enode.ifindex["a"])
    n = capacity + 5000
    enode.ns.ex.run(prog_test_run, enode.dp.program_fd(FROM_LXC), frame, repeat=n, ctx=ctx)
    lost = enode.events.lost()
    assert lost == n - capacity
    assert len(enode.events.read_raw()) == capacity
    # Room again: the next event is delivered, the counter stays.
    enode.send(FROM_LXC, tcp(A, B, 40013, 80, SYN), "a")
    assert len(enode.take()) == 1 and enode.events.lost() == lost


def test_overlay_paths_traced(enode, test_build_dir):
    enode.load("tunnel", obj_dir=test_build_dir)
    r = enode.send(FROM_LXC, tcp(A, REMOTE, 40020, 80, SYN), "a", cb=())
    assert r.retval == TC_ACT_REDIRECT and r.cb[3] == MAGIC  # encapsulated
    (ev,) = enode.take()
    assert ev.subtype == 4  # TRACE_TO_OVERLAY
    assert (ev.src_identity, ev.dst_identity, ev.ep_id) == (ID["a"], REMOTE_ID, EP["a"])
    # Decapsulated delivery into b: the VNI is the source identity.
    r = enode.send(FROM_OVL, tcp(REMOTE, B, 40021, 80, SYN), cb=(REMOTE_ID, 0, 0, MAGIC))
    assert r.retval == TC_ACT_REDIRECT
    (ev,) = enode.take()
    assert ev.subtype == 0 and (ev.src_identity, ev.dst_identity, ev.ep_id) == (REMOTE_ID, ID["b"], EP["b"])
    assert ev.ifindex == enode.ifindex["b"]


def test_concurrent_reader_loses_nothing_across_position_carries(enode):
    """The kernel reads consumer_pos while the reader advances it: a store seen half done
    (a carry into a higher byte) looks like a full ring. ~200k events move the positions
    across two 16 MiB carries while the reader keeps up; nothing may be lost."""
    import threading

    enode.load(flags=E.CONFIG_F_EVENTS_PER_PACKET)
    frame = tcp(A, WORLD, 40030, 80, PSHACK)
    ctx = skb_ctx(ifindex=enode.ifindex["a"])
    fd = enode.dp.program_fd(FROM_LXC)
    total, burst = 200_000, 2_000
    done = threading.Event()

    def produce():
        try:
            for _ in range(total // burst):
                # Never near full: a starved reader must not turn into a real overflow.
                while enode.events.ring.pending_bytes() > (1 << 20):
                    time.sleep(0.0005)
                enode.ns.ex.run(prog_test_run, fd, frame, repeat=burst, ctx=ctx)
        finally:
            done.set()

    th = threading.Thread(target=produce)
    th.start()
    got = 0
    while not (done.is_set() and enode.events.ring.pending_bytes() == 0):
        n = len(enode.events.read_raw())
        got += n
        if not n:
            time.sleep(0.0002)
    th.join()
    assert enode.events.lost() == 0
    assert got == total

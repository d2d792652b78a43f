"""`cilia monitor` lines in Cilium monitor's formats, from event dicts as /v1/monitor streams them."""
from __future__ import annotations

from cilia.cli.monitor_cmd import format_event
from cilia.datapath import events as E
from tests.unit.test_hubble_flows import A, B, VIP, frame, record


def ev(raw: bytes) -> dict:
    return E.decode(raw).to_dict()


def test_trace_line():
    line = format_event(ev(record(4, 0, frame(A, B, sport=41000, dport=8080), ep_id=22, src_id=1000,
                                  dst_id=2000, ifindex=9, orig=(VIP, 80))))
    assert line == (f"-> endpoint 22 flow 0x0 , identity 1000->2000 state new ifindex 9 orig-ip {VIP}: "
                    f"{A}:41000 -> {B}:8080 tcp SYN")


def test_trace_to_stack_reply_line():
    line = format_event(ev(record(4, 3, frame(B, A, sport=80, dport=41000, flags=0x12), ct=2, src_id=2000,
                                  ifindex=5)))
    assert line == f"-> stack flow 0x0 , identity 2000->0 state reply ifindex 5 orig-ip 0.0.0.0: {B}:80 -> {A}:41000 tcp SYN, ACK"


def test_drop_line():
    line = format_event(ev(record(1, 133, frame(A, B, dport=8080), flags=E.EVT_F_INGRESS, ifindex=5)))
    assert line == (f"xx drop (Policy denied) flow 0x0 to endpoint 0, ifindex 5, identity 0->0: "
                    f"{A}:40000 -> {B}:8080 tcp SYN")


def test_policy_verdict_line():
    line = format_event(ev(record(5, 0, frame(A, B, dport=80), ep_id=22, src_id=1000, dst_id=2000,
                                  flags=E.EVT_F_INGRESS, action=E.ACTION_DENY, proto=6, dport=80)))
    assert line == ("Policy verdict log: flow 0x0 local EP ID 22, remote ID 1000, proto 6, ingress, action deny, "
                    f"auth: disabled, match none, {A}:40000 -> {B}:80 tcp SYN")
    line = format_event(ev(record(5, 0, frame(A, B, proto=17, dport=53), ep_id=11, src_id=1000, dst_id=2,
                                  flags=E.EVT_F_EGRESS, action=E.ACTION_ALLOW, match=2, proto=17, dport=53)))
    assert "remote ID 2, proto 17, egress, action allow, auth: disabled, match L3-L4" in line
    assert line.endswith(f"{A}:40000 -> {B}:53 udp")

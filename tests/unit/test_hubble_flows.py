"""Event -> Hubble flow mapping, the Observer ring and the SQLite flow log (no root).

Records are packed here by hand in struct cilia_event's layout (bpf/include/events.h),
so the decoder is checked against the C layout, not against itself; the datapath tests
check the same decoder on records the kernel wrote."""
from __future__ import annotations

import socket
import struct

import pytest

from cilia.datapath import events as E
from cilia.hubble import flow as F
from cilia.hubble.flowlog import FlowLog
from cilia.hubble.observer import Observer

A, B, VIP = "10.244.1.11", "10.244.1.22", "10.96.0.10"


def frame(src, dst, proto=6, sport=40000, dport=80, flags=0x02):
    eth = bytes.fromhex("0a0000010022") + bytes.fromhex("ee0000010011") + b"\x08\x00"
    if proto == 6:
        l4 = struct.pack("!HHIIBBHHH", sport, dport, 1, 0, 5 << 4, flags, 65535, 0, 0)
    elif proto == 17:
        l4 = struct.pack("!HHHH", sport, dport, 8, 0)
    else:
        l4 = struct.pack("!BBHHH", 8, 0, 0, 1, 1)
    ip = struct.pack("!BBHHHBBH4s4s", 0x45, 0, 20 + len(l4), 1, 0, 64, proto, 0,
                     socket.inet_aton(src), socket.inet_aton(dst))
    return eth + ip + l4


def record(typ, subtype, pkt, *, ep_id=0, src_id=0, dst_id=0, ct=0, flags=0, action=0, match=0, cookie=0,
           proto=0, dport=0, orig=None, ifindex=7, ktime=123456789):
    orig_daddr = struct.unpack("<I", socket.inet_aton(orig[0]))[0] if orig else 0
    orig_dport = struct.pack("!H", orig[1]) if orig else b"\0\0"
    if orig:
        flags |= E.EVT_F_SERVICE
    head = struct.pack("<QIIIIII", ktime, ifindex, src_id, dst_id, len(pkt), orig_daddr, cookie)
    head += struct.pack("<H", ep_id) + orig_dport + struct.pack("<HH", min(len(pkt), 128), dport)
    head += bytes([typ, subtype, ct, flags, action, match, proto, 0])
    assert len(head) == 48
    return head + pkt[:128].ljust(128, b"\0")


def ctx():
    return F.StaticContext(
        node_name="node1", cluster_name="lab1",
        endpoints={
            A: F.EndpointView(identity=1000, ep_id=11, namespace="default", pod_name="client-7d9f8b6c5d-abcde",
                              labels=["k8s:app=client", "k8s:io.kubernetes.pod.namespace=default"]),
            B: F.EndpointView(identity=2000, ep_id=22, namespace="prod", pod_name="server",
                              labels=["k8s:app=server"]),
        },
        services={(VIP, 80, 6): ("prod", "web")},
        rules={99: {"name": "deny-client", "namespace": "prod", "labels": [], "revision": 3}})


def test_trace_to_endpoint_flow():
    ev = E.decode(record(4, 0, frame(A, B), ep_id=22, src_id=1000, dst_id=2000, orig=(VIP, 80)))
    _, rec = F.build(ev, ctx(), new_uuid=lambda: "u1")
    f = rec["flow"]
    assert rec["node_name"] == "node1" and rec["time"] == f["time"] and f["time"].endswith("Z")
    assert f["verdict"] == "FORWARDED" and f["uuid"] == "u1"
    assert f["IP"] == {"source": A, "destination": B, "ipVersion": "IPv4"}
    assert f["l4"] == {"TCP": {"source_port": 40000, "destination_port": 80, "flags": {"SYN": True}}}
    assert f["source"] == {"ID": 11, "identity": 1000, "cluster_name": "lab1", "namespace": "default",
                           "labels": ["k8s:app=client", "k8s:io.kubernetes.pod.namespace=default"],
                           "pod_name": "client-7d9f8b6c5d-abcde",
                           "workloads": [{"name": "client", "kind": "Deployment"}]}
    assert f["destination"]["pod_name"] == "server"
    assert f["destination"]["workloads"] == [{"name": "server", "kind": "Pod"}]
    assert f["destination_service"] == {"name": "web", "namespace": "prod"}
    assert f["event_type"] == {"type": 4, "sub_type": 0}
    assert f["trace_observation_point"] == "TO_ENDPOINT" and f["traffic_direction"] == "INGRESS"
    assert f["is_reply"] is False and f["Summary"] == "TCP Flags: SYN" and f["Type"] == "L3_L4"
    assert f["ethernet"] == {"source": "ee:00:00:01:00:11", "destination": "0a:00:00:01:00:22"}


def test_reply_to_stack_is_ingress_and_world_fallback():
    ev = E.decode(record(4, 3, frame("198.51.100.7", A, sport=443, dport=40000, flags=0x12), ct=2))
    _, rec = F.build(ev, ctx())
    f = rec["flow"]
    assert f["is_reply"] is True and f["traffic_direction"] == "INGRESS"
    assert f["source"]["identity"] == 2 and f["source"]["labels"] == ["reserved:world"]
    assert f["Summary"] == "TCP Flags: SYN, ACK"


def test_policy_drop_flow():
    ev = E.decode(record(1, 133, frame(A, B, dport=8080), flags=E.EVT_F_INGRESS))
    _, rec = F.build(ev, ctx())
    f = rec["flow"]
    assert (f["verdict"], f["drop_reason"], f["drop_reason_desc"]) == ("DROPPED", 133, "POLICY_DENIED")
    assert f["event_type"] == {"type": 1, "sub_type": 133} and f["traffic_direction"] == "INGRESS"
    assert f["source"]["identity"] == 1000 and f["destination"]["identity"] == 2000
    assert "is_reply" not in f and "trace_observation_point" not in f


def test_no_backend_drop_names_service():
    ev = E.decode(record(1, 158, frame(A, VIP), flags=E.EVT_F_EGRESS))
    f = F.build(ev, ctx())[1]["flow"]
    assert f["drop_reason_desc"] == "SERVICE_BACKEND_NOT_FOUND"
    assert f["destination_service"] == {"name": "web", "namespace": "prod"}
    assert f["traffic_direction"] == "EGRESS"


@pytest.mark.parametrize("action,match,cookie,verdict,reason", [
    (E.ACTION_ALLOW, 2, 0, "FORWARDED", None),
    (E.ACTION_DENY, 0, 0, "DROPPED", "POLICY_DENIED"),
    (E.ACTION_DENY, 1, 99, "DROPPED", "POLICY_DENY"),
    (E.ACTION_AUDIT, 0, 0, "AUDIT", None),
])
def test_policy_verdict_flow(action, match, cookie, verdict, reason):
    ev = E.decode(record(5, 0, frame(A, B), ep_id=22, src_id=1000, dst_id=2000, flags=E.EVT_F_INGRESS,
                         action=action, match=match, cookie=cookie, proto=6, dport=80))
    f = F.build(ev, ctx())[1]["flow"]
    assert f["verdict"] == verdict and f.get("drop_reason_desc") == reason
    assert f["policy_match_type"] == match and f["event_type"]["type"] == 5
    if cookie:
        assert f["ingress_denied_by"] == [{"name": "deny-client", "namespace": "prod", "labels": [],
                                           "revision": 3}]


def test_udp_icmp_summaries():
    assert F.build(E.decode(record(4, 0, frame(A, B, proto=17, dport=53))), ctx())[1]["flow"]["Summary"] == "UDP"
    f = F.build(E.decode(record(4, 0, frame(A, B, proto=1))), ctx())[1]["flow"]
    assert f["l4"] == {"ICMPv4": {"type": 8, "code": 0}} and f["Summary"] == "ICMPv4 EchoRequest"


def test_workloads():
    assert F.workloads("web-5f7d8c9b4-x2x9z") == [{"name": "web", "kind": "Deployment"}]
    assert F.workloads("server") == [{"name": "server", "kind": "Pod"}]
    assert F.workloads("") == []


def test_observer_ring_and_subscribers():
    obs = Observer(max_flows=3)
    seen = []
    unsub = obs.subscribe(seen.append)
    for i in range(5):
        obs.add({"flow": {"n": i}}, time_ns=i * 10)
    assert [r["flow"]["n"] for r in obs.snapshot()] == [2, 3, 4]
    assert len(seen) == 5 and obs.seen_flows == 5
    unsub()
    obs.add({"flow": {"n": 5}}, time_ns=50)
    assert len(seen) == 5
    assert [r["flow"]["n"] for r in obs.query(last=2)] == [4, 5]
    assert [r["flow"]["n"] for r in obs.query(first=1)] == [3]
    assert [r["flow"]["n"] for r in obs.query(since_ns=40, until_ns=45)] == [4]
    assert obs.status()["num_flows"] == 3 and obs.status()["max_flows"] == 3


def test_observer_drops_a_failing_subscriber():
    obs = Observer()
    obs.subscribe(lambda r: 1 / 0)
    ok = []
    obs.subscribe(ok.append)
    obs.add({"flow": {}})
    obs.add({"flow": {}})
    assert len(ok) == 2 and obs.subscribers == 1


def test_flowlog_survives_reopen_and_queries_by_time(tmp_path):
    path = str(tmp_path / "flows.db")
    log = FlowLog(path, retention_s=3600)
    log.append([(i * 1_000_000_000, {"flow": {"n": i}}) for i in range(1, 11)])
    log.close()
    log = FlowLog(path, retention_s=3600)
    assert log.count() == 10
    got = log.query(since_ns=3_000_000_000, until_ns=5_000_000_000)
    assert [r["flow"]["n"] for _, r in got] == [3, 4, 5]
    assert [r["flow"]["n"] for _, r in log.query(last=2)] == [9, 10]
    assert [r["flow"]["n"] for _, r in log.query(first=2)] == [1, 2]
    # Retention: everything older than an hour before "now" goes.
    assert log.prune(now_ns=3600 * 1_000_000_000 + 5_500_000_000) == 5
    assert [r["flow"]["n"] for _, r in log.query()] == [6, 7, 8, 9, 10]
    log.close()


def test_flowlog_max_rows(tmp_path):
    log = FlowLog(str(tmp_path / "f.db"), retention_s=1e9, max_rows=4)
    log.append([(i, {"flow": {"n": i}}) for i in range(10)])
    log.prune(now_ns=10)
    assert [r["flow"]["n"] for _, r in log.query()] == [6, 7, 8, 9]


def test_flowlog_rejects_bad_retention(tmp_path):
    with pytest.raises(ValueError, match="retention"):
        FlowLog(str(tmp_path / "x.db"), retention_s=0)

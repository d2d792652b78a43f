"""hubble observe's output shapes, and the relay's time-ordered merge and service map."""
from __future__ import annotations

import io
import json
import os
import time

import pytest

from cilia.hubble import printers
from cilia.hubble.printers import Printer, compact, format_time_ns, parse_time_ns
from cilia.hubble.relay import Query, Reorder, merge, namespaces, service_map
from tests.unit.test_hubble_filters import flow


@pytest.fixture(autouse=True)
def utc(monkeypatch):
    monkeypatch.setenv("TZ", "UTC")
    time.tzset()
    yield
    time.tzset()


def rec(f, t="2026-11-28T16:00:00.123456789Z", node="lab-node1"):
    f = dict(f, time=t, node_name=node)
    return {"flow": f, "node_name": node, "time": t}


def test_time_roundtrip_keeps_nanoseconds():
    ns = parse_time_ns("2026-11-28T16:00:00.123456789Z")
    assert format_time_ns(ns) == "2026-11-28T16:00:00.123456789Z"
    assert parse_time_ns("2026-11-28T17:00:00.123456789+01:00") == ns
    assert parse_time_ns(1764345600) == 1764345600 * 10**9
    with pytest.raises(ValueError):
        parse_time_ns("yesterday")


def test_compact_forwarded_trace():
    f = flow(flags={"SYN": True})
    f["trace_observation_point"] = "TO_ENDPOINT"
    assert compact(rec(f)) == ("Nov 28 16:00:00.123: default/client:43210 (ID:1234) -> "
                               "default/server:80 (ID:5678) to-endpoint FORWARDED (TCP Flags: SYN)")


def test_compact_reply_flips_arrow_and_sides():
    f = flow(is_reply=True, flags={"SYN": True, "ACK": True}, src_pod="server", dst_pod="client",
             sport=80, dport=43210, src_id=5678, dst_id=1234)
    f["trace_observation_point"] = "TO_ENDPOINT"
    assert compact(rec(f)) == ("Nov 28 16:00:00.123: default/client:43210 (ID:1234) <- "
                               "default/server:80 (ID:5678) to-endpoint FORWARDED (TCP Flags: SYN, ACK)")


def test_compact_policy_drop_and_policy_verdict():
    d = flow(verdict="DROPPED", etype=1, sub=133)
    d.update(drop_reason=133, drop_reason_desc="POLICY_DENIED")
    assert compact(rec(d)).endswith("default/server:80 (ID:5678) Policy denied DROPPED (TCP Flags: SYN)")
    pv = flow(verdict="DROPPED", etype=5, direction="INGRESS")
    pv.update(drop_reason=133, policy_match_type=0)
    assert " policy-verdict:Policy denied INGRESS DENIED (TCP Flags: SYN)" in compact(rec(pv))
    ok = flow(verdict="FORWARDED", etype=5, direction="INGRESS")
    ok["policy_match_type"] = 2
    assert " policy-verdict:L3-L4 INGRESS ALLOWED " in compact(rec(ok))


def test_compact_world_identity_icmp_and_node_name():
    f = flow(proto="ICMPv4", dst_id=2)
    f["destination"] = {"identity": 2, "labels": ["reserved:world"]}
    f["IP"]["destination"] = "198.51.100.100"
    line = compact(rec(f), node_name=True)
    assert "[lab-node1]: default/client (ID:1234) -> 198.51.100.100 (world) to-endpoint" in line
    assert line.endswith("FORWARDED (ICMPv4 EchoRequest)")


def test_json_is_one_record_per_line():
    out = io.StringIO()
    p = Printer("json", out)
    r1, r2 = rec(flow()), rec(flow(verdict="DROPPED"))
    p.write(r1)
    p.write(r2)
    lines = out.getvalue().splitlines()
    assert [json.loads(x) for x in lines] == [r1, r2]
    assert set(json.loads(lines[0])) == {"flow", "node_name", "time"}


def test_dict_and_table():
    out = io.StringIO()
    p = Printer("dict", out)
    p.write(rec(flow()))
    p.write(rec(flow()))
    text = out.getvalue()
    assert "  TIMESTAMP: Nov 28 16:00:00.123\n     SOURCE: default/client:43210\n" in text
    assert "DESTINATION: default/server:80\n" in text and "------------\n" in text
    out = io.StringIO()
    p = Printer("table", out, node_name=True)
    p.write(rec(flow()))
    p.flush()
    head, row = out.getvalue().splitlines()
    assert head.split() == ["TIMESTAMP", "NODE", "SOURCE", "DESTINATION", "TYPE", "VERDICT", "SUMMARY"]
    assert "lab-node1" in row and "default/server:80" in row and row.endswith("TCP Flags: SYN")
    assert head.index("SOURCE") == row.index("default/client")


def test_merge_orders_by_time_and_applies_last_first():
    a = [rec(flow(src_pod="a"), f"2026-11-28T16:00:0{i}.000000001Z", "n1") for i in (0, 2, 4)]
    b = [rec(flow(src_pod="b"), f"2026-11-28T16:00:0{i}.5Z", "n2") for i in (1, 3)]
    got = merge([list(a), list(b)], Query())
    assert [r["time"][17:19] for r in got] == ["00", "01", "02", "03", "04"]
    assert "_ns" not in got[0]
    assert [r["node_name"] for r in merge([list(a), list(b)], Query(last=2))] == ["n2", "n1"]
    assert [r["node_name"] for r in merge([list(a), list(b)], Query(first=2))] == ["n1", "n2"]
    only_b = merge([list(a), list(b)], Query(allow=[{"source_pod": ["b"]}]))
    assert {r["node_name"] for r in only_b} == {"n2"}


def test_reorder_window_releases_in_time_order():
    r = Reorder(window=0.05)
    late = rec(flow(), "2026-11-28T16:00:00.2Z")
    early = rec(flow(), "2026-11-28T16:00:00.1Z")
    for x in (late, early):
        x["_ns"] = printers.record_time_ns(x)
        r.push(x)
    assert r.pop_ready() == []
    time.sleep(0.06)
    assert r.pop_ready() == [early, late]


def test_service_map_folds_replies_and_colours_drops():
    recs = [rec(flow(src_pod="client", dst_pod="server")),
            rec(flow(src_pod="server", dst_pod="client", sport=80, dport=43210, is_reply=True)),
            rec(flow(src_pod="client", dst_pod="db", dport=5432, verdict="DROPPED")),
            rec(flow(src_pod="x", src_ns="other", dst_pod="y", dst_ns="other"))]
    m = service_map(recs, "default")
    assert [n["id"] for n in m["nodes"]] == ["default/client", "default/db", "default/server"]
    e = {(x["source"], x["target"]): x for x in m["edges"]}
    assert e[("default/client", "default/server")]["flows"] == 2
    assert e[("default/client", "default/server")]["verdict"] == "FORWARDED"
    assert e[("default/client", "default/server")]["ports"] == ["80/TCP"]
    assert e[("default/client", "default/db")]["verdict"] == "DROPPED"
    assert namespaces(recs) == ["default", "other"]


def test_ui_assets_exist():
    d = os.path.join(os.path.dirname(printers.__file__), "ui")
    for name in ("index.html", "app.js", "style.css"):
        assert os.path.getsize(os.path.join(d, name)) > 100

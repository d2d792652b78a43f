"""`hubble observe` output formats: compact, table, dict and json (hubble/pkg/printer).

Every printer takes flow records as the agent's /v1/flows streams them:
{"flow": {...}, "node_name": "...", "time": "RFC3339 with nanoseconds"}."""
from __future__ import annotations

import calendar
import json
import re
import time
from typing import IO

from cilia.datapath.reasons import REASONS
from cilia.hubble.filters import TRACE_POINTS
from cilia.identity.reserved import is_reserved, reserved_identity

_TRACE_NAMES = {v: k for k, v in TRACE_POINTS.items()}
# pkg/policy/api PolicyMatchType strings as `hubble observe` prints them.
POLICY_MATCH = {0: "none", 1: "L3-Only", 2: "L3-L4", 3: "L4-Only", 4: "all",
                5: "L3-Proto", 6: "Proto-Only"}
_ICMP4 = {0: "EchoReply", 3: "DestinationUnreachable", 5: "Redirect", 8: "EchoRequest",
          11: "TimeExceeded", 12: "ParameterProblem", 13: "TimestampRequest", 14: "TimestampReply"}

_TS = re.compile(r"^(\d{4})-(\d\d)-(\d\d)T(\d\d):(\d\d):(\d\d)(?:\.(\d{1,9}))?(Z|[+-]\d\d:\d\d)$")


def parse_time_ns(value) -> int:
    """RFC3339 (nanoseconds kept), unix seconds (int/float/str) -> unix nanoseconds."""
    if isinstance(value, (int, float)):
        return int(value * 1_000_000_000) if value < 1e12 else int(value)
    if isinstance(value, dict):  # protobuf Timestamp JSON form
        return int(value.get("seconds", 0)) * 1_000_000_000 + int(value.get("nanos", 0))
    s = str(value).strip()
    if re.fullmatch(r"\d+(\.\d+)?", s):
        return parse_time_ns(float(s) if "." in s else int(s))
    m = _TS.match(s)
    if not m:
        raise ValueError(f"not an RFC3339 time: {value!r}")
    y, mo, d, h, mi, sec, frac, tz = m.groups()
    secs = calendar.timegm((int(y), int(mo), int(d), int(h), int(mi), int(sec), 0, 0, 0))
    if tz != "Z":
        sign = 1 if tz[0] == "+" else -1
        secs -= sign * (int(tz[1:3]) * 3600 + int(tz[4:6]) * 60)
    return secs * 1_000_000_000 + int((frac or "0").ljust(9, "0"))


def format_time_ns(ns: int) -> str:
    """Hubble's JSON time: RFC3339 UTC with nanoseconds."""
    secs, frac = divmod(ns, 1_000_000_000)
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(secs)) + f".{frac:09d}Z"


def record_time_ns(rec: dict) -> int:
    t = rec.get("time") or (rec.get("flow") or {}).get("time")
    try:
        return parse_time_ns(t) if t is not None else 0
    except ValueError:
        return 0


def fmt_timestamp(ns: int) -> str:
    """Go's time.StampMilli ("Jan _2 15:04:05.000") in local time, as hubble prints it."""
    secs, frac = divmod(ns, 1_000_000_000)
    tm = time.localtime(secs)
    return f"{time.strftime('%b', tm)} {tm.tm_mday:>2} {time.strftime('%H:%M:%S', tm)}.{frac // 1_000_000:03d}"


def _ports(flow: dict) -> tuple[str, str]:
    l4 = flow.get("l4") or {}
    for proto in ("TCP", "UDP", "SCTP"):
        p = l4.get(proto)
        if p:
            return str(p.get("source_port") or ""), str(p.get("destination_port") or "")
    return "", ""


def _host(ip: str, port: str, ep: dict, svc: dict | None, names: list[str] | None) -> str:
    host = ip
    if ep.get("pod_name"):
        host = ep["pod_name"]
        if ep.get("namespace"):
            host = f"{ep['namespace']}/{host}"
    elif svc and svc.get("name"):
        host = f"{svc.get('namespace', '')}/{svc['name']}" if svc.get("namespace") else svc["name"]
    elif names:
        host = ",".join(names)
    if port and port != "0":
        return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
    return host


def host_names(flow: dict) -> tuple[str, str]:
    ip = flow.get("IP") or {}
    sp, dp = _ports(flow)
    return (_host(ip.get("source", ""), sp, flow.get("source") or {}, flow.get("source_service"),
                  flow.get("source_names")),
            _host(ip.get("destination", ""), dp, flow.get("destination") or {},
                  flow.get("destination_service"), flow.get("destination_names")))


def fmt_identity(ident) -> str:
    if ident is None:
        return ""
    n = int(ident)
    if is_reserved(n):
        r = reserved_identity(n)
        return f"({r.labels[0].split(':', 1)[1] if r else n})"
    return f"(ID:{n})"


def flow_type(flow: dict) -> str:
    """hubble's GetFlowType: observation point, drop reason or policy match type."""
    et = flow.get("event_type") or {}
    t, st = et.get("type"), et.get("sub_type", 0) or 0
    if flow.get("l7"):
        return "l7"
    if t == 4:
        op = flow.get("trace_observation_point")
        if op and op != "UNKNOWN_POINT":
            return op.lower().replace("_", "-")
        return _TRACE_NAMES.get(st, f"{st}")
    if t == 1:
        reason = flow.get("drop_reason") or st
        return REASONS.get(reason, f"{reason}")
    if t == 5:
        if flow.get("verdict") == "DROPPED":
            return REASONS.get(flow.get("drop_reason") or 0, "Policy denied")
        return POLICY_MATCH.get(flow.get("policy_match_type") or 0, "none")
    return "UNKNOWN"


def _compact_type(flow: dict) -> str:
    if (flow.get("event_type") or {}).get("type") == 5:
        return f"policy-verdict:{flow_type(flow)} {flow.get('traffic_direction', 'TRAFFIC_DIRECTION_UNKNOWN')}"
    return flow_type(flow)


def _compact_verdict(flow: dict) -> str:
    v = flow.get("verdict") or "VERDICT_UNKNOWN"
    if (flow.get("event_type") or {}).get("type") == 5:
        return {"FORWARDED": "ALLOWED", "REDIRECTED": "ALLOWED", "DROPPED": "DENIED",
                "AUDIT": "AUDITED"}.get(v, v)
    return v


def summary(flow: dict) -> str:
    if flow.get("Summary"):
        return flow["Summary"]
    l4 = flow.get("l4") or {}
    if "TCP" in l4:
        flags = [k for k in ("SYN", "ACK", "FIN", "RST", "PSH", "URG", "ECE", "CWR", "NS")
                 if ((l4["TCP"].get("flags") or {}).get(k))]
        return "TCP Flags: " + ", ".join(flags) if flags else "TCP"
    if "UDP" in l4:
        return "UDP"
    if "ICMPv4" in l4:
        return "ICMPv4 " + _ICMP4.get(l4["ICMPv4"].get("type", -1), f"type {l4['ICMPv4'].get('type')}")
    if "ICMPv6" in l4:
        return "ICMPv6"
    return ""


class Printer:
    def __init__(self, output: str = "compact", out: IO | None = None, node_name: bool = False):
        import sys
        if output not in FORMATS:
            raise ValueError(f"-o {output}: one of {', '.join(FORMATS)}")
        self.output = output
        self.out = out or sys.stdout
        self.node_name = node_name
        self.line = 0
        self._table_rows: list[list[str]] = []

    def write(self, rec: dict) -> None:
        f = rec.get("flow") or {}
        if self.output in ("json", "jsonpb"):
            self.out.write(json.dumps(rec, separators=(",", ":")) + "\n")
        elif self.output == "compact":
            self.out.write(compact(rec, self.node_name) + "\n")
        elif self.output == "dict":
            if self.line:
                self.out.write("------------\n")
            src, dst = host_names(f)
            rows = [("TIMESTAMP", fmt_timestamp(record_time_ns(rec)))]
            if self.node_name:
                rows.append(("NODE", rec.get("node_name") or f.get("node_name", "")))
            rows += [("SOURCE", src), ("DESTINATION", dst), ("TYPE", flow_type(f)),
                     ("VERDICT", f.get("verdict", "")), ("SUMMARY", summary(f))]
            for k, v in rows:
                self.out.write(f"{k:>11}: {v}\n")
        else:  # table: aligned at the end, as hubble's tabwriter does on flush
            src, dst = host_names(f)
            row = [fmt_timestamp(record_time_ns(rec))]
            if self.node_name:
                row.append(rec.get("node_name") or f.get("node_name", ""))
            row += [src, dst, flow_type(f), f.get("verdict", ""), summary(f)]
            self._table_rows.append(row)
        self.line += 1
        if self.output != "table":
            self.out.flush()

    def flush(self) -> None:
        if self.output != "table" or not self._table_rows:
            return
        head = ["TIMESTAMP"] + (["NODE"] if self.node_name else []) + \
            ["SOURCE", "DESTINATION", "TYPE", "VERDICT", "SUMMARY"]
        rows = [head] + self._table_rows
        widths = [max(len(r[i]) for r in rows) for i in range(len(head) - 1)]
        for r in rows:
            self.out.write("   ".join(c.ljust(w) for c, w in zip(r, widths)) + "   " + r[-1] + "\n")
        self._table_rows = []
        self.out.flush()


def compact(rec: dict, node_name: bool = False) -> str:
    f = rec.get("flow") or {}
    src, dst = host_names(f)
    sid = fmt_identity((f.get("source") or {}).get("identity"))
    did = fmt_identity((f.get("destination") or {}).get("identity"))
    if f.get("is_reply") is None:
        arrow = "<>"
    elif f.get("is_reply"):
        src, dst, sid, did, arrow = dst, src, did, sid, "<-"
    else:
        arrow = "->"
    node = f" [{rec.get('node_name') or f.get('node_name', '')}]" if node_name else ""
    s = summary(f)
    parts = [src, sid, arrow, dst, did, _compact_type(f), _compact_verdict(f)]
    line = f"{fmt_timestamp(record_time_ns(rec))}{node}: " + " ".join(p for p in parts if p)
    return line + (f" ({s})" if s else "")


FORMATS = ("compact", "table", "json", "jsonpb", "dict")

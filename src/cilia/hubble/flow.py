"""Datapath event -> Hubble flow (flow.proto field names, as `hubble observe -o json` prints).

Pure: everything the agent knows about addresses, identities and services comes in
through a :class:`FlowContext`, so the mapping is testable without an agent and the agent
can answer lookups from its in-memory state without touching the store per event."""
from __future__ import annotations

import functools
import os
import re
import time
from dataclasses import dataclass, field
from typing import Callable, Protocol

from cilia.datapath import events as E

# flow.proto DropReason names (Hubble's drop_reason_desc), by Cilium's drop reason number.
DROP_REASON_DESC = {
    130: "INVALID_SOURCE_MAC", 131: "INVALID_DESTINATION_MAC", 132: "INVALID_SOURCE_IP",
    133: "POLICY_DENIED", 134: "INVALID_PACKET_DROPPED", 135: "CT_TRUNCATED_OR_INVALID_HEADER",
    136: "CT_MISSING_TCP_ACK_FLAG", 137: "CT_UNKNOWN_L4_PROTOCOL", 138: "CT_CANNOT_CREATE_ENTRY_FROM_PACKET",
    139: "UNSUPPORTED_L3_PROTOCOL", 140: "MISSED_TAIL_CALL", 141: "ERROR_WRITING_TO_PACKET",
    142: "UNKNOWN_L4_PROTOCOL", 143: "UNKNOWN_ICMPV4_CODE", 144: "UNKNOWN_ICMPV4_TYPE",
    145: "UNKNOWN_ICMPV6_CODE", 146: "UNKNOWN_ICMPV6_TYPE", 147: "ERROR_RETRIEVING_TUNNEL_KEY",
    148: "ERROR_RETRIEVING_TUNNEL_OPTIONS", 149: "INVALID_GENEVE_OPTION", 150: "UNKNOWN_L3_TARGET_ADDRESS",
    151: "STALE_OR_UNROUTABLE_IP", 152: "NO_MATCHING_LOCAL_CONTAINER_FOUND",
    153: "ERROR_WHILE_CORRECTING_L3_CHECKSUM", 154: "ERROR_WHILE_CORRECTING_L4_CHECKSUM",
    155: "CT_MAP_INSERTION_FAILED", 156: "INVALID_IPV6_EXTENSION_HEADER", 157: "IP_FRAGMENTATION_NOT_SUPPORTED",
    158: "SERVICE_BACKEND_NOT_FOUND", 160: "NO_TUNNEL_OR_ENCAPSULATION_ENDPOINT",
    161: "FAILED_TO_INSERT_INTO_PROXYMAP", 162: "REACHED_EDT_RATE_LIMITING_DROP_HORIZON",
    163: "UNKNOWN_CONNECTION_TRACKING_STATE", 164: "LOCAL_HOST_IS_UNREACHABLE",
    165: "NO_CONFIGURATION_AVAILABLE_TO_PERFORM_POLICY_DECISION", 166: "UNSUPPORTED_L2_PROTOCOL",
    167: "NO_MAPPING_FOR_NAT_MASQUERADE", 168: "UNSUPPORTED_PROTOCOL_FOR_NAT_MASQUERADE",
    169: "FIB_LOOKUP_FAILED", 170: "ENCAPSULATION_TRAFFIC_IS_PROHIBITED", 171: "INVALID_IDENTITY",
    172: "UNKNOWN_SENDER", 173: "NAT_NOT_NEEDED", 174: "IS_A_CLUSTERIP",
    175: "FIRST_LOGICAL_DATAGRAM_FRAGMENT_NOT_FOUND", 176: "FORBIDDEN_ICMPV6_MESSAGE",
    177: "DENIED_BY_LB_SRC_RANGE_CHECK", 178: "SOCKET_LOOKUP_FAILED", 179: "SOCKET_ASSIGN_FAILED",
    180: "PROXY_REDIRECTION_NOT_SUPPORTED_FOR_PROTOCOL", 181: "POLICY_DENY", 182: "VLAN_FILTERED",
    183: "INVALID_VNI", 184: "INVALID_TC_BUFFER", 185: "NO_SID", 186: "MISSING_SRV6_STATE", 187: "NAT46",
    188: "NAT64", 189: "AUTH_REQUIRED", 190: "CT_NO_MAP_FOUND", 191: "SNAT_NO_MAP_FOUND",
    192: "INVALID_CLUSTER_ID", 193: "UNSUPPORTED_PROTOCOL_FOR_DSR_ENCAP", 194: "NO_EGRESS_GATEWAY",
    195: "UNENCRYPTED_TRAFFIC", 196: "TTL_EXCEEDED", 197: "NO_NODE_ID",
}

# Hubble's summary order ("TCP Flags: SYN, ACK").
_SUMMARY_FLAGS = (("SYN", 0x02), ("ACK", 0x10), ("PSH", 0x08), ("FIN", 0x01), ("RST", 0x04),
                  ("URG", 0x20), ("ECE", 0x40), ("CWR", 0x80))
_ICMP4_NAMES = {0: "EchoReply", 3: "DestinationUnreachable", 4: "SourceQuench", 5: "Redirect",
                8: "EchoRequest", 11: "TimeExceeded", 12: "ParameterProblem", 13: "TimestampRequest",
                14: "TimestampReply"}

# <deployment>-<pod-template-hash>-<5 chars> (Deployment pods), <owner>-<5 chars> (others).
_DEPLOY_POD = re.compile(r"^(?P<name>.+)-[a-z0-9]{6,10}-[a-z0-9]{5}$")


@functools.lru_cache(maxsize=4096)
def _workloads(pod_name: str, has_hash_label: bool | None) -> tuple[tuple[str, str], ...]:
    if not pod_name:
        return ()
    m = _DEPLOY_POD.match(pod_name)
    if m and has_hash_label is not False:
        return ((m.group("name"), "Deployment"),)
    return ((pod_name, "Pod"),)


def workloads(pod_name: str, labels: list[str] | None = None) -> list[dict]:
    """The owner Hubble would name: a Deployment for its pods (the name minus the
    replicaset hash and pod suffix, confirmed by a pod-template-hash label when labels are
    known), the pod itself otherwise."""
    # Cilium filters pod-template-hash out of identity labels, so its absence proves nothing:
    # the name's shape decides.
    return [{"name": n, "kind": k} for n, k in _workloads(pod_name, None)]


@dataclass
class EndpointView:
    """What is known about one side of a flow."""
    identity: int = 0
    ep_id: int = 0                 # local endpoint id (only for pods on this node)
    namespace: str = ""
    pod_name: str = ""
    labels: list[str] = field(default_factory=list)
    node: str = ""


class FlowContext(Protocol):
    node_name: str
    cluster_name: str

    def endpoint(self, ip: str) -> EndpointView | None: ...
    def identity_labels(self, identity: int) -> list[str]: ...
    def service(self, ip: str, port: int, proto: int) -> tuple[str, str] | None: ...  # (namespace, name)
    def rule(self, cookie: int) -> dict | None: ...


class _Clock:
    """CLOCK_MONOTONIC (bpf_ktime_get_ns) -> wall clock, re-anchored now and then so a
    stepped wall clock is followed within a second."""

    def __init__(self):
        self._at = 0.0
        self._offset = 0

    def wall_ns(self, mono_ns: int) -> int:
        now = time.monotonic()
        if now - self._at > 1.0:
            self._offset = time.time_ns() - time.monotonic_ns()
            self._at = now
        return mono_ns + self._offset


_clock = _Clock()


_sec_cache = [-1, ""]


def format_time(ns: int) -> str:
    secs, frac = divmod(ns, 1_000_000_000)
    if secs != _sec_cache[0]:  # strftime once per second of event time, not per flow
        _sec_cache[0], _sec_cache[1] = secs, time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(secs))
    return f"{_sec_cache[1]}.{frac:09d}Z"


class _Uuids:
    """Version-4-shaped UUIDs from a random base and a counter: unique per agent run at a
    fraction of uuid4()'s cost (one urandom read per flow is most of that)."""

    def __init__(self):
        h = int.from_bytes(os.urandom(8), "big")
        # xxxxxxxx-xxxx-4xxx-8 + 15 hex digits of a counter starting at a random point.
        self._prefix = f"{h >> 32:08x}-{(h >> 16) & 0xFFFF:04x}-4{h & 0xFFF:03x}-8"
        self._n = int.from_bytes(os.urandom(7), "big") >> 4

    def __call__(self) -> str:
        self._n = n = (self._n + 1) & 0xFFFFFFFFFFFFFFF
        s = f"{n:015x}"
        return f"{self._prefix}{s[:3]}-{s[3:]}"


new_uuid = _Uuids()


_RFC3339 = re.compile(r"^(\d{4})-(\d\d)-(\d\d)[Tt ](\d\d):(\d\d):(\d\d)(?:\.(\d{1,9}))?([Zz]|[+-]\d\d:\d\d)$")


def parse_time_ns(value: str | int | float) -> int:
    """RFC3339 (nanoseconds kept) or unix seconds -> unix nanoseconds; ValueError otherwise."""
    import calendar
    if isinstance(value, (int, float)):
        return int(value * 1_000_000_000)
    s = str(value).strip()
    if re.fullmatch(r"\d+(\.\d+)?", s):
        return int(float(s) * 1_000_000_000) if "." in s else int(s) * 1_000_000_000
    m = _RFC3339.match(s)
    if not m:
        raise ValueError(f"not an RFC3339 time or unix seconds: {value!r}")
    y, mo, d, h, mi, sec, frac, tz = m.groups()
    secs = calendar.timegm((int(y), int(mo), int(d), int(h), int(mi), int(sec), 0, 0, 0))
    if tz not in ("Z", "z"):
        sign = 1 if tz[0] == "+" else -1
        secs -= sign * (int(tz[1:3]) * 3600 + int(tz[4:6]) * 60)
    return secs * 1_000_000_000 + int((frac or "0").ljust(9, "0"))


_FLAG_NAMES = tuple(tuple(n for n, b in _SUMMARY_FLAGS if bits & b) for bits in range(256))
_TCP_SUMMARY = tuple("TCP Flags: " + ", ".join(names) for names in _FLAG_NAMES)


def tcp_flags_dict(bits: int) -> dict:
    return dict.fromkeys(_FLAG_NAMES[bits & 0xFF], True)


def summary(ev: E.Event) -> str:
    if ev.ip_proto == 6 and ev.l3:
        return _TCP_SUMMARY[ev.tcp_flags & 0xFF]
    if ev.ip_proto == 17:
        return "UDP"
    if ev.ip_proto == 1:
        return "ICMPv4 " + _ICMP4_NAMES.get(ev.icmp_type, str(ev.icmp_type))
    if ev.ip_proto == 132:
        return "SCTP"
    return ev.l3 or "Ethernet"


def _side(ctx: FlowContext, ip: str, identity: int) -> dict:
    """One side's endpoint object. Contexts with a ``side_cache`` dict (cleared whenever
    what they know changes) answer repeated peers from it: the same pods talk a lot."""
    cache = getattr(ctx, "side_cache", None)
    if cache is None:
        return _side_uncached(ctx, ip, identity)
    got = cache.get((ip, identity))
    if got is None:
        if len(cache) > 65536:
            cache.clear()
        got = cache[(ip, identity)] = _side_uncached(ctx, ip, identity)
    return dict(got)  # shallow: the lists inside are shared and must not be mutated


def _side_uncached(ctx: FlowContext, ip: str, identity: int) -> dict:
    view = ctx.endpoint(ip) if ip else None
    ident = identity or (view.identity if view else 0) or (2 if ip else 0)  # unknown = world
    out: dict = {}
    if view and view.ep_id:
        out["ID"] = view.ep_id
    out["identity"] = ident
    if view and view.pod_name:
        out["cluster_name"] = ctx.cluster_name
    if view and view.namespace:
        out["namespace"] = view.namespace
    labels = (view.labels if view and view.labels else None) or ctx.identity_labels(ident)
    if labels:
        out["labels"] = sorted(labels)
    if view and view.pod_name:
        out["pod_name"] = view.pod_name
        out["workloads"] = workloads(view.pod_name, labels)
    return out


def _direction(ev: E.Event) -> str:
    if ev.type == E.EVENT_TRACE:
        ingress = ev.subtype in (E.TRACE_TO_LXC, E.TRACE_FROM_NETWORK, E.TRACE_FROM_OVERLAY)
        if ev.is_reply:
            ingress = not ingress
        return "INGRESS" if ingress else "EGRESS"
    if ev.flags & E.EVT_F_INGRESS:
        return "INGRESS"
    if ev.flags & E.EVT_F_EGRESS:
        return "EGRESS"
    return "TRAFFIC_DIRECTION_UNKNOWN"


def _service(ctx: FlowContext, ip: str, port: int, proto: int) -> dict | None:
    if not ip or not port:
        return None
    svc = ctx.service(ip, port, proto)
    return {"name": svc[1], "namespace": svc[0]} if svc else None


def build(ev: E.Event, ctx: FlowContext, *, new_uuid: Callable[[], str] = new_uuid) -> tuple[int, dict]:
    """(unix ns, record) for one event; the record is what /v1/flows streams."""
    t_ns = _clock.wall_ns(ev.ktime_ns)
    ts = format_time(t_ns)
    flow: dict = {"time": ts, "uuid": new_uuid()}
    direction = _direction(ev)
    if ev.type == E.EVENT_DROP:
        flow["verdict"] = "DROPPED"
        flow["drop_reason"] = ev.subtype
        flow["drop_reason_desc"] = DROP_REASON_DESC.get(ev.subtype, "DROP_REASON_UNKNOWN")
    elif ev.type == E.EVENT_POLICY_VERDICT:
        if ev.action == E.ACTION_DENY:
            # A matching entry that denied is an explicit deny rule; no match is default deny.
            reason = 181 if ev.match_type else 133
            flow["verdict"] = "DROPPED"
            flow["drop_reason"] = reason
            flow["drop_reason_desc"] = DROP_REASON_DESC[reason]
        else:
            flow["verdict"] = "AUDIT" if ev.action == E.ACTION_AUDIT else "FORWARDED"
    else:
        flow["verdict"] = "FORWARDED"
    if ev.src_mac:
        flow["ethernet"] = {"source": ev.src_mac, "destination": ev.dst_mac}
    if ev.l3:
        flow["IP"] = {"source": ev.src_ip, "destination": ev.dst_ip, "ipVersion": "IPv4"}
        if ev.ip_proto == 6:
            flow["l4"] = {"TCP": {"source_port": ev.src_port, "destination_port": ev.dst_port,
                                  "flags": tcp_flags_dict(ev.tcp_flags)}}
        elif ev.ip_proto == 17:
            flow["l4"] = {"UDP": {"source_port": ev.src_port, "destination_port": ev.dst_port}}
        elif ev.ip_proto == 1:
            flow["l4"] = {"ICMPv4": {"type": ev.icmp_type, "code": ev.icmp_code}}
        elif ev.ip_proto == 132:
            flow["l4"] = {"SCTP": {"source_port": ev.src_port, "destination_port": ev.dst_port}}
    flow["source"] = _side(ctx, ev.src_ip, ev.src_identity)
    flow["destination"] = _side(ctx, ev.dst_ip, ev.dst_identity)
    flow["Type"] = "L3_L4"
    flow["node_name"] = ctx.node_name
    flow["event_type"] = {"type": ev.type, "sub_type": ev.subtype}
    src_svc = _service(ctx, ev.src_ip, ev.src_port, ev.ip_proto)
    if src_svc:
        flow["source_service"] = src_svc
    dst_svc = (_service(ctx, ev.orig_ip, ev.orig_port, ev.ip_proto) if ev.orig_ip
               else _service(ctx, ev.dst_ip, ev.dst_port, ev.ip_proto))
    if dst_svc:
        flow["destination_service"] = dst_svc
    flow["traffic_direction"] = direction
    if ev.type == E.EVENT_POLICY_VERDICT:
        flow["policy_match_type"] = ev.match_type
        rule = ctx.rule(ev.rule_cookie) if ev.rule_cookie else None
        if rule:
            side = "ingress" if direction == "INGRESS" else "egress"
            kind = "denied" if ev.action == E.ACTION_DENY else "allowed"
            flow[f"{side}_{kind}_by"] = [rule]
    if ev.type == E.EVENT_TRACE:
        flow["trace_observation_point"] = E.OBS_POINT_NAMES.get(ev.subtype, "UNKNOWN_POINT")
    if ev.type != E.EVENT_DROP:
        flow["is_reply"] = ev.is_reply
    if ev.orig_ip:
        # Not a Hubble field: the frontend the client addressed, for `cilia monitor` and
        # debugging service translation.
        flow["original_destination"] = {"ip": ev.orig_ip, "port": ev.orig_port}
    flow["Summary"] = summary(ev)
    return t_ns, {"flow": flow, "node_name": ctx.node_name, "time": ts}


@dataclass
class StaticContext:
    """A FlowContext over plain dicts (tests, benchmarks, tools)."""
    node_name: str = ""
    cluster_name: str = "default"
    endpoints: dict[str, EndpointView] = field(default_factory=dict)
    identities: dict[int, list[str]] = field(default_factory=dict)
    services: dict[tuple[str, int, int], tuple[str, str]] = field(default_factory=dict)
    rules: dict[int, dict] = field(default_factory=dict)
    side_cache: dict = field(default_factory=dict)

    def endpoint(self, ip: str) -> EndpointView | None:
        return self.endpoints.get(ip)

    def identity_labels(self, identity: int) -> list[str]:
        return self.identities.get(identity) or reserved_labels(identity)

    def service(self, ip: str, port: int, proto: int) -> tuple[str, str] | None:
        return self.services.get((ip, port, proto))

    def rule(self, cookie: int) -> dict | None:
        return self.rules.get(cookie)


@functools.lru_cache(maxsize=64)
def _reserved_labels(identity: int) -> tuple[str, ...]:
    from cilia.identity.reserved import reserved_identity
    r = reserved_identity(identity)
    return tuple(sorted(r.labels)) if r is not None else ()


def reserved_labels(identity: int) -> list[str]:
    return list(_reserved_labels(identity))

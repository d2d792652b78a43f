"""Flow validation: what each action must (and must not) leave in the observe API.

Flows come from every agent's `GET /v1/flows` (NDJSON, Hubble's JSON field names) and are
matched per action on addresses and the client's port range, as cilium-cli matches Hubble
flows per pod: a TCP success needs SYN, FIN and no drop (SYN-ACK and ICMP replies are
reported but not required: the agent aggregates traces as Cilium does); a drop needs the
SYN, a DROPPED flow with the expected reason and direction, and no SYN-ACK.
"""
from __future__ import annotations

import asyncio
import json
import time
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Callable, Iterable
from urllib.parse import urlencode

from cilia.api.client import _UnixConnection

from .model import POLICY_REASONS, Action

HAIRPIN_IP = "169.254.42.1"


# --- reading flows -------------------------------------------------------------------------

class FlowAPIUnavailable(Exception):
    pass


def rfc3339(ts: float) -> str:
    dt = datetime.fromtimestamp(ts, tz=timezone.utc)
    return dt.strftime("%Y-%m-%dT%H:%M:%S.") + f"{dt.microsecond:06d}Z"


def _get_raw(socket_path: str, path: str, timeout: float) -> tuple[int, bytes]:
    conn = _UnixConnection(socket_path, timeout)
    try:
        conn.request("GET", path)
        resp = conn.getresponse()
        return resp.status, resp.read()
    except OSError as e:
        raise FlowAPIUnavailable(f"agent at {socket_path} unreachable: {e}") from None
    finally:
        conn.close()


class AgentFlows:
    """Every node's flows since a time: through the relay's merge (cilia.hubble.relay) when
    it is there, else straight from each agent."""

    def __init__(self, lab: str, sockets: dict[str, str], timeout: float = 10.0):
        self.lab = lab
        self.sockets = sockets
        self.timeout = timeout

    def check(self) -> None:
        for node, sock in self.sockets.items():
            status, _ = _get_raw(sock, "/v1/flows/status", self.timeout)
            if status != 200:
                raise FlowAPIUnavailable(f"GET /v1/flows/status on {node}: HTTP {status}")

    def lost_events(self) -> dict[str, int]:
        """Each agent's count of datapath events it could not read (ring overruns)."""
        out = {}
        for node, sock in self.sockets.items():
            status, body = _get_raw(sock, "/v1/flows/status", self.timeout)
            if status != 200:
                raise FlowAPIUnavailable(f"GET /v1/flows/status on {node}: HTTP {status}")
            out[node] = int(json.loads(body).get("lost_events") or 0)
        return out

    async def since(self, ts: float) -> list[dict]:
        try:
            from cilia.hubble import relay
        except ImportError:
            relay = None
        if relay is not None:
            problems: list[str] = []
            recs = await relay.collect(self.lab, list(self.sockets),
                                       relay.Query(since=rfc3339(ts)), problems.append)
            if problems:
                # A node's flows missing would fail actions for the wrong reason.
                raise FlowAPIUnavailable("; ".join(problems))
            return [_flow_of(r) for r in recs]
        return await asyncio.to_thread(self._direct, ts)

    def _direct(self, ts: float) -> list[dict]:
        out: list[dict] = []
        for node, sock in self.sockets.items():
            status, body = _get_raw(sock, "/v1/flows?" + urlencode({"since": rfc3339(ts)}),
                                    self.timeout)
            if status != 200:
                raise FlowAPIUnavailable(f"GET /v1/flows on {node}: HTTP {status}")
            out += [_flow_of(json.loads(line), node) for line in body.splitlines() if line.strip()]
        out.sort(key=lambda f: f.get("time", ""))
        return out


def _flow_of(rec: dict, node: str = "") -> dict:
    flow = rec.get("flow", rec)
    flow.setdefault("node_name", rec.get("node_name", node))
    return flow


# --- matching ------------------------------------------------------------------------------

def _ip(flow: dict) -> tuple[str, str]:
    ip = flow.get("IP") or {}
    return ip.get("source", ""), ip.get("destination", "")


def _tcp(flow: dict) -> dict | None:
    return (flow.get("l4") or {}).get("TCP")


def _icmp_type(flow: dict) -> int | None:
    icmp = (flow.get("l4") or {}).get("ICMPv4")
    return None if icmp is None else int(icmp.get("type", 0))


def _flags(flow: dict) -> dict:
    return (_tcp(flow) or {}).get("flags") or {}


def is_drop(flow: dict) -> bool:
    return flow.get("verdict") == "DROPPED"


def drop_reason(flow: dict) -> str:
    desc = flow.get("drop_reason_desc")
    if desc:
        return str(desc)
    code = flow.get("drop_reason")
    for name, num in POLICY_REASONS.items():
        if code == num:
            return name
    return str(code or "")


@dataclass
class Tuple:
    """The addresses and ports that identify one action's packets in either direction."""
    clients: set[str]
    servers: set[str]
    client_ports: tuple[int, int] | None
    server_ports: set[int]
    protocol: str
    # North-south to a remote backend: the node SNATs to its address and picks a new port,
    # so past that node the flow is (node IP, a port outside every probe range) -> backend.
    snat_clients: set[str] = field(default_factory=set)
    backends: set[str] = field(default_factory=set)

    def request(self, f: dict) -> bool:
        s, d = _ip(f)
        if s in self.clients and d in self.servers:
            cport_field = "source_port"
        elif s in self.snat_clients and d in self.backends:
            cport_field = None
        else:
            return False
        if self.protocol == "ICMP":
            return _icmp_type(f) == 8
        t = _tcp(f)
        if t is None or t.get("destination_port") not in self.server_ports:
            return False
        return self._cport(t.get(cport_field)) if cport_field else _snat_port(t.get("source_port"))

    def reply(self, f: dict) -> bool:
        s, d = _ip(f)
        if s in self.servers and d in self.clients:
            cport_field = "destination_port"
        elif s in self.backends and d in self.snat_clients:
            cport_field = None
        else:
            return False
        if self.protocol == "ICMP":
            return _icmp_type(f) == 0
        t = _tcp(f)
        if t is None or t.get("source_port") not in self.server_ports:
            return False
        return (self._cport(t.get(cport_field)) if cport_field
                else _snat_port(t.get("destination_port")))

    def _cport(self, port) -> bool:
        if not self.client_ports or not self.client_ports[0]:
            return True
        return port is not None and self.client_ports[0] <= int(port) <= self.client_ports[1]


# Every probe's local port comes from here (the runner hands out ranges of it), so a port
# outside it on a flow from a node address is a translated one.
PROBE_PORTS = (20000, 28999)


def _snat_port(port) -> bool:
    return port is not None and not PROBE_PORTS[0] <= int(port) <= PROBE_PORTS[1]


def action_tuple(a: Action, node_ips: Iterable[str]) -> Tuple:
    src, dst = a.src, a.dst
    clients = {src.address}
    servers = {dst.address, *dst.backend_ips}
    snat: set[str] = set()
    if dst.kind == "nodeport" and not src.is_endpoint:
        snat = {dst.address}
    if dst.kind in ("service", "nodeport") and src.address in dst.backend_ips:
        clients.add(HAIRPIN_IP)
    ports = {p for p in (dst.port, dst.target_port) if p}
    return Tuple(clients, servers, a.local_ports if a.spec.probe == "curl" else None, ports,
                 a.spec.protocol, snat, set(dst.backend_ips))


@dataclass
class Requirement:
    msg: str
    match: Callable[[dict], bool]
    expect: bool = True          # False: must not be found
    # Like cilium-cli's SkipOnAggregation: the agent traces a connection's packets only when
    # its TCP flags change (Cilium's monitor aggregation), so some replies never show.
    optional: bool = False


@dataclass
class Outcome:
    ok: bool
    lines: list[str] = field(default_factory=list)
    matched: dict[int, bool] = field(default_factory=dict)   # flow index -> expected?
    flows: list[dict] = field(default_factory=list)


def requirements(a: Action, t: Tuple) -> list[Requirement]:
    either = lambda f: t.request(f) or t.reply(f)  # noqa: E731
    if t.protocol == "ICMP":
        first = Requirement("ICMP request", t.request)
        answer = Requirement("ICMP response", lambda f: t.reply(f) and not is_drop(f),
                             optional=True)
    else:
        first = Requirement("SYN", lambda f: t.request(f) and _flags(f).get("SYN")
                            and not _flags(f).get("ACK"))
        answer = Requirement("SYN-ACK", lambda f: t.reply(f) and _flags(f).get("SYN")
                             and _flags(f).get("ACK") and not is_drop(f), optional=True)
    if not a.expects_drop():
        reqs = [first, answer]
        if t.protocol == "TCP":
            if a.dst.kind == "external":
                # cilium-cli's RSTAllowed for world destinations: either end may reset.
                reqs.append(Requirement("FIN or RST", lambda f: either(f) and not is_drop(f) and (
                    _flags(f).get("FIN") or _flags(f).get("RST")), optional=True))
            else:
                reqs.append(Requirement("FIN", lambda f: either(f) and _flags(f).get("FIN")
                                        and not is_drop(f)))
                reqs.append(Requirement("RST", lambda f: either(f) and _flags(f).get("RST"),
                                        expect=False))
        reqs.append(Requirement("L3/L4 Drop", lambda f: either(f) and is_drop(f), expect=False))
        return reqs
    reqs = [first]
    specific = [(r, d) for r, d in ((a.egress, "EGRESS"), (a.ingress, "INGRESS"))
                if r.drop and r.reasons]
    if specific:
        for res, direction in specific:
            reasons = set(res.reasons)
            reqs.append(Requirement(
                f"Drop ({'/'.join(sorted(reasons))}, {direction.lower()})",
                lambda f, reasons=reasons, direction=direction: (
                    t.request(f) and is_drop(f) and drop_reason(f) in reasons
                    and f.get("traffic_direction", direction) == direction)))
    else:
        reqs.append(Requirement("Drop", lambda f: t.request(f) and is_drop(f)))
    answer.expect = False
    answer.optional = False
    reqs.append(answer)
    return reqs


def evaluate(a: Action, flows: list[dict], node_ips: Iterable[str]) -> Outcome:
    t = action_tuple(a, node_ips)
    mine = [f for f in flows if t.request(f) or t.reply(f)]
    out = Outcome(ok=True, flows=mine)
    for req in requirements(a, t):
        hit = next((i for i, f in enumerate(mine) if req.match(f)), None)
        found = hit is not None
        if hit is not None:
            out.matched[hit] = req.expect
        suffix = f"found at {hit}" if found else "not found"
        if found == req.expect:
            out.lines.append(f"✅ {req.msg} {suffix}")
        elif req.optional:
            out.lines.append(f"ℹ️  {req.msg} {suffix} (not required: monitor aggregation)")
        else:
            out.ok = False
            out.lines.append(f"❌ {req.msg} {suffix}" + ("" if req.expect else " (must not be)"))
    return out


def format_flow(index: int, f: dict, matched: dict[int, bool]) -> str:
    prefix = {True: "✅", False: "❌"}.get(matched.get(index), "❓")
    s, d = _ip(f)
    t = _tcp(f)
    if t:
        s, d = f"{s}:{t.get('source_port')}", f"{d}:{t.get('destination_port')}"
    src = (f.get("source") or {}).get("pod_name")
    dst = (f.get("destination") or {}).get("pod_name")
    if src:
        s = f"{(f.get('source') or {}).get('namespace', '')}/{src} ({s})"
    if dst:
        d = f"{(f.get('destination') or {}).get('namespace', '')}/{dst} ({d})"
    ts = f.get("time", "")[11:23]
    point = f.get("trace_observation_point") or f.get("Type") or ""
    verdict = f.get("verdict", "")
    extra = f" {drop_reason(f)}" if is_drop(f) else ""
    return (f"{prefix} [{index}] {ts} {f.get('node_name', '')}: {s} -> {d} {point} "
            f"{verdict}{extra} ({f.get('Summary', '')})")


async def wait_and_evaluate(source: AgentFlows, actions: list[Action], since: float,
                            node_ips: list[str], wait: float) -> dict[int, Outcome]:
    """Fetch flows until every action's requirements hold or `wait` seconds pass (flows
    reach the ring a little after the probe returns)."""
    deadline = time.monotonic() + wait
    while True:
        flows = await source.since(since)
        outcomes = {id(a): evaluate(a, flows, node_ips) for a in actions}
        if all(o.ok for o in outcomes.values()) or time.monotonic() >= deadline:
            return outcomes
        await asyncio.sleep(0.3)

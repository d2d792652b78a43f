"""`cilia monitor`: a node's raw datapath events, one line each as `cilium monitor` prints
them (or JSON with -j), streamed from the agent's /v1/monitor."""
from __future__ import annotations

import json
import socket
import sys
from urllib.parse import urlencode

import click

from cilia.api.client import _UnixConnection
from cilia.cli.context import CLIError, agent, lab_spec, node_name
from cilia.datapath import events as E
from cilia.datapath.reasons import reason_name

# `cilium monitor` orders TCP flags SYN, ACK, RST, FIN (pkg/monitor/dissect.go).
_MONITOR_FLAGS = (("SYN", 0x02), ("ACK", 0x10), ("RST", 0x04), ("FIN", 0x01))
_ICMP4 = {0: "EchoReply", 3: "DestinationUnreachable", 5: "Redirect", 8: "EchoRequest", 11: "TimeExceeded"}


def connection_summary(ev: dict) -> str:
    src, dst, proto = ev.get("src_ip"), ev.get("dst_ip"), ev.get("ip_proto")
    if not ev.get("l3"):
        return f"{ev.get('src_mac', '')} -> {ev.get('dst_mac', '')}"
    if proto in (6, 17, 132):
        left, right = f"{src}:{ev['src_port']}", f"{dst}:{ev['dst_port']}"
        if proto == 6:
            flags = ", ".join(n for n, b in _MONITOR_FLAGS if ev.get("tcp_flags", 0) & b)
            return f"{left} -> {right} tcp {flags}".rstrip()
        return f"{left} -> {right} {'udp' if proto == 17 else 'sctp'}"
    if proto == 1:
        return f"{src} -> {dst} {_ICMP4.get(ev.get('icmp_type'), 'icmp type ' + str(ev.get('icmp_type')))}"
    return f"{src} -> {dst} proto {proto}"


def format_event(ev: dict) -> str:
    """Cilium monitor's one-line form of an event dict (Event.to_dict())."""
    summary = connection_summary(ev)
    typ = ev.get("type")
    if typ == E.EVENT_TRACE:
        obs = ev.get("subtype")
        where = E.OBS_POINT_MONITOR.get(obs, f"point {obs}")
        head = f"-> {where} {ev['ep_id']}" if obs == E.TRACE_TO_LXC else f"-> {where}"
        orig = ev.get("orig_ip") or "0.0.0.0"
        return (f"{head} flow 0x0 , identity {ev['src_identity']}->{ev['dst_identity']} "
                f"state {E.CT_STATE_NAMES.get(ev.get('ct_state'), 'unknown')} ifindex {ev['ifindex']} "
                f"orig-ip {orig}: {summary}")
    if typ == E.EVENT_DROP:
        return (f"xx drop ({reason_name(ev['subtype'])}) flow 0x0 to endpoint {ev['ep_id']}, "
                f"ifindex {ev['ifindex']}, identity {ev['src_identity']}->{ev['dst_identity']}: {summary}")
    if typ == E.EVENT_POLICY_VERDICT:
        ingress = ev.get("flags", 0) & E.EVT_F_INGRESS
        remote = ev["src_identity"] if ingress else ev["dst_identity"]
        return (f"Policy verdict log: flow 0x0 local EP ID {ev['ep_id']}, remote ID {remote}, "
                f"proto {ev.get('proto')}, {'ingress' if ingress else 'egress'}, "
                f"action {E.ACTION_NAMES.get(ev.get('action'), '?')}, auth: disabled, "
                f"match {E.MATCH_NAMES.get(ev.get('match_type'), '?')}, {summary}")
    return f"unknown event type {typ}: {summary}"


def stream_events(socket_path: str, types: tuple[str, ...], timeout: float | None = None):
    """Yields event dicts from the agent until it closes the stream."""
    conn = _UnixConnection(socket_path, timeout)
    try:
        conn.request("GET", "/v1/monitor?" + urlencode([("type", t) for t in types]))
        resp = conn.getresponse()
        if resp.status >= 400:
            body = resp.read()
            try:
                msg = json.loads(body).get("msg")
            except ValueError:
                msg = body.decode(errors="replace").strip()
            raise CLIError(msg or f"HTTP {resp.status}")
        while True:
            line = resp.readline()
            if not line:
                return
            if line.strip():
                yield json.loads(line)
    except (FileNotFoundError, ConnectionRefusedError) as e:
        raise CLIError(f"agent at {socket_path} unreachable: {e}") from None
    finally:
        conn.close()


@click.command("monitor", help="Print the datapath's trace, drop and policy verdict events as they happen.")
@click.option("-t", "--type", "types", multiple=True,
              type=click.Choice(sorted(E.EVENT_TYPE_NAMES.values())),
              help="Only these event types (repeatable).")
@click.option("-j", "--json", "as_json", is_flag=True, help="One JSON object per event.")
@click.option("--node", default=None, help="The lab node whose agent to listen to (default: the first).")
@click.pass_context
def monitor(ctx, types: tuple[str, ...], as_json: bool, node: str | None) -> None:
    spec = lab_spec(ctx)
    name = node_name(spec, node)
    sock = agent(spec, name).socket_path
    if not as_json:
        click.echo("Listening for events on node " + name + ". Press Ctrl-C to quit")
    try:
        for ev in stream_events(sock, types):
            click.echo(json.dumps(ev) if as_json else format_event(ev))
            sys.stdout.flush()
    except (KeyboardInterrupt, BrokenPipeError):
        return
    except socket.timeout:
        raise CLIError(f"node {name}: agent stopped answering") from None

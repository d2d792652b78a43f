"""`cilia observe`: `hubble observe` over every node of the lab (merged as Hubble Relay
does) or one node with --node."""
from __future__ import annotations

import asyncio
import os
import re
import sys
import time

import click

from cilia.cli.context import CLIError, lab_spec, node_name
from cilia.hubble import filters

# flag -> help; all take a value and may repeat (values OR, different flags AND).
_FILTER_HELP = {
    "pod": "Flows from or to pods with this [namespace/]name prefix",
    "from-pod": "Flows from pods with this [namespace/]name prefix",
    "to-pod": "Flows to pods with this [namespace/]name prefix",
    "namespace": "Flows from or to pods in this namespace",
    "from-namespace": "Flows from pods in this namespace",
    "to-namespace": "Flows to pods in this namespace",
    "label": "Flows from or to endpoints matching this label selector",
    "from-label": "Flows from endpoints matching this label selector",
    "to-label": "Flows to endpoints matching this label selector",
    "ip": "Flows from or to this IP (or CIDR)",
    "from-ip": "Flows from this IP (or CIDR)",
    "to-ip": "Flows to this IP (or CIDR)",
    "port": "Flows with this source or destination port",
    "from-port": "Flows with this source port",
    "to-port": "Flows with this destination port",
    "identity": "Flows from or to this security identity",
    "from-identity": "Flows from this security identity",
    "to-identity": "Flows to this security identity",
    "service": "Flows from or to this [namespace/]service",
    "from-service": "Flows from this [namespace/]service",
    "to-service": "Flows to this [namespace/]service",
    "workload": "Flows from or to this workload",
    "from-workload": "Flows from this workload",
    "to-workload": "Flows to this workload",
    "protocol": "L4 protocol: tcp, udp, icmp, icmpv4, icmpv6, sctp",
    "verdict": "FORWARDED, DROPPED, AUDIT, ...",
    "type": "Event type: trace, drop, policy-verdict, l7, optionally type:subtype (trace:to-endpoint)",
    "node-name": "Flows observed on this node (glob)",
    "traffic-direction": "ingress or egress",
    "drop-reason-desc": "Drop reason, e.g. POLICY_DENIED",
    "tcp-flags": "Flows with all of these TCP flags (comma-separated)",
    "is-reply": "true: only replies; false: only requests",
    "uuid": "The flow with this UUID",
}
_SHORT = {"namespace": "-n", "label": "-l", "type": "-t"}
_RELATIVE = re.compile(r"^(\d+(?:\.\d+)?)(ns|us|µs|ms|s|m|h|d)$")
_UNITS = {"ns": 1e-9, "us": 1e-6, "µs": 1e-6, "ms": 1e-3, "s": 1, "m": 60, "h": 3600, "d": 86400}


def parse_when(flag: str, value: str | None, now: float | None = None) -> str | None:
    """--since/--until: RFC3339, unix seconds, or a duration ago (5m, 1h30m, 90s)."""
    if value is None:
        return None
    from cilia.hubble.printers import format_time_ns, parse_time_ns
    v = value.strip()
    now = time.time() if now is None else now
    parts = re.findall(r"(\d+(?:\.\d+)?)(ns|us|µs|ms|s|m|h|d)", v)
    if parts and "".join(a + b for a, b in parts) == v:
        ago = sum(float(a) * _UNITS[b] for a, b in parts)
        return format_time_ns(int((now - ago) * 1_000_000_000))
    try:
        return format_time_ns(parse_time_ns(v))
    except ValueError:
        raise CLIError(f"--{flag} {value!r}: expected RFC3339 (2026-11-28T16:00:00Z), "
                       f"unix seconds or a duration like 5m") from None


class _OrderedCommand(click.Command):
    """Keeps the raw argument list: --not applies to the *next* filter flag, an order
    click's per-option values do not keep."""

    def parse_args(self, ctx: click.Context, args: list[str]) -> list[str]:
        ctx.meta["raw_args"] = list(args)
        return super().parse_args(ctx, args)


def ordered_filter_args(args: list[str]) -> list[tuple[str, str | None]]:
    """[(flag, value)] for the filter flags in command-line order, "not" included."""
    names = {f"--{f}": f for f in _FILTER_HELP} | {s: f for f, s in _SHORT.items()}
    out: list[tuple[str, str | None]] = []
    i = 0
    while i < len(args):
        a = args[i]
        if a == "--":
            break
        if a == "--not":
            out.append(("not", None))
        elif a.startswith("--") and "=" in a and a.split("=", 1)[0] in names:
            k, v = a.split("=", 1)
            out.append((names[k], v))
        elif a in names:
            out.append((names[a], args[i + 1] if i + 1 < len(args) else ""))
            i += 1
        elif len(a) > 2 and a[:2] in names and a[:2] in _SHORT.values():
            out.append((names[a[:2]], a[2:]))
        i += 1
    return out


def _filter_options(f):
    for name in reversed(list(_FILTER_HELP)):
        decls = [f"--{name}"] + ([_SHORT[name]] if name in _SHORT else [])
        f = click.option(*decls, f"filter_{name.replace('-', '_')}", multiple=True,
                         metavar="VALUE", help=_FILTER_HELP[name])(f)
    return f


@click.command("observe", cls=_OrderedCommand)
@_filter_options
@click.option("--not", "negate", is_flag=True, help="Negate the next filter flag")
@click.option("--last", type=int, default=None, help="Get the last N flows (per query; default 20 without --follow/--since/--first)")
@click.option("--first", type=int, default=None, help="Get the first N flows")
@click.option("--follow", "-f", is_flag=True, help="Keep printing new flows as they arrive")
@click.option("--since", default=None, help="Flows since: RFC3339, unix seconds or a duration ago (5m)")
@click.option("--until", default=None, help="Flows until: RFC3339, unix seconds or a duration ago")
@click.option("--all", "all_", is_flag=True, help="Every flow in the rings (no default --last)")
@click.option("-o", "--output", type=click.Choice(["compact", "table", "json", "jsonpb", "dict"]),
              default="compact", show_default=True)
@click.option("--print-node-name", is_flag=True, help="Show the node that observed each flow")
@click.option("--node", default=None, help="Ask only this node's agent (default: every node, merged)")
@click.pass_context
def observe(ctx: click.Context, negate: bool, last: int | None, first: int | None, follow: bool,
            since: str | None, until: str | None, all_: bool, output: str,
            print_node_name: bool, node: str | None, **_filters) -> None:
    """Observe flows, as `hubble observe` does (filters, --not, -o compact|table|json|dict)."""
    from cilia.hubble.printers import Printer
    from cilia.hubble.relay import Query, collect, follow as follow_flows
    if last is not None and first is not None:
        raise CLIError("--last and --first are mutually exclusive")
    if first is not None and follow:
        raise CLIError("--first and --follow are mutually exclusive")
    for flag, n in (("last", last), ("first", first)):
        if n is not None and n < 0:
            raise CLIError(f"--{flag} {n}: must be >= 0")
    try:
        allow, deny = filters.from_args(ordered_filter_args(ctx.meta.get("raw_args", [])))
    except filters.FilterError as e:
        raise CLIError(str(e)) from None
    if last is None and first is None and not follow and not since and not until and not all_:
        last = 20  # hubble observe's default
    q = Query(last=last, first=first, since=parse_when("since", since),
              until=parse_when("until", until), follow=follow, allow=allow, deny=deny)
    spec = lab_spec(ctx)
    nodes = [node_name(spec, node)] if node else [n.name for n in spec.nodes]
    # an installed host names its agent's socket; a lab's follow the lab's layout
    sockets = {n: spec.agent_socket(n) for n in nodes} if hasattr(spec, "agent_socket") else None
    printer = Printer(output, sys.stdout, node_name=print_node_name)
    warnings: list[str] = []

    def warn(msg: str) -> None:
        warnings.append(msg)
        click.echo(f"warning: {msg}", err=True)

    try:
        if follow:
            try:
                asyncio.run(follow_flows(spec.name, nodes, q, warn, printer.write, sockets=sockets))
            except KeyboardInterrupt:
                pass
            printer.flush()
        else:
            recs = asyncio.run(collect(spec.name, nodes, q, warn, sockets))
            for r in recs:
                printer.write(r)
            printer.flush()
    except BrokenPipeError:
        # `cilia observe ... | head`: the reader is gone, which is not an error
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return
    if len(warnings) >= len(nodes) and nodes:
        raise CLIError(f"no node answered ({'; '.join(warnings)})")

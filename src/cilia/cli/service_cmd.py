"""Cilium-shaped service views of one node: `service list|get`, `bpf lb list`, `bpf ct list`.

Thin over the agent API: /v1/service (the LB reconciler's services_view()), /v1/bpf/lb and
/v1/bpf/ct (the datapath's own map dumps). `cilia get services|endpointslices` needs nothing
here: those kinds are in the k8s registry and printers.
"""
from __future__ import annotations

import click

from cilia.cli.agent_cmd import bpf, node_listing, node_option, output_option
from cilia.cli.context import CLIError, agent_get, emit_json, lab_spec, node_name
from cilia.k8s.printers import render_columns
from cilia.loadbalancer.view import service_list_rows

_PROTO = {6: "TCP", 17: "UDP", 132: "SCTP", 1: "ICMP"}


def _proto(value) -> str:
    return _PROTO.get(value, str(value)) if isinstance(value, int) else str(value or "TCP")


def _first(d: dict, *names, default=None):
    for n in names:
        if d.get(n) is not None:
            return d[n]
    return default


@click.group("service", help="Load-balanced services programmed on a node.")
def service() -> None:
    pass


def _services(ctx, node: str | None) -> list[dict]:
    spec = lab_spec(ctx)
    return agent_get(spec, node_name(spec, node), "/v1/service")


node_listing(service, "/v1/service", service_list_rows)


@service.command("get")
@click.argument("ident", type=int)
@node_option
@output_option
@click.pass_context
def service_get(ctx, ident: int, node: str | None, output: str) -> None:
    found = [s for s in _services(ctx, node) if (s.get("spec") or {}).get("id") == ident]
    if not found:
        raise CLIError(f"service {ident} not found")
    if output == "json":
        emit_json(found[0])
        return
    click.echo(render_columns(service_list_rows(found)), nl=False)


# --- bpf lb / bpf ct ------------------------------------------------------------------------

def lb_rows(entries: list[dict]) -> list[list[str]]:
    """`cilium bpf lb list`: each frontend scope with (rev-NAT id) and its flags, then its
    backends with (rev-NAT id) (slot). Keys are NodeDatapath.services()'s."""
    rows = [["SERVICE ADDRESS", "BACKEND ADDRESS (REVNAT_ID) (SLOT)"]]
    for e in entries:
        proto = _proto(_first(e, "proto", "protocol"))
        addr = f"{_first(e, 'address', 'ip')}:{_first(e, 'port', default=0)}/{proto}"
        if _first(e, "scope") == "internal":
            addr += "/i"
        rev = _first(e, "rev_nat", "rev_nat_index", default=0)
        flags = list(_first(e, "flags", default=[]) or []) or [str(_first(e, "kind", default="ClusterIP"))]
        if _first(e, "algorithm") == "maglev" and "Maglev" not in flags:
            flags.append("Maglev")
        timeout = _first(e, "affinity_timeout", default=0)
        if timeout:
            flags.append(f"affinity {timeout}s")
        rows.append([f"{addr} ({rev})", f"0.0.0.0:0 ({rev}) (0) [{', '.join(flags)}]"])
        for i, b in enumerate(_first(e, "backends", default=[]) or [], start=1):
            b_addr = f"{_first(b, 'address', 'ip')}:{_first(b, 'port', default=0)}/{_proto(_first(b, 'proto', default=proto))}"
            state = _first(b, "state", default="active")
            note = f" [{state}]" if state != "active" else ""
            rows.append(["", f"{b_addr} ({rev}) ({_first(b, 'slot', default=i)}){note}"])
    return rows


_CT_SHOWN = {"proto", "protocol", "type", "tuple", "saddr", "sport", "daddr", "dport"}
_CT_NAMES = {"rev_nat": "RevNAT", "backend": "BackendID", "flags": "Flags", "age": "Age",
             "idle": "Idle", "created": "Created", "last_seen": "LastSeen"}


def format_ct(e: dict) -> str:
    """One conntrack entry as `cilium bpf ct list global` prints it (SVC for the service
    tuple of a load-balanced flow, OUT for its reply/forward state)."""
    proto = _proto(_first(e, "proto", "protocol"))
    kind = "SVC" if _first(e, "type") == "service" else str(_first(e, "direction", default="OUT")).upper()
    src = f"{_first(e, 'saddr', 'src')}:{_first(e, 'sport', default=0)}"
    dst = f"{_first(e, 'daddr', 'dst')}:{_first(e, 'dport', default=0)}"
    rest = []
    for k, v in e.items():
        if k in _CT_SHOWN or k == "direction":
            continue
        if isinstance(v, list):
            v = "[" + " ".join(map(str, v)) + "]"
        rest.append(f"{_CT_NAMES.get(k, k)}={v}")
    return " ".join([proto, kind, src, "->", dst, *rest])


@bpf.group("lb", help="The node's service (load-balancing) maps.")
def bpf_lb() -> None:
    pass


node_listing(bpf_lb, "/v1/bpf/lb", lb_rows)


@bpf.group("ct", help="The node's connection tracking table.")
def bpf_ct() -> None:
    pass


@bpf_ct.command("list")
@click.argument("table", type=click.Choice(["global"]), default="global")
@node_option
@output_option
@click.pass_context
def bpf_ct_list(ctx, table: str, node: str | None, output: str) -> None:
    spec = lab_spec(ctx)
    entries = agent_get(spec, node_name(spec, node), "/v1/bpf/ct")
    if output == "json":
        emit_json(entries)
        return
    for e in entries:
        click.echo(format_ct(e))

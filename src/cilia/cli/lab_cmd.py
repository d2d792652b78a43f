"""`cilia lab up|down|list|exec`."""
from __future__ import annotations

import os
import sys
import time

import click

from cilia import netns
from cilia.cli.context import CLIError, emit_json, lab_spec
from cilia.k8s.printers import render_columns


@click.group("lab", help="A multi-node cluster of network namespaces on this machine.")
def lab() -> None:
    pass


@lab.command("up")
@click.option("--name", default="cilia", show_default=True, help="Lab name (prefixes netns, pins, sockets).")
@click.option("--nodes", type=int, default=2, show_default=True)
@click.option("--routing", type=click.Choice(["tunnel", "native"]), default="tunnel", show_default=True)
@click.option("--store", type=click.Choice(["local", "etcd"]), default=None,
              help="Cluster store (default: etcd for several nodes, local SQLite for one).")
@click.option("--timeout", type=float, default=60.0, show_default=True)
def up(name: str, nodes: int, routing: str, store: str | None, timeout: float) -> None:
    from cilia.lab.lab import LabError, up as lab_up
    from cilia.lab.topology import TopologyError
    t0 = time.monotonic()
    try:
        spec = lab_up(name, nodes, routing, store, timeout,
                      progress=lambda m: click.echo(f"  ✓ {m}", err=True))
    except (LabError, TopologyError) as e:
        raise CLIError(str(e)) from None
    click.echo(f"✅ lab {spec.name} is up: {len(spec.nodes)} nodes, {routing} routing, "
               f"{spec.store} store ({time.monotonic() - t0:.1f}s)")
    if name != "cilia" or os.environ.get("CILIA_LAB"):
        click.echo(f"   use it with --lab {spec.name} or CILIA_LAB={spec.name}")


@lab.command("down")
@click.option("--name", default=None, help="Lab name (default: the only lab).")
def down(name: str | None) -> None:
    from cilia.lab import state
    from cilia.lab.lab import LabError, down as lab_down, resolve
    if name is None:
        try:
            name = resolve(None).name
        except LabError as e:
            raise CLIError(str(e)) from None
    elif state.load_spec(name) is None and not netns.list_names(f"{name}-"):
        raise CLIError(f"no lab named {name!r}")
    removed = lab_down(name)
    click.echo(f"lab {name} removed ({len(removed)} network namespaces)")


@lab.command("list")
@click.option("-o", "--output", type=click.Choice(["table", "json"]), default="table")
def list_(output: str) -> None:
    from cilia.lab import state
    labs = state.list_labs()
    if output == "json":
        emit_json([dict(s.to_json(), status=st) for s, st in labs])
        return
    if not labs:
        click.echo("No labs.", err=True)
        return
    rows = [["NAME", "STATUS", "NODES", "ROUTING", "STORE"]]
    rows += [[s.name, st, str(len(s.nodes)), s.routing, s.store] for s, st in labs]
    click.echo(render_columns(rows), nl=False)


@lab.command("exec", context_settings={"ignore_unknown_options": True})
@click.argument("target")
@click.argument("command", nargs=-1, required=True, type=click.UNPROCESSED)
@click.pass_context
def exec_(ctx: click.Context, target: str, command: tuple[str, ...]) -> None:
    """Run COMMAND in a node's netns (node1, node2, …), the world host's or the fabric's."""
    spec = lab_spec(ctx)
    names = {n.name: n.netns for n in spec.nodes}
    names.update(world=spec.world_netns, fabric=spec.fabric_netns)
    if target not in names:
        raise CLIError(f"no lab host {target!r} (hosts: {', '.join(names)})")
    command = tuple(command[1:]) if command and command[0] == "--" else tuple(command)
    if not command:
        raise CLIError("a command is required after --")
    argv = netns.nsenter_argv(names[target], list(command))
    sys.stdout.flush()
    os.execvp(argv[0], argv)


@lab.group("node", help="Add or remove lab nodes at run time.")
def node() -> None:
    pass


@node.command("add")
@click.pass_context
def node_add(ctx: click.Context) -> None:
    from cilia.lab.lab import LabError, node_add as add
    spec = lab_spec(ctx)
    try:
        n = add(spec.name)
    except LabError as e:
        raise CLIError(str(e)) from None
    click.echo(f"node {n.name} added ({n.ip}, pod CIDR {n.pod_cidr})")


@node.command("remove")
@click.argument("name")
@click.pass_context
def node_remove(ctx: click.Context, name: str) -> None:
    from cilia.lab.lab import LabError, node_remove as remove
    spec = lab_spec(ctx)
    if name not in [n.name for n in spec.nodes]:
        raise CLIError(f"no node {name!r} in lab {spec.name}")
    try:
        remove(spec.name, name)
    except LabError as e:
        raise CLIError(str(e)) from None
    click.echo(f"node {name} removed")


@lab.group("store", help="Stop and start the lab's etcd (to see how the cluster copes).")
def store() -> None:
    pass


@store.command("stop")
@click.pass_context
def store_stop(ctx: click.Context) -> None:
    from cilia.lab.lab import stop_etcd
    spec = lab_spec(ctx)
    if spec.store != "etcd":
        raise CLIError(f"lab {spec.name} uses the local store; only etcd can be stopped")
    if not stop_etcd(spec.name):
        raise CLIError("etcd is not running")
    click.echo("etcd stopped")


@store.command("start")
@click.pass_context
def store_start(ctx: click.Context) -> None:
    from cilia.lab import state
    from cilia.lab.lab import LabError, etcd_pid_file, start_etcd
    spec = lab_spec(ctx)
    if spec.store != "etcd":
        raise CLIError(f"lab {spec.name} uses the local store")
    if state.read_json(etcd_pid_file(spec.name), None):
        raise CLIError("etcd is already running")
    try:
        start_etcd(spec)
    except LabError as e:
        raise CLIError(str(e)) from None
    click.echo("etcd started")

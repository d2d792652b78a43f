"""What every CLI command needs: the lab it means, the store, a node's agent."""
from __future__ import annotations

import json
import os
import sys

import click

from cilia import paths
from cilia.api.client import AgentClient, AgentUnreachable, APIError


class CLIError(click.ClickException):
    """One line on stderr, exit code 1."""

    def show(self, file=None) -> None:
        msg = self.message if self.message.startswith("error") else f"error: {self.message}"
        click.echo(msg, err=True)


def lab_spec(ctx: click.Context):
    from cilia.install.spec import installed_spec
    from cilia.lab import state
    from cilia.lab.lab import LabError, resolve
    named = ctx.obj.get("lab") or os.environ.get("CILIA_LAB")
    # An installed host (cilia install) is the cluster meant when CILIA_STATE_DIR names it,
    # or when no lab runs; --lab / CILIA_LAB always mean a lab.
    if not named and (os.environ.get("CILIA_STATE_DIR") or not state.list_labs()):
        got = installed_spec()
        if got is not None:
            return got
    try:
        return resolve(ctx.obj.get("lab"))
    except LabError as e:
        raise CLIError(str(e)) from None


def cluster(ctx: click.Context):
    from cilia.cluster import Cluster
    from cilia.lab import state
    spec = lab_spec(ctx)
    return spec, Cluster(getattr(spec, "store_url", None) or state.store_url(spec.name))


def node_name(spec, node: str | None) -> str:
    if node is None:
        return spec.nodes[0].name
    if node not in [n.name for n in spec.nodes]:
        raise CLIError(f"--node {node}: no such node in lab {spec.name} "
                       f"(nodes: {', '.join(n.name for n in spec.nodes)})")
    return node


def agent(spec, node: str, timeout: float = 30.0) -> AgentClient:
    sock = spec.agent_socket(node) if hasattr(spec, "agent_socket") else None
    return AgentClient(sock or paths.agent_socket(spec.name, node), timeout=timeout)


def agent_get(spec, node: str, path: str):
    try:
        return agent(spec, node).get(path)
    except AgentUnreachable as e:
        raise CLIError(f"node {node}: {e}") from None
    except APIError as e:
        raise CLIError(f"node {node}: {e}") from None


def emit_json(data) -> None:
    json.dump(data, sys.stdout, indent=2, sort_keys=False)
    sys.stdout.write("\n")

"""`cilia hubble enable|disable|status`: the lab's Hubble Relay and web UI.

The relay runs in the root netns (agents are reached through their unix sockets, which
work from any namespace) and is recorded like the lab's other processes, by pid and kernel
start time in /run/cilia/<lab>/hubble-relay.json; `cilia lab down` stops it."""
from __future__ import annotations

import json
import os
import sys
import time
import urllib.error
import urllib.request

import click

from cilia import paths
from cilia.paths import relay_file
from cilia.cli.context import CLIError, emit_json, lab_spec
from cilia.lab import state
from cilia.procs import ProcRef, ref_of, spawn


def _record(lab: str) -> dict | None:
    return state.read_json(relay_file(lab), None)


def _running(lab: str) -> tuple[dict | None, bool]:
    rec = _record(lab)
    return rec, bool(rec and ProcRef.from_json(rec).alive())


def _get(port: int, path: str, timeout: float = 2.0):
    with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=timeout) as r:
        return json.load(r)


def _log_tail(path: str, n: int = 10) -> str:
    try:
        with open(path, errors="replace") as f:
            return "".join(f.readlines()[-n:])
    except FileNotFoundError:
        return "(no log)"


@click.group("hubble")
def hubble() -> None:
    """Hubble Relay (all nodes' flows merged) and its web UI."""


@hubble.command("enable")
@click.option("--ui", is_flag=True, help="Also serve the web UI")
@click.option("--port", type=click.IntRange(1, 65535), default=12000, show_default=True,
              help="TCP port on 127.0.0.1 for the relay API and UI")
@click.option("--timeout", type=float, default=15.0, show_default=True)
@click.pass_context
def enable(ctx: click.Context, ui: bool, port: int, timeout: float) -> None:
    """Start the relay for the lab (and the UI with --ui)."""
    spec = lab_spec(ctx)
    if hasattr(spec, "agent_socket"):
        raise CLIError("cilia hubble enable runs a relay for a lab; on an installed host use "
                       "cilia observe (one node) instead")
    rec, alive = _running(spec.name)
    if alive:
        if rec.get("port") == port and rec.get("ui") == ui:
            click.echo(f"Hubble relay already running for lab {spec.name} on "
                       f"http://127.0.0.1:{port}/")
            return
        raise CLIError(f"Hubble relay already running for lab {spec.name} on port "
                       f"{rec.get('port')} (ui={rec.get('ui')}); cilia hubble disable first")
    log_path = os.path.join(paths.cluster_dir(spec.name), "hubble-relay.log")
    argv = [sys.executable, "-m", "cilia.hubble.relay", "--lab", spec.name,
            "--port", str(port)] + (["--ui"] if ui else [])
    p = spawn(argv, log_path)
    ref = ref_of(p)
    state.write_json(relay_file(spec.name), {**ref.to_json(), "port": port, "ui": ui})
    deadline = time.monotonic() + timeout
    while True:
        try:
            _get(port, "/api/status", 1.0)
            break
        except (OSError, urllib.error.URLError, ValueError):
            pass
        if p.poll() is not None or time.monotonic() > deadline:
            ref.stop(2.0)
            os.unlink(relay_file(spec.name))
            raise CLIError(f"Hubble relay did not start on 127.0.0.1:{port}; "
                           f"{log_path}:\n{_log_tail(log_path)}")
        time.sleep(0.1)
    what = "relay and UI" if ui else "relay"
    click.echo(f"Hubble {what} enabled for lab {spec.name}: http://127.0.0.1:{port}/")


@hubble.command("disable")
@click.pass_context
def disable(ctx: click.Context) -> None:
    """Stop the lab's relay and UI."""
    spec = lab_spec(ctx)
    rec = _record(spec.name)
    if not rec:
        click.echo(f"Hubble is not enabled for lab {spec.name}")
        return
    ProcRef.from_json(rec).stop(3.0)
    os.unlink(relay_file(spec.name))
    click.echo(f"Hubble disabled for lab {spec.name}")


@hubble.command("status")
@click.option("-o", "--output", type=click.Choice(["text", "json"]), default="text")
@click.pass_context
def status(ctx: click.Context, output: str) -> None:
    """Is the relay running, which nodes does it reach, how many flows does it hold."""
    spec = lab_spec(ctx)
    rec, alive = _running(spec.name)
    out: dict = {"lab": spec.name, "enabled": bool(rec), "running": alive}
    if rec:
        out.update(port=rec.get("port"), ui=rec.get("ui"),
                   url=f"http://127.0.0.1:{rec.get('port')}/")
    if alive:
        try:
            out["relay"] = _get(rec["port"], "/api/status")
        except (OSError, urllib.error.URLError, ValueError) as e:
            out["error"] = f"relay not answering: {e}"
    if output == "json":
        emit_json(out)
    else:
        if not rec:
            click.echo(f"Hubble:   disabled (cilia hubble enable --ui)")
        elif not alive:
            click.echo(f"Hubble:   enabled but the relay is not running (cilia hubble disable; cilia hubble enable)")
        else:
            r = out.get("relay") or {}
            click.echo(f"Hubble:   Ok   relay on {out['url']}" + ("  (UI)" if rec.get("ui") else ""))
            click.echo(f"Flows:    {r.get('num_flows', '?')}/{r.get('max_flows', '?')}")
            nodes = r.get("nodes") or {}
            ok = sum(1 for s in nodes.values() if s.get("state") == "connected")
            click.echo(f"Nodes:    {ok}/{len(nodes)} connected")
            for name, s in sorted(nodes.items()):
                line = f"  {name}: {s.get('state')}, {s.get('flows', 0)} flows"
                click.echo(line + (f" ({s['error']})" if s.get("error") else ""))
            if out.get("error"):
                click.echo(f"error: {out['error']}")
    if rec and not alive:
        ctx.exit(1)

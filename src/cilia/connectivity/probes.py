"""Real probes from a network namespace: curl for TCP, ping for ICMP (as cilium-cli does).

Each probe is `nsenter --net=<netns> curl …`, the same path `cilia exec` uses. Every child
runs in its own session so a terminal Ctrl-C reaches only `cilia`, which then stops its
children itself (by pid) before cleaning up.
"""
from __future__ import annotations

import asyncio
import json
import os
import signal
from dataclasses import dataclass

from cilia import netns

# curl's -w: status, the local port actually used (flows are matched on it), remote address.
_WRITE_OUT = "\n%{http_code} %{local_port} %{remote_ip}:%{remote_port}"


@dataclass
class ProbeResult:
    exit_code: int
    stdout: str
    stderr: str
    command: str
    http_code: int = 0
    local_port: int = 0
    body: dict | None = None

    @property
    def answered_by(self) -> str | None:
        return (self.body or {}).get("pod")


class ProcessTracker:
    """The children this run started, so an interrupt can stop exactly those."""

    def __init__(self) -> None:
        self.procs: set[asyncio.subprocess.Process] = set()

    def kill_all(self) -> None:
        for p in list(self.procs):
            if p.returncode is None:
                try:
                    os.kill(p.pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass


def curl_argv(url: str, local_ports: tuple[int, int] | None, connect_timeout: float,
              max_time: float) -> list[str]:
    argv = ["curl", "-sS", "--fail", "--show-error", "-w", _WRITE_OUT,
            "--connect-timeout", f"{connect_timeout:g}", "--max-time", f"{max_time:g}"]
    if local_ports and local_ports[0]:
        argv += ["--local-port", f"{local_ports[0]}-{local_ports[1]}"]
    return argv + [url]


def ping_argv(address: str, timeout: float) -> list[str]:
    return ["ping", "-c", "1", "-W", f"{max(1, round(timeout))}", "-n", "-q", address]


async def run_in_netns(tracker: ProcessTracker, ns: str, argv: list[str],
                       timeout: float) -> ProbeResult:
    full = netns.nsenter_argv(ns, argv)
    cmd = " ".join(a for i, a in enumerate(argv)
                   if a != "-w" and (i == 0 or argv[i - 1] != "-w"))
    proc = await asyncio.create_subprocess_exec(
        *full, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
        stdin=asyncio.subprocess.DEVNULL, start_new_session=True)
    tracker.procs.add(proc)
    try:
        try:
            out, err = await asyncio.wait_for(proc.communicate(), timeout)
        except asyncio.TimeoutError:
            proc.kill()
            out, err = await proc.communicate()
            return ProbeResult(124, out.decode(errors="replace"),
                               f"killed after {timeout:g}s", cmd)
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
        tracker.procs.discard(proc)
    return ProbeResult(proc.returncode or 0, out.decode(errors="replace"),
                       err.decode(errors="replace").strip(), cmd)


def parse_curl(r: ProbeResult) -> ProbeResult:
    body, _, tail = r.stdout.rpartition("\n")
    fields = tail.split()
    if len(fields) >= 2:
        try:
            r.http_code = int(fields[0])
            r.local_port = int(fields[1])
        except ValueError:
            pass
    r.stdout = body
    try:
        parsed = json.loads(body) if body.strip().startswith("{") else None
        r.body = parsed if isinstance(parsed, dict) else None
    except ValueError:
        r.body = None
    return r


async def curl(tracker: ProcessTracker, ns: str, address: str, port: int,
               local_ports: tuple[int, int] | None, connect_timeout: float,
               request_timeout: float) -> ProbeResult:
    url = f"http://{address}:{port}/"
    r = await run_in_netns(tracker, ns, curl_argv(url, local_ports, connect_timeout, request_timeout),
                           request_timeout + 5)
    return parse_curl(r)


async def ping(tracker: ProcessTracker, ns: str, address: str, timeout: float) -> ProbeResult:
    return await run_in_netns(tracker, ns, ping_argv(address, timeout), timeout + 5)

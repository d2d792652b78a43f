"""Oracles for netns tests: iproute2, bpftool and ping, never the code under test."""
from __future__ import annotations

import json
import subprocess


def sh(*argv: str, netns: str | None = None, check: bool = True, timeout: float = 30) -> str:
    cmd = list(argv)
    if netns:
        cmd = ["nsenter", f"--net=/run/netns/{netns}", "--", *cmd]
    p = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    if check and p.returncode != 0:
        raise AssertionError(f"{' '.join(cmd)} -> {p.returncode}: {p.stderr.strip()}")
    return p.stdout


def ip_json(netns: str, *args: str):
    return json.loads(sh("ip", "-j", *args, netns=netns) or "[]")


def links(netns: str) -> dict[str, dict]:
    return {l["ifname"]: l for l in ip_json(netns, "link", "show")}


def bpftool_json(*args: str, netns: str | None = None):
    return json.loads(sh("bpftool", "-j", *args, netns=netns) or "null")


def tc_programs(netns: str, dev: str) -> dict[str, list[str]]:
    """Program names attached via tc to dev, per direction, as bpftool reports them
    (the kernel keeps 15 characters of a name; compare with prog_name())."""
    data = bpftool_json("net", "show", "dev", dev, netns=netns)
    out = {"ingress": [], "egress": []}
    for block in data or []:
        for entry in block.get("tc", []):
            name = entry.get("name", "").split(":")[0]
            out[entry.get("kind", "").replace("clsact/", "")].append(name)
    return out


def prog_name(name: str) -> str:
    return name[:15]


def map_dump(pin: str) -> list[dict]:
    """Entries as bpftool decodes them with the map's BTF ("formatted" key/value(s))."""
    return [e.get("formatted", e) for e in bpftool_json("map", "dump", "pinned", pin) or []]


def percpu_sum(entry: dict, field: str) -> int:
    """bpftool prints per-CPU values as a list of {cpu, value} with BTF-formatted structs."""
    total = 0
    for v in entry.get("values", []):
        val = v.get("value")
        if isinstance(val, dict):
            total += int(val.get(field, 0))
    return total


def ping(netns: str, dst: str, count: int = 2) -> bool:
    p = subprocess.run(["nsenter", f"--net=/run/netns/{netns}", "--", "ping", "-c", str(count),
                        "-i", "0.2", "-W", "2", dst], capture_output=True, timeout=30)
    return p.returncode == 0

"""`cilia install` / `cilia uninstall` on a host (no lab): the agent and operator under
cilia's supervisor, the CNI plugin and its conflist, and a record of everything made so that
uninstall puts the host back as it was."""
from __future__ import annotations

import contextlib
import json
import os
import shutil
import socket
import subprocess
import sys
import time

from cilia import netns, paths
from cilia.install import host
from cilia.install.config import (NETWORK_NAME, InstallConfig, InstallError, InstallRecord)
from cilia.procs import ProcRef, ref_of, spawn

READY_TIMEOUT = 60.0


# --- files --------------------------------------------------------------------------------------

def plugin_wrapper(python: str = sys.executable) -> str:
    """The CNI binary is a two-line exec of the venv's plugin: runtimes exec it by name from
    the CNI bin dir, and the venv stays the one place cilia's code lives."""
    return f"#!/bin/sh\n# cilia-cni, installed by cilia install\nexec {python} -m cilia.cni.plugin \"$@\"\n"


def conflist(cfg: InstallConfig) -> dict:
    return {"cniVersion": "1.0.0", "name": NETWORK_NAME,
            "plugins": [{"type": "cilia-cni", "agent-socket": cfg.socket}]}


def _mkdirs(path: str, created: list[str]) -> None:
    """mkdir -p, remembering every directory we made (uninstall removes exactly those)."""
    missing = []
    d = os.path.abspath(path)
    while not os.path.isdir(d):
        missing.append(d)
        d = os.path.dirname(d)
    for d in reversed(missing):
        os.mkdir(d, 0o755)
        created.append(d)


# --- install ------------------------------------------------------------------------------------

def _discover(cfg: InstallConfig) -> None:
    """Fill the blanks (uplink, node IP, MTU, node name) from the host's netns."""
    if cfg.netns and not netns.exists(cfg.netns):
        raise InstallError(f"--netns {cfg.netns!r}: no such network namespace")
    if not cfg.uplink:
        cfg.uplink = host.in_netns(cfg.netns, host.default_uplink) or ""
        if not cfg.uplink:
            raise InstallError("no default route to take the uplink from; pass --uplink DEV")
    try:
        _, addr, mtu = host.in_netns(cfg.netns, lambda: host.uplink_facts(cfg.uplink))
    except LookupError:
        raise InstallError(f"--uplink {cfg.uplink!r}: no such device") from None
    if not cfg.node_ip:
        if not addr:
            raise InstallError(f"--uplink {cfg.uplink}: has no IPv4 address; pass --node-ip")
        cfg.node_ip = addr
    if not cfg.mtu:
        # design.md §8: the VXLAN outer packet must fit the uplink or it fragments.
        cfg.mtu = mtu - 50 if cfg.routing == "tunnel" else mtu
    if not cfg.node:
        cfg.node = socket.gethostname().split(".")[0].lower() or "node"
    cfg.validate()


def _preflight(cfg: InstallConfig) -> None:
    if InstallRecord.load(cfg.state_dir) is not None:
        raise InstallError(f"already installed ({cfg.record_path}); run cilia uninstall first")
    for p in (cfg.plugin_path, cfg.conflist_path):
        if os.path.exists(p):
            raise InstallError(f"{p}: exists and is not ours; remove it or pick another directory")
    if os.path.exists(cfg.socket):
        raise InstallError(f"{cfg.socket}: an agent socket already exists there")
    if os.path.exists(cfg.pin_dir):
        raise InstallError(f"{cfg.pin_dir}: BPF pins of cluster {cfg.cluster} node {cfg.node} "
                           "already exist")
    from cilia.datapath.node import find_object
    try:
        find_object("bpf_lxc.o")
    except Exception as e:
        raise InstallError(f"BPF objects not built ({e}); run make bpf") from None


def _store_op(cfg: InstallConfig, op: str, timeout: float = 30.0) -> None:
    """Store work runs where the agent runs (--netns): that is where the store is reachable."""
    argv = [sys.executable, "-m", "cilia.install.storeops", op, "--state-dir", cfg.state_dir]
    if cfg.netns:
        argv = netns.nsenter_argv(cfg.netns, argv)
    try:
        p = subprocess.run(argv, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        raise InstallError(f"store {cfg.store_url()}: no answer in {timeout:g}s") from None
    if p.returncode != 0:
        lines = p.stderr.strip().splitlines() or ["failed"]
        raise InstallError(f"store {cfg.store_url()}: {lines[-1]}")


def agent_healthy(cfg: InstallConfig) -> bool:
    from cilia.api.client import AgentClient
    try:
        return AgentClient(cfg.socket, timeout=2).get("/v1/healthz").get("status") == "ok"
    except Exception:
        return False


def _log_tail(path: str, lines: int = 12) -> str:
    try:
        with open(path, errors="replace") as f:
            return "".join(f.readlines()[-lines:])
    except FileNotFoundError:
        return "(no log)\n"


def install(cfg: InstallConfig, progress=None, timeout: float = READY_TIMEOUT) -> InstallRecord:
    say = progress or (lambda msg: None)
    cfg.validate()
    _discover(cfg)
    _preflight(cfg)
    rec = InstallRecord(config=cfg)
    rec.sysctls = host.in_netns(cfg.netns, host.read_sysctls)
    rec.links_before = host.in_netns(cfg.netns, host.link_names)
    rec.uplink_had_clsact = host.in_netns(cfg.netns, lambda: host.has_clsact(cfg.uplink))
    _mkdirs(cfg.state_dir, rec.created_dirs)
    if cfg.state_dir in rec.created_dirs:
        os.chmod(cfg.state_dir, 0o700)  # the store and endpoint state are root's business
    # The record goes down before anything else is made: a failed install is undone from it.
    rec.save()
    try:
        for d in (cfg.run_dir, cfg.log_dir, cfg.agent_state_dir, cfg.cni_bin_dir, cfg.cni_conf_dir):
            _mkdirs(d, rec.created_dirs)
        if cfg.run_dir in rec.created_dirs:
            os.chmod(cfg.run_dir, 0o700)
        if not os.path.ismount("/sys/fs/bpf"):
            raise InstallError("/sys/fs/bpf is not mounted (mount -t bpf bpf /sys/fs/bpf)")
        rec.files = [cfg.plugin_path, cfg.conflist_path]
        rec.save()
        paths.write_atomic(cfg.plugin_path, plugin_wrapper())
        os.chmod(cfg.plugin_path, 0o755)
        paths.write_atomic(cfg.conflist_path, json.dumps(conflist(cfg), indent=2) + "\n")
        say(f"CNI: {cfg.plugin_path}, {cfg.conflist_path}")
        _store_op(cfg, "seed")
        argv = [sys.executable, "-m", "cilia.install.supervisor", "--state-dir", cfg.state_dir]
        if cfg.netns:
            argv = netns.nsenter_argv(cfg.netns, argv)
        # cwd /: the daemons must not hold the caller's directory busy.
        p = spawn(argv, os.path.join(cfg.log_dir, "supervisor.log"), cwd="/")
        from cilia.lab import state as jsonfile
        jsonfile.write_json(cfg.pid_file("supervisor"), ref_of(p).to_json())
        deadline = time.monotonic() + timeout
        while not agent_healthy(cfg):
            if p.poll() is not None or time.monotonic() > deadline:
                raise InstallError("cilia-agent did not become healthy; agent.log:\n"
                                   + _log_tail(os.path.join(cfg.log_dir, "agent.log")).rstrip())
            time.sleep(0.1)
        say(f"agent healthy on {cfg.socket} (node {cfg.node}, {cfg.node_ip}, {cfg.routing})")
        rec.status = "installed"
        rec.save()
        return rec
    except BaseException:
        uninstall(cfg.state_dir)
        raise


# --- uninstall ----------------------------------------------------------------------------------

def _stop_pid_file(path: str, grace: float) -> bool:
    try:
        with open(path) as f:
            ref = ProcRef.from_json(json.load(f))
    except (FileNotFoundError, ValueError, KeyError):
        return False
    was = ref.alive()
    ref.stop(grace)
    with contextlib.suppress(FileNotFoundError):
        os.unlink(path)
    return was


def uninstall(state_dir: str, progress=None) -> list[str]:
    """Remove every trace of the install recorded in state_dir; works from the record alone,
    also after a half-done install or with the daemons dead."""
    say = progress or (lambda msg: None)
    rec = InstallRecord.load(state_dir)
    if rec is None:
        raise InstallError(f"nothing installed: no {os.path.join(state_dir, 'install.json')}")
    cfg = rec.config
    removed: list[str] = []
    # Supervisor first so nothing restarts what we stop next.
    for what in ("supervisor", "operator", "agent"):
        if _stop_pid_file(cfg.pid_file(what), 6.0):
            removed.append(f"process cilia-{what}")
    say("processes stopped")
    if not cfg.netns or netns.exists(cfg.netns):
        if cfg.uplink:
            removed += host.in_netns(cfg.netns, lambda: host.remove_datapath(
                cfg.uplink, rec.uplink_had_clsact, rec.links_before))
        if rec.sysctls:
            host.in_netns(cfg.netns, lambda: host.write_sysctls(rec.sysctls))
    if cfg.node and os.path.exists(cfg.pin_dir):
        from cilia.datapath.node import NodeDatapath
        NodeDatapath.remove_pins(cfg.pin_dir)
        removed.append(f"pins {cfg.pin_dir}")
    if cfg.store == "etcd" and rec.status == "installed":
        try:
            _store_op(cfg, "forget")
            removed.append(f"node {cfg.node} in the store")
        except InstallError as e:  # an unreachable etcd must not keep the host dirty
            say(f"warning: could not remove node {cfg.node} from the store: {e}")
    for f in rec.files:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(f)
            removed.append(f"file {f}")
    # Our directories go whole; in directories that were there before, only our files.
    db = cfg.store_url().removeprefix("sqlite://") if cfg.store == "local" else None
    for f in [cfg.record_path, cfg.socket] + ([db, db + "-wal", db + "-shm"] if db else []):
        with contextlib.suppress(FileNotFoundError):
            os.unlink(f)
    for d in (cfg.run_dir, cfg.log_dir, cfg.agent_state_dir, cfg.state_dir):
        if d in rec.created_dirs and os.path.isdir(d):
            shutil.rmtree(d)
            removed.append(f"dir {d}")
    # Directories we created, deepest first, and only when nothing else lives in them.
    for d in sorted(rec.created_dirs, key=len, reverse=True):
        with contextlib.suppress(OSError):
            os.rmdir(d)
            removed.append(f"dir {d}")
    say("host cleaned")
    return removed

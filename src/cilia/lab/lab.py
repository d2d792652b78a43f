"""`cilia lab up|down|list`: a multi-node cluster made of network namespaces on one machine.

fabric netns: bridge br0 (172.29.0.1/16) joining the nodes, router to the world netns.
node netns:   eth0 172.29.0.(10+i)/16, its agent and node runtime, pods' host-side veths.
world netns:  eth0 198.51.100.100/24, an outside host for egress and NodePort tests.
"""
from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import shutil
import sys
import time
import uuid

from pyroute2 import IPRoute

from cilia import netns, paths
from cilia.api.client import AgentClient
from cilia.lab import state
from cilia.lab.topology import (FABRIC_ROUTER, NODE_NET, WORLD_GATEWAY, WORLD_HOST, WORLD_NET,
                                LabSpec, NodeSpec, plan)
from cilia.procs import ProcRef, ref_of, spawn

log = logging.getLogger("cilia.lab")


class LabError(Exception):
    pass


def _sysctl(path: str, value: str) -> None:
    with open(f"/proc/sys/{path}", "w") as f:
        f.write(value)


def _lo_up(ip: IPRoute) -> None:
    ip.link("set", index=ip.link_lookup(ifname="lo")[0], state="up")


def _setup_fabric(spec: LabSpec) -> None:
    def fabric() -> None:
        _sysctl("net/ipv4/ip_forward", "1")
        with IPRoute() as ip:
            _lo_up(ip)
            ip.link("add", ifname="br0", kind="bridge")
            br = ip.link_lookup(ifname="br0")[0]
            ip.addr("add", index=br, address=FABRIC_ROUTER, prefixlen=NODE_NET.prefixlen)
            ip.link("set", index=br, state="up")
            ip.link("add", ifname="world0", kind="veth",
                    peer={"ifname": "eth0", "net_ns_fd": netns.path_of(spec.world_netns)})
            w = ip.link_lookup(ifname="world0")[0]
            ip.addr("add", index=w, address=WORLD_GATEWAY, prefixlen=WORLD_NET.prefixlen)
            ip.link("set", index=w, state="up")

    def world() -> None:
        with IPRoute() as ip:
            _lo_up(ip)
            e = ip.link_lookup(ifname="eth0")[0]
            ip.addr("add", index=e, address=WORLD_HOST, prefixlen=WORLD_NET.prefixlen)
            ip.link("set", index=e, state="up")
            ip.route("add", dst="0.0.0.0/0", gateway=WORLD_GATEWAY)

    netns.run_in(spec.fabric_netns, fabric)
    netns.run_in(spec.world_netns, world)


def _setup_node(spec: LabSpec, node: NodeSpec) -> None:
    def fabric_side() -> None:
        with IPRoute() as ip:
            ip.link("add", ifname=node.fabric_ifname, kind="veth",
                    peer={"ifname": "eth0", "net_ns_fd": netns.path_of(node.netns)})
            idx = ip.link_lookup(ifname=node.fabric_ifname)[0]
            ip.link("set", index=idx, master=ip.link_lookup(ifname="br0")[0], state="up")

    def node_side() -> None:
        _sysctl("net/ipv4/ip_forward", "1")
        with IPRoute() as ip:
            _lo_up(ip)
            e = ip.link_lookup(ifname="eth0")[0]
            ip.addr("add", index=e, address=node.ip, prefixlen=NODE_NET.prefixlen)
            ip.link("set", index=e, state="up")
            ip.route("add", dst="0.0.0.0/0", gateway=FABRIC_ROUTER)

    netns.run_in(spec.fabric_netns, fabric_side)
    netns.run_in(node.netns, node_side)


def _seed_store(spec: LabSpec) -> None:
    from cilia.kvstore import SyncStore
    from cilia.objects import encode, key
    store = SyncStore(state.store_url(spec.name))
    try:
        ts = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
        items = []
        for ns in ("default", "kube-system"):
            items.append((key("namespaces", None, ns), encode({
                "apiVersion": "v1", "kind": "Namespace",
                "metadata": {"name": ns, "uid": str(uuid.uuid4()), "creationTimestamp": ts,
                             "labels": {"kubernetes.io/metadata.name": ns}},
                "spec": {"finalizers": ["kubernetes"]}, "status": {"phase": "Active"}})))
        store.txn_put_many(items)
    finally:
        store.close()


def _runtime_argv(spec: LabSpec, node: NodeSpec) -> list[str]:
    return netns.nsenter_argv(node.netns, [sys.executable, "-m", "cilia.lab.node_runtime",
                                           "--lab", spec.name, "--node", node.name])


def _agent_ok(spec: LabSpec, node: NodeSpec) -> bool:
    try:
        c = AgentClient(paths.agent_socket(spec.name, node.name), timeout=2)
        return c.get("/v1/healthz").get("status") == "ok"
    except Exception:
        return False


def _wait_nodes_registered(spec: LabSpec, deadline: float) -> None:
    """Node objects Ready in the store: only then can `apply` schedule onto them."""
    from cilia.cluster import Cluster
    cl = Cluster(state.store_url(spec.name))
    try:
        want = {n.name for n in spec.nodes}
        while not want <= set(cl.ready_nodes()):
            if time.monotonic() > deadline:
                raise LabError(f"nodes not registered Ready: {sorted(want - set(cl.ready_nodes()))}")
            time.sleep(0.05)
    finally:
        cl.close()


def _log_tail(path: str, lines: int = 15) -> str:
    try:
        with open(path, errors="replace") as f:
            return "".join(f.readlines()[-lines:])
    except FileNotFoundError:
        return "(no log)"


def up(name: str, nodes: int = 2, routing: str = "tunnel", store: str = "local",
       timeout: float = 60.0, progress=None) -> LabSpec:
    spec = plan(name, nodes, routing, store)
    if store == "etcd":
        raise LabError("--store etcd is not available yet in the lab; use --store local")
    if state.load_spec(name) is not None:
        raise LabError(f"lab {name!r} already exists (cilia lab down --name {name})")
    clash = [n for n in netns.list_names(f"{name}-")]
    if clash:
        raise LabError(f"network namespaces of a lab named {name!r} already exist: "
                       f"{', '.join(clash[:5])}; run cilia lab down --name {name}")
    say = progress or (lambda msg: None)
    state.save_spec(spec, "creating")
    try:
        for ns in (spec.fabric_netns, spec.world_netns, *[n.netns for n in spec.nodes]):
            netns.create(ns)
        _setup_fabric(spec)
        for n in spec.nodes:
            _setup_node(spec, n)
        say(f"network: fabric, world and {len(spec.nodes)} node namespaces")
        _seed_store(spec)
        for n in spec.nodes:
            d = paths.node_dir(spec.name, n.name)
            os.makedirs(d, exist_ok=True)
            p = spawn(_runtime_argv(spec, n), os.path.join(d, "runtime.log"))
            state.write_json(state.runtime_pid_file(spec.name, n.name), ref_of(p).to_json())
        deadline = time.monotonic() + timeout
        pending = list(spec.nodes)
        while pending:
            pending = [n for n in pending if not _agent_ok(spec, n)]
            if not pending:
                break
            if time.monotonic() > deadline:
                n = pending[0]
                tail = _log_tail(os.path.join(paths.node_dir(spec.name, n.name), "agent.log"))
                raise LabError(f"agent on {n.name} not ready after {timeout:.0f}s; "
                               f"agent.log:\n{tail}")
            time.sleep(0.1)
        _wait_nodes_registered(spec, deadline)
        say(f"agents ready on {', '.join(n.name for n in spec.nodes)}")
        state.save_spec(spec, "running")
    except BaseException:
        down(name)
        raise
    return spec


def _stop_pidfile(path: str, grace: float) -> None:
    d = state.read_json(path, None)
    if d:
        ProcRef.from_json(d).stop(grace)


def _remove_pins(root: str) -> None:
    if not os.path.isdir(root):
        return
    for dirpath, dirnames, filenames in os.walk(root, topdown=False):
        for f in filenames:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(os.path.join(dirpath, f))
        with contextlib.suppress(OSError):
            os.rmdir(dirpath)


def down(name: str) -> list[str]:
    """Remove everything the lab made; works from the on-disk records alone."""
    got = state.load_spec(name)
    removed: list[str] = []
    node_names: list[str] = []
    if got is not None:
        node_names = [n.name for n in got[0].nodes]
    d = paths.cluster_dir(name)
    if os.path.isdir(d):
        node_names += [n for n in os.listdir(d) if os.path.isdir(os.path.join(d, n))
                       and n not in node_names]
    # Runtimes first so nothing restarts what we stop next.
    for n in node_names:
        _stop_pidfile(state.runtime_pid_file(name, n), 3.0)
    for n in node_names:
        _stop_pidfile(state.agent_pid_file(name, n), 3.0)
        pods = state.read_json(state.pods_file(name, n), {})
        for run in pods.values():
            for c in run.get("containers", []):
                if c.get("proc"):
                    ProcRef.from_json(c["proc"]).stop(1.0)
            if netns.delete(run["netns"]):
                removed.append(run["netns"])
    # Every netns named after the lab is ours: lab names are unique prefixes.
    for ns in netns.list_names(f"{name}-"):
        netns.delete(ns)
        removed.append(ns)
    _remove_pins(os.path.join(paths.BPF_ROOT, name))
    with contextlib.suppress(OSError):
        os.rmdir(paths.BPF_ROOT)
    shutil.rmtree(d, ignore_errors=True)
    with contextlib.suppress(OSError):
        os.rmdir(paths.RUN_ROOT)
    return removed


def resolve(name: str | None) -> LabSpec:
    """The lab a command means: --lab / CILIA_LAB, else the only one running."""
    name = name or os.environ.get("CILIA_LAB")
    if name:
        got = state.load_spec(name)
        if got is None:
            raise LabError(f"no lab named {name!r} (cilia lab list)")
        return got[0]
    labs = state.list_labs()
    if not labs:
        raise LabError("no lab is running; start one with: cilia lab up")
    if len(labs) > 1:
        raise LabError("several labs are running (" + ", ".join(s.name for s, _ in labs) +
                       "); pick one with --lab NAME or CILIA_LAB")
    return labs[0][0]

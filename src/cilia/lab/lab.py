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
from cilia.lab.topology import (FABRIC_ROUTER, NODE_NET, POD_POOL, SERVICE_EXTERNAL_NET,
                                WORLD_GATEWAY, WORLD_HOST, WORLD_NET, LabSpec, NodeSpec,
                                node_spec, plan)
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


def route_service_ips(spec: LabSpec) -> None:
    """The fabric routes LoadBalancer and external IPs to every node (ECMP), as a BGP or
    L2-announcing LB would; the node's BPF picks them up on eth0."""
    def fabric() -> None:
        with IPRoute() as ip:
            hops = [{"gateway": n.ip} for n in spec.nodes]
            if len(hops) == 1:
                ip.route("replace", dst=SERVICE_EXTERNAL_NET, gateway=hops[0]["gateway"])
            else:
                ip.route("replace", dst=SERVICE_EXTERNAL_NET, multipath=hops)

    netns.run_in(spec.fabric_netns, fabric)


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


def etcd_pid_file(lab: str) -> str:
    return os.path.join(paths.cluster_dir(lab), "etcd.pid")


def operator_pid_file(lab: str) -> str:
    return os.path.join(paths.cluster_dir(lab), "operator.pid")


def start_etcd(spec: LabSpec, timeout: float = 30.0) -> None:
    """etcd in the fabric netns: TCP on the underlay for the nodes, a unix listener for
    clients in other namespaces. Its data survives a stop/start (same data dir)."""
    d = state.etcd_dir(spec.name)
    os.makedirs(d, exist_ok=True)
    port = state.ETCD_CLIENT_PORT
    argv = netns.nsenter_argv(spec.fabric_netns, [
        "etcd", "--name", "etcd", "--data-dir", os.path.join(d, "data"),
        "--listen-client-urls", f"unix://etcd:{port},http://{FABRIC_ROUTER}:{port}",
        "--advertise-client-urls", f"http://{FABRIC_ROUTER}:{port}",
        "--listen-peer-urls", "http://127.0.0.1:2380",
        "--initial-advertise-peer-urls", "http://127.0.0.1:2380",
        "--initial-cluster", "etcd=http://127.0.0.1:2380",
        "--log-level", "warn", "--logger", "zap"])
    p = spawn(argv, os.path.join(d, "etcd.log"), cwd=d)
    state.write_json(etcd_pid_file(spec.name), ref_of(p).to_json())
    from cilia.kvstore import SyncStore
    deadline = time.monotonic() + timeout
    while True:
        s = SyncStore(state.store_url(spec.name, "etcd") + "?timeout=1")
        try:
            if s.status().get("ok"):
                return
        except Exception:
            pass
        finally:
            s.close()
        if p.poll() is not None or time.monotonic() > deadline:
            raise LabError("etcd did not start; etcd.log:\n" + _log_tail(os.path.join(d, "etcd.log")))
        time.sleep(0.1)


def stop_etcd(lab: str) -> bool:
    d = state.read_json(etcd_pid_file(lab), None)
    if not d:
        return False
    ProcRef.from_json(d).stop(5.0)
    os.unlink(etcd_pid_file(lab))
    return True


def start_operator(spec: LabSpec) -> None:
    argv = netns.nsenter_argv(spec.fabric_netns, [
        sys.executable, "-m", "cilia.operator.main", "--store", state.store_url(spec.name),
        "--cluster-cidr", str(POD_POOL)])
    p = spawn(argv, os.path.join(paths.cluster_dir(spec.name), "operator.log"))
    state.write_json(operator_pid_file(spec.name), ref_of(p).to_json())


def _start_node(spec: LabSpec, n: NodeSpec) -> None:
    d = paths.node_dir(spec.name, n.name)
    os.makedirs(d, exist_ok=True)
    p = spawn(_runtime_argv(spec, n), os.path.join(d, "runtime.log"))
    state.write_json(state.runtime_pid_file(spec.name, n.name), ref_of(p).to_json())


def _wait_agents(spec: LabSpec, nodes: list[NodeSpec], deadline: float) -> None:
    pending = list(nodes)
    while pending:
        pending = [n for n in pending if not _agent_ok(spec, n)]
        if not pending:
            break
        if time.monotonic() > deadline:
            n = pending[0]
            tail = _log_tail(os.path.join(paths.node_dir(spec.name, n.name), "agent.log"))
            raise LabError(f"agent on {n.name} not ready; agent.log:\n{tail}")
        time.sleep(0.1)


def up(name: str, nodes: int = 2, routing: str = "tunnel", store: str | None = None,
       timeout: float = 60.0, progress=None) -> LabSpec:
    # A multi-node lab gets etcd, like a real cluster; one node is happy with SQLite.
    store = store or ("etcd" if nodes > 1 else "local")
    spec = plan(name, nodes, routing, store)
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
        route_service_ips(spec)
        say(f"network: fabric, world and {len(spec.nodes)} node namespaces")
        if store == "etcd":
            start_etcd(spec)
            say("store: etcd in the fabric netns")
        _seed_store(spec)
        start_operator(spec)
        for n in spec.nodes:
            _start_node(spec, n)
        deadline = time.monotonic() + timeout
        _wait_agents(spec, spec.nodes, deadline)
        _wait_nodes_registered(spec, deadline)
        say(f"agents ready on {', '.join(n.name for n in spec.nodes)}")
        state.save_spec(spec, "running")
    except BaseException:
        down(name)
        raise
    return spec


def node_add(lab: str, timeout: float = 60.0) -> NodeSpec:
    spec = resolve(lab)
    index = max((n.index for n in spec.nodes), default=0) + 1
    node = node_spec(spec.name, index)
    netns.create(node.netns)
    spec.nodes.append(node)
    state.save_spec(spec, "running")
    try:
        _setup_node(spec, node)
        route_service_ips(spec)
        _start_node(spec, node)
        deadline = time.monotonic() + timeout
        _wait_agents(spec, [node], deadline)
        _wait_nodes_registered(spec, deadline)
    except BaseException:
        node_remove(spec.name, node.name)
        raise
    return node


def node_remove(lab: str, node_name: str) -> None:
    """Take a node out: its processes, pods, netns and pins go; the cluster forgets it."""
    spec = resolve(lab)
    node = spec.node(node_name)
    if len(spec.nodes) == 1:
        raise LabError("cannot remove the last node; use cilia lab down")
    _stop_node_processes(spec.name, node.name)
    from cilia.kvstore import SyncStore
    from cilia.objects import decode, key, prefix
    store = SyncStore(state.store_url(spec.name))
    try:
        # What a node controller would do: pods bound to a gone node are gone.
        kvs, _ = store.list(prefix("pods"))
        for kv in kvs:
            if decode(kv.value).get("spec", {}).get("nodeName") == node.name:
                store.delete(kv.key)
        store.delete(key("nodes", None, node.name))
        store.delete(f"/cilia/nodes/v1/{node.name}")
        kvs, _ = store.list("/cilia/ipcache/v1/")
        for kv in kvs:
            if decode(kv.value).get("node") == node.name:
                store.delete(kv.key)
    finally:
        store.close()
    netns.delete(node.netns)
    _remove_pins(os.path.join(paths.BPF_ROOT, spec.name, node.name))
    shutil.rmtree(paths.node_dir(spec.name, node.name), ignore_errors=True)
    spec.nodes = [n for n in spec.nodes if n.name != node.name]
    state.save_spec(spec, "running")
    route_service_ips(spec)


def _stop_node_processes(lab: str, node: str) -> list[str]:
    """Runtime first so nothing restarts what we stop next; then agent, then pods."""
    removed = []
    _stop_pidfile(state.runtime_pid_file(lab, node), 3.0)
    _stop_pidfile(state.agent_pid_file(lab, node), 3.0)
    for run in state.read_json(state.pods_file(lab, node), {}).values():
        for c in run.get("containers", []):
            if c.get("proc"):
                ProcRef.from_json(c["proc"]).stop(1.0)
        if netns.delete(run["netns"]):
            removed.append(run["netns"])
    return removed


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
    for n in node_names:
        removed += _stop_node_processes(name, n)
    _stop_pidfile(operator_pid_file(name), 3.0)
    _stop_pidfile(os.path.join(d, "hubble-relay.json"), 3.0)  # cilia hubble enable
    stop_etcd(name)
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

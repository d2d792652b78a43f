"""cilia-agent: one per node, in the node's network namespace.

Owns the node's datapath (loaded once, maps pinned so forwarding survives our restarts),
the endpoint manager, the node's view of the cluster (ipcache, routes) and the HTTP API on a
unix socket."""
from __future__ import annotations

import asyncio
import concurrent.futures
import json
import logging
import os
import time
from dataclasses import asdict, dataclass, field

from cilia import paths
from cilia.agent import node_net, observe
from cilia.agent.supervisor import Supervisor
from cilia.datapath.node import NodeConfig, NodeDatapath
from cilia.endpoint import link
from cilia.endpoint.manager import CniRequest, EndpointManager, RestoreReport
from cilia.ipam.pool import PodCIDRPool
from cilia.ipcache.model import EndpointInfo

log = logging.getLogger("cilia.agent")

VERSION = "0.1.0"
CLUSTER_CIDR = "10.244.0.0/16"


@dataclass
class AgentConfig:
    cluster: str
    node: str
    node_ip: str
    pod_cidr: str = "auto"          # "auto": ask the operator through the store
    preferred_pod_cidr: str = ""
    store_url: str = ""
    routing: str = "tunnel"
    mtu: int = 1500
    uplink: str = "eth0"
    masquerade: bool = True
    lb_algorithm: str = "random"     # random | maglev (per service: the Cilium annotation)
    cluster_cidr: str = CLUSTER_CIDR
    socket: str = ""
    state_dir: str = ""
    pin_dir: str = ""
    node_id: int = 0
    labels: dict[str, str] = field(default_factory=dict)
    policy_enforcement: str = "default"   # default | always | never (cilium's enable-policy)
    policy_audit: bool = False

    def __post_init__(self) -> None:
        self.socket = self.socket or paths.agent_socket(self.cluster, self.node)
        self.state_dir = self.state_dir or paths.agent_state_dir(self.cluster, self.node)
        self.pin_dir = self.pin_dir or paths.pin_dir(self.cluster, self.node)

    @property
    def tunnel(self) -> bool:
        return self.routing == "tunnel"


class Agent:
    def __init__(self, cfg: AgentConfig):
        self.cfg = cfg
        self.started = time.time()
        # One thread owns netlink and endpoint state: serialises ADD/DEL without locks.
        self.executor = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="endpoint")
        self.datapath: NodeDatapath | None = None
        self.endpoints: EndpointManager | None = None
        self.restore_report = RestoreReport()
        self.store = None
        self.cluster = None       # ClusterSync when a store is configured
        self.identities = None    # IdentityAllocator when a store is configured
        self.store_error: str | None = None
        self.pod_cidr = ""
        self.ready = asyncio.Event()
        self.ipcache_entries = 0
        self.routes = 0
        self.lb = None
        self.service_watcher = None
        self.policy = None        # PolicySync when a store is configured

    async def blocking(self, fn, *args):
        return await asyncio.get_running_loop().run_in_executor(self.executor, fn, *args)

    # --- start-up ---------------------------------------------------------------------------

    def _node_file(self) -> str:
        return os.path.join(self.cfg.state_dir, "node.json")

    async def _obtain_pod_cidr(self) -> str:
        if self.cfg.pod_cidr != "auto":
            return self.cfg.pod_cidr
        # A restart must not depend on the store: the allocation never changes for a node.
        try:
            with open(self._node_file()) as f:
                return json.load(f)["podCIDR"]
        except (FileNotFoundError, ValueError, KeyError):
            pass
        if self.cluster is None:
            raise RuntimeError("--pod-cidr auto needs --store")
        return await self.cluster.register(self.cfg.preferred_pod_cidr or None)

    def _init_datapath(self) -> None:
        # The lab enters our netns with nsenter, which leaves the bpffs mount alone; a real
        # host might not have it mounted yet.
        if not os.path.ismount("/sys/fs/bpf"):
            os.system("mount -t bpf bpf /sys/fs/bpf")
        node_net.prepare_sysctls()
        router = PodCIDRPool(self.pod_cidr).router_ip
        link.ensure_host_device(router)
        tunnel_ifindex = node_net.ensure_vxlan(self.cfg.mtu) if self.cfg.tunnel else 0
        uplink_ifindex = node_net.ifindex(self.cfg.uplink)
        self.datapath = NodeDatapath(self.cfg.pin_dir, NodeConfig(
            node_ip4=self.cfg.node_ip, router_ip4=router, pod_cidr4=self.pod_cidr,
            node_id=self.cfg.node_id, routing=self.cfg.routing, tunnel_ifindex=tunnel_ifindex,
            native_ifindex=uplink_ifindex, cluster_cidr4=self.cfg.cluster_cidr,
            masquerade=self.cfg.masquerade, flags=observe.datapath_flags(self.cfg)))
        self.datapath.load()
        self.datapath.attach_netdev(uplink_ifindex)
        if tunnel_ifindex:
            self.datapath.attach_overlay(tunnel_ifindex)
        self.endpoints = EndpointManager(self.datapath, self.cfg.state_dir, self.pod_cidr,
                                         self.cfg.mtu)
        self.restore_report = self.endpoints.restore()
        log.info("restored %d endpoints, removed %d, %d stale map entries",
                 self.restore_report.restored, self.restore_report.removed,
                 self.restore_report.stale_map_entries)
        if not self.cluster:
            # Without a store the node still knows itself: host, world and its own pods.
            from cilia.ipcache.model import NodeInfo, desired
            eps = {e.ip4: EndpointInfo(e.ip4, e.identity, self.cfg.node, self.cfg.node_ip)
                   for e in self.endpoints.endpoints.values()}
            self.datapath.sync_ipcache(desired(
                self.cfg.node, self.cfg.tunnel,
                {self.cfg.node: NodeInfo(self.cfg.node, self.cfg.node_ip, self.pod_cidr)}, eps))

    async def start(self) -> None:
        os.makedirs(self.cfg.state_dir, exist_ok=True)
        if self.cfg.store_url:
            from cilia.agent.cluster_sync import ClusterSync
            from cilia.identity.allocator import IdentityAllocator
            from cilia.kvstore import open_store
            self.store = open_store(self.cfg.store_url)
            self.cluster = ClusterSync(self.store, self.cfg.node, self.cfg.node_ip,
                                       self.cfg.tunnel, self._apply_cluster_view)
            self.identities = IdentityAllocator(self.store, self.cfg.node,
                                                on_change=self._on_identities_changed)
            from cilia.agent.policy_sync import PolicySync
            self.policy = PolicySync(self, self.cfg.policy_enforcement, self.cfg.policy_audit)
        self.pod_cidr = await self._obtain_pod_cidr()
        paths.write_atomic(self._node_file(), json.dumps({"podCIDR": self.pod_cidr}))
        if self.cluster is not None:
            self.cluster.set_pod_cidr(self.pod_cidr)
            self.cluster.on_relet.append(self._republish)
        await self.blocking(self._init_datapath)
        if self.policy is not None:
            for ep in self.endpoints.endpoints.values():
                self.policy.endpoint_added(ep)
        from cilia.loadbalancer.desired import node_addresses
        from cilia.loadbalancer.model import LBConfig
        from cilia.loadbalancer.reconciler import LBReconciler, run_in_executor
        self.lb = LBReconciler(self.datapath, self.cfg.state_dir, self.cfg.node,
                               node_addresses(self.cfg.node_ip, PodCIDRPool(self.pod_cidr).router_ip),
                               LBConfig(algorithm=self.cfg.lb_algorithm),
                               run_blocking=run_in_executor(self.executor))
        self.ready.set()

    async def _apply_cluster_view(self, ipcache: dict, routes: dict) -> None:
        if self.policy is not None:
            from cilia.ipcache.model import with_cidr_identities
            ipcache = with_cidr_identities(ipcache, self.policy.cidr_ipcache())

        def program() -> None:
            self.datapath.sync_ipcache(ipcache)
            node_net.sync_routes(routes, self.cfg.tunnel, self.cfg.uplink)
        await self.blocking(program)
        self.ipcache_entries, self.routes = len(ipcache), len(routes)
        self._nodeport_addresses()

    async def reapply_cluster_view(self) -> None:
        """The policy's CIDR identities changed: the ipcache must carry them."""
        if self.cluster is not None:
            await self._apply_cluster_view(*self.cluster.view())

    async def relabel_endpoint(self, ep, labels: dict, identity_labels: list[str]) -> None:
        """The pod's (or its namespace's) labels changed: move it to the identity of its new
        labels, publish that, then let the old identity go."""
        old = ep.identity
        ident = await self.identities.allocate(identity_labels)
        ep.labels, ep.identity_labels = dict(labels), list(identity_labels)
        await self.blocking(self.endpoints.set_identity, ep.id, ident.id)
        await self.cluster.publish(self._ep_info(ep))
        if old and old != ident.id:
            try:
                await self.identities.release(old)
            except Exception as e:
                self.store_error = str(e)
        log.info("endpoint %d (%s/%s): identity %d -> %d", ep.id, ep.pod_namespace,
                 ep.pod_name, old, ident.id)

    def _nodeport_addresses(self) -> None:
        """NodePorts answer on this node's addresses and, for pods here, on every other
        node's IP too: a pod reaching nodeX:port is balanced at its own node (Cilium does the
        same through a wildcard frontend), so the packet never has to hairpin through nodeX."""
        if self.lb is None or self.cluster is None:
            return
        from cilia.loadbalancer.desired import node_addresses
        others = sorted(n.ip for name, n in self.cluster.nodes.items() if name != self.cfg.node)
        ips = node_addresses(self.cfg.node_ip, PodCIDRPool(self.pod_cidr).router_ip, *others)
        if ips != self.lb.node_ips:
            self.lb.node_ips = ips
            if self.service_watcher is not None:
                self.service_watcher.kick()

    async def _republish(self) -> None:
        """After (re)getting a lease: identity refs and our endpoints' ipcache entries."""
        if self.identities is not None:
            await self.identities.resync()
        for ep in list(self.endpoints.endpoints.values()) if self.endpoints else []:
            await self.cluster.publish(self._ep_info(ep))

    def _on_identities_changed(self, changed: dict) -> None:
        asyncio.get_running_loop().create_task(self._identities_changed(changed))

    async def _identities_changed(self, changed: dict) -> None:
        """The allocator had to renumber identities (GC'd during an outage and taken over):
        re-label the endpoints that carried them."""
        for ep in list(self.endpoints.endpoints.values()):
            new = changed.get(ep.identity)
            if new is not None:
                await self.blocking(self.endpoints.set_identity, ep.id, new.id)
                await self.cluster.publish(self._ep_info(ep))
                if self.policy is not None:
                    self.policy.endpoint_changed(ep)

    def _ep_info(self, ep) -> EndpointInfo:
        return EndpointInfo(ep.ip4, ep.identity, self.cfg.node, self.cfg.node_ip,
                            ep.pod_namespace, ep.pod_name)

    async def restore_identities(self) -> None:
        """Root task: re-reference restored endpoints' identities once the store answers."""
        if self.identities is None:
            return
        while True:
            try:
                await self.identities.start()
                break
            except Exception as e:  # store down at start: the datapath is already up
                self.store_error = str(e)
                await asyncio.sleep(1.0)
        for ep in list(self.endpoints.endpoints.values()):
            while True:
                try:
                    if ep.identity_labels:
                        ident = await self.identities.allocate(ep.identity_labels)
                        if ident.id != ep.identity:
                            await self.blocking(self.endpoints.set_identity, ep.id, ident.id)
                            if self.policy is not None:
                                self.policy.endpoint_changed(ep)
                    await self.cluster.publish(self._ep_info(ep))
                    break
                except Exception as e:  # store down: keep the datapath, retry
                    self.store_error = str(e)
                    await asyncio.sleep(1.0)
        await asyncio.Event().wait()

    # --- CNI ------------------------------------------------------------------------------------

    async def security_labels(self, namespace: str, name: str,
                              fallback: dict | None = None) -> tuple[dict, list[str]]:
        from cilia.identity.labels import pod_security_labels
        from cilia.objects import Objects
        objs = Objects(self.store)
        got = await objs.get("pods", namespace, name)
        # No Pod object (podman, a bare runtime): the labels the CNI call carried.
        pod_labels = dict((got[0]["metadata"].get("labels") or {}) if got else fallback or {})
        sa = ((got[0].get("spec") or {}).get("serviceAccountName") if got else None) or "default"
        ns = await objs.get("namespaces", None, namespace)
        ns_labels = dict((ns[0]["metadata"].get("labels") or {}) if ns else {})
        return pod_labels, pod_security_labels(pod_labels, namespace, ns_labels, sa,
                                               self.cfg.cluster)

    async def cni_add(self, creq: CniRequest) -> dict:
        if self.identities is not None and creq.pod_name:
            creq.labels, creq.identity_labels = await self.security_labels(
                creq.pod_namespace, creq.pod_name, creq.labels)
            await self.identities.start()  # idempotent; the restore task may not have yet
            creq.identity = (await self.identities.allocate(creq.identity_labels)).id
        result = await self.blocking(self.endpoints.add, creq)
        if self.cluster is not None:
            ep = self.endpoints.by_container(creq.container_id, creq.ifname)
            if self.policy is not None:
                # Enforced before the runtime starts the pod's process.
                self.policy.endpoint_added(ep)
                await self.policy.regenerate()
            await self.cluster.publish(self._ep_info(ep))
        return result

    async def cni_del(self, container_id: str, ifname: str) -> None:
        ep = self.endpoints.by_container(container_id, ifname)
        await self.blocking(self.endpoints.delete, container_id, ifname)
        if ep is not None and self.policy is not None:
            await self.policy.endpoint_removed(ep.id)
        if ep is not None and self.cluster is not None:
            await self.cluster.unpublish(ep.ip4)
            if ep.identity and self.identities is not None:
                try:
                    await self.identities.release(ep.identity)
                except Exception as e:
                    self.store_error = str(e)

    # --- status ---------------------------------------------------------------------------

    def policy_status(self) -> dict:
        p = self.policy
        if p is None:
            return {"enforcement": self.cfg.policy_enforcement, "audit": self.cfg.policy_audit,
                    "policies": 0}
        return {"enforcement": p.config["enable-policy"], "audit": p.config["policy-audit-mode"],
                "policies": len(p.engine.policies()), "identities": len(p.identities),
                "revision": p.realized_revision, "engine_revision": p.engine.revision,
                "regenerations": p.regenerations,
                "last_regeneration_ms": round(p.last_regeneration_ms, 3),
                "errors": dict(p.errors)}

    async def store_status(self) -> dict:
        if self.store is None:
            return {"backend": "disabled", "ok": True, "error": None}
        try:
            st = await asyncio.wait_for(self.store.status(), 2)
        except Exception as e:
            st = {"backend": self.cfg.store_url.split(":")[0], "ok": False, "error": str(e)}
        if self.cluster is not None and not self.cluster.ok and st.get("ok"):
            st = dict(st, ok=False, error=self.cluster.error)
        return st

    async def status(self) -> dict:
        eps = self.endpoints.endpoints if self.endpoints else {}
        pool = self.endpoints.pool if self.endpoints else None
        cl = self.cluster
        return {
            "cluster": self.cfg.cluster,
            "node": self.cfg.node,
            "version": VERSION,
            "uptime_seconds": round(time.time() - self.started, 1),
            "node_ip": self.cfg.node_ip,
            "routing": self.cfg.routing,
            "masquerade": self.cfg.masquerade,
            "mtu": self.cfg.mtu,
            "ipam": {
                "pod_cidr": self.pod_cidr,
                "router_ip": pool.router_ip if pool else None,
                "allocated": len(pool.allocated) if pool else 0,
                "capacity": pool.capacity if pool else 0,
                "addresses": pool.allocated if pool else {},
            },
            "endpoints": len(eps),
            "regenerations": self.endpoints.regenerations if self.endpoints else 0,
            "last_regeneration_ms": round(self.endpoints.last_regeneration_ms, 3)
            if self.endpoints else 0,
            "restore": asdict(self.restore_report),
            "cluster": {
                "nodes": sorted(cl.nodes) if cl else [self.cfg.node],
                "ipcache_entries": self.ipcache_entries,
                "remote_routes": self.routes,
                "syncs": cl.syncs if cl else 0,
                "last_sync": cl.last_sync if cl else None,
            },
            "services": self.lb.stats() if self.lb else {},
            "policy": self.policy_status(),
            "datapath": {"pin_dir": self.cfg.pin_dir,
                         "programs": ["cil_from_container", "cil_to_container",
                                      "cil_from_netdev", "cil_to_netdev"]
                         + (["cil_from_overlay", "cil_to_overlay"] if self.cfg.tunnel else [])},
            "store": await self.store_status(),
            "hubble": observe.status(self),
        }

    # --- lifecycle --------------------------------------------------------------------------

    async def serve(self) -> None:
        from cilia.api.server import serve
        await serve(self)

    async def close(self) -> None:
        if self.identities is not None:
            try:
                await self.identities.close()
            except Exception:
                pass
        if self.store is not None:
            try:
                await self.store.close()
            except Exception:
                pass
        if self.datapath is not None:
            # Closing our handles only: pinned maps and attached programs stay, so pods keep
            # talking while no agent runs.
            await self.blocking(self.datapath.close)
        self.executor.shutdown(wait=False)


async def run(cfg: AgentConfig) -> int:
    agent = Agent(cfg)
    try:
        await agent.start()
        sup = Supervisor()
        sup.add("api", agent.serve)
        observe.start(agent, sup)
        from cilia.agent.metrics_server import serve_metrics  # Prometheus, node netns :9962
        sup.add("metrics", lambda: serve_metrics(agent))
        if agent.cluster is not None:
            sup.add("lease", agent.cluster.keepalive)
            sup.add("cluster-sync", agent.cluster.run)
            sup.add("identities", agent.restore_identities)
            from cilia.loadbalancer.watch import ServiceWatcher
            agent.service_watcher = ServiceWatcher(agent.store, agent.lb)
            sup.add("services", agent.service_watcher.run)
            sup.add("policy", agent.policy.run)
        return await sup.run()
    finally:
        await agent.close()

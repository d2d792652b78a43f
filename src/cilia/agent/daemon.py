"""cilia-agent: one per node, in the node's network namespace.

Owns the node's datapath (loaded once, maps pinned so forwarding survives our restarts),
the endpoint manager, and the HTTP API on a unix socket."""
from __future__ import annotations

import asyncio
import concurrent.futures
import logging
import os
import time
from dataclasses import asdict, dataclass, field

from cilia import paths
from cilia.agent.supervisor import Supervisor
from cilia.datapath.node import NodeConfig, NodeDatapath
from cilia.endpoint import link
from cilia.endpoint.manager import EndpointManager, RestoreReport
from cilia.ipam.pool import PodCIDRPool

log = logging.getLogger("cilia.agent")

VERSION = "0.1.0"


@dataclass
class AgentConfig:
    cluster: str
    node: str
    node_ip: str
    pod_cidr: str
    store_url: str = ""
    routing: str = "tunnel"
    mtu: int = 1500
    socket: str = ""
    state_dir: str = ""
    pin_dir: str = ""
    node_id: int = 0
    labels: dict[str, str] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.socket = self.socket or paths.agent_socket(self.cluster, self.node)
        self.state_dir = self.state_dir or paths.agent_state_dir(self.cluster, self.node)
        self.pin_dir = self.pin_dir or paths.pin_dir(self.cluster, self.node)


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
        self.store_error: str | None = None
        self.ready = asyncio.Event()

    async def blocking(self, fn, *args):
        return await asyncio.get_running_loop().run_in_executor(self.executor, fn, *args)

    def _init_datapath(self) -> None:
        os.makedirs(self.cfg.state_dir, exist_ok=True)
        # The lab enters our netns with nsenter, which leaves the bpffs mount alone; a real
        # host might not have it mounted yet.
        if not os.path.ismount("/sys/fs/bpf"):
            os.system("mount -t bpf bpf /sys/fs/bpf")
        pool_router = PodCIDRPool(self.cfg.pod_cidr).router_ip
        link.ensure_host_device(pool_router)
        self.datapath = NodeDatapath(self.cfg.pin_dir, NodeConfig(
            node_ip4=self.cfg.node_ip, router_ip4=pool_router, pod_cidr4=self.cfg.pod_cidr,
            node_id=self.cfg.node_id))
        self.datapath.load()
        self.endpoints = EndpointManager(self.datapath, self.cfg.state_dir, self.cfg.pod_cidr,
                                         self.cfg.mtu)
        self.restore_report = self.endpoints.restore()
        log.info("restored %d endpoints, removed %d, %d stale map entries",
                 self.restore_report.restored, self.restore_report.removed,
                 self.restore_report.stale_map_entries)

    async def start(self) -> None:
        await self.blocking(self._init_datapath)
        if self.cfg.store_url:
            from cilia.kvstore import open_store
            try:
                self.store = open_store(self.cfg.store_url)
            except Exception as e:  # the datapath must come up even without the store
                self.store_error = str(e)
        self.ready.set()

    async def pod_labels(self, namespace: str, name: str) -> dict[str, str]:
        if self.store is None or not name:
            return {}
        from cilia.objects import Objects
        try:
            got = await Objects(self.store).get("pods", namespace, name)
            self.store_error = None
        except Exception as e:
            self.store_error = str(e)
            return {}
        if got is None:
            return {}
        return dict(got[0].get("metadata", {}).get("labels") or {})

    async def store_status(self) -> dict:
        if self.store is None:
            return {"backend": "disabled", "ok": not self.cfg.store_url,
                    "error": self.store_error}
        try:
            st = await asyncio.wait_for(self.store.status(), 2)
            return st
        except Exception as e:
            return {"backend": self.cfg.store_url.split(":")[0], "ok": False, "error": str(e)}

    async def status(self) -> dict:
        eps = self.endpoints.endpoints if self.endpoints else {}
        pool = self.endpoints.pool if self.endpoints else None
        return {
            "cluster": self.cfg.cluster,
            "node": self.cfg.node,
            "version": VERSION,
            "uptime_seconds": round(time.time() - self.started, 1),
            "node_ip": self.cfg.node_ip,
            "routing": self.cfg.routing,
            "mtu": self.cfg.mtu,
            "ipam": {
                "pod_cidr": self.cfg.pod_cidr,
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
            "datapath": {"pin_dir": self.cfg.pin_dir,
                         "programs": ["cil_from_container", "cil_to_container"]},
            "store": await self.store_status(),
        }

    async def serve(self) -> None:
        from cilia.api.server import serve
        await serve(self)

    async def close(self) -> None:
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
    await agent.start()
    sup = Supervisor()
    sup.add("api", agent.serve)
    try:
        return await sup.run()
    finally:
        await agent.close()

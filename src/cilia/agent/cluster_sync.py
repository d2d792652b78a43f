"""The agent's view of the cluster through the store.

- registers this node (under the agent's lease) and obtains its pod CIDR from the operator;
- publishes its endpoints' IP -> identity (the kvstore ipcache, also under the lease);
- watches every node and endpoint and keeps the BPF ipcache and the routes to remote pod
  CIDRs equal to what the store says.

The datapath never waits for the store: when the store is gone the maps keep their last
content, `status` says so, and on return the agent re-publishes and resyncs.
"""
from __future__ import annotations

import asyncio
import json
import logging
import time
from typing import Awaitable, Callable

from cilia.ipcache.model import EndpointInfo, NodeInfo, desired, remote_routes
from cilia.kvstore import LeaseNotFound, StoreUnavailable
from cilia.kvstore.watchcache import WatchCache

log = logging.getLogger("cilia.cluster")

NODES = "/cilia/nodes/v1/"
PODCIDRS = "/cilia/ipam/v1/podcidrs/"
IPCACHE = "/cilia/ipcache/v1/"
LEASE_TTL = 60


class ClusterSync:
    def __init__(self, store, node: str, node_ip: str, tunnel: bool,
                 apply: Callable[[dict, dict], Awaitable[None]]):
        self.store = store
        self.node = node
        self.node_ip = node_ip
        self.tunnel = tunnel
        self.apply = apply  # (desired ipcache, remote routes) -> programs the node
        self.lease = 0
        self.registration: dict = {}
        self.published: dict[str, dict] = {}  # our endpoints' ipcache values by IP
        self.nodes: dict[str, NodeInfo] = {}
        self.cidrs: dict[str, str] = {}
        self.endpoints: dict[str, EndpointInfo] = {}
        self.ok = False
        self.error: str | None = None
        self.last_sync = 0.0
        self.syncs = 0
        self._dirty = asyncio.Event()
        self._resynced = asyncio.Event()
        self.on_relet: list[Callable[[], Awaitable[None]]] = []

    # --- lease and what hangs off it --------------------------------------------------

    async def _grant(self) -> None:
        self.lease = await self.store.lease_grant(LEASE_TTL)
        if self.registration:
            await self.store.put(NODES + self.node, json.dumps(self.registration).encode(),
                                 lease=self.lease)
        for ip, val in list(self.published.items()):
            await self.store.put(IPCACHE + ip, json.dumps(val).encode(), lease=self.lease)
        await self._drop_stale_publications()
        for cb in self.on_relet:
            await cb()

    async def _drop_stale_publications(self) -> None:
        kvs, _ = await self.store.list(IPCACHE)
        for kv in kvs:
            ip = kv.key[len(IPCACHE):]
            if json.loads(kv.value).get("node") == self.node and ip not in self.published:
                await self.store.delete(kv.key)

    async def register(self, preferred_cidr: str | None, timeout: float = 60.0) -> str:
        """Register this node and wait for the operator's pod CIDR allocation."""
        self.registration = {"name": self.node, "ip": self.node_ip,
                             "routing": "tunnel" if self.tunnel else "native"}
        if preferred_cidr:
            self.registration["preferredPodCIDR"] = preferred_cidr
        await self._grant()
        deadline = time.monotonic() + timeout
        while True:
            kv = await self.store.get(PODCIDRS + self.node)
            if kv is not None:
                cidr = json.loads(kv.value)["cidr"]
                self.registration["podCIDR"] = cidr
                await self.store.put(NODES + self.node, json.dumps(self.registration).encode(),
                                     lease=self.lease)
                return cidr
            if time.monotonic() > deadline:
                raise TimeoutError(f"no pod CIDR for node {self.node} after {timeout:.0f}s "
                                   "(is cilia-operator running?)")
            await asyncio.sleep(0.1)

    def set_pod_cidr(self, cidr: str) -> None:
        self.registration = {"name": self.node, "ip": self.node_ip, "podCIDR": cidr,
                             "routing": "tunnel" if self.tunnel else "native"}

    async def keepalive(self) -> None:
        """Root task: keep the lease; after an outage re-publish everything."""
        while True:
            try:
                if not self.lease:
                    await self._grant()
                else:
                    await self.store.lease_keepalive(self.lease)
                if not self.ok:
                    log.info("store reachable again")
                self.ok, self.error = True, None
            except LeaseNotFound:
                log.warning("lease %x expired; re-registering", self.lease)
                self.lease = 0
                continue
            except (StoreUnavailable, OSError) as e:
                if self.ok:
                    log.warning("store unreachable: %s", e)
                self.ok, self.error = False, str(e)
            await asyncio.sleep(min(5.0, LEASE_TTL / 6) if self.ok else 1.0)

    # --- our endpoints ------------------------------------------------------------------

    async def publish(self, ep: EndpointInfo) -> None:
        val = {"ip": ep.ip, "identity": ep.identity, "node": self.node, "nodeIP": self.node_ip,
               "namespace": ep.namespace, "pod": ep.pod}
        self.published[ep.ip] = val
        self.endpoints[ep.ip] = EndpointInfo(ep.ip, ep.identity, self.node, self.node_ip,
                                             ep.namespace, ep.pod)
        self._dirty.set()
        try:
            await self.store.put(IPCACHE + ep.ip, json.dumps(val).encode(), lease=self.lease)
        except (StoreUnavailable, LeaseNotFound) as e:
            # Kept in self.published: the next successful lease grant re-publishes it.
            self.ok, self.error = False, str(e)
            self.lease = 0 if isinstance(e, LeaseNotFound) else self.lease

    async def unpublish(self, ip: str) -> None:
        self.published.pop(ip, None)
        self.endpoints.pop(ip, None)
        self._dirty.set()
        try:
            await self.store.delete(IPCACHE + ip)
        except StoreUnavailable as e:
            self.ok, self.error = False, str(e)

    # --- the rest of the cluster ------------------------------------------------------------

    def _on_change(self, key: str, value: bytes | None, _rev: int) -> None:
        self._parse(key, value)
        self._dirty.set()

    def _parse(self, key: str, value: bytes | None) -> None:
        if key.startswith(NODES):
            name = key[len(NODES):]
            if value is None:
                self.nodes.pop(name, None)
            else:
                d = json.loads(value)
                self.nodes[name] = NodeInfo(name, d["ip"], d.get("podCIDR"))
        elif key.startswith(PODCIDRS):
            name = key[len(PODCIDRS):]
            if value is None:
                self.cidrs.pop(name, None)
            else:
                self.cidrs[name] = json.loads(value)["cidr"]
        elif key.startswith(IPCACHE):
            ip = key[len(IPCACHE):]
            if value is None:
                if ip not in self.published:
                    self.endpoints.pop(ip, None)
            else:
                d = json.loads(value)
                if d.get("node") != self.node:
                    self.endpoints[ip] = EndpointInfo(ip, int(d["identity"]), d["node"],
                                                      d["nodeIP"], d.get("namespace", ""),
                                                      d.get("pod", ""))

    async def current(self) -> bool:
        """Every other node's endpoint publication in the store is in our ipcache view and
        programmed (nothing pending): peers' identities as the store has them now."""
        if self._dirty.is_set():
            return False
        kvs, _ = await self.store.list(IPCACHE)
        theirs = {}
        for kv in kvs:
            d = json.loads(kv.value)
            if d.get("node") != self.node:
                theirs[kv.key[len(IPCACHE):]] = int(d["identity"])
        ours = {ip: e.identity for ip, e in self.endpoints.items() if e.node != self.node}
        return theirs == ours and not self._dirty.is_set()

    def view(self) -> tuple[dict, dict]:
        nodes = {}
        for name, n in self.nodes.items():
            nodes[name] = NodeInfo(name, n.ip, n.pod_cidr or self.cidrs.get(name))
        return (desired(self.node, self.tunnel, nodes, self.endpoints),
                remote_routes(self.node, nodes))

    async def run(self) -> None:
        """Root task: watches plus a debounced reconciler."""
        watchers = [asyncio.create_task(WatchCache(self.store, p, self._on_change).run(),
                                        name=f"watch{p}") for p in (NODES, PODCIDRS, IPCACHE)]
        try:
            while True:
                await self._dirty.wait()
                await asyncio.sleep(0.02)  # coalesce a burst of events into one sync
                self._dirty.clear()
                for w in watchers:
                    if w.done():
                        w.result()  # a dead watcher is a dead agent: raise
                ipc, routes = self.view()
                await self.apply(ipc, routes)
                self.last_sync = time.time()
                self.syncs += 1
        finally:
            for w in watchers:
                w.cancel()
            await asyncio.gather(*watchers, return_exceptions=True)

    async def close(self) -> None:
        """Clean shutdown keeps the lease: a restarting agent must not blink the cluster."""

"""cilia-operator: the per-cluster control loop that talks only to the store.

Pod CIDR allocation reacts to watch events (node registrations, Node objects, ipam keys);
the service controller (services.py) allocates ClusterIPs, NodePorts and LoadBalancer IPs and
derives EndpointSlices, also from watch events;
identity GC runs on a timer; a heartbeat keeps /cilia/operator/v1/status alive under the
operator's lease so `cilia status` can tell a live operator from a dead one.
Several operators may run at once: every write is a compare-and-swap.
"""
from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import logging
import os
import socket
import sys
import time
from dataclasses import dataclass

from cilia.agent.supervisor import Supervisor
from cilia.kvstore import Compacted, LeaseNotFound, Store, StoreUnavailable, open_store

from cilia.loadbalancer.ipam import DEFAULT_LB_POOL, DEFAULT_SERVICE_CIDR, Ranges

from .identity_gc import DEFAULT_GRACE, DEFAULT_INTERVAL, IdentityGC
from .podcidr import (
    DEFAULT_CLUSTER_CIDR,
    DEFAULT_MASK,
    IPAM_PREFIX,
    K8S_NODES_PREFIX,
    NODES_PREFIX,
    PodCIDRAllocator,
    check_pool,
)
from .services import ServiceController

log = logging.getLogger("cilia.operator")

STATUS_KEY = "/cilia/operator/v1/status"
LEASE_TTL = 15
HEARTBEAT = 5.0
_RETRY_MAX = 2.0


@dataclass
class OperatorConfig:
    cluster_cidr: str = DEFAULT_CLUSTER_CIDR
    node_cidr_mask_size: int = DEFAULT_MASK
    identity_gc_interval: float = DEFAULT_INTERVAL
    identity_gc_grace: float = DEFAULT_GRACE
    lease_ttl: int = LEASE_TTL
    heartbeat: float = HEARTBEAT
    service_cidr: str = DEFAULT_SERVICE_CIDR
    lb_pool: str = DEFAULT_LB_POOL


class Operator:
    def __init__(self, store: Store, config: OperatorConfig | None = None) -> None:
        self.store = store
        self.config = config or OperatorConfig()
        self.podcidr = PodCIDRAllocator(store, self.config.cluster_cidr, self.config.node_cidr_mask_size)
        self.gc = IdentityGC(store, self.config.identity_gc_grace)
        self.services = ServiceController(store, Ranges(self.config.service_cidr, self.config.lb_pool))
        self.lease = 0
        self._dirty = asyncio.Event()
        self.reconciles = 0

    def add_tasks(self, sup: Supervisor) -> None:
        sup.add("heartbeat", self.heartbeat_loop)
        for prefix in (NODES_PREFIX, K8S_NODES_PREFIX, IPAM_PREFIX):
            sup.add(f"watch {prefix}", lambda p=prefix: self.watch_loop(p))
        sup.add("podcidr", self.reconcile_loop)
        sup.add("identity-gc", self.gc_loop)
        self.services.add_tasks(sup)

    async def watch_loop(self, prefix: str) -> None:
        """Turns store changes under prefix into reconcile requests; never polls."""
        while True:
            try:
                rev = await self.store.revision()
            except StoreUnavailable as e:
                log.warning("store unavailable (%s); retrying", e)
                await asyncio.sleep(1.0)
                continue
            # Everything up to rev is covered by the reconcile this triggers (it reads the
            # store afresh); everything after arrives as events.
            self._dirty.set()
            try:
                async for _ev in self.store.watch(prefix, rev + 1):
                    self._dirty.set()
            except Compacted:
                log.info("watch on %s compacted; starting over", prefix)
                continue
            raise RuntimeError(f"watch on {prefix} ended (store closed?)")

    async def reconcile_loop(self) -> None:
        backoff = 0.05
        while True:
            await self._dirty.wait()
            self._dirty.clear()
            try:
                _plan, clean = await self.podcidr.reconcile()
                self.reconciles += 1
                backoff = 0.05
            except StoreUnavailable as e:
                log.warning("pod CIDR reconcile: store unavailable (%s); retrying", e)
                clean = False
                backoff = min(backoff * 4, _RETRY_MAX)
            if not clean:
                # A concurrent writer or an outage: its watch event may already have been
                # coalesced into this pass, so ask for another one ourselves.
                await asyncio.sleep(backoff)
                self._dirty.set()

    async def gc_loop(self) -> None:
        while True:
            await asyncio.sleep(self.config.identity_gc_interval)
            try:
                await self.gc.run_once()
            except StoreUnavailable as e:
                log.warning("identity GC: store unavailable (%s); next run in %ss", e,
                            self.config.identity_gc_interval)

    def status_value(self) -> bytes:
        return json.dumps({
            "ok": True,
            "time": round(time.time(), 3),
            "pid": os.getpid(),
            "host": socket.gethostname(),
            "clusterCIDR": self.config.cluster_cidr,
            "nodeCIDRMaskSize": self.config.node_cidr_mask_size,
            "serviceCIDR": self.config.service_cidr,
            "lbPool": self.config.lb_pool,
        }, sort_keys=True).encode()

    async def heartbeat_loop(self) -> None:
        while True:
            try:
                if not self.lease:
                    self.lease = await self.store.lease_grant(self.config.lease_ttl)
                else:
                    await self.store.lease_keepalive(self.lease)
                await self.store.put(STATUS_KEY, self.status_value(), lease=self.lease)
                delay = self.config.heartbeat
            except LeaseNotFound:
                self.lease = 0
                delay = 0.1
            except StoreUnavailable as e:
                log.warning("heartbeat: store unavailable (%s)", e)
                delay = 1.0
            await asyncio.sleep(delay)

    async def shutdown(self) -> None:
        lease, self.lease = self.lease, 0
        if lease:
            # Revoking removes the status key at once instead of after the TTL.
            with contextlib.suppress(LeaseNotFound, StoreUnavailable):
                await self.store.lease_revoke(lease)


async def run(store_url: str, config: OperatorConfig) -> int:
    store = open_store(store_url)
    op = Operator(store, config)
    sup = Supervisor()
    op.add_tasks(sup)
    log.info("cilia-operator starting: store %s, pool %s /%d, identity GC every %ss (grace %ss)",
             store_url, config.cluster_cidr, config.node_cidr_mask_size,
             config.identity_gc_interval, config.identity_gc_grace)
    try:
        rc = await sup.run()
    finally:
        await op.shutdown()
        await store.close()
    log.info("cilia-operator stopped (rc %d)", rc)
    return rc


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="cilia-operator", description="cilia cluster operator")
    p.add_argument("--store", required=True, help="sqlite:///abs/path.db or etcd://host:port")
    p.add_argument("--cluster-cidr", default=DEFAULT_CLUSTER_CIDR, help="pod CIDR pool (default %(default)s)")
    p.add_argument("--node-cidr-mask-size", type=int, default=DEFAULT_MASK,
                   help="prefix length of each node's pod CIDR (default %(default)s)")
    p.add_argument("--identity-gc-interval", type=float, default=DEFAULT_INTERVAL,
                   help="seconds between identity GC runs (default %(default)s)")
    p.add_argument("--identity-gc-grace", type=float, default=DEFAULT_GRACE,
                   help="seconds an identity must stay unreferenced before it is deleted (default %(default)s)")
    p.add_argument("--service-cidr", default=DEFAULT_SERVICE_CIDR,
                   help="ClusterIP range (default %(default)s)")
    p.add_argument("--lb-pool", default=DEFAULT_LB_POOL,
                   help="LoadBalancer ingress IP pool (default %(default)s)")
    p.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"])
    args = p.parse_args(argv)
    try:
        check_pool(args.cluster_cidr, args.node_cidr_mask_size)
    except ValueError as e:
        p.error(f"--cluster-cidr/--node-cidr-mask-size: {e}")
    try:
        Ranges(args.service_cidr, args.lb_pool)
    except ValueError as e:
        p.error(f"--service-cidr/--lb-pool: {e}")
    if args.identity_gc_interval <= 0 or args.identity_gc_grace < 0:
        p.error("--identity-gc-interval must be > 0 and --identity-gc-grace >= 0")
    try:
        open_store(args.store)  # validates the URL only; nothing is contacted
    except ValueError as e:
        p.error(f"--store: {e}")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=getattr(logging, args.log_level.upper()), stream=sys.stderr,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    config = OperatorConfig(
        cluster_cidr=args.cluster_cidr,
        node_cidr_mask_size=args.node_cidr_mask_size,
        identity_gc_interval=args.identity_gc_interval,
        identity_gc_grace=args.identity_gc_grace,
        service_cidr=args.service_cidr,
        lb_pool=args.lb_pool,
    )
    return asyncio.run(run(args.store, config))


if __name__ == "__main__":
    sys.exit(main())

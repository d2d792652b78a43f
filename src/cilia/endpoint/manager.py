"""Endpoint lifecycle: CNI ADD -> IP -> veth -> attach -> map entries -> ready; DEL reverses.

Every method is blocking and must be called from the agent's single endpoint thread (it sits
in the node netns); that thread is the only writer of endpoint state, links and endpoint maps.
"""
from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field

from cilia.datapath.node import EndpointEntry, NodeDatapath
from cilia.endpoint import link
from cilia.endpoint.model import CREATING, DISCONNECTING, READY, Endpoint, EndpointStateDir
from cilia.ipam.pool import PodCIDRPool

log = logging.getLogger("cilia.endpoint")

MAX_ENDPOINT_ID = 4095  # Cilium's endpoint ID range


class EndpointError(Exception):
    """A CNI-visible failure (code follows the CNI spec's well-known error codes)."""

    def __init__(self, msg: str, code: int = 999, details: str = ""):
        super().__init__(msg)
        self.code = code
        self.details = details


@dataclass
class CniRequest:
    container_id: str
    netns: str
    ifname: str = "eth0"
    pod_namespace: str = ""
    pod_name: str = ""
    labels: dict[str, str] = field(default_factory=dict)
    identity_labels: list[str] = field(default_factory=list)
    identity: int = 0


@dataclass
class RestoreReport:
    restored: int = 0
    removed: int = 0
    stale_map_entries: int = 0
    problems: list[str] = field(default_factory=list)


class EndpointManager:
    def __init__(self, datapath: NodeDatapath, state_dir: str, pod_cidr: str, mtu: int):
        self.dp = datapath
        self.state = EndpointStateDir(state_dir)
        self.pool = PodCIDRPool(pod_cidr)
        self.mtu = mtu
        self.endpoints: dict[int, Endpoint] = {}
        self.regenerations = 0
        self.last_regeneration_ms = 0.0

    # --- bookkeeping -------------------------------------------------------------------

    def _next_id(self) -> int:
        used = set(self.endpoints)
        for i in range(1, MAX_ENDPOINT_ID + 1):
            if i not in used:
                return i
        raise EndpointError("no free endpoint ID", code=11)

    def by_container(self, container_id: str, ifname: str) -> Endpoint | None:
        for ep in self.endpoints.values():
            if ep.container_id == container_id and ep.ifname == ifname:
                return ep
        return None

    def _entry(self, ep: Endpoint) -> EndpointEntry:
        return EndpointEntry(ip4=ep.ip4, ifindex=ep.host_ifindex, ep_id=ep.id, mac=ep.pod_mac,
                             node_mac=ep.host_mac, sec_id=ep.identity)

    def _program(self, ep: Endpoint) -> None:
        """'Regeneration': attach the shared programs and write this endpoint's map entries.
        No compilation, no reload: a few syscalls."""
        t0 = time.perf_counter()
        self.dp.attach_endpoint(ep.host_ifindex)
        self.dp.upsert_endpoint(self._entry(ep))
        self.regenerations += 1
        self.last_regeneration_ms = (time.perf_counter() - t0) * 1000

    # --- CNI ------------------------------------------------------------------------------

    def add(self, req: CniRequest) -> dict:
        existing = self.by_container(req.container_id, req.ifname)
        if existing is not None and existing.state == READY and \
                link.lookup(existing.host_ifname) is not None:
            return self.cni_result(existing)
        if existing is not None:
            self._teardown(existing)
        ep = Endpoint(id=self._next_id(), container_id=req.container_id, ifname=req.ifname,
                      netns=req.netns, ip4="", pod_namespace=req.pod_namespace,
                      pod_name=req.pod_name, labels=dict(req.labels), identity=req.identity,
                      identity_labels=list(req.identity_labels), created=time.time())
        try:
            ep.ip4 = self.pool.allocate(ep.owner)
        except Exception as e:
            raise EndpointError(str(e), code=11) from e
        ep.host_ifname = link.host_ifname(req.container_id, req.ifname)
        self.endpoints[ep.id] = ep
        # Persist before touching the kernel: a crash from here on is finished or undone
        # by restore, never leaked.
        self.state.save(ep)
        try:
            pl = link.create(req.container_id, req.netns, req.ifname, ep.ip4,
                             self.pool.router_ip, self.mtu)
            ep.host_ifindex, ep.host_mac, ep.pod_mac = pl.host_ifindex, pl.host_mac, pl.pod_mac
            self._program(ep)
            ep.state = READY
            self.state.save(ep)
        except FileNotFoundError as e:
            self._teardown(ep)
            raise EndpointError(f"netns {req.netns} does not exist", code=7) from e
        except EndpointError:
            self._teardown(ep)
            raise
        except Exception as e:
            log.exception("endpoint add failed for %s", req.container_id)
            self._teardown(ep)
            raise EndpointError(f"endpoint setup failed: {e}") from e
        log.info("endpoint %d ready: %s/%s %s on %s", ep.id, ep.pod_namespace, ep.pod_name,
                 ep.ip4, ep.host_ifname)
        return self.cni_result(ep)

    def delete(self, container_id: str, ifname: str) -> bool:
        ep = self.by_container(container_id, ifname)
        if ep is None:
            # DEL must succeed for unknown containers; clean a link a lost state may have left.
            link.delete_host(link.host_ifname(container_id, ifname))
            return False
        self._teardown(ep)
        return True

    def check(self, container_id: str, ifname: str) -> None:
        ep = self.by_container(container_id, ifname)
        if ep is None:
            raise EndpointError(f"no endpoint for container {container_id}", code=4)
        problems = []
        found = link.lookup(ep.host_ifname)
        if found is None:
            problems.append(f"host interface {ep.host_ifname} missing")
        elif found[0] != ep.host_ifindex:
            problems.append(f"host interface {ep.host_ifname} has ifindex {found[0]}, "
                            f"expected {ep.host_ifindex}")
        problems += link.check_pod(ep.netns, ep.ifname, ep.ip4)
        if not any(e.ip4 == ep.ip4 and e.ifindex == ep.host_ifindex for e in self.dp.endpoints()):
            problems.append(f"datapath has no endpoint entry for {ep.ip4}")
        if problems:
            raise EndpointError("; ".join(problems), code=4)

    def set_identity(self, ep_id: int, identity: int) -> None:
        """A new identity for a running endpoint is one map write."""
        ep = self.endpoints[ep_id]
        ep.identity = identity
        self.dp.upsert_endpoint(self._entry(ep))
        self.state.save(ep)

    def _teardown(self, ep: Endpoint) -> None:
        ep.state = DISCONNECTING
        if ep.ip4 and ep.host_ifindex:
            self.dp.delete_endpoint(ep.ip4, ep.host_ifindex)
        if ep.host_ifname:
            link.delete_host(ep.host_ifname)
        if ep.ip4:
            self.pool.release(ep.ip4)
        self.endpoints.pop(ep.id, None)
        self.state.remove(ep.id)

    def cni_result(self, ep: Endpoint) -> dict:
        return {
            "cniVersion": "1.0.0",
            "interfaces": [
                {"name": ep.host_ifname, "mac": ep.host_mac},
                {"name": ep.ifname, "mac": ep.pod_mac, "sandbox": ep.netns},
            ],
            "ips": [{"address": f"{ep.ip4}/32", "gateway": self.pool.router_ip, "interface": 1}],
            "routes": [{"dst": "0.0.0.0/0", "gw": self.pool.router_ip}],
            "dns": {},
        }

    # --- restart --------------------------------------------------------------------------

    def restore(self) -> RestoreReport:
        """Rebuild from state files after an agent restart: keep what still exists, re-attach
        the freshly loaded programs, undo half-made endpoints and drop stale map entries."""
        rep = RestoreReport()
        eps, bad = self.state.load_all()
        rep.problems += bad
        for ep in eps:
            found = link.lookup(ep.host_ifname) if ep.host_ifname else None
            if ep.state != READY or found is None:
                log.info("endpoint %d (%s) not restorable, cleaning up", ep.id, ep.host_ifname)
                if ep.ip4 and ep.host_ifindex:
                    self.dp.delete_endpoint(ep.ip4, ep.host_ifindex)
                if found is not None:
                    link.delete_host(ep.host_ifname)
                self.state.remove(ep.id)
                rep.removed += 1
                continue
            ep.host_ifindex, ep.host_mac = found
            try:
                self.pool.claim(ep.ip4, ep.owner)
            except ValueError as e:
                rep.problems.append(f"endpoint {ep.id}: {e}")
                continue
            self.endpoints[ep.id] = ep
            self._program(ep)
            self.state.save(ep)
            rep.restored += 1
        live = {(ep.ip4, ep.host_ifindex) for ep in self.endpoints.values()}
        for entry in self.dp.endpoints():
            if (entry.ip4, entry.ifindex) not in live:
                self.dp.delete_endpoint(entry.ip4, entry.ifindex)
                rep.stale_map_entries += 1
        return rep

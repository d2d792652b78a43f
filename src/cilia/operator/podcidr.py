"""Per-node pod CIDRs from the cluster pool (Cilium's cluster-pool IPAM, operator side).

Key layout (JSON values):
  /cilia/nodes/v1/<node>                 agent registration {"name", "ip", "preferredPodCIDR"?, ...}
  /cilia/k8s/nodes/<node>                the Kubernetes Node object
  /cilia/ipam/v1/claims/<a.b.c.d-len>    {"node": n}           one per handed-out CIDR
  /cilia/ipam/v1/podcidrs/<node>         {"cidr": "a.b.c.d/len"}
  /cilia/ipam/v1/errors/<node>           {"error": msg, "time": t}

A CIDR is claimed (CAS-create of its claim key) before it is written to a node's podcidrs
key, so two operators can never hand one CIDR to two nodes: the claim key is the lock, the
podcidrs key is what agents read. Every decision is recomputed from a fresh read of the
store, so nothing depends on an operator's memory across restarts.

The planning is pure (plan_pod_cidrs); PodCIDRAllocator executes a plan with CAS and
re-reads before anything destructive.
"""
from __future__ import annotations

import ipaddress
import json
import logging
import time
from dataclasses import dataclass, field
from typing import Iterable, Mapping

from cilia.kvstore.api import KV, Store

log = logging.getLogger("cilia.operator.podcidr")

NODES_PREFIX = "/cilia/nodes/v1/"
K8S_NODES_PREFIX = "/cilia/k8s/nodes/"
IPAM_PREFIX = "/cilia/ipam/v1/"
PODCIDRS_PREFIX = IPAM_PREFIX + "podcidrs/"
CLAIMS_PREFIX = IPAM_PREFIX + "claims/"
ERRORS_PREFIX = IPAM_PREFIX + "errors/"

DEFAULT_CLUSTER_CIDR = "10.244.0.0/16"
DEFAULT_MASK = 24


def podcidr_key(node: str) -> str:
    return PODCIDRS_PREFIX + node


def error_key(node: str) -> str:
    return ERRORS_PREFIX + node


def claim_key(cidr: str) -> str:
    return CLAIMS_PREFIX + cidr.replace("/", "-")


def cidr_of_claim_key(key: str) -> str:
    addr, _, plen = key[len(CLAIMS_PREFIX):].rpartition("-")
    return f"{addr}/{plen}"


def _net(cidr: str) -> ipaddress.IPv4Network:
    return ipaddress.IPv4Network(cidr, strict=True)


def check_pool(cluster_cidr: str, mask: int) -> ipaddress.IPv4Network:
    pool = _net(cluster_cidr)
    if not (pool.prefixlen < mask <= 30):
        raise ValueError(f"node CIDR mask /{mask} must be longer than the pool's /{pool.prefixlen} and at most /30")
    return pool


def _valid_preferred(preferred: str | None, pool: ipaddress.IPv4Network, mask: int) -> ipaddress.IPv4Network | None:
    if not preferred:
        return None
    try:
        net = _net(preferred)
    except ValueError:
        return None
    if net.prefixlen != mask or not net.subnet_of(pool):
        return None
    return net


def pick_pod_cidr(pool: str | ipaddress.IPv4Network, mask: int, used: Iterable[str],
                  preferred: str | None = None) -> str | None:
    """The preferred CIDR if it is a free /mask of the pool, else the lowest free one.

    The pool's first subnet is never handed out (10.244.0.0/24 of 10.244.0.0/16): it holds
    the pool's network address, which tools and humans read as "the pool", not a node.
    None when the pool is exhausted.
    """
    pool = pool if isinstance(pool, ipaddress.IPv4Network) else check_pool(pool, mask)
    used_nets = []
    for u in used:
        try:
            used_nets.append(ipaddress.IPv4Network(u, strict=False))
        except ValueError:
            continue
    first = next(pool.subnets(new_prefix=mask))

    def free(net: ipaddress.IPv4Network) -> bool:
        return net != first and not any(net.overlaps(u) for u in used_nets)

    want = _valid_preferred(preferred, pool, mask)
    if want is not None and free(want):
        return str(want)
    for net in pool.subnets(new_prefix=mask):
        if free(net):
            return str(net)
    return None


def should_release(node: str, registrations: Mapping[str, object], k8s_nodes: Iterable[str]) -> bool:
    """Only when both the Node object and the agent's registration are gone: an agent
    restart (registration lease briefly expired) must not move a node to another CIDR."""
    return node not in registrations and node not in set(k8s_nodes)


@dataclass
class PodCIDRState:
    registrations: dict[str, dict] = field(default_factory=dict)  # node -> registration
    k8s_nodes: set[str] = field(default_factory=set)
    podcidrs: dict[str, str] = field(default_factory=dict)  # node -> cidr
    claims: dict[str, str] = field(default_factory=dict)  # cidr -> node
    errors: dict[str, str] = field(default_factory=dict)  # node -> message


@dataclass
class PodCIDRPlan:
    allocate: dict[str, str] = field(default_factory=dict)  # node -> new cidr to claim
    adopt: dict[str, str] = field(default_factory=dict)  # node -> claimed cidr lacking podcidrs
    release: list[str] = field(default_factory=list)  # nodes whose allocation goes
    drop_claims: dict[str, str] = field(default_factory=dict)  # cidr -> node: orphan claims
    restore_claims: dict[str, str] = field(default_factory=dict)  # cidr -> node
    errors: dict[str, str] = field(default_factory=dict)  # node -> message to publish
    clear_errors: list[str] = field(default_factory=list)

    def empty(self) -> bool:
        return not (self.allocate or self.adopt or self.release or self.drop_claims
                    or self.restore_claims or self.errors or self.clear_errors)


def plan_pod_cidrs(state: PodCIDRState, cluster_cidr: str = DEFAULT_CLUSTER_CIDR,
                   mask: int = DEFAULT_MASK) -> PodCIDRPlan:
    pool = check_pool(cluster_cidr, mask)
    plan = PodCIDRPlan()
    regs, k8s = state.registrations, state.k8s_nodes
    used: set[str] = set(state.claims) | set(state.podcidrs.values())
    want_errors: dict[str, str] = {}

    for node, cidr in sorted(state.podcidrs.items()):
        if should_release(node, regs, k8s):
            plan.release.append(node)
            continue
        owner = state.claims.get(cidr)
        if owner is None:
            plan.restore_claims[cidr] = node
        elif owner != node:
            want_errors[node] = f"pod CIDR {cidr} of node {node} is claimed by node {owner}"

    adopting: set[str] = set()
    for cidr, node in sorted(state.claims.items(), key=lambda kv: _net_key(kv[0])):
        have = state.podcidrs.get(node)
        if have == cidr:
            continue
        if have is not None or should_release(node, regs, k8s) or node in adopting:
            # Left over from a lost race, a crash mid-allocation or a released node.
            plan.drop_claims[cidr] = node
            continue
        plan.adopt[node] = cidr
        adopting.add(node)

    pending = [n for n in sorted(regs) if n not in state.podcidrs and n not in adopting]
    preferred = {n: regs[n].get("preferredPodCIDR") for n in pending if isinstance(regs[n], dict)}
    # Honour preferences before handing out lowest-free CIDRs, so a node that asks for
    # the CIDR it had before a restart does not lose it to a newcomer in the same pass.
    for node in sorted(pending, key=lambda n: (not _valid_preferred(preferred.get(n), pool, mask), n)):
        cidr = pick_pod_cidr(pool, mask, used, preferred.get(node))
        if cidr is None:
            want_errors[node] = (f"pod CIDR pool {pool} is exhausted: no free /{mask} for node {node} "
                                 f"({len(used)} in use)")
            continue
        plan.allocate[node] = cidr
        used.add(cidr)

    for node, msg in want_errors.items():
        if state.errors.get(node) != msg:
            plan.errors[node] = msg
    plan.clear_errors = sorted(n for n in state.errors if n not in want_errors)
    return plan


def _net_key(cidr: str):
    try:
        n = ipaddress.IPv4Network(cidr, strict=False)
        return (int(n.network_address), n.prefixlen)
    except ValueError:
        return (1 << 33, 0)


def _json(value: bytes) -> dict:
    try:
        d = json.loads(value)
    except ValueError:
        return {}
    return d if isinstance(d, dict) else {}


def _enc(d: dict) -> bytes:
    return json.dumps(d, sort_keys=True, separators=(",", ":")).encode()


class PodCIDRAllocator:
    """Executes plan_pod_cidrs against the store; safe to run in several operators."""

    def __init__(self, store: Store, cluster_cidr: str = DEFAULT_CLUSTER_CIDR, mask: int = DEFAULT_MASK) -> None:
        check_pool(cluster_cidr, mask)
        self.store = store
        self.cluster_cidr = cluster_cidr
        self.mask = mask
        self._kvs: dict[str, KV] = {}

    async def snapshot(self) -> PodCIDRState:
        # ipam first: a node registered after this read is simply handled next pass,
        # whereas reading nodes first could make a fresh claim look orphaned.
        ipam, _ = await self.store.list(IPAM_PREFIX)
        nodes, _ = await self.store.list(NODES_PREFIX)
        k8s, _ = await self.store.list(K8S_NODES_PREFIX)
        st = PodCIDRState()
        self._kvs = {kv.key: kv for kv in ipam}
        for kv in nodes:
            name = kv.key[len(NODES_PREFIX):]
            if name and "/" not in name:
                st.registrations[name] = _json(kv.value)
        st.k8s_nodes = {kv.key[len(K8S_NODES_PREFIX):] for kv in k8s if "/" not in kv.key[len(K8S_NODES_PREFIX):]}
        for kv in ipam:
            if kv.key.startswith(PODCIDRS_PREFIX):
                cidr = _json(kv.value).get("cidr")
                if isinstance(cidr, str):
                    st.podcidrs[kv.key[len(PODCIDRS_PREFIX):]] = cidr
            elif kv.key.startswith(CLAIMS_PREFIX):
                node = _json(kv.value).get("node")
                if isinstance(node, str):
                    st.claims[cidr_of_claim_key(kv.key)] = node
            elif kv.key.startswith(ERRORS_PREFIX):
                st.errors[kv.key[len(ERRORS_PREFIX):]] = str(_json(kv.value).get("error", ""))
        return st

    async def reconcile(self) -> tuple[PodCIDRPlan, bool]:
        """One pass; returns the plan and whether every step applied cleanly (False: a
        concurrent writer got in between and another pass is needed)."""
        state = await self.snapshot()
        plan = plan_pod_cidrs(state, self.cluster_cidr, self.mask)
        clean = True
        for node in plan.release:
            clean &= await self._release(node, state)
        for cidr, node in plan.drop_claims.items():
            clean &= await self._drop_claim(cidr, node, state)
        for cidr, node in plan.restore_claims.items():
            if await self.store.cas(claim_key(cidr), _enc({"node": node}), 0):
                log.info("restored claim of %s for node %s", cidr, node)
            else:
                clean = False
        for node, cidr in plan.adopt.items():
            clean &= await self._adopt(node, cidr)
        for node, cidr in plan.allocate.items():
            clean &= await self._allocate(node, cidr, state)
        for node, msg in plan.errors.items():
            log.error("%s", msg)
            await self.store.put(error_key(node), _enc({"error": msg, "time": round(time.time(), 3)}))
        for node in plan.clear_errors:
            kv = self._kvs.get(error_key(node))
            if kv is not None:
                await self.store.cas_delete(kv.key, kv.mod_revision)
        return plan, clean

    async def _gone(self, node: str) -> bool:
        # The snapshot may be a moment old; re-read before deleting anything.
        return (await self.store.get(NODES_PREFIX + node) is None
                and await self.store.get(K8S_NODES_PREFIX + node) is None)

    async def _release(self, node: str, state: PodCIDRState) -> bool:
        if not await self._gone(node):
            return False
        kv = self._kvs.get(podcidr_key(node))
        # podcidrs first: while the claim remains, nobody else can get the CIDR.
        if kv is not None and not await self.store.cas_delete(kv.key, kv.mod_revision):
            return False
        cidr = state.podcidrs.get(node)
        log.info("released pod CIDR %s of node %s (Node object and registration are gone)", cidr, node)
        ok = True
        if cidr is not None and state.claims.get(cidr) == node:
            ok = await self._delete_claim_of(cidr, node)
        return ok

    async def _drop_claim(self, cidr: str, node: str, state: PodCIDRState) -> bool:
        releasing = node not in state.podcidrs and should_release(node, state.registrations, state.k8s_nodes)
        if releasing and not await self._gone(node):
            return False
        kv = self._kvs.get(claim_key(cidr))
        if kv is None:
            return True
        # CAS at the snapshot's revision: an adopter touches the claim first, so a claim
        # that is being adopted right now is not dropped.
        if await self.store.cas_delete(kv.key, kv.mod_revision):
            log.info("dropped orphan claim of %s for node %s", cidr, node)
            return True
        return False

    async def _delete_claim_of(self, cidr: str, node: str) -> bool:
        kv = await self.store.get(claim_key(cidr))
        if kv is None:
            return True
        if _json(kv.value).get("node") != node:
            return True
        return await self.store.cas_delete(kv.key, kv.mod_revision)

    async def _adopt(self, node: str, cidr: str) -> bool:
        kv = self._kvs.get(claim_key(cidr))
        if kv is None:
            return False
        if not await self.store.cas(kv.key, _enc({"node": node, "bound": True}), kv.mod_revision):
            return False
        if await self.store.cas(podcidr_key(node), _enc({"cidr": cidr}), 0):
            log.info("allocated pod CIDR %s to node %s (from its claim)", cidr, node)
            await self._clear_error(node)
            return True
        return False

    async def _allocate(self, node: str, cidr: str, state: PodCIDRState) -> bool:
        if not await self.store.cas(claim_key(cidr), _enc({"node": node}), 0):
            log.debug("claim of %s for %s lost to a concurrent operator", cidr, node)
            return False
        if not await self.store.cas(podcidr_key(node), _enc({"cidr": cidr}), 0):
            await self._delete_claim_of(cidr, node)
            return False
        pref = state.registrations.get(node, {}).get("preferredPodCIDR")
        log.info("allocated pod CIDR %s to node %s%s", cidr, node,
                 "" if not pref else (" (preferred)" if pref == cidr else f" (preferred {pref} unavailable)"))
        await self._clear_error(node)
        return True

    async def _clear_error(self, node: str) -> None:
        if error_key(node) in self._kvs:
            await self.store.delete(error_key(node))

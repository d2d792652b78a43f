"""Service address allocation as pure functions: ClusterIPs, NodePorts, LoadBalancer IPs.

Every handed-out value has a claim key in the store (CAS-created, value {namespace, name,
uid}); the claim is the lock, the Service object is what everybody reads. The planner takes
the claims and the services and says, per service, what its spec/status should become and
which claims must be created first; it never frees anything (see unused_claims).

Key layout:
  /cilia/services/v1/clusterips/<ip>      claim of a ClusterIP
  /cilia/services/v1/nodeports/<port>     claim of a NodePort (all protocols)
  /cilia/services/v1/lbips/<ip>           claim of a LoadBalancer ingress IP
"""
from __future__ import annotations

import copy
import ipaddress
from dataclasses import dataclass, field
from typing import Iterator, Mapping

from cilia.k8s.services import (ADDRESSES_ALLOCATED, HEADLESS, IP_REQUEST_SATISFIED,
                                LB_IPS_ANNOTATION, NODE_PORT_MAX, NODE_PORT_MIN)

ALLOC_PREFIX = "/cilia/services/v1/"
CLUSTER_IPS = "clusterips"
NODE_PORTS = "nodeports"
LB_IPS = "lbips"
CLAIM_KINDS = (CLUSTER_IPS, NODE_PORTS, LB_IPS)

DEFAULT_SERVICE_CIDR = "10.96.0.0/16"
DEFAULT_LB_POOL = "172.30.0.0/24"

ServiceKey = tuple[str, str]
# kind -> value ("10.96.0.1" or "30080") -> owner {"namespace", "name", "uid"}
Claims = Mapping[str, Mapping[str, dict]]


def claim_key(kind: str, value: str | int) -> str:
    return f"{ALLOC_PREFIX}{kind}/{value}"


def parse_claim_key(key: str) -> tuple[str, str] | None:
    rest = key[len(ALLOC_PREFIX):] if key.startswith(ALLOC_PREFIX) else ""
    kind, _, value = rest.partition("/")
    return (kind, value) if kind in CLAIM_KINDS and value else None


@dataclass(frozen=True)
class Ranges:
    service_cidr: str = DEFAULT_SERVICE_CIDR
    lb_pool: str = DEFAULT_LB_POOL
    node_port_min: int = NODE_PORT_MIN
    node_port_max: int = NODE_PORT_MAX

    def __post_init__(self) -> None:
        for cidr in (self.service_cidr, self.lb_pool):
            net = ipaddress.IPv4Network(cidr, strict=True)
            if net.num_addresses < 4:
                raise ValueError(f"{cidr}: too small to allocate from")


def usable(ip: str, cidr: str) -> bool:
    """Inside the range and neither its network nor its broadcast address."""
    try:
        addr = ipaddress.IPv4Address(ip)
    except ValueError:
        return False
    net = ipaddress.IPv4Network(cidr)
    return addr in net and addr not in (net.network_address, net.broadcast_address)


def free_ips(cidr: str, taken: set[str]) -> Iterator[str]:
    """Lowest free first: deterministic, so tests and humans can predict addresses."""
    net = ipaddress.IPv4Network(cidr)
    for addr in net.hosts():
        s = str(addr)
        if s not in taken:
            yield s


def free_ports(lo: int, hi: int, taken: set[str]) -> Iterator[int]:
    for p in range(lo, hi + 1):
        if str(p) not in taken:
            yield p


def owner_of(svc: dict) -> dict:
    md = svc.get("metadata") or {}
    return {"namespace": md.get("namespace") or "default", "name": md.get("name"), "uid": md.get("uid")}


def requested_lb_ips(svc: dict) -> list[str]:
    spec = svc.get("spec") or {}
    ann = ((svc.get("metadata") or {}).get("annotations") or {}).get(LB_IPS_ANNOTATION)
    ips = [ip.strip() for ip in ann.split(",") if ip.strip()] if ann else []
    if spec.get("loadBalancerIP") and spec["loadBalancerIP"] not in ips:
        ips.append(spec["loadBalancerIP"])
    return ips


def wants_node_ports(svc: dict) -> bool:
    spec = svc.get("spec") or {}
    t = spec.get("type", "ClusterIP")
    return t == "NodePort" or (t == "LoadBalancer" and spec.get("allocateLoadBalancerNodePorts", True))


def used_values(services: Mapping[ServiceKey, dict], claims: Claims) -> dict[str, set[str]]:
    """Everything in use: claimed, or written into a service (requested, not yet claimed)."""
    used = {k: set(claims.get(k, {})) for k in CLAIM_KINDS}
    for svc in services.values():
        spec = svc.get("spec") or {}
        if spec.get("clusterIP") and spec["clusterIP"] != HEADLESS:
            used[CLUSTER_IPS].add(spec["clusterIP"])
        for p in spec.get("ports") or []:
            if p.get("nodePort"):
                used[NODE_PORTS].add(str(p["nodePort"]))
        for i in ((svc.get("status") or {}).get("loadBalancer") or {}).get("ingress") or []:
            if i.get("ip"):
                used[LB_IPS].add(i["ip"])
        used[LB_IPS].update(requested_lb_ips(svc))
    return used


@dataclass
class Allocation:
    key: ServiceKey
    obj: dict                                   # the service as it should be
    changed: bool
    claims: list[tuple[str, str]] = field(default_factory=list)   # (kind, value) to CAS-create
    problems: list[str] = field(default_factory=list)


class _Planner:
    def __init__(self, services: Mapping[ServiceKey, dict], claims: Claims, ranges: Ranges, now: str):
        self.services, self.claims, self.ranges, self.now = services, claims, ranges, now
        self.used = used_values(services, claims)
        self.free_cip = free_ips(ranges.service_cidr, self.used[CLUSTER_IPS])
        self.free_np = free_ports(ranges.node_port_min, ranges.node_port_max, self.used[NODE_PORTS])
        self.free_lb = free_ips(ranges.lb_pool, self.used[LB_IPS])

    def _owned(self, kind: str, uid: str) -> list[str]:
        return sorted(v for v, o in self.claims.get(kind, {}).items() if o.get("uid") == uid)

    def _take(self, kind: str, value: str, uid: str, alloc: Allocation) -> str | None:
        """Claim `value` for uid; None when fine, else who holds it."""
        owner = self.claims.get(kind, {}).get(value)
        if owner is None:
            alloc.claims.append((kind, value))
            return None
        if owner.get("uid") == uid:
            return None
        return f"{owner.get('namespace')}/{owner.get('name')}"

    def _next(self, kind: str, it: Iterator) -> str | None:
        for v in it:
            v = str(v)
            if v not in self.used[kind]:
                self.used[kind].add(v)
                return v
        return None

    def cluster_ip(self, svc: dict, uid: str, alloc: Allocation) -> None:
        spec = svc["spec"]
        cip = spec.get("clusterIP")
        if cip == HEADLESS:
            return
        if cip:
            if not usable(cip, self.ranges.service_cidr):
                alloc.problems.append(f"spec.clusterIP {cip} is outside the service range "
                                      f"{self.ranges.service_cidr}")
                return
            holder = self._take(CLUSTER_IPS, cip, uid, alloc)
            if holder:
                alloc.problems.append(f"spec.clusterIP {cip} is already allocated to service {holder}")
            return
        owned = [ip for ip in self._owned(CLUSTER_IPS, uid) if usable(ip, self.ranges.service_cidr)]
        cip = owned[0] if owned else self._next(CLUSTER_IPS, self.free_cip)
        if cip is None:
            alloc.problems.append(f"service range {self.ranges.service_cidr} is exhausted")
            return
        if not owned:
            alloc.claims.append((CLUSTER_IPS, cip))
        spec["clusterIP"], spec["clusterIPs"] = cip, [cip]

    def node_ports(self, svc: dict, uid: str, alloc: Allocation) -> None:
        ports = svc["spec"].get("ports") or []
        if not wants_node_ports(svc):
            for p in ports:
                p.pop("nodePort", None)
            return
        in_spec = {str(p["nodePort"]) for p in ports if p.get("nodePort")}
        spare = [v for v in self._owned(NODE_PORTS, uid) if v not in in_spec]
        for p in ports:
            if p.get("nodePort"):
                value = str(p["nodePort"])
                holder = self._take(NODE_PORTS, value, uid, alloc)
                if holder:
                    alloc.problems.append(f"spec.ports nodePort {value} is already allocated to "
                                          f"service {holder}")
                continue
            value = spare.pop(0) if spare else self._next(NODE_PORTS, self.free_np)
            if value is None:
                alloc.problems.append(f"NodePort range {self.ranges.node_port_min}-"
                                      f"{self.ranges.node_port_max} is exhausted")
                return
            if (NODE_PORTS, value) not in alloc.claims and value not in self.claims.get(NODE_PORTS, {}):
                alloc.claims.append((NODE_PORTS, value))
            p["nodePort"] = int(value)

    def lb_ips(self, svc: dict, uid: str, alloc: Allocation) -> tuple[str, str, str] | None:
        """Sets status.loadBalancer; returns (status, reason, message) for IPRequestSatisfied."""
        status = svc.setdefault("status", {})
        if svc["spec"].get("type") != "LoadBalancer":
            status["loadBalancer"] = {}
            return None
        pool = self.ranges.lb_pool
        wanted = requested_lb_ips(svc)
        for ip in wanted:
            if not usable(ip, pool):
                status["loadBalancer"] = {}
                return "False", "out_of_range", f"requested IP {ip} is not in the LB pool {pool}"
            holder = self._take(LB_IPS, ip, uid, alloc)
            if holder:
                status["loadBalancer"] = {}
                return "False", "already_allocated", f"requested IP {ip} is allocated to service {holder}"
        if not wanted:
            current = [i["ip"] for i in (status.get("loadBalancer") or {}).get("ingress") or []
                       if i.get("ip") and usable(i["ip"], pool)
                       and (self.claims.get(LB_IPS, {}).get(i["ip"]) or {}).get("uid") == uid]
            owned = [ip for ip in self._owned(LB_IPS, uid) if usable(ip, pool)]
            ip = (current or owned or [None])[0] or self._next(LB_IPS, self.free_lb)
            if ip is None:
                status["loadBalancer"] = {}
                return "False", "no_pool", f"LB pool {pool} is exhausted"
            if not current and not owned:
                alloc.claims.append((LB_IPS, ip))
            wanted = [ip]
        status["loadBalancer"] = {"ingress": [{"ip": ip, "ipMode": "VIP"} for ip in wanted]}
        return "True", "satisfied", ""

    def plan(self, key: ServiceKey) -> Allocation:
        cur = self.services[key]
        svc = copy.deepcopy(cur)
        svc.setdefault("spec", {})
        svc.setdefault("status", {})
        uid = (svc.get("metadata") or {}).get("uid") or ""
        alloc = Allocation(key, svc, False)
        self.cluster_ip(svc, uid, alloc)
        self.node_ports(svc, uid, alloc)
        lb = self.lb_ips(svc, uid, alloc)
        alloc.claims = list(dict.fromkeys(alloc.claims))  # one nodePort for TCP and UDP
        conds = [c for c in svc["status"].get("conditions") or []
                 if c.get("type") not in (ADDRESSES_ALLOCATED, IP_REQUEST_SATISFIED)]
        old = {c.get("type"): c for c in svc["status"].get("conditions") or []}
        if alloc.problems:
            alloc.claims = []  # a service that cannot get everything claims nothing new
            conds.append(self._condition(old, ADDRESSES_ALLOCATED, "False", "AllocationFailed",
                                         "; ".join(alloc.problems)))
        if lb is not None:
            conds.append(self._condition(old, IP_REQUEST_SATISFIED, *lb))
        if conds:
            svc["status"]["conditions"] = conds
        else:
            svc["status"].pop("conditions", None)
        alloc.changed = _strip(svc) != _strip(cur)
        return alloc

    def _condition(self, old: dict, ctype: str, status: str, reason: str, message: str) -> dict:
        prev = old.get(ctype)
        if prev and (prev.get("status"), prev.get("reason"), prev.get("message")) == (status, reason, message):
            return prev
        return {"type": ctype, "status": status, "reason": reason, "message": message,
                "lastTransitionTime": (prev or {}).get("lastTransitionTime")
                if prev and prev.get("status") == status else self.now}


def _strip(obj: dict) -> dict:
    out = dict(obj)
    out["metadata"] = {k: v for k, v in (obj.get("metadata") or {}).items() if k != "resourceVersion"}
    return out


def plan_allocations(services: Mapping[ServiceKey, dict], claims: Claims, keys: list[ServiceKey],
                     ranges: Ranges = Ranges(), now: str = "") -> list[Allocation]:
    """Allocations for the services in `keys` (others only count as users of addresses)."""
    planner = _Planner(services, claims, ranges, now)
    return [planner.plan(k) for k in sorted(keys) if k in services]


def claim_unused(kind: str, value: str, owner: dict, svc: dict | None) -> bool:
    """Whether a claim may be deleted given its owner's current Service object (None: gone).

    A claim whose service has not yet written the value (the field is still unset) is kept:
    it is being allocated right now, by us or another operator, and will be adopted.
    """
    if svc is None or (svc.get("metadata") or {}).get("uid") != owner.get("uid"):
        return True
    spec = svc.get("spec") or {}
    if kind == CLUSTER_IPS:
        cip = spec.get("clusterIP")
        return cip == HEADLESS or bool(cip and cip != value)
    if kind == NODE_PORTS:
        if not wants_node_ports(svc):
            return True
        ports = spec.get("ports") or []
        if any(not p.get("nodePort") for p in ports):
            return False
        return all(str(p["nodePort"]) != value for p in ports)
    if spec.get("type") != "LoadBalancer":
        return True
    ingress = [i.get("ip") for i in ((svc.get("status") or {}).get("loadBalancer") or {}).get("ingress") or []]
    requested = requested_lb_ips(svc)
    if not ingress and not requested:
        return False
    return value not in ingress and value not in requested


def check_requested(svc: dict, cur: dict | None, services: Mapping[ServiceKey, dict], claims: Claims,
                    ranges: Ranges = Ranges()) -> str | None:
    """`cilia apply`'s up-front check of a requested ClusterIP/NodePorts: None when fine,
    else "field: message". `cur` is the stored version of the same service, if any."""
    spec = svc.get("spec") or {}
    uid = ((cur or {}).get("metadata") or {}).get("uid")
    me = ((svc.get("metadata") or {}).get("namespace") or "default", svc["metadata"]["name"])
    others = {k: v for k, v in services.items() if k != me}
    used = used_values(others, {k: {v: o for v, o in c.items() if not uid or o.get("uid") != uid}
                                for k, c in claims.items()})
    cip = spec.get("clusterIP")
    if cip and cip != HEADLESS:
        if not usable(cip, ranges.service_cidr):
            return (f"spec.clusterIP: Invalid value: \"{cip}\": provided IP is not in the valid range. "
                    f"The range of valid IPs is {ranges.service_cidr}")
        if cip in used[CLUSTER_IPS]:
            return f"spec.clusterIP: Invalid value: \"{cip}\": provided IP is already allocated"
    for i, p in enumerate(spec.get("ports") or []):
        if p.get("nodePort") and str(p["nodePort"]) in used[NODE_PORTS]:
            return f"spec.ports[{i}].nodePort: Invalid value: {p['nodePort']}: provided port is already allocated"
    return None

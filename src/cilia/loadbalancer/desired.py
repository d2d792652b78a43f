"""Service + EndpointSlices -> the frontends one node must program (pure; no I/O).

Scopes follow the datapath (src/cilia/datapath/lb.py): a frontend with one backend set
has only an "external" entry, used for both directions; an "internal" entry exists only
beside it, when east-west traffic must see a different set (Cilium's "two scopes").

Per service port:
- ClusterIP: one frontend; internalTrafficPolicy Local keeps this node's backends only.
- NodePort / LoadBalancer types: the nodePort on each of the node's addresses (node IP,
  router IP).
- LoadBalancer ingress IPs and spec.externalIPs on the service port.
- For those external frontends the external set follows externalTrafficPolicy (Local:
  this node's backends, local_only) and, when the two policies differ, an internal twin
  carries internalTrafficPolicy's set, so pods reaching a NodePort or LB IP from inside
  the cluster are not dropped on nodes without a local backend.
Only TCP and UDP ports are programmed (the datapath has no SCTP).
Backends: ready endpoints are active; not-ready endpoints that still serve while
terminating are kept in state terminating (used only when nothing active is left).
"""
from __future__ import annotations

from collections import defaultdict
from typing import Iterable, Sequence

from cilia.k8s.services import (ADDRESSES_ALLOCATED, HEADLESS, LB_ALGORITHM_ANNOTATION,
                                SERVICE_NAME_LABEL)

from .model import (KIND_CLUSTER_IP, KIND_EXTERNAL_IPS, KIND_LOAD_BALANCER, KIND_NODE_PORT,
                    PROTO_NUMBERS, SCOPE_INTERNAL, STATE_ACTIVE,
                    STATE_TERMINATING, Backend, Frontend, LBConfig, LBEntry, ServiceRef)

ServiceKey = tuple[str, str]  # (namespace, name)
DATAPATH_PROTOS = (PROTO_NUMBERS["TCP"], PROTO_NUMBERS["UDP"])


def service_key(obj: dict) -> ServiceKey:
    md = obj.get("metadata") or {}
    return md.get("namespace") or "default", md.get("name", "")


def slice_service(sl: dict) -> ServiceKey | None:
    md = sl.get("metadata") or {}
    name = (md.get("labels") or {}).get(SERVICE_NAME_LABEL)
    return (md.get("namespace") or "default", name) if name else None


def group_slices(slices: Iterable[dict]) -> dict[ServiceKey, list[dict]]:
    out: dict[ServiceKey, list[dict]] = defaultdict(list)
    for sl in slices:
        key = slice_service(sl)
        if key is not None and sl.get("addressType", "IPv4") == "IPv4":
            out[key].append(sl)
    return out


def endpoint_state(ep: dict) -> str | None:
    cond = ep.get("conditions") or {}
    # Kubernetes: an unset condition means "unknown", which consumers treat as ready.
    if cond.get("ready") is not False:
        return STATE_ACTIVE
    if cond.get("serving") and cond.get("terminating"):
        return STATE_TERMINATING
    return None


def service_backends(svc_port: dict, slices: Iterable[dict]) -> tuple[Backend, ...]:
    """Backends of one service port: slice ports are matched by name and protocol."""
    name, proto = svc_port.get("name") or "", svc_port.get("protocol", "TCP")
    found: dict[tuple[str, int, int], Backend] = {}
    for sl in slices:
        ports = [p for p in sl.get("ports") or []
                 if (p.get("name") or "") == name and p.get("protocol", "TCP") == proto
                 and p.get("port")]
        if not ports:
            continue
        number = ports[0]["port"]
        for ep in sl.get("endpoints") or []:
            state = endpoint_state(ep)
            if state is None:
                continue
            for addr in ep.get("addresses") or []:
                b = Backend(addr, number, PROTO_NUMBERS[proto], state, ep.get("nodeName") or "")
                k = (addr, number, b.proto)
                # The same address in two slices (a controller mid-move): active wins.
                if k not in found or (found[k].state != STATE_ACTIVE and state == STATE_ACTIVE):
                    found[k] = b
    return tuple(sorted(found.values()))


def _allocation_failed(svc: dict) -> bool:
    return any(c.get("type") == ADDRESSES_ALLOCATED and c.get("status") == "False"
               for c in (svc.get("status") or {}).get("conditions") or [])


def service_algorithm(svc: dict, cfg: LBConfig) -> str:
    if cfg.algorithm_annotation:
        ann = ((svc.get("metadata") or {}).get("annotations") or {}).get(LB_ALGORITHM_ANNOTATION)
        if ann and ann.lower() in ("maglev", "random"):
            return ann.lower()
    return cfg.algorithm


def service_entries(svc: dict, slices: Sequence[dict], node: str, node_ips: Sequence[str],
                    cfg: LBConfig = LBConfig()) -> list[LBEntry]:
    spec = svc.get("spec") or {}
    stype = spec.get("type", "ClusterIP")
    cluster_ip = spec.get("clusterIP") or ""
    if cluster_ip == HEADLESS or _allocation_failed(svc):
        return []
    ns, name = service_key(svc)
    etp = spec.get("externalTrafficPolicy") or "Cluster"
    itp = spec.get("internalTrafficPolicy") or "Cluster"
    affinity = 0
    if spec.get("sessionAffinity") == "ClientIP":
        affinity = int(((spec.get("sessionAffinityConfig") or {}).get("clientIP") or {})
                       .get("timeoutSeconds", 10800))
    algorithm = service_algorithm(svc, cfg)
    ingress = [i["ip"] for i in ((svc.get("status") or {}).get("loadBalancer") or {}).get("ingress") or []
               if i.get("ip")] if stype == "LoadBalancer" else []
    external_ips = list(spec.get("externalIPs") or [])
    out: list[LBEntry] = []
    for port in spec.get("ports") or []:
        proto = PROTO_NUMBERS[port.get("protocol", "TCP")]
        every = service_backends(port, slices)
        local = tuple(b for b in every if b.node == node)
        ref = ServiceRef(ns, name, port.get("name") or "")

        def entry(fe: Frontend, kind: str, backends: tuple[Backend, ...], local_only: bool) -> LBEntry:
            return LBEntry(fe, kind, backends, ref, algorithm, affinity, local_only, etp, itp)

        if proto not in DATAPATH_PROTOS:
            continue
        internal = local if itp == "Local" else every
        if cluster_ip:
            out.append(entry(Frontend(cluster_ip, port["port"], proto), KIND_CLUSTER_IP,
                             internal, itp == "Local"))
        external: list[tuple[Frontend, str]] = []
        if cfg.nodeport and stype in ("NodePort", "LoadBalancer") and port.get("nodePort"):
            external += [(Frontend(ip, port["nodePort"], proto), KIND_NODE_PORT) for ip in node_ips]
        external += [(Frontend(ip, port["port"], proto), KIND_LOAD_BALANCER) for ip in ingress]
        external += [(Frontend(ip, port["port"], proto), KIND_EXTERNAL_IPS) for ip in external_ips]
        for fe, kind in external:
            out.append(entry(fe, kind, local if etp == "Local" else every, etp == "Local"))
            if etp != itp:
                twin = Frontend(fe.address, fe.port, fe.proto, SCOPE_INTERNAL)
                out.append(entry(twin, kind, internal, itp == "Local"))
    return out


def desired_entries(services: Iterable[dict], slices: Iterable[dict], node: str,
                    node_ips: Sequence[str], cfg: LBConfig = LBConfig()) -> dict[Frontend, LBEntry]:
    """Every frontend this node must program. When two services claim one frontend (two
    services with the same externalIP and port), the first by namespace/name keeps it, as
    the result must not depend on the order objects arrived in."""
    by_service = group_slices(slices)
    out: dict[Frontend, LBEntry] = {}
    for svc in sorted(services, key=service_key):
        for e in service_entries(svc, by_service.get(service_key(svc), []), node, node_ips, cfg):
            out.setdefault(e.frontend, e)
    return out


def node_addresses(*ips: str | None) -> list[str]:
    """NodePort addresses (node IP, router IP, ...) in a stable order without duplicates."""
    out: list[str] = []
    for ip in ips:
        if ip and ip not in out:
            out.append(ip)
    return out

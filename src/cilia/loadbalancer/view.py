"""Cilium's REST shapes for services (GET /v1/service) and their one-line renderings."""
from __future__ import annotations

from .model import PROTO_NAMES, SCOPE_INTERNAL, LBEntry


def _proto(n: int) -> str:
    return PROTO_NAMES.get(n, str(n))


def service_model(entry: LBEntry, rev_nat: int) -> dict:
    """models.ServiceSpec: id, frontend-address, backend-addresses, flags."""
    fe = entry.frontend
    internal = fe.scope == SCOPE_INTERNAL
    return {
        "id": rev_nat,
        "frontend-address": {"ip": fe.address, "port": fe.port, "protocol": _proto(fe.proto),
                             "scope": fe.scope},
        "backend-addresses": [{"ip": b.address, "port": b.port, "protocol": _proto(b.proto),
                               "state": b.state, "nodeName": b.node, "weight": 100}
                              for b in entry.backends],
        "flags": {
            "type": entry.kind,
            "trafficPolicy": entry.int_traffic_policy if internal else entry.ext_traffic_policy,
            "extTrafficPolicy": entry.ext_traffic_policy,
            "intTrafficPolicy": entry.int_traffic_policy,
            "name": entry.service.name,
            "namespace": entry.service.namespace,
            "portName": entry.service.port_name,
            "healthCheckNodePort": 0,
            # Not in Cilium's model; there they are agent flags and BPF map contents.
            "lbAlgorithm": entry.algorithm,
            "sessionAffinityTimeoutSec": entry.affinity_timeout,
            "localOnly": entry.local_only,
        },
    }


def frontend_text(addr: dict) -> str:
    """FrontendAddress as `cilium service list` prints it; internal scope gets "/i"."""
    suffix = "/i" if addr.get("scope") == SCOPE_INTERNAL else ""
    return f"{addr.get('ip')}:{addr.get('port')}/{addr.get('protocol', 'TCP')}{suffix}"


def backend_text(index: int, b: dict) -> str:
    return f"{index} => {b.get('ip')}:{b.get('port')}/{b.get('protocol', 'TCP')} ({b.get('state', 'active')})"


def service_list_rows(services: list[dict]) -> list[list[str]]:
    """`cilium service list`: ID, Frontend, Service Type, Backend (one row per backend)."""
    rows = [["ID", "Frontend", "Service Type", "Backend"]]
    for svc in sorted(services, key=lambda s: (s.get("spec") or {}).get("id", 0)):
        spec = (svc.get("status") or {}).get("realized") or svc.get("spec") or {}
        backends = spec.get("backend-addresses") or []
        first = backend_text(1, backends[0]) if backends else ""
        rows.append([str(spec.get("id", "")), frontend_text(spec.get("frontend-address") or {}),
                     (spec.get("flags") or {}).get("type", ""), first])
        rows += [["", "", "", backend_text(i, b)] for i, b in enumerate(backends[1:], start=2)]
    return rows

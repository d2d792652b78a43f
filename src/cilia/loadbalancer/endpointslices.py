"""EndpointSlices a Service's selector implies (the endpointslice controller, pure).

Per matching pod with an IP: ready = Ready condition and not terminating (or the service
publishes not-ready addresses), serving = Ready condition, terminating = deletionTimestamp
set. Named targetPorts resolve per pod from its containers' ports, so pods that number a
port differently land in different slices (one slice per distinct port mapping, at most
MAX_PER_SLICE endpoints each). Names are deterministic, "<service>-<hash>", so two operators
computing the same slices write the same keys instead of duplicates.
"""
from __future__ import annotations

from collections import defaultdict
from typing import Iterable

from cilia.k8s.deployments import fnv32a, safe_encode
from cilia.k8s.selectors import selector_matches
from cilia.k8s.services import MANAGED_BY_LABEL, SERVICE_NAME_LABEL

MANAGED_BY = "endpointslice-controller.k8s.io"
MAX_PER_SLICE = 100   # kube-controller-manager's --max-endpoints-per-slice default
NAME_BASE_MAX = 52    # 63 - "-" - 10 hash characters

PortSig = tuple[tuple[str, int, str], ...]   # (name, port, protocol) per resolved service port


def pod_ready(pod: dict) -> bool:
    return any(c.get("type") == "Ready" and c.get("status") == "True"
               for c in (pod.get("status") or {}).get("conditions") or [])


def resolve_target_port(svc_port: dict, pod: dict) -> int | None:
    target = svc_port.get("targetPort", svc_port.get("port"))
    if isinstance(target, int):
        return target
    proto = svc_port.get("protocol", "TCP")
    for c in (pod.get("spec") or {}).get("containers") or []:
        for cp in c.get("ports") or []:
            if cp.get("name") == target and cp.get("protocol", "TCP") == proto:
                return cp.get("containerPort")
    return None


def selects(svc: dict, pod: dict) -> bool:
    sel = (svc.get("spec") or {}).get("selector") or {}
    md_s, md_p = svc.get("metadata") or {}, pod.get("metadata") or {}
    return (bool(sel) and (md_s.get("namespace") or "default") == (md_p.get("namespace") or "default")
            and selector_matches({"matchLabels": sel}, md_p.get("labels") or {}))


def endpoint_for(svc: dict, pod: dict) -> dict | None:
    status, md = pod.get("status") or {}, pod.get("metadata") or {}
    ip = status.get("podIP")
    if not ip or status.get("phase") in ("Succeeded", "Failed"):
        return None
    terminating = bool(md.get("deletionTimestamp"))
    serving = pod_ready(pod)
    publish = bool((svc.get("spec") or {}).get("publishNotReadyAddresses"))
    ep: dict = {
        "addresses": [ip],
        "conditions": {"ready": publish or (serving and not terminating), "serving": serving,
                       "terminating": terminating},
        "targetRef": {"kind": "Pod", "namespace": md.get("namespace") or "default",
                      "name": md.get("name"), "uid": md.get("uid")},
    }
    node = (pod.get("spec") or {}).get("nodeName")
    if node:
        ep["nodeName"] = node
    return ep


def port_signature(svc: dict, pod: dict) -> PortSig:
    out = []
    for p in (svc.get("spec") or {}).get("ports") or []:
        number = resolve_target_port(p, pod)
        if number:  # Kubernetes leaves a port out for a pod that does not name it
            out.append((p.get("name") or "", number, p.get("protocol", "TCP")))
    return tuple(out)


def slice_name(svc: dict, sig: PortSig, chunk: int) -> str:
    md = svc.get("metadata") or {}
    seed = f"{md.get('namespace')}/{md.get('name')}/{md.get('uid')}/{sig}/{chunk}"
    return f"{md.get('name', '')[:NAME_BASE_MAX]}-{safe_encode(str(fnv32a(seed.encode())).zfill(10))}"


def desired_slices(svc: dict, pods: Iterable[dict]) -> list[dict]:
    """The managed slices for one service ([] for a selector-less service)."""
    md = svc.get("metadata") or {}
    if not (svc.get("spec") or {}).get("selector"):
        return []
    has_ports = bool((svc.get("spec") or {}).get("ports"))
    groups: dict[PortSig, list[dict]] = defaultdict(list)
    for pod in pods:
        if not selects(svc, pod):
            continue
        ep = endpoint_for(svc, pod)
        if ep is None:
            continue
        sig = port_signature(svc, pod)
        if has_ports and not sig:
            continue
        groups[sig].append(ep)
    ns = md.get("namespace") or "default"
    owner = {"apiVersion": "v1", "kind": "Service", "name": md.get("name"), "uid": md.get("uid"),
             "controller": True, "blockOwnerDeletion": True}
    out = []
    for sig in sorted(groups):
        eps = sorted(groups[sig], key=lambda e: tuple(int(x) for x in e["addresses"][0].split(".")))
        for chunk in range(0, len(eps), MAX_PER_SLICE):
            out.append({
                "apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice",
                "metadata": {"name": slice_name(svc, sig, chunk // MAX_PER_SLICE), "namespace": ns,
                             "labels": {SERVICE_NAME_LABEL: md.get("name"), MANAGED_BY_LABEL: MANAGED_BY},
                             "ownerReferences": [owner]},
                "addressType": "IPv4",
                "endpoints": eps[chunk:chunk + MAX_PER_SLICE],
                "ports": [{"name": n, "port": p, "protocol": proto} for n, p, proto in sig],
            })
    return out


def is_managed(sl: dict) -> bool:
    return ((sl.get("metadata") or {}).get("labels") or {}).get(MANAGED_BY_LABEL) == MANAGED_BY


def same_slice(a: dict, b: dict) -> bool:
    """Equal in everything the controller owns (server fields like uid do not count)."""
    def core(s: dict) -> tuple:
        md = s.get("metadata") or {}
        return (s.get("addressType"), s.get("endpoints"), s.get("ports"), md.get("labels"),
                md.get("ownerReferences"))
    return core(a) == core(b)

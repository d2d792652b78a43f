"""API shapes that follow Cilium's REST models (field names as cilium-dbg prints with -o json)."""
from __future__ import annotations

from cilia.endpoint.model import Endpoint


def endpoint_labels(ep: Endpoint) -> list[str]:
    """The identity's labels (source:key=value, filtered as Cilium does) when the endpoint has
    one; otherwise the pod's own labels."""
    if ep.identity_labels:
        return list(ep.identity_labels)
    out = [f"k8s:{k}={v}" for k, v in sorted(ep.labels.items())]
    if ep.pod_namespace:
        out.append(f"k8s:io.kubernetes.pod.namespace={ep.pod_namespace}")
    return sorted(out)


def endpoint_model(ep: Endpoint, node: str, policy: dict | None = None) -> dict:
    return {
        "id": ep.id,
        "spec": {"label-configuration": {"user": []}, "options": {}},
        "status": {
            "state": ep.state,
            "external-identifiers": {
                "container-id": ep.container_id,
                "k8s-namespace": ep.pod_namespace,
                "k8s-pod-name": ep.pod_name,
                "pod-name": f"{ep.pod_namespace}/{ep.pod_name}" if ep.pod_name else "",
                "cni-attachment-id": f"{ep.container_id}:{ep.ifname}",
                "netns": ep.netns,
            },
            "identity": {"id": ep.identity, "labels": endpoint_labels(ep)},
            "labels": {"security-relevant": endpoint_labels(ep)},
            "networking": {
                "addressing": [{"ipv4": ep.ip4}],
                "host-mac": ep.host_mac,
                "interface-index": ep.host_ifindex,
                "interface-name": ep.host_ifname,
                "mac": ep.pod_mac,
                "node": node,
            },
            "policy": {
                "realized": policy or {"policy-enabled": "none"},
                "proxy-statistics": [],
            },
        },
    }

"""What the suite deploys: the test workloads and cilium-cli's policy manifests, adapted.

Adapted means: the namespace is the test namespace, and what cilium-cli points at the
internet (1.1.1.1 / 1.0.0.1, port 443) points at the lab's world host and a second address
on it (the lab has no internet). DNS rules are kept as cilium-cli writes them: they select
nothing here, which is harmless and keeps the manifests recognisable.
"""
from __future__ import annotations

from string import Template

CLIENT_IMAGE = "quay.io/cilium/alpine-curl:v1.10.0"
ECHO_IMAGE = "quay.io/cilium/json-mock:v1.3.8"
ECHO_PORT = 8080

# name -> (labels, role); roles decide node placement.
CLIENTS = {
    "client": {"name": "client", "kind": "client"},
    "client2": {"name": "client2", "kind": "client", "other": "client"},
}
ECHOS = {
    "echo-same-node": {"name": "echo-same-node", "kind": "echo", "other": "echo"},
    "echo-other-node": {"name": "echo-other-node", "kind": "echo"},
}


def _labels(d: dict) -> str:
    return "{" + ", ".join(f"{k}: {v}" for k, v in d.items()) + "}"


def _deployment(ns: str, name: str, labels: dict, node: str, image: str, ports: bool) -> str:
    port_spec = (f"\n        ports: [{{containerPort: {ECHO_PORT}, name: http}}]" if ports else "")
    return f"""apiVersion: apps/v1
kind: Deployment
metadata:
  name: {name}
  namespace: {ns}
  labels: {_labels({"name": name, "kind": labels["kind"]})}
spec:
  replicas: 1
  selector: {{matchLabels: {{name: {name}}}}}
  template:
    metadata:
      labels: {_labels(labels)}
    spec:
      nodeName: {node}
      containers:
      - name: {name}
        image: {image}{port_spec}
"""


def _service(ns: str, name: str) -> str:
    return f"""apiVersion: v1
kind: Service
metadata:
  name: {name}
  namespace: {ns}
  labels: {_labels({"name": name, "kind": "echo"})}
spec:
  type: NodePort
  selector: {{name: {name}}}
  ports:
  - {{name: http, port: {ECHO_PORT}, targetPort: {ECHO_PORT}}}
"""


def workloads(ns: str, node: str, other_node: str | None) -> str:
    """client, client2 and echo-same-node on `node`; echo-other-node on `other_node`."""
    docs = [f"apiVersion: v1\nkind: Namespace\nmetadata:\n  name: {ns}\n"
            f"  labels: {{app.kubernetes.io/part-of: cilia-connectivity-test}}\n"]
    for name, labels in CLIENTS.items():
        docs.append(_deployment(ns, name, labels, node, CLIENT_IMAGE, ports=False))
    placement = {"echo-same-node": node, "echo-other-node": other_node}
    for name, labels in ECHOS.items():
        if placement[name] is None:
            continue
        docs.append(_deployment(ns, name, labels, placement[name], ECHO_IMAGE, ports=True))
        docs.append(_service(ns, name))
    return "---\n".join(docs)


def echo_names(multi_node: bool) -> list[str]:
    return [n for n in ECHOS if multi_node or n == "echo-same-node"]


# --- policies (cilium-cli connectivity/manifests, adapted) ----------------------------------

_DNS_EGRESS = """  - toPorts:
    - ports:
      - port: "53"
        protocol: ANY
    toEndpoints:
    - matchExpressions:
      - { key: 'k8s-app', operator: In, values: [ "kube-dns", "coredns", "node-local-dns", "nodelocaldns" ] }
      - { key: 'io.kubernetes.pod.namespace', operator: In, values: [ "kube-system" ] }
"""

POLICIES: dict[str, str] = {
    "allow-all-except-world": """apiVersion: cilium.io/v2
kind: CiliumNetworkPolicy
metadata:
  name: allow-all-except-world
  namespace: ${NS}
spec:
  endpointSelector: {}
  egress:
  - toEntities:
    - host
    - remote-node
    - cluster
    - init
    - health
    - kube-apiserver
  - toEndpoints:
      - {}
  ingress:
  - fromEntities:
    - host
    - remote-node
    - cluster
    - init
    - health
    - kube-apiserver
  - fromEndpoints:
    - {}
""",
    "allow-all-egress": """apiVersion: cilium.io/v2
kind: CiliumNetworkPolicy
metadata:
  name: allow-all-egress
  namespace: ${NS}
spec:
  endpointSelector: {}
  egress:
  - toEndpoints:
    - {}
  - toEntities:
      - world
""",
    "allow-all-ingress": """apiVersion: cilium.io/v2
kind: CiliumNetworkPolicy
metadata:
  name: allow-all-ingress
  namespace: ${NS}
spec:
  endpointSelector: {}
  ingress:
  - fromEndpoints:
    - {}
  - fromEntities:
    - world
""",
    "client-ingress-from-client2": """apiVersion: cilium.io/v2
kind: CiliumNetworkPolicy
metadata:
  name: client-ingress-from-client2
  namespace: ${NS}
spec:
  endpointSelector:
    matchLabels:
      kind: client
  ingress:
  - fromEndpoints:
    - matchLabels:
        k8s:other: client
""",
    "echo-ingress-from-other-client": """apiVersion: cilium.io/v2
kind: CiliumNetworkPolicy
metadata:
  name: echo-ingress-from-other-client
  namespace: ${NS}
spec:
  description: "Allow other client to contact echo"
  endpointSelector:
    matchLabels:
      kind: echo
  ingress:
  - fromEndpoints:
    - matchLabels:
        k8s:other: client
""",
    "client-egress-to-echo": """apiVersion: cilium.io/v2
kind: CiliumNetworkPolicy
metadata:
  name: client-egress-to-echo
  namespace: ${NS}
spec:
  endpointSelector:
    matchLabels:
      kind: client
  egress:
  - toPorts:
    - ports:
      - port: "8080"
        protocol: TCP
    toEndpoints:
    - matchLabels:
        io.kubernetes.pod.namespace: ${NS}
        kind: echo
""" + _DNS_EGRESS,
    "client-egress-to-echo-expression": """apiVersion: cilium.io/v2
kind: CiliumNetworkPolicy
metadata:
  name: client-egress-to-echo-expression
  namespace: ${NS}
spec:
  endpointSelector:
    matchExpressions:
    - { key: 'kind', operator: In, values: [ "client" ] }
  egress:
  - toPorts:
    - ports:
      - port: "8080"
        protocol: TCP
    toEndpoints:
    - matchExpressions:
      - { key: 'io.kubernetes.pod.namespace', operator: In, values: [ "${NS}" ] }
      - { key: 'kind', operator: In, values: [ "echo" ] }
""" + _DNS_EGRESS,
    "deny-all-ingress": """apiVersion: cilium.io/v2
kind: CiliumNetworkPolicy
metadata:
  name: all-ingress-deny
  namespace: ${NS}
spec:
  endpointSelector: {}
  ingress:
  - {}
""",
    "deny-all-egress": """apiVersion: cilium.io/v2
kind: CiliumNetworkPolicy
metadata:
  name: all-egress-deny
  namespace: ${NS}
spec:
  endpointSelector: {}
  egress:
  - {}
""",
    "deny-all-entities": """apiVersion: cilium.io/v2
kind: CiliumNetworkPolicy
metadata:
  name: all-entities-deny
  namespace: ${NS}
spec:
  endpointSelector: {}
  egressDeny:
  - toEntities:
    - all
""",
    "allow-cluster-entity": """apiVersion: cilium.io/v2
kind: CiliumNetworkPolicy
metadata:
  name: client-egress-to-cluster
  namespace: ${NS}
spec:
  endpointSelector:
    matchLabels:
      kind: client
  egress:
  - toEntities:
    - cluster
""",
    "allow-host-entity-egress": """apiVersion: cilium.io/v2
kind: CiliumNetworkPolicy
metadata:
  name: client-egress-to-host
  namespace: ${NS}
spec:
  endpointSelector:
    matchLabels:
      kind: client
  egress:
  - toEntities:
    - host
""",
    "client-egress-to-entities-world": """apiVersion: cilium.io/v2
kind: CiliumNetworkPolicy
metadata:
  name: client-egress-to-entities-world
  namespace: ${NS}
spec:
  endpointSelector:
    matchLabels:
      kind: client
  egress:
  - toEntities:
    - world
    toPorts:
    - ports:
      - port: "80"
        protocol: TCP
""" + _DNS_EGRESS,
    # cilium-cli's to-cidr-1111: 1.0.0.0/8 except 1.0.0.1/32; here the world host's /24
    # except the second world address.
    "client-egress-to-cidr-external": """apiVersion: cilium.io/v2
kind: CiliumNetworkPolicy
metadata:
  name: client-egress-to-cidr
  namespace: ${NS}
spec:
  endpointSelector:
    matchLabels:
      kind: client
  egress:
  - toCIDRSet:
    - cidr: ${EXTERNAL_CIDR}
      except:
      - ${EXTERNAL_OTHER_IP}/32
""" + _DNS_EGRESS,
    "client-egress-to-echo-deny": """apiVersion: cilium.io/v2
kind: CiliumNetworkPolicy
metadata:
  name: client-egress-to-echo-deny
  namespace: ${NS}
spec:
  endpointSelector:
    matchLabels:
      kind: client
  egressDeny:
  - toPorts:
    - ports:
      - port: "8080"
        protocol: TCP
    toEndpoints:
    - matchLabels:
        io.kubernetes.pod.namespace: ${NS}
        kind: echo
""",
    "echo-ingress-from-other-client-deny": """apiVersion: cilium.io/v2
kind: CiliumNetworkPolicy
metadata:
  name: echo-ingress-from-other-client-deny
  namespace: ${NS}
spec:
  endpointSelector:
    matchLabels:
      kind: echo
  ingressDeny:
  - fromEndpoints:
    - matchLabels:
        other: client
""",
}


def render_policy(name: str, params: dict[str, str]) -> str:
    return Template(POLICIES[name]).substitute(params)

"""The lab's address plan and names (design.md §2). Pure data: no syscalls here."""
from __future__ import annotations

import ipaddress
import re
from dataclasses import asdict, dataclass, field

NODE_NET = ipaddress.IPv4Network("172.29.0.0/16")
FABRIC_ROUTER = "172.29.0.1"
POD_POOL = ipaddress.IPv4Network("10.244.0.0/16")
SERVICE_NET = "10.96.0.0/16"
# LoadBalancer pool (172.30.0.0/24, the operator's default) and room for externalIPs.
SERVICE_EXTERNAL_NET = "172.30.0.0/16"
WORLD_NET = ipaddress.IPv4Network("198.51.100.0/24")
WORLD_GATEWAY = "198.51.100.1"
WORLD_HOST = "198.51.100.100"
UNDERLAY_MTU = 1500
VXLAN_OVERHEAD = 50

NAME_RE = re.compile(r"^[a-z][a-z0-9]{0,9}$")
MAX_NODES = 200


class TopologyError(ValueError):
    pass


def validate_name(name: str) -> str:
    # Short and plain: it prefixes netns names, pin paths and sockets.
    if not NAME_RE.match(name):
        raise TopologyError(f"lab name {name!r}: must be 1-10 lowercase letters/digits, "
                            "starting with a letter")
    return name


@dataclass
class NodeSpec:
    name: str
    index: int
    ip: str
    pod_cidr: str
    netns: str
    fabric_ifname: str

    @property
    def router_ip(self) -> str:
        return str(next(ipaddress.IPv4Network(self.pod_cidr).hosts()))


@dataclass
class LabSpec:
    name: str
    routing: str = "tunnel"
    store: str = "local"
    nodes: list[NodeSpec] = field(default_factory=list)

    @property
    def fabric_netns(self) -> str:
        return f"{self.name}-fabric"

    @property
    def world_netns(self) -> str:
        return f"{self.name}-world"

    @property
    def pod_mtu(self) -> int:
        # design.md §8: 1500 everywhere fragments the VXLAN outer packets (6x slower).
        return UNDERLAY_MTU - VXLAN_OVERHEAD if self.routing == "tunnel" else UNDERLAY_MTU

    def pod_netns(self, namespace: str, pod: str) -> str:
        return f"{self.name}-{namespace}-{pod}"

    def node(self, name: str) -> NodeSpec:
        for n in self.nodes:
            if n.name == name:
                return n
        raise KeyError(name)

    def to_json(self) -> dict:
        return asdict(self)

    @classmethod
    def from_json(cls, d: dict) -> "LabSpec":
        nodes = [NodeSpec(**n) for n in d.get("nodes", [])]
        return cls(name=d["name"], routing=d.get("routing", "tunnel"),
                   store=d.get("store", "local"), nodes=nodes)


def node_spec(lab: str, index: int) -> NodeSpec:
    if not 1 <= index <= MAX_NODES:
        raise TopologyError(f"node index {index} out of range 1..{MAX_NODES}")
    return NodeSpec(name=f"node{index}", index=index,
                    ip=str(NODE_NET.network_address + 10 + index),
                    pod_cidr=f"10.244.{index}.0/24", netns=f"{lab}-node{index}",
                    fabric_ifname=f"node{index}")


def plan(name: str, nodes: int, routing: str = "tunnel", store: str = "local") -> LabSpec:
    validate_name(name)
    if routing not in ("tunnel", "native"):
        raise TopologyError(f"--routing {routing!r}: must be tunnel or native")
    if store not in ("local", "etcd"):
        raise TopologyError(f"--store {store!r}: must be local or etcd")
    if not 1 <= nodes <= MAX_NODES:
        raise TopologyError(f"--nodes {nodes}: must be between 1 and {MAX_NODES}")
    return LabSpec(name=name, routing=routing, store=store,
                   nodes=[node_spec(name, i) for i in range(1, nodes + 1)])

"""An installed host seen through the CLI's lab-shaped lens: one cluster, one node, its
agent socket and its store. Lets `cilia status`, `endpoint list`, `bpf …` and `apply` work
on an installed host with no lab running."""
from __future__ import annotations

from dataclasses import dataclass, field

from cilia.install.config import InstallRecord, state_dir_from_env


@dataclass
class InstalledNode:
    name: str
    ip: str
    pod_cidr: str
    netns: str


@dataclass
class InstalledSpec:
    name: str                 # the cluster
    routing: str
    store: str                # local | etcd, as a lab spec says it
    store_url: str
    sockets: dict[str, str]
    nodes: list[InstalledNode] = field(default_factory=list)

    def agent_socket(self, node: str) -> str:
        return self.sockets[node]

    def node(self, name: str) -> InstalledNode:
        for n in self.nodes:
            if n.name == name:
                return n
        raise KeyError(name)


def installed_spec(state_dir: str | None = None) -> InstalledSpec | None:
    rec = InstallRecord.load(state_dir or state_dir_from_env())
    if rec is None or rec.status != "installed":
        return None
    c = rec.config
    return InstalledSpec(name=c.cluster, routing=c.routing, store=c.store,
                         store_url=c.store_url(), sockets={c.node: c.socket},
                         nodes=[InstalledNode(c.node, c.node_ip, c.pod_cidr, c.netns)])

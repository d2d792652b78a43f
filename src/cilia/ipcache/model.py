"""What a node's ipcache should hold, computed from cluster state. Pure: no store, no kernel.

prefix -> (identity, tunnel endpoint or None, flags). Every endpoint IP of every node, every
node address (host / remote-node identity), every remote pod CIDR (so an IP not yet published
still finds its tunnel), and 0.0.0.0/0 as world.
"""
from __future__ import annotations

import ipaddress
from dataclasses import dataclass

from cilia.identity.reserved import HOST, REMOTE_NODE, WORLD

FLAG_NODE = 0x1  # the prefix is a node address (host or remote node)

Entry = tuple[int, "str | None", int]


@dataclass(frozen=True)
class NodeInfo:
    name: str
    ip: str
    pod_cidr: str | None = None

    @property
    def router_ip(self) -> str | None:
        if not self.pod_cidr:
            return None
        return str(next(ipaddress.IPv4Network(self.pod_cidr).hosts()))


@dataclass(frozen=True)
class EndpointInfo:
    ip: str
    identity: int
    node: str
    node_ip: str
    namespace: str = ""
    pod: str = ""


def desired(local_node: str, tunnel: bool, nodes: dict[str, NodeInfo],
            endpoints: dict[str, EndpointInfo]) -> dict[str, Entry]:
    out: dict[str, Entry] = {"0.0.0.0/0": (WORLD, None, 0)}
    for n in nodes.values():
        local = n.name == local_node
        ident = HOST if local else REMOTE_NODE
        out[f"{n.ip}/32"] = (ident, None, FLAG_NODE)
        if n.pod_cidr:
            via = n.ip if (tunnel and not local) else None
            if not local:
                # Unpublished pod IPs of that node: still reachable, identity unknown (world).
                out[n.pod_cidr] = (WORLD, via, 0)
            out[f"{n.router_ip}/32"] = (ident, via, FLAG_NODE)
    for ep in endpoints.values():
        via = ep.node_ip if (tunnel and ep.node != local_node) else None
        out[f"{ep.ip}/32"] = (ep.identity, via, 0)
    return out


def remote_routes(local_node: str, nodes: dict[str, NodeInfo]) -> dict[str, str]:
    """Remote pod CIDR -> the node IP that owns it."""
    return {n.pod_cidr: n.ip for n in nodes.values()
            if n.name != local_node and n.pod_cidr}


def with_cidr_identities(entries: dict[str, Entry], cidrs: dict[str, int]) -> dict[str, Entry]:
    """Add the policy engine's CIDR identities. A prefix the cluster already knows keeps its
    own identity (a pod or node address is that, not a CIDR); a new one inherits the tunnel
    endpoint and flags of the entry that covered it, so routing does not change."""
    if not cidrs:
        return entries
    out = dict(entries)
    nets = sorted(((ipaddress.IPv4Network(p), e) for p, e in entries.items()),
                  key=lambda x: -x[0].prefixlen)
    for pfx, ident in cidrs.items():
        if pfx in out:
            continue
        net = ipaddress.IPv4Network(pfx)
        cover = next((e for n, e in nets if net.subnet_of(n)), (WORLD, None, 0))
        out[pfx] = (ident, cover[1], cover[2])
    return out

"""Shared fixtures of the policy tests: the standard model and a datapath simulation.

The simulation reads only the packed map entries (bytes, as the BPF map would hold them)
and implements the documented ABI on its own: an LPM trie over the key bits after
prefixlen, four lookups per packet, deny > allow > drop. It shares no code with the engine
beyond the ABI document, so a packing or folding bug in the engine shows up as a wrong
verdict here.
"""
from __future__ import annotations

import ipaddress
import struct

from cilia.identity import Identity, pod_security_labels
from cilia.k8s.policies import (validate_cilium_clusterwide_network_policy,
                                validate_cilium_network_policy, validate_network_policy)
from cilia.policy import Endpoint, PolicyEngine

NAMESPACES = ("x", "y", "z")
POD_NAMES = ("a", "b", "c")
PODS = tuple(f"{ns}/{p}" for ns in NAMESPACES for p in POD_NAMES)
NAMESPACE_LABELS = {"x": {"team": "red"}, "y": {"team": "blue"}, "z": {}}
NAMED_PORTS = {"serve-80-tcp": ("TCP", 80), "serve-81-tcp": ("TCP", 81),
               "serve-80-udp": ("UDP", 80), "serve-81-udp": ("UDP", 81)}
HOST = "host"
EXTERNALS = ("host", "203.0.113.5", "198.51.100.10", "198.51.100.200")
PROTOS = {"TCP": 6, "UDP": 17, "SCTP": 132, "ICMP": 1}


def np_(name, ns, spec):
    return validate_network_policy({"apiVersion": "networking.k8s.io/v1", "kind": "NetworkPolicy",
                                    "metadata": {"name": name, "namespace": ns}, "spec": spec})


def cnp(name, ns, spec=None, specs=None):
    obj = {"apiVersion": "cilium.io/v2", "kind": "CiliumNetworkPolicy",
           "metadata": {"name": name, "namespace": ns}}
    if spec is not None:
        obj["spec"] = spec
    if specs is not None:
        obj["specs"] = specs
    return validate_cilium_network_policy(obj)


def ccnp(name, spec):
    return validate_cilium_clusterwide_network_policy(
        {"apiVersion": "cilium.io/v2", "kind": "CiliumClusterwideNetworkPolicy",
         "metadata": {"name": name}, "spec": spec})


class Model:
    """The standard model loaded into an engine: 9 pods, each its own identity/endpoint."""

    def __init__(self, policies=(), **engine_args):
        self.engine = PolicyEngine(**engine_args)
        self.endpoints: dict[str, Endpoint] = {}
        for i, pod in enumerate(PODS):
            ns, name = pod.split("/")
            labels = tuple(pod_security_labels({"pod": name}, ns, NAMESPACE_LABELS[ns]))
            ident = Identity(256 + i, labels)
            self.engine.add_identity(ident)
            ep = Endpoint(i + 1, ident.id, labels, NAMED_PORTS)
            self.endpoints[pod] = ep
            self.engine.upsert_endpoint(ep)
        for p in policies:
            self.engine.upsert_policy(p)
        self.engine.regenerate()

    def policy(self, pod):
        return self.engine.realized(self.endpoints[pod].ep_id)

    def identity_of(self, party: str) -> int:
        if party in self.endpoints:
            return self.endpoints[party].identity
        if party == HOST:
            return 1
        return lpm_identity(self.engine.cidr_identities(), party)

    def reach(self, src: str, dst: str, port: int, proto: str = "TCP") -> str:
        """'.' allowed, 'X' dropped, 'A' audited (would drop, forwarded)."""
        marks = []
        for party, direction, peer in ((src, 1, dst), (dst, 0, src)):
            if party not in self.endpoints:
                continue  # not a local endpoint: nothing enforces policy on that side
            pol = self.policy(party)
            v = simulate(pol.map_entries(), pol.ep_id, direction, self.identity_of(peer), PROTOS[proto], port)
            if v != "ALLOW":
                marks.append("A" if pol.audit else "X")
        return "X" if "X" in marks else ("A" if marks else ".")

    def matrix(self, port: int, proto: str = "TCP") -> dict[str, str]:
        return {s: "".join(self.reach(s, d, port, proto) for d in PODS) for s in PODS}


def lpm_identity(cidrs: dict, address: str) -> int:
    """The ipcache's answer for an address outside the cluster."""
    ip = ipaddress.ip_address(address)
    best = None
    for prefix, ident in cidrs.items():
        net = ipaddress.ip_network(prefix)
        if net.version == ip.version and ip in net and (best is None or net.prefixlen > best[0]):
            best = (net.prefixlen, ident.id)
    return best[1] if best else 2


# ---- datapath simulation over packed entries ----

def _bits(data: bytes) -> str:
    return "".join(f"{b:08b}" for b in data)


def simulate(map_entries, ep_id: int, direction: int, identity: int, proto: int, port: int) -> str:
    """ALLOW / DENY / DROP as the BPF program would decide from cilia_policy."""
    trie = []
    for key, value in map_entries:
        assert len(key) == 16 and len(value) == 8
        (prefixlen,) = struct.unpack_from("<I", key)
        assert key[14:16] == b"\0\0"
        flags = value[0]
        trie.append((prefixlen, _bits(key[4:]), flags))
    found = 0
    for ident, pr in ((identity, proto), (identity, 0), (0, proto), (0, 0)):
        lookup = _bits(struct.pack(">HBBIH", ep_id, direction, pr, ident, port) + b"\0\0")
        best = None
        for prefixlen, bits, flags in trie:
            if lookup[:prefixlen] == bits[:prefixlen] and (best is None or prefixlen > best[0]):
                best = (prefixlen, flags)
        if best is not None:
            found |= best[1]
    if found & 2:
        return "DENY"
    return "ALLOW" if found & 1 else "DROP"


def parse_matrix(text: str) -> dict[str, str]:
    out = {}
    for line in text.strip().splitlines():
        line = line.strip()
        if not line:
            continue
        pod, _, cells = line.partition(" ")
        out[pod] = cells.replace(" ", "")
        assert len(out[pod]) == len(PODS), line
    assert tuple(out) == PODS
    return out


def render(m: dict[str, str]) -> str:
    return "\n".join(f"{p} {c[0:3]} {c[3:6]} {c[6:9]}" for p, c in m.items())

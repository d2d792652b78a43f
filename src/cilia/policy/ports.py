"""L4 specs -> (proto, port, prefix length) triples the policy map can hold."""
from __future__ import annotations

from typing import Callable, Mapping

from .models import L4_PROTOCOLS, PROTO_ANY, PortSpec, proto_number

PORT_BITS = 16

# name -> (protocol, port) of one endpoint's containerPorts.
NamedPorts = Mapping[str, tuple[str | int, int]]
Resolver = Callable[[str, int], list[tuple[int, int]]]


def range_prefixes(lo: int, hi: int) -> list[tuple[int, int]]:
    """Minimal list of (port, prefixlen) prefixes covering exactly lo..hi."""
    if not 0 <= lo <= hi <= 0xFFFF:
        raise ValueError(f"bad port range {lo}-{hi}")
    out = []
    while lo <= hi:
        size = lo & -lo if lo else 1 << PORT_BITS  # largest block aligned at lo
        while lo + size - 1 > hi:
            size >>= 1
        out.append((lo, PORT_BITS - size.bit_length() + 1))
        lo += size
    return out


def prefix_range(port: int, plen: int) -> tuple[int, int]:
    span = 1 << (PORT_BITS - plen)
    return port, port + span - 1


def prefix_contains(outer: tuple[int, int], inner: tuple[int, int]) -> bool:
    (op, ol), (ip, il) = outer, inner
    return ol <= il and (ip >> (PORT_BITS - ol) if ol else 0) == (op >> (PORT_BITS - ol) if ol else 0)


def own_named_ports(named_ports: NamedPorts | None) -> Resolver:
    """Ingress: a name means the selected endpoint's own container port."""
    ports = dict(named_ports or {})

    def resolve(name: str, proto: int) -> list[tuple[int, int]]:
        hit = ports.get(name)
        if hit is None:
            return []
        p = proto_number(hit[0])
        if proto not in (PROTO_ANY, p):
            return []
        return [(p, int(hit[1]))]
    return resolve


def expand(spec: PortSpec, resolve: Resolver) -> list[tuple[int, int, int]]:
    """(proto, port, plen) triples; [] when a named port does not resolve."""
    if spec.name:
        out = []
        for proto, port in resolve(spec.name, spec.proto):
            out.append((proto, port, PORT_BITS))
        return out
    protos = [spec.proto]
    if spec.proto == PROTO_ANY:
        protos = list(L4_PROTOCOLS)
    if spec.icmp:
        return [(spec.proto, spec.port, PORT_BITS)]
    if spec.port == 0:
        prefixes = [(0, 0)]
    elif spec.end_port and spec.end_port > spec.port:
        prefixes = range_prefixes(spec.port, spec.end_port)
    else:
        prefixes = [(spec.port, PORT_BITS)]
    return [(proto, port, plen) for proto in protos for port, plen in prefixes]

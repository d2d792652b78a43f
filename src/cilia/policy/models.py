"""The normalized rule model every policy kind is translated into.

NetworkPolicy, CiliumNetworkPolicy and CiliumClusterwideNetworkPolicy all become the same
few value objects, so the selector cache, the map-state computation and the explainer never
look at a manifest again. Everything here is frozen and hashable: selectors double as
selector-cache keys and rules can be compared across policy revisions.
"""
from __future__ import annotations

from dataclasses import dataclass, field

INGRESS = 0
EGRESS = 1
DIRECTIONS = (INGRESS, EGRESS)
DIRECTION_NAMES = {INGRESS: "ingress", EGRESS: "egress"}

# IANA protocol numbers; 0 is "any protocol" in the policy map.
PROTO_ANY = 0
PROTO_ICMP = 1
PROTO_TCP = 6
PROTO_UDP = 17
PROTO_ICMPV6 = 58
PROTO_SCTP = 132
PROTO_NUMBERS = {"TCP": PROTO_TCP, "UDP": PROTO_UDP, "SCTP": PROTO_SCTP, "ICMP": PROTO_ICMP,
                 "ICMPV6": PROTO_ICMPV6, "ANY": PROTO_ANY}
PROTO_NAMES = {v: k for k, v in PROTO_NUMBERS.items()}
PROTO_NAMES[PROTO_ICMPV6] = "ICMPv6"
# Cilium expands protocol ANY with ports into these; proto 0 in the map is only produced
# by L3-only rules, so an "ANY port 8" rule can never open ICMP type 8.
L4_PROTOCOLS = (PROTO_TCP, PROTO_UDP, PROTO_SCTP)

ENFORCEMENT_MODES = ("default", "always", "never")

KIND_NP = "NetworkPolicy"
KIND_CNP = "CiliumNetworkPolicy"
KIND_CCNP = "CiliumClusterwideNetworkPolicy"


def proto_number(proto: str | int) -> int:
    if isinstance(proto, int):
        return proto
    try:
        return PROTO_NUMBERS[proto.upper()]
    except KeyError:
        raise ValueError(f"unknown protocol {proto!r}") from None


def proto_name(proto: int) -> str:
    return PROTO_NAMES.get(proto, str(proto))


@dataclass(frozen=True, order=True)
class RuleSource:
    """Where a rule came from: enough to name it in `policy explain` and flow logs."""
    kind: str
    namespace: str  # "" for cluster-wide policies
    name: str
    path: str = ""  # the rule's field path inside the policy, e.g. "spec.ingress[0]"

    @property
    def ref(self) -> tuple[str, str, str]:
        return (self.kind, self.namespace, self.name)

    def __str__(self) -> str:
        where = f"{self.namespace}/{self.name}" if self.namespace else self.name
        return f"{self.kind} {where}"

    def describe(self) -> str:
        return f"{self} {self.path}" if self.path else str(self)


@dataclass(frozen=True)
class PortSpec:
    """One L4 allowance: proto (0 = any), port (0 = all ports) or a named port, endPort.

    ICMP types use proto 1/58 and the type as `port`, since the datapath looks them up
    in the dport field.
    """
    proto: int = PROTO_ANY
    port: int = 0
    end_port: int = 0
    name: str = ""  # named port, resolved per endpoint; `port` is 0 then

    @property
    def icmp(self) -> bool:
        return self.proto in (PROTO_ICMP, PROTO_ICMPV6)

    def __str__(self) -> str:
        what = self.name or (f"{self.port}-{self.end_port}" if self.end_port else str(self.port or "*"))
        return f"{proto_name(self.proto)}/{what}"


@dataclass(frozen=True)
class Rule:
    """Allow or deny traffic between endpoints selected by `subject` and `peers`.

    peers are OR'ed; ports are OR'ed and empty means every port of every protocol
    (including ICMP), as an L3-only rule does in Cilium.
    """
    direction: int
    subject: "object"  # selectors.LabelSelector
    peers: tuple  # of selectors.Selector
    ports: tuple[PortSpec, ...]
    deny: bool
    source: RuleSource
    cookie: int = field(default=0, compare=False)

    @property
    def icmp_types(self) -> tuple[int, ...]:
        return tuple(p.port for p in self.ports if p.icmp)


@dataclass(frozen=True)
class Selects:
    """"This policy selects the subject in this direction": the reason for default deny.

    default_deny False is Cilium's enableDefaultDeny: {<dir>: false}: the rules of the
    policy still apply, but they do not put the endpoint into default deny.
    """
    direction: int
    subject: "object"
    default_deny: bool
    source: RuleSource


@dataclass(frozen=True)
class NormalizedPolicy:
    key: tuple[str, str, str]  # (kind, namespace, name)
    selects: tuple[Selects, ...]
    rules: tuple[Rule, ...]

    @property
    def subjects(self) -> set:
        return {s.subject for s in self.selects} | {r.subject for r in self.rules}

"""Why a connection is allowed or dropped, from the same entries the datapath gets.

A connection needs the source endpoint's egress policy and the destination endpoint's
ingress policy to pass; a side that is not a local endpoint (world, a CIDR, the host, a pod
whose policy another node enforces but that was passed as a bare identity) is not
evaluated. The verdict of each side is the datapath's four-lookup algorithm run on the
endpoint's emitted map entries (mapstate.lookup4), so it agrees with the datapath by
construction; the rules listed come from the provenance recorded before LPM folding and
pruning, so a rule is named even when its entry was folded into a wider one.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from cilia.identity.reserved import Identity

from .mapstate import (ALLOW, COOKIE_ALLOW_LOCALHOST, COOKIE_NOT_ENFORCED, DENY, EntryKey,
                       lookup4, port_mask)
from .models import DIRECTION_NAMES, EGRESS, INGRESS, PROTO_ANY, RuleSource, proto_name, proto_number
from .ports import PORT_BITS

if TYPE_CHECKING:
    from .compute import Endpoint, EndpointPolicy, PolicyEngine

ALLOWED, DENIED, AUDIT = "ALLOWED", "DENIED", "AUDIT"


@dataclass(frozen=True)
class DirectionVerdict:
    direction: str
    enforced: bool
    result: str
    flags: int                             # OR of the datapath's hits
    hits: tuple                            # ((EntryKey, EntryValue), ...)
    allow_rules: tuple[RuleSource, ...]
    deny_rules: tuple[RuleSource, ...]
    reason: str


@dataclass(frozen=True)
class Verdict:
    result: str                            # ALLOWED | DENIED | AUDIT
    directions: tuple[str, ...]            # the direction(s) that decided
    allow_rules: tuple[tuple[str, str, str], ...]   # (kind, namespace, name)
    deny_rule: tuple[str, str, str] | None
    reason: str
    egress: DirectionVerdict | None        # None: the source is not a local endpoint
    ingress: DirectionVerdict | None

    def __str__(self) -> str:
        return f"{self.result} ({', '.join(self.directions) or '-'}): {self.reason}"


def _party(engine: "PolicyEngine", p) -> tuple[int, "EndpointPolicy | None"]:
    from .compute import Endpoint, EndpointPolicy
    if isinstance(p, EndpointPolicy):
        return p.identity, p
    if isinstance(p, Endpoint):
        return p.identity, engine.compute_endpoint(p)
    if isinstance(p, Identity):
        return p.id, None
    if isinstance(p, int):
        return p, None
    if isinstance(p, str):
        return engine.identity_of_address(p).id, None
    raise TypeError(f"cannot explain for {p!r}: want an Endpoint, EndpointPolicy, identity or IP")


def _provenance(engine, pol: "EndpointPolicy", d: int, identity: int, proto: int, port: int):
    allow: dict[RuleSource, None] = {}
    deny: dict[RuleSource, None] = {}
    localhost = peer_selected = False
    for ident, pr in dict.fromkeys(((identity, proto), (identity, PROTO_ANY), (0, proto), (0, PROTO_ANY))):
        for plen in range(PORT_BITS + 1):
            cookies = pol.provenance.get(EntryKey(d, ident, pr, port_mask(port, plen), plen))
            if cookies is None:
                continue
            for c in cookies[0]:
                if c == COOKIE_ALLOW_LOCALHOST:
                    localhost = True
                elif c != COOKIE_NOT_ENFORCED and (src := engine.rule_source(c)) is not None:
                    allow[src] = None
            for c in cookies[1]:
                if (src := engine.rule_source(c)) is not None:
                    deny[src] = None
    for k, (a, dn) in pol.provenance.items():
        if k.direction == d and k.identity in (identity, 0) and (set(a) - {COOKIE_NOT_ENFORCED} or dn):
            peer_selected = True
            break
    return tuple(allow), tuple(deny), localhost, peer_selected


def explain_direction(engine, pol: "EndpointPolicy", d: int, peer: int, proto: int, port: int) -> DirectionVerdict:
    state = pol.direction(d)
    hits = tuple(lookup4(pol.entries, d, peer, proto, port))
    flags = 0
    for _, v in hits:
        flags |= v.flags
    allow, deny, localhost, peer_selected = _provenance(engine, pol, d, peer, proto, port)
    name = DIRECTION_NAMES[d]
    what = f"{proto_name(proto)}/{port}"
    if flags & DENY:
        result = DENIED
        reason = f"{name} denied by " + ", ".join(s.describe() for s in deny)
    elif flags & ALLOW:
        result = ALLOWED
        if not state.enforced:
            reason = f"{name} not enforced: {state.reason}"
        elif allow:
            reason = f"{name} allowed by " + ", ".join(s.describe() for s in allow)
        elif localhost:
            reason = f"{name} allowed: the host may always reach its endpoints (allow-localhost)"
        else:
            reason = f"{name} allowed"
    else:
        result = DENIED
        first = "no rule selects the peer" if not peer_selected else f"no rule allows the peer on {what}"
        reason = f"{name}: {first}; default deny because {state.reason}"
    if result == DENIED and pol.audit:
        result = AUDIT
        reason += " (audit mode: forwarded)"
    return DirectionVerdict(name, state.enforced, result, flags, hits, allow, deny, reason)


def explain(engine: "PolicyEngine", src, dst, port: int, proto: str | int = "TCP") -> Verdict:
    proto_n = proto_number(proto)
    src_id, src_pol = _party(engine, src)
    dst_id, dst_pol = _party(engine, dst)
    eg = explain_direction(engine, src_pol, EGRESS, dst_id, proto_n, port) if src_pol else None
    ing = explain_direction(engine, dst_pol, INGRESS, src_id, proto_n, port) if dst_pol else None
    sides = [v for v in (eg, ing) if v is not None]
    denied = [v for v in sides if v.result == DENIED]
    audited = [v for v in sides if v.result == AUDIT]
    allow_rules = tuple(dict.fromkeys(s.ref for v in sides for s in v.allow_rules))
    if denied:
        deny = next((v.deny_rules[0] for v in denied if v.deny_rules), None)
        return Verdict(DENIED, tuple(v.direction for v in denied), allow_rules,
                       deny.ref if deny else None, "; ".join(v.reason for v in denied), eg, ing)
    if audited:
        deny = next((v.deny_rules[0] for v in audited if v.deny_rules), None)
        return Verdict(AUDIT, tuple(v.direction for v in audited), allow_rules,
                       deny.ref if deny else None, "; ".join(v.reason for v in audited), eg, ing)
    deciding = [v for v in sides if v.enforced] or sides
    reason = "; ".join(v.reason for v in deciding) or "neither side is a local endpoint: nothing enforces policy"
    return Verdict(ALLOWED, tuple(v.direction for v in deciding), allow_rules, None, reason, eg, ing)

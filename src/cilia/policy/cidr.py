"""Node-local identities for the CIDR prefixes policies use.

Every prefix P any policy names (cidr or except) gets a local identity whose labels are
"cidr:Q" for every policy prefix Q that contains P (P itself included) plus
"reserved:world". The ipcache maps P -> that identity; an LPM lookup on an address returns
the most specific policy prefix containing it, and that identity still carries the
labels of all wider prefixes, so a rule on 198.51.100.0/24 matches an address that the
ipcache resolves through 198.51.100.0/25.

Excepts fall out of the same labels: {cidr: 198.51.100.0/24, except: [198.51.100.128/25]}
matches identities carrying cidr:198.51.100.0/24 but not cidr:198.51.100.128/25. An
address inside the except resolves to the /25 (or something inside it), whose identity
carries the /25 label; an address outside it resolves to a prefix that is not inside the
/25, so it cannot carry that label.

/0 prefixes get no identity of their own: addresses no other prefix covers stay
reserved:world (2), which CIDRSelector treats as inside any /0. Known limit: identity 2 is
shared by IPv4 and IPv6, so 0.0.0.0/0 also matches IPv6 world addresses.
"""
from __future__ import annotations

import ipaddress
from typing import Iterable

from cilia.identity.allocator import LocalIdentityAllocator
from cilia.identity.reserved import WORLD, Identity, reserved_identity

Network = ipaddress.IPv4Network | ipaddress.IPv6Network


def cidr_labels(prefix: Network, all_prefixes: Iterable[Network]) -> tuple[str, ...]:
    labels = {"reserved:world"}
    for q in all_prefixes:
        if q.version == prefix.version and prefix.subnet_of(q):  # type: ignore[arg-type]
            labels.add(f"cidr:{q}")
    return tuple(sorted(labels))


class CIDRIdentities:
    def __init__(self, allocator: LocalIdentityAllocator | None = None) -> None:
        self.allocator = allocator or LocalIdentityAllocator()
        self._by_prefix: dict[str, Identity] = {}

    def update(self, prefixes: Iterable[str]) -> tuple[list[Identity], list[Identity]]:
        """Make the identity set match `prefixes`; returns (added, removed) identities.

        New identities are allocated before old ones are released, so an unchanged label
        set keeps its number and a prefix never maps to a released number.
        """
        nets = {ipaddress.ip_network(p, strict=False) for p in prefixes}
        wanted = {str(n): cidr_labels(n, nets) for n in nets if n.prefixlen > 0}
        old = dict(self._by_prefix)
        new: dict[str, Identity] = {}
        added: list[Identity] = []
        for p, labels in sorted(wanted.items()):
            prev = old.get(p)
            if prev is not None and prev.labels == labels:
                new[p] = prev
                continue
            ident = self.allocator.allocate(labels)
            new[p] = ident
            if ident.id not in {i.id for i in old.values()} and ident not in added:
                added.append(ident)
        removed: list[Identity] = []
        for p, ident in old.items():
            if new.get(p) is ident:
                continue
            if self.allocator.release(ident.id) and ident not in removed:
                removed.append(ident)
        self._by_prefix = new
        return added, removed

    def identities(self) -> dict[str, Identity]:
        return dict(self._by_prefix)

    def lookup(self, address: str) -> Identity:
        """LPM over the policy prefixes, as the ipcache does; world when nothing covers it."""
        ip = ipaddress.ip_address(address)
        best: tuple[int, Identity] | None = None
        for p, ident in self._by_prefix.items():
            net = ipaddress.ip_network(p)
            if net.version == ip.version and ip in net and (best is None or net.prefixlen > best[0]):
                best = (net.prefixlen, ident)
        if best is None:
            world = reserved_identity(WORLD)
            assert world is not None
            return world
        return best[1]

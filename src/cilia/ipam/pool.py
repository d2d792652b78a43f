"""Per-node pod address allocation from the node's pod CIDR.

Pure bookkeeping: the endpoint manager persists the owners with each endpoint, and rebuilds
this pool from them on restart, so an address is never handed out twice across crashes."""
from __future__ import annotations

import ipaddress


class PoolExhausted(Exception):
    pass


class PodCIDRPool:
    def __init__(self, cidr: str):
        self.network = ipaddress.IPv4Network(cidr, strict=True)
        if self.network.num_addresses < 4:
            raise ValueError(f"pod CIDR {cidr} is too small")
        hosts = list(self.network.hosts())
        # The first host address is the node's router IP (cilia_host), the pods' gateway.
        self.router_ip = str(hosts[0])
        self._free_order = [str(h) for h in hosts[1:]]
        self._owner: dict[str, str] = {}
        self._next = 0

    @property
    def capacity(self) -> int:
        return len(self._free_order)

    @property
    def allocated(self) -> dict[str, str]:
        return dict(self._owner)

    def owner_ip(self, owner: str) -> str | None:
        for ip, o in self._owner.items():
            if o == owner:
                return ip
        return None

    def allocate(self, owner: str) -> str:
        """Idempotent per owner: a retried CNI ADD gets the same address back."""
        existing = self.owner_ip(owner)
        if existing:
            return existing
        n = len(self._free_order)
        # Round-robin from the last allocation so a just-released address is not reused at
        # once (stale conntrack/neighbour entries of a deleted pod must not hit a new one).
        for i in range(n):
            ip = self._free_order[(self._next + i) % n]
            if ip not in self._owner:
                self._owner[ip] = owner
                self._next = (self._next + i + 1) % n
                return ip
        raise PoolExhausted(f"no free address left in {self.network} ({n} in use)")

    def claim(self, ip: str, owner: str) -> None:
        """Re-register an address found in persisted state."""
        if ipaddress.IPv4Address(ip) not in self.network:
            raise ValueError(f"{ip} is outside pod CIDR {self.network}")
        prev = self._owner.get(ip)
        if prev is not None and prev != owner:
            raise ValueError(f"{ip} is already owned by {prev}")
        self._owner[ip] = owner

    def release(self, ip: str) -> bool:
        return self._owner.pop(ip, None) is not None

"""Network policy maps as the agent's policy reconciler sees them.

``cilia_policy`` is one LPM trie for every endpoint of the node (bpf/include/abi.h,
struct cilia_policy_key): {prefixlen, ep_id, direction, proto, identity, dport}, every
field after prefixlen in network byte order, prefixlen = 64 + the port prefix length.
The bytes are the policy engine's (cilia.policy.mapstate), so an entry reads the same
from either side.

What this module adds to the map is bookkeeping: the entries of each endpoint are kept
in Python (read back from the kernel once, on first use, so a restarted agent diffs
against what the datapath really holds), and a sync writes only the difference, new and
changed entries first, stale ones after. A reader in the datapath therefore sees at any
moment the union of the old and the new policy for the entries that change: an allow
that stays is never missing, an added deny applies at once, a removed deny lingers for
the length of one batch.
"""

from __future__ import annotations

import errno
import socket
import time
from dataclasses import dataclass
from typing import Callable

from . import abi
from .addr import be16_to_port, be32_to_ip4
from .libbpf import BpfError

MAP_POLICY = "cilia_policy"
MAP_POLICY_CT = "cilia_ct4_policy"

MAP_TYPES = {
    MAP_POLICY: (abi.cilia_policy_key, abi.cilia_policy_value),
    MAP_POLICY_CT: (abi.ct4_key, abi.ct4_policy_entry),
}

PORT_BITS = 16
DIRECTIONS = {abi.POLICY_INGRESS: "ingress", abi.POLICY_EGRESS: "egress"}
_PROTO_NAMES = {0: "ANY", socket.IPPROTO_ICMP: "ICMP", socket.IPPROTO_TCP: "TCP", socket.IPPROTO_UDP: "UDP",
                132: "SCTP"}

# (direction, identity, proto, port, prefix_len) -> (flags, cookie)
_Key = tuple[int, int, int, int, int]
_Value = tuple[int, int]


@dataclass(frozen=True)
class PolicyEntry:
    """One map entry of an endpoint. ``port`` is a host-order number (ICMP: the type);
    ``prefix_len`` is how many of its high bits must match (16 = that port, 0 = any
    port, 10 = a block of 64 ports); bits below the prefix are ignored. ``identity`` 0
    and ``proto`` 0 mean any. ``deny`` entries win over every allow of the packet."""

    direction: int
    identity: int
    proto: int
    port: int
    prefix_len: int
    deny: bool
    cookie: int = 0

    def key(self) -> _Key:
        if self.direction not in DIRECTIONS:
            raise ValueError(f"direction must be 0 (ingress) or 1 (egress), not {self.direction!r}")
        if not 0 <= self.identity < 1 << 32:
            raise ValueError(f"identity {self.identity} out of range")
        if not 0 <= self.proto <= 255:
            raise ValueError(f"proto {self.proto} out of range")
        if not 0 <= self.port <= 0xFFFF:
            raise ValueError(f"port {self.port} out of range")
        if not 0 <= self.prefix_len <= PORT_BITS:
            raise ValueError(f"prefix_len {self.prefix_len} not in 0..16")
        if not 0 <= self.cookie < 1 << 32:
            raise ValueError(f"cookie {self.cookie} out of range")
        return (self.direction, self.identity, self.proto, port_mask(self.port, self.prefix_len), self.prefix_len)


def port_mask(port: int, prefix_len: int) -> int:
    shift = PORT_BITS - prefix_len
    return (port >> shift) << shift if prefix_len else 0


def port_range(port: int, prefix_len: int) -> tuple[int, int]:
    lo = port_mask(port, prefix_len)
    return lo, lo + (1 << (PORT_BITS - prefix_len)) - 1


def pack_key(ep_id: int, key: _Key) -> abi.cilia_policy_key:
    if not 0 <= ep_id <= 0xFFFF:
        raise ValueError(f"ep_id {ep_id} out of range")
    direction, identity, proto, port, plen = key
    return abi.cilia_policy_key(prefixlen=abi.POLICY_FIXED_PREFIX + plen, ep_id=socket.htons(ep_id),
                                direction=direction, proto=proto, identity=socket.htonl(identity),
                                dport=socket.htons(port))


def unpack_key(k: abi.cilia_policy_key) -> tuple[int, _Key]:
    return socket.ntohs(k.ep_id), (k.direction, socket.ntohl(k.identity), k.proto, socket.ntohs(k.dport),
                                   k.prefixlen - abi.POLICY_FIXED_PREFIX)


class PolicyTable:
    """The policy maps of one loaded node datapath. ``get_map(name)`` gives a BpfMap."""

    def __init__(self, get_map: Callable):
        self._get = get_map
        self._state: dict[int, dict[_Key, _Value]] | None = None

    # -- bookkeeping -------------------------------------------------------
    def _read_kernel(self) -> dict[int, dict[_Key, _Value]]:
        state: dict[int, dict[_Key, _Value]] = {}
        for k, v in self._get(MAP_POLICY).lookup_batch():
            ep_id, key = unpack_key(k)
            state.setdefault(ep_id, {})[key] = (v.flags, v.rule_cookie)
        return state

    def _known(self) -> dict[int, dict[_Key, _Value]]:
        if self._state is None:
            self._state = self._read_kernel()
        return self._state

    # -- writes ------------------------------------------------------------
    def sync(self, ep_id: int, entries: list[PolicyEntry]) -> tuple[int, int]:
        """Make ep_id's entries equal ``entries``. Returns (upserts, deletes)."""
        want: dict[_Key, _Value] = {}
        for e in entries:
            key = e.key()
            flags = abi.POLICY_F_DENY if e.deny else abi.POLICY_F_ALLOW
            old = want.get(key)
            if old is not None:
                # The same key twice: both verdicts are kept (deny wins in the datapath)
                # and the cookie follows the verdict that decides.
                cookie = e.cookie if (e.deny or not old[0] & abi.POLICY_F_DENY) else old[1]
                want[key] = (old[0] | flags, cookie)
            else:
                want[key] = (flags, e.cookie)
        pack_key(ep_id, (0, 0, 0, 0, 0))  # validates ep_id before anything is written
        have = self._known().get(ep_id, {})
        upserts = [(pack_key(ep_id, k), abi.cilia_policy_value(flags=v[0], rule_cookie=v[1]))
                   for k, v in want.items() if have.get(k) != v]
        deletes = [pack_key(ep_id, k) for k in have if k not in want]
        m = self._get(MAP_POLICY)
        try:
            m.update_batch(upserts)
            self._delete(m, deletes)
        except BaseException:
            # Part of the batch may have landed: the next sync reads the kernel again.
            self._state = None
            raise
        if want:
            self._state[ep_id] = want
        else:
            self._state.pop(ep_id, None)
        return len(upserts), len(deletes)

    def apply(self, ep_id: int, upserts: dict[_Key, _Value], deletes: list[_Key]) -> tuple[int, int]:
        """Write a change computed elsewhere (the engine's diff against what it realized
        before): keys are (direction, identity, proto, port, prefix_len), values (flags,
        cookie). Upserts land before deletes, as in sync()."""
        for key in list(upserts) + list(deletes):
            if not 0 <= key[4] <= PORT_BITS or key[3] != port_mask(key[3], key[4]):
                raise ValueError(f"policy key {key}: port not aligned to its prefix")
        have = self._known().setdefault(ep_id, {})
        m = self._get(MAP_POLICY)
        try:
            m.update_batch([(pack_key(ep_id, k), abi.cilia_policy_value(flags=v[0], rule_cookie=v[1]))
                            for k, v in upserts.items()])
            self._delete(m, [pack_key(ep_id, k) for k in deletes if k in have])
        except BaseException:
            self._state = None
            raise
        have.update(upserts)
        for k in deletes:
            have.pop(k, None)
        if not have:
            self._state.pop(ep_id, None)
        return len(upserts), len(deletes)

    @staticmethod
    def _delete(m, keys: list) -> None:
        try:
            m.delete_batch(keys)
        except BpfError as e:
            # Someone (an operator with bpftool) removed an entry already: finish one by one.
            if e.errno != errno.ENOENT:
                raise
            for k in keys:
                m.delete(k)

    def delete(self, ep_id: int) -> int:
        return self.sync(ep_id, [])[1]

    # -- reads -------------------------------------------------------------
    def entries(self, ep_id: int | None = None) -> list[dict]:
        """What the kernel map holds (not the bookkeeping), like `cilium bpf policy get`."""
        out = []
        for k, v in self._get(MAP_POLICY).lookup_batch():
            ep, (direction, identity, proto, port, plen) = unpack_key(k)
            if ep_id is not None and ep != ep_id:
                continue
            lo, hi = port_range(port, plen)
            out.append({
                "ep_id": ep, "direction": DIRECTIONS.get(direction, str(direction)),
                "identity": identity, "proto": proto, "protocol": _PROTO_NAMES.get(proto, str(proto)),
                "port": port, "prefix_len": plen, "port_range": (lo, hi),
                "verdict": "deny" if v.flags & abi.POLICY_F_DENY else "allow",
                "flags": v.flags, "cookie": v.rule_cookie,
            })
        return sorted(out, key=lambda e: (e["ep_id"], e["direction"], e["identity"], e["proto"], e["port"],
                                          e["prefix_len"]))

    def ct_entries(self) -> list[dict]:
        """Connections policy let through (either direction of each skips the lookups)."""
        now = int(time.clock_gettime(time.CLOCK_MONOTONIC))  # bpf_ktime_get_ns()'s clock
        out = []
        for k, v in self._get(MAP_POLICY_CT).lookup_batch():
            out.append({
                "proto": _PROTO_NAMES.get(k.nexthdr, str(k.nexthdr)), "nexthdr": k.nexthdr,
                "saddr": be32_to_ip4(k.saddr), "sport": be16_to_port(k.sport),
                "daddr": be32_to_ip4(k.daddr), "dport": be16_to_port(k.dport),
                "audited": bool(v.flags & abi.PCT_F_AUDIT),
                "created": v.created, "last_seen": v.last_seen, "idle": max(0, now - v.last_seen),
            })
        return sorted(out, key=lambda e: (e["proto"], e["saddr"], e["sport"], e["daddr"], e["dport"]))

    def flush_ct(self) -> int:
        """Forget every tracked connection: the next packet of each is judged again
        (a reply first seen after this is judged as a connection of its own)."""
        m = self._get(MAP_POLICY_CT)
        return m.delete_batch([k for k, _ in m.lookup_batch()])

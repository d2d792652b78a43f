"""Service load balancing maps as the agent's LB reconciler sees them.

The datapath reads (frontend, scope, slot 0) for the service, then one slot 1..count
for the backend id, then the backend: writes go in the reverse order (backends, slots,
Maglev table, reverse NAT, service entry last; stale slots removed after), so a
concurrent reader never follows a slot to a missing backend. Terminating backends stay
in the backends map (established flows keep them) but never occupy a slot.
"""

from __future__ import annotations

import ctypes
import os
import socket
import time
from dataclasses import dataclass, field
from typing import Callable, Iterable

from . import abi
from . import libbpf as lb
from .addr import be16_to_port, be32_to_ip4, ip4_to_be32, port_to_be16

MAP_SERVICES = "cilia_lb4_services"
MAP_BACKENDS = "cilia_lb4_backends"
MAP_REV_NAT = "cilia_lb4_reverse_nat"
MAP_MAGLEV = "cilia_lb4_maglev"
MAP_AFFINITY = "cilia_lb4_affinity"
MAP_CT = "cilia_ct4_global"

MAP_TYPES = {
    MAP_SERVICES: (abi.lb4_key, abi.lb4_service),
    MAP_BACKENDS: (ctypes.c_uint32, abi.lb4_backend),
    MAP_REV_NAT: (ctypes.c_uint16, abi.lb4_reverse_nat),
    MAP_MAGLEV: (abi.lb4_maglev_key, ctypes.c_uint32),
    MAP_AFFINITY: (abi.lb4_affinity_key, abi.lb4_affinity_val),
    MAP_CT: (abi.ct4_key, abi.ct4_entry),
}

HAIRPIN_IP4 = "169.254.42.1"  # Cilium's IPv4 loopback address for hairpinned service flows
MAGLEV_DEFAULT_M = 16381
# The table sizes Cilium accepts (primes, so every backend's permutation covers it).
MAGLEV_SIZES = (251, 509, 1021, 2039, 4093, 8191, 16381, 32749, 65521, 131071)

KINDS = {
    "ClusterIP": 0,
    "NodePort": abi.SVC_F_NODEPORT | abi.SVC_F_ROUTABLE,
    "LoadBalancer": abi.SVC_F_LOADBALANCER | abi.SVC_F_ROUTABLE,
    "ExternalIP": abi.SVC_F_EXTERNAL_IP | abi.SVC_F_ROUTABLE,
}
SCOPES = {"external": abi.LB_SCOPE_EXT, "internal": abi.LB_SCOPE_INT}
ALGORITHMS = ("random", "maglev")
STATES = {"active": abi.BE_STATE_ACTIVE, "terminating": abi.BE_STATE_TERMINATING}
PROTOS = {"TCP": socket.IPPROTO_TCP, "UDP": socket.IPPROTO_UDP}
_PROTO_NAMES = {v: k for k, v in PROTOS.items()}
_SCOPE_NAMES = {v: k for k, v in SCOPES.items()}
_STATE_NAMES = {v: k for k, v in STATES.items()}
_FLAG_NAMES = (
    (abi.SVC_F_NODEPORT, "NodePort"), (abi.SVC_F_LOADBALANCER, "LoadBalancer"),
    (abi.SVC_F_EXTERNAL_IP, "ExternalIP"), (abi.SVC_F_EXT_LOCAL_SCOPE, "ETP-Local"),
    (abi.SVC_F_AFFINITY, "SessionAffinity"), (abi.SVC_F_ROUTABLE, "Routable"),
    (abi.SVC_F_HOSTPORT, "HostPort"),
)
_FLAG2_NAMES = (
    (abi.SVC_F2_INT_LOCAL_SCOPE, "ITP-Local"), (abi.SVC_F2_TWO_SCOPES, "TwoScopes"),
    (abi.SVC_F2_MAGLEV, "Maglev"),
)
_CT_FLAG_NAMES = ((abi.CT_F_HAIRPIN, "hairpin"), (abi.CT_F_NODEPORT, "nodeport"), (abi.CT_F_SNAT, "snat"))


@dataclass
class LBBackend:
    id: int
    address: str
    port: int
    proto: int = socket.IPPROTO_TCP
    state: str = "active"  # active | terminating


@dataclass
class LBService:
    """One frontend in one scope, as upsert_service takes it."""
    rev_nat_index: int
    address: str
    port: int
    proto: int
    backends: list[LBBackend] = field(default_factory=list)
    kind: str = "ClusterIP"
    scope: str = "external"
    algorithm: str = "random"
    maglev_table: list[int] | None = None
    affinity_timeout: int = 0
    local_only: bool = False


def _proto(proto) -> int:
    if isinstance(proto, str):
        try:
            return PROTOS[proto.upper()]
        except KeyError:
            raise ValueError(f"protocol must be TCP or UDP, not {proto!r}") from None
    if proto not in _PROTO_NAMES:
        raise ValueError(f"protocol must be TCP (6) or UDP (17), not {proto!r}")
    return int(proto)


def _port(port: int) -> int:
    if not 1 <= int(port) <= 65535:
        raise ValueError(f"port {port} out of range")
    return int(port)


def _scope(scope: str) -> int:
    try:
        return SCOPES[scope]
    except KeyError:
        raise ValueError(f"scope must be one of {sorted(SCOPES)}, not {scope!r}") from None


def service_key(address: str, port: int, proto, scope: str = "external", slot: int = 0) -> abi.lb4_key:
    return abi.lb4_key(address=ip4_to_be32(address), dport=port_to_be16(_port(port)), backend_slot=slot,
                       proto=_proto(proto), scope=_scope(scope))


def _backend_value(b: LBBackend) -> abi.lb4_backend:
    if not 1 <= b.id < 1 << 32:
        raise ValueError(f"backend id {b.id} out of range (0 means none)")
    try:
        state = STATES[b.state]
    except KeyError:
        raise ValueError(f"backend state must be one of {sorted(STATES)}, not {b.state!r}") from None
    return abi.lb4_backend(address=ip4_to_be32(b.address), port=port_to_be16(_port(b.port)),
                           proto=_proto(b.proto), state=state)


# -- Maglev hash (mirror of lb4_hash in bpf/include/lb.h) ------------------------------

_M32 = 0xFFFFFFFF
_JHASH_INITVAL = 0xDEADBEEF
_HASH_SEED = 0x63696C69


def _rol32(w: int, s: int) -> int:
    return ((w << s) | (w >> (32 - s))) & _M32


def jhash_3words(a: int, b: int, c: int, initval: int) -> int:
    initval = (initval + _JHASH_INITVAL + (3 << 2)) & _M32
    a, b, c = (a + initval) & _M32, (b + initval) & _M32, (c + initval) & _M32
    c ^= b; c = (c - _rol32(b, 14)) & _M32  # noqa: E702
    a ^= c; a = (a - _rol32(c, 11)) & _M32  # noqa: E702
    b ^= a; b = (b - _rol32(a, 25)) & _M32  # noqa: E702
    c ^= b; c = (c - _rol32(b, 16)) & _M32  # noqa: E702
    a ^= c; a = (a - _rol32(c, 4)) & _M32  # noqa: E702
    b ^= a; b = (b - _rol32(a, 14)) & _M32  # noqa: E702
    c ^= b; c = (c - _rol32(b, 24)) & _M32  # noqa: E702
    return c


def flow_hash(saddr: str, daddr: str, sport: int, dport: int, proto: int) -> int:
    """The hash the datapath computes for a flow (as the client sent it, to the frontend)."""
    ports = (port_to_be16(dport) << 16) | port_to_be16(sport)
    return jhash_3words(ip4_to_be32(saddr), ip4_to_be32(daddr), ports, _HASH_SEED ^ proto)


def maglev_slot(saddr: str, daddr: str, sport: int, dport: int, proto: int, m: int) -> int:
    """Index into a service's Maglev table that the datapath uses for this flow."""
    return flow_hash(saddr, daddr, sport, dport, proto) % m


def _flag_names(flags: int, flags2: int) -> list[str]:
    names = [n for bit, n in _FLAG_NAMES if flags & bit]
    names += [n for bit, n in _FLAG2_NAMES if flags2 & bit]
    return names


def _kind_name(flags: int) -> str:
    for name in ("NodePort", "LoadBalancer", "ExternalIP"):
        if flags & KINDS[name] & ~abi.SVC_F_ROUTABLE:
            return name
    return "ClusterIP"


class ServiceTable:
    """The LB maps of one node. ``get_map(name)`` returns the typed BpfMap."""

    def __init__(self, get_map: Callable[[str], object], maglev_m: int):
        self._get = get_map
        self.maglev_m = maglev_m

    # -- writes --------------------------------------------------------------
    def upsert_service(self, svc: LBService) -> None:
        self.upsert_services([svc])

    def upsert_services(self, specs: Iterable[LBService]) -> None:
        """Program many frontends with a handful of batched syscalls (the reconciler's
        full sync); same ordering guarantees as one upsert_service."""
        specs = list(specs)
        if not specs:
            return
        plans = [self._plan(s) for s in specs]
        keys = [p["key0"] for p in plans]
        if len({bytes(k) for k in keys}) != len(keys):
            raise ValueError("the same frontend and scope appears twice")
        services = self._get(MAP_SERVICES)
        old = self._lookup_many(services, keys + [p["other0"] for p in plans])

        backends: dict[int, abi.lb4_backend] = {}
        for p in plans:
            for bid, val in p["backends"]:
                prev = backends.get(bid)
                if prev is not None and bytes(prev) != bytes(val):
                    raise ValueError(f"backend {bid} given twice with different values")
                backends[bid] = val
        self._get(MAP_BACKENDS).update_batch((ctypes.c_uint32(i), v) for i, v in backends.items())
        services.update_batch([kv for p in plans for kv in p["slots"]])
        for p in plans:
            if p["maglev"] is not None:
                self._write_maglev(p["mkey"], p["maglev"])
        self._get(MAP_REV_NAT).update_batch(
            (ctypes.c_uint16(p["spec"].rev_nat_index), p["revnat"]) for p in plans)

        entries = []
        batch_keys = {bytes(k) for k in keys}
        for p in plans:
            val = p["entry"]
            if p["scope"] == abi.LB_SCOPE_EXT and bytes(p["other0"]) in old:
                val.flags2 |= abi.SVC_F2_TWO_SCOPES
            if p["scope"] == abi.LB_SCOPE_EXT and bytes(p["other0"]) in batch_keys:
                val.flags2 |= abi.SVC_F2_TWO_SCOPES
            entries.append((p["key0"], val))
        services.update_batch(entries)

        # An internal scope makes its external entry (written earlier) consult it.
        for p in plans:
            if p["scope"] == abi.LB_SCOPE_INT and bytes(p["other0"]) not in batch_keys:
                self._set_two_scopes(p["other0"], True)

        stale, drop_maglev = [], []
        for p in plans:
            prev = old.get(bytes(p["key0"]))
            if prev is not None:
                stale += [self._slot_key(p["key0"], i) for i in range(p["count"] + 1, prev.count + 1)]
                if p["maglev"] is None and prev.flags2 & abi.SVC_F2_MAGLEV:
                    drop_maglev.append(p["mkey"])
        services.delete_batch(stale)
        maglev = self._get(MAP_MAGLEV)
        for k in drop_maglev:
            maglev.delete(k)

    def _plan(self, s: LBService) -> dict:
        if not 1 <= s.rev_nat_index <= 0xFFFF:
            raise ValueError(f"rev_nat_index {s.rev_nat_index} out of range 1..65535")
        if s.kind not in KINDS:
            raise ValueError(f"kind must be one of {sorted(KINDS)}, not {s.kind!r}")
        if s.algorithm not in ALGORITHMS:
            raise ValueError(f"algorithm must be one of {ALGORITHMS}, not {s.algorithm!r}")
        if not 0 <= s.affinity_timeout < 1 << 32:
            raise ValueError(f"affinity_timeout {s.affinity_timeout} out of range")
        scope = _scope(s.scope)
        key0 = service_key(s.address, s.port, s.proto, s.scope)
        other0 = service_key(s.address, s.port, s.proto, "internal" if scope == abi.LB_SCOPE_EXT else "external")
        backends = [(b.id, _backend_value(b)) for b in s.backends]
        if len({b.id for b in s.backends}) != len(s.backends):
            raise ValueError("duplicate backend id")
        active = [b.id for b in s.backends if b.state == "active"]
        if len(active) > 0xFFFF:
            raise ValueError("more than 65535 active backends")
        slots = [(self._slot_key(key0, i + 1), abi.lb4_service(backend_id=bid)) for i, bid in enumerate(active)]

        flags, flags2 = KINDS[s.kind], 0
        if s.local_only:
            if scope == abi.LB_SCOPE_EXT:
                flags |= abi.SVC_F_EXT_LOCAL_SCOPE
            else:
                flags2 |= abi.SVC_F2_INT_LOCAL_SCOPE
        if s.affinity_timeout:
            flags |= abi.SVC_F_AFFINITY
        maglev = None
        if s.algorithm == "maglev":
            flags2 |= abi.SVC_F2_MAGLEV
            table = list(s.maglev_table or [])
            if active:
                if len(table) != self.maglev_m:
                    raise ValueError(f"maglev_table has {len(table)} entries, the node's M is {self.maglev_m}")
                unknown = set(table) - set(active)
                if unknown:
                    raise ValueError(f"maglev_table names backends that are not active: {sorted(unknown)[:5]}")
                maglev = table
        mkey = abi.lb4_maglev_key(rev_nat_index=s.rev_nat_index, scope=scope)
        entry = abi.lb4_service(count=len(active), rev_nat_index=s.rev_nat_index, flags=flags, flags2=flags2,
                                affinity_timeout=s.affinity_timeout)
        revnat = abi.lb4_reverse_nat(address=ip4_to_be32(s.address), port=port_to_be16(_port(s.port)))
        return dict(spec=s, scope=scope, key0=key0, other0=other0, backends=backends, slots=slots,
                    count=len(active), entry=entry, maglev=maglev, mkey=mkey, revnat=revnat)

    @staticmethod
    def _slot_key(key0: abi.lb4_key, slot: int) -> abi.lb4_key:
        k = abi.lb4_key.from_buffer_copy(key0)
        k.backend_slot = slot
        return k

    def _lookup_many(self, m, keys: list) -> dict[bytes, abi.lb4_service]:
        # Past a few dozen keys one dump is cheaper than a syscall per key.
        if len(keys) > 64:
            want = {bytes(k) for k in keys}
            return {bytes(k): v for k, v in m.lookup_batch() if k.backend_slot == 0 and bytes(k) in want}
        out = {}
        for k in keys:
            v = m.lookup(k)
            if v is not None:
                out[bytes(k)] = v
        return out

    def _set_two_scopes(self, ext_key: abi.lb4_key, on: bool) -> None:
        services = self._get(MAP_SERVICES)
        cur = services.lookup(ext_key)
        if cur is None:
            return
        new = cur.flags2 | abi.SVC_F2_TWO_SCOPES if on else cur.flags2 & ~abi.SVC_F2_TWO_SCOPES
        if new != cur.flags2:
            cur.flags2 = new
            services.update(ext_key, cur, lb.BPF_EXIST)

    def _write_maglev(self, mkey: abi.lb4_maglev_key, table: list[int]) -> None:
        """A fresh inner array, filled, then swapped in with one update of the outer map:
        readers see the old table or the new one, never a mix."""
        fd = lb.map_create(lb.BPF_MAP_TYPE_ARRAY, "cilia_maglev_in", 4, 4, self.maglev_m, lb.BPF_F_INNER_MAP)
        try:
            keys = (ctypes.c_uint32 * len(table))(*range(len(table)))
            vals = (ctypes.c_uint32 * len(table))(*table)
            lb.map_update_batch(fd, keys, vals, len(table))
            self._get(MAP_MAGLEV).update(mkey, ctypes.c_uint32(fd))
        finally:
            os.close(fd)  # the outer map holds its own reference

    def delete_service(self, address: str, port: int, proto, scope: str = "external") -> bool:
        """Remove one frontend scope; the reverse NAT entry goes with the frontend's last
        scope. Established flows lose their translation, as in Cilium. True if it existed."""
        services = self._get(MAP_SERVICES)
        key0 = service_key(address, port, proto, scope)
        cur = services.lookup(key0)
        if cur is None:
            return False
        services.delete(key0)
        services.delete_batch([self._slot_key(key0, i) for i in range(1, cur.count + 1)])
        self._get(MAP_MAGLEV).delete(abi.lb4_maglev_key(rev_nat_index=cur.rev_nat_index, scope=key0.scope))
        other = service_key(address, port, proto, "internal" if scope == "external" else "external")
        if scope == "internal":
            self._set_two_scopes(other, False)
        if services.lookup(other) is None:
            self._get(MAP_REV_NAT).delete(ctypes.c_uint16(cur.rev_nat_index))
        return True

    def delete_backend(self, backend_id: int) -> bool:
        """For the control plane once no service references the backend (terminating
        backends are kept until then for their established flows)."""
        return self._get(MAP_BACKENDS).delete(ctypes.c_uint32(backend_id))

    # -- reads ---------------------------------------------------------------
    def backends(self) -> dict[int, dict]:
        return {int(k.value): {"id": int(k.value), "address": be32_to_ip4(v.address), "port": be16_to_port(v.port),
                               "proto": v.proto, "state": _STATE_NAMES.get(v.state, str(v.state))}
                for k, v in self._get(MAP_BACKENDS).lookup_batch()}

    def services(self) -> list[dict]:
        """Like `cilium bpf lb list`: one row per frontend scope with its slot backends."""
        entries, slots = {}, {}
        for k, v in self._get(MAP_SERVICES).lookup_batch():
            fe = (k.address, k.dport, k.proto, k.scope)
            if k.backend_slot == 0:
                entries[fe] = v
            else:
                slots.setdefault(fe, {})[k.backend_slot] = v.backend_id
        bes = self.backends()
        out = []
        for fe, v in entries.items():
            addr, port, proto = be32_to_ip4(fe[0]), be16_to_port(fe[1]), _PROTO_NAMES.get(fe[2], str(fe[2]))
            rows = []
            for slot in range(1, v.count + 1):
                bid = slots.get(fe, {}).get(slot)
                b = bes.get(bid) if bid else None
                rows.append({"slot": slot, "id": bid, "address": b["address"] if b else None,
                             "port": b["port"] if b else None, "state": b["state"] if b else "missing"})
            out.append({
                "frontend": f"{addr}:{port}/{proto}", "address": addr, "port": port, "proto": proto,
                "scope": _SCOPE_NAMES.get(fe[3], str(fe[3])), "kind": _kind_name(v.flags),
                "rev_nat": v.rev_nat_index, "count": v.count, "flags": _flag_names(v.flags, v.flags2),
                "algorithm": "maglev" if v.flags2 & abi.SVC_F2_MAGLEV else "random",
                "affinity_timeout": v.affinity_timeout, "backends": rows,
            })
        return sorted(out, key=lambda s: (socket.inet_aton(s["address"]), s["port"], s["proto"], s["scope"]))

    def reverse_nat(self) -> dict[int, str]:
        return {int(k.value): f"{be32_to_ip4(v.address)}:{be16_to_port(v.port)}"
                for k, v in self._get(MAP_REV_NAT).lookup_batch()}

    def maglev_table(self, rev_nat_index: int, scope: str = "external") -> list[int] | None:
        inner_id = self._get(MAP_MAGLEV).lookup(abi.lb4_maglev_key(rev_nat_index=rev_nat_index,
                                                                   scope=_scope(scope)))
        if inner_id is None:
            return None
        fd = lb.map_get_fd_by_id(inner_id.value)
        try:
            n = lb.map_info_by_fd(fd).max_entries
            out = []
            key, val = ctypes.c_uint32(), ctypes.c_uint32()
            for i in range(n):
                key.value = i
                lb.map_lookup_elem(fd, key, val)
                out.append(val.value)
            return out
        finally:
            os.close(fd)

    def ct_entries(self) -> list[dict]:
        """Like `cilium bpf ct list global`, for the service flows conntrack tracks."""
        now = int(time.clock_gettime(time.CLOCK_MONOTONIC))  # bpf_ktime_get_ns()'s clock
        out = []
        for k, v in self._get(MAP_CT).lookup_batch():
            proto = _PROTO_NAMES.get(k.nexthdr, str(k.nexthdr))
            kind = "service" if k.flags & abi.CT_TUPLE_SERVICE else "reply"
            src = f"{be32_to_ip4(k.saddr)}:{be16_to_port(k.sport)}"
            dst = f"{be32_to_ip4(k.daddr)}:{be16_to_port(k.dport)}"
            out.append({
                "type": kind, "tuple": f"{proto} {src} -> {dst}", "proto": proto,
                "saddr": be32_to_ip4(k.saddr), "sport": be16_to_port(k.sport),
                "daddr": be32_to_ip4(k.daddr), "dport": be16_to_port(k.dport),
                "rev_nat": v.rev_nat_index, "backend": v.backend_id,
                "flags": [n for bit, n in _CT_FLAG_NAMES if v.flags & bit],
                "created": v.created, "last_seen": v.last_seen,
                "age": max(0, now - v.created), "idle": max(0, now - v.last_seen),
            })
        return sorted(out, key=lambda e: (e["type"], e["tuple"]))

    def flush_ct(self) -> int:
        m = self._get(MAP_CT)
        keys = [k for k, _ in m.lookup_batch()]
        return m.delete_batch(keys)

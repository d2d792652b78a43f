"""The node's datapath as the agent sees it: load once, then endpoints are map writes."""

from __future__ import annotations

import ctypes
import ipaddress
import os
import shutil
import socket
import struct
import time
from dataclasses import dataclass
from pathlib import Path

from . import abi, tc
from . import libbpf as _libbpf
from . import lb as lbmod
from . import policy as polmod
from .lb import LBBackend, LBService, ServiceTable  # noqa: F401  (the agent's LB API types)
from .loader import BpfObject
from .policy import PolicyEntry, PolicyTable  # noqa: F401  (the agent's policy API types)
from .reasons import reason_name

LXC_OBJECT = "bpf_lxc.o"
OVERLAY_OBJECT = "bpf_overlay.o"
HOST_OBJECT = "bpf_host.o"
SOCK_OBJECT = "bpf_sock.o"  # socket-level LB, loaded only with NodeConfig.socket_lb
PROG_FROM_CONTAINER = "cil_from_container"
PROG_TO_CONTAINER = "cil_to_container"
PROG_FROM_OVERLAY = "cil_from_overlay"
PROG_TO_OVERLAY = "cil_to_overlay"
PROG_FROM_NETDEV = "cil_from_netdev"
PROG_TO_NETDEV = "cil_to_netdev"
PROG_SOCK_CONNECT = "cil_sock4_connect"
PROG_SOCK_SENDMSG = "cil_sock4_sendmsg"
PROG_SOCK_RECVMSG = "cil_sock4_recvmsg"
PROG_SOCK_GETPEERNAME = "cil_sock4_getpeername"
MAP_SK_REV = "cilia_lb4_reverse_sk"
MAP_LXC = "cilia_lxc"
MAP_LXC_IF = "cilia_lxc_if"
MAP_METRICS = "cilia_metrics"
MAP_IPCACHE = "cilia_ipcache"
MAP_SNAT = "cilia_snat_v4"
MAP_SNAT_REV = "cilia_snat_v4_rev"
BPFFS = "/sys/fs/bpf"
PIN_BASE = "/sys/fs/bpf/cilia"

ROUTING_MODES = {"native": abi.ROUTING_NATIVE, "tunnel": abi.ROUTING_TUNNEL}
NAT_PORT_MIN, NAT_PORT_MAX = 32768, 60999  # Cilium's masquerade range (above NodePorts)

_MAP_TYPES = {
    MAP_LXC: (abi.endpoint_key, abi.endpoint_info),
    MAP_LXC_IF: (ctypes.c_uint32, abi.endpoint_info),
    MAP_METRICS: (abi.metrics_key, abi.metrics_value),
    MAP_IPCACHE: (abi.ipcache_key, abi.ipcache_value),
    MAP_SNAT: (abi.nat_key4, abi.nat_entry4),
    MAP_SNAT_REV: (abi.nat_key4, abi.nat_entry4),
    **lbmod.MAP_TYPES,
    MAP_SK_REV: (abi.lb4_sk_rev_key, abi.lb4_sk_rev_val),
    **polmod.MAP_TYPES,
}
# Every object is loaded with the same pin root, so a map pinned by the first is reused
# by the others: they all see one set of maps.
# Service translation happens in all three (pod egress, overlay and uplink delivery), so
# every object carries the LB, conntrack and NAT maps.
_ALL_MAPS = (MAP_LXC, MAP_LXC_IF, MAP_METRICS, MAP_IPCACHE, MAP_SNAT, MAP_SNAT_REV, *lbmod.MAP_TYPES)
# Policy is enforced wherever a packet leaves or enters a pod: the three tc objects.
_TC_MAPS = (*_ALL_MAPS, *polmod.MAP_TYPES)
_OBJECTS: dict[str, tuple[tuple[str, ...], tuple[str, ...]]] = {
    LXC_OBJECT: ((PROG_FROM_CONTAINER, PROG_TO_CONTAINER), _TC_MAPS),
    OVERLAY_OBJECT: ((PROG_FROM_OVERLAY, PROG_TO_OVERLAY), _TC_MAPS),
    HOST_OBJECT: ((PROG_FROM_NETDEV, PROG_TO_NETDEV), _TC_MAPS),
    SOCK_OBJECT: ((PROG_SOCK_CONNECT, PROG_SOCK_SENDMSG, PROG_SOCK_RECVMSG, PROG_SOCK_GETPEERNAME),
                  (*_ALL_MAPS, MAP_SK_REV)),
}
# Where each cgroup program attaches (socket-level LB).
_SOCK_ATTACH = (
    (PROG_SOCK_CONNECT, _libbpf.BPF_CGROUP_INET4_CONNECT),
    (PROG_SOCK_SENDMSG, _libbpf.BPF_CGROUP_UDP4_SENDMSG),
    (PROG_SOCK_RECVMSG, _libbpf.BPF_CGROUP_UDP4_RECVMSG),
    (PROG_SOCK_GETPEERNAME, _libbpf.BPF_CGROUP_INET4_GETPEERNAME),
)
_PROG_OBJECT = {p: o for o, (progs, _) in _OBJECTS.items() for p in progs}
_MAP_OBJECT = {m: o for o, (_, maps) in reversed(list(_OBJECTS.items())) for m in maps}
_DIRECTION_NAMES = {abi.METRIC_INGRESS: "INGRESS", abi.METRIC_EGRESS: "EGRESS"}
_PROTO_NAMES = {socket.IPPROTO_TCP: "TCP", socket.IPPROTO_UDP: "UDP", socket.IPPROTO_ICMP: "ICMP"}


# Address encodings live in addr.py; re-exported here, where callers always found them.
from .addr import be16_to_port, be32_to_ip4, bytes_to_mac, ip4_to_be32, mac_to_bytes, port_to_be16  # noqa: E402,F401


@dataclass
class NodeConfig:
    node_ip4: str
    router_ip4: str
    pod_cidr4: str
    node_id: int = 0
    flags: int = 0
    routing: str = "native"           # "native" | "tunnel"
    tunnel_ifindex: int = 0           # cilia_vxlan in the node netns; 0 = none
    native_ifindex: int = 0           # the uplink (eth0); 0 = none
    cluster_cidr4: str = "10.244.0.0/16"
    masquerade: bool = False
    nat_port_min: int = NAT_PORT_MIN
    nat_port_max: int = NAT_PORT_MAX
    # Service load balancing: source address of hairpinned flows (a pod reaching itself
    # through a service) and the Maglev table size M (one of lb.MAGLEV_SIZES).
    lb_hairpin_ip4: str = lbmod.HAIRPIN_IP4
    maglev_table_size: int = lbmod.MAGLEV_DEFAULT_M
    # Also load bpf_sock.o (cgroup connect4/sendmsg4/recvmsg4/getpeername4); the agent
    # then attaches it with attach_cgroup() to a cgroup v2 holding this node's pods.
    socket_lb: bool = False

    def to_abi(self) -> abi.cilia_config:
        if self.routing not in ROUTING_MODES:
            raise ValueError(f"routing must be one of {sorted(ROUTING_MODES)}, not {self.routing!r}")
        if not 1 <= self.nat_port_min <= self.nat_port_max <= 65535:
            raise ValueError(f"bad NAT port range {self.nat_port_min}-{self.nat_port_max}")
        if self.maglev_table_size not in lbmod.MAGLEV_SIZES:
            raise ValueError(f"maglev_table_size must be one of {lbmod.MAGLEV_SIZES}, not {self.maglev_table_size}")
        net = ipaddress.IPv4Network(self.pod_cidr4, strict=False)
        cluster = ipaddress.IPv4Network(self.cluster_cidr4, strict=False)
        return abi.cilia_config(
            node_ip4=ip4_to_be32(self.node_ip4),
            router_ip4=ip4_to_be32(self.router_ip4),
            pod_cidr4=ip4_to_be32(str(net.network_address)),
            pod_cidr4_mask=ip4_to_be32(str(net.netmask)),
            node_id=self.node_id,
            flags=self.flags,
            tunnel_ifindex=self.tunnel_ifindex,
            native_ifindex=self.native_ifindex,
            cluster_cidr4=ip4_to_be32(str(cluster.network_address)),
            cluster_cidr4_mask=ip4_to_be32(str(cluster.netmask)),
            routing=ROUTING_MODES[self.routing],
            masquerade=1 if self.masquerade else 0,
            nat_port_min=self.nat_port_min,
            nat_port_max=self.nat_port_max,
            lb_hairpin_ip4=ip4_to_be32(self.lb_hairpin_ip4) if self.lb_hairpin_ip4 else 0,
            lb_maglev_m=self.maglev_table_size,
        )


@dataclass(frozen=True)
class IpcacheEntry:
    prefix: str                       # normalized, e.g. "10.244.2.7/32"
    identity: int
    tunnel_endpoint: str | None = None
    flags: int = 0                    # abi.IPCACHE_F_*


def _ipcache_key(prefix: str) -> tuple[str, abi.ipcache_key]:
    net = ipaddress.IPv4Network(prefix, strict=False)
    return str(net), abi.ipcache_key(prefixlen=net.prefixlen, ip4=ip4_to_be32(str(net.network_address)))


def _ipcache_value(identity: int, tunnel_endpoint: str | None, flags: int) -> abi.ipcache_value:
    if not 0 <= identity < 1 << 32:
        raise ValueError(f"identity {identity} out of range")
    return abi.ipcache_value(sec_identity=identity,
                             tunnel_endpoint=ip4_to_be32(tunnel_endpoint) if tunnel_endpoint else 0,
                             flags=flags)


def _ipcache_tuple(v: abi.ipcache_value) -> tuple[int, str | None, int]:
    return (v.sec_identity, be32_to_ip4(v.tunnel_endpoint) if v.tunnel_endpoint else None, v.flags)


@dataclass
class EndpointEntry:
    ip4: str
    ifindex: int
    ep_id: int
    mac: str
    node_mac: str
    sec_id: int = 0
    flags: int = 0

    def to_abi(self) -> abi.endpoint_info:
        info = abi.endpoint_info(
            ifindex=self.ifindex, ip4=ip4_to_be32(self.ip4), ep_id=self.ep_id, flags=self.flags, sec_id=self.sec_id
        )
        info.mac[:] = list(mac_to_bytes(self.mac))
        info.node_mac[:] = list(mac_to_bytes(self.node_mac))
        return info

    @classmethod
    def from_abi(cls, info: abi.endpoint_info) -> "EndpointEntry":
        return cls(
            ip4=be32_to_ip4(info.ip4),
            ifindex=info.ifindex,
            ep_id=info.ep_id,
            mac=bytes_to_mac(info.mac),
            node_mac=bytes_to_mac(info.node_mac),
            sec_id=info.sec_id,
            flags=info.flags,
        )


def find_object(name: str, obj_dir: str | None = None) -> str:
    """obj_dir, else $CILIA_BPF_DIR, else <repo>/build."""
    base = obj_dir or os.environ.get("CILIA_BPF_DIR") or str(Path(__file__).resolve().parents[3] / "build")
    path = os.path.join(base, name)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"BPF object {path} not found (run `make bpf`)")
    return path


class NodeDatapath:
    """The node's three BPF objects (pod veths, VXLAN device, uplink) sharing one set of
    pinned maps under ``pin_dir``."""

    def __init__(self, pin_dir: str, config: NodeConfig, obj_dir: str | None = None):
        self.pin_dir = pin_dir
        self.config = config
        self.obj_dir = obj_dir
        self._objs: dict[str, BpfObject] = {}
        self._policy: PolicyTable | None = None

    # -- lifecycle ---------------------------------------------------------
    def load(self) -> "NodeDatapath":
        """Load bpf_lxc.o, bpf_overlay.o and bpf_host.o with this node's CONFIG. Maps
        already pinned under pin_dir are reused with their contents (the datapath keeps
        forwarding across agent restarts) or, if their layout changed, refused with
        PinnedMapMismatch. Nothing is attached here: attach_* decide where programs run."""
        paths = {name: find_object(name, self.obj_dir) for name in _OBJECTS
                 if name != SOCK_OBJECT or self.config.socket_lb}
        os.makedirs(self.pin_dir, exist_ok=True)
        rodata = self.config.to_abi()
        objs: dict[str, BpfObject] = {}
        try:
            for name, path in paths.items():
                map_types = {m: _MAP_TYPES[m] for m in _OBJECTS[name][1]}
                objs[name] = BpfObject.open(path, pin_root=self.pin_dir, rodata=rodata, map_types=map_types)
                objs[name].load()
        except BaseException:
            for o in objs.values():
                o.close()
            raise
        self._objs = objs
        return self

    def close(self) -> None:
        """Drop our handles. Attached programs and pinned maps stay in the kernel."""
        objs, self._objs = self._objs, {}
        self._policy = None
        for o in objs.values():
            o.close()

    def __enter__(self) -> "NodeDatapath":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def _object(self, name: str) -> BpfObject:
        if not self._objs:
            raise RuntimeError("NodeDatapath not loaded")
        return self._objs[name]

    @property
    def obj(self) -> BpfObject:
        """The pod object (bpf_lxc.o)."""
        return self._object(LXC_OBJECT)

    @property
    def objects(self) -> dict[str, BpfObject]:
        return dict(self._objs)

    def program_fd(self, name: str) -> int:
        try:
            owner = _PROG_OBJECT[name]
        except KeyError:
            raise KeyError(f"no program {name!r} in cilia's objects") from None
        return self._object(owner).program_fd(name)

    def _map(self, name: str):
        kt, vt = _MAP_TYPES[name]
        return self._object(_MAP_OBJECT[name]).map(name, kt, vt)

    # -- attachment (acts in the calling thread's netns) -------------------
    def attach_endpoint(self, ifindex: int) -> None:
        tc.tc_attach(ifindex, self.program_fd(PROG_FROM_CONTAINER), "ingress")
        tc.tc_attach(ifindex, self.program_fd(PROG_TO_CONTAINER), "egress")

    def detach_endpoint(self, ifindex: int) -> None:
        # A deleted pod netns takes the veth with it; nothing left to detach is fine.
        tc.tc_detach(ifindex, "ingress")
        tc.tc_detach(ifindex, "egress")

    def attach_overlay(self, ifindex: int) -> None:
        """cilia_vxlan (external/collect_md): decapsulated delivery in, encapsulation out."""
        tc.tc_attach(ifindex, self.program_fd(PROG_FROM_OVERLAY), "ingress")
        tc.tc_attach(ifindex, self.program_fd(PROG_TO_OVERLAY), "egress")

    def detach_overlay(self, ifindex: int) -> None:
        tc.tc_detach(ifindex, "ingress")
        tc.tc_detach(ifindex, "egress")

    def attach_cgroup(self, cgroup_path: str) -> None:
        """Socket-level LB for every process in the cgroup v2 directory (and below).
        BPF_F_ALLOW_MULTI: other programs on the cgroup keep running; attaching again
        after a reload adds the new programs, so detach_cgroup the old ones first."""
        if not self.config.socket_lb:
            raise RuntimeError("socket-level LB is off (NodeConfig.socket_lb)")
        fd = os.open(cgroup_path, os.O_RDONLY | os.O_DIRECTORY)
        try:
            for prog, attach_type in _SOCK_ATTACH:
                _libbpf.prog_attach(self.program_fd(prog), fd, attach_type, _libbpf.BPF_F_ALLOW_MULTI)
        finally:
            os.close(fd)

    def detach_cgroup(self, cgroup_path: str) -> int:
        """Detach this load's socket programs; returns how many were attached."""
        fd = os.open(cgroup_path, os.O_RDONLY | os.O_DIRECTORY)
        try:
            return sum(1 for prog, attach_type in _SOCK_ATTACH
                       if _libbpf.prog_detach(self.program_fd(prog), fd, attach_type) == 0)
        finally:
            os.close(fd)

    def attach_netdev(self, ifindex: int) -> None:
        """The uplink: reverse SNAT and pod delivery in, masquerade out."""
        tc.tc_attach(ifindex, self.program_fd(PROG_FROM_NETDEV), "ingress")
        tc.tc_attach(ifindex, self.program_fd(PROG_TO_NETDEV), "egress")

    def detach_netdev(self, ifindex: int) -> None:
        tc.tc_detach(ifindex, "ingress")
        tc.tc_detach(ifindex, "egress")

    # -- ipcache -----------------------------------------------------------
    def upsert_ipcache(self, prefix: str, identity: int, tunnel_endpoint: str | None = None,
                       flags: int = 0) -> None:
        """prefix "a.b.c.d" (a /32) or "a.b.c.d/n"; host bits are masked off."""
        _, key = _ipcache_key(prefix)
        self._map(MAP_IPCACHE).update(key, _ipcache_value(identity, tunnel_endpoint, flags))

    def delete_ipcache(self, prefix: str) -> bool:
        _, key = _ipcache_key(prefix)
        return self._map(MAP_IPCACHE).delete(key)

    def _ipcache_state(self) -> dict[str, tuple[int, str | None, int]]:
        out = {}
        for k, v in self._map(MAP_IPCACHE).lookup_batch():
            out[f"{be32_to_ip4(k.ip4)}/{k.prefixlen}"] = _ipcache_tuple(v)
        return out

    def ipcache(self) -> list[IpcacheEntry]:
        entries = [IpcacheEntry(p, *t) for p, t in self._ipcache_state().items()]
        nets = {e.prefix: ipaddress.IPv4Network(e.prefix) for e in entries}
        return sorted(entries, key=lambda e: (nets[e.prefix].network_address, nets[e.prefix].prefixlen))

    def sync_ipcache(self, desired: dict[str, tuple[int, str | None, int]]) -> tuple[int, int]:
        """Make the map equal ``desired`` {prefix: (identity, tunnel_endpoint, flags)}.
        Changed and new entries are written first, stale ones deleted after, both in
        batches: a prefix that stays desired is never missing, not even briefly.
        Returns (upserts, deletes)."""
        want: dict[str, tuple[abi.ipcache_key, tuple[int, str | None, int]]] = {}
        for prefix, (identity, tep, flags) in desired.items():
            norm, key = _ipcache_key(prefix)
            want[norm] = (key, (identity, tep or None, flags))
        have = self._ipcache_state()
        m = self._map(MAP_IPCACHE)
        upserts = [(key, _ipcache_value(*val)) for p, (key, val) in want.items() if have.get(p) != val]
        deletes = [_ipcache_key(p)[1] for p in have if p not in want]
        m.update_batch(upserts)
        m.delete_batch(deletes)
        return len(upserts), len(deletes)

    # -- NAT ---------------------------------------------------------------
    def nat_entries(self) -> list[dict]:
        """Both directions of the SNAT table, decoded like `cilium bpf nat list`:
        OUT entries translate the source (XLATE_SRC), IN entries the destination."""
        now = int(time.clock_gettime(time.CLOCK_MONOTONIC))  # bpf_ktime_get_ns()'s clock
        out = []
        for name, direction, xlate in ((MAP_SNAT, "OUT", "XLATE_SRC"), (MAP_SNAT_REV, "IN", "XLATE_DST")):
            for k, v in self._map(name).lookup_batch():
                out.append({
                    "direction": direction,
                    "protocol": _PROTO_NAMES.get(k.nexthdr, str(k.nexthdr)),
                    "saddr": be32_to_ip4(k.saddr),
                    "sport": be16_to_port(k.sport),
                    "daddr": be32_to_ip4(k.daddr),
                    "dport": be16_to_port(k.dport),
                    "xlate": xlate,
                    "to_addr": be32_to_ip4(v.to_addr),
                    "to_port": be16_to_port(v.to_port),
                    "created": v.created,
                    "last_seen": v.last_seen,
                    "idle_seconds": max(0, now - v.last_seen),
                })
        return sorted(out, key=lambda e: (e["direction"] != "OUT", e["protocol"], e["saddr"], e["sport"],
                                          e["daddr"], e["dport"]))

    # -- service load balancing ---------------------------------------------
    @property
    def lb(self) -> ServiceTable:
        return ServiceTable(self._map, self.config.maglev_table_size)

    def upsert_service(self, rev_nat_index: int, address: str, port: int, proto, backends: list[LBBackend], *,
                       kind: str = "ClusterIP", scope: str = "external", algorithm: str = "random",
                       maglev_table: list[int] | None = None, affinity_timeout: int = 0,
                       local_only: bool = False) -> None:
        """One frontend (address:port/proto) in one scope. ``scope="internal"`` is the
        separate east-west backend set of a frontend whose external set differs (ETP or
        ITP Local); a frontend with one set uses only "external", for both directions.
        ``local_only`` marks that set as node-local (ETP/ITP Local: the caller passes only
        this node's backends). ``maglev_table`` (len == config.maglev_table_size, ids of
        active backends) is required with algorithm="maglev" when there are backends.
        ``affinity_timeout`` > 0 turns on ClientIP session affinity (seconds)."""
        self.lb.upsert_service(LBService(rev_nat_index, address, port, proto, list(backends), kind=kind,
                                         scope=scope, algorithm=algorithm, maglev_table=maglev_table,
                                         affinity_timeout=affinity_timeout, local_only=local_only))

    def upsert_services(self, services: list[LBService]) -> None:
        """Many frontends in a few batched map writes (full resync)."""
        self.lb.upsert_services(services)

    def delete_service(self, address: str, port: int, proto, scope: str = "external") -> bool:
        return self.lb.delete_service(address, port, proto, scope)

    def delete_backend(self, backend_id: int) -> bool:
        return self.lb.delete_backend(backend_id)

    def services(self) -> list[dict]:
        return self.lb.services()

    def lb_backends(self) -> dict[int, dict]:
        return self.lb.backends()

    def maglev_table(self, rev_nat_index: int, scope: str = "external") -> list[int] | None:
        return self.lb.maglev_table(rev_nat_index, scope)

    def ct_entries(self) -> list[dict]:
        return self.lb.ct_entries()

    # -- endpoints ---------------------------------------------------------
    def upsert_endpoint(self, ep: EndpointEntry) -> None:
        """Policy bits (abi.EP_F_POLICY_*) in ep.flags are written as given; without any,
        an existing entry of the same endpoint keeps its own, so rewriting an endpoint
        (new identity, restore) never drops its enforcement. A new endpoint that must not
        pass unenforced traffic even briefly is created with them (policy synced first)."""
        info = ep.to_abi()
        lxc, lxc_if = self._map(MAP_LXC), self._map(MAP_LXC_IF)
        key = abi.endpoint_key(ip4=info.ip4)
        old = lxc.lookup(key)
        if old is not None and old.ep_id == info.ep_id and not info.flags & abi.EP_F_POLICY_MASK:
            info.flags |= old.flags & abi.EP_F_POLICY_MASK
        if old is not None and old.ifindex != info.ifindex:
            self._delete_if_entry(old.ifindex, info.ip4)
        if info.ifindex:
            lxc_if.update(ctypes.c_uint32(info.ifindex), info)
        lxc.update(key, info)

    def _delete_if_entry(self, ifindex: int, ip4_be: int) -> bool:
        """Delete cilia_lxc_if[ifindex] only if it still describes this address (the
        ifindex may have been reused by another endpoint meanwhile)."""
        lxc_if = self._map(MAP_LXC_IF)
        k = ctypes.c_uint32(ifindex)
        cur = lxc_if.lookup(k)
        if cur is None or cur.ip4 != ip4_be:
            return False
        return lxc_if.delete(k)

    def delete_endpoint(self, ip4: str, ifindex: int) -> bool:
        """True if anything was deleted."""
        ip_be = ip4_to_be32(ip4)
        a = self._map(MAP_LXC).delete(abi.endpoint_key(ip4=ip_be))
        b = self._delete_if_entry(ifindex, ip_be) if ifindex else False
        return a or b

    def set_endpoint_policy_flags(self, ip4: str, ifindex: int, ingress: bool, egress: bool,
                                  audit: bool) -> None:
        """Which directions of the endpoint are enforced (an unenforced one allows all)
        and whether its policy drops are only counted (audit). Written to both endpoint
        maps: the sender's copy (cilia_lxc_if) serves egress, the receiver's (cilia_lxc)
        ingress. Raises KeyError for an unknown endpoint."""
        lxc, lxc_if = self._map(MAP_LXC), self._map(MAP_LXC_IF)
        key = abi.endpoint_key(ip4=ip4_to_be32(ip4))
        info = lxc.lookup(key)
        if info is None:
            raise KeyError(f"no endpoint {ip4}")
        if ifindex and info.ifindex != ifindex:
            raise ValueError(f"endpoint {ip4} is on ifindex {info.ifindex}, not {ifindex}")
        bits = ((abi.EP_F_POLICY_INGRESS_ENFORCED if ingress else 0)
                | (abi.EP_F_POLICY_EGRESS_ENFORCED if egress else 0)
                | (abi.EP_F_POLICY_AUDIT if audit else 0))
        info.flags = (info.flags & ~abi.EP_F_POLICY_MASK) | bits
        if info.ifindex:
            lxc_if.update(ctypes.c_uint32(info.ifindex), info)
        lxc.update(key, info)

    def endpoints(self) -> list[EndpointEntry]:
        eps = [EndpointEntry.from_abi(v) for _, v in self._map(MAP_LXC).lookup_batch()]
        return sorted(eps, key=lambda e: ipaddress.IPv4Address(e.ip4))

    # -- network policy ------------------------------------------------------
    @property
    def policy(self) -> PolicyTable:
        # One table per load: it remembers what each endpoint has in the map.
        if self._policy is None:
            self._object(LXC_OBJECT)
            self._policy = PolicyTable(self._map)
        return self._policy

    def sync_policy(self, ep_id: int, entries: list[PolicyEntry]) -> tuple[int, int]:
        """Make the endpoint's policy map entries equal ``entries``: new and changed
        ones are written first, stale ones deleted after (batched), so no allow that
        stays is ever missing. Returns (upserts, deletes)."""
        return self.policy.sync(ep_id, entries)

    def apply_policy_diff(self, ep_id: int, upserts: dict, deletes: list) -> tuple[int, int]:
        """Write only what changed since the endpoint's last sync (see PolicyTable.apply)."""
        return self.policy.apply(ep_id, upserts, deletes)

    def delete_policy(self, ep_id: int) -> int:
        """Remove every entry of the endpoint; returns how many there were."""
        return self.policy.delete(ep_id)

    def policy_entries(self, ep_id: int | None = None) -> list[dict]:
        """The policy map as the kernel holds it (all endpoints, or one)."""
        return self.policy.entries(ep_id)

    def policy_ct_entries(self) -> list[dict]:
        return self.policy.ct_entries()

    def flush_policy_ct(self) -> int:
        """Forget the connections policy let through, so established ones are judged
        again by the current policy (their replies too, as new connections)."""
        return self.policy.flush_ct()

    # -- observability -----------------------------------------------------
    def metrics(self) -> list[dict]:
        """Counters by (reason, direction). Entries with ``audit`` True count packets
        that policy would have dropped for ``reason`` but audit mode forwarded (they are
        also in the forwarded count); drop counters never include them."""
        out = []
        for k, per_cpu in self._map(MAP_METRICS).lookup_batch():
            audit = bool(k.flags & abi.METRIC_F_AUDIT)
            out.append({
                "reason": k.reason,
                "reason_name": reason_name(k.reason) + (" (audit)" if audit else ""),
                "direction": _DIRECTION_NAMES.get(k.dir, f"UNKNOWN({k.dir})"),
                "audit": audit,
                "packets": sum(v.count for v in per_cpu),
                "bytes": sum(v.bytes for v in per_cpu),
            })
        return sorted(out, key=lambda m: (m["direction"], m["reason"], m["audit"]))

    # -- pins --------------------------------------------------------------
    @staticmethod
    def remove_pins(pin_dir: str) -> None:
        """Remove every pin under pin_dir, then pin_dir and its empty parents up to and
        including /sys/fs/bpf/cilia (rmdir only succeeds when no other node uses it)."""
        real = os.path.realpath(pin_dir)
        if not (real + "/").startswith(BPFFS + "/") or real == BPFFS:
            raise ValueError(f"refusing to remove pins outside {BPFFS}: {pin_dir}")
        if os.path.isdir(real):
            # bpffs pins are files and dirs; unlink drops the reference (maps die with
            # their last reference).
            shutil.rmtree(real)
        d = os.path.dirname(real)
        while (d + "/").startswith(PIN_BASE + "/"):
            try:
                os.rmdir(d)
            except OSError:
                break
            d = os.path.dirname(d)

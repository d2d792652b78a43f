"""The node's datapath as the agent sees it: load once, then endpoints are map writes."""

from __future__ import annotations

import ctypes
import ipaddress
import os
import shutil
import socket
import struct
from dataclasses import dataclass
from pathlib import Path

from . import abi, tc
from .loader import BpfObject
from .reasons import reason_name

LXC_OBJECT = "bpf_lxc.o"
PROG_FROM_CONTAINER = "cil_from_container"
PROG_TO_CONTAINER = "cil_to_container"
MAP_LXC = "cilia_lxc"
MAP_LXC_IF = "cilia_lxc_if"
MAP_METRICS = "cilia_metrics"
BPFFS = "/sys/fs/bpf"
PIN_BASE = "/sys/fs/bpf/cilia"

_MAP_TYPES = {
    MAP_LXC: (abi.endpoint_key, abi.endpoint_info),
    MAP_LXC_IF: (ctypes.c_uint32, abi.endpoint_info),
    MAP_METRICS: (abi.metrics_key, abi.metrics_value),
}
_DIRECTION_NAMES = {abi.METRIC_INGRESS: "INGRESS", abi.METRIC_EGRESS: "EGRESS"}


# -- address encoding (maps hold IPv4 in network byte order, MACs as 6 bytes) --------

def ip4_to_be32(ip: str) -> int:
    """The u32 whose in-memory bytes are the address in network order."""
    return struct.unpack("=I", socket.inet_aton(ip))[0]


def be32_to_ip4(value: int) -> str:
    return socket.inet_ntoa(struct.pack("=I", value))


def mac_to_bytes(mac: str) -> bytes:
    b = bytes(int(x, 16) for x in mac.split(":"))
    if len(b) != 6:
        raise ValueError(f"bad MAC address {mac!r}")
    return b


def bytes_to_mac(b) -> str:
    return ":".join(f"{x:02x}" for x in bytes(b))


@dataclass
class NodeConfig:
    node_ip4: str
    router_ip4: str
    pod_cidr4: str
    node_id: int = 0
    flags: int = 0

    def to_abi(self) -> abi.cilia_config:
        net = ipaddress.IPv4Network(self.pod_cidr4, strict=False)
        return abi.cilia_config(
            node_ip4=ip4_to_be32(self.node_ip4),
            router_ip4=ip4_to_be32(self.router_ip4),
            pod_cidr4=ip4_to_be32(str(net.network_address)),
            pod_cidr4_mask=ip4_to_be32(str(net.netmask)),
            node_id=self.node_id,
            flags=self.flags,
        )


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
    def __init__(self, pin_dir: str, config: NodeConfig, obj_dir: str | None = None):
        self.pin_dir = pin_dir
        self.config = config
        self.obj_dir = obj_dir
        self._obj: BpfObject | None = None

    # -- lifecycle ---------------------------------------------------------
    def load(self) -> "NodeDatapath":
        """Load bpf_lxc.o with this node's CONFIG. Maps already pinned under pin_dir are
        reused with their contents (the datapath keeps forwarding across agent restarts)
        or, if their layout changed, refused with PinnedMapMismatch."""
        path = find_object(LXC_OBJECT, self.obj_dir)
        os.makedirs(self.pin_dir, exist_ok=True)
        obj = BpfObject.open(path, pin_root=self.pin_dir, rodata=self.config.to_abi(), map_types=_MAP_TYPES)
        try:
            obj.load()
        except BaseException:
            obj.close()
            raise
        self._obj = obj
        return self

    def close(self) -> None:
        """Drop our handles. Attached programs and pinned maps stay in the kernel."""
        if self._obj is not None:
            self._obj.close()
            self._obj = None

    def __enter__(self) -> "NodeDatapath":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    @property
    def obj(self) -> BpfObject:
        if self._obj is None:
            raise RuntimeError("NodeDatapath not loaded")
        return self._obj

    def program_fd(self, name: str) -> int:
        return self.obj.program_fd(name)

    def _map(self, name: str):
        kt, vt = _MAP_TYPES[name]
        return self.obj.map(name, kt, vt)

    # -- attachment --------------------------------------------------------
    def attach_endpoint(self, ifindex: int) -> None:
        tc.tc_attach(ifindex, self.program_fd(PROG_FROM_CONTAINER), "ingress")
        tc.tc_attach(ifindex, self.program_fd(PROG_TO_CONTAINER), "egress")

    def detach_endpoint(self, ifindex: int) -> None:
        # A deleted pod netns takes the veth with it; nothing left to detach is fine.
        tc.tc_detach(ifindex, "ingress")
        tc.tc_detach(ifindex, "egress")

    # -- endpoints ---------------------------------------------------------
    def upsert_endpoint(self, ep: EndpointEntry) -> None:
        info = ep.to_abi()
        lxc, lxc_if = self._map(MAP_LXC), self._map(MAP_LXC_IF)
        key = abi.endpoint_key(ip4=info.ip4)
        old = lxc.lookup(key)
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

    def endpoints(self) -> list[EndpointEntry]:
        eps = [EndpointEntry.from_abi(v) for _, v in self._map(MAP_LXC).lookup_batch()]
        return sorted(eps, key=lambda e: ipaddress.IPv4Address(e.ip4))

    # -- observability -----------------------------------------------------
    def metrics(self) -> list[dict]:
        out = []
        for k, per_cpu in self._map(MAP_METRICS).lookup_batch():
            out.append({
                "reason": k.reason,
                "reason_name": reason_name(k.reason),
                "direction": _DIRECTION_NAMES.get(k.dir, f"UNKNOWN({k.dir})"),
                "packets": sum(v.count for v in per_cpu),
                "bytes": sum(v.bytes for v in per_cpu),
            })
        return sorted(out, key=lambda m: (m["direction"], m["reason"]))

    # -- pins --------------------------------------------------------------
    @staticmethod
    def remove_pins(pin_dir: str) -> None:
        """Remove every pin under pin_dir, then pin_dir and its empty parents below
        /sys/fs/bpf/cilia (which itself is shared by every node and kept)."""
        real = os.path.realpath(pin_dir)
        if not (real + "/").startswith(BPFFS + "/") or real == BPFFS:
            raise ValueError(f"refusing to remove pins outside {BPFFS}: {pin_dir}")
        if os.path.isdir(real):
            # bpffs pins are files and dirs; unlink drops the reference (maps die with
            # their last reference).
            shutil.rmtree(real)
        d = os.path.dirname(real)
        while (d + "/").startswith(PIN_BASE + "/") and d != PIN_BASE:
            try:
                os.rmdir(d)
            except OSError:
                break
            d = os.path.dirname(d)

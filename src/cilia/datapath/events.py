"""Datapath events (bpf/include/events.h): the ring buffer reader and the decoder.

The ring is read through its mmapped pages, not libbpf's ring_buffer__poll: a ctypes
callback per event caps out at a few 100k events/s here, while walking the mapped ring
from Python copies each record once and leaves the CPU for decoding and enrichment. The
map fd is pollable (readable when records are waiting), so the agent waits for events
with its event loop's add_reader.
"""

from __future__ import annotations

import ctypes
import mmap
import os
import socket
import struct
from ctypes import Structure, c_uint8, c_uint16, c_uint32, c_uint64
from dataclasses import dataclass

from . import libbpf as lb

BPF_MAP_TYPE_RINGBUF = 27
MAP_EVENTS = "cilia_events"
MAP_EVENTS_LOST = "cilia_events_lost"

# cilia_config.flags
CONFIG_F_EVENTS_PER_PACKET = 0x1
CONFIG_F_EVENTS_OFF = 0x2
# Cilium's monitorAggregation levels we implement, and what they set in CONFIG.flags.
AGGREGATION_FLAGS = {"none": CONFIG_F_EVENTS_PER_PACKET, "medium": 0, "disabled": CONFIG_F_EVENTS_OFF}

EVENT_CAP = 128
EVENT_DROP = 1
EVENT_TRACE = 4
EVENT_POLICY_VERDICT = 5
EVENT_TYPE_NAMES = {EVENT_DROP: "drop", EVENT_TRACE: "trace", EVENT_POLICY_VERDICT: "policy-verdict"}

# Cilium's trace observation points (enum trace_point) and Hubble's names for them.
TRACE_TO_LXC, TRACE_TO_PROXY, TRACE_TO_HOST, TRACE_TO_STACK, TRACE_TO_OVERLAY = 0, 1, 2, 3, 4
TRACE_FROM_LXC, TRACE_FROM_PROXY, TRACE_FROM_HOST, TRACE_FROM_STACK = 5, 6, 7, 8
TRACE_FROM_OVERLAY, TRACE_FROM_NETWORK, TRACE_TO_NETWORK = 9, 10, 11
OBS_POINT_NAMES = {
    TRACE_TO_LXC: "TO_ENDPOINT", TRACE_TO_PROXY: "TO_PROXY", TRACE_TO_HOST: "TO_HOST",
    TRACE_TO_STACK: "TO_STACK", TRACE_TO_OVERLAY: "TO_OVERLAY", TRACE_FROM_LXC: "FROM_ENDPOINT",
    TRACE_FROM_PROXY: "FROM_PROXY", TRACE_FROM_HOST: "FROM_HOST", TRACE_FROM_STACK: "FROM_STACK",
    TRACE_FROM_OVERLAY: "FROM_OVERLAY", TRACE_FROM_NETWORK: "FROM_NETWORK", TRACE_TO_NETWORK: "TO_NETWORK",
}
# What `cilium monitor` prints after the arrow ("-> endpoint 12", "-> stack", ...).
OBS_POINT_MONITOR = {
    TRACE_TO_LXC: "endpoint", TRACE_TO_PROXY: "proxy", TRACE_TO_HOST: "host", TRACE_TO_STACK: "stack",
    TRACE_TO_OVERLAY: "overlay", TRACE_FROM_LXC: "from-endpoint", TRACE_FROM_PROXY: "from-proxy",
    TRACE_FROM_HOST: "from-host", TRACE_FROM_STACK: "from-stack", TRACE_FROM_OVERLAY: "from-overlay",
    TRACE_FROM_NETWORK: "from-network", TRACE_TO_NETWORK: "network",
}

CT_NEW, CT_ESTABLISHED, CT_REPLY, CT_RELATED = 0, 1, 2, 3
CT_STATE_NAMES = {CT_NEW: "new", CT_ESTABLISHED: "established", CT_REPLY: "reply", CT_RELATED: "related"}

EVT_F_INGRESS = 0x1
EVT_F_EGRESS = 0x2
EVT_F_SERVICE = 0x4

ACTION_ALLOW, ACTION_DENY, ACTION_AUDIT = 0, 1, 2
ACTION_NAMES = {ACTION_ALLOW: "allow", ACTION_DENY: "deny", ACTION_AUDIT: "audit"}
# Cilium's POLICY_MATCH_* and the names `cilium monitor` / Hubble use.
MATCH_NAMES = {0: "none", 1: "L3-Only", 2: "L3-L4", 3: "L4-Only", 4: "all", 5: "L3-Proto", 6: "Proto-Only"}

TCP_FLAG_BITS = (("FIN", 0x01), ("SYN", 0x02), ("RST", 0x04), ("PSH", 0x08), ("ACK", 0x10),
                 ("URG", 0x20), ("ECE", 0x40), ("CWR", 0x80))


class cilia_event(Structure):
    """Mirror of struct cilia_event (checked against the objects' BTF in the tests)."""
    _fields_ = [
        ("ktime_ns", c_uint64),
        ("ifindex", c_uint32),
        ("src_identity", c_uint32),
        ("dst_identity", c_uint32),
        ("orig_len", c_uint32),
        ("orig_daddr", c_uint32),
        ("rule_cookie", c_uint32),
        ("ep_id", c_uint16),
        ("orig_dport", c_uint16),
        ("cap_len", c_uint16),
        ("dport", c_uint16),
        ("type", c_uint8),
        ("subtype", c_uint8),
        ("ct_state", c_uint8),
        ("flags", c_uint8),
        ("action", c_uint8),
        ("match_type", c_uint8),
        ("proto", c_uint8),
        ("pad", c_uint8),
        ("data", c_uint8 * EVENT_CAP),
    ]


# The same layout for struct.unpack: the fields above, orig_daddr/orig_dport as raw bytes
# (network order), data last.
_HEAD = struct.Struct("<QIIIIIIH2sHHBBBBBBBx")
_HEAD_SIZE = _HEAD.size
assert _HEAD_SIZE == cilia_event.data.offset
EVENT_SIZE = ctypes.sizeof(cilia_event)


@dataclass(slots=True)
class Event:
    """One decoded datapath event."""
    type: int
    subtype: int
    ktime_ns: int
    ifindex: int
    src_identity: int
    dst_identity: int
    orig_len: int
    ep_id: int
    ct_state: int
    flags: int
    # policy verdict
    action: int = 0
    match_type: int = 0
    rule_cookie: int = 0
    proto: int = 0
    dport: int = 0
    # service frontend before DNAT ("" = none)
    orig_ip: str = ""
    orig_port: int = 0
    # packet
    l3: str = ""              # "IPv4" when the packet parsed as IPv4
    src_ip: str = ""
    dst_ip: str = ""
    ip_proto: int = 0
    src_port: int = 0
    dst_port: int = 0
    tcp_flags: int = 0
    icmp_type: int = 0
    icmp_code: int = 0
    src_mac: str = ""
    dst_mac: str = ""
    data: bytes = b""

    @property
    def type_name(self) -> str:
        return EVENT_TYPE_NAMES.get(self.type, str(self.type))

    @property
    def is_reply(self) -> bool:
        return self.ct_state == CT_REPLY

    def tcp_flag_names(self) -> list[str]:
        return [n for n, b in TCP_FLAG_BITS if self.tcp_flags & b]

    def to_dict(self) -> dict:
        d = {f: getattr(self, f) for f in self.__slots__ if f != "data"}
        d["data"] = self.data.hex()
        return d


def _mac(b: bytes) -> str:
    return b.hex(":")


_ETH_IP4 = struct.Struct("!6s6s2sBx2x2xHxB2x4s4s")  # Ethernet + the IPv4 fields we use
_PORTS_FLAGS = struct.Struct("!HH8xxB")           # TCP: ports ... flags (byte 13)
_PORTS = struct.Struct("!HH")


def parse_packet(ev: Event, pkt: bytes) -> None:
    """Fills ev's L2-L4 fields from the captured bytes (Ethernet first)."""
    n = len(pkt)
    if n < 34:
        if n >= 14:
            ev.dst_mac, ev.src_mac = pkt[0:6].hex(":"), pkt[6:12].hex(":")
        return
    dmac, smac, ethertype, vihl, frag, proto, saddr, daddr = _ETH_IP4.unpack_from(pkt, 0)
    ev.dst_mac, ev.src_mac = dmac.hex(":"), smac.hex(":")
    ihl = (vihl & 0x0F) * 4
    if ethertype != b"\x08\x00" or vihl >> 4 != 4 or ihl < 20:
        return
    ev.l3 = "IPv4"
    ev.ip_proto = proto
    ev.src_ip = socket.inet_ntoa(saddr)
    ev.dst_ip = socket.inet_ntoa(daddr)
    if frag & 0x1FFF:
        return
    l4 = 14 + ihl
    if proto == 6 and n >= l4 + 14:
        ev.src_port, ev.dst_port, ev.tcp_flags = _PORTS_FLAGS.unpack_from(pkt, l4)
    elif proto in (6, 17, 132) and n >= l4 + 4:
        ev.src_port, ev.dst_port = _PORTS.unpack_from(pkt, l4)
    elif proto == 1 and n >= l4 + 2:
        ev.icmp_type, ev.icmp_code = pkt[l4], pkt[l4 + 1]


def decode(raw: bytes | memoryview) -> Event:
    """One ring record (struct cilia_event) -> Event."""
    (ktime, ifindex, src_id, dst_id, orig_len, orig_daddr, cookie, ep_id, orig_dport, cap_len, dport,
     typ, subtype, ct_state, flags, action, match_type, proto) = _HEAD.unpack_from(raw, 0)
    cap = min(cap_len, EVENT_CAP, len(raw) - _HEAD_SIZE)
    pkt = bytes(raw[_HEAD_SIZE:_HEAD_SIZE + cap])
    ev = Event(typ, subtype, ktime, ifindex, src_id, dst_id, orig_len, ep_id, ct_state, flags,
               action, match_type, cookie, proto, dport, data=pkt)
    if flags & EVT_F_SERVICE:
        ev.orig_ip = socket.inet_ntoa(struct.pack("<I", orig_daddr))
        ev.orig_port = int.from_bytes(orig_dport, "big")
    parse_packet(ev, pkt)
    return ev


# ---------------------------------------------------------------------------
# The ring buffer (BPF_MAP_TYPE_RINGBUF) read through mmap, as libbpf's ringbuf.c does.

_BUSY = 1 << 31
_DISCARD = 1 << 30
_HDR = 8
# Native formats on purpose: struct's explicit-endian ("<Q") codecs move one byte at a
# time, and the kernel reads consumer_pos while we write it. A byte-wise store can be seen
# half done (e.g. 0x00fffff0 -> 0x01000010 read as 0x00000010) and makes a reservation
# fail as if the ring were full; native codecs copy the whole aligned word at once.
_U64 = struct.Struct("Q")
_U32 = struct.Struct("I")


class RingReader:
    """Consumer side of a BPF ring buffer map. One reader per ring: the consumer position
    lives in the ring itself, a second reader would steal records."""

    def __init__(self, fd: int, owns_fd: bool = False):
        info = lb.map_info_by_fd(fd)
        if info.type != BPF_MAP_TYPE_RINGBUF:
            raise ValueError(f"map fd {fd} is not a ring buffer (type {info.type})")
        self.fd, self._owns_fd = fd, owns_fd
        self.size = info.max_entries
        self._mask = self.size - 1
        page = mmap.PAGESIZE
        self._cons = mmap.mmap(fd, page, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE, offset=0)
        # Producer page, then the data pages mapped twice: a record that wraps is contiguous.
        self._prod = mmap.mmap(fd, page + 2 * self.size, mmap.MAP_SHARED, mmap.PROT_READ, offset=page)
        self._data = memoryview(self._prod)[page:]
        self._prod_view = memoryview(self._prod)
        # consumer_pos is stored through a C uint64: one aligned 8-byte store.
        self._cons_pos = ctypes.c_uint64.from_buffer(self._cons, 0)

    @classmethod
    def open_pinned(cls, path: str) -> "RingReader":
        fd = lb.obj_get(path)
        try:
            return cls(fd, owns_fd=True)
        except BaseException:
            os.close(fd)
            raise

    def fileno(self) -> int:
        return self.fd

    def pending_bytes(self) -> int:
        return _U64.unpack_from(self._prod_view, 0)[0] - _U64.unpack_from(self._cons, 0)[0]

    def read(self, max_records: int = 1 << 30) -> list[bytes]:
        """The committed records waiting in the ring, oldest first (copies), up to
        max_records; their space is released to the producers before returning."""
        cons = _U64.unpack_from(self._cons, 0)[0]
        prod = _U64.unpack_from(self._prod_view, 0)[0]
        out: list[bytes] = []
        data, mask = self._data, self._mask
        unpack = _U32.unpack_from
        while cons < prod and len(out) < max_records:
            off = cons & mask
            hdr = unpack(data, off)[0]
            if hdr & _BUSY:
                break  # reserved, not submitted yet: records after it wait too
            n = hdr & ~(_BUSY | _DISCARD)
            if not hdr & _DISCARD:
                out.append(bytes(data[off + _HDR:off + _HDR + n]))
            cons += (n + _HDR + 7) & ~7
        self._cons_pos.value = cons
        return out

    def drain(self) -> int:
        """Skips everything waiting; returns how many records were dropped."""
        return len(self.read())

    def close(self) -> None:
        del self._cons_pos  # the ctypes view pins the mmap; drop it before closing
        self._data.release()
        self._prod_view.release()
        self._prod.close()
        self._cons.close()
        if self._owns_fd and self.fd >= 0:
            os.close(self.fd)
        self.fd = -1

    def __enter__(self) -> "RingReader":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def read_lost(pin_dir: str) -> int:
    """Events the datapath could not put in the ring (all CPUs)."""
    fd = lb.obj_get(os.path.join(pin_dir, MAP_EVENTS_LOST))
    try:
        return lost_from_fd(fd)
    finally:
        os.close(fd)


def lost_from_fd(fd: int) -> int:
    ncpus = lb.num_possible_cpus()
    key = ctypes.c_uint32(0)
    buf = (c_uint64 * ncpus)()
    if not lb.map_lookup_elem(fd, key, buf):
        return 0
    return sum(buf)


class EventSource:
    """The node's ring and lost counter from their pins: what the agent and the tests use."""

    def __init__(self, pin_dir: str):
        self.pin_dir = pin_dir
        self.ring = RingReader.open_pinned(os.path.join(pin_dir, MAP_EVENTS))
        self._lost_fd = lb.obj_get(os.path.join(pin_dir, MAP_EVENTS_LOST))

    def fileno(self) -> int:
        return self.ring.fileno()

    def read(self, max_records: int = 1 << 30) -> list[Event]:
        return [decode(r) for r in self.ring.read(max_records)]

    def read_raw(self, max_records: int = 1 << 30) -> list[bytes]:
        return self.ring.read(max_records)

    def lost(self) -> int:
        return lost_from_fd(self._lost_fd)

    def close(self) -> None:
        self.ring.close()
        if self._lost_fd >= 0:
            os.close(self._lost_fd)
            self._lost_fd = -1

    def __enter__(self) -> "EventSource":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

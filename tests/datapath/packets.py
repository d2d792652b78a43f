"""Packet crafting and parsing for datapath fixtures (struct only, no scapy)."""

from __future__ import annotations

import socket
import struct

ETH_P_IP = 0x0800
ETH_P_ARP = 0x0806
ETH_P_IPV6 = 0x86DD
BROADCAST = "ff:ff:ff:ff:ff:ff"


def mac(s: str) -> bytes:
    return bytes(int(x, 16) for x in s.split(":"))


def ip(s: str) -> bytes:
    return socket.inet_aton(s)


def csum16(data: bytes) -> int:
    if len(data) % 2:
        data += b"\0"
    total = sum(struct.unpack(f"!{len(data) // 2}H", data))
    while total >> 16:
        total = (total & 0xFFFF) + (total >> 16)
    return ~total & 0xFFFF


def eth(dst: str, src: str, proto: int) -> bytes:
    return mac(dst) + mac(src) + struct.pack("!H", proto)


def ipv4(src: str, dst: str, payload: bytes, ttl: int = 64, proto: int = 17, ident: int = 1,
         tos: int = 0, flags_frag: int = 0x4000) -> bytes:
    hdr = struct.pack("!BBHHHBBH4s4s", 0x45, tos, 20 + len(payload), ident, flags_frag, ttl, proto, 0,
                      ip(src), ip(dst))
    hdr = hdr[:10] + struct.pack("!H", csum16(hdr)) + hdr[12:]
    return hdr + payload


def udp(sport: int, dport: int, payload: bytes) -> bytes:
    # Checksum 0 = none (valid for UDP over IPv4); the datapath does not touch L4 here.
    return struct.pack("!HHHH", sport, dport, 8 + len(payload), 0) + payload


def udp4_frame(eth_dst: str, eth_src: str, src: str, dst: str, ttl: int = 64, payload: bytes = b"hello cilia",
               **kw) -> bytes:
    return eth(eth_dst, eth_src, ETH_P_IP) + ipv4(src, dst, udp(40000, 8080, payload), ttl=ttl, **kw)


def arp(op: int, sha: str, sip: str, tha: str, tip: str) -> bytes:
    return struct.pack("!HHBBH6s4s6s4s", 1, ETH_P_IP, 6, 4, op, mac(sha), ip(sip), mac(tha), ip(tip))


def arp_request_frame(sha: str, sip: str, tip: str) -> bytes:
    return eth(BROADCAST, sha, ETH_P_ARP) + arp(1, sha, sip, "00:00:00:00:00:00", tip)


def ipv6_frame(eth_dst: str, eth_src: str) -> bytes:
    src = socket.inet_pton(socket.AF_INET6, "fd00::1")
    dst = socket.inet_pton(socket.AF_INET6, "fd00::2")
    payload = udp(1, 2, b"v6")
    hdr = struct.pack("!IHBB16s16s", 6 << 28, len(payload), 17, 64, src, dst)
    return eth(eth_dst, eth_src, ETH_P_IPV6) + hdr + payload


def parse_eth(frame: bytes) -> tuple[bytes, bytes, int]:
    dst, src, proto = struct.unpack("!6s6sH", frame[:14])
    return dst, src, proto


def parse_arp(frame: bytes) -> dict:
    hrd, pro, hln, pln, op, sha, sip, tha, tip = struct.unpack("!HHBBH6s4s6s4s", frame[14:42])
    return dict(hrd=hrd, pro=pro, hln=hln, pln=pln, op=op, sha=sha, sip=sip, tha=tha, tip=tip)


# --- L4 with real checksums (for NAT fixtures) -----------------------------------

IPPROTO_ICMP, IPPROTO_TCP, IPPROTO_UDP = 1, 6, 17


def _pseudo(src: str, dst: str, proto: int, length: int) -> bytes:
    return ip(src) + ip(dst) + struct.pack("!BBH", 0, proto, length)


def tcp(src: str, dst: str, sport: int, dport: int, payload: bytes = b"", flags: int = 0x18,
        seq: int = 1000) -> bytes:
    hdr = struct.pack("!HHIIBBHHH", sport, dport, seq, 0, 5 << 4, flags, 65535, 0, 0)
    seg = hdr + payload
    c = csum16(_pseudo(src, dst, IPPROTO_TCP, len(seg)) + seg)
    return seg[:16] + struct.pack("!H", c) + seg[18:]


def udp_csum(src: str, dst: str, sport: int, dport: int, payload: bytes = b"") -> bytes:
    dgram = struct.pack("!HHHH", sport, dport, 8 + len(payload), 0) + payload
    c = csum16(_pseudo(src, dst, IPPROTO_UDP, len(dgram)) + dgram) or 0xFFFF
    return dgram[:6] + struct.pack("!H", c) + dgram[8:]


def icmp_echo(ident: int, seq: int = 1, reply: bool = False, payload: bytes = b"ping cilia") -> bytes:
    msg = struct.pack("!BBHHH", 0 if reply else 8, 0, 0, ident, seq) + payload
    return msg[:2] + struct.pack("!H", csum16(msg)) + msg[4:]


def frame4(src: str, dst: str, proto: int, l4: bytes, eth_dst: str = "02:00:00:00:00:01",
           eth_src: str = "02:00:00:00:00:02", **kw) -> bytes:
    return eth(eth_dst, eth_src, ETH_P_IP) + ipv4(src, dst, l4, proto=proto, **kw)


def parse4(frame: bytes) -> dict:
    """Fields of an Ethernet/IPv4 frame plus TCP/UDP ports or the ICMP echo id."""
    ihl = (frame[14] & 0xF) * 4
    iph = frame[14:14 + ihl]
    proto = iph[9]
    l4 = frame[14 + ihl:]
    out = dict(src=socket.inet_ntoa(iph[12:16]), dst=socket.inet_ntoa(iph[16:20]), proto=proto,
               ttl=iph[8], ip_header=iph, l4=l4)
    if proto in (IPPROTO_TCP, IPPROTO_UDP):
        out["sport"], out["dport"] = struct.unpack("!HH", l4[:4])
    elif proto == IPPROTO_ICMP:
        out["icmp_type"], out["icmp_id"] = l4[0], struct.unpack("!H", l4[4:6])[0]
    return out


def ip_csum_ok(frame: bytes) -> bool:
    ihl = (frame[14] & 0xF) * 4
    return csum16(frame[14:14 + ihl]) == 0


def l4_csum_ok(frame: bytes) -> bool:
    """Full recomputation over the pseudo header (TCP/UDP) or the message (ICMP)."""
    p = parse4(frame)
    l4 = p["l4"]
    if p["proto"] == IPPROTO_ICMP:
        return csum16(l4) == 0
    if p["proto"] == IPPROTO_UDP and l4[6:8] == b"\0\0":
        return True  # no checksum
    return csum16(_pseudo(p["src"], p["dst"], p["proto"], len(l4)) + l4) == 0

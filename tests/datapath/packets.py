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

"""Encodings of addresses and ports as the BPF maps hold them."""

from __future__ import annotations

import socket
import struct


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


def port_to_be16(port: int) -> int:
    return struct.unpack("=H", struct.pack("!H", port))[0]


def be16_to_port(value: int) -> int:
    return struct.unpack("!H", struct.pack("=H", value))[0]

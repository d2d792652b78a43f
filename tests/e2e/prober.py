"""Reachability probes, all at once, from any number of network namespaces.

    python prober.py -  < {"timeout": s, "targets": [{"id", "netns", "ip", "port", "proto", "sport"}]}

prints {id: "ok" | "timeout" | "refused" | "error: ..."}. Each probe's socket is created
inside its source's netns (setns on this thread, socket(), setns back: a socket stays in
the netns it was created in), so one interpreter and one event loop probe from every
source at once. On a busy 2-CPU machine that beats one process per source: nine
interpreters starting together and competing with nine echo servers took 7-9 s a round,
one took about 1 s. A target without "netns" probes from the netns the prober runs in
(e.g. under `nsenter --net=...`). Standard library only, no imports from the tree.

ICMP: an echo request on a raw socket, resent like UDP, until the reply with its id ("sport"
is the echo id, fresh per probe for the same reason as UDP's source port).
TCP: connect within the timeout (a policy drop never connects), then one byte echoed
back, so the established flow is checked too. UDP: a datagram resent every 200 ms until
the echo comes back or the timeout passes, from a fixed source port when one is given: a
fresh port per probe keeps a reused tuple from riding an earlier probe's conntrack entry
into a case where it should be denied.
"""
from __future__ import annotations

import asyncio
import ctypes
import json
import os
import socket
import sys

UDP_RESEND = 0.2
# An allowed connection may wait this long for a busy echo server; only drops wait for
# the (short) probe timeout.
ECHO_TIMEOUT = 5.0
CLONE_NEWNET = 0x40000000

_libc = ctypes.CDLL(None, use_errno=True)


class NetnsSockets:
    """socket(...) inside a named netns, from this thread."""

    def __init__(self) -> None:
        self.home = os.open("/proc/self/ns/net", os.O_RDONLY)
        self.fds: dict[str, int] = {}

    def _setns(self, fd: int) -> None:
        if _libc.setns(fd, CLONE_NEWNET) != 0:
            err = ctypes.get_errno()
            raise OSError(err, os.strerror(err))

    def socket(self, netns: str | None, kind: int) -> socket.socket:
        proto = socket.IPPROTO_ICMP if kind == socket.SOCK_RAW else 0
        if not netns:
            return socket.socket(socket.AF_INET, kind, proto)
        if netns not in self.fds:
            self.fds[netns] = os.open(netns, os.O_RDONLY)
        self._setns(self.fds[netns])
        try:
            return socket.socket(socket.AF_INET, kind, proto)
        finally:
            self._setns(self.home)


async def probe_tcp(sock: socket.socket, ip: str, port: int, timeout: float) -> str:
    loop = asyncio.get_running_loop()
    sock.setblocking(False)
    try:
        await asyncio.wait_for(loop.sock_connect(sock, (ip, port)), timeout)
    except (TimeoutError, asyncio.TimeoutError):
        return "timeout"
    except ConnectionRefusedError:
        return "refused"
    except OSError as e:
        return f"error: {e.strerror or e}"
    try:
        # 'x' starts no HTTP method, so the echo server answers without sniffing longer.
        await loop.sock_sendall(sock, b"x")
        data = await asyncio.wait_for(loop.sock_recv(sock, 1), ECHO_TIMEOUT)
        return "ok" if data == b"x" else "error: no echo"
    except (TimeoutError, asyncio.TimeoutError):
        return "error: connected, no echo"
    except OSError as e:
        return f"error: after connect: {e.strerror or e}"


async def probe_udp(sock: socket.socket, ip: str, port: int, sport: int, timeout: float,
                    tag: str) -> str:
    loop = asyncio.get_running_loop()
    payload = f"probe {tag}".encode()
    sock.setblocking(False)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(("0.0.0.0", sport))
        sock.connect((ip, port))
    except OSError as e:
        return f"error: {e.strerror or e}"
    deadline = loop.time() + timeout
    while True:
        try:
            sock.send(payload)
        except ConnectionRefusedError:
            return "refused"
        except OSError as e:
            return f"error: {e.strerror or e}"
        left = deadline - loop.time()
        if left <= 0:
            return "timeout"
        try:
            data = await asyncio.wait_for(loop.sock_recv(sock, 2048), min(UDP_RESEND, left))
            return "ok" if data == payload else "error: wrong echo"
        except (TimeoutError, asyncio.TimeoutError):
            continue
        except ConnectionRefusedError:
            return "refused"


def _icmp_checksum(data: bytes) -> int:
    if len(data) % 2:
        data += b"\0"
    total = sum(int.from_bytes(data[i:i + 2], "big") for i in range(0, len(data), 2))
    total = (total >> 16) + (total & 0xFFFF)
    total += total >> 16
    return ~total & 0xFFFF


async def probe_icmp(sock: socket.socket, ip: str, ident: int, timeout: float) -> str:
    """An echo request, resent every 200 ms, until the reply with our id comes back."""
    loop = asyncio.get_running_loop()
    sock.setblocking(False)
    body = b"cilia-probe"
    header = bytes([8, 0, 0, 0]) + ident.to_bytes(2, "big") + (1).to_bytes(2, "big")
    csum = _icmp_checksum(header + body)
    packet = header[:2] + csum.to_bytes(2, "big") + header[4:] + body
    try:
        sock.connect((ip, 0))  # a raw socket then only hears this peer
    except OSError as e:
        return f"error: {e.strerror or e}"
    deadline = loop.time() + timeout
    while True:
        try:
            sock.send(packet)
        except OSError as e:
            return f"error: {e.strerror or e}"
        resend = loop.time() + UDP_RESEND
        while True:
            left = min(deadline, resend) - loop.time()
            if left <= 0:
                break
            try:
                data = await asyncio.wait_for(loop.sock_recv(sock, 2048), left)
            except (TimeoutError, asyncio.TimeoutError):
                break
            ihl = (data[0] & 0x0F) * 4
            # Every raw socket of the netns sees every echo reply: ours carries our id.
            if data[ihl] == 0 and int.from_bytes(data[ihl + 4:ihl + 6], "big") == ident:
                return "ok"
        if loop.time() >= deadline:
            return "timeout"


async def run(spec: dict) -> dict[str, str]:
    timeout = float(spec.get("timeout", 1.0))
    factory = NetnsSockets()

    async def one(t: dict) -> tuple[str, str]:
        tcp = t["proto"] == "TCP"
        kind = {"TCP": socket.SOCK_STREAM, "UDP": socket.SOCK_DGRAM}.get(t["proto"], socket.SOCK_RAW)
        try:
            sock = factory.socket(t.get("netns"), kind)
        except OSError as e:
            return t["id"], f"error: socket in {t.get('netns')}: {e.strerror or e}"
        with sock:
            if t["proto"] == "ICMP":
                return t["id"], await probe_icmp(sock, t["ip"], int(t["sport"]), timeout)
            if tcp:
                # RST on close: no FIN/TIME_WAIT chatter between rounds.
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00")
                return t["id"], await probe_tcp(sock, t["ip"], int(t["port"]), timeout)
            return t["id"], await probe_udp(sock, t["ip"], int(t["port"]), int(t.get("sport") or 0),
                                            timeout, t["id"])

    return dict(await asyncio.gather(*(one(t) for t in spec["targets"])))


def main(argv: list[str]) -> int:
    spec = json.loads(argv[1] if len(argv) > 1 and argv[1] != "-" else sys.stdin.read())
    print(json.dumps(asyncio.run(run(spec))))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))

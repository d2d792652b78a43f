"""Built-in pod workloads for the lab: an echo server (TCP/HTTP, UDP, SCTP) and idle.

Run inside a pod's network namespace by the lab node runtime:
    python -m cilia.lab.workloads echo --ports 80/TCP,53/UDP --name POD --namespace NS --node NODE
    python -m cilia.lab.workloads idle

The HTTP reply mirrors Cilium's json-mock / agnhost netexec so connectivity checks can
see which pod answered and which client address it saw (after any NAT).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import signal
import socket
import sys
from dataclasses import dataclass
from urllib.parse import parse_qs, urlsplit

log = logging.getLogger("cilia.workload")

HTTP_METHODS = (b"GET", b"POST", b"HEAD", b"PUT", b"DELETE", b"OPTIONS", b"PATCH")
_METHOD_PREFIXES = tuple(m + b" " for m in HTTP_METHODS)
# A client that sends a few bytes and waits for the echo must not hang on sniffing.
SNIFF_TIMEOUT = 0.5
MAX_HEADER_BYTES = 16 * 1024
ECHO_IMAGE_HINTS = ("echo", "json-mock", "agnhost", "http-echo", "nginx", "httpd")
DEFAULT_PORTS = "80/TCP"
PROTOCOLS = ("TCP", "UDP", "SCTP")


@dataclass(frozen=True)
class PortSpec:
    port: int
    protocol: str  # TCP, UDP or SCTP

    def __str__(self) -> str:
        return f"{self.port}/{self.protocol}"


def parse_ports(text: str) -> list[PortSpec]:
    """'80/TCP,53/udp,8080' -> PortSpecs; a bare number means TCP."""
    out: list[PortSpec] = []
    for item in filter(None, (p.strip() for p in text.split(","))):
        num, _, proto = item.partition("/")
        proto = (proto or "TCP").upper()
        if proto not in PROTOCOLS:
            raise ValueError(f"unsupported protocol {proto!r} in {item!r}")
        port = int(num)
        if not 1 <= port <= 65535:
            raise ValueError(f"port out of range in {item!r}")
        spec = PortSpec(port, proto)
        if spec not in out:
            out.append(spec)
    return out


@dataclass(frozen=True)
class Identity:
    name: str
    namespace: str
    node: str


# --- image -> workload ---------------------------------------------------------------

def _image_name(image: str) -> str:
    """'registry.k8s.io/e2e-test-images/agnhost:2.45' -> 'agnhost'."""
    last = image.split("@", 1)[0].rsplit("/", 1)[-1]
    return last.split(":", 1)[0].lower()


def _ports_from_args(image_name: str, args: list[str]) -> list[str]:
    """Ports that agnhost netexec / hashicorp http-echo would listen on given their args."""
    out = []
    if "agnhost" in image_name and "netexec" in args:
        flags = dict(a.lstrip("-").split("=", 1) for a in args if a.startswith("-") and "=" in a)
        out.append(f"{flags.get('http-port', '8080')}/TCP")
        if flags.get("udp-port", "-1") not in ("-1", "0"):
            out.append(f"{flags['udp-port']}/UDP")
        if flags.get("sctp-port", "-1") not in ("-1", "0"):
            out.append(f"{flags['sctp-port']}/SCTP")
    elif "http-echo" in image_name:
        for a in args:
            if a.lstrip("-").startswith("listen="):
                out.append(a.split(":")[-1] + "/TCP")
                break
        else:
            out.append("5678/TCP")
    return out


IDLE_ARGV = ["sleep", "infinity"]


def workload_for(container: dict, *, pod_name: str = "", namespace: str = "default",
                 node: str = "", python: str = sys.executable) -> list[str] | None:
    """argv to run for a Pod container, or None when it names nothing to run.

    A container's own command wins (Kubernetes semantics: command + args). Otherwise the
    image picks a built-in: echo-style images serve their containerPorts (plus ports that
    agnhost netexec / http-echo args name); other images run their args, or idle until
    SIGTERM when there are none.
    """
    command = container.get("command")
    args = list(container.get("args") or [])
    if command:
        return list(command) + args
    image = container.get("image") or ""
    if not image:
        return None
    name = _image_name(image)
    base = [python, "-m", "cilia.lab.workloads"]
    if not any(hint in name for hint in ECHO_IMAGE_HINTS):
        if not args:
            # coreutils sleep, not a Python process: 100 idle pods must not cost 100
            # interpreters on a 2-CPU machine.
            return IDLE_ARGV
        # Kubernetes passes args to the image's entrypoint: curl images have curl as
        # entrypoint; busybox/alpine/netshoot have none, so args are the command.
        return (["curl"] + args) if "curl" in name else args
    ports = [f"{p['containerPort']}/{p.get('protocol') or 'TCP'}" for p in container.get("ports") or []]
    for extra in _ports_from_args(name, args):
        if extra not in ports:
            ports.append(extra)
    return base + ["echo", "--ports", ",".join(ports) or DEFAULT_PORTS,
                   "--name", pod_name, "--namespace", namespace, "--node", node]


# --- echo server -------------------------------------------------------------------

def _http_response(status: str, body: bytes, content_type: str, head: bool) -> bytes:
    headers = (f"HTTP/1.1 {status}\r\n"
               f"Content-Type: {content_type}\r\n"
               f"Content-Length: {len(body)}\r\n"
               "Connection: close\r\n\r\n").encode()
    return headers if head else headers + body


def _hostport(addr: tuple | None) -> str:
    if not addr:
        return ""
    host, port = addr[0], addr[1]
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


class EchoServer:
    def __init__(self, ident: Identity, ports: list[PortSpec], bind: str):
        self.ident = ident
        self.ports = ports
        self.bind = bind
        self._servers: list[asyncio.base_events.Server] = []
        self._transports: list[asyncio.BaseTransport] = []
        self._conns: set[asyncio.Task] = set()

    async def start(self) -> None:
        loop = asyncio.get_running_loop()
        for number in sorted({p.port for p in self.ports}):
            declared = {p.protocol for p in self.ports if p.port == number}
            # Both TCP and UDP on every declared number, so a Service whose protocol
            # differs from the containerPort still gets an answer; only a declared
            # protocol failing to bind is fatal.
            await self._listen("TCP", number, fatal="TCP" in declared,
                               factory=lambda n=number: asyncio.start_server(
                                   self._tracked(n), self.bind, n, reuse_address=True))
            await self._listen("UDP", number, fatal="UDP" in declared,
                               factory=lambda n=number: loop.create_datagram_endpoint(
                                   _UdpEcho, local_addr=(self.bind, n)))
            if "SCTP" in declared:
                await self._start_sctp(number)

    async def _listen(self, proto: str, number: int, fatal: bool, factory) -> None:
        try:
            result = await factory()
        except OSError as e:
            if fatal:
                raise
            log.info("not serving %d/%s (undeclared): %s", number, proto, e)
            return
        if isinstance(result, tuple):
            self._transports.append(result[0])
        else:
            self._servers.append(result)
        log.info("listening on %s:%d/%s", self.bind, number, proto)

    async def _start_sctp(self, number: int) -> None:
        proto = getattr(socket, "IPPROTO_SCTP", 132)
        try:
            sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM, proto)
        except OSError as e:
            log.warning("SCTP not supported by this kernel, skipping %d/SCTP: %s", number, e)
            return
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((self.bind, number))
        sock.setblocking(False)
        self._servers.append(await asyncio.start_server(self._tracked(number), sock=sock))
        log.info("listening on %s:%d/SCTP", self.bind, number)

    def _tracked(self, port: int):
        async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            task = asyncio.current_task()
            assert task is not None
            self._conns.add(task)
            try:
                await self._serve_stream(port, reader, writer)
            except (ConnectionError, asyncio.IncompleteReadError):
                pass
            finally:
                self._conns.discard(task)
                writer.close()
        return handler

    async def _serve_stream(self, port: int, reader: asyncio.StreamReader,
                            writer: asyncio.StreamWriter) -> None:
        data = await self._sniff(reader)
        if data.startswith(_METHOD_PREFIXES):
            data = await self._read_until(reader, data, b"\n")
            request_line = data.split(b"\n", 1)[0].rstrip(b"\r").split(b" ")
            if len(request_line) == 3 and request_line[2].startswith(b"HTTP/1."):
                await self._serve_http(port, request_line, data, reader, writer)
                return
        await self._echo(data, reader, writer)

    async def _sniff(self, reader: asyncio.StreamReader) -> bytes:
        """Read just enough to tell an HTTP request line from anything else."""
        buf = b""
        longest = max(len(p) for p in _METHOD_PREFIXES)
        while len(buf) < longest:
            if buf.startswith(_METHOD_PREFIXES):
                return buf
            if buf and not any(p.startswith(buf) for p in _METHOD_PREFIXES):
                return buf
            try:
                chunk = await asyncio.wait_for(reader.read(4096), SNIFF_TIMEOUT if buf else None)
            except asyncio.TimeoutError:
                return buf
            if not chunk:
                return buf
            buf += chunk
        return buf

    async def _read_until(self, reader: asyncio.StreamReader, buf: bytes, *seps: bytes) -> bytes:
        """Read until one of `seps` is in `buf`, EOF, or the header size limit."""
        while not any(sep in buf for sep in seps) and len(buf) <= MAX_HEADER_BYTES:
            chunk = await reader.read(4096)
            if not chunk:
                break
            buf += chunk
        return buf

    async def _serve_http(self, port: int, request_line: list[bytes], data: bytes,
                          reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        data = await self._read_until(reader, data, b"\r\n\r\n", b"\n\n")
        sep = b"\r\n\r\n" if b"\r\n\r\n" in data else b"\n\n"
        head, _, body = data.partition(sep)
        length = 0
        for header in head.split(b"\n")[1:]:
            key, _, value = header.partition(b":")
            if key.strip().lower() == b"content-length" and value.strip().isdigit():
                length = int(value.strip())
        # Drain the request body so closing the socket does not send an RST.
        if length > len(body):
            await reader.readexactly(length - len(body))
        method = request_line[0].decode()
        target = urlsplit(request_line[1].decode("latin-1"))
        status, ctype, payload = self._http_reply(port, method, target, writer)
        writer.write(_http_response(status, payload, ctype, head=method == "HEAD"))
        await writer.drain()

    def _http_reply(self, port: int, method: str, target, writer: asyncio.StreamWriter
                    ) -> tuple[str, str, bytes]:
        client = _hostport(writer.get_extra_info("peername"))
        local = writer.get_extra_info("sockname")
        if target.path == "/healthz":
            return "200 OK", "text/plain", b"ok"
        # agnhost netexec endpoints used by Kubernetes e2e connectivity checks.
        if target.path == "/hostname":
            return "200 OK", "text/plain", self.ident.name.encode()
        if target.path == "/clientip":
            return "200 OK", "text/plain", client.encode()
        if target.path == "/echo":
            return "200 OK", "text/plain", (parse_qs(target.query).get("msg") or [""])[0].encode()
        body = {
            "pod": self.ident.name,
            "namespace": self.ident.namespace,
            "node": self.ident.node,
            "podIP": local[0] if local else "",
            "client": client,
            "method": method,
            "path": target.path or "/",
            "port": port,
        }
        return "200 OK", "application/json", (json.dumps(body) + "\n").encode()

    async def _echo(self, first: bytes, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        if first:
            writer.write(first)
            await writer.drain()
        while chunk := await reader.read(65536):
            writer.write(chunk)
            await writer.drain()
        if writer.can_write_eof():
            writer.write_eof()

    async def stop(self) -> None:
        for server in self._servers:
            server.close()
        for transport in self._transports:
            transport.close()
        for task in list(self._conns):
            task.cancel()
        await asyncio.gather(*self._conns, return_exceptions=True)
        for server in self._servers:
            await server.wait_closed()


class _UdpEcho(asyncio.DatagramProtocol):
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport

    def datagram_received(self, data: bytes, addr: tuple) -> None:
        self.transport.sendto(data, addr)  # type: ignore[attr-defined]

    def error_received(self, exc: Exception) -> None:
        # ICMP errors (e.g. client gone) must not stop the server.
        log.debug("udp error: %s", exc)


async def _until_signalled() -> None:
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()


async def run_echo(ident: Identity, ports: list[PortSpec], bind: str) -> None:
    server = EchoServer(ident, ports, bind)
    try:
        await server.start()
        log.info("echo ready: pod=%s/%s node=%s ports=%s", ident.namespace, ident.name, ident.node,
                 ",".join(map(str, ports)))
        await _until_signalled()
    finally:
        await server.stop()


async def run_idle() -> None:
    await _until_signalled()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m cilia.lab.workloads")
    sub = parser.add_subparsers(dest="workload", required=True)
    echo = sub.add_parser("echo", help="echo TCP/UDP/SCTP; answer HTTP/1.x with JSON")
    echo.add_argument("--ports", default=DEFAULT_PORTS, help="e.g. 80/TCP,53/UDP (bare number = TCP)")
    echo.add_argument("--name", default="")
    echo.add_argument("--namespace", default="default")
    echo.add_argument("--node", default="")
    echo.add_argument("--bind", default="0.0.0.0")
    sub.add_parser("idle", help="sleep until SIGTERM")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, stream=sys.stderr,
                        format="%(asctime)s %(name)s %(levelname)s %(message)s")
    if args.workload == "idle":
        asyncio.run(run_idle())
        return 0
    try:
        ports = parse_ports(args.ports)
    except ValueError as e:
        parser.error(str(e))
    ident = Identity(args.name or socket.gethostname(), args.namespace, args.node)
    try:
        asyncio.run(run_echo(ident, ports, args.bind))
    except OSError as e:
        log.error("echo: %s", e)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())

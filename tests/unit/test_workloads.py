"""Built-in pod workloads: image mapping, and the echo server as a real subprocess."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time

import pytest

from cilia.lab.workloads import IDLE_ARGV, PortSpec, parse_ports, workload_for

PY = sys.executable
ECHO = [PY, "-m", "cilia.lab.workloads"]


# --- image -> workload mapping ---------------------------------------------------------

@pytest.mark.parametrize("container,expected", [
    ({"name": "c", "image": "busybox", "command": ["sleep", "3600"], "args": ["x"]}, ["sleep", "3600", "x"]),
    ({"name": "c", "image": "cilium/json-mock", "command": ["/bin/sh"]}, ["/bin/sh"]),
    ({"name": "c", "image": "cilium/json-mock:v1.3.8",
      "ports": [{"containerPort": 80, "protocol": "TCP"}, {"containerPort": 53, "protocol": "UDP"}]},
     ECHO + ["echo", "--ports", "80/TCP,53/UDP", "--name", "p", "--namespace", "ns", "--node", "n1"]),
    ({"name": "c", "image": "docker.io/library/nginx:1.25"},
     ECHO + ["echo", "--ports", "80/TCP", "--name", "p", "--namespace", "ns", "--node", "n1"]),
    ({"name": "c", "image": "httpd", "ports": [{"containerPort": 8080}]},
     ECHO + ["echo", "--ports", "8080/TCP", "--name", "p", "--namespace", "ns", "--node", "n1"]),
    ({"name": "c", "image": "registry.k8s.io/e2e-test-images/agnhost:2.45",
      "args": ["netexec", "--http-port=8080", "--udp-port=8081"]},
     ECHO + ["echo", "--ports", "8080/TCP,8081/UDP", "--name", "p", "--namespace", "ns", "--node", "n1"]),
    ({"name": "c", "image": "hashicorp/http-echo", "args": ["-text=hi", "-listen=:5678"],
      "ports": [{"containerPort": 5678, "protocol": "TCP"}]},
     ECHO + ["echo", "--ports", "5678/TCP", "--name", "p", "--namespace", "ns", "--node", "n1"]),
    ({"name": "c", "image": "ealen/echo-server@sha256:abc"},
     ECHO + ["echo", "--ports", "80/TCP", "--name", "p", "--namespace", "ns", "--node", "n1"]),
    ({"name": "c", "image": "busybox"}, IDLE_ARGV),
    ({"name": "c", "image": "alpine:3.19"}, IDLE_ARGV),
    ({"name": "c", "image": "nicolaka/netshoot", "ports": [{"containerPort": 80}]}, IDLE_ARGV),
    ({"name": "c", "image": "idle"}, IDLE_ARGV),
    # The registry path is not the image name: "echoes" here must not select echo.
    ({"name": "c", "image": "quay.io/echoes/busybox"}, IDLE_ARGV),
    ({"name": "c", "image": "busybox", "args": ["sh", "-c", "sleep 10"]}, ["sh", "-c", "sleep 10"]),
    ({"name": "c", "image": "curlimages/curl", "args": ["-s", "http://web"]}, ["curl", "-s", "http://web"]),
    ({"name": "c"}, None),
])
def test_workload_for(container, expected):
    assert workload_for(container, pod_name="p", namespace="ns", node="n1", python=PY) == expected


def test_parse_ports():
    assert parse_ports("80/TCP, 53/udp,8080,80/TCP,9/SCTP") == [
        PortSpec(80, "TCP"), PortSpec(53, "UDP"), PortSpec(8080, "TCP"), PortSpec(9, "SCTP")]
    for bad in ("70000", "80/ICMP", "http"):
        with pytest.raises(ValueError):
            parse_ports(bad)


# --- the echo server as a subprocess -----------------------------------------------------

def free_port() -> int:
    """A port free for both TCP and UDP on 127.0.0.1 (the server binds both)."""
    for _ in range(50):
        with socket.socket() as t:
            t.bind(("127.0.0.1", 0))
            port = t.getsockname()[1]
            with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as u:
                try:
                    u.bind(("127.0.0.1", port))
                except OSError:
                    continue
        return port
    raise RuntimeError("no free port")


def wait_tcp(port: int, proc: subprocess.Popen, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        assert proc.poll() is None, "workload exited early"
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
            return
        except OSError:
            time.sleep(0.05)
    raise TimeoutError(f"nothing listening on {port}")


class Workload:
    def __init__(self, args: list[str], log_path):
        self.log = open(log_path, "w+")
        self.proc = subprocess.Popen(ECHO + args, stdout=self.log, stderr=subprocess.STDOUT)

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait(timeout=5)
        self.log.close()

    def output(self) -> str:
        self.log.flush()
        self.log.seek(0)
        return self.log.read()


@pytest.fixture(scope="module")
def echo(tmp_path_factory):
    tcp, udp = free_port(), free_port()
    w = Workload(["echo", "--bind", "127.0.0.1", "--ports", f"{tcp}/TCP,{udp}/UDP", "--name", "pod-a",
                  "--namespace", "ns1", "--node", "node7"], tmp_path_factory.mktemp("echo") / "log")
    try:
        wait_tcp(tcp, w.proc)
        wait_tcp(udp, w.proc)  # a UDP-declared port also answers TCP
        yield {"tcp": tcp, "udp": udp, "workload": w}
    finally:
        w.stop()


def recv_all(sock: socket.socket) -> bytes:
    chunks = []
    while chunk := sock.recv(65536):
        chunks.append(chunk)
    return b"".join(chunks)


def exchange(port: int, payload: bytes, *, half_close: bool = True) -> tuple[bytes, tuple]:
    with socket.create_connection(("127.0.0.1", port), timeout=5) as s:
        s.sendall(payload)
        if half_close:
            s.shutdown(socket.SHUT_WR)
        return recv_all(s), s.getsockname()


def http(port: int, request: bytes) -> tuple[str, dict[str, str], bytes, tuple]:
    raw, local = exchange(port, request, half_close=False)
    head, _, body = raw.partition(b"\r\n\r\n")
    status, *header_lines = head.decode().split("\r\n")
    headers = {k.lower(): v.strip() for k, _, v in (h.partition(":") for h in header_lines)}
    return status, headers, body, local


def test_raw_tcp_echo_byte_for_byte(echo):
    payload = b"hello\x00\xff\r\nworld" * 10
    assert exchange(echo["tcp"], payload)[0] == payload


def test_method_like_text_that_is_not_http_is_echoed(echo):
    payload = b"GET me a coffee\n"
    assert exchange(echo["tcp"], payload)[0] == payload


def test_partial_method_prefix_is_echoed_without_waiting_for_more(echo):
    # "GE" could still become "GET "; the server must not wait for it forever.
    with socket.create_connection(("127.0.0.1", echo["tcp"]), timeout=5) as s:
        s.sendall(b"GE")
        assert s.recv(10) == b"GE"


def test_large_echo(echo):
    payload = os.urandom(2 * 1024 * 1024)
    with socket.create_connection(("127.0.0.1", echo["tcp"]), timeout=10) as s:
        # Send from another thread: the echo fills our receive buffer while we send.
        sender = threading.Thread(target=lambda: (s.sendall(payload), s.shutdown(socket.SHUT_WR)))
        sender.start()
        got = recv_all(s)
        sender.join()
    assert got == payload


def test_http_get_json(echo):
    status, headers, body, local = http(echo["tcp"], b"GET /some/path?q=1 HTTP/1.1\r\nHost: x\r\n\r\n")
    assert status == "HTTP/1.1 200 OK"
    assert headers["connection"] == "close"
    assert headers["content-type"] == "application/json"
    assert int(headers["content-length"]) == len(body)
    assert json.loads(body) == {
        "pod": "pod-a", "namespace": "ns1", "node": "node7", "podIP": "127.0.0.1",
        "client": f"127.0.0.1:{local[1]}", "method": "GET", "path": "/some/path", "port": echo["tcp"]}


def test_http_on_the_udp_declared_port_reports_that_port(echo):
    _, _, body, _ = http(echo["udp"], b"GET / HTTP/1.0\r\n\r\n")
    assert json.loads(body)["port"] == echo["udp"]


def test_http_healthz(echo):
    status, headers, body, _ = http(echo["tcp"], b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
    assert (status, body, headers["content-length"]) == ("HTTP/1.1 200 OK", b"ok", "2")


def test_http_post_with_body_and_head(echo):
    status, _, body, _ = http(echo["tcp"], b"POST /p HTTP/1.1\r\nContent-Length: 5\r\n\r\nhello")
    assert status == "HTTP/1.1 200 OK" and json.loads(body)["method"] == "POST"
    status, headers, body, _ = http(echo["tcp"], b"HEAD / HTTP/1.1\r\n\r\n")
    assert status == "HTTP/1.1 200 OK" and body == b"" and int(headers["content-length"]) > 0


def test_http_request_split_across_packets(echo):
    with socket.create_connection(("127.0.0.1", echo["tcp"]), timeout=5) as s:
        for part in (b"GET /slow", b" HTTP/1.1\r\nHo", b"st: x\r\n", b"\r\n"):
            s.sendall(part)
            time.sleep(0.05)
        raw = recv_all(s)
    assert raw.startswith(b"HTTP/1.1 200 OK") and b'"path": "/slow"' in raw


def test_agnhost_style_endpoints(echo):
    assert http(echo["tcp"], b"GET /hostname HTTP/1.1\r\n\r\n")[2] == b"pod-a"
    _, _, body, local = http(echo["tcp"], b"GET /clientip HTTP/1.1\r\n\r\n")
    assert body == f"127.0.0.1:{local[1]}".encode()
    assert http(echo["tcp"], b"GET /echo?msg=hi HTTP/1.1\r\n\r\n")[2] == b"hi"


@pytest.mark.parametrize("key", ["udp", "tcp"])
def test_udp_echo_each_datagram(echo, key):
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.settimeout(5)
        for payload in (b"one", b"two\x00", os.urandom(1200)):
            s.sendto(payload, ("127.0.0.1", echo[key]))
            data, addr = s.recvfrom(65536)
            assert (data, addr) == (payload, ("127.0.0.1", echo[key]))


def test_fifty_concurrent_tcp_clients(echo):
    async def client(i: int) -> bytes:
        reader, writer = await asyncio.open_connection("127.0.0.1", echo["tcp"])
        payload = f"client-{i}-".encode() * 100
        writer.write(payload)
        await writer.drain()
        got = await reader.readexactly(len(payload))
        writer.close()
        await writer.wait_closed()
        return got == payload

    async def main():
        # All 50 are connected at once before any finishes: each waits for its echo.
        return await asyncio.wait_for(asyncio.gather(*(client(i) for i in range(50))), 20)

    assert all(asyncio.run(main()))


def _start(tmp_path, args):
    return Workload(args, tmp_path / "log")


def test_echo_sigterm_exits_zero_with_open_connection(tmp_path):
    port = free_port()
    w = _start(tmp_path, ["echo", "--bind", "127.0.0.1", "--ports", str(port)])
    try:
        wait_tcp(port, w.proc)
        idle_client = socket.create_connection(("127.0.0.1", port), timeout=5)
        idle_client.sendall(b"x")
        assert idle_client.recv(1) == b"x"
        t0 = time.monotonic()
        w.proc.send_signal(signal.SIGTERM)
        assert w.proc.wait(timeout=2) == 0
        assert time.monotonic() - t0 < 2
        idle_client.close()
    finally:
        w.stop()


def test_idle_runs_until_sigterm(tmp_path):
    w = _start(tmp_path, ["idle"])
    try:
        time.sleep(0.5)  # also lets the interpreter install its signal handlers
        assert w.proc.poll() is None
        w.proc.send_signal(signal.SIGTERM)
        assert w.proc.wait(timeout=2) == 0
    finally:
        w.stop()


def test_sctp_port_is_served_or_skipped_with_a_log(tmp_path):
    port = free_port()
    w = _start(tmp_path, ["echo", "--bind", "127.0.0.1", "--ports", f"{port}/SCTP"])
    try:
        wait_tcp(port, w.proc)  # the same number over TCP is up, so startup finished
        try:
            sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM, 132)
        except OSError:
            assert "SCTP not supported" in w.output()
            return
        with sock:
            sock.settimeout(5)
            sock.connect(("127.0.0.1", port))
            sock.sendall(b"sctp!")
            assert sock.recv(16) == b"sctp!"
    finally:
        w.stop()


def test_declared_port_in_use_fails_startup(tmp_path):
    with socket.socket() as holder:
        holder.bind(("127.0.0.1", 0))
        holder.listen()
        port = holder.getsockname()[1]
        w = _start(tmp_path, ["echo", "--bind", "127.0.0.1", "--ports", f"{port}/TCP"])
        try:
            assert w.proc.wait(timeout=10) == 1
            assert "address already in use" in w.output().lower()
        finally:
            w.stop()

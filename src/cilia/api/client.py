"""Thin, fast client for an agent's unix-socket API (stdlib only: the CNI plugin is exec'd
per pod, and every import there is pod-start latency)."""
from __future__ import annotations

import http.client
import json
import socket


class APIError(Exception):
    def __init__(self, status: int, body: object):
        self.status = status
        self.body = body
        msg = body.get("msg") if isinstance(body, dict) else None
        super().__init__(msg or f"HTTP {status}: {body}")


class AgentUnreachable(Exception):
    pass


class _UnixConnection(http.client.HTTPConnection):
    def __init__(self, path: str, timeout: float):
        super().__init__("localhost", timeout=timeout)
        self._path = path

    def connect(self) -> None:
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        s.settimeout(self.timeout)
        s.connect(self._path)
        self.sock = s


class AgentClient:
    def __init__(self, socket_path: str, timeout: float = 30.0):
        self.socket_path = socket_path
        self.timeout = timeout

    def request(self, method: str, path: str, body: object = None):
        conn = _UnixConnection(self.socket_path, self.timeout)
        try:
            payload = json.dumps(body).encode() if body is not None else None
            headers = {"Content-Type": "application/json"} if payload is not None else {}
            try:
                conn.request(method, path, body=payload, headers=headers)
                resp = conn.getresponse()
                data = resp.read()
            except (FileNotFoundError, ConnectionRefusedError, socket.timeout) as e:
                raise AgentUnreachable(f"agent at {self.socket_path} unreachable: {e}") from e
            parsed = json.loads(data) if data else None
            if resp.status >= 400:
                raise APIError(resp.status, parsed)
            return parsed
        finally:
            conn.close()

    def get(self, path: str):
        return self.request("GET", path)

    def post(self, path: str, body: object):
        return self.request("POST", path, body)

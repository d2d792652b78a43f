"""Hubble Relay for a lab: every agent's /v1/flows merged in time order.

Two users: `cilia observe` (one-shot or --follow, straight from the CLI) and the relay
process `cilia hubble enable` starts (`python -m cilia.hubble.relay`), which keeps a merged
ring and serves the web UI. A node that cannot be reached is reported and skipped; every
request carries a connect and read timeout, so a dead node never stalls the others."""
from __future__ import annotations

import argparse
import asyncio
import collections
import heapq
import json
import logging
import os
import signal
import time
from dataclasses import dataclass, field
from typing import Awaitable, Callable
from urllib.parse import urlencode

import aiohttp

from cilia import paths
from cilia.hubble import filters
from cilia.hubble.printers import format_time_ns, record_time_ns

log = logging.getLogger("cilia.hubble.relay")

CONNECT_TIMEOUT = 2.0
# An agent answers a one-shot query from memory; longer than this means it is stuck.
READ_TIMEOUT = float(os.environ.get("CILIA_OBSERVE_TIMEOUT", "10"))
# Hubble Relay sorts within a short window: flows from different nodes arrive out of order
# by at most the agents' buffering, a few hundred ms on a lab.
SORT_WINDOW = 0.3


@dataclass
class Query:
    last: int | None = None
    first: int | None = None
    since: str | None = None
    until: str | None = None
    follow: bool = False
    allow: list[dict] = field(default_factory=list)
    deny: list[dict] = field(default_factory=list)

    def params(self) -> dict:
        p: dict = {}
        if self.last is not None:
            p["last"] = str(self.last)
        if self.first is not None:
            p["first"] = str(self.first)
        if self.since:
            p["since"] = self.since
        if self.until:
            p["until"] = self.until
        if self.follow:
            p["follow"] = "1"
        if self.allow or self.deny:
            p["filter"] = json.dumps({"allow": self.allow, "deny": self.deny},
                                     separators=(",", ":"))
        return p

    def local_match(self, rec: dict) -> bool:
        """The agent filters too; filtering again here keeps the answer right even when an
        agent ignores `filter` (an older agent) and costs a dict walk per flow."""
        return filters.match(rec, self.allow, self.deny)


class NodeError(Exception):
    pass


def _url(path: str, params: dict) -> str:
    return f"http://localhost{path}" + (f"?{urlencode(params)}" if params else "")


def _session(sock: str, read_timeout: float | None) -> aiohttp.ClientSession:
    return aiohttp.ClientSession(
        connector=aiohttp.UnixConnector(path=sock),
        timeout=aiohttp.ClientTimeout(total=None, connect=CONNECT_TIMEOUT,
                                      sock_connect=CONNECT_TIMEOUT, sock_read=read_timeout))


async def _lines(sock: str, params: dict, read_timeout: float | None):
    """NDJSON records from one agent; NodeError on anything that is not a clean stream."""
    try:
        async with _session(sock, read_timeout) as s:
            async with s.get(_url("/v1/flows", params)) as r:
                if r.status != 200:
                    body = (await r.text())[:200]
                    raise NodeError(f"HTTP {r.status}: {body.strip()}")
                async for raw in r.content:
                    raw = raw.strip()
                    if raw:
                        yield json.loads(raw)
    except NodeError:
        raise
    except FileNotFoundError as e:
        raise NodeError(f"agent socket {sock} missing") from e
    except (aiohttp.ClientError, asyncio.TimeoutError, OSError, ValueError) as e:
        raise NodeError(f"{type(e).__name__}: {e}" if str(e) else type(e).__name__) from e


def _stamp(rec: dict, node: str) -> dict:
    rec.setdefault("node_name", node)
    rec["_ns"] = record_time_ns(rec)
    return rec


def _clean(rec: dict) -> dict:
    rec.pop("_ns", None)
    return rec


def _socket(lab: str, node: str, sockets: dict[str, str] | None) -> str:
    return (sockets or {}).get(node) or paths.agent_socket(lab, node)


async def fetch_node(lab: str, node: str, q: Query, sockets: dict[str, str] | None = None) -> list[dict]:
    return [_stamp(r, node) async for r in _lines(_socket(lab, node, sockets), q.params(), READ_TIMEOUT)]


def merge(per_node: list[list[dict]], q: Query) -> list[dict]:
    """Each node's answer is already in time order: k-way merge, then --first/--last over
    the merged stream (each node gave its own first/last N, a superset of the global ones)."""
    for recs in per_node:
        for r in recs:
            if "_ns" not in r:
                r["_ns"] = record_time_ns(r)
    merged = [r for r in heapq.merge(*[sorted(x, key=lambda r: r["_ns"]) for x in per_node],
                                     key=lambda r: r["_ns"]) if q.local_match(r)]
    if q.first is not None:
        merged = merged[:q.first]
    if q.last is not None:
        merged = merged[-q.last:] if q.last else []
    return [_clean(r) for r in merged]


async def collect(lab: str, nodes: list[str], q: Query, warn: Callable[[str], None],
                  sockets: dict[str, str] | None = None) -> list[dict]:
    """sockets: node -> agent socket where it is not the lab's (an installed host)."""
    results = await asyncio.gather(*(fetch_node(lab, n, q, sockets) for n in nodes),
                                   return_exceptions=True)
    got = []
    for n, res in zip(nodes, results):
        if isinstance(res, BaseException):
            warn(f"node {n}: skipped, {res}")
        else:
            got.append(res)
    return merge(got, q)


class Reorder:
    """Holds records for SORT_WINDOW so flows from several nodes come out in time order."""

    def __init__(self, window: float = SORT_WINDOW):
        self.window = window
        self._heap: list[tuple[int, int, float, dict]] = []
        self._n = 0

    def push(self, rec: dict) -> None:
        self._n += 1
        heapq.heappush(self._heap, (rec["_ns"], self._n, time.monotonic(), rec))

    def pop_ready(self, flush: bool = False) -> list[dict]:
        """Records that have waited a full window, plus everything older than them."""
        out = []
        now = time.monotonic()
        cutoff = None
        for _, _, arrived, rec in self._heap:
            if flush or now - arrived >= self.window:
                cutoff = rec["_ns"] if cutoff is None else max(cutoff, rec["_ns"])
        while self._heap and cutoff is not None and self._heap[0][0] <= cutoff:
            out.append(heapq.heappop(self._heap)[3])
        return out


async def follow(lab: str, nodes: list[str], q: Query, warn: Callable[[str], None],
                 emit: Callable[[dict], None], stop: asyncio.Event | None = None,
                 sockets: dict[str, str] | None = None) -> None:
    """Stream every node's flows merged in time order until all streams end (or stop)."""
    buf = Reorder()
    live = set(nodes)

    async def one(node: str) -> None:
        try:
            # No read timeout: a quiet node is fine while following.
            async for rec in _lines(_socket(lab, node, sockets), q.params(), None):
                if q.local_match(rec):
                    buf.push(_stamp(rec, node))
        except NodeError as e:
            warn(f"node {node}: skipped, {e}")
        else:
            warn(f"node {node}: stream ended")
        finally:
            live.discard(node)

    tasks = [asyncio.create_task(one(n)) for n in nodes]
    try:
        while live and not (stop and stop.is_set()):
            for r in buf.pop_ready():
                emit(_clean(r))
            await asyncio.sleep(0.05)
        for r in buf.pop_ready(flush=True):
            emit(_clean(r))
    finally:
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)


# --- service map ---------------------------------------------------------------------------

def _ep_id(ep: dict, ip: str) -> tuple[str, str, str]:
    """(id, label, namespace) of a map node: a workload, a reserved entity, or an address."""
    ns = ep.get("namespace") or ""
    wl = (ep.get("workloads") or [{}])[0].get("name") if ep.get("workloads") else None
    name = wl or ep.get("pod_name")
    if name:
        return f"{ns}/{name}", name, ns
    for lab in ep.get("labels") or []:
        if lab.startswith("reserved:"):
            r = lab.split(":", 1)[1]
            return f"reserved:{r}", r, ""
    return f"ip:{ip}", ip or "unknown", ""


def service_map(records, namespace: str | None = None) -> dict:
    """Workloads as nodes, observed connections as edges (client -> server, replies folded
    back), with verdict counts; an edge is DROPPED-coloured when any flow on it was dropped."""
    nodes: dict[str, dict] = {}
    edges: dict[tuple[str, str], dict] = {}
    for rec in records:
        f = rec.get("flow") or rec
        ip = f.get("IP") or {}
        s = _ep_id(f.get("source") or {}, ip.get("source", ""))
        d = _ep_id(f.get("destination") or {}, ip.get("destination", ""))
        l4 = f.get("l4") or {}
        proto = next((p for p in ("TCP", "UDP", "SCTP", "ICMPv4", "ICMPv6") if p in l4), "")
        port = (l4.get(proto) or {}).get("destination_port") if proto in ("TCP", "UDP", "SCTP") else None
        if f.get("is_reply"):
            s, d = d, s
            port = (l4.get(proto) or {}).get("source_port") if port is not None else None
        if namespace and namespace not in (s[2], d[2]):
            continue
        for nid, label, ns in (s, d):
            nodes.setdefault(nid, {"id": nid, "label": label, "namespace": ns,
                                   "kind": nid.split(":")[0] if ":" in nid else "workload"})
        e = edges.setdefault((s[0], d[0]), {"source": s[0], "target": d[0], "ports": [],
                                            "verdicts": {}, "flows": 0})
        e["flows"] += 1
        v = f.get("verdict") or "UNKNOWN"
        e["verdicts"][v] = e["verdicts"].get(v, 0) + 1
        if port and f"{port}/{proto}" not in e["ports"]:
            e["ports"].append(f"{port}/{proto}")
    for e in edges.values():
        v = e["verdicts"]
        e["verdict"] = "DROPPED" if v.get("DROPPED") else "AUDIT" if v.get("AUDIT") else \
            "FORWARDED" if v.get("FORWARDED") else next(iter(v), "UNKNOWN")
    return {"nodes": sorted(nodes.values(), key=lambda n: n["id"]),
            "edges": sorted(edges.values(), key=lambda e: (e["source"], e["target"]))}


def _namespaces_of(rec: dict) -> tuple[str, str]:
    f = rec.get("flow") or rec
    return ((f.get("source") or {}).get("namespace") or "",
            (f.get("destination") or {}).get("namespace") or "")


def namespaces(records) -> list[str]:
    out = set()
    for rec in records:
        f = rec.get("flow") or rec
        for side in ("source", "destination"):
            ns = (f.get(side) or {}).get("namespace")
            if ns:
                out.add(ns)
    return sorted(out)


# --- the relay process ---------------------------------------------------------------------

relay_file = paths.relay_file


class Relay:
    def __init__(self, lab: str, ring: int = 10000, initial: int = 1000):
        self.lab = lab
        self.ring: collections.deque[dict] = collections.deque(maxlen=ring)
        self.seq = 0
        self.initial = initial
        self.buf = Reorder()
        self.nodes: dict[str, dict] = {}
        self._tasks: dict[str, asyncio.Task] = {}
        self.started = time.time()
        self.changed = asyncio.Event()

    def node_names(self) -> list[str]:
        from cilia.lab import state
        got = state.load_spec(self.lab)
        return [n.name for n in got[0].nodes] if got else []

    async def _node(self, node: str) -> None:
        st = self.nodes.setdefault(node, {"state": "connecting", "error": None, "flows": 0})
        last_ns = 0
        while True:
            q = {"follow": "1"}
            if last_ns:
                q["since"] = format_time_ns(last_ns + 1)
            else:
                q["last"] = str(self.initial)
            try:
                st.update(state="connected", error=None)
                async for rec in _lines(paths.agent_socket(self.lab, node), q, None):
                    _stamp(rec, node)
                    last_ns = max(last_ns, rec["_ns"])
                    st["flows"] += 1
                    self.buf.push(rec)
                raise NodeError("stream ended")
            except NodeError as e:
                if st["state"] != "unreachable":
                    log.warning("node %s: %s", node, e)
                st.update(state="unreachable", error=str(e))
            await asyncio.sleep(2.0)

    async def run(self) -> None:
        while True:
            names = self.node_names()
            for n in names:
                if n not in self._tasks:
                    self._tasks[n] = asyncio.create_task(self._node(n))
            for n in list(self._tasks):
                if n not in names:
                    self._tasks.pop(n).cancel()
                    self.nodes.pop(n, None)
            for _ in range(20):
                ready = self.buf.pop_ready()
                for r in ready:
                    self.seq += 1
                    r["_seq"] = self.seq
                    self.ring.append(r)
                if ready:
                    self.changed.set()
                await asyncio.sleep(0.1)

    def records(self, after: int = 0) -> list[dict]:
        return [r for r in self.ring if r["_seq"] > after]

    def status(self) -> dict:
        return {"lab": self.lab, "num_flows": len(self.ring), "max_flows": self.ring.maxlen,
                "seq": self.seq, "uptime_s": round(time.time() - self.started, 1),
                "nodes": self.nodes}


def _public(rec: dict) -> dict:
    out = {k: v for k, v in rec.items() if not k.startswith("_")}
    out["seq"] = rec["_seq"]
    return out


def build_app(relay: Relay, ui: bool = True):
    from aiohttp import web
    routes = web.RouteTableDef()
    ui_dir = os.path.join(os.path.dirname(__file__), "ui")

    def _filters(req) -> tuple[list, list]:
        raw = req.query.get("filter")
        if not raw:
            return [], []
        try:
            d = json.loads(raw)
            return filters.validate(d.get("allow"), d.get("deny"))
        except (ValueError, AttributeError, filters.FilterError) as e:
            raise web.HTTPBadRequest(text=json.dumps({"msg": f"filter: {e}"}),
                                     content_type="application/json") from None

    def _selected(req) -> list[dict]:
        allow, deny = _filters(req)
        ns = req.query.get("namespace")
        after = int(req.query.get("after", "0") or 0)
        # the namespace picker: flows with either end in the namespace, on top of the filters
        return [r for r in relay.records(after) if filters.match(r, allow, deny)
                and (not ns or ns in _namespaces_of(r))]

    @routes.get("/api/status")
    async def status(_req):
        return web.json_response(relay.status())

    @routes.get("/api/flows")
    async def flows(req):
        recs = _selected(req)
        limit = int(req.query.get("limit", "500"))
        return web.json_response({"seq": relay.seq,
                                  "flows": [_public(r) for r in recs[-limit:]]})

    @routes.get("/api/namespaces")
    async def nss(_req):
        return web.json_response(namespaces(relay.ring))

    @routes.get("/api/servicemap")
    async def smap(req):
        allow, deny = _filters(req)
        recs = [r for r in relay.ring if filters.match(r, allow, deny)]
        return web.json_response(service_map(recs, req.query.get("namespace") or None))

    if ui:
        @routes.get("/")
        async def index(_req):
            return web.FileResponse(os.path.join(ui_dir, "index.html"))

        routes.static("/static", ui_dir)

    app = web.Application()
    app.add_routes(routes)
    return app


async def serve(lab: str, host: str, port: int, ui: bool) -> None:
    from aiohttp import web
    relay = Relay(lab)
    runner = web.AppRunner(build_app(relay, ui), access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, host, port)
    await site.start()
    log.info("relay for lab %s on http://%s:%d", lab, host, port)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    task = asyncio.create_task(relay.run())
    await stop.wait()
    task.cancel()
    await runner.cleanup()


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="cilia-hubble-relay")
    ap.add_argument("--lab", required=True)
    ap.add_argument("--host", default="127.0.0.1")
    ap.add_argument("--port", type=int, default=12000)
    ap.add_argument("--ui", action="store_true")
    a = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    asyncio.run(serve(a.lab, a.host, a.port, a.ui))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

"""Flow and monitor routes of the agent API (the flow contract, docs/architecture.md):

GET /v1/flows?last=N|first=N&since=..&until=..&follow=1&filter=<JSON>  NDJSON flow records
GET /v1/flows/status                                                  ring counters
GET /v1/monitor?type=drop&type=trace&type=policy-verdict              NDJSON raw events (follows)
"""
from __future__ import annotations

import asyncio
import json
import logging
import time

from aiohttp import web

log = logging.getLogger("cilia.api")

NDJSON = "application/x-ndjson"
FOLLOW_QUEUE = 65536  # records a slow follower may lag before it is cut off


def _bad(msg: str) -> web.Response:
    return web.json_response({"msg": msg}, status=400)


def _time_ns(value: str, name: str) -> int:
    from cilia.hubble.flow import parse_time_ns
    try:
        return parse_time_ns(value)
    except ValueError:
        raise ValueError(f"{name}: not an RFC3339 time or unix seconds: {value!r}") from None


def _int(req: web.Request, name: str) -> int | None:
    v = req.query.get(name)
    if v in (None, ""):
        return None
    try:
        n = int(v)
    except ValueError:
        raise ValueError(f"{name}: not an integer: {v!r}") from None
    if n < 0:
        raise ValueError(f"{name}: must be >= 0, not {n}")
    return n


def _predicate(raw: str | None):
    if not raw:
        return None
    try:
        spec = json.loads(raw)
    except ValueError as e:
        raise ValueError(f"filter: not JSON: {e}") from None
    if not isinstance(spec, dict):
        raise ValueError("filter: must be an object with allow/deny lists")
    try:
        from cilia.hubble import filters
    except ImportError:  # the filter module is optional; without it filters are ignored
        return None
    try:
        allow, deny = filters.validate(spec.get("allow"), spec.get("deny"))
    except Exception as e:
        raise ValueError(f"filter: {e}") from None
    return lambda rec: filters.match(rec["flow"], allow, deny)


def _line(rec: dict) -> bytes:
    return (json.dumps(rec, separators=(",", ":")) + "\n").encode()


async def _follow(resp: web.StreamResponse, subscribe, pred) -> None:
    """Streams records as they arrive until the client goes away."""
    q: asyncio.Queue = asyncio.Queue(FOLLOW_QUEUE)
    overflow = False

    def push(rec) -> None:
        nonlocal overflow
        if pred is not None and not pred(rec):
            return
        try:
            q.put_nowait(rec)
        except asyncio.QueueFull:
            overflow = True

    unsubscribe = subscribe(push)
    try:
        while not overflow:
            rec = await q.get()
            chunk = [_line(rec)]
            while not q.empty() and len(chunk) < 1024:
                chunk.append(_line(q.get_nowait()))
            await resp.write(b"".join(chunk))
    except (ConnectionResetError, asyncio.CancelledError):
        pass
    finally:
        unsubscribe()


def add_routes(app: web.Application, agent) -> None:
    routes = web.RouteTableDef()

    def hubble():
        h = getattr(agent, "hubble", None)
        if h is None:
            raise web.HTTPServiceUnavailable(text=json.dumps({"msg": "flow observability is not running"}),
                                             content_type="application/json")
        return h

    @routes.get("/v1/flows/status")
    async def flows_status(_: web.Request) -> web.Response:
        return web.json_response(hubble().status())

    @routes.get("/v1/flows")
    async def flows(req: web.Request) -> web.StreamResponse:
        h = hubble()
        try:
            first, last = _int(req, "first"), _int(req, "last")
            since = _time_ns(req.query["since"], "since") if req.query.get("since") else None
            until = _time_ns(req.query["until"], "until") if req.query.get("until") else None
            pred = _predicate(req.query.get("filter"))
        except ValueError as e:
            return _bad(str(e))
        if first is not None and last is not None:
            return _bad("first and last: pick one")
        follow = req.query.get("follow") in ("1", "true", "yes")
        if follow and until is not None and until < time.time_ns():
            follow = False
        # The flow log reaches back further than the ring (and across restarts).
        if h.flowlog is not None and (since is not None or until is not None):
            rows = h.flowlog.query(since_ns=since, until_ns=until)
            recs = [r for _, r in rows if pred is None or pred(r)]
            if first is not None:
                recs = recs[:first]
            elif last is not None:
                recs = recs[-last:] if last else []
        else:
            recs = h.observer.query(first=first, last=last, since_ns=since, until_ns=until, predicate=pred)
        if follow and last is None and first is None and since is None:
            recs = []  # `--follow` alone: new flows only, as hubble observe -f
        resp = web.StreamResponse(headers={"Content-Type": NDJSON})
        await resp.prepare(req)
        for i in range(0, len(recs), 512):
            await resp.write(b"".join(_line(r) for r in recs[i:i + 512]))
        if follow:
            await _follow(resp, h.observer.subscribe, pred)
        await resp.write_eof()
        return resp

    @routes.get("/v1/monitor")
    async def monitor(req: web.Request) -> web.StreamResponse:
        from cilia.datapath import events as E
        h = hubble()
        names = {n for v in req.query.getall("type", []) for n in v.split(",") if n}
        bad = names - set(E.EVENT_TYPE_NAMES.values())
        if bad:
            return _bad(f"type: unknown event type {sorted(bad)[0]!r} "
                        f"(one of {', '.join(sorted(E.EVENT_TYPE_NAMES.values()))})")
        types = {t for t, n in E.EVENT_TYPE_NAMES.items() if n in names} or None
        node = agent.cfg.node

        def pred(ev) -> bool:
            return types is None or ev.type in types

        def subscribe(push):
            return h.subscribe_events(lambda ev: push({**ev.to_dict(), "node_name": node}) if pred(ev) else None)

        resp = web.StreamResponse(headers={"Content-Type": NDJSON})
        await resp.prepare(req)
        await resp.write(b"")  # headers out now: the client knows the stream is live
        await _follow(resp, subscribe, None)
        await resp.write_eof()
        return resp

    app.add_routes(routes)

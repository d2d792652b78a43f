"""Policy routes of the agent API: what the node enforces, why, and since when."""
from __future__ import annotations

import json
from typing import TYPE_CHECKING

from aiohttp import web

if TYPE_CHECKING:
    from cilia.agent.daemon import Agent

AUDIT_VALUES = {"enabled": True, "true": True, "disabled": False, "false": False}


_ERRORS = {400: web.HTTPBadRequest, 404: web.HTTPNotFound, 503: web.HTTPServiceUnavailable}


def _error(status: int, msg: str) -> web.HTTPException:
    return _ERRORS[status](text=json.dumps({"msg": msg}), content_type="application/json")


def _policy(agent: "Agent"):
    if agent.policy is None:
        raise _error(503, "policy needs a cluster store (--store)")
    return agent.policy


def add_policy_routes(routes: web.RouteTableDef, agent: "Agent") -> None:
    @routes.get("/v1/policy")
    async def policy_get(_: web.Request) -> web.Response:
        p = _policy(agent)
        return web.json_response({**agent.policy_status(),
                                  "items": [p.objects[k] for k in sorted(p.objects)]})

    @routes.get("/v1/policy/realized")
    async def policy_realized(req: web.Request) -> web.Response:
        want = int(req.query.get("revision", "0") or 0)
        rev = await _policy(agent).realized(want)
        return web.json_response({"node": agent.cfg.node, "revision": rev,
                                  "realized": rev > 0 and rev >= want})

    @routes.post("/v1/policy/explain")
    async def policy_explain(req: web.Request) -> web.Response:
        p = _policy(agent)
        body = await req.json()
        out = []
        for q in body if isinstance(body, list) else [body]:
            try:
                out.append(p.explain(q))
            except (LookupError, ValueError, KeyError, TypeError) as e:
                out.append({"query": q, "error": str(e).strip("'\"")})
        return web.json_response(out)

    @routes.get("/v1/bpf/policy")
    async def bpf_policy(req: web.Request) -> web.Response:
        ep = req.query.get("ep")
        entries = await agent.blocking(agent.datapath.policy_entries, int(ep) if ep else None)
        return web.json_response(entries)

    @routes.patch("/v1/endpoint/{id}/config")
    async def endpoint_config(req: web.Request) -> web.Response:
        p = _policy(agent)
        ep_id = int(req.match_info["id"])
        if ep_id not in agent.endpoints.endpoints:
            raise _error(404, f"endpoint {ep_id} not found")
        body = await req.json()
        for k, v in body.items():
            if k != "PolicyAuditMode":
                raise _error(400, f"unsupported option {k!r} (supported: PolicyAuditMode)")
            if str(v).lower() not in AUDIT_VALUES:
                raise _error(400, f"PolicyAuditMode: want Enabled or Disabled, not {v!r}")
            await p.set_endpoint_audit(ep_id, AUDIT_VALUES[str(v).lower()])
        return web.json_response(p.endpoint_status(ep_id))

"""The agent's HTTP API on its unix socket (mode 0600). JSON in, JSON out."""
from __future__ import annotations

import asyncio
import logging
import os
from typing import TYPE_CHECKING

from aiohttp import web

from cilia.api import flows
from cilia.api.models import endpoint_model
from cilia.api.policy_routes import add_policy_routes
from cilia.endpoint.manager import CniRequest, EndpointError
from cilia.kvstore import LeaseNotFound, StoreUnavailable

if TYPE_CHECKING:
    from cilia.agent.daemon import Agent

log = logging.getLogger("cilia.api")


def _cni_error(e: EndpointError) -> web.Response:
    return web.json_response({"cniVersion": "1.0.0", "code": e.code, "msg": str(e),
                              "details": e.details}, status=400)


def _cni_request(body: dict) -> CniRequest:
    args = body.get("args") or {}
    try:
        return CniRequest(container_id=body["containerID"], netns=body.get("netns", ""),
                          ifname=body.get("ifname") or "eth0",
                          pod_namespace=args.get("K8S_POD_NAMESPACE", ""),
                          pod_name=args.get("K8S_POD_NAME", ""),
                          labels=_arg_labels(args.get("CILIA_LABELS", "")))
    except KeyError as e:
        raise EndpointError(f"missing field {e.args[0]}", code=4) from None


def _arg_labels(raw: str) -> dict[str, str]:
    """CNI_ARGS CILIA_LABELS=k=v,k2=v2: the labels of a workload that has no Pod object
    (podman passes CNI_ARGS from its environment through to the plugin)."""
    out = {}
    for pair in filter(None, raw.split(",")):
        k, sep, v = pair.partition("=")
        if not sep or not k:
            raise EndpointError(f"CNI_ARGS CILIA_LABELS: {pair!r} is not key=value", code=4)
        out[k] = v
    return out


def build_app(agent: "Agent") -> web.Application:
    routes = web.RouteTableDef()

    @routes.get("/v1/healthz")
    async def healthz(_: web.Request) -> web.Response:
        return web.json_response({"status": "ok" if agent.ready.is_set() else "starting"})

    @routes.get("/v1/status")
    async def status(_: web.Request) -> web.Response:
        return web.json_response(await agent.status())

    @routes.get("/v1/endpoint")
    async def endpoints(_: web.Request) -> web.Response:
        eps = sorted(agent.endpoints.endpoints.values(), key=lambda e: e.id)
        pol = agent.policy.endpoint_status if agent.policy else (lambda _id: None)
        return web.json_response([endpoint_model(e, agent.cfg.node, pol(e.id)) for e in eps])

    @routes.post("/v1/cni/add")
    async def cni_add(req: web.Request) -> web.Response:
        try:
            creq = _cni_request(await req.json())
            if not creq.netns:
                raise EndpointError("CNI_NETNS is required for ADD", code=4)
            result = await agent.cni_add(creq)
        except EndpointError as e:
            return _cni_error(e)
        except (StoreUnavailable, LeaseNotFound) as e:
            return _cni_error(EndpointError(f"cluster store unreachable: {e}", code=11))
        return web.json_response(result)

    @routes.post("/v1/cni/del")
    async def cni_del(req: web.Request) -> web.Response:
        try:
            creq = _cni_request(await req.json())
            await agent.cni_del(creq.container_id, creq.ifname)
        except EndpointError as e:
            return _cni_error(e)
        return web.json_response({})

    @routes.post("/v1/cni/check")
    async def cni_check(req: web.Request) -> web.Response:
        try:
            creq = _cni_request(await req.json())
            await agent.blocking(agent.endpoints.check, creq.container_id, creq.ifname)
        except EndpointError as e:
            return _cni_error(e)
        return web.json_response({})

    @routes.get("/v1/bpf/endpoint")
    async def bpf_endpoints(_: web.Request) -> web.Response:
        entries = await agent.blocking(agent.datapath.endpoints)
        return web.json_response([e.__dict__ for e in entries])

    @routes.get("/v1/bpf/ipcache")
    async def bpf_ipcache(_: web.Request) -> web.Response:
        entries = await agent.blocking(agent.datapath.ipcache)
        return web.json_response([e.__dict__ for e in entries])

    @routes.get("/v1/bpf/nat")
    async def bpf_nat(_: web.Request) -> web.Response:
        return web.json_response(await agent.blocking(agent.datapath.nat_entries))

    @routes.get("/v1/service")
    async def services(_: web.Request) -> web.Response:
        return web.json_response(agent.lb.services_view() if agent.lb else [])

    @routes.get("/v1/bpf/lb")
    async def bpf_lb(_: web.Request) -> web.Response:
        return web.json_response(await agent.blocking(agent.datapath.services))

    @routes.get("/v1/bpf/ct")
    async def bpf_ct(_: web.Request) -> web.Response:
        return web.json_response(await agent.blocking(agent.datapath.ct_entries))

    @routes.get("/v1/bpf/metrics")
    async def bpf_metrics(_: web.Request) -> web.Response:
        return web.json_response(await agent.blocking(agent.datapath.metrics))

    add_policy_routes(routes, agent)
    app = web.Application()
    app.add_routes(routes)
    flows.add_routes(app, agent)
    return app


async def serve(agent: "Agent") -> None:
    path = agent.cfg.socket
    os.makedirs(os.path.dirname(path), exist_ok=True)
    if os.path.exists(path):
        os.unlink(path)  # a previous agent's socket; we hold the node now
    runner = web.AppRunner(build_app(agent), access_log=None)
    await runner.setup()
    site = web.UnixSite(runner, path)
    # umask rather than chmod after bind: no window in which the socket is world-writable.
    old = os.umask(0o177)
    try:
        await site.start()
    finally:
        os.umask(old)
    log.info("API listening on %s", path)
    try:
        await asyncio.Event().wait()
    finally:
        await runner.cleanup()

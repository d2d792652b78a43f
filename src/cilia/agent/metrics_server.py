"""The agent's Prometheus endpoint: Hubble flow metrics and the agent's own, in one registry
served on TCP (Cilium uses 9962 for the agent and 9965 for Hubble; one port serves both
here) in the node's network namespace."""
from __future__ import annotations

import asyncio
import logging
import os

from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest

from cilia.hubble.metrics import AgentCollector, HubbleMetrics, RegenerationSampler

log = logging.getLogger("cilia.agent.metrics")

DEFAULT_PORT = 9962


def _observer(agent):
    """The agent's flow ring: agent.hubble.observer (cilia.agent.observe)."""
    h = getattr(agent, "hubble", None)
    return getattr(h, "observer", None) if h is not None else getattr(agent, "observer", None)


def _lost_events(agent) -> dict[str, int]:
    """What the event reader lost (the BPF ring buffer was full), under Hubble's source name."""
    obs = getattr(agent, "hubble", None) or _observer(agent)
    out: dict[str, int] = {}
    if obs is None:
        return out
    st = None
    status = getattr(obs, "status", None)
    if callable(status):
        try:
            st = status()
        except Exception:
            st = None
    if isinstance(st, dict) and "lost_events" in st:
        lost = st["lost_events"]
    else:
        lost = getattr(obs, "lost_events", 0)
    if isinstance(lost, dict):
        out.update({k: int(v) for k, v in lost.items()})
    else:
        out["perf_event_ring_buffer"] = int(lost or 0)
    return out


async def serve_metrics(agent, host: str = "0.0.0.0", port: int | None = None) -> None:
    """Root task of the agent. A port that cannot be bound is logged, not fatal: losing
    metrics must not take the node's networking agent down with it."""
    port = port or int(os.environ.get("CILIA_METRICS_PORT", DEFAULT_PORT))
    registry = CollectorRegistry()
    hubble = HubbleMetrics(registry, lost_events=lambda: _lost_events(agent))
    registry.register(AgentCollector(agent))
    regen = RegenerationSampler(registry, agent)
    loop = asyncio.get_running_loop()

    async def metrics(_req: web.Request) -> web.Response:
        # map walks are syscalls: keep them off the event loop
        body = await loop.run_in_executor(None, generate_latest, registry)
        return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE_LATEST})

    app = web.Application()
    app.router.add_get("/metrics", metrics)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    try:
        await web.TCPSite(runner, host, port).start()
        log.info("metrics on %s:%d/metrics", host, port)
    except OSError as e:
        log.error("metrics server not started on %s:%d: %s", host, port, e)
    unsubscribe = None
    try:
        while True:
            obs = _observer(agent)
            if unsubscribe is None and obs is not None:
                unsubscribe = obs.subscribe(hubble.on_flow)
            regen.poll()
            await asyncio.sleep(1.0)
    finally:
        if callable(unsubscribe):
            unsubscribe()
        await runner.cleanup()

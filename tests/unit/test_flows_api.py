"""The agent's flow routes over a real aiohttp app (no kernel): records go through the
agent's Hubble pipeline (decode, enrich, ring, flow log) and come out of /v1/flows,
/v1/flows/status and /v1/monitor as NDJSON."""
from __future__ import annotations

import asyncio
import json
from types import SimpleNamespace

from aiohttp import web
from aiohttp.test_utils import TestClient, TestServer

from cilia.agent.observe import Hubble
from cilia.api import flows
from tests.unit.test_hubble_flows import A, B, frame, record


def fake_agent(tmp_path, flow_log: bool = False):
    cfg = SimpleNamespace(node="node1", cluster="lab1", state_dir=str(tmp_path), pin_dir="")
    agent = SimpleNamespace(cfg=cfg, endpoints=None, cluster=None, lb=None, identities=None)
    agent.hubble = Hubble(agent, max_flows=5, flow_log=str(tmp_path / "flows.db") if flow_log else "")
    return agent


def lines(text: str) -> list[dict]:
    return [json.loads(x) for x in text.splitlines() if x.strip()]


def run(coro):
    return asyncio.run(coro)


async def _client(agent) -> TestClient:
    app = web.Application()
    flows.add_routes(app, agent)
    client = TestClient(TestServer(app))
    await client.start_server()
    return client


def feed(agent, n: int, t0: int = 1_000_000_000, dport: int = 80):
    raws = [record(4, 0, frame(A, B, sport=30000 + i, dport=dport), ktime=t0 + i) for i in range(n)]
    return agent.hubble.process(raws)


def test_flows_last_first_and_ring_capacity(tmp_path):
    agent = fake_agent(tmp_path)

    async def go():
        c = await _client(agent)
        try:
            feed(agent, 8)
            all_ = lines(await (await c.get("/v1/flows")).text())
            assert len(all_) == 5  # ring of 5
            ports = [r["flow"]["l4"]["TCP"]["source_port"] for r in all_]
            assert ports == [30003, 30004, 30005, 30006, 30007]
            assert lines(await (await c.get("/v1/flows?last=2")).text()) == all_[-2:]
            assert lines(await (await c.get("/v1/flows?first=1")).text()) == all_[:1]
            st = await (await c.get("/v1/flows/status")).json()
            assert (st["num_flows"], st["max_flows"], st["seen_flows"]) == (5, 5, 8)
            r = await c.get("/v1/flows?last=x")
            assert r.status == 400 and "last" in (await r.json())["msg"]
            r = await c.get("/v1/flows?since=yesterday")
            assert r.status == 400 and "since" in (await r.json())["msg"]
        finally:
            await c.close()
    run(go())


def test_follow_streams_new_flows(tmp_path):
    agent = fake_agent(tmp_path)

    async def go():
        c = await _client(agent)
        try:
            feed(agent, 2)
            resp = await c.get("/v1/flows?follow=1")
            await asyncio.sleep(0.05)
            feed(agent, 1, dport=443)
            line = await asyncio.wait_for(resp.content.readline(), 2)
            assert json.loads(line)["flow"]["l4"]["TCP"]["destination_port"] == 443
            resp.close()
        finally:
            await c.close()
    run(go())


def test_filter_param_uses_hubble_filters(tmp_path):
    agent = fake_agent(tmp_path)

    async def go():
        c = await _client(agent)
        try:
            feed(agent, 2, dport=80)
            feed(agent, 1, dport=443)
            f = json.dumps({"allow": [{"destination_port": ["443"]}]})
            got = lines(await (await c.get("/v1/flows", params={"filter": f})).text())
            assert [r["flow"]["l4"]["TCP"]["destination_port"] for r in got] == [443]
            r = await c.get("/v1/flows", params={"filter": "{"})
            assert r.status == 400 and "filter" in (await r.json())["msg"]
        finally:
            await c.close()
    run(go())


def test_monitor_streams_typed_events(tmp_path):
    agent = fake_agent(tmp_path)

    async def go():
        c = await _client(agent)
        try:
            resp = await c.get("/v1/monitor?type=drop")
            await asyncio.sleep(0.05)
            agent.hubble.process([record(4, 0, frame(A, B)), record(1, 133, frame(A, B, dport=8080), flags=1)])
            ev = json.loads(await asyncio.wait_for(resp.content.readline(), 2))
            assert (ev["type"], ev["subtype"], ev["dst_port"], ev["node_name"]) == (1, 133, 8080, "node1")
            resp.close()
            r = await c.get("/v1/monitor?type=bogus")
            assert r.status == 400 and "bogus" in (await r.json())["msg"]
        finally:
            await c.close()
    run(go())


def test_flow_log_history_survives_restart_and_answers_since(tmp_path):
    agent = fake_agent(tmp_path, flow_log=True)
    feed(agent, 8)
    times = [r["time"] for r in agent.hubble.observer.snapshot()]
    agent.hubble.flowlog.close()
    again = fake_agent(tmp_path, flow_log=True)  # "restarted": the ring is refilled from the log
    assert [r["time"] for r in again.hubble.observer.snapshot()] == times

    async def go():
        c = await _client(again)
        try:
            # since reaches past the ring (5) into the log (8).
            got = lines(await (await c.get("/v1/flows", params={"since": "0"})).text())
            assert len(got) == 8
        finally:
            await c.close()
    run(go())

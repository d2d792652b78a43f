"""`cilia observe` and the relay against stand-in agents on unix sockets (a fast seam: the
real agents are in tests/e2e/test_observe.py). Three nodes: two answer, one is dead, and
with --follow a flow pushed after the stream opened arrives."""
from __future__ import annotations

import asyncio
import json
import os
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
import uuid

import pytest
from aiohttp import web

from cilia import paths
from cilia.hubble.printers import format_time_ns, parse_time_ns
from tests.unit.test_hubble_filters import flow

CILIA = os.path.join(os.path.dirname(sys.executable), "cilia")
T0 = parse_time_ns("2026-11-28T16:00:00Z")


def rec(node: str, sec: float, **kw) -> dict:
    t = format_time_ns(T0 + int(sec * 1e9))
    f = dict(flow(**kw), time=t, node_name=node)
    return {"flow": f, "node_name": node, "time": t}


class FakeAgent:
    """Serves /v1/flows as the contract says (last, first, follow) from a list."""

    def __init__(self, sock: str, records: list[dict]):
        self.sock, self.records = sock, records
        self.followers: list[asyncio.Queue] = []
        self.loop: asyncio.AbstractEventLoop | None = None

    async def flows(self, req: web.Request) -> web.StreamResponse:
        recs = list(self.records)
        if "first" in req.query:
            recs = recs[:int(req.query["first"])]
        if "last" in req.query:
            recs = recs[-int(req.query["last"]):]
        if "since" in req.query:
            since = parse_time_ns(req.query["since"])
            recs = [r for r in recs if parse_time_ns(r["time"]) >= since]
        resp = web.StreamResponse(headers={"Content-Type": "application/x-ndjson"})
        await resp.prepare(req)
        for r in recs:
            await resp.write((json.dumps(r) + "\n").encode())
        if req.query.get("follow") == "1":
            q: asyncio.Queue = asyncio.Queue()
            self.followers.append(q)
            try:
                while True:
                    r = await q.get()
                    await resp.write((json.dumps(r) + "\n").encode())
            finally:
                self.followers.remove(q)
        return resp

    def push(self, r: dict) -> None:
        self.records.append(r)
        for q in list(self.followers):
            self.loop.call_soon_threadsafe(q.put_nowait, r)


@pytest.fixture
def fake_lab(monkeypatch):
    from cilia.lab import state, topology
    root = tempfile.mkdtemp(prefix="cilia-relay-")
    monkeypatch.setattr(paths, "RUN_ROOT", root)
    name = "r" + uuid.uuid4().hex[:6]
    spec = topology.plan(name, 3, "tunnel", "local")
    state.save_spec(spec, "running")
    n1, n2, n3 = [n.name for n in spec.nodes]
    agents = {
        n1: FakeAgent(paths.agent_socket(name, n1),
                      [rec(n1, s, src_pod="a", dst_pod="b") for s in (0, 2, 4)]),
        n2: FakeAgent(paths.agent_socket(name, n2),
                      [rec(n2, s, src_pod="c", dst_pod="b", verdict="DROPPED") for s in (1, 3)]),
    }
    # n3 has a directory but no agent: the dead node.
    os.makedirs(paths.node_dir(name, n3), exist_ok=True)
    loop = asyncio.new_event_loop()
    runners = []

    async def start():
        for a in agents.values():
            os.makedirs(os.path.dirname(a.sock), exist_ok=True)
            a.loop = loop
            app = web.Application()
            app.router.add_get("/v1/flows", a.flows)
            r = web.AppRunner(app, shutdown_timeout=0.5)
            await r.setup()
            await web.UnixSite(r, a.sock).start()
            runners.append(r)

    t = threading.Thread(target=loop.run_forever, daemon=True)
    t.start()
    asyncio.run_coroutine_threadsafe(start(), loop).result(10)
    env = {**os.environ, "CILIA_RUN_ROOT": root, "CILIA_LAB": name, "CILIA_OBSERVE_TIMEOUT": "2"}

    async def stop():
        for r in runners:
            await r.cleanup()
        rest = [x for x in asyncio.all_tasks() if x is not asyncio.current_task()]
        for x in rest:
            x.cancel()
        await asyncio.gather(*rest, return_exceptions=True)

    try:
        yield name, (n1, n2, n3), agents, env
    finally:
        import shutil
        try:
            asyncio.run_coroutine_threadsafe(stop(), loop).result(10)
            loop.call_soon_threadsafe(loop.stop)
            t.join(5)
            loop.close()
        finally:
            # also stops a relay a test left running (it is recorded in the lab's run dir)
            subprocess.run([CILIA, "lab", "down", "--name", name], env=env, capture_output=True, timeout=60)
            shutil.rmtree(root, ignore_errors=True)


def cilia(env, *args, timeout=30):
    return subprocess.run([CILIA, *args], env=env, capture_output=True, text=True, timeout=timeout)


def test_observe_merges_nodes_in_time_order_and_skips_dead_node(fake_lab):
    name, (n1, n2, n3), _, env = fake_lab
    t = time.monotonic()
    r = cilia(env, "observe", "-o", "json", "--last", "4")
    assert time.monotonic() - t < 15
    assert r.returncode == 0, r.stderr
    got = [json.loads(x) for x in r.stdout.splitlines()]
    assert [g["time"][17:19] for g in got] == ["01", "02", "03", "04"]
    assert [g["node_name"] for g in got] == [n2, n1, n2, n1]
    assert f"warning: node {n3}: skipped" in r.stderr


def test_observe_filters_node_and_compact(fake_lab):
    name, (n1, n2, _), _, env = fake_lab
    r = cilia(env, "observe", "-o", "json", "--verdict", "DROPPED")
    assert {json.loads(x)["node_name"] for x in r.stdout.splitlines()} == {n2}
    r = cilia(env, "observe", "-o", "json", "--not", "--from-pod", "a", "--to-pod", "b")
    assert {json.loads(x)["flow"]["source"]["pod_name"] for x in r.stdout.splitlines()} == {"c"}
    r = cilia(env, "observe", "--node", n1, "--first", "1")
    assert r.returncode == 0 and r.stderr == ""
    assert len(r.stdout.splitlines()) == 1 and "default/a:43210 (ID:1234) -> default/b:80" in r.stdout
    r = cilia(env, "observe", "--node", "nope")
    assert r.returncode == 1 and r.stderr.startswith("error: --node nope")
    r = cilia(env, "observe", "--protocol", "gre")
    assert r.returncode == 1 and "--protocol" in r.stderr and r.stdout == ""


def test_observe_all_nodes_dead_is_an_error(fake_lab):
    name, (_, _, n3), _, env = fake_lab
    r = cilia(env, "observe", "--node", n3)
    assert r.returncode == 1 and "no node answered" in r.stderr


def test_follow_delivers_new_flow_within_a_second(fake_lab):
    name, (n1, n2, _), agents, env = fake_lab
    p = subprocess.Popen([CILIA, "observe", "--follow", "-o", "json"], env=env,
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 20
        while not (agents[n1].followers and agents[n2].followers):
            assert time.monotonic() < deadline and p.poll() is None, p.stderr.read()
            time.sleep(0.05)
        now = time.time_ns()
        new = rec(n2, 0, src_pod="late")
        new["time"] = new["flow"]["time"] = format_time_ns(now)
        sent = time.monotonic()
        agents[n2].push(new)
        while True:
            line = p.stdout.readline()
            assert line, p.stderr.read()
            if json.loads(line)["flow"]["source"]["pod_name"] == "late":
                break
        assert time.monotonic() - sent < 1.0
    finally:
        p.terminate()
        p.wait(10)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_relay_enable_status_api_and_lab_down_stops_it(fake_lab):
    name, (n1, n2, n3), agents, env = fake_lab
    port = _free_port()
    r = cilia(env, "hubble", "enable", "--ui", "--port", str(port))
    assert r.returncode == 0, r.stderr
    rec_file = json.load(open(os.path.join(paths.cluster_dir(name), "hubble-relay.json")))
    base = f"http://127.0.0.1:{port}"

    def get(path):
        with urllib.request.urlopen(base + path, timeout=5) as resp:
            return resp.read().decode()

    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        flows = json.loads(get("/api/flows"))["flows"]
        if len(flows) == 5:
            break
        time.sleep(0.2)
    assert [f["time"][17:19] for f in flows] == ["00", "01", "02", "03", "04"]
    smap = json.loads(get("/api/servicemap?namespace=default"))
    assert {n["id"] for n in smap["nodes"]} == {"default/a", "default/b", "default/c"}
    assert {(e["source"], e["target"], e["verdict"]) for e in smap["edges"]} == \
        {("default/a", "default/b", "FORWARDED"), ("default/c", "default/b", "DROPPED")}
    dropped = json.loads(get("/api/flows?filter=" + urllib.request.quote(
        json.dumps({"allow": [{"verdict": ["DROPPED"]}]}))))["flows"]
    assert len(dropped) == 2
    assert "<svg" in get("/") and "renderMap" in get("/static/app.js")
    st = cilia(env, "hubble", "status", "-o", "json")
    body = json.loads(st.stdout)
    assert body["running"] and body["relay"]["nodes"][n1]["state"] == "connected"
    assert body["relay"]["nodes"][n3]["state"] == "unreachable"
    text = cilia(env, "hubble", "status").stdout
    assert "Nodes:    2/3 connected" in text
    again = cilia(env, "hubble", "enable", "--port", str(port + 1))
    assert again.returncode == 1 and "already running" in again.stderr
    # a new flow shows up in the relay while it follows
    agents[n1].push(rec(n1, 5, src_pod="a", dst_pod="b"))
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline and len(json.loads(get("/api/flows"))["flows"]) < 6:
        time.sleep(0.1)
    assert len(json.loads(get("/api/flows"))["flows"]) == 6
    from cilia.procs import ProcRef
    ref = ProcRef.from_json(rec_file)
    assert ref.alive()
    subprocess.run([CILIA, "lab", "down", "--name", name], env=env, capture_output=True, timeout=60)
    deadline = time.monotonic() + 5
    while ref.alive() and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not ref.alive()


def test_relay_namespace_picker_keeps_the_pod_filter():
    from cilia.hubble.relay import Relay, build_app
    from aiohttp.test_utils import TestClient, TestServer

    async def main():
        relay = Relay("nolab")
        for i, r in enumerate([rec("n1", 0, src_pod="a", dst_pod="b"),
                               rec("n1", 1, src_pod="c", dst_pod="b"),
                               rec("n1", 2, src_pod="a", src_ns="other", dst_pod="z", dst_ns="other")]):
            r["_seq"] = i + 1
            relay.ring.append(r)
        relay.seq = 3
        async with TestClient(TestServer(build_app(relay, ui=False))) as c:
            flt = json.dumps({"allow": [{"source_pod": ["default/a"]}, {"destination_pod": ["default/a"]}]})
            got = await (await c.get("/api/flows", params={"namespace": "default", "filter": flt})).json()
            assert [f["seq"] for f in got["flows"]] == [1]
            got = await (await c.get("/api/flows", params={"namespace": "other"})).json()
            assert [f["seq"] for f in got["flows"]] == [3]
            bad = await c.get("/api/flows", params={"filter": '{"allow": [{"nope": 1}]}'})
            assert bad.status == 400 and "nope" in (await bad.json())["msg"]
    asyncio.run(main())


def test_observe_into_a_closed_pipe_exits_quietly(fake_lab):
    name, _, agents, env = fake_lab
    n1 = next(iter(agents))
    agents[n1].records.extend(rec(n1, 10 + i / 1000) for i in range(3000))
    r = subprocess.run(["bash", "-c", f"{CILIA} observe --all -o json | head -n 1; exit ${{PIPESTATUS[0]}}"],
                       env=env, capture_output=True, text=True, timeout=60)
    assert len(r.stdout.splitlines()) == 1
    assert r.returncode == 0, r.stderr
    assert "Traceback" not in r.stderr and "BrokenPipe" not in r.stderr, r.stderr


def test_collect_uses_given_sockets(fake_lab):
    """An installed host's agent socket is not in the lab layout: collect takes a map."""
    from cilia.hubble.relay import Query, collect
    name, (n1, n2, n3), agents, _ = fake_lab
    warns = []
    got = asyncio.run(collect(name, [n3], Query(), warns.append, {n3: agents[n2].sock}))
    assert warns == [] and len(got) == 2 and {r["flow"]["source"]["pod_name"] for r in got} == {"c"}

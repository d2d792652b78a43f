"""Flow observability costs.

1. Pipeline: how many datapath events per second the agent's reader decodes, enriches into
   Hubble flows and stores in its ring (cilia.agent.observe.Hubble.process, the code the
   agent runs), and the CPU time per 10,000 events. The ring is filled by the real
   programs through BPF_PROG_TEST_RUN (per-packet mode, a pod sending to the stack), then
   read through its mmapped pages. "No loss" is checked: every produced event was read
   and the datapath's lost counter stayed 0. A second run produces and consumes at the
   same time (producer thread in bursts the ring can hold) to show the rate the reader
   sustains while the kernel writes.
2. Cost on traffic: request/response latency (sockperf TCP ping-pong, pinned to one CPU)
   and new TCP connections per second between two pods, with the datapath's events
   disabled, aggregated per connection (the default) and per packet, on three 1-node labs
   measured side by side, alternating order each repetition; medians.
"""
from __future__ import annotations

import os
import secrets
import subprocess
import sys
import threading
import time
from types import SimpleNamespace

from bench.common import (bench_pods, BenchError, Procs, fmt, in_netns, lab, log, median, sh, table,
                          unique_name)

MODES = ("disabled", "medium", "none")
RATES = (1000, 2000, 4000, 8000, 16000, 32000, 64000)
LADDER_SECONDS = 5   # Cilium's monitorAggregation names (none = per packet)
CPU = 0
CONNS = 1500

SERVER = r"""
import socket, sys
s = socket.socket(); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind((sys.argv[1], int(sys.argv[2]))); s.listen(512)
while True:
    c, _ = s.accept()
    d = c.recv(64)
    if d: c.sendall(d)
    c.close()
"""

CLIENT = r"""
import socket, sys, time
ip, port, n = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
t = time.perf_counter()
for _ in range(n):
    c = socket.create_connection((ip, port)); c.sendall(b"ping"); c.recv(64); c.close()
print(n / (time.perf_counter() - t))
"""

PODS = bench_pods()


# --- 1. the pipeline ----------------------------------------------------------------------

class _Node:
    """A throwaway netns with one pod veth and a loaded datapath (per-packet events)."""

    def __init__(self, flags: int | None = None):
        from cilia.datapath import events as E
        from cilia.datapath.netns import NetnsExecutor
        from cilia.datapath.node import EndpointEntry, NodeConfig, NodeDatapath
        self.ns = "bev" + secrets.token_hex(3)
        self.pins = f"/sys/fs/bpf/cilia/bench-{secrets.token_hex(4)}"
        sh("ip", "netns", "add", self.ns)
        self.ex = NetnsExecutor(f"/run/netns/{self.ns}")
        sh("ip", "-n", self.ns, "link", "add", "bva", "type", "veth", "peer", "name", "bvb")
        sh("ip", "-n", self.ns, "link", "set", "bva", "up")
        import json
        self.ifindex = json.loads(sh("ip", "-n", self.ns, "-j", "link", "show", "bva").stdout)[0]["ifindex"]
        self.dp = NodeDatapath(self.pins, NodeConfig(node_ip4="192.168.77.10", router_ip4="10.77.0.1",
                                                     pod_cidr4="10.77.0.0/24",
                                                     flags=E.CONFIG_F_EVENTS_PER_PACKET
                                                     if flags is None else flags)).load()
        self.dp.upsert_endpoint(EndpointEntry("10.77.0.11", self.ifindex, 11, "0a:00:00:00:00:11",
                                              "ee:00:00:00:00:11", sec_id=4000))

    def produce(self, n: int) -> int:
        """Runs the pod program n times (one event each in per-packet mode); the kernel's
        mean ns per run."""
        from cilia.datapath.testrun import prog_test_run, skb_ctx
        from tests.datapath.packets import frame4, tcp  # packet builders shared with the tests
        pkt = frame4("10.77.0.11", "198.51.100.9", 6, tcp("10.77.0.11", "198.51.100.9", 40000, 443, b"x",
                                                          flags=0x18))
        r = self.ex.run(prog_test_run, self.dp.program_fd("cil_from_container"), pkt, repeat=n,
                        ctx=skb_ctx(ifindex=self.ifindex))
        return r.duration_ns

    def close(self) -> None:
        from cilia.datapath.node import NodeDatapath
        try:
            self.dp.close()
            self.ex.close()
        finally:
            NodeDatapath.remove_pins(self.pins)
            subprocess.run(["ip", "netns", "del", self.ns], check=False)


def _hubble(pin_dir: str):
    from cilia.agent.observe import Hubble
    from cilia.hubble import flow as F
    cfg = SimpleNamespace(node="node1", cluster="bench", state_dir="/tmp", pin_dir=pin_dir)
    agent = SimpleNamespace(cfg=cfg, endpoints=None, cluster=None, lb=None, identities=None)
    h = Hubble(agent)
    # The enrichment the agent does for a pod: endpoint, labels, workload, world peer.
    h.ctx = F.StaticContext(node_name="node1", cluster_name="bench", endpoints={
        "10.77.0.11": F.EndpointView(identity=4000, ep_id=11, namespace="default",
                                     pod_name="client-6b8f9d7c4-q2w3e",
                                     labels=["k8s:app=client", "k8s:io.kubernetes.pod.namespace=default"])})
    return h


def kernel_cost(reps: int, n: int = 10000) -> dict:
    """ns per packet of cil_from_container (pod -> world, established-looking TCP) with
    events off and with one event per packet (ring drained before each run, so every
    reserve succeeds): the datapath's price of a reported packet."""
    from cilia.datapath import events as E
    nodes = {"off": _Node(E.CONFIG_F_EVENTS_OFF), "per_packet": _Node(E.CONFIG_F_EVENTS_PER_PACKET)}
    try:
        srcs = {k: E.EventSource(n_.pins) for k, n_ in nodes.items()}
        samples: dict = {k: [] for k in nodes}
        for rep in range(reps):
            for k in (("off", "per_packet") if rep % 2 == 0 else ("per_packet", "off")):
                srcs[k].ring.drain()
                samples[k].append(nodes[k].produce(n))
        for s_ in srcs.values():
            s_.close()
        med = {k: median(v) for k, v in samples.items()}
        log(f"kernel: off {med['off']} ns/pkt, per packet {med['per_packet']} ns/pkt")
        return {"samples": samples, "medians": med, "event_ns": med["per_packet"] - med["off"]}
    finally:
        for n_ in nodes.values():
            n_.close()


def pipeline(reps: int, batch_events: int = 20000) -> dict:
    from cilia.datapath import events as E
    node = _Node()
    try:
        src = E.EventSource(node.pins)
        h = _hubble(node.pins)
        h.source = src
        drained = []
        for _ in range(reps):
            node.produce(batch_events)
            c0, t0 = time.process_time(), time.perf_counter()
            got = 0
            while True:
                raws = src.read_raw(2048)
                if not raws:
                    break
                got += h.process(raws)
            wall, cpu = time.perf_counter() - t0, time.process_time() - c0
            if got != batch_events:
                raise BenchError(f"read {got} of {batch_events} events")
            drained.append({"events": got, "events_per_s": got / wall, "cpu_ms_per_10k": cpu / got * 1e7})
            log(f"pipeline: {got} events, {got / wall:,.0f}/s, {cpu / got * 1e7:.1f} ms CPU / 10k")
        # Concurrent: the kernel writes at a set rate while the reader reads; the highest
        # rate with nothing lost is what the agent sustains (the 4 MiB ring absorbs only
        # ~22.8k events of backlog, so a slower reader loses within a few seconds).
        ladder = []
        for rate in RATES:
            lost0, got = src.lost(), 0
            produced = [0]
            done = threading.Event()

            def producer(rate=rate):
                step = max(1, rate // 100)  # every 10 ms
                t_next = time.perf_counter()
                end = t_next + LADDER_SECONDS
                while time.perf_counter() < end:
                    node.produce(step)
                    produced[0] += step
                    t_next += 0.01
                    time.sleep(max(0.0, t_next - time.perf_counter()))
                done.set()
            th = threading.Thread(target=producer)
            t0, c0 = time.perf_counter(), time.process_time()
            th.start()
            while not (done.is_set() and src.ring.pending_bytes() == 0):
                raws = src.read_raw(2048)
                if raws:
                    got += h.process(raws)
                else:
                    time.sleep(0.002)
            th.join()
            wall, cpu = time.perf_counter() - t0, time.process_time() - c0
            step = {"rate": rate, "produced": produced[0], "read": got, "lost": src.lost() - lost0,
                    "achieved_per_s": produced[0] / wall, "cpu_ms_per_10k": cpu / max(got, 1) * 1e7}
            ladder.append(step)
            log(f"rate {rate:>6}/s: produced {produced[0]}, read {got}, lost {step['lost']}")
            # Isolated single losses happen below capacity on this VM (see docs); the ladder
            # stops at the second rate that loses, so one does not hide the reader's rate.
            if sum(1 for x in ladder if x["lost"]) >= 2:
                break
        no_loss = [s for s in ladder if not s["lost"]]
        concurrent = {"ladder": ladder, "seconds": LADDER_SECONDS,
                      "max_no_loss_per_s": max((s["achieved_per_s"] for s in no_loss), default=0)}
        src.close()
        h.source = None
        return {"drained": drained, "concurrent": concurrent,
                "medians": {"events_per_s": median([d["events_per_s"] for d in drained]),
                            "cpu_ms_per_10k": median([d["cpu_ms_per_10k"] for d in drained])}}
    finally:
        node.close()


# --- 2. cost on traffic ---------------------------------------------------------------------

def _setup(lb) -> dict:
    lb.cilia("apply", "-f", "-", input=PODS)
    lb.cilia("wait", "--for=condition=Ready", "pods", "--all", "--timeout", "120s", timeout=150)
    pods = lb.pods()
    return {"client_ns": lb.pod_netns("cli"), "server_ns": lb.pod_netns("srv"),
            "server_ip": pods["srv"]["status"]["podIP"], "agent_socket": lb.agent_socket()}


def _rr(procs: Procs, pair: dict, port: int, secs: int) -> float:
    from bench.samenode import parse_sockperf, wait_listening
    server = procs.start(in_netns(pair["server_ns"], ["sockperf", "server", "--tcp", "-i", pair["server_ip"],
                                                      "-p", str(port)], cpu=CPU))
    try:
        wait_listening(pair["server_ns"], "tcp", port)
        p = sh(*in_netns(pair["client_ns"], ["sockperf", "ping-pong", "--tcp", "-i", pair["server_ip"], "-p",
                                             str(port), "-t", str(secs), "-m", "64", "--full-rtt"], cpu=CPU),
               timeout=secs + 30)
    finally:
        procs.stop(server)
    return parse_sockperf(p.stdout + p.stderr)["p50_us"]


def _conns(procs: Procs, pair: dict, port: int) -> float:
    from bench.samenode import wait_listening
    server = procs.start(in_netns(pair["server_ns"], [sys.executable, "-c", SERVER, pair["server_ip"], str(port)],
                                  cpu=CPU))
    try:
        wait_listening(pair["server_ns"], "tcp", port)
        p = sh(*in_netns(pair["client_ns"], [sys.executable, "-c", CLIENT, pair["server_ip"], str(port),
                                             str(CONNS)], cpu=CPU), timeout=300)
    finally:
        procs.stop(server)
    return float(p.stdout.strip())


def _agent_status(sock: str) -> dict:
    from cilia.api.client import AgentClient
    return AgentClient(sock, timeout=10).get("/v1/status").get("hubble", {})


def traffic(reps: int, secs: int) -> dict:
    import contextlib
    samples = {m: {"tcp_rr_p50_us": [], "conns_per_s": []} for m in MODES}
    procs = Procs()
    port = 7300
    hubble: dict = {}
    with contextlib.ExitStack() as stack:
        pairs = {}
        for mode in MODES:
            old = os.environ.get("CILIA_MONITOR_AGGREGATION")
            os.environ["CILIA_MONITOR_AGGREGATION"] = mode  # inherited by the lab's agents
            try:
                lb = stack.enter_context(lab(unique_name("bev"), nodes=1, routing="native"))
            finally:
                if old is None:
                    os.environ.pop("CILIA_MONITOR_AGGREGATION", None)
                else:
                    os.environ["CILIA_MONITOR_AGGREGATION"] = old
            pairs[mode] = _setup(lb)
        try:
            for rep in range(reps):
                order = MODES if rep % 2 == 0 else MODES[::-1]
                for mode in order:
                    port += 1
                    rr = _rr(procs, pairs[mode], port, secs)
                    port += 1
                    cps = _conns(procs, pairs[mode], port)
                    samples[mode]["tcp_rr_p50_us"].append(rr)
                    samples[mode]["conns_per_s"].append(cps)
                    log(f"rep {rep + 1}/{reps} {mode:8s} tcp_rr p50 {rr:.1f} µs, {cps:,.0f} conn/s")
            for mode in MODES:
                hubble[mode] = _agent_status(pairs[mode]["agent_socket"])
        finally:
            procs.stop_all()
    med = {m: {k: median(v) for k, v in s.items()} for m, s in samples.items()}
    ratio = {m: {k: med[m][k] / med["disabled"][k] for k in med[m]} for m in MODES}
    return {"samples": samples, "medians": med, "ratio_vs_disabled": ratio,
            "agent_hubble": {m: {k: hubble[m].get(k) for k in ("seen_flows", "lost_events", "events_read")}
                             for m in hubble}}


def run(quick: bool = False, reps: int | None = None, secs: int = 5) -> dict:
    reps = reps or (2 if quick else 5)
    res: dict = {"benchmark": "events", "reps": reps, "seconds": secs, "connections": CONNS}
    res["kernel"] = kernel_cost(max(reps, 5))
    res["pipeline"] = pipeline(reps)
    res["traffic"] = traffic(reps, secs)
    return res


def render(res: dict) -> str:
    p = res["pipeline"]
    c = p["concurrent"]
    k = res.get("kernel")
    out = [table(["agent flow pipeline (decode + enrich + ring)", "value"], ([
        ["datapath ns/packet, events off (BPF_PROG_TEST_RUN, median)", fmt(k["medians"]["off"], 0)],
        ["datapath ns/packet, one event per packet", fmt(k["medians"]["per_packet"], 0)],
    ] if k else []) + [
        ["events/s, draining a full ring (median)", fmt(p["medians"]["events_per_s"], 0)],
        ["CPU ms per 10,000 events (median)", fmt(p["medians"]["cpu_ms_per_10k"], 1)],
        [f"highest produced rate with no loss ({c['seconds']} s at a fixed rate)",
         fmt(c["max_no_loss_per_s"], 0)],
        ["rates that lost events: produced / read / lost",
         "; ".join(f"{x['rate']}/s: {x['produced']} / {x['read']} / {x['lost']}" for x in c["ladder"] if x["lost"])
         or "none"],
    ])]
    t = res["traffic"]
    rows = []
    for m in MODES:
        rows.append([m, fmt(t["medians"][m]["tcp_rr_p50_us"], 1), fmt(t["ratio_vs_disabled"][m]["tcp_rr_p50_us"], 2),
                     fmt(t["medians"][m]["conns_per_s"], 0), fmt(t["ratio_vs_disabled"][m]["conns_per_s"], 2),
                     str(t["agent_hubble"].get(m, {}).get("lost_events"))])
    out.append(table([f"events mode (median of {res['reps']})", "TCP RR p50 µs", "÷ disabled",
                      "new conn/s", "÷ disabled", "lost"], rows))
    return "\n\n".join(out)

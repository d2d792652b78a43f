"""Hubble flow metrics and the agent's metrics endpoint (fast seams; the real scrape by
Prometheus is tests/e2e/test_prometheus.py)."""
from __future__ import annotations

import asyncio
import json
import os
import re
import socket
import urllib.request
from types import SimpleNamespace

from prometheus_client import CollectorRegistry, generate_latest

from cilia.agent.metrics_server import serve_metrics
from cilia.hubble.metrics import AgentCollector, HubbleMetrics, RegenerationSampler
from tests.unit.test_hubble_filters import flow


def sample(reg: CollectorRegistry, name: str, **labels) -> float | None:
    return reg.get_sample_value(name, labels)


def test_flow_metrics_follow_hubble_names_and_labels():
    reg = CollectorRegistry()
    lost = {"perf_event_ring_buffer": 7}
    m = HubbleMetrics(reg, lost_events=lambda: lost)
    fwd = flow(flags={"SYN": True})
    fwd["trace_observation_point"] = "TO_ENDPOINT"
    synack = flow(flags={"SYN": True, "ACK": True}, is_reply=True, sport=80, dport=43210)
    synack["trace_observation_point"] = "TO_ENDPOINT"
    drop = flow(verdict="DROPPED", etype=1, sub=133, drop_desc="POLICY_DENIED")
    pv = flow(verdict="DROPPED", etype=5, direction="INGRESS")
    pv["policy_match_type"] = 0
    udp = flow(proto="UDP", dport=53)
    for f in (fwd, synack, drop, pv, udp):
        m.on_flow({"flow": f, "node_name": "n1", "time": f["time"]})
    assert sample(reg, "hubble_flows_processed_total", protocol="TCP", subtype="to-endpoint",
                  type="Trace", verdict="FORWARDED") == 2
    assert sample(reg, "hubble_flows_processed_total", protocol="TCP", subtype="",
                  type="Drop", verdict="DROPPED") == 1
    assert sample(reg, "hubble_flows_processed_total", protocol="TCP", subtype="",
                  type="PolicyVerdict", verdict="DROPPED") == 1
    assert sample(reg, "hubble_drop_total", protocol="TCP", reason="POLICY_DENIED") == 1
    assert sample(reg, "hubble_tcp_flags_total", family="IPv4", flag="SYN") == 3
    assert sample(reg, "hubble_tcp_flags_total", family="IPv4", flag="SYN-ACK") == 1
    assert sample(reg, "hubble_port_distribution_total", port="80", protocol="TCP") == 1
    assert sample(reg, "hubble_port_distribution_total", port="53", protocol="UDP") == 1
    assert sample(reg, "hubble_port_distribution_total", port="43210", protocol="TCP") is None
    assert sample(reg, "hubble_policy_verdicts_total", action="dropped", direction="ingress",
                  match="none") == 1
    assert sample(reg, "hubble_lost_events_total", source="perf_event_ring_buffer") == 7
    lost["perf_event_ring_buffer"] = 9
    assert sample(reg, "hubble_lost_events_total", source="perf_event_ring_buffer") == 9
    m.on_flow({"flow": "garbage"})  # logged, never raised into the observer


class FakeDatapath:
    class _M:
        def __init__(self, n, cap):
            self.n, self.max_entries = n, cap

        def __len__(self):
            return self.n

    def _map(self, name):
        if name == "cilia_ipcache":
            return self._M(5, 20)
        raise KeyError(name)

    def metrics(self):
        return [
            {"reason": 0, "reason_name": "Success", "direction": "EGRESS", "audit": False, "packets": 10, "bytes": 1000},
            {"reason": 133, "reason_name": "Policy denied", "direction": "INGRESS", "audit": False, "packets": 3, "bytes": 180},
            {"reason": 133, "reason_name": "Policy denied (audit)", "direction": "INGRESS", "audit": True, "packets": 2, "bytes": 120},
        ]


def fake_agent():
    return SimpleNamespace(endpoints=SimpleNamespace(endpoints={1: 0, 2: 0}, regenerations=0,
                                                     last_regeneration_ms=0.0),
                           datapath=FakeDatapath())


def test_agent_collector_shapes():
    reg = CollectorRegistry()
    agent = fake_agent()
    reg.register(AgentCollector(agent))
    regen = RegenerationSampler(reg, agent)
    assert sample(reg, "cilia_endpoint") == 2
    assert sample(reg, "cilia_bpf_map_pressure", map_name="cilia_ipcache") == 0.25
    assert sample(reg, "cilia_forward_count_total", direction="EGRESS") == 10
    assert sample(reg, "cilia_forward_bytes_total", direction="EGRESS") == 1000
    assert sample(reg, "cilia_drop_count_total", reason="Policy denied", direction="INGRESS") == 3
    assert sample(reg, "cilia_policy_audit_count_total", reason="Policy denied", direction="INGRESS") == 2
    agent.endpoints.regenerations, agent.endpoints.last_regeneration_ms = 3, 4.0
    regen.poll()
    assert sample(reg, "cilia_endpoint_regenerations_total", outcome="success") == 3
    assert sample(reg, "cilia_endpoint_regeneration_time_stats_seconds_bucket",
                  scope="total", status="success", le="0.005") == 1


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_metrics_server_subscribes_to_the_observer_and_serves_text():
    subs = []

    class Observer:
        def subscribe(self, cb):
            subs.append(cb)
            return lambda: subs.remove(cb)

    agent = fake_agent()
    agent.observer = Observer()
    port = _free_port()

    async def main():
        task = asyncio.create_task(serve_metrics(agent, "127.0.0.1", port))
        for _ in range(100):
            if subs:
                break
            await asyncio.sleep(0.02)
        subs[0]({"flow": flow(), "node_name": "n", "time": "x"})
        body = await asyncio.get_running_loop().run_in_executor(
            None, lambda: urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read().decode())
        task.cancel()
        try:
            await task
        except asyncio.CancelledError:
            pass
        return body

    body = asyncio.run(main())
    assert 'hubble_flows_processed_total{protocol="TCP",subtype="to-endpoint",type="Trace",verdict="FORWARDED"} 1.0' in body
    assert "cilia_endpoint 2.0" in body
    assert subs == []  # unsubscribed on stop


DASHBOARD = os.path.join(os.path.dirname(__file__), "..", "..", "contrib", "grafana", "cilia-dashboard.json")


def dashboard_exprs() -> list[str]:
    with open(DASHBOARD) as f:
        d = json.load(f)
    return [t["expr"] for p in d["panels"] for t in p["targets"]]


def test_dashboard_queries_only_metrics_we_export():
    reg = CollectorRegistry()
    agent = fake_agent()
    m = HubbleMetrics(reg, lost_events=lambda: {"perf_event_ring_buffer": 0})
    reg.register(AgentCollector(agent))
    RegenerationSampler(reg, agent)
    pv = flow(verdict="DROPPED", etype=5, drop_desc="POLICY_DENIED")
    for f in (flow(), pv):
        m.on_flow({"flow": f})
    exported = {s.name for fam in reg.collect() for s in fam.samples}
    used = set()
    for e in dashboard_exprs():
        used |= set(re.findall(r"\b((?:hubble|cilia)_[a-z0-9_]+)", e))
    assert used and used <= exported, used - exported

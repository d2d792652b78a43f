"""Prometheus metrics: Hubble's flow metrics (names and labels as Hubble's metrics plugins
`flow`, `drop`, `tcp`, `port-distribution`, `policy` and the lost-events counter) fed by
Observer.subscribe, and the agent's own metrics in Cilium's shapes (endpoints, regeneration
time, BPF map pressure, datapath forward/drop counters from the per-CPU metrics map)."""
from __future__ import annotations

import logging
from typing import Callable

from prometheus_client import CollectorRegistry, Counter, Histogram
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

from cilia.hubble.filters import TRACE_POINTS
from cilia.hubble.printers import POLICY_MATCH

log = logging.getLogger("cilia.hubble.metrics")

_TRACE_NAMES = {v: k for k, v in TRACE_POINTS.items()}
_TYPE_NAMES = {1: "Drop", 3: "Capture", 4: "Trace", 5: "PolicyVerdict", 129: "L7"}


def flow_protocol(flow: dict) -> str:
    """Hubble's v1.FlowProtocol."""
    l7 = flow.get("l7") or {}
    for k in ("http", "dns", "kafka"):
        if k in l7:
            return k.upper() if k != "kafka" else "Kafka"
    l4 = flow.get("l4") or {}
    for k in ("TCP", "UDP", "SCTP", "ICMPv4", "ICMPv6"):
        if k in l4:
            return k
    return "Unknown flow"


def _type_subtype(flow: dict) -> tuple[str, str]:
    et = flow.get("event_type") or {}
    t, st = et.get("type"), et.get("sub_type", 0) or 0
    name = _TYPE_NAMES.get(t)
    if name is None:
        return "Unknown", str(t)
    if t == 4:
        op = flow.get("trace_observation_point")
        if op and op != "UNKNOWN_POINT":
            return name, op.lower().replace("_", "-")
        return name, _TRACE_NAMES.get(st, str(st))
    if t == 129:
        return name, flow_protocol(flow)
    return name, ""


# name -> (help, label names), as Hubble's metrics plugins register them.
_FLOW_METRICS = {
    "hubble_flows_processed": ("Total number of flows processed", ("protocol", "subtype", "type", "verdict")),
    "hubble_drop": ("Number of drops", ("protocol", "reason")),
    "hubble_tcp_flags": ("TCP flag occurrences", ("family", "flag")),
    "hubble_port_distribution": ("Numbers of packets distributed by destination port", ("port", "protocol")),
    "hubble_policy_verdicts": ("Number of policy verdict events", ("action", "direction", "match")),
}


class HubbleMetrics:
    """One instance per agent; on_flow is the Observer.subscribe callback, called for every
    new record on the agent's loop, so it only bumps plain dict counters (a prometheus_client
    Counter child takes a lock per inc); scrapes copy the dicts (atomic under the GIL)."""

    def __init__(self, registry: CollectorRegistry,
                 lost_events: Callable[[], dict[str, int]] | None = None):
        self._counts: dict[str, dict[tuple, int]] = {name: {} for name in _FLOW_METRICS}
        self._flows = self._counts["hubble_flows_processed"]
        self._drops = self._counts["hubble_drop"]
        self._tcp = self._counts["hubble_tcp_flags"]
        self._ports = self._counts["hubble_port_distribution"]
        self._policy = self._counts["hubble_policy_verdicts"]
        registry.register(self)
        if lost_events is not None:
            registry.register(_LostEvents(lost_events))

    def describe(self):
        return [CounterMetricFamily(n, h, labels=list(lb)) for n, (h, lb) in _FLOW_METRICS.items()]

    def collect(self):
        for name, (help_, labels) in _FLOW_METRICS.items():
            fam = CounterMetricFamily(name, help_, labels=list(labels))
            for key, n in sorted(dict(self._counts[name]).items()):
                fam.add_metric(list(key), float(n))
            yield fam

    def on_flow(self, record: dict) -> None:
        try:
            flow = record.get("flow", record) if isinstance(record, dict) else record
            self.process(flow)
        except Exception:  # a metrics bug must never break the observer's fan-out
            log.exception("flow metrics")

    def process(self, flow: dict) -> None:
        proto = flow_protocol(flow)
        typ, sub = _type_subtype(flow)
        verdict = flow.get("verdict") or "VERDICT_UNKNOWN"
        k = (proto, sub, typ, verdict)
        self._flows[k] = self._flows.get(k, 0) + 1
        if verdict == "DROPPED":
            k = (proto, flow.get("drop_reason_desc") or "DROP_REASON_UNKNOWN")
            self._drops[k] = self._drops.get(k, 0) + 1
        l4 = flow.get("l4") or {}
        tcp = l4.get("TCP")
        if tcp:
            fam = (flow.get("IP") or {}).get("ipVersion") or "IPv4"
            fl = tcp.get("flags") or {}
            for name, on in (("SYN-ACK" if fl.get("ACK") else "SYN", fl.get("SYN")),
                             ("FIN", fl.get("FIN")), ("RST", fl.get("RST"))):
                if on:
                    k = (fam, name)
                    self._tcp[k] = self._tcp.get(k, 0) + 1
        if (flow.get("event_type") or {}).get("type") == 5:
            match = POLICY_MATCH.get(flow.get("policy_match_type") or 0, "none").lower()
            k = (verdict.lower(), (flow.get("traffic_direction") or "unknown").lower(), match)
            self._policy[k] = self._policy.get(k, 0) + 1
        elif verdict == "FORWARDED" and not flow.get("is_reply"):
            for p in ("TCP", "UDP", "SCTP"):
                if p in l4:
                    port = l4[p].get("destination_port")
                    if port:
                        k = (str(port), p)
                        self._ports[k] = self._ports.get(k, 0) + 1
                    break


class _LostEvents:
    """hubble_lost_events_total{source}: read from the event reader's own counters at scrape
    time, so a loss is visible even when no flow arrives to carry it."""

    def __init__(self, read: Callable[[], dict[str, int]]):
        self.read = read

    def describe(self):
        return [CounterMetricFamily("hubble_lost_events", "Number of lost events", labels=["source"])]

    def collect(self):
        c = CounterMetricFamily("hubble_lost_events", "Number of lost events", labels=["source"])
        try:
            for source, n in sorted(self.read().items()):
                c.add_metric([source], float(n))
        except Exception:
            log.exception("lost events")
        yield c


# Hash-like maps worth a pressure gauge (arrays and map-in-maps are always "full").
PRESSURE_MAPS = ("cilia_lxc", "cilia_lxc_if", "cilia_ipcache", "cilia_snat_v4",
                 "cilia_snat_v4_rev", "cilia_lb4_services", "cilia_lb4_backends",
                 "cilia_lb4_reverse_nat", "cilia_lb4_affinity", "cilia_ct4_global",
                 "cilia_lb4_reverse_sk", "cilia_policy", "cilia_ct4_policy", "cilia_metrics")


class AgentCollector:
    """Cilium's agent metrics with the cilia_ prefix, computed at scrape time from the
    agent's live state (no second bookkeeping that could drift)."""

    def __init__(self, agent):
        self.agent = agent

    def describe(self):
        return []

    def collect(self):
        a = self.agent
        eps = getattr(getattr(a, "endpoints", None), "endpoints", None) or {}
        g = GaugeMetricFamily("cilia_endpoint", "Number of endpoints managed by this agent")
        g.add_metric([], len(eps))
        yield g
        st = GaugeMetricFamily("cilia_endpoint_state", "Count of all endpoints",
                               labels=["endpoint_state"])
        st.add_metric(["ready"], len(eps))
        yield st
        dp = getattr(a, "datapath", None)
        if dp is None:
            return
        yield from self._pressure(dp)
        yield from self._datapath(dp)

    def _pressure(self, dp):
        g = GaugeMetricFamily("cilia_bpf_map_pressure",
                              "Fill percentage of map, tagged by map name (0..1)", labels=["map_name"])
        for name in PRESSURE_MAPS:
            try:
                m = dp._map(name)
                if m.max_entries:
                    g.add_metric([name], len(m) / m.max_entries)
            except Exception as e:  # a map this node does not load
                log.debug("map pressure %s: %s", name, e)
        yield g

    def _datapath(self, dp):
        labels_fd = ["direction"]
        fwd_c = CounterMetricFamily("cilia_forward_count", "Total forwarded packets, tagged by direction", labels=labels_fd)
        fwd_b = CounterMetricFamily("cilia_forward_bytes", "Total forwarded bytes, tagged by direction", labels=labels_fd)
        drop_c = CounterMetricFamily("cilia_drop_count", "Total dropped packets, tagged by drop reason and direction",
                                     labels=["reason", "direction"])
        drop_b = CounterMetricFamily("cilia_drop_bytes", "Total dropped bytes, tagged by drop reason and direction",
                                     labels=["reason", "direction"])
        audit = CounterMetricFamily("cilia_policy_audit_count",
                                    "Packets policy would have dropped, forwarded in audit mode",
                                    labels=["reason", "direction"])
        try:
            rows = dp.metrics()
        except Exception as e:
            log.warning("datapath metrics: %s", e)
            rows = []
        fwd: dict[str, list[int]] = {}
        for r in rows:
            if r["audit"]:
                audit.add_metric([r["reason_name"].replace(" (audit)", ""), r["direction"]], r["packets"])
            elif r["reason"] == 0:
                acc = fwd.setdefault(r["direction"], [0, 0])
                acc[0] += r["packets"]
                acc[1] += r["bytes"]
            else:
                drop_c.add_metric([r["reason_name"], r["direction"]], r["packets"])
                drop_b.add_metric([r["reason_name"], r["direction"]], r["bytes"])
        for d, (p, b) in sorted(fwd.items()):
            fwd_c.add_metric([d], p)
            fwd_b.add_metric([d], b)
        yield from (fwd_c, fwd_b, drop_c, drop_b, audit)


class RegenerationSampler:
    """cilia_endpoint_regeneration_time_stats_seconds. The endpoint manager keeps a count
    and the last duration, not every sample: polled every second, a poll that sees new
    regenerations observes the latest duration once (exact when at most one happens per
    second, the common case; bursts are under-sampled, never invented). The counter is exact."""

    def __init__(self, registry: CollectorRegistry, agent):
        self.agent = agent
        self.hist = Histogram("cilia_endpoint_regeneration_time_stats_seconds",
                              "Endpoint regeneration time stats", ["scope", "status"],
                              buckets=(.0005, .001, .0025, .005, .01, .025, .05, .1, .25, .5, 1, 2.5, 5),
                              registry=registry)
        self.count = Counter("cilia_endpoint_regenerations", "Count of all endpoint regenerations",
                             ["outcome"], registry=registry)
        # the series exist from the first scrape (zero), so dashboards show 0 and not "no data"
        self.hist.labels("total", "success")
        self.count.labels("success")
        self.seen = 0

    def poll(self) -> None:
        em = getattr(self.agent, "endpoints", None)
        if em is None:
            return
        n = getattr(em, "regenerations", 0)
        if n > self.seen:
            secs = getattr(em, "last_regeneration_ms", 0.0) / 1000.0
            self.hist.labels("total", "success").observe(secs)
            self.count.labels("success").inc(n - self.seen)
            self.seen = n

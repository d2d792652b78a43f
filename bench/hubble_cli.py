"""Per-flow Python costs of the observability consumers, side by side in one run (medians of
5 rounds): what an agent pays per flow for a follow stream's filter and for the metrics
subscriber, and what `cilia observe` pays to merge and print.

    python -m bench.hubble_cli

No kernel, no lab: synthetic flows with the shape the agent builds."""
from __future__ import annotations

import io
import statistics
import time

from cilia.hubble import filters
from cilia.hubble.metrics import HubbleMetrics
from cilia.hubble.printers import Printer, format_time_ns
from cilia.hubble.relay import Query, merge
from prometheus_client import CollectorRegistry

N = 20000
ROUNDS = 5


def make_flows(n: int, node: str = "node1", t0: int = 1_764_345_600_000_000_000) -> list[dict]:
    out = []
    for i in range(n):
        t = format_time_ns(t0 + i * 1000)
        drop = i % 10 == 0
        f = {
            "time": t, "verdict": "DROPPED" if drop else "FORWARDED",
            "IP": {"source": f"10.244.1.{i % 200 + 2}", "destination": "10.244.2.7", "ipVersion": "IPv4"},
            "l4": {"TCP": {"source_port": 30000 + i % 30000, "destination_port": 8080,
                           "flags": {"SYN": True}}},
            "source": {"identity": 1000 + i % 7, "namespace": "shop", "pod_name": f"web-{i % 5}",
                       "labels": ["k8s:app=web", "k8s:io.kubernetes.pod.namespace=shop"]},
            "destination": {"identity": 2000, "namespace": "shop", "pod_name": "db-0",
                            "labels": ["k8s:app=db", "k8s:io.kubernetes.pod.namespace=shop"]},
            "event_type": {"type": 1 if drop else 4, "sub_type": 133 if drop else 0},
            "traffic_direction": "INGRESS", "node_name": node, "is_reply": False,
            "trace_observation_point": "TO_ENDPOINT", "Summary": "TCP Flags: SYN",
        }
        if drop:
            f.update(drop_reason=133, drop_reason_desc="POLICY_DENIED")
        out.append({"flow": f, "node_name": node, "time": t})
    return out


def per_flow_us(fn, recs) -> float:
    samples = []
    for _ in range(ROUNDS):
        t = time.process_time()
        fn(recs)
        samples.append((time.process_time() - t) / len(recs) * 1e6)
    return statistics.median(samples)


def _print(fmt: str, recs) -> None:
    p = Printer(fmt, io.StringIO())
    for r in recs:
        p.write(r)


def main() -> int:
    recs = make_flows(N)
    allow3, deny3 = filters.from_args([("pod", "shop/web"), ("verdict", "DROPPED"), ("to-port", "8080")])
    allow_l, deny_l = filters.from_args([("to-label", "app=db"), ("not", None), ("protocol", "udp")])
    m = HubbleMetrics(CollectorRegistry(), lost_events=lambda: {})
    rows = [
        ("match: no filter", lambda rs: [filters.match(r, [], []) for r in rs]),
        ("match: --pod x --verdict DROPPED --to-port 8080", lambda rs: [filters.match(r, allow3, deny3) for r in rs]),
        ("match: --to-label app=db --not --protocol udp", lambda rs: [filters.match(r, allow_l, deny_l) for r in rs]),
        ("metrics subscriber (HubbleMetrics.on_flow)", lambda rs: [m.on_flow(r) for r in rs]),
        ("print -o compact", lambda rs: _print("compact", rs)),
        ("print -o json", lambda rs: _print("json", rs)),
    ]
    three = [make_flows(4095, f"node{i}", 1_764_345_600_000_000_000 + i * 333) for i in (1, 2, 3)]
    print(f"{'CPU per flow (median of %d rounds, %d flows)' % (ROUNDS, N):<55} {'µs':>8} {'ratio':>7}")
    base = None
    for name, fn in rows:
        us = per_flow_us(fn, recs)
        base = base or us
        print(f"{name:<55} {us:8.2f} {us / base:7.1f}x")
    samples = []
    for _ in range(ROUNDS):
        t = time.process_time()
        merge([list(x) for x in three], Query(last=20000))
        samples.append((time.process_time() - t) * 1e3)
    print(f"{'relay merge of 3 full rings (3 x 4095 flows), CPU ms':<55} {statistics.median(samples):8.1f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

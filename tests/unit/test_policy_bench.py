"""Micro-benchmark (printed, not asserted): 1,000 identities x 500 rules."""
from __future__ import annotations

import time

from cilia.identity import Identity, pod_security_labels
from cilia.policy import Endpoint, PolicyEngine

from .test_policy_support import ccnp, cnp

N_IDENTITIES = 1000
N_RULES = 500
NAMESPACES = [f"ns{i}" for i in range(10)]


def build():
    idents = []
    for i in range(N_IDENTITIES):
        ns = NAMESPACES[i % len(NAMESPACES)]
        labels = tuple(pod_security_labels({"app": f"app{i % 50}", "tier": f"t{i % 7}", "n": str(i)}, ns))
        idents.append(Identity(256 + i, labels))
    policies = []
    for k in range(N_RULES - 20):
        ns = NAMESPACES[k % len(NAMESPACES)]
        policies.append(cnp(f"p{k}", ns, {
            "endpointSelector": {"matchLabels": {"app": f"app{k % 50}"}},
            "ingress": [{"fromEndpoints": [{"matchLabels": {"app": f"app{(k * 7) % 50}"}}],
                         "toPorts": [{"ports": [{"port": str(8000 + k % 20), "endPort": 8000 + k % 20 + k % 4,
                                                 "protocol": "TCP"}]}]}]}))
    for k in range(20):
        policies.append(ccnp(f"c{k}", {
            "endpointSelector": {"matchLabels": {"tier": f"t{k % 7}"}},
            "egress": [{"toCIDRSet": [{"cidr": f"10.{k}.0.0/16", "except": [f"10.{k}.1.0/24"]}]}]
            if k % 2 else [{"toEntities": ["cluster"]}]}))
    return idents, policies


def test_benchmark_compute(capsys):
    idents, policies = build()
    engine = PolicyEngine()
    t0 = time.perf_counter()
    for ident in idents:
        engine.add_identity(ident)
    t1 = time.perf_counter()
    for p in policies:
        engine.upsert_policy(p)
    t2 = time.perf_counter()
    for ident in idents:
        engine.upsert_endpoint(Endpoint(ident.id - 255, ident.id, ident.labels))
    out = engine.regenerate()
    t3 = time.perf_counter()
    entries = sum(len(u.policy.entries) for u in out.values())
    newcomer = Identity(5000, tuple(pod_security_labels({"app": "app3", "tier": "t1", "n": "new"}, "ns3")))
    t4 = time.perf_counter()
    engine.add_identity(newcomer)
    touched = engine.regenerate()
    t5 = time.perf_counter()
    engine.upsert_policy(cnp("p0", "ns0", {"endpointSelector": {"matchLabels": {"app": "app0"}},
                                          "ingress": [{"fromEndpoints": [{"matchLabels": {"app": "app1"}}]}]}))
    changed = engine.regenerate()
    t6 = time.perf_counter()
    with capsys.disabled():
        print(f"\npolicy bench: {N_IDENTITIES} identities x {len(policies)} rules: "
              f"identities {1e3 * (t1 - t0):.0f} ms, policies {1e3 * (t2 - t1):.0f} ms, "
              f"compute all {len(out)} endpoints {1e3 * (t3 - t2):.0f} ms "
              f"({1e3 * (t3 - t2) / len(out):.2f} ms/endpoint, {entries} entries); "
              f"new identity -> {len(touched)} endpoints in {1e3 * (t5 - t4):.1f} ms; "
              f"policy update -> {len(changed)} endpoints in {1e3 * (t6 - t5):.1f} ms")
    assert len(out) == N_IDENTITIES  # the run itself must have happened; timings are not asserted

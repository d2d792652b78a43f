"""Network policy over real sockets: two pods on node1, one on node2 behind the VXLAN
tunnel, policy entries written through NodeDatapath.sync_policy.

Oracles do not import cilia's map code: nc and ping in the pod namespaces (a connection
that completes proves the reply direction passed too), and the drop counters as
`bpftool -j map dump` decodes them from the pinned metrics map."""

from __future__ import annotations

import json
import os
import subprocess

import pytest

from cilia.datapath import abi
from cilia.datapath.policy import PolicyEntry

from .dp_topology import NODE_IPS, Topology, sh
from .helpers import ping

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="needs root")

IN, EG, TCP, ICMP = abi.POLICY_INGRESS, abi.POLICY_EGRESS, 6, 1
DENIED, DENYLIST = 133, 181

# Answers every connection with "<own address> <peer address>" on each port in argv, once
# the client has finished sending (closing with unread data would reset the connection
# and take the answer with it).
SERVER = r"""
import socket, sys, threading
def serve(port):
    s = socket.socket()
    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    s.bind(("0.0.0.0", port))
    s.listen(64)
    ready.release()
    while True:
        c, peer = s.accept()
        c.settimeout(5)
        try:
            while c.recv(256):
                pass
        except OSError:
            pass
        c.sendall(f"{c.getsockname()[0]} {peer[0]}\n".encode())
        c.close()
ports = [int(p) for p in sys.argv[1:]]
ready = threading.Semaphore(0)
for p in ports:
    threading.Thread(target=serve, args=(p,), daemon=True).start()
for _ in ports:
    ready.acquire()
print("ready", flush=True)
threading.Event().wait()
"""


def allow(direction, identity, proto, port, plen=16):
    return PolicyEntry(direction, identity, proto, port, plen, False)


def deny(direction, identity, proto, port, plen=16):
    return PolicyEntry(direction, identity, proto, port, plen, True)


def nc(ns: str, ip: str, port: int) -> str | None:
    """The server's answer, or None when no connection was made (3 s)."""
    p = subprocess.run(["nsenter", f"--net=/run/netns/{ns}", "--", "nc", "-N", "-w", "3", ip, str(port)],
                       input="x", capture_output=True, text=True, timeout=30)
    return p.stdout.strip() if p.returncode == 0 and p.stdout.strip() else None


def drops(pin_dir: str) -> dict[tuple[int, int, int], int]:
    """{(reason, dir, flags): packets} of the pinned metrics map, as bpftool reads it."""
    out = {}
    for e in json.loads(sh("bpftool", "-j", "map", "dump", "pinned", f"{pin_dir}/cilia_metrics")):
        k = e["formatted"]["key"]
        out[(k["reason"], k["dir"], k["flags"])] = sum(v["value"]["count"] for v in e["formatted"]["values"])
    return out


@pytest.fixture
def topo():
    t = Topology("tunnel", nodes=2).build()
    try:
        t.add_pod("a", 1, 11)
        t.add_pod("b", 1, 12)
        t.add_pod("c", 2, 21)
        t.load()
        yield t
    finally:
        t.close()
    listed = sh("ip", "netns", "list")
    assert not any(ns in listed for ns in t.netns)


def ep(t: Topology, name: str) -> tuple:
    p = t.pods[name]
    return p["ip"], p["id"]


def enforce(t: Topology, name: str, ingress=False, egress=False, audit=False) -> None:
    p = t.pods[name]
    lxc = json.loads(sh("ip", "-n", t.nodes[p["node"]], "-j", "link", "show", p["lxc"]))[0]["ifindex"]
    t.dps[p["node"]].set_endpoint_policy_flags(p["ip"], lxc, ingress, egress, audit)


def test_tcp_and_icmp_allowed_denied_and_replies_pass(topo):
    t = topo
    (a_ip, a_id), (b_ip, b_id), (c_ip, c_id) = ep(t, "a"), ep(t, "b"), ep(t, "c")
    for name in ("b", "c"):
        t.start(t.pods[name]["ns"], SERVER, "8080", "9090")
    t.start(t.pods["a"]["ns"], SERVER, "7070")
    n1, n2 = t.dps[1], t.dps[2]

    # a: egress to b on 8080 and ping; to c on any port except 9090 (explicit deny).
    enforce(t, "a", egress=True)
    n1.sync_policy(a_id, [allow(EG, b_id, TCP, 8080), allow(EG, b_id, ICMP, 8),
                          allow(EG, c_id, TCP, 0, 0), deny(EG, c_id, TCP, 9090)])
    # b: ingress from a only (TCP 8080, ping); its egress is open.
    enforce(t, "b", ingress=True)
    n1.sync_policy(b_id, [allow(IN, a_id, TCP, 8080), allow(IN, a_id, ICMP, 8)])
    # c (node2): ingress from a on 8080 only, and no egress entry at all: it may only answer.
    enforce(t, "c", ingress=True, egress=True)
    n2.sync_policy(c_id, [allow(IN, a_id, TCP, 8080)])

    assert nc(t.pods["a"]["ns"], b_ip, 8080) == f"{b_ip} {a_ip}", "local, allowed both sides"
    assert nc(t.pods["a"]["ns"], c_ip, 8080) == f"{c_ip} {a_ip}", "over the tunnel; c's replies pass"
    assert ping(t.pods["a"]["ns"], b_ip)
    before1, before2 = drops(t.pins[1]), drops(t.pins[2])

    assert nc(t.pods["a"]["ns"], b_ip, 9090) is None, "a's egress has no allow for b:9090"
    assert nc(t.pods["a"]["ns"], c_ip, 9090) is None, "a's egress denies c:9090"
    assert not ping(t.pods["a"]["ns"], c_ip, count=1), "no ICMP to c"
    assert nc(t.pods["b"]["ns"], c_ip, 8080) is None, "c's ingress (node2, identity from the VNI)"
    assert nc(t.pods["c"]["ns"], a_ip, 7070) is None, "c's egress allows nothing new"
    assert nc(t.pods["b"]["ns"], a_ip, 7070) == f"{a_ip} {b_ip}", "a's ingress is not enforced"

    after1, after2 = drops(t.pins[1]), drops(t.pins[2])

    def grew(before, after, key):
        return after.get(key, 0) - before.get(key, 0)

    eg, ing = abi.METRIC_EGRESS, abi.METRIC_INGRESS
    assert grew(before1, after1, (DENIED, eg, 0)) >= 2, after1     # a -> b:9090 SYNs, a -> c ping
    assert grew(before1, after1, (DENYLIST, eg, 0)) >= 1, after1   # a -> c:9090 SYN(s)
    assert grew(before2, after2, (DENIED, ing, 0)) >= 1, after2    # b -> c:8080 at node2's overlay
    assert grew(before2, after2, (DENIED, eg, 0)) >= 1, after2     # c -> a:7070
    assert not any(k[2] for k in after1 | after2), "no audit counters without audit mode"
    # The allowed connections are tracked, each once, on the nodes that judged them.
    assert {(c["saddr"], c["daddr"], c["dport"]) for c in n2.policy_ct_entries() if c["proto"] == "TCP"} == \
        {(a_ip, c_ip, 8080)}


def test_policy_change_applies_to_new_connections(topo):
    t = topo
    (a_ip, a_id), (b_ip, b_id), _ = ep(t, "a"), ep(t, "b"), ep(t, "c")
    t.start(t.pods["b"]["ns"], SERVER, "8080")
    n1 = t.dps[1]
    enforce(t, "b", ingress=True)
    assert nc(t.pods["a"]["ns"], b_ip, 8080) is None
    assert n1.sync_policy(b_id, [allow(IN, a_id, TCP, 8080)]) == (1, 0)
    assert nc(t.pods["a"]["ns"], b_ip, 8080) == f"{b_ip} {a_ip}"
    assert n1.sync_policy(b_id, []) == (0, 1)
    assert nc(t.pods["a"]["ns"], b_ip, 8080) is None
    # Unenforced again: everything passes although no entry exists.
    enforce(t, "b")
    assert nc(t.pods["a"]["ns"], b_ip, 8080) == f"{b_ip} {a_ip}"


def test_audit_mode_lets_traffic_through_and_counts_it(topo):
    t = topo
    (a_ip, _), _, (c_ip, c_id) = ep(t, "a"), ep(t, "b"), ep(t, "c")
    t.start(t.pods["c"]["ns"], SERVER, "8080")
    enforce(t, "c", ingress=True, egress=True, audit=True)
    assert nc(t.pods["a"]["ns"], c_ip, 8080) == f"{c_ip} {a_ip}"
    counters = drops(t.pins[2])
    assert counters.get((DENIED, abi.METRIC_INGRESS, abi.METRIC_F_AUDIT), 0) >= 1, counters
    assert counters.get((DENIED, abi.METRIC_INGRESS, 0), 0) == 0, "audit never drops"
    tracked = [c for c in t.dps[2].policy_ct_entries() if c["daddr"] == c_ip and c["dport"] == 8080]
    assert tracked and all(c["audited"] for c in tracked), tracked


def test_node_host_reaches_a_pod_only_with_a_host_rule(topo):
    t = topo
    _, (b_ip, b_id), _ = ep(t, "a"), ep(t, "b"), ep(t, "c")
    t.start(t.pods["b"]["ns"], SERVER, "8080")
    enforce(t, "b", ingress=True, egress=True)
    # From the node's own stack: cil_to_container with the host identity.
    assert nc(t.nodes[1], b_ip, 8080) is None
    t.dps[1].sync_policy(b_id, [allow(IN, abi.IDENTITY_HOST, TCP, 8080)])
    assert nc(t.nodes[1], b_ip, 8080) == f"{b_ip} {NODE_IPS[1]}"
    counters = drops(t.pins[1])
    assert counters.get((DENIED, abi.METRIC_INGRESS, 0), 0) >= 1, counters

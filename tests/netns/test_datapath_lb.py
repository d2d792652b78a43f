"""Service load balancing over real sockets in real namespaces.

Oracles do not import cilia: backends answer with their own address and the peer
address they saw, clients report what came back and from where (recvfrom, getpeername),
and conntrack state is read with `bpftool -j map dump`."""

from __future__ import annotations

import collections
import json
import os
import socket
import struct

import pytest

from .dp_topology import NODE_IPS, WORLD_IP, Topology, py, sh
from cilia.datapath.lb import LBBackend

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="needs root")

VIP, VIP_HAIRPIN = "10.96.0.10", "10.96.0.11"
NODEPORT = 30080

# TCP: answers "<own address> <peer address>" and closes. UDP: the same to each datagram.
SERVER = r"""
import socket, sys, threading
tcp_port, udp_port = int(sys.argv[1]), int(sys.argv[2])
def own(peer):
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    s.connect((peer, 9))
    return s.getsockname()[0]
def tcp():
    s = socket.socket()
    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    s.bind(("0.0.0.0", tcp_port))
    s.listen(64)
    ready.set()
    while True:
        c, peer = s.accept()
        c.sendall(f"{c.getsockname()[0]} {peer[0]}\n".encode())
        c.close()
def udp():
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    s.bind(("0.0.0.0", udp_port))
    while True:
        d, peer = s.recvfrom(2048)
        s.sendto(f"{own(peer[0])} {peer[0]}".encode(), peer)
ready = threading.Event()
threading.Thread(target=udp, daemon=True).start()
threading.Thread(target=tcp, daemon=True).start()
ready.wait()
print("ready", flush=True)
threading.Event().wait()
"""

# argv: proto host port count [source]. TCP prints "<peer per getpeername> <reply>";
# UDP prints "<recvfrom address> <reply>". Failures print "ERR <reason>".
CLIENT = r"""
import socket, sys
proto, host, port, n = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
src = sys.argv[5] if len(sys.argv) > 5 else None
for i in range(n):
    try:
        if proto == "tcp":
            c = socket.socket()
            c.settimeout(3)
            if src:
                c.bind((src, 0))
            c.connect((host, port))
            peer = c.getpeername()[0]
            buf = b""
            while not buf.endswith(b"\n"):
                d = c.recv(256)
                if not d:
                    break
                buf += d
            c.close()
            print(peer, buf.decode().strip(), flush=True)
        else:
            c = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
            c.settimeout(3)
            c.sendto(b"q", (host, port))
            d, frm = c.recvfrom(256)
            c.close()
            print(frm[0], d.decode().strip(), flush=True)
    except OSError as e:
        print("ERR", e, flush=True)
"""


def be32(ip: str) -> int:
    return struct.unpack("=I", socket.inet_aton(ip))[0]


def client(ns: str, proto: str, host: str, port: int, n: int, src: str | None = None) -> list[tuple[str, ...]]:
    args = [proto, host, str(port), str(n)] + ([src] if src else [])
    return [tuple(line.split()) for line in py(ns, CLIENT, *args, timeout=120).splitlines()]


def ct_dump(pin_dir: str) -> list[dict]:
    return [e["formatted"] for e in json.loads(sh("bpftool", "-j", "map", "dump", "pinned",
                                                  f"{pin_dir}/cilia_ct4_global"))]


@pytest.fixture
def topo():
    made: list[Topology] = []

    def make(routing: str = "tunnel", nodes: int = 1) -> Topology:
        t = Topology(routing, nodes)
        made.append(t)
        return t.build()

    yield make
    for t in made:
        t.close()
    listed = sh("ip", "netns", "list")
    for t in made:
        assert not any(ns in listed for ns in t.netns)
        assert not any(os.path.exists(p) for p in t.pins.values())


def test_clusterip_spreads_real_connections_over_both_backends(topo):
    t = topo("tunnel", nodes=1)
    cl = t.add_pod("client", 1, 11)
    b1, b2 = t.add_pod("b1", 1, 21), t.add_pod("b2", 1, 22)
    t.load()
    dp = t.dps[1]
    for name in ("b1", "b2"):
        t.start(t.pods[name]["ns"], SERVER, "8080", "5353")
    dp.upsert_service(1, VIP, 80, 6, [LBBackend(1, b1, 8080), LBBackend(2, b2, 8080)])
    dp.upsert_service(2, VIP, 53, 17, [LBBackend(3, b1, 5353, 17), LBBackend(4, b2, 5353, 17)])

    rows = client(t.pods["client"]["ns"], "tcp", VIP, 80, 60)
    assert all(r[0] != "ERR" for r in rows), rows
    assert {r[0] for r in rows} == {VIP}, "the client's socket is connected to the frontend"
    assert {r[2] for r in rows} == {cl}, "east-west keeps the client address"
    seen = collections.Counter(r[1] for r in rows)
    assert set(seen) == {b1, b2} and min(seen.values()) >= 10, seen

    udp = client(t.pods["client"]["ns"], "udp", VIP, 53, 30)
    assert {r[0] for r in udp} == {VIP}, "UDP replies come from the frontend (reverse NAT)"
    assert {r[1] for r in udp} == {b1, b2}

    # Conntrack as bpftool decodes it: a SERVICE and a REPLY entry per connection.
    ct = ct_dump(t.pins[1])
    svc = [e for e in ct if e["key"]["flags"] == 4 and e["key"]["daddr"] == be32(VIP)]
    rep = [e for e in ct if e["key"]["flags"] == 1 and e["key"]["daddr"] == be32(cl)]
    assert len(svc) >= 60 + 30 and len(rep) >= 60 + 30
    assert {e["value"]["rev_nat_index"] for e in svc} == {1, 2}

    # Without the service the same address answers nothing.
    dp.delete_service(VIP, 80, 6)
    assert client(t.pods["client"]["ns"], "tcp", VIP, 80, 1)[0][0] == "ERR"


def test_pod_reaches_itself_through_its_service(topo):
    t = topo("tunnel", nodes=1)
    b1 = t.add_pod("b1", 1, 21)
    t.load()
    t.start(t.pods["b1"]["ns"], SERVER, "8080", "5353")
    t.dps[1].upsert_service(5, VIP_HAIRPIN, 80, 6, [LBBackend(1, b1, 8080)])
    rows = client(t.pods["b1"]["ns"], "tcp", VIP_HAIRPIN, 80, 5)
    # The server saw the hairpin address; the client saw the frontend.
    assert rows == [(VIP_HAIRPIN, b1, "169.254.42.1")] * 5, rows


@pytest.mark.parametrize("routing", ["tunnel", "native"])
def test_nodeport_from_the_world_to_local_and_remote_backends(topo, routing):
    t = topo(routing, nodes=2)
    cl = t.add_pod("client", 1, 11)
    b = t.add_pod("b", 2, 21)  # the only backend, on node 2
    t.load()
    t.start(t.pods["b"]["ns"], SERVER, "8080", "5353")
    for n in (1, 2):
        for proto, port in ((6, 8080), (17, 5353)):
            t.dps[n].upsert_service(10 + proto, NODE_IPS[n], NODEPORT, proto, [LBBackend(proto, b, port, proto)],
                                    kind="NodePort")
        t.dps[n].upsert_service(20, VIP, 80, 6, [LBBackend(6, b, 8080)])

    # Node 1 has no local backend: DNAT + SNAT to node 1, over to node 2, and back.
    rows = client(t.world, "tcp", NODE_IPS[1], NODEPORT, 20, WORLD_IP)
    assert rows == [(NODE_IPS[1], b, NODE_IPS[1])] * 20, rows
    udp = client(t.world, "udp", NODE_IPS[1], NODEPORT, 10)
    assert {r[0] for r in udp} == {NODE_IPS[1]} and {r[1] for r in udp} == {b}, udp
    # Node 2 has it locally: the backend sees the real client.
    rows = client(t.world, "tcp", NODE_IPS[2], NODEPORT, 10, WORLD_IP)
    assert rows == [(NODE_IPS[2], b, WORLD_IP)] * 10, rows
    # A pod on node 1 reaches the remote backend through the ClusterIP, unSNATed.
    rows = client(t.pods["client"]["ns"], "tcp", VIP, 80, 10)
    assert rows == [(VIP, b, cl)] * 10, rows

    nat = [e["formatted"] for e in json.loads(sh("bpftool", "-j", "map", "dump", "pinned",
                                                  f"{t.pins[1]}/cilia_snat_v4"))]
    assert any(e["key"]["saddr"] == be32(WORLD_IP) and e["key"]["daddr"] == be32(b) and
               e["value"]["to_addr"] == be32(NODE_IPS[1]) for e in nat), nat


def test_etp_local_nodeport_keeps_client_ip_and_skips_nodes_without_backends(topo):
    t = topo("tunnel", nodes=2)
    b = t.add_pod("b", 2, 21)
    t.load()
    t.start(t.pods["b"]["ns"], SERVER, "8080", "5353")
    # What the control plane writes for ETP=Local: only this node's backends.
    t.dps[1].upsert_service(30, NODE_IPS[1], NODEPORT, 6, [], kind="NodePort", local_only=True)
    t.dps[2].upsert_service(30, NODE_IPS[2], NODEPORT, 6, [LBBackend(1, b, 8080)], kind="NodePort",
                            local_only=True)
    assert client(t.world, "tcp", NODE_IPS[2], NODEPORT, 5, WORLD_IP) == [(NODE_IPS[2], b, WORLD_IP)] * 5
    assert client(t.world, "tcp", NODE_IPS[1], NODEPORT, 1, WORLD_IP)[0][0] == "ERR"
    drops = {m["reason"]: m["packets"] for m in t.dps[1].metrics() if m["direction"] == "INGRESS"}
    assert drops.get(158, 0) >= 1, drops


CGROUP2 = "/sys/fs/cgroup/unified" if os.path.isdir("/sys/fs/cgroup/unified") else "/sys/fs/cgroup"


def client_in_cgroup(cg: str, ns: str, *args: str) -> list[tuple[str, ...]]:
    # The process joins the cgroup before it execs the client, so every socket it opens
    # is subject to the cgroup's programs.
    import sys
    out = sh("sh", "-c", f'echo $$ > {cg}/cgroup.procs && exec nsenter --net=/run/netns/{ns} -- "$@"', "sh",
             sys.executable, "-c", CLIENT, *args, timeout=120)
    return [tuple(line.split()) for line in out.splitlines()]


def test_socket_lb_translates_at_connect_time(topo):
    t = topo("tunnel", nodes=1)
    cl = t.add_pod("client", 1, 11)
    b1, b2 = t.add_pod("b1", 1, 21), t.add_pod("b2", 1, 22)
    t.load(socket_lb=True)
    dp = t.dps[1]
    for name in ("b1", "b2"):
        t.start(t.pods[name]["ns"], SERVER, "8080", "5353")
    dp.upsert_service(1, VIP, 80, 6, [LBBackend(1, b1, 8080), LBBackend(2, b2, 8080)])
    dp.upsert_service(2, VIP, 53, 17, [LBBackend(3, b1, 5353, 17), LBBackend(4, b2, 5353, 17)])
    cg = f"{CGROUP2}/cilia-test-{t.tag}"
    os.mkdir(cg)
    try:
        dp.attach_cgroup(cg)
        attached = json.loads(sh("bpftool", "-j", "cgroup", "show", cg))
        assert sorted(a["attach_type"] for a in attached) == ["cgroup_inet4_connect", "cgroup_inet4_getpeername",
                                                              "cgroup_udp4_recvmsg", "cgroup_udp4_sendmsg"]

        ns = t.pods["client"]["ns"]
        rows = client_in_cgroup(cg, ns, "tcp", VIP, "80", "40")
        assert {r[0] for r in rows} == {VIP}, "getpeername shows the frontend"
        assert {r[2] for r in rows} == {cl}
        assert {r[1] for r in rows} == {b1, b2}, rows
        udp = client_in_cgroup(cg, ns, "udp", VIP, "53", "20")
        assert {r[0] for r in udp} == {VIP}, "recvfrom shows the frontend"
        assert {r[1] for r in udp} == {b1, b2}
        # No packet ever carried the frontend address: tc had nothing to translate.
        assert not [e for e in ct_dump(t.pins[1]) if e["key"]["daddr"] == be32(VIP)]

        # Control: the same client outside the cgroup is balanced per packet by tc.
        assert {r[1] for r in client(ns, "tcp", VIP, 80, 10)} <= {b1, b2}
        assert [e for e in ct_dump(t.pins[1]) if e["key"]["daddr"] == be32(VIP)]
        assert dp.detach_cgroup(cg) == 4
        assert json.loads(sh("bpftool", "-j", "cgroup", "show", cg).strip() or "[]") == []
    finally:
        os.rmdir(cg)

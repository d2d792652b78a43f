"""Network policy: the cost of a new connection under N allow rules (cilia vs iptables, one
run), the policy engine's computation time, and apply -> enforced in a lab.

Data plane (no lab, our own namespaces `<bench>-*`, pins under /sys/fs/bpf/cilia/<bench>):
one node netns with two pairs of pods on veths.
  cilia:    pods `cli` and `srv` on lxc veths with cilia's datapath (NodeDatapath: bpf_lxc on
            both veths, endpoint map, ipcache), as tests/netns/test_datapath_policy.py builds it.
            srv's ingress is enforced (set_endpoint_policy_flags) and its entries written with
            sync_policy: one (ingress, identity, TCP, 8080/16) allow per peer, N peers, each a
            distinct identity with an ipcache entry (dummy addresses in the cluster CIDR); the
            client's identity is the last one allocated, so a linear scan would pay for all N.
  iptables: pods `pcli` and `psrv` on plain veths routed by the node's stack (no BPF), with
            the layout iptables-based policy engines use in FORWARD: conntrack
            RELATED,ESTABLISHED -> ACCEPT first, then a jump for packets to the server into a
            chain of N `-s IP/32 -p tcp --dport 8080 -j ACCEPT` rules (the client's address the
            last rule) ending in DROP. iptables-legacy, as bench/services.py
            (iptables-nft only if legacy is missing), a private XTABLES_LOCKFILE.
  N = 0 is "no policy": srv not enforced; FORWARD has only the conntrack rule.
  Both sides judge only a connection's first packet (cilia: its policy conntrack; iptables:
  the ESTABLISHED rule), so the measured thing is what a new connection costs.
The client is a Python loop in the client netns: per connection socket(), connect() to
server:8080, close() with SO_LINGER 0 (RST, no TIME_WAIT), timed from socket() to close();
client and server pinned to CPU 0 (design.md §8). Per N, `reps` runs per path (order rotated),
medians of each run's p50 / p99. Before timing, each configuration is checked: the client
connects, a connection to port 8081 (listening, not allowed) is refused by policy, and on the
iptables side the client's ACCEPT rule (the last one) counted the packets.

Engine (no lab): PolicyEngine with 1,000 identities (10 namespaces, app i%50, tier i%7, a
unique label each, so 1,000 distinct identities) and 500 policies (480 namespaced CNPs, ingress
from another app on a port range; 20 clusterwide, half egress to a CIDR with an except, half
egress to the `cluster` entity, which selects every identity); 1,000 endpoints, one per
identity. Timed: regenerate() of all 1,000 endpoints (full recompute, ~1M map entries), then
one policy added (and regenerate: the endpoints it selects), then one identity added (every
endpoint uses the `cluster` selector, so every endpoint is patched). A fresh engine per run;
wall and CPU (process) time; medians.

Apply -> enforced (3-node lab, tunnel routing): a server Deployment pod on node3 and client
pods on node1 and node2, all running before the clock starts; per run a CiliumNetworkPolicy
denying the clients' ingress to the server (default deny by selecting the server with an
allow from an absent label) and then one allowing it again:
  `cilia apply --wait -f` wall time (returns once every agent enforces the revision), and
  from plain `cilia apply -f` to the first probe (TCP connect from the client pod) that sees
  the datapath drop / allow, probes every ~20 ms.
"""
from __future__ import annotations

import contextlib
import gc
import json
import os
import shutil
import subprocess
import sys
import time

from bench.common import (BenchError, Procs, fmt, in_netns, lab, list_netns, log, median,
                          no_interrupts, sh, summary, table, unique_name)

CPU = 0
COUNTS = (0, 1, 1_000, 10_000)
PATHS = ("cilia", "iptables")
PORT, DENIED_PORT = 8080, 8081
TCP = 6

NODE_IP = "192.168.231.1"          # on the node netns's lo
ROUTER = "10.245.1.1"
POD_CIDR = "10.245.1.0/24"
CLUSTER_CIDR = "10.245.0.0/16"
CILIA_PODS = {"cli": "10.245.1.11", "srv": "10.245.1.12"}
PLAIN_PODS = {"pcli": "10.245.2.11", "psrv": "10.245.2.12"}
PLAIN_ROUTER = "10.245.2.1"
SRV_IDENTITY = 60_000
FIRST_PEER_IDENTITY = 20_000       # peers 20000..20000+N-1; the client is the last
SRV_EP, CLI_EP = 2, 1
IPT_CHAIN = "BPOL-INGRESS"


def peer_ip(k: int) -> str:
    """Dummy peers: inside the cluster CIDR, outside both pod subnets, never reached."""
    return f"10.245.{16 + (k >> 8)}.{k & 255}"


# argv: host port n warmup. Prints {"us": [...]}.
CLIENT = r"""
import json, socket, struct, sys, time
host, port, n, warm = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
linger = struct.pack("ii", 1, 0)
pc = time.perf_counter_ns
out = []
for i in range(warm + n):
    t0 = pc()
    s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    s.settimeout(5)
    s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, linger)
    s.connect((host, port))
    s.close()
    t1 = pc()
    if i >= warm:
        out.append((t1 - t0) / 1000.0)
print(json.dumps({"us": out}))
"""

# argv: host port; exit 0 if a connection is made within 1 s, 1 if not.
PROBE = r"""
import socket, sys
s = socket.socket()
s.settimeout(1.0)
try:
    s.connect((sys.argv[1], int(sys.argv[2])))
except OSError:
    sys.exit(1)
s.close()
"""

# Accepts and closes on every port in argv (one thread each); prints "ready".
SERVER = r"""
import socket, sys, threading
def serve(s):
    while True:
        try:
            c, _ = s.accept()
            c.close()
        except OSError:
            pass
socks = []
for p in sys.argv[1:]:
    s = socket.socket()
    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    s.bind(("0.0.0.0", int(p)))
    s.listen(1024)
    socks.append(s)
for s in socks[1:]:
    threading.Thread(target=serve, args=(s,), daemon=True).start()
print("ready", flush=True)
serve(socks[0])
"""


# --- topology ---------------------------------------------------------------------------------

def _ip(ns: str, *args: str) -> str:
    return sh("ip", "-n", ns, *args).stdout


def _mac(ns: str, dev: str) -> str:
    return json.loads(_ip(ns, "-j", "link", "show", dev))[0]["address"]


def _ifindex(ns: str, dev: str) -> int:
    return json.loads(_ip(ns, "-j", "link", "show", dev))[0]["ifindex"]


class Topo:
    """Everything the data-plane part creates, so close() removes exactly that."""

    def __init__(self, name: str):
        self.name = name
        self.netns: list[str] = []
        self.node = ""
        self.pin = ""
        self.dp = None
        self.ex = None
        self.procs = Procs()
        self.lxc: dict[str, int] = {}
        self.host_dev: dict[str, str] = {}

    def ns(self, role: str) -> str:
        n = f"{self.name}-{role}"
        sh("ip", "netns", "add", n)
        self.netns.append(n)
        _ip(n, "link", "set", "lo", "up")
        return n

    def build(self) -> "Topo":
        self.node = self.ns("node")
        sh(*in_netns(self.node, ["sysctl", "-qw", "net.ipv4.ip_forward=1",
                                 "net.ipv4.conf.all.rp_filter=0",
                                 "net.ipv4.conf.default.rp_filter=0"]))
        _ip(self.node, "addr", "add", f"{NODE_IP}/32", "dev", "lo")
        for i, (pod, ip) in enumerate(CILIA_PODS.items()):
            self._pod(pod, ip, ROUTER, f"lxc{i}", static=False)
        for i, (pod, ip) in enumerate(PLAIN_PODS.items()):
            self._pod(pod, ip, PLAIN_ROUTER, f"veth{i}", static=True)
        return self

    def _pod(self, pod: str, ip: str, router: str, host_dev: str, static: bool) -> None:
        ns = self.ns(pod)
        _ip(self.node, "link", "add", host_dev, "type", "veth", "peer", "name", "eth0", "netns", ns)
        _ip(self.node, "link", "set", host_dev, "up")
        _ip(ns, "link", "set", "eth0", "up")
        _ip(ns, "addr", "add", f"{ip}/32", "dev", "eth0")
        _ip(ns, "route", "add", router, "dev", "eth0", "scope", "link")
        _ip(ns, "route", "add", "default", "via", router, "dev", "eth0")
        _ip(self.node, "route", "add", f"{ip}/32", "dev", host_dev, "scope", "link")
        if static:
            # No BPF answers ARP here, and the node has no address on the veth: static
            # neighbours both ways, as a CNI's plain routed setup would do.
            _ip(ns, "neigh", "replace", router, "lladdr", _mac(self.node, host_dev), "dev", "eth0",
                "nud", "permanent")
            _ip(self.node, "neigh", "replace", ip, "lladdr", _mac(ns, "eth0"), "dev", host_dev,
                "nud", "permanent")
        self.lxc[pod] = _ifindex(self.node, host_dev)
        self.host_dev[pod] = host_dev

    def load(self) -> "Topo":
        from cilia.datapath.netns import NetnsExecutor
        from cilia.datapath.node import PIN_BASE, EndpointEntry, NodeConfig, NodeDatapath
        self.pin = os.path.join(PIN_BASE, self.name)
        if os.path.exists(self.pin):
            raise BenchError(f"{self.pin} exists")
        cfg = NodeConfig(node_ip4=NODE_IP, router_ip4=ROUTER, pod_cidr4=POD_CIDR,
                         routing="native", cluster_cidr4=CLUSTER_CIDR)
        self.dp = NodeDatapath(self.pin, cfg).load()
        self.ex = NetnsExecutor(f"/run/netns/{self.node}")
        for pod, ep_id, ident in (("cli", CLI_EP, FIRST_PEER_IDENTITY), ("srv", SRV_EP, SRV_IDENTITY)):
            ns = f"{self.name}-{pod}"
            self.dp.upsert_endpoint(EndpointEntry(CILIA_PODS[pod], self.lxc[pod], ep_id,
                                                  _mac(ns, "eth0"), _mac(self.node, self.host_dev[pod]),
                                                  sec_id=ident))
            self.ex.run(self.dp.attach_endpoint, self.lxc[pod])
        return self

    def set_client_identity(self, ident: int) -> None:
        from cilia.datapath.node import EndpointEntry
        self.dp.upsert_endpoint(EndpointEntry(CILIA_PODS["cli"], self.lxc["cli"], CLI_EP,
                                              _mac(f"{self.name}-cli", "eth0"),
                                              _mac(self.node, self.host_dev["cli"]), sec_id=ident))

    def close(self) -> None:
        with no_interrupts():
            self.procs.stop_all()
            if self.ex is not None:
                with contextlib.suppress(Exception):
                    self.ex.close()
            if self.dp is not None:
                with contextlib.suppress(Exception):
                    self.dp.close()
            for ns in self.netns:
                subprocess.run(["ip", "netns", "del", ns], capture_output=True, timeout=30)
            if self.pin and os.path.isdir(self.pin):
                from cilia.datapath.node import NodeDatapath
                NodeDatapath.remove_pins(self.pin)


# --- policy on both sides -----------------------------------------------------------------------

def cilia_policy(t: Topo, n: int) -> dict:
    """N peers: identities FIRST_PEER_IDENTITY.. with ipcache entries; the client is the last."""
    from cilia.datapath import abi
    from cilia.datapath.node import PolicyEntry
    t0 = time.perf_counter()
    if n == 0:
        client_id = FIRST_PEER_IDENTITY
        ipc = {}
        entries: list = []
    else:
        client_id = FIRST_PEER_IDENTITY + n - 1
        ipc = {f"{peer_ip(k)}/32": (FIRST_PEER_IDENTITY + k, None, 0) for k in range(n - 1)}
        entries = [PolicyEntry(abi.POLICY_INGRESS, FIRST_PEER_IDENTITY + k, TCP, PORT, 16, False)
                   for k in range(n)]
    ipc[f"{CILIA_PODS['cli']}/32"] = (client_id, None, 0)
    ipc[f"{CILIA_PODS['srv']}/32"] = (SRV_IDENTITY, None, 0)
    t.set_client_identity(client_id)
    t.dp.sync_ipcache(ipc)
    t.dp.sync_policy(SRV_EP, entries)
    t.dp.set_endpoint_policy_flags(CILIA_PODS["srv"], t.lxc["srv"], n > 0, False, False)
    t.dp.flush_policy_ct()
    return {"write_s": time.perf_counter() - t0, "entries": len(t.dp.policy_entries(SRV_EP)),
            "ipcache": len(t.dp.ipcache()), "client_identity": client_id}


def ipt_rules(n: int) -> str:
    srv, cli = PLAIN_PODS["psrv"], PLAIN_PODS["pcli"]
    lines = ["*filter", ":INPUT ACCEPT [0:0]", ":FORWARD ACCEPT [0:0]", ":OUTPUT ACCEPT [0:0]",
             "-A FORWARD -m conntrack --ctstate RELATED,ESTABLISHED -j ACCEPT"]
    if n:
        lines.insert(4, f":{IPT_CHAIN} - [0:0]")
        lines.append(f"-A FORWARD -d {srv}/32 -j {IPT_CHAIN}")
        lines += [f"-A {IPT_CHAIN} -s {peer_ip(k)}/32 -p tcp -m tcp --dport {PORT} -j ACCEPT"
                  for k in range(n - 1)]
        lines.append(f"-A {IPT_CHAIN} -s {cli}/32 -p tcp -m tcp --dport {PORT} -j ACCEPT")
        lines.append(f"-A {IPT_CHAIN} -j DROP")
    return "\n".join(lines + ["COMMIT", ""])


class Ipt:
    def __init__(self, ns: str, lockfile: str):
        from bench.services import iptables_tools
        self.tools = iptables_tools()
        self.ns = ns
        self.env = {**os.environ, "XTABLES_LOCKFILE": lockfile}

    def restore(self, text: str) -> float:
        t = time.perf_counter()
        p = subprocess.run(in_netns(self.ns, [self.tools["restore"], "-w"]), input=text,
                           capture_output=True, text=True, timeout=300, env=self.env)
        if p.returncode != 0:
            raise BenchError(f"{self.tools['restore']} in {self.ns}: {p.stderr[-2000:]}")
        return time.perf_counter() - t

    def chain_rules(self) -> list[str]:
        out = sh(*in_netns(self.ns, [self.tools["iptables"], "-w", "-L", IPT_CHAIN, "-v", "-n",
                                     "-x"]), env=self.env).stdout
        return [l for l in out.splitlines()[2:] if l.strip()]

    def client_rule_packets(self) -> int:
        rules = self.chain_rules()
        last_accept = [l for l in rules if "ACCEPT" in l][-1]
        if PLAIN_PODS["pcli"] not in last_accept:
            raise BenchError(f"the last ACCEPT rule is not the client's: {last_accept}")
        return int(last_accept.split()[0])


def probe(ns: str, host: str, port: int) -> bool:
    return subprocess.run(in_netns(ns, [sys.executable, "-c", PROBE, host, str(port)]),
                          capture_output=True, timeout=30).returncode == 0


def client_run(ns: str, host: str, n: int, warm: int) -> list[float]:
    p = sh(*in_netns(ns, [sys.executable, "-c", CLIENT, host, str(PORT), str(n), str(warm)],
                     cpu=CPU), timeout=120 + n * 0.05)
    return json.loads(p.stdout)["us"]


def start_server(t: Topo, pod: str) -> None:
    p = t.procs.start(in_netns(f"{t.name}-{pod}", [sys.executable, "-c", SERVER, str(PORT),
                                                   str(DENIED_PORT)], cpu=CPU))
    line = p.stdout.readline().strip()
    if line != "ready":
        raise BenchError(f"server in {pod}: {line} {t.procs.stop(p)}")


def data_plane(name: str, reps: int, conns: int, warm: int) -> dict:
    lockfile = f"/tmp/{name}.xtables.lock"
    t = Topo(name)
    res: dict = {"reps": reps, "conns": conns, "warmup": warm, "counts": list(COUNTS),
                 "cpu_pin": CPU, "setup": {}}
    samples: dict = {str(c): {p: [] for p in PATHS} for c in COUNTS}
    try:
        t.build().load()
        ipt = Ipt(t.node, lockfile)
        res["iptables"] = {"backend": ipt.tools["backend"],
                           "version": sh(ipt.tools["iptables"], "--version", check=False).stdout.strip()}
        start_server(t, "srv")
        start_server(t, "psrv")
        dests = {"cilia": (f"{name}-cli", CILIA_PODS["srv"]),
                 "iptables": (f"{name}-pcli", PLAIN_PODS["psrv"])}
        for count in COUNTS:
            c = cilia_policy(t, count)
            ipt_s = ipt.restore(ipt_rules(count))
            setup = {"cilia": c, "iptables_restore_s": ipt_s,
                     "iptables_chain_rules": len(ipt.chain_rules()) if count else 0}
            # Both paths work, and the policy is really there: 8081 is refused by policy.
            for path, (ns, host) in dests.items():
                if not probe(ns, host, PORT):
                    raise BenchError(f"{path} with {count} rules: the client cannot connect")
                if count and probe(ns, host, DENIED_PORT):
                    raise BenchError(f"{path} with {count} rules: port {DENIED_PORT} not denied")
                if not count and not probe(ns, host, DENIED_PORT):
                    raise BenchError(f"{path} without policy: port {DENIED_PORT} refused")
            if count:
                before = ipt.client_rule_packets()
                client_run(dests["iptables"][0], dests["iptables"][1], 20, 0)
                if ipt.client_rule_packets() - before < 20:
                    raise BenchError("the client's ACCEPT rule did not count the connections")
            drops = sum(m["packets"] for m in t.dp.metrics() if m["reason"] == 133
                        and not m["audit"])
            setup["cilia_policy_drops_so_far"] = drops
            res["setup"][str(count)] = setup
            log(f"{count} peers: cilia {c['entries']} entries, {c['ipcache']} ipcache "
                f"({c['write_s']:.2f} s); iptables {setup['iptables_chain_rules']} chain rules "
                f"({ipt_s:.2f} s)")
            for rep in range(reps):
                k = rep % len(PATHS)
                for path in PATHS[k:] + PATHS[:k]:
                    us = client_run(*dests[path], conns, warm)
                    s = summary(us)
                    samples[str(count)][path].append(s)
                    log(f"{count:>6} peers rep {rep + 1}/{reps} {path:8s} p50 {s['p50']:.1f} "
                        f"p99 {s['p99']:.1f} µs")
    finally:
        t.close()
        with contextlib.suppress(FileNotFoundError):
            os.unlink(lockfile)
    res["samples"] = samples
    med: dict = {}
    for c in map(str, COUNTS):
        med[c] = {p: {k: median([s[k] for s in samples[c][p]]) for k in ("p50", "p90", "p99",
                                                                           "mean")}
                  for p in PATHS}
        med[c]["iptables_over_cilia_p50"] = med[c]["iptables"]["p50"] / med[c]["cilia"]["p50"]
    first = str(COUNTS[0])
    for c in map(str, COUNTS):
        med[c]["over_no_policy_p50"] = {p: med[c][p]["p50"] / med[first][p]["p50"] for p in PATHS}
    res["medians"] = med
    return res


# --- engine ------------------------------------------------------------------------------------

N_IDENTITIES, N_POLICIES, N_CLUSTERWIDE = 1000, 500, 20
NAMESPACES = [f"ns{i}" for i in range(10)]


def engine_workload():
    from cilia.identity import Identity, pod_security_labels
    from cilia.k8s.policies import (validate_cilium_clusterwide_network_policy,
                                    validate_cilium_network_policy)
    idents = []
    for i in range(N_IDENTITIES):
        ns = NAMESPACES[i % len(NAMESPACES)]
        labels = tuple(pod_security_labels({"app": f"app{i % 50}", "tier": f"t{i % 7}",
                                            "n": str(i)}, ns))
        idents.append(Identity(256 + i, labels))

    def cnp(name, ns, spec):
        return validate_cilium_network_policy({"apiVersion": "cilium.io/v2",
                                               "kind": "CiliumNetworkPolicy",
                                               "metadata": {"name": name, "namespace": ns},
                                               "spec": spec})
    policies = []
    for k in range(N_POLICIES - N_CLUSTERWIDE):
        port = 8000 + k % 20
        policies.append(cnp(f"p{k}", NAMESPACES[k % len(NAMESPACES)], {
            "endpointSelector": {"matchLabels": {"app": f"app{k % 50}"}},
            "ingress": [{"fromEndpoints": [{"matchLabels": {"app": f"app{(k * 7) % 50}"}}],
                         "toPorts": [{"ports": [{"port": str(port), "endPort": port + k % 4,
                                                 "protocol": "TCP"}]}]}]}))
    for k in range(N_CLUSTERWIDE):
        egress = ([{"toCIDRSet": [{"cidr": f"10.{k}.0.0/16", "except": [f"10.{k}.1.0/24"]}]}]
                  if k % 2 else [{"toEntities": ["cluster"]}])
        policies.append(validate_cilium_clusterwide_network_policy({
            "apiVersion": "cilium.io/v2", "kind": "CiliumClusterwideNetworkPolicy",
            "metadata": {"name": f"c{k}"},
            "spec": {"endpointSelector": {"matchLabels": {"tier": f"t{k % 7}"}},
                     "egress": egress}}))
    extra = cnp("extra", "ns3", {"endpointSelector": {"matchLabels": {"app": "app3"}},
                                 "ingress": [{"fromEndpoints": [{"matchLabels": {"app": "app13"}}],
                                              "toPorts": [{"ports": [{"port": "9000",
                                                                      "protocol": "TCP"}]}]}]})
    newcomer = Identity(256 + N_IDENTITIES, tuple(pod_security_labels(
        {"app": "app3", "tier": "t1", "n": "new"}, "ns3")))
    return idents, policies, extra, newcomer


def _timed(fn):
    gc.collect()
    w, c = time.perf_counter(), time.process_time()
    out = fn()
    return out, time.perf_counter() - w, time.process_time() - c


def engine_once(work) -> dict:
    from cilia.policy import Endpoint, PolicyEngine
    idents, policies, extra, newcomer = work
    e = PolicyEngine()
    for i in idents:
        e.add_identity(i)
    for p in policies:
        e.upsert_policy(p)
    for i in idents:
        e.upsert_endpoint(Endpoint(i.id - 255, i.id, i.labels))
    full, full_w, full_c = _timed(e.regenerate)
    # The engine defers cyclic GC during regenerate(): what that collection costs afterwards.
    t = time.process_time()
    gc.collect()
    gc_c = time.process_time() - t
    add, add_w, add_c = _timed(lambda: (e.upsert_policy(extra), e.regenerate())[1])
    new, new_w, new_c = _timed(lambda: (e.add_identity(newcomer), e.regenerate())[1])
    # The policies arriving one by one while the endpoints exist (an agent's start, a bulk
    # apply): each upsert_policy finds the endpoints it affects; one regenerate() after.
    e2 = PolicyEngine()
    for i in idents:
        e2.add_identity(i)
    for i in idents:
        e2.upsert_endpoint(Endpoint(i.id - 255, i.id, i.labels))
    _, bulk_w, bulk_c = _timed(lambda: [e2.upsert_policy(p) for p in policies])
    return {"full_wall_s": full_w, "full_cpu_s": full_c, "gc_after_full_cpu_s": gc_c,
            "endpoints": len(full),
            "entries": sum(len(u.policy.entries) for u in full.values()),
            "add_policy_wall_s": add_w, "add_policy_cpu_s": add_c, "add_policy_endpoints": len(add),
            "add_policy_upserts": sum(len(u.upserts) for u in add.values()),
            "new_identity_wall_s": new_w, "new_identity_cpu_s": new_c,
            "new_identity_endpoints": len(new),
            "bulk_upserts_wall_s": bulk_w, "bulk_upserts_cpu_s": bulk_c,
            "new_identity_upserts": sum(len(u.upserts) for u in new.values())}


def engine(runs: int) -> dict:
    work = engine_workload()
    samples = []
    for r in range(runs):
        s = engine_once(work)
        samples.append(s)
        log(f"engine run {r + 1}/{runs}: full {s['full_wall_s']:.2f} s ({s['full_cpu_s']:.2f} s "
            f"CPU, {s['entries']} entries), +policy {s['add_policy_wall_s'] * 1e3:.0f} ms "
            f"({s['add_policy_endpoints']} endpoints), +identity "
            f"{s['new_identity_wall_s'] * 1e3:.0f} ms ({s['new_identity_endpoints']} endpoints)")
    keys = [k for k in samples[0] if k.endswith("_s")]
    return {"identities": N_IDENTITIES, "policies": N_POLICIES, "runs": runs,
            "samples": samples, "medians": {k: median([s[k] for s in samples]) for k in keys},
            "counts": {k: samples[0][k] for k in samples[0] if not k.endswith("_s")}}


# --- apply -> enforced in a lab -------------------------------------------------------------------

LAB_PODS = """apiVersion: apps/v1
kind: Deployment
metadata: {name: web}
spec:
  replicas: 1
  selector: {matchLabels: {app: web}}
  template:
    metadata: {labels: {app: web}}
    spec:
      nodeName: node3
      containers:
      - name: echo
        image: cilia/echo
        ports: [{containerPort: 8080}]
---
apiVersion: v1
kind: Pod
metadata: {name: cli1, labels: {app: cli}}
spec:
  nodeName: node1
  containers: [{name: idle, image: busybox}]
---
apiVersion: v1
kind: Pod
metadata: {name: cli2, labels: {app: cli}}
spec:
  nodeName: node2
  containers: [{name: idle, image: busybox}]
"""


def lab_policy(allow: bool) -> str:
    peer = "cli" if allow else "nobody"
    return f"""apiVersion: cilium.io/v2
kind: CiliumNetworkPolicy
metadata: {{name: bench-web}}
spec:
  endpointSelector: {{matchLabels: {{app: web}}}}
  ingress:
  - fromEndpoints: [{{matchLabels: {{app: {peer}}}}}]
    toPorts: [{{ports: [{{port: "8080", protocol: TCP}}]}}]
"""


# Started (and "ready") before the clock starts; reads t0 (time.time() just before `cilia
# apply` starts) from stdin, then probes every ~50 ms until the outcome is argv[3]
# ("ok"/"fail") and prints {"s": seconds from t0 to the verdict, "probes": n}. A connect
# either completes (allowed) or times out after 0.1 s (dropped): "fail" counts from the start
# of the first of two consecutive timeouts, so a slow handshake on a busy machine is not
# mistaken for a drop. The pace keeps the probes' own CPU use (and the flow events each
# connection makes the agents decode) small next to what is measured.
PROBE_UNTIL = r"""
import json, socket, sys, time
host, port, want, limit = sys.argv[1], int(sys.argv[2]), sys.argv[3], float(sys.argv[4])
print("ready", flush=True)
t0 = float(sys.stdin.readline())
n, fail_since = 0, None
while True:
    n += 1
    start = time.time()
    s = socket.socket()
    s.settimeout(0.1)
    try:
        s.connect((host, port))
        got = "ok"
    except OSError:
        got = "fail"
    s.close()
    if got == "ok":
        fail_since = None
        if want == "ok":
            print(json.dumps({"s": time.time() - t0, "probes": n}))
            break
    else:
        if want == "fail" and fail_since is not None:
            print(json.dumps({"s": fail_since - t0, "probes": n}))
            break
        fail_since = start if fail_since is None else fail_since
    if time.time() - t0 > limit:
        print(json.dumps({"s": None, "probes": n}))
        break
    time.sleep(0.05)
"""


def apply_to_enforced(name: str, runs: int) -> dict:
    res: dict = {"nodes": 3, "routing": "tunnel", "runs": runs, "wait": [], "probe": []}
    with lab(name, nodes=3, routing="tunnel") as lb:
        if "--wait" not in lb.cilia("apply", "--help").stdout:
            raise BenchError("`cilia apply --wait` is not available in this build")
        lb.cilia("apply", "-f", "-", input=LAB_PODS)
        lb.cilia("wait", "--for=condition=Ready", "pods", "--all", "--timeout", "180s",
                 timeout=200)
        pods = lb.pods()
        web = next(p for n, p in pods.items() if n.startswith("web-"))
        web_ip = web["status"]["podIP"]
        res["web"] = {"node": web["spec"].get("nodeName"), "ip": web_ip}
        clients = {c: lb.pod_netns(c) for c in ("cli1", "cli2")}
        for c, ns in clients.items():
            if not probe(ns, web_ip, 8080):
                raise BenchError(f"{c} cannot reach web before any policy")
        try:
            for r in range(runs):
                # apply --wait returns once every agent enforces the new revision: right after
                # it, the datapath must already say so.
                for allow in (False, True):
                    t = time.perf_counter()
                    out = lb.cilia("apply", "--wait", "-f", "-", input=lab_policy(allow),
                                   timeout=120).stdout
                    wait_s = time.perf_counter() - t
                    ok = {c: probe(ns, web_ip, 8080) for c, ns in clients.items()}
                    if any(v != allow for v in ok.values()):
                        raise BenchError(f"right after apply --wait (allow={allow}) probes: {ok}")
                    res["wait"].append({"allow": allow, "s": wait_s, "output": out.strip()})
                # Plain apply, the clients probing from before it starts until they see it.
                for allow in (False, True):
                    want = "ok" if allow else "fail"
                    prs = [subprocess.Popen(in_netns(ns, [sys.executable, "-c", PROBE_UNTIL,
                                                          web_ip, "8080", want, "60"]),
                                            stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                            text=True)
                           for ns in clients.values()]
                    for pr in prs:
                        if pr.stdout.readline().strip() != "ready":
                            raise BenchError("probe did not start")
                    t0 = time.time()
                    for pr in prs:
                        pr.stdin.write(f"{t0!r}\n")
                        pr.stdin.flush()
                    lb.cilia("apply", "-f", "-", input=lab_policy(allow), timeout=120)
                    apply_s = time.time() - t0
                    got = [json.loads(pr.communicate(timeout=90)[0]) for pr in prs]
                    res["probe"].append({"allow": allow, "apply_returned_s": apply_s,
                                         "enforced_s": [g["s"] for g in got],
                                         "probes": [g["probes"] for g in got]})
                # Control: the CLI and store round trip alone (the same policy again, unchanged).
                t = time.perf_counter()
                lb.cilia("apply", "-f", "-", input=lab_policy(True), timeout=120)
                res.setdefault("unchanged", []).append(time.perf_counter() - t)
                log(f"lab run {r + 1}/{runs}: apply --wait deny {res['wait'][-2]['s']:.2f} s, "
                    f"allow {res['wait'][-1]['s']:.2f} s; apply -> datapath deny "
                    f"{res['probe'][-2]['enforced_s']}, allow {res['probe'][-1]['enforced_s']} s")
        finally:
            lb.cilia("delete", "cnp", "bench-web", check=False)
    for kind in ("deny", "allow"):
        allow = kind == "allow"
        w = [x["s"] for x in res["wait"] if x["allow"] == allow]
        p = [max(x["enforced_s"]) for x in res["probe"]
             if x["allow"] == allow and None not in x["enforced_s"]]
        a = [x["apply_returned_s"] for x in res["probe"] if x["allow"] == allow]
        res[f"{kind}_medians"] = {"apply_wait_s": median(w), "apply_to_all_enforced_s": median(p),
                                  "plain_apply_returned_s": median(a)}
    res["unchanged_apply_median_s"] = median(res.get("unchanged", []))
    return res


# --- entry points ----------------------------------------------------------------------------------

def run(quick: bool = False, reps: int | None = None, parts: str = "engine,dataplane,lab") -> dict:
    name = unique_name("bp")
    res: dict = {"benchmark": "policy", "name": name}
    chosen = parts.split(",")
    try:
        if "engine" in chosen:
            log("engine: 1000 identities x 500 policies")
            res["engine"] = engine(3 if quick else 5)
        if "dataplane" in chosen:
            res["data_plane"] = data_plane(name, reps or (2 if quick else 9),
                                           500 if quick else 3000, 50 if quick else 200)
        if "lab" in chosen:
            try:
                res["lab"] = apply_to_enforced(f"{name}l", 2 if quick else 5)
            except BenchError as e:
                res["lab"] = {"error": str(e)}
                log(f"lab part: {e}")
    finally:
        with no_interrupts():
            for ns in list_netns():
                if ns.startswith(f"{name}-"):
                    subprocess.run(["ip", "netns", "del", ns], capture_output=True, timeout=30)
    return res


def _ms(s: float) -> str:
    return "-" if s != s else (f"{s * 1e3:.0f} ms" if s < 1 else f"{s:.2f} s")


def render_engine(e: dict) -> str:
    m, c = e["medians"], e["counts"]
    rows = [[f"full recompute: {c['endpoints']:,} endpoints, {c['entries']:,} map entries",
             _ms(m["full_wall_s"]), _ms(m["full_cpu_s"])],
            [f"add 1 policy ({c['add_policy_endpoints']} endpoints recomputed, "
             f"{c['add_policy_upserts']} entries written)", _ms(m["add_policy_wall_s"]),
             _ms(m["add_policy_cpu_s"])],
            [f"add 1 identity ({c['new_identity_endpoints']:,} endpoints patched, "
             f"{c['new_identity_upserts']:,} entries written)", _ms(m["new_identity_wall_s"]),
             _ms(m["new_identity_cpu_s"])]]
    if "bulk_upserts_wall_s" in m:
        rows.append([f"{e['policies']} × upsert_policy with the {c['endpoints']:,} endpoints "
                     "present (marking only)", _ms(m["bulk_upserts_wall_s"]),
                     _ms(m["bulk_upserts_cpu_s"])])
    return table([f"{e['identities']:,} identities × {e['policies']} policies, median of "
                  f"{e['runs']}", "wall", "CPU"], rows)


def render_data(dp: dict) -> str:
    rows = []
    for c in dp["counts"]:
        d = dp["medians"][str(c)]
        rows.append([f"{c:,}" if c else "0 (no policy)", fmt(d["cilia"]["p50"]),
                     fmt(d["iptables"]["p50"]), fmt(d["iptables_over_cilia_p50"], 2),
                     fmt(d["cilia"]["p99"]), fmt(d["iptables"]["p99"]),
                     fmt(d["over_no_policy_p50"]["cilia"], 2),
                     fmt(d["over_no_policy_p50"]["iptables"], 2)])
    return table(["allow rules (peers)", "cilia p50 µs", "iptables p50 µs", "iptables ÷ cilia",
                  "cilia p99 µs", "iptables p99 µs", "cilia ÷ no policy",
                  "iptables ÷ no policy"], rows)


def render_lab(lb: dict) -> str:
    if "error" in lb:
        return f"apply -> enforced: not measured ({lb['error']})"
    rows = []
    for kind in ("deny", "allow"):
        m = lb[f"{kind}_medians"]
        rows.append([kind, _ms(m["apply_wait_s"]), _ms(m["plain_apply_returned_s"]),
                     _ms(m["apply_to_all_enforced_s"])])
    return (table([f"{lb['nodes']}-node lab, policy change, median of {lb['runs']}",
                   "`cilia apply --wait` returns", "`cilia apply` returns",
                   "`cilia apply` → datapath verdict seen by both clients"], rows)
            + f"\n\ncontrol: `cilia apply` of the unchanged policy (CLI start + store round "
              f"trip, nothing to enforce): {_ms(lb['unchanged_apply_median_s'])}")


def render(res: dict) -> str:
    out = []
    if "engine" in res:
        out += [render_engine(res["engine"]), ""]
    if "data_plane" in res:
        dp = res["data_plane"]
        out += [f"new TCP connection (socket + connect + close), median over {dp['reps']} runs "
                f"of each run's percentile, {dp['conns']} connections per run "
                f"({dp['iptables']['backend']} iptables):", "", render_data(dp), ""]
    if "lab" in res:
        out += [render_lab(res["lab"])]
    return "\n".join(out)


if __name__ == "__main__":
    import argparse
    from bench.common import install_signal_handlers, machine, write_result
    ap = argparse.ArgumentParser(prog="python -m bench.policy")
    ap.add_argument("--parts", default="engine,dataplane,lab")
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--reps", type=int, default=None)
    a = ap.parse_args()
    install_signal_handlers()
    t = time.monotonic()
    lavg = os.getloadavg()
    r = run(quick=a.quick, reps=a.reps, parts=a.parts)
    r.update(machine=machine(), command="python -m bench.policy " + " ".join(sys.argv[1:]),
             quick=a.quick, wall_s=time.monotonic() - t, loadavg_before=list(lavg),
             loadavg_after=list(os.getloadavg()))
    print(render(r))
    # Only a full run replaces the result `python -m bench.run --only policy` writes.
    print(write_result("policy" if a.parts == "engine,dataplane,lab"
                       else "policy-" + a.parts.replace(",", "-"), r))

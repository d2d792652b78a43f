"""Service load balancing: cilia's BPF maps vs kube-proxy's iptables layout, side by side.

Control plane (no lab): program 10,000 ClusterIP services × 3 backends from scratch, then add
one more service while 10,000 exist.
  cilia: a child process in a scratch netns `<bench>-cp<run>` loads NodeDatapath with its own
         pin dir (/sys/fs/bpf/cilia/<bench>-cp<run>, fresh maps, nothing attached) and times
         NodeDatapath.upsert_services(10,000 LBService) (batched map writes, the agent's full
         resync) and then NodeDatapath.upsert_service(...) of the 10,001st. The LBService
         objects are built before the clock starts.
  kube-proxy: the nat table kube-proxy (iptables mode, --masquerade-all) writes for the same
         services, generated here, fed to `iptables-legacy-restore -w --noflush` (nft backend
         only if legacy is missing) in the same scratch netns: the full restore of 10,000, then
         adding one service the way kube-proxy's full sync does it (every chain it owns
         rewritten: a --noflush restore of all 10,001 services), and, as an extra row, the
         partial sync of kube-proxy >= 1.26 (KUBE-SERVICES rewritten in full, only the new
         service's chains declared). Each restore is a fresh iptables-restore process timed
         from exec to exit; the text is generated before the clock starts. A private
         XTABLES_LOCKFILE keeps other iptables users of the machine from holding the lock.
  Each measured `runs` times (fresh netns and pin dir per run); medians.

Data plane (1-node lab, native routing): a `cilia/echo` Deployment (1 replica, containerPort
8080) behind a ClusterIP Service (port 80) and an idle client pod, both on node1. The client is
a small Python loop in the client pod's netns making N sequential new TCP connections
(connect, send `GET /healthz HTTP/1.0`, read the response until the server closes, close with
SO_LINGER 0, so no TIME_WAIT on either side: see CLIENT) and timing each one; client and the
echo server process are pinned to CPU 0 (design.md §8). Three destinations:
  cilia:    the ClusterIP the operator allocated (10.96.x.x), translated by cilia's BPF LB on the
            client's lxc device; with 1k/10k services the other 999/9,999 are dummy services
            (10.98.x.x, 3 backends each) written straight into node1's LB maps through the
            datapath API (ServiceTable over the maps pinned under the agent's pin dir).
  iptables: a VIP from 10.97.x.x that cilia does not know, so cil_from_container passes the
            packet to node1's stack, where kube-proxy's nat layout (PREROUTING/OUTPUT ->
            KUBE-SERVICES, the target service the last service rule, behind 0/999/9,999 dummy
            services) DNATs it to the echo pod. Written with --masquerade-all: cilia delivers
            pod-to-pod packets with bpf_redirect_peer, so without SNAT the echo pod's replies
            would bypass node1's conntrack and never be un-DNATed (verified: the connection
            times out). The SNAT (to node1's eth0 address) brings the replies back through
            node1's stack. Same legacy/nft choice as above.
  direct:   the echo pod's IP and port 8080: the LB tax denominator.
The direct runs use client ports disjoint from the ClusterIP runs (see PORT_RANGES).
Per service count, `reps` runs per destination (order rotated each run), medians of each run's
p50 / mean / p99. The counts run one after the other (1, then 1k, then 10k), so drift in the
machine's load shows up across counts: the direct path, measured at every count, is the
control for that.
"""
from __future__ import annotations

import base64
import contextlib
import hashlib
import json
import os
import shutil
import subprocess
import sys
import time

from bench.common import (ROOT, BenchError, fmt, in_netns, lab, list_netns, log, median,
                          no_interrupts, sh, summary, table, unique_name)
from bench.samenode import CPU

CP_SERVICES = 10_000
BACKENDS = 3
COUNTS = (1, 1_000, 10_000)
PATHS = ("cilia", "iptables", "direct")
SVC_PORT, TARGET_PORT = 80, 8080
CLUSTER_CIDR = "10.244.0.0/16"
IPT_TARGET_VIP = "10.97.255.254"       # the target service in the iptables layout
IPT_SEP_NAME = "bench/echo:tcp"
DUMMY_REVNAT0 = 40_000                 # far above what the lab's agent allocates (from 1)
DUMMY_BACKEND0 = 1_000_000             # the agent's backend ids stop at 65535
REQUEST = b"GET /healthz HTTP/1.0\r\n\r\n"  # cilia/echo answers "ok" and closes
REPLY_BODY = b"ok"

MANIFEST = f"""apiVersion: v1
kind: Service
metadata: {{name: echo}}
spec:
  type: ClusterIP
  selector: {{app: echo}}
  ports:
  - {{name: tcp, port: {SVC_PORT}, targetPort: {TARGET_PORT}, protocol: TCP}}
---
apiVersion: apps/v1
kind: Deployment
metadata: {{name: echo}}
spec:
  replicas: 1
  selector: {{matchLabels: {{app: echo}}}}
  template:
    metadata: {{labels: {{app: echo}}}}
    spec:
      nodeName: node1
      containers:
      - name: echo
        image: cilia/echo
        ports: [{{containerPort: {TARGET_PORT}}}]
---
apiVersion: v1
kind: Pod
metadata: {{name: cli, labels: {{app: cli}}}}
spec:
  nodeName: node1
  containers:
  - {{name: idle, image: busybox}}
"""

# argv: host port n warmup "lo hi" (the netns's ephemeral port range for this run). One HTTP/1.0
# request per connection; the server answers and closes, then the client closes with SO_LINGER
# 0 (an RST): no TIME_WAIT on either side. With TIME_WAIT on the server, the iptables path's
# SNAT (--random-fully, one node address) now and then picks a source port whose 4-tuple the
# echo pod still holds in TIME_WAIT, and the SYN, with another connection's timestamps, is
# refused until a retransmission 1 s later (seen here: mean 3-4x the p50, connect timeouts).
# Prints {"us": [...]} (one float per measured connection).
CLIENT = r"""
import json, socket, struct, sys, time
host, port, n, warm = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
with open("/proc/sys/net/ipv4/ip_local_port_range", "w") as f:  # this netns only
    f.write(sys.argv[5])
req, want = %r, %r
pc = time.perf_counter_ns
out = []
for i in range(warm + n):
    t0 = pc()
    s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    s.settimeout(10)
    s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    s.connect((host, port))
    s.sendall(req)
    got = b""
    while True:
        d = s.recv(4096)
        if not d:
            break
        got += d
    s.close()
    t1 = pc()
    if not (got.startswith(b"HTTP/1.") and got.endswith(want)):
        sys.exit(f"connection {i} to {host}:{port}: got {got!r}")
    if i >= warm:
        out.append((t1 - t0) / 1000.0)
print(json.dumps({"us": out}))
""" % (REQUEST, REPLY_BODY)


# --- address plans ------------------------------------------------------------------------

def _ip(prefix: str, i: int) -> str:
    return f"{prefix}.{(i >> 8) & 255}.{i & 255}"


def dummy_backend_ip(k: int) -> str:
    return _ip("10.245", k)  # inside the cluster CIDR, never reached


def _hash_chain(prefix: str, s: str) -> str:
    # kube-proxy: prefix + first 16 characters of base32(sha256(...)).
    return prefix + base64.b32encode(hashlib.sha256(s.encode()).digest()).decode()[:16]


# --- kube-proxy's nat table -------------------------------------------------------------------

IPT_BASE_CHAINS = ("KUBE-SERVICES", "KUBE-NODEPORTS", "KUBE-POSTROUTING", "KUBE-MARK-MASQ")
IPT_BASE_RULES = [
    "-A KUBE-POSTROUTING -m mark ! --mark 0x4000/0x4000 -j RETURN",
    "-A KUBE-POSTROUTING -j MARK --xor-mark 0x4000",
    '-A KUBE-POSTROUTING -m comment --comment "kubernetes service traffic requiring SNAT" '
    "-j MASQUERADE --random-fully",
    "-A KUBE-MARK-MASQ -j MARK --or-mark 0x4000",
]
IPT_NODEPORTS_RULE = ('-A KUBE-SERVICES -m comment --comment "kubernetes service nodeports; NOTE: '
                      'this must be the last rule in this chain" -m addrtype --dst-type LOCAL '
                      "-j KUBE-NODEPORTS")
# kube-proxy inserts these with `iptables -I/-A` (EnsureRule), outside its restores.
IPT_JUMPS = [
    ("PREROUTING", "-m comment --comment \"kubernetes service portals\" -j KUBE-SERVICES"),
    ("OUTPUT", "-m comment --comment \"kubernetes service portals\" -j KUBE-SERVICES"),
    ("POSTROUTING", "-m comment --comment \"kubernetes postrouting rules\" -j KUBE-POSTROUTING"),
]


class IptService:
    def __init__(self, name: str, vip: str, port: int, backends: list[tuple[str, int]]):
        self.name, self.vip, self.port, self.backends = name, vip, port, backends
        self.svc_chain = _hash_chain("KUBE-SVC-", name)
        self.sep_chains = [_hash_chain("KUBE-SEP-", f"{name}{ip}:{p}") for ip, p in backends]

    def chains(self) -> list[str]:
        return [self.svc_chain, *self.sep_chains]

    def services_rule(self) -> str:
        return (f'-A KUBE-SERVICES -m comment --comment "{self.name} cluster IP" -m tcp -p tcp '
                f"-d {self.vip}/32 --dport {self.port} -j {self.svc_chain}")

    def chain_rules(self) -> list[str]:
        c = f'-m comment --comment "{self.name} cluster IP"'
        out = [f"-A {self.svc_chain} {c} -m tcp -p tcp -d {self.vip}/32 --dport {self.port} "
               "-j KUBE-MARK-MASQ"]  # --masquerade-all
        n = len(self.backends)
        for j, ((ip, port), sep) in enumerate(zip(self.backends, self.sep_chains)):
            prob = (f" -m statistic --mode random --probability {1.0 / (n - j):.10f}"
                    if j < n - 1 else "")
            out.append(f'-A {self.svc_chain} -m comment --comment "{self.name} -> {ip}:{port}"'
                       f"{prob} -j {sep}")
        for (ip, port), sep in zip(self.backends, self.sep_chains):
            out.append(f"-A {sep} -m comment --comment {self.name} -s {ip}/32 -j KUBE-MARK-MASQ")
            out.append(f"-A {sep} -m comment --comment {self.name} -m tcp -p tcp "
                       f"-j DNAT --to-destination {ip}:{port}")
        return out


def ipt_dummy(i: int) -> IptService:
    return IptService(f"bench/svc{i}:tcp", _ip("10.97", i), SVC_PORT,
                      [(dummy_backend_ip(BACKENDS * i + j), TARGET_PORT) for j in range(BACKENDS)])


def ipt_full_sync(services: list[IptService]) -> str:
    """The nat part of a kube-proxy full sync: every chain it owns declared (so flushed) and
    rewritten; KUBE-SERVICES in service order, the nodeports jump last."""
    decl = [f":{c} - [0:0]" for c in IPT_BASE_CHAINS]
    rules = list(IPT_BASE_RULES)
    for s in services:
        decl += [f":{c} - [0:0]" for c in s.chains()]
        rules.append(s.services_rule())
        rules += s.chain_rules()
    rules.append(IPT_NODEPORTS_RULE)
    return "\n".join(["*nat", *decl, *rules, "COMMIT", ""])


def ipt_partial_sync(services: list[IptService], changed: list[IptService]) -> str:
    """kube-proxy >= 1.26 (MinimizeIPTablesRestore): KUBE-SERVICES and the other top-level
    chains rewritten in full, only changed services' chains declared and written."""
    decl = [f":{c} - [0:0]" for c in IPT_BASE_CHAINS]
    rules = list(IPT_BASE_RULES)
    for s in services:
        rules.append(s.services_rule())
    for s in changed:
        decl += [f":{c} - [0:0]" for c in s.chains()]
        rules += s.chain_rules()
    rules.append(IPT_NODEPORTS_RULE)
    return "\n".join(["*nat", *decl, *rules, "COMMIT", ""])


def iptables_tools() -> dict:
    legacy = shutil.which("iptables-legacy-restore")
    nft = shutil.which("iptables-nft-restore")
    if legacy:
        return {"backend": "legacy", "restore": legacy, "iptables": shutil.which("iptables-legacy"),
                "save": shutil.which("iptables-legacy-save")}
    if nft:
        return {"backend": "nft", "restore": nft, "iptables": shutil.which("iptables-nft"),
                "save": shutil.which("iptables-nft-save")}
    raise BenchError("neither iptables-legacy-restore nor iptables-nft-restore is installed")


class Iptables:
    def __init__(self, ns: str, tools: dict, lockfile: str):
        self.ns, self.tools = ns, tools
        self.env = {**os.environ, "XTABLES_LOCKFILE": lockfile}

    def restore(self, text: str, timeout: float = 300) -> float:
        t = time.perf_counter()
        p = subprocess.run(in_netns(self.ns, [self.tools["restore"], "-w", "--noflush"]),
                           input=text, capture_output=True, text=True, timeout=timeout,
                           env=self.env)
        dt = time.perf_counter() - t
        if p.returncode != 0:
            raise BenchError(f"{self.tools['restore']} in {self.ns}: rc {p.returncode}\n"
                             f"{p.stderr[-2000:]}")
        return dt

    def ipt(self, *args: str) -> str:
        return sh(*in_netns(self.ns, [self.tools["iptables"], "-w", *args]), env=self.env).stdout

    def save_nat(self) -> str:
        return sh(*in_netns(self.ns, [self.tools["save"], "-t", "nat"]), env=self.env,
                  timeout=120).stdout

    def install_jumps(self) -> None:
        """kube-proxy's chains and the jumps into them from the built-in chains (which a
        --noflush restore appends to without flushing)."""
        self.restore("\n".join(["*nat", *(f":{c} - [0:0]" for c in IPT_BASE_CHAINS),
                                 *(f"-A {chain} {rule}" for chain, rule in IPT_JUMPS),
                                 "COMMIT", ""]))


def ipt_counts(save: str) -> dict:
    lines = save.splitlines()
    return {"KUBE-SERVICES rules": sum(l.startswith("-A KUBE-SERVICES ") for l in lines),
            "rules": sum(l.startswith("-A ") for l in lines),
            "chains": sum(l.startswith(":") for l in lines)}


# --- cilia's LB maps ----------------------------------------------------------------------------

def cilia_dummies(lo: int, hi: int):
    from cilia.datapath.lb import LBBackend, LBService
    out = []
    for i in range(lo, hi):
        out.append(LBService(DUMMY_REVNAT0 + i, _ip("10.98", i), SVC_PORT, 6,
                             [LBBackend(DUMMY_BACKEND0 + BACKENDS * i + j,
                                        dummy_backend_ip(BACKENDS * i + j), TARGET_PORT)
                              for j in range(BACKENDS)]))
    return out


def _cp_child(argv: list[str]) -> None:
    """Runs in the scratch netns (python -c): fresh pin dir, load, time the writes, print JSON,
    remove the pins."""
    from cilia.datapath.node import NodeConfig, NodeDatapath
    pin, n = argv[0], int(argv[1])
    svcs = cilia_dummies(0, n)
    one = cilia_dummies(n, n + 1)[0]
    cfg = NodeConfig(node_ip4="192.168.90.11", router_ip4="10.244.1.1", pod_cidr4="10.244.1.0/24",
                     cluster_cidr4=CLUSTER_CIDR)
    if os.path.exists(pin):
        raise SystemExit(f"{pin} exists")
    dp = NodeDatapath(pin, cfg)
    try:
        t = time.perf_counter()
        dp.load()
        load_s = time.perf_counter() - t
        t = time.perf_counter()
        dp.upsert_services(svcs)
        full_s = time.perf_counter() - t
        t = time.perf_counter()
        dp.upsert_service(one.rev_nat_index, one.address, one.port, one.proto, one.backends)
        one_s = time.perf_counter() - t
        t = time.perf_counter()
        listed = dp.services()
        dump_s = time.perf_counter() - t
        nb = len(dp.lb_backends())
    finally:
        dp.close()
        NodeDatapath.remove_pins(pin)
    print(json.dumps({"load_s": load_s, "full_s": full_s, "add_one_s": one_s, "dump_s": dump_s,
                      "services_in_map": len(listed), "backends_in_map": nb}))


def control_plane(name: str, runs: int, tools: dict, lockfile: str) -> dict:
    from cilia.datapath.node import PIN_BASE
    dummies = [ipt_dummy(i) for i in range(CP_SERVICES + 2)]
    text_full = ipt_full_sync(dummies[:CP_SERVICES])
    text_add_full = ipt_full_sync(dummies[:CP_SERVICES + 1])
    text_add_partial = ipt_partial_sync(dummies[:CP_SERVICES + 2], dummies[CP_SERVICES + 1:])
    samples: dict[str, list[float]] = {k: [] for k in (
        "cilia_full_s", "cilia_add_one_s", "cilia_load_s", "ipt_full_s", "ipt_add_one_full_s",
        "ipt_add_one_partial_s")}
    checks: list[dict] = []
    for r in range(runs):
        ns = f"{name}-cp{r}"
        pin = os.path.join(PIN_BASE, f"{name}-cp{r}")
        sh("ip", "netns", "add", ns)
        try:
            p = sh(*in_netns(ns, [sys.executable, "-c",
                                  f"import sys; sys.path.insert(0, {ROOT!r}); "
                                  "from bench.services import _cp_child; _cp_child(sys.argv[1:])",
                                  pin, str(CP_SERVICES)]), timeout=300)
            c = json.loads(p.stdout.strip().splitlines()[-1])
            if c["services_in_map"] != CP_SERVICES + 1 or \
                    c["backends_in_map"] != BACKENDS * (CP_SERVICES + 1):
                raise BenchError(f"cilia maps hold {c['services_in_map']} services, "
                                 f"{c['backends_in_map']} backends")
            samples["cilia_full_s"].append(c["full_s"])
            samples["cilia_add_one_s"].append(c["add_one_s"])
            samples["cilia_load_s"].append(c["load_s"])
            ipt = Iptables(ns, tools, lockfile)
            samples["ipt_full_s"].append(ipt.restore(text_full))
            after_full = ipt_counts(ipt.save_nat()) if r == 0 else None
            samples["ipt_add_one_full_s"].append(ipt.restore(text_add_full))
            samples["ipt_add_one_partial_s"].append(ipt.restore(text_add_partial))
            got = ipt_counts(ipt.save_nat())
            if got["KUBE-SERVICES rules"] != CP_SERVICES + 3:  # + the nodeports jump
                raise BenchError(f"iptables nat table after the restores: {got}")
            if r == 0:
                checks.append({"cilia": c, "iptables_after_full": after_full,
                               "iptables_after_adds": got})
            log(f"control plane run {r + 1}/{runs}: cilia full {c['full_s']:.3f} s, one "
                f"{c['add_one_s'] * 1e3:.2f} ms; iptables full {samples['ipt_full_s'][-1]:.2f} s, "
                f"+1 full {samples['ipt_add_one_full_s'][-1]:.2f} s, +1 partial "
                f"{samples['ipt_add_one_partial_s'][-1]:.2f} s")
        finally:
            with no_interrupts():
                subprocess.run(["ip", "netns", "del", ns], capture_output=True, timeout=30)
                if os.path.isdir(pin):
                    from cilia.datapath.node import NodeDatapath
                    NodeDatapath.remove_pins(pin)
    med = {k: median(v) for k, v in samples.items()}
    ratios = {"full": med["ipt_full_s"] / med["cilia_full_s"],
              "add_one_full": med["ipt_add_one_full_s"] / med["cilia_add_one_s"],
              "add_one_partial": med["ipt_add_one_partial_s"] / med["cilia_add_one_s"]}
    return {"services": CP_SERVICES, "backends_per_service": BACKENDS, "runs": runs,
            "restore_bytes": {"full": len(text_full), "add_one_full": len(text_add_full),
                              "add_one_partial": len(text_add_partial)},
            "samples": samples, "medians": med, "ratios": ratios, "checks": checks}


# --- data plane ---------------------------------------------------------------------------------

class LabLB:
    """node1's LB maps, opened from the agent's pins (no programs loaded)."""

    def __init__(self, pin: str):
        from cilia.datapath.lb import MAGLEV_DEFAULT_M, MAP_TYPES, ServiceTable
        from cilia.datapath.maps import open_pinned
        self._maps: dict = {}

        def get(m: str):
            if m not in self._maps:
                self._maps[m] = open_pinned(os.path.join(pin, m), *MAP_TYPES[m])
            return self._maps[m]
        self.table = ServiceTable(get, MAGLEV_DEFAULT_M)

    def close(self) -> None:
        for m in self._maps.values():
            with contextlib.suppress(Exception):
                m.close()
        self._maps.clear()


# Client source ports per destination. cilia's LB keeps the reply CT entry of a balanced
# flow (backend:port -> client:port, with the service's rev-NAT index) after the connection
# closes, so a later *direct* connection from the same client port to the same backend gets
# its SYN-ACK rewritten to come from the ClusterIP and never connects (seen here: connect()
# timeouts). Disjoint ephemeral ranges keep the direct runs clear of those entries.
PORT_RANGES = {"cilia": "10000 32767", "iptables": "10000 32767", "direct": "32768 60999"}


def client_run(ns: str, host: str, port: int, n: int, warm: int, ports: str) -> list[float]:
    p = sh(*in_netns(ns, [sys.executable, "-c", CLIENT, host, str(port), str(n), str(warm),
                          ports], cpu=CPU), timeout=60 + n * 0.05)
    return json.loads(p.stdout)["us"]


def pin_pod(ns: str) -> list[int]:
    pids = [int(x) for x in sh("ip", "netns", "pids", ns).stdout.split()]
    if not pids:
        raise BenchError(f"no processes in {ns}")
    for pid in pids:
        sh("taskset", "-a", "-p", "-c", str(CPU), str(pid))
    return pids


def data_plane(name: str, reps: int, conns: int, warm: int, tools: dict, lockfile: str) -> dict:
    from cilia import paths
    res: dict = {"lab": name, "routing": "native", "reps": reps, "conns": conns, "warmup": warm,
                 "cpu_pin": CPU, "counts": list(COUNTS)}
    samples: dict = {str(c): {p: [] for p in PATHS} for c in COUNTS}
    with lab(name, nodes=1, routing="native") as lb:
        lb.cilia("apply", "-f", "-", input=MANIFEST)
        lb.cilia("wait", "--for=condition=Ready", "pods", "--all", "--timeout", "120s",
                 timeout=150)
        pods = lb.pods()
        echo = next(p for n, p in pods.items() if n.startswith("echo-"))
        echo_ns, cli_ns = lb.pod_netns(echo["metadata"]["name"]), lb.pod_netns("cli")
        echo_ip = echo["status"]["podIP"]
        svc = json.loads(lb.cilia("get", "svc", "echo", "-o", "json").stdout)
        vip = svc["spec"]["clusterIP"]
        node = lb.node_netns("node1")
        res.update(echo_ip=echo_ip, cluster_ip=vip, iptables_vip=IPT_TARGET_VIP,
                   client_ip=pods["cli"]["status"]["podIP"])
        res["pinned_pids"] = {"echo": pin_pod(echo_ns)}
        dests = {"cilia": (vip, SVC_PORT), "iptables": (IPT_TARGET_VIP, SVC_PORT),
                 "direct": (echo_ip, TARGET_PORT)}
        target = IptService(IPT_SEP_NAME, IPT_TARGET_VIP, SVC_PORT, [(echo_ip, TARGET_PORT)])
        ipt = Iptables(node, tools, lockfile)
        pre = ipt_counts(ipt.save_nat())
        if pre["rules"]:
            raise BenchError(f"{node} already has {tools['backend']} nat rules: {pre}")
        ipt.install_jumps()
        labmaps = LabLB(paths.pin_dir(name, "node1"))
        try:
            # The agent has programmed the Service (its VIP is in node1's LB map).
            deadline = time.monotonic() + 30
            while not any(s.get("address") == vip for s in labmaps.table.services()):
                if time.monotonic() > deadline:
                    raise BenchError(f"ClusterIP {vip} not in node1's LB map")
                time.sleep(0.2)
            agent_svcs = len(labmaps.table.services())
            res["agent_services_in_map"] = agent_svcs
            have = 0
            res["setup"] = {}
            for count in COUNTS:
                t = time.perf_counter()
                labmaps.table.upsert_services(cilia_dummies(have, count - 1))
                cilia_s = time.perf_counter() - t
                have = max(have, count - 1)
                in_map = len(labmaps.table.services())
                dummies = [ipt_dummy(i) for i in range(count - 1)]
                ipt_s = ipt.restore(ipt_full_sync(dummies + [target]))
                got = ipt.save_nat()
                svc_rules = [l for l in got.splitlines() if l.startswith("-A KUBE-SERVICES ")]
                if len(svc_rules) != count + 1 or IPT_TARGET_VIP not in svc_rules[-2]:
                    raise BenchError(f"KUBE-SERVICES: {len(svc_rules)} rules, last service rule "
                                     f"{svc_rules[-2] if len(svc_rules) > 1 else None}")
                res["setup"][str(count)] = {"cilia_services_in_map": in_map,
                                            "cilia_write_s": cilia_s, "iptables_restore_s": ipt_s,
                                            "iptables": ipt_counts(got)}
                log(f"{count} services: {in_map} in cilia's map ({cilia_s:.2f} s), "
                    f"{len(svc_rules) - 1} in KUBE-SERVICES ({ipt_s:.2f} s)")
                # Each destination works, and the iptables one really went through iptables.
                before = _dnat_packets(ipt, target)
                for path, (host, port) in dests.items():
                    client_run(cli_ns, host, port, 3, 0, PORT_RANGES[path])
                if _dnat_packets(ipt, target) - before < 3:
                    raise BenchError("the iptables VIP's DNAT rule did not count the connections")
                for rep in range(reps):
                    k = rep % len(PATHS)
                    for path in PATHS[k:] + PATHS[:k]:
                        us = client_run(cli_ns, *dests[path], conns, warm, PORT_RANGES[path])
                        s = summary(us)
                        s["over_900ms"] = sum(u > 900_000 for u in us)  # SYN retransmissions
                        samples[str(count)][path].append(s)
                        log(f"{count:>6} svc rep {rep + 1}/{reps} {path:8s} p50 {s['p50']:.1f} "
                            f"mean {s['mean']:.1f} p99 {s['p99']:.1f} µs, "
                            f"{s['over_900ms']} over 0.9 s")
        finally:
            labmaps.close()
    res["samples"] = samples
    med: dict = {}
    for c in map(str, COUNTS):
        med[c] = {p: {k: median([s[k] for s in samples[c][p]]) for k in ("p50", "mean", "p90",
                                                                           "p99")}
                  for p in PATHS}
        d = med[c]
        med[c]["ratio"] = {
            "cilia_over_direct": d["cilia"]["p50"] / d["direct"]["p50"],
            "iptables_over_direct": d["iptables"]["p50"] / d["direct"]["p50"],
            "iptables_over_cilia": d["iptables"]["p50"] / d["cilia"]["p50"]}
    first, last = str(COUNTS[0]), str(COUNTS[-1])
    med["flatness"] = {p: med[last][p]["p50"] / med[first][p]["p50"] for p in PATHS}
    res["medians"] = med
    return res


def _dnat_packets(ipt: Iptables, target: IptService) -> int:
    out = ipt.ipt("-t", "nat", "-L", target.sep_chains[0], "-v", "-n", "-x")
    for line in out.splitlines():
        if "DNAT" in line:
            return int(line.split()[0])
    raise BenchError(f"no DNAT rule in {target.sep_chains[0]}:\n{out}")


# --- entry points ---------------------------------------------------------------------------------

def run(quick: bool = False, reps: int | None = None) -> dict:
    name = unique_name()
    tools = iptables_tools()
    ver = sh(tools["iptables"], "--version", check=False).stdout.strip()
    lockfile = f"/tmp/{name}.xtables.lock"
    cp_runs = 2 if quick else 3
    dp_reps = reps or (2 if quick else 7)
    conns = 1000 if quick else 2000
    res: dict = {"benchmark": "services", "name": name,
                 "iptables": {"backend": tools["backend"], "version": ver,
                              "restore": os.path.basename(tools["restore"]),
                              "layout": "kube-proxy iptables mode, --masquerade-all, nat table"}}
    try:
        log(f"control plane: {CP_SERVICES} services x {BACKENDS} backends, {cp_runs} runs")
        res["control_plane"] = control_plane(name, cp_runs, tools, lockfile)
        res["data_plane"] = data_plane(name, dp_reps, conns, 200 if not quick else 100, tools,
                                       lockfile)
    finally:
        with no_interrupts():
            for ns in list_netns():
                if ns.startswith(f"{name}-"):
                    subprocess.run(["ip", "netns", "del", ns], capture_output=True, timeout=30)
            with contextlib.suppress(FileNotFoundError):
                os.unlink(lockfile)
    return res


def _ms(s: float) -> str:
    return f"{s * 1e3:.2f} ms" if s < 1 else f"{s:.2f} s"


def render_control(cp: dict, backend: str) -> str:
    m, r = cp["medians"], cp["ratios"]
    n = f"{cp['services']:,}"
    rows = [[f"program {n} services (fresh maps / empty table)", _ms(m["cilia_full_s"]),
             _ms(m["ipt_full_s"]), f"{r['full']:.1f}×"],
            [f"add 1 service when {n} exist (kube-proxy: full sync, restore of "
             f"{cp['services'] + 1:,})", _ms(m["cilia_add_one_s"]), _ms(m["ipt_add_one_full_s"]),
             f"{r['add_one_full']:,.0f}×"],
            ["add 1 service, kube-proxy ≥ 1.26 partial sync (KUBE-SERVICES + new chains)",
             _ms(m["cilia_add_one_s"]), _ms(m["ipt_add_one_partial_s"]),
             f"{r['add_one_partial']:,.0f}×"]]
    return table([f"{n} services × {cp['backends_per_service']} backends, median of "
                  f"{cp['runs']}", "cilia BPF maps", f"iptables-restore ({backend})",
                  "iptables ÷ cilia"], rows)


def render_data(dp: dict) -> str:
    rows = []
    for c in dp["counts"]:
        d = dp["medians"][str(c)]
        rows.append([f"{c:,}", fmt(d["direct"]["p50"]), fmt(d["cilia"]["p50"]),
                     fmt(d["iptables"]["p50"]), fmt(d["ratio"]["cilia_over_direct"], 2),
                     fmt(d["ratio"]["iptables_over_direct"], 2),
                     fmt(d["ratio"]["iptables_over_cilia"], 2), fmt(d["cilia"]["p99"]),
                     fmt(d["iptables"]["p99"])])
    return table(["services", "direct pod p50 µs", "cilia p50 µs", "iptables p50 µs",
                  "cilia ÷ direct", "iptables ÷ direct", "iptables ÷ cilia", "cilia p99 µs",
                  "iptables p99 µs"], rows)


def render(res: dict) -> str:
    out = [render_control(res["control_plane"], res["iptables"]["backend"]), ""]
    dp = res["data_plane"]
    f = dp["medians"]["flatness"]
    out += [f"new connection (connect + HTTP/1.0 GET + response + close), median over {dp['reps']} runs of "
            f"each run's percentile, {dp['conns']} connections per run:", "",
            render_data(dp), "",
            f"{dp['counts'][-1]:,} ÷ {dp['counts'][0]:,} services (p50): cilia "
            f"{f['cilia']:.2f}, iptables {f['iptables']:.2f}, direct {f['direct']:.2f}"]
    return "\n".join(out)

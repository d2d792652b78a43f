"""`cilia install` / `cilia uninstall` on a host, with a network namespace standing in for it.

The stand-in host has an uplink (a veth to a second netns acting as its router) and a default
route; everything the install writes goes to tmp dirs, the daemons run in the stand-in netns
(--netns). Pods are added by exec'ing the installed plugin binary the way a runtime does (CNI
env vars + netconf on stdin). After uninstall the stand-in host must be exactly as before:
links, addresses, routes, qdiscs and sysctls (ip -j / tc -j), no pins, no files, no processes.
"""
from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
import uuid

import pytest

from cilia.procs import ProcRef
from tests.e2e.conftest import CILIA

pytestmark = pytest.mark.root

SYSCTLS = ("net.ipv4.ip_forward", "net.ipv4.conf.all.rp_filter", "net.ipv4.conf.default.rp_filter")


def sh(*argv: str, check: bool = True, input: str | None = None, env: dict | None = None,
       timeout: float = 60) -> subprocess.CompletedProcess:
    p = subprocess.run(list(argv), capture_output=True, text=True, input=input, env=env,
                       timeout=timeout)
    if check and p.returncode != 0:
        raise AssertionError(f"{' '.join(argv)} -> {p.returncode}\n{p.stdout}\n{p.stderr}")
    return p


def in_ns(ns: str, *argv: str, **kw) -> subprocess.CompletedProcess:
    return sh("nsenter", f"--net=/run/netns/{ns}", "--", *argv, **kw)


class StandInHost:
    """A netns with eth0 (192.168.<x>.2/24) towards a router netns, default route via it."""

    def __init__(self, root: str):
        self.prefix = "ci" + uuid.uuid4().hex[:6]
        self.ns = f"{self.prefix}-host"
        self.router = f"{self.prefix}-rtr"
        self.cluster = self.prefix
        self.node = "h1"
        self.dirs = {k: os.path.join(root, k) for k in ("state", "run", "bin", "net.d")}
        self.env = {**os.environ, "CILIA_STATE_DIR": self.dirs["state"]}
        self.env.pop("CILIA_LAB", None)
        self.pod_netns: list[str] = []
        self.net = f"192.168.{int(self.prefix[2:4], 16) % 200 + 20}"

    def create(self) -> None:
        sh("ip", "netns", "add", self.ns)
        sh("ip", "netns", "add", self.router)
        a, b = f"{self.prefix}a", f"{self.prefix}b"
        sh("ip", "link", "add", a, "type", "veth", "peer", "name", b)
        sh("ip", "link", "set", a, "netns", self.ns)
        sh("ip", "link", "set", b, "netns", self.router)
        sh("ip", "-n", self.ns, "link", "set", a, "name", "eth0")
        sh("ip", "-n", self.ns, "addr", "add", f"{self.net}.2/24", "dev", "eth0")
        sh("ip", "-n", self.ns, "link", "set", "eth0", "up")
        sh("ip", "-n", self.ns, "link", "set", "lo", "up")
        sh("ip", "-n", self.router, "addr", "add", f"{self.net}.1/24", "dev", b)
        sh("ip", "-n", self.router, "link", "set", b, "up")
        sh("ip", "-n", self.ns, "route", "add", "default", "via", f"{self.net}.1")
        # IPv6 link-local DAD would otherwise still be settling in the "before" snapshot.
        deadline = time.monotonic() + 10
        while sh("ip", "-n", self.ns, "-6", "addr", "show", "tentative").stdout.strip():
            assert time.monotonic() < deadline, "IPv6 DAD did not finish"
            time.sleep(0.1)

    def cilia(self, *args: str, check: bool = True, timeout: float = 120, input: str | None = None):
        return sh(CILIA, *args, check=check, env=self.env, timeout=timeout, input=input)

    def install(self, *extra: str, check: bool = True):
        return self.cilia("install", "--netns", self.ns, "--cluster", self.cluster,
                          "--node", self.node, "--state-dir", self.dirs["state"],
                          "--run-dir", self.dirs["run"], "--cni-bin-dir", self.dirs["bin"],
                          "--cni-conf-dir", self.dirs["net.d"], *extra, check=check)

    def snapshot(self) -> dict:
        """What uninstall must give back, as the kernel reports it."""
        return {
            "links": json.loads(sh("ip", "-n", self.ns, "-j", "-d", "link", "show").stdout),
            "addrs": json.loads(sh("ip", "-n", self.ns, "-j", "addr", "show").stdout),
            "routes": json.loads(sh("ip", "-n", self.ns, "-j", "route", "show", "table", "all").stdout),
            # Learned entries come and go with traffic; permanent ones are someone's config.
            "neigh": [n for n in json.loads(sh("ip", "-n", self.ns, "-j", "neigh", "show").stdout)
                      if "PERMANENT" in n.get("state", [])],
            "qdiscs": json.loads(sh("tc", "-n", self.ns, "-j", "qdisc", "show").stdout),
            "filters": sh("tc", "-n", self.ns, "filter", "show", "dev", "eth0", "ingress").stdout
            + sh("tc", "-n", self.ns, "filter", "show", "dev", "eth0", "egress").stdout,
            "sysctls": in_ns(self.ns, "sysctl", *SYSCTLS).stdout,
        }

    @property
    def pins(self) -> str:
        return f"/sys/fs/bpf/cilia/{self.cluster}"

    # --- a runtime's view: the installed plugin binary -------------------------------------------
    def netconf(self) -> dict:
        with open(os.path.join(self.dirs["net.d"], "05-cilia.conflist")) as f:
            conf = json.load(f)
        return dict(conf["plugins"][0], cniVersion=conf["cniVersion"], name=conf["name"])

    def cni(self, command: str, pod: str, check: bool = True,
            args: str | None = None) -> subprocess.CompletedProcess:
        env = {"PATH": "/usr/sbin:/usr/bin:/sbin:/bin", "CNI_COMMAND": command,
               "CNI_CONTAINERID": f"{self.prefix}-{pod}", "CNI_NETNS": f"/run/netns/{self.prefix}-{pod}",
               "CNI_IFNAME": "eth0", "CNI_PATH": self.dirs["bin"],
               "CNI_ARGS": f"K8S_POD_NAMESPACE=default;K8S_POD_NAME={pod}" if args is None else args}
        return sh(os.path.join(self.dirs["bin"], "cilia-cni"), input=json.dumps(self.netconf()),
                  env=env, check=check)

    def add_pod(self, pod: str, args: str | None = None) -> dict:
        ns = f"{self.prefix}-{pod}"
        sh("ip", "netns", "add", ns)
        self.pod_netns.append(ns)
        return json.loads(self.cni("ADD", pod, args=args).stdout)

    def pids(self) -> dict[str, ProcRef]:
        out = {}
        for what in ("supervisor", "agent", "operator"):
            try:
                with open(os.path.join(self.dirs["run"], f"{what}.pid")) as f:
                    out[what] = ProcRef.from_json(json.load(f))
            except FileNotFoundError:
                pass
        return out

    def healthy(self) -> bool:
        from cilia.api.client import AgentClient
        try:
            return AgentClient(os.path.join(self.dirs["run"], "agent.sock"),
                               timeout=2).get("/v1/healthz").get("status") == "ok"
        except Exception:
            return False

    def destroy(self) -> None:
        """Last resort after a failed test: uninstall from the record, then our netns."""
        if os.path.exists(os.path.join(self.dirs["state"], "install.json")):
            self.cilia("uninstall", check=False)
        for ns in self.pod_netns + [self.ns, self.router]:
            sh("ip", "netns", "del", ns, check=False)
        if os.path.isdir(self.pins):
            shutil.rmtree(self.pins, ignore_errors=True)


@pytest.fixture
def host(tmp_path):
    h = StandInHost(str(tmp_path))
    try:
        h.create()
        yield h
    finally:
        h.destroy()


def assert_same_host(before: dict, after: dict) -> None:
    for k in before:
        if before[k] != after[k]:
            gone = [x for x in before[k] if x not in after[k]] if isinstance(before[k], list) else before[k]
            new = [x for x in after[k] if x not in before[k]] if isinstance(after[k], list) else after[k]
            raise AssertionError(f"{k} differ after uninstall: before only {gone}; after only {new}")


ECHO_SERVER = """
import socket, sys
s = socket.socket(); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind(("0.0.0.0", 8080)); s.listen(); print("listening", flush=True)
c, _ = s.accept(); c.sendall(c.recv(100)); c.close()
"""


def tcp_echo(client_ns: str, server_ns: str, server_ip: str, timeout: float = 5) -> str:
    """One TCP round trip from client_ns to a one-shot echo server in server_ns; the
    client's reply ('' when the connection failed)."""
    srv = subprocess.Popen(["nsenter", f"--net=/run/netns/{server_ns}", "--", sys.executable,
                            "-c", ECHO_SERVER], stdout=subprocess.PIPE, text=True)
    try:
        assert srv.stdout.readline().strip() == "listening"
        r = in_ns(client_ns, "nc", "-w", str(int(timeout)), "-N", server_ip, "8080",
                  input="hello\n", check=False, timeout=timeout + 5)
        return r.stdout.strip()
    finally:
        srv.kill()
        srv.wait()


def pod_addr(result: dict) -> str:
    return result["ips"][0]["address"].split("/")[0]


@pytest.mark.parametrize("routing", ["tunnel", "native"])
def test_install_pods_uninstall_leaves_host_as_it_was(host, routing):
    before = host.snapshot()
    # native: also an explicit pod CIDR (no operator allocation) and no VXLAN device.
    extra = ["--routing", "native", "--pod-cidr", "10.250.3.0/24"] if routing == "native" else []
    r = host.install(*extra)
    assert "agent healthy" in r.stdout
    assert host.healthy()
    # Files a runtime needs, where it looks for them.
    conflist = json.load(open(os.path.join(host.dirs["net.d"], "05-cilia.conflist")))
    assert conflist["cniVersion"] == "1.0.0" and conflist["name"] == "cilia"
    assert conflist["plugins"][0]["type"] == "cilia-cni"
    assert conflist["plugins"][0]["agent-socket"] == os.path.join(host.dirs["run"], "agent.sock")
    assert os.access(os.path.join(host.dirs["bin"], "cilia-cni"), os.X_OK)
    version = json.loads(sh(os.path.join(host.dirs["bin"], "cilia-cni"),
                            env={"CNI_COMMAND": "VERSION"}).stdout)
    assert "1.0.0" in version["supportedVersions"]

    # The daemons run in the stand-in host, not in the caller's netns.
    pids = host.pids()
    assert set(pids) == {"supervisor", "agent", "operator"}
    host_ino = os.stat(f"/run/netns/{host.ns}").st_ino
    for what, ref in pids.items():
        assert ref.alive(), what
        assert os.stat(f"/proc/{ref.pid}/ns/net").st_ino == host_ino, what

    # `cilia status` finds the installed agent (other sessions' labs may be running).
    st = json.loads(host.cilia("status", "-o", "json").stdout)
    assert st["cilia"] == {"desired": 1, "ready": 1, "available": 1}, st
    assert st["operator"] == "OK" and st["store"]["ok"] and st["store"]["backend"] == "sqlite"
    node = st["nodes"][host.node]
    assert node["node_ip"] == f"{host.net}.2" and node["routing"] == routing
    if routing == "tunnel":
        assert node["mtu"] == 1450  # uplink 1500 minus VXLAN
        assert node["ipam"]["pod_cidr"].startswith("10.244.")
    else:
        assert node["mtu"] == 1500 and node["ipam"]["pod_cidr"] == "10.250.3.0/24"
    vxlan = sh("ip", "-n", host.ns, "link", "show", "cilia_vxlan", check=False).returncode == 0
    assert vxlan == (routing == "tunnel")

    # Two pods through the real plugin binary: address, MAC in the result, reachability.
    a, b = host.add_pod("a"), host.add_pod("b")
    for pod, res in (("a", a), ("b", b)):
        links = json.loads(sh("ip", "-n", f"{host.prefix}-{pod}", "-j", "link", "show", "eth0").stdout)
        sandbox = [i for i in res["interfaces"] if i.get("sandbox")]
        assert sandbox and sandbox[0]["mac"] == links[0]["address"], res
        addrs = json.loads(sh("ip", "-n", f"{host.prefix}-{pod}", "-j", "addr", "show", "eth0").stdout)
        assert addrs[0]["addr_info"][0]["local"] == pod_addr(res)
    in_ns(f"{host.prefix}-a", "ping", "-c", "2", "-W", "2", pod_addr(b))
    # Out of the cluster through the uplink (BPF masquerade to the node IP) and back.
    in_ns(f"{host.prefix}-a", "ping", "-c", "2", "-W", "2", f"{host.net}.1")
    assert tcp_echo(f"{host.prefix}-a", f"{host.prefix}-b", pod_addr(b)) == "hello"
    eps = json.loads(host.cilia("endpoint", "list", "-o", "json").stdout)
    assert len(eps) == 2

    # A runtime outside Kubernetes (podman) sends only K8S_POD_NAME: namespace default, and
    # the labels come from CILIA_LABELS; a malformed label is a CNI error, nothing made.
    c = host.add_pod("c", args="IgnoreUnknown=1;K8S_POD_NAME=c;CILIA_LABELS=app=web,tier=fe")
    ep = [e for e in json.loads(host.cilia("endpoint", "list", "-o", "json").stdout)
          if e["status"]["networking"]["addressing"][0]["ipv4"] == pod_addr(c)][0]
    for label in ("k8s:app=web", "k8s:tier=fe", "k8s:io.kubernetes.pod.namespace=default"):
        assert label in ep["status"]["identity"]["labels"], ep["status"]["identity"]
    host.cni("DEL", "c")
    sh("ip", "netns", "add", f"{host.prefix}-d")
    host.pod_netns.append(f"{host.prefix}-d")
    r = host.cni("ADD", "d", args="K8S_POD_NAME=d;CILIA_LABELS=oops", check=False)
    err = json.loads(r.stdout)
    assert r.returncode != 0 and err["code"] == 4 and "CILIA_LABELS" in err["msg"], r.stdout
    assert len(json.loads(host.cilia("endpoint", "list", "-o", "json").stdout)) == 2

    # The supervisor restarts a crashed agent; pods keep their datapath meanwhile.
    pids["agent"].signal(signal.SIGKILL, group=False)
    deadline = time.monotonic() + 30
    while True:
        new = host.pids().get("agent")
        if new and new.pid != pids["agent"].pid and host.healthy():
            break
        assert time.monotonic() < deadline, "agent not restarted by the supervisor"
        time.sleep(0.2)
    in_ns(f"{host.prefix}-a", "ping", "-c", "1", "-W", "2", pod_addr(b))
    assert len(json.loads(host.cilia("endpoint", "list", "-o", "json").stdout)) == 2
    pids["operator"].signal(signal.SIGKILL, group=False)
    deadline = time.monotonic() + 30
    while not ((new := host.pids().get("operator")) and new.pid != pids["operator"].pid
               and new.alive()):
        assert time.monotonic() < deadline, "operator not restarted by the supervisor"
        time.sleep(0.2)

    # DEL through the plugin for one pod; the other is left for uninstall to clean up.
    host.cni("DEL", "b")
    assert sh("ip", "-n", f"{host.prefix}-b", "-j", "link", "show", "eth0", check=False).returncode != 0
    pids = host.pids()
    r = host.cilia("uninstall")
    assert "uninstalled" in r.stdout

    assert_same_host(before, host.snapshot())
    assert not os.path.exists(host.pins)
    for d in host.dirs.values():
        assert not os.path.exists(d), d
    for what, ref in pids.items():
        assert not ref.alive(), what
    # The pod's netns is the runtime's: it stays, without its cilia interface.
    assert sh("ip", "-n", f"{host.prefix}-a", "-j", "link", "show", "eth0", check=False).returncode != 0


def test_bad_input_one_line_and_nothing_made(host):
    before = host.snapshot()
    cases = [
        (["--pod-cidr", "10.244.0.0/33"], "--pod-cidr"),
        (["--node-ip", "not-an-ip"], "--node-ip"),
        (["--store", "etcd"], "--etcd-endpoints"),
        (["--store", "etcd", "--etcd-endpoints", "ftp://x:1"], "--etcd-endpoints"),
        (["--uplink", "nosuchdev0"], "--uplink"),
    ]
    for args, needle in cases:
        r = host.install(*args, check=False)
        assert r.returncode != 0, args
        lines = r.stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("error: ") and needle in lines[0], r.stderr
        for d in host.dirs.values():
            assert not os.path.exists(d), (args, d)
    r = host.cilia("install", "--netns", f"{host.prefix}-nope", "--state-dir", host.dirs["state"],
                   check=False)
    assert r.returncode != 0 and "--netns" in r.stderr
    r = host.cilia("uninstall", check=False)
    assert r.returncode != 0 and "nothing installed" in r.stderr
    assert_same_host(before, host.snapshot())


def test_failed_install_is_undone(host):
    """Refuses to overwrite a foreign plugin; an install that fails half-way (files written,
    store unreachable) undoes itself from its record."""
    before = host.snapshot()
    os.makedirs(host.dirs["bin"])
    with open(os.path.join(host.dirs["bin"], "cilia-cni"), "w") as f:
        f.write("someone else's plugin\n")
    r = host.install(check=False)
    assert r.returncode != 0 and "cilia-cni: exists and is not ours" in r.stderr
    assert open(os.path.join(host.dirs["bin"], "cilia-cni")).read() == "someone else's plugin\n"
    shutil.rmtree(host.dirs["bin"])
    for k in ("state", "run", "net.d"):
        assert not os.path.exists(host.dirs[k]), k

    # Nothing listens on the discard port: the store check fails after the files were made.
    r = host.install("--store", "etcd", "--etcd-endpoints", "http://127.0.0.1:9", check=False)
    assert r.returncode != 0 and "store etcd://127.0.0.1:9" in r.stderr, r.stderr
    assert len(r.stderr.strip().splitlines()) == 1, r.stderr
    assert_same_host(before, host.snapshot())
    assert not os.path.exists(host.pins)
    for d in host.dirs.values():
        assert not os.path.exists(d), d


STORE_KEYS = """
import json, sys
from cilia.kvstore import SyncStore
s = SyncStore(sys.argv[1])
kvs, _ = s.list("/cilia/")
print(json.dumps({kv.key: kv.value.decode() for kv in kvs}))
s.close()
"""


def test_install_with_etcd_and_uninstall_forgets_the_node(host, tmp_path):
    """--store etcd: an etcd reachable over the stand-in host's uplink (in the router netns).
    The node's keys are in etcd while installed and gone after uninstall; the shared objects
    (namespaces) stay."""
    data = tmp_path / "etcd"
    url = f"http://{host.net}.1:2379"
    sh("ip", "-n", host.router, "link", "set", "lo", "up")  # etcd's peer URL is on loopback
    etcd = subprocess.Popen(
        ["nsenter", f"--net=/run/netns/{host.router}", "--", "etcd", "--name", "e",
         "--data-dir", str(data), "--listen-client-urls", url, "--advertise-client-urls", url,
         "--listen-peer-urls", "http://127.0.0.1:2380",
         "--initial-advertise-peer-urls", "http://127.0.0.1:2380",
         "--initial-cluster", "e=http://127.0.0.1:2380", "--log-level", "warn", "--logger", "zap"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    store = f"etcd://{host.net}.1:2379"

    def keys() -> dict:
        return json.loads(in_ns(host.ns, sys.executable, "-c", STORE_KEYS, store).stdout)

    try:
        deadline = time.monotonic() + 30
        while in_ns(host.ns, sys.executable, "-c", STORE_KEYS, store + "?timeout=1",
                    check=False).returncode != 0:
            assert time.monotonic() < deadline, "etcd did not start"
            time.sleep(0.3)
        before = host.snapshot()
        host.install("--store", "etcd", "--etcd-endpoints", url)
        # The CLI reaches etcd from where the host's processes are.
        st = json.loads(in_ns(host.ns, CILIA, "status", "-o", "json", env=host.env).stdout)
        assert st["store"]["backend"] == "etcd" and st["store"]["ok"], st["store"]
        assert st["cilia"]["ready"] == 1 and st["operator"] == "OK", st
        a = host.add_pod("a")
        deadline = time.monotonic() + 10
        while f"/cilia/ipcache/v1/{pod_addr(a)}" not in keys():
            assert time.monotonic() < deadline, "endpoint not published to etcd"
            time.sleep(0.2)
        have = keys()
        assert f"/cilia/nodes/v1/{host.node}" in have
        assert f"/cilia/ipam/v1/podcidrs/{host.node}" in have
        host.cilia("uninstall")
        left = keys()
        mine = [k for k in left if host.node in k.split("/") or k.startswith("/cilia/ipcache/")
                or k.startswith("/cilia/ipam/v1/claims/")]
        assert mine == [], mine
        assert "/cilia/k8s/namespaces/default" in left
        assert_same_host(before, host.snapshot())
        assert not os.path.exists(host.pins)
        for d in host.dirs.values():
            assert not os.path.exists(d), d
    finally:
        os.killpg(etcd.pid, signal.SIGTERM)
        etcd.wait(timeout=10)


def _exec_start(unit: str, env: dict[str, str]) -> list[str]:
    import re
    import shlex
    text = open(unit).read().replace("\\\n", " ")
    line = next(l for l in text.splitlines() if l.startswith("ExecStart="))
    line = re.sub(r"\$\{(\w+)\}", lambda m: env[m.group(1)], line[len("ExecStart="):])
    return shlex.split(line)


def test_systemd_units_match_the_daemons_flags():
    """contrib/systemd/ is documentation that runs: its command lines must parse."""
    from cilia.agent.main import parser
    from cilia.operator.main import parse_args
    d = os.path.join(os.path.dirname(__file__), "..", "..", "contrib", "systemd")
    env = dict(l.split("=", 1) for l in open(os.path.join(d, "cilia.env")).read().splitlines()
               if l and not l.startswith("#"))
    agent = _exec_start(os.path.join(d, "cilia-agent.service"), env)
    assert agent[0].endswith("/cilia-agent")
    a = parser().parse_args(agent[1:])
    assert a.store == env["CILIA_STORE"] and a.routing == env["CILIA_ROUTING"]
    op = _exec_start(os.path.join(d, "cilia-operator.service"), env)
    assert op[0].endswith("/cilia-operator")
    assert parse_args(op[1:]).cluster_cidr == env["CILIA_CLUSTER_CIDR"]
    conf = json.load(open(os.path.join(d, "05-cilia.conflist")))
    assert conf["plugins"][0]["agent-socket"] == a.socket
    assert conf["plugins"][0]["type"] == "cilia-cni"

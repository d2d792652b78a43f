"""podman through cilia's CNI plugin on an installed host.

The host is the stand-in netns of test_install (the agent must not disturb the machine).
podman itself runs in the root netns and execs the installed plugin; the plugin forwards to
the agent's socket and the agent creates each veth pair between *its* netns and the
container's, so the root netns never sees a cilia link.

What this machine needs (design.md §8): the CNI backend, runc (crun fails on hybrid cgroups),
an image-less --rootfs (options before --rootfs), default_ulimits lowered (root lacks
CAP_SYS_RESOURCE), and a test-private containers.conf so the host's /etc is not used.

Identities: podman's CNI backend sends K8S_POD_NAME=<container name> and no namespace (the
plugin fills in `default`), and passes CNI_ARGS from its own environment through to the
plugin; cilia reads the workload's labels from CNI_ARGS CILIA_LABELS=k=v,... when no Pod
object of that name exists. podman 4.3 does not hand `--label` to CNI plugins.
"""
from __future__ import annotations

import contextlib
import ipaddress
import json
import os
import shutil
import subprocess
import tempfile
import time

import pytest

from tests.e2e.test_install import StandInHost, assert_same_host, sh

pytestmark = pytest.mark.root

POLICY = """
apiVersion: cilium.io/v2
kind: CiliumNetworkPolicy
metadata: {name: echo-from-trusted, namespace: default}
spec:
  endpointSelector: {matchLabels: {app: echo}}
  ingress:
  - fromEndpoints: [{matchLabels: {role: trusted}}]
"""


class Podman:
    """podman with everything of its own in tmp dirs."""

    def __init__(self, host: StandInHost):
        # podman refuses a runroot longer than 50 characters: pytest's tmp_path is too long.
        self.dir = tempfile.mkdtemp(prefix=f"{host.prefix}-", dir="/tmp")
        self.rootfs = os.path.join(self.dir, "rootfs")
        self.conf = os.path.join(self.dir, "containers.conf")
        self.base = ["podman", "--root", os.path.join(self.dir, "root"),
                     "--runroot", os.path.join(self.dir, "runroot"),
                     "--tmpdir", os.path.join(self.dir, "tmp"), "--storage-driver", "vfs"]
        self.host = host
        self.names: list[str] = []

    def setup(self) -> None:
        with open(self.conf, "w") as f:
            f.write(f"""[containers]
default_ulimits = []
[network]
network_backend = "cni"
cni_plugin_dirs = ["{self.host.dirs['bin']}"]
network_config_dir = "{self.host.dirs['net.d']}"
[engine]
runtime = "runc"
cgroup_manager = "cgroupfs"
events_logger = "file"
""")
        # A container needs no image here: busybox (static) and its applets are the rootfs.
        for d in ("bin", "proc", "sys", "dev", "etc", "tmp"):
            os.makedirs(os.path.join(self.rootfs, d))
        shutil.copy2(shutil.which("busybox") or "/bin/busybox", os.path.join(self.rootfs, "bin"))
        for applet in ("sh", "nc", "ip", "cat", "echo"):
            os.symlink("busybox", os.path.join(self.rootfs, "bin", applet))

    def run(self, *args: str, labels: str = "", check: bool = True,
            timeout: float = 60) -> subprocess.CompletedProcess:
        env = {**os.environ, "CONTAINERS_CONF": self.conf}
        env.pop("CNI_ARGS", None)
        if labels:
            env["CNI_ARGS"] = f"CILIA_LABELS={labels}"
        return sh(*self.base, *args, env=env, check=check, timeout=timeout)

    def container(self, name: str, *cmd: str, labels: str = "", detach: bool = False,
                  check: bool = True) -> subprocess.CompletedProcess:
        self.names.append(name)
        opts = ["-d"] if detach else ["--rm"]
        # Every option before --rootfs: podman takes what follows as the command.
        return self.run("run", *opts, "--name", name, "--network", "cilia",
                        "--rootfs", self.rootfs, *cmd, labels=labels, check=check)

    def inspect(self, name: str) -> dict:
        return json.loads(self.run("inspect", name).stdout)[0]

    def cleanup(self) -> None:
        for n in self.names:
            self.run("rm", "-f", "-t", "0", n, check=False)
        # Whatever podman still has mounted under its dirs (shm of a killed container).
        with open("/proc/self/mounts") as f:
            mounts = [line.split()[1] for line in f if line.split()[1].startswith(self.dir + "/")]
        for m in sorted(mounts, key=len, reverse=True):
            sh("umount", "-l", m, check=False)
        shutil.rmtree(self.dir, ignore_errors=True)


def root_netns_links() -> set[str]:
    """Links in the root netns a CNI plugin could have made (other sessions' short-lived
    veths on their way into their namespaces are none of ours)."""
    return {l["ifname"] for l in json.loads(sh("ip", "-j", "link", "show").stdout)
            if l["ifname"].startswith(("lxc", "cilia_"))}


def shared_state() -> dict[str, set[str]]:
    """Host directories podman 4.3 uses whatever its config says: libcni's result cache and
    runc's state root. They may exist; the test must leave nothing in them."""
    out = {}
    for d in ("/var/lib/cni/results", "/run/runc"):
        try:
            out[d] = set(os.listdir(d))
        except FileNotFoundError:
            out[d] = set()
    return out


def echo_from(pm: Podman, name: str, labels: str, ip: str) -> subprocess.CompletedProcess:
    return pm.container(name, "/bin/busybox", "sh", "-c", f"echo hello | nc -w 3 {ip} 8080",
                        labels=labels, check=False)


@pytest.fixture
def installed(tmp_path):
    h = StandInHost(str(tmp_path))
    pm = Podman(h)
    try:
        h.create()
        yield h, pm
    finally:
        pm.cleanup()
        h.destroy()


def test_podman_containers_networked_and_policed_by_cilia(installed):
    host, pm = installed
    version = sh("podman", "--version").stdout
    assert version.startswith("podman version 4."), version
    before_host = host.snapshot()
    before_root = root_netns_links()
    before_netns = set(os.listdir("/run/netns"))
    before_shared = shared_state()
    host.install()
    pm.setup()
    p = host.prefix

    # The server: address, routes and MAC all from cilia.
    pm.container(f"{p}-srv", "/bin/busybox", "nc", "-ll", "-p", "8080", "-e", "/bin/busybox",
                 "cat", labels="app=echo", detach=True)
    info = pm.inspect(f"{p}-srv")
    net = info["NetworkSettings"]["Networks"]["cilia"]
    ip, mac, pid = net["IPAddress"], net["MacAddress"], info["State"]["Pid"]
    st = json.loads(host.cilia("status", "--verbose", "-o", "json").stdout)
    cidr, router = st["ipam"]["pod_cidr"], st["ipam"]["router_ip"]
    assert net["IPPrefixLen"] == 32 and net["Gateway"] == router
    assert ipaddress.ip_address(ip) in ipaddress.ip_network(cidr)
    links = json.loads(sh("nsenter", "-t", str(pid), "-n", "ip", "-j", "addr", "show", "eth0").stdout)
    assert links[0]["address"] == mac and links[0]["mtu"] == 1450
    assert [(a["local"], a["prefixlen"]) for a in links[0]["addr_info"]] == [(ip, 32)]
    routes = json.loads(sh("nsenter", "-t", str(pid), "-n", "ip", "-j", "route").stdout)
    assert any(r["dst"] == "default" and r.get("gateway") == router and r["dev"] == "eth0"
               for r in routes), routes

    # The agent made the pair between its netns and the container's: nothing in the root netns.
    assert root_netns_links() == before_root
    eps = {e["status"]["networking"]["addressing"][0]["ipv4"]: e
           for e in json.loads(host.cilia("endpoint", "list", "-o", "json").stdout)}
    ep = eps[ip]
    labels = ep["status"]["identity"]["labels"]
    assert "k8s:app=echo" in labels and "k8s:io.kubernetes.pod.namespace=default" in labels, labels
    host_links = {l["ifname"] for l in json.loads(sh("ip", "-n", host.ns, "-j", "link").stdout)}
    assert ep["status"]["networking"]["interface-name"] in host_links
    assert ep["status"]["networking"]["mac"] == mac

    # A second container reaches it over TCP.
    r = echo_from(pm, f"{p}-c1", "role=client", ip)
    assert r.returncode == 0 and r.stdout.strip() == "hello", r

    # A policy: only role=trusted may reach app=echo.
    r = host.cilia("apply", "-f", "-", "--wait", input=POLICY)
    assert "echo-from-trusted" in r.stdout
    r = echo_from(pm, f"{p}-c2", "role=client", ip)
    assert r.returncode != 0 and "hello" not in r.stdout, r
    r = echo_from(pm, f"{p}-c3", "role=trusted", ip)
    assert r.returncode == 0 and r.stdout.strip() == "hello", r
    # The drop is the policy's, as the datapath counts it.
    drops = json.loads(host.cilia("bpf", "metrics", "list", "-o", "json").stdout)
    assert any(m["reason"] == 133 and m["direction"] == "INGRESS" and m["packets"] > 0
               for m in drops), drops

    # Removing the container removes its endpoint (podman calls CNI DEL).
    pm.run("rm", "-f", "-t", "0", f"{p}-srv")
    deadline = time.monotonic() + 10
    while json.loads(host.cilia("endpoint", "list", "-o", "json").stdout):
        assert time.monotonic() < deadline, "endpoint left after podman rm"
        time.sleep(0.2)

    host.cilia("uninstall")
    assert_same_host(before_host, host.snapshot())
    assert root_netns_links() == before_root
    # podman's own namespaces (netns-<uuid>) went with its containers; others' come and go.
    assert {n for n in set(os.listdir("/run/netns")) - before_netns if n.startswith("netns-")} == set()
    assert shared_state() == before_shared

"""A real agent in a node netns, driven through the real cilia-cni binary, checked with
iproute2/bpftool/ping. One agent per module (shared), pods per test."""
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

from cilia import netns
from tests.netns.helpers import (ip_json, links, map_dump, percpu_sum, ping, prog_name, sh,
                                 tc_programs)

pytestmark = pytest.mark.root

CNI = shutil.which("cilia-cni", path=os.path.dirname(sys.executable))
PREFIX = f"tag{uuid.uuid4().hex[:6]}"
NODE_NS = f"{PREFIX}-node"
POD_CIDR = "10.244.7.0/24"


class AgentProc:
    def __init__(self, run_dir: str):
        self.run_dir = run_dir
        self.socket = os.path.join(run_dir, "agent.sock")
        self.state = os.path.join(run_dir, "state")
        self.pins = f"/sys/fs/bpf/cilia/{PREFIX}/node"
        self.proc: subprocess.Popen | None = None

    def start(self) -> None:
        log = open(os.path.join(self.run_dir, "agent.log"), "ab")
        self.proc = subprocess.Popen(
            netns.nsenter_argv(NODE_NS, [sys.executable, "-m", "cilia.agent.main",
                                         "--cluster", PREFIX, "--node", "node",
                                         "--node-ip", "172.29.0.11", "--pod-cidr", POD_CIDR,
                                         "--socket", self.socket, "--state-dir", self.state,
                                         "--pin-dir", self.pins, "--mtu", "1500"]),
            stdout=log, stderr=log, start_new_session=True)
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise AssertionError("agent died:\n" + self.log())
            if self.healthy():
                return
            time.sleep(0.05)
        raise AssertionError("agent not healthy:\n" + self.log())

    def healthy(self) -> bool:
        from cilia.api.client import AgentClient
        try:
            return AgentClient(self.socket, 2).get("/v1/healthz")["status"] == "ok"
        except Exception:
            return False

    def api(self, path: str):
        from cilia.api.client import AgentClient
        return AgentClient(self.socket, 10).get(path)

    def log(self) -> str:
        with open(os.path.join(self.run_dir, "agent.log"), errors="replace") as f:
            return f.read()[-3000:]

    def kill(self, sig=signal.SIGKILL) -> None:
        if self.proc and self.proc.poll() is None:
            os.killpg(self.proc.pid, sig)
            self.proc.wait(10)


@pytest.fixture(scope="module")
def agent(tmp_path_factory):
    run_dir = str(tmp_path_factory.mktemp("agent"))
    a = AgentProc(run_dir)
    try:
        netns.create(NODE_NS)
        # The node's uplink: one end of a veth, the other end idle (no dummy driver here).
        sh("ip", "link", "add", "eth0", "type", "veth", "peer", "name", "uplink", netns=NODE_NS)
        sh("ip", "addr", "add", "172.29.0.11/16", "dev", "eth0", netns=NODE_NS)
        for dev in ("eth0", "uplink", "lo"):
            sh("ip", "link", "set", dev, "up", netns=NODE_NS)
        a.start()
        yield a
    finally:
        a.kill()
        for ns in netns.list_names(PREFIX):
            netns.delete(ns)
        from cilia.datapath.node import NodeDatapath
        NodeDatapath.remove_pins(a.pins)
        assert not os.path.exists(a.pins)


def cni(agent: AgentProc, command: str, cid: str, pod_ns: str | None, name: str = "p"):
    env = {"PATH": os.environ["PATH"], "CNI_COMMAND": command, "CNI_CONTAINERID": cid,
           "CNI_IFNAME": "eth0", "CNI_PATH": os.path.dirname(CNI),
           "CNI_ARGS": f"K8S_POD_NAMESPACE=default;K8S_POD_NAME={name}"}
    if pod_ns:
        env["CNI_NETNS"] = netns.path_of(pod_ns)
    conf = {"cniVersion": "1.0.0", "name": "cilia", "type": "cilia-cni",
            "agent-socket": agent.socket}
    p = subprocess.run([CNI], input=json.dumps(conf).encode(), env=env, capture_output=True,
                       timeout=60)
    out = json.loads(p.stdout) if p.stdout.strip() else None
    return p.returncode, out


def make_pod(agent, name):
    ns = f"{PREFIX}-{name}"
    netns.create(ns)
    cid = f"{PREFIX}{name}"
    rc, res = cni(agent, "ADD", cid, ns, name)
    assert rc == 0, res
    return ns, cid, res


def test_add_returns_cni_result_and_plumbs_the_pod(agent):
    ns, cid, res = make_pod(agent, "a")
    assert res["cniVersion"] == "1.0.0"
    host, pod = res["interfaces"]
    assert host["name"].startswith("lxc") and len(host["mac"]) == 17
    assert pod["name"] == "eth0" and pod["sandbox"] == netns.path_of(ns) and len(pod["mac"]) == 17
    ip4 = res["ips"][0]["address"].split("/")[0]
    assert res["ips"][0]["address"].endswith("/32") and ip4.startswith("10.244.7.")
    assert res["ips"][0]["gateway"] == "10.244.7.1"
    # Oracle: the kernel's view.
    pod_links = links(ns)
    assert pod_links["eth0"]["address"] == pod["mac"]
    addrs = [a["local"] for l in ip_json(ns, "addr", "show", "dev", "eth0")
             for a in l["addr_info"] if a["family"] == "inet"]
    assert addrs == [ip4]
    routes = ip_json(ns, "route", "show")
    assert any(r["dst"] == "default" and r.get("gateway") == "10.244.7.1" for r in routes)
    node_links = links(NODE_NS)
    assert node_links[host["name"]]["address"] == host["mac"]
    progs = tc_programs(NODE_NS, host["name"])
    assert progs["ingress"] == [prog_name("cil_from_container")], progs
    assert progs["egress"] == [prog_name("cil_to_container")], progs
    rc, _ = cni(agent, "CHECK", cid, ns, "a")
    assert rc == 0


def test_pods_talk_through_the_bpf_programs(agent):
    a_ns, _, ra = make_pod(agent, "b")
    b_ns, _, rb = make_pod(agent, "c")
    ip_a = ra["ips"][0]["address"].split("/")[0]
    ip_b = rb["ips"][0]["address"].split("/")[0]
    metrics = f"{agent.pins}/cilia_metrics"

    def forwarded_egress() -> int:
        return sum(percpu_sum(e, "count") for e in map_dump(metrics)
                   if e["key"]["reason"] == 0 and e["key"]["dir"] == 2)

    before = forwarded_egress()
    assert ping(a_ns, ip_b, 3)
    assert ping(b_ns, ip_a, 3)
    assert forwarded_egress() >= before + 6
    # ARP for the gateway was answered by BPF with the lxc MAC (nothing else answers it:
    # the router IP lives on cilia_host, not on the veth).
    neigh = ip_json(a_ns, "neigh", "show", "dev", "eth0")
    lxc_mac = ra["interfaces"][0]["mac"]
    assert any(n["dst"] == "10.244.7.1" and n.get("lladdr") == lxc_mac for n in neigh), neigh
    # Pod -> node host and node -> pod through the stack.
    assert ping(a_ns, "172.29.0.11", 2)
    assert ping(NODE_NS, ip_a, 2)
    # The endpoint map holds both pods (bpftool view).
    eps = map_dump(f"{agent.pins}/cilia_lxc")
    assert len([e for e in eps if e["value"]["ep_id"]]) >= 2


def test_del_removes_everything_and_is_idempotent(agent):
    ns, cid, res = make_pod(agent, "d")
    host = res["interfaces"][0]["name"]
    ip4 = res["ips"][0]["address"].split("/")[0]
    rc, _ = cni(agent, "DEL", cid, ns, "d")
    assert rc == 0
    assert host not in links(NODE_NS)
    assert "eth0" not in links(ns)
    assert ip4 not in agent.api("/v1/status")["ipam"]["addresses"]
    assert ip4 not in json.dumps(agent.api("/v1/bpf/endpoint"))
    rc, _ = cni(agent, "DEL", cid, ns, "d")
    assert rc == 0
    netns.delete(ns)


def test_add_into_missing_netns_fails_cleanly(agent):
    before = agent.api("/v1/status")["ipam"]["allocated"]
    rc, out = cni(agent, "ADD", f"{PREFIX}ghost", f"{PREFIX}-doesnotexist", "ghost")
    assert rc == 1 and out["code"] in (7, 999) and out["msg"]
    assert agent.api("/v1/status")["ipam"]["allocated"] == before


def test_sigkill_keeps_traffic_and_restart_restores_endpoints(agent):
    a_ns, _, ra = make_pod(agent, "e")
    b_ns, _, rb = make_pod(agent, "f")
    ip_b = rb["ips"][0]["address"].split("/")[0]
    eps_before = {e["id"]: e["status"]["networking"]["addressing"][0]["ipv4"]
                  for e in agent.api("/v1/endpoint")}
    agent.kill(signal.SIGKILL)
    # No agent: the pinned maps and attached programs keep forwarding.
    assert ping(a_ns, ip_b, 2)
    agent.start()
    eps_after = {e["id"]: e["status"]["networking"]["addressing"][0]["ipv4"]
                 for e in agent.api("/v1/endpoint")}
    assert eps_after == eps_before
    st = agent.api("/v1/status")
    assert st["restore"]["restored"] == len(eps_before)
    host = ra["interfaces"][0]["name"]
    assert tc_programs(NODE_NS, host)["ingress"] == [prog_name("cil_from_container")]
    assert ping(a_ns, ip_b, 2)

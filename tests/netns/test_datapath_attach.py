"""NodeDatapath on real veths in real namespaces, checked with tools that do not import
cilia (bpftool, tc, ping). Namespaces are entered with setns on a worker thread for our
code and with `nsenter --net` for the tools (`ip netns exec` would hide /sys/fs/bpf)."""

from __future__ import annotations

import json
import os
import secrets
import subprocess

import pytest

from cilia.datapath.netns import NetnsExecutor
from cilia.datapath.node import EndpointEntry, NodeConfig, NodeDatapath

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="needs root")

ROUTER_IP = "10.201.0.1"


def sh(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    return subprocess.run(args, check=check, capture_output=True, text=True)


def in_ns(ns: str, *args: str, check: bool = True) -> subprocess.CompletedProcess:
    return sh("nsenter", f"--net=/run/netns/{ns}", *args, check=check)


def link(ns: str, dev: str) -> dict:
    return json.loads(sh("ip", "-n", ns, "-j", "link", "show", dev).stdout)[0]


def bpftool_tc(ns: str, dev: str) -> dict[str, list[int]]:
    """direction -> ids of the programs bpftool sees attached on dev."""
    out = json.loads(in_ns(ns, "bpftool", "-j", "net", "show", "dev", dev).stdout)[0]
    res: dict[str, list[int]] = {"ingress": [], "egress": []}
    for f in out["tc"]:
        res[f["kind"].split("/")[1]].append(f["id"])
    return res


def tc_filters(ns: str, dev: str, direction: str) -> list[dict]:
    """Filters (entries with options) that `tc` lists on dev's clsact direction."""
    out = in_ns(ns, "tc", "-j", "filter", "show", "dev", dev, direction).stdout
    return [f for f in json.loads(out or "[]") if "options" in f]


def prog_id_of_fd(fd: int) -> int:
    with open(f"/proc/self/fdinfo/{fd}") as f:
        return int(next(line.split()[1] for line in f if line.startswith("prog_id:")))


@pytest.fixture
def names():
    """Unique netns names; every one is deleted at the end, whatever happened."""
    tag = secrets.token_hex(3)
    made: list[str] = []

    def netns(role: str) -> str:
        name = f"tdp{role}{tag}"
        sh("ip", "netns", "add", name)
        made.append(name)
        return name

    yield netns
    for name in made:
        sh("ip", "netns", "del", name, check=False)
    listed = sh("ip", "netns", "list").stdout
    assert not any(n in listed for n in made)


@pytest.fixture
def pin_dir():
    path = f"/sys/fs/bpf/cilia/test-{secrets.token_hex(4)}"
    yield path
    NodeDatapath.remove_pins(path)


def node_config() -> NodeConfig:
    return NodeConfig(node_ip4="192.168.51.10", router_ip4=ROUTER_IP, pod_cidr4="10.201.0.0/24")


def add_pod(node: str, pod: str, lxc: str, ip4: str) -> tuple[int, str, str]:
    """veth lxc (node side) <-> eth0 (pod side); returns (lxc ifindex, pod mac, lxc mac)."""
    sh("ip", "-n", node, "link", "add", lxc, "type", "veth", "peer", "name", "eth0", "netns", pod)
    sh("ip", "-n", node, "link", "set", lxc, "up")
    for cmd in (
        ("link", "set", "lo", "up"),
        ("link", "set", "eth0", "up"),
        ("addr", "add", f"{ip4}/32", "dev", "eth0"),
        ("route", "add", ROUTER_IP, "dev", "eth0", "scope", "link"),
        ("route", "add", "default", "via", ROUTER_IP, "dev", "eth0"),
    ):
        sh("ip", "-n", pod, *cmd)
    lxc_link = link(node, lxc)
    return lxc_link["ifindex"], link(pod, "eth0")["address"], lxc_link["address"]


def test_attach_replace_detach_and_remove_pins(names, pin_dir):
    node, pod = names("n"), names("p")
    lxc = "tdplxc0"
    ifindex, _, _ = add_pod(node, pod, lxc, "10.201.0.11")

    dp1 = NodeDatapath(pin_dir, node_config()).load()
    dp2 = None
    try:
        with NetnsExecutor(f"/run/netns/{node}") as ex:
            ex.run(dp1.attach_endpoint, ifindex)
            want1 = {"ingress": [prog_id_of_fd(dp1.program_fd("cil_from_container"))],
                     "egress": [prog_id_of_fd(dp1.program_fd("cil_to_container"))]}
            assert bpftool_tc(node, lxc) == want1
            assert [f["options"]["prog"]["id"] for f in tc_filters(node, lxc, "ingress")] == want1["ingress"]
            assert [f["options"]["prog"]["id"] for f in tc_filters(node, lxc, "egress")] == want1["egress"]
            assert all(f["options"]["direct-action"] for f in tc_filters(node, lxc, "ingress"))

            # Same programs again (agent restart before reload): still one filter each.
            ex.run(dp1.attach_endpoint, ifindex)
            assert bpftool_tc(node, lxc) == want1

            # A second load (new program ids, same pinned maps) replaces in place.
            dp2 = NodeDatapath(pin_dir, node_config()).load()
            ex.run(dp2.attach_endpoint, ifindex)
            want2 = {"ingress": [prog_id_of_fd(dp2.program_fd("cil_from_container"))],
                     "egress": [prog_id_of_fd(dp2.program_fd("cil_to_container"))]}
            assert want2 != want1
            assert bpftool_tc(node, lxc) == want2
            assert len(tc_filters(node, lxc, "ingress")) == 1
            assert len(tc_filters(node, lxc, "egress")) == 1

            ex.run(dp2.detach_endpoint, ifindex)
            assert bpftool_tc(node, lxc) == {"ingress": [], "egress": []}
            assert tc_filters(node, lxc, "ingress") == []
            ex.run(dp2.detach_endpoint, ifindex)  # idempotent

            # The pod netns goes away and takes the veth with it.
            ex.run(dp2.attach_endpoint, ifindex)
            sh("ip", "netns", "del", pod)
            assert sh("ip", "-n", node, "link", "show", lxc, check=False).returncode != 0
            ex.run(dp2.detach_endpoint, ifindex)
    finally:
        dp1.close()
        if dp2 is not None:
            dp2.close()

    assert sorted(os.listdir(pin_dir)) == ["cilia_ct4_global", "cilia_ct4_policy", "cilia_events",
                                           "cilia_events_lost", "cilia_ipcache",
                                           "cilia_lb4_affinity", "cilia_lb4_backends", "cilia_lb4_maglev",
                                           "cilia_lb4_reverse_nat", "cilia_lb4_services", "cilia_lxc",
                                           "cilia_lxc_if", "cilia_metrics", "cilia_policy",
                                           "cilia_snat_v4", "cilia_snat_v4_rev"]
    NodeDatapath.remove_pins(pin_dir)
    assert not os.path.exists(pin_dir)


def test_pods_reach_each_other_only_through_bpf(names, pin_dir):
    # The node netns has no addresses, no routes and no forwarding: pod-to-pod pings
    # can only work through the ARP responder and bpf_redirect_peer.
    node, pa, pb = names("n"), names("a"), names("b")
    a_ip, b_ip = "10.201.0.11", "10.201.0.22"
    ia, a_mac, a_lxc_mac = add_pod(node, pa, "tdplxca", a_ip)
    ib, b_mac, b_lxc_mac = add_pod(node, pb, "tdplxcb", b_ip)

    with NodeDatapath(pin_dir, node_config()).load() as dp, NetnsExecutor(f"/run/netns/{node}") as ex:
        # Without the datapath nothing answers the pod's ARP for its gateway.
        assert in_ns(pa, "ping", "-c", "1", "-W", "1", b_ip, check=False).returncode != 0

        dp.upsert_endpoint(EndpointEntry(a_ip, ia, 11, a_mac, a_lxc_mac))
        dp.upsert_endpoint(EndpointEntry(b_ip, ib, 22, b_mac, b_lxc_mac))
        ex.run(dp.attach_endpoint, ia)
        ex.run(dp.attach_endpoint, ib)

        r = in_ns(pa, "ping", "-c", "3", "-i", "0.2", "-W", "2", b_ip, check=False)
        assert r.returncode == 0, r.stdout + r.stderr
        neigh = json.loads(sh("ip", "-n", pa, "-j", "neigh", "show", ROUTER_IP).stdout)
        assert neigh and neigh[0]["lladdr"] == a_lxc_mac

        # A spoofed source from pod A is dropped and counted with Cilium's reason.
        sh("ip", "-n", pa, "addr", "add", "10.201.0.99/32", "dev", "eth0")
        r = in_ns(pa, "ping", "-c", "2", "-i", "0.2", "-W", "1", "-I", "10.201.0.99", b_ip, check=False)
        assert r.returncode != 0

        m = {(x["reason"], x["direction"]): x["packets"] for x in dp.metrics()}
        assert m[(0, "EGRESS")] >= 6  # 3 echo requests + 3 replies, plus ARP
        assert m[(132, "EGRESS")] >= 2

"""Fixtures for BPF_PROG_TEST_RUN tests: a loaded NodeDatapath with test-only pins and a
throwaway netns whose veth ifindexes stand for pod devices (test-run resolves ctx
ifindex in the caller's netns, so runs happen on a thread inside it)."""

from __future__ import annotations

import json
import os
import secrets
import subprocess
from pathlib import Path

import pytest

from cilia.datapath import testrun
from cilia.datapath.netns import NetnsExecutor
from cilia.datapath.node import NodeConfig, NodeDatapath

NODE_IP = "192.168.50.10"
ROUTER_IP = "10.200.0.1"
POD_CIDR = "10.200.0.0/24"


def _sh(*args: str) -> str:
    return subprocess.run(args, check=True, capture_output=True, text=True).stdout


def unique(prefix: str = "tdp") -> str:
    return prefix + secrets.token_hex(3)


@pytest.fixture(autouse=True, scope="session")
def _need_root():
    if os.geteuid() != 0:
        pytest.skip("datapath tests need root")


@pytest.fixture
def pin_dir():
    path = f"/sys/fs/bpf/cilia/test-{secrets.token_hex(4)}"
    yield path
    NodeDatapath.remove_pins(path)
    assert not os.path.exists(path)


class TestNetns:
    """A named netns with veth pairs, entered by one executor thread."""

    __test__ = False

    def __init__(self):
        self.name = unique()
        _sh("ip", "netns", "add", self.name)
        self.path = f"/run/netns/{self.name}"
        self.ex = NetnsExecutor(self.path)
        self._n = 0

    def veth(self) -> int:
        """Create a veth pair; returns the ifindex of one end (up)."""
        self._n += 1
        a, b = f"tdpa{self._n}", f"tdpb{self._n}"
        _sh("ip", "-n", self.name, "link", "add", a, "type", "veth", "peer", "name", b)
        _sh("ip", "-n", self.name, "link", "set", a, "up")
        return json.loads(_sh("ip", "-n", self.name, "-j", "link", "show", a))[0]["ifindex"]

    def close(self):
        try:
            self.ex.close()
        finally:
            subprocess.run(["ip", "netns", "del", self.name], check=False)


@pytest.fixture
def netns():
    ns = TestNetns()
    try:
        yield ns
    finally:
        ns.close()
    assert ns.name not in _sh("ip", "netns", "list")


@pytest.fixture
def node_config():
    return NodeConfig(node_ip4=NODE_IP, router_ip4=ROUTER_IP, pod_cidr4=POD_CIDR, node_id=7)


@pytest.fixture
def dp(pin_dir, node_config):
    d = NodeDatapath(pin_dir, node_config).load()
    try:
        yield d
    finally:
        d.close()


class Runner:
    """Runs a program of ``dp`` on a frame as if it arrived on ``ifindex``."""

    def __init__(self, dp: NodeDatapath, ns: TestNetns):
        self.dp, self.ns = dp, ns

    def __call__(self, prog: str, frame: bytes, ifindex: int = 0, cb: tuple[int, ...] | None = None,
                 ingress_ifindex: int = 0) -> testrun.TestRunResult:
        ctx = (testrun.skb_ctx(ifindex=ifindex, cb=cb or (), ingress_ifindex=ingress_ifindex)
               if ifindex or cb is not None or ingress_ifindex else None)
        return self.ns.ex.run(testrun.prog_test_run, self.dp.program_fd(prog), frame, ctx=ctx)


@pytest.fixture
def run(dp, netns):
    return Runner(dp, netns)


ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="session")
def test_build_dir(tmp_path_factory) -> str:
    """The datapath objects compiled with -DCILIA_TEST_TUNNEL: tunnel keys are mirrored
    in skb->cb, the only per-packet state BPF_PROG_TEST_RUN lets a test set and read."""
    out = tmp_path_factory.mktemp("bpf-test-build")
    arch_inc = f"/usr/include/{os.uname().machine}-linux-gnu"
    for src in sorted((ROOT / "bpf").glob("*.c")):
        subprocess.run(["clang", "-O2", "-g", "-target", "bpf", "-mcpu=v3", "-Wall", "-Werror",
                        "-DCILIA_TEST_TUNNEL", f"-I{ROOT / 'bpf' / 'include'}", f"-I{arch_inc}",
                        "-c", str(src), "-o", str(out / (src.stem + ".o"))], check=True)
    return str(out)


@pytest.fixture
def mkdp():
    """Factory: a loaded NodeDatapath with its own test pins, closed and unpinned after."""
    made: list[tuple[NodeDatapath, str]] = []

    def make(config: NodeConfig, obj_dir: str | None = None) -> NodeDatapath:
        pins = f"/sys/fs/bpf/cilia/test-{secrets.token_hex(4)}"
        made.append((None, pins))
        d = NodeDatapath(pins, config, obj_dir=obj_dir).load()
        made[-1] = (d, pins)
        return d

    yield make
    for d, pins in made:
        if d is not None:
            d.close()
        NodeDatapath.remove_pins(pins)
        assert not os.path.exists(pins)

"""`cilia connectivity test` on real 2-node labs (tunnel and native routing), a test of the
test (a policy that breaks one action must fail the run and name that action), and an
interrupt that must leave nothing behind. A few pure checks of the selection and flow
matching rules run first, without a lab."""
from __future__ import annotations

import io
import json
import os
import signal
import subprocess
import time
import xml.etree.ElementTree as ET

import pytest

from cilia.connectivity import flows
from cilia.connectivity.model import (DEFAULT_DENY_DROP, NONE, OK, Action, ActionSpec, Peer)
from cilia.connectivity.runner import SelectionError, scenario_selected, select
from tests.e2e.conftest import CILIA, Lab

NS = "cilia-test"
TEST_NAMES = ["no-policies", "client-ingress", "client-egress", "client-egress-expression",
              "echo-ingress-from-other-client-deny", "no-unexpected-packet-drops"]
ALL_TESTS = 16


# --- pure rules (no lab) ----------------------------------------------------------------------

def test_select_includes_excludes_and_rejects_bad_regex():
    assert select(TEST_NAMES, ()) == set(TEST_NAMES)
    assert select(TEST_NAMES, ("client-egress",)) == {"client-egress", "client-egress-expression"}
    assert select(TEST_NAMES, ("client", "!expression")) == {
        "client-ingress", "client-egress", "echo-ingress-from-other-client-deny"}
    assert select(TEST_NAMES, ("!.",)) == set()
    with pytest.raises(SelectionError):
        select(TEST_NAMES, ("(",))


def test_select_targets_scenarios_like_cilium_cli():
    pats = ("no-policies/pod-to-(pod|service)$",)
    assert select(TEST_NAMES, pats) == {"no-policies"}
    assert scenario_selected("no-policies", "pod-to-pod", pats)
    assert not scenario_selected("no-policies", "pod-to-world", pats)
    pats = ("!/pod-to-world",)                      # that scenario, in every test
    assert select(TEST_NAMES, pats) == set(TEST_NAMES)
    assert not scenario_selected("no-policies", "pod-to-world", pats)
    assert scenario_selected("client-egress", "pod-to-pod", pats)


def test_every_manifest_the_suite_applies_is_valid():
    from cilia.connectivity import manifests, suite
    from cilia.connectivity.deploy import WORLD_OTHER_IP
    from cilia.k8s.loader import load_manifests
    objs = load_manifests(["-"], stdin=io.StringIO(manifests.workloads(NS, "node1", "node2")))
    assert sorted(o["kind"] for o in objs).count("Deployment") == 4
    used = {p for t in suite.build(WORLD_OTHER_IP) for p in t.policies}
    assert used == set(manifests.POLICIES)
    params = {"NS": NS, "EXTERNAL_CIDR": "198.51.100.0/24", "EXTERNAL_OTHER_IP": WORLD_OTHER_IP}
    for name in used:
        [policy] = load_manifests(["-"], stdin=io.StringIO(manifests.render_policy(name, params)))
        assert policy["metadata"]["namespace"] == NS


def _flow(src, sport, dst, dport, flags, verdict="FORWARDED", reason=None, direction="EGRESS"):
    f = {"IP": {"source": src, "destination": dst},
         "l4": {"TCP": {"source_port": sport, "destination_port": dport,
                        "flags": {k: True for k in flags}}},
         "verdict": verdict, "traffic_direction": direction, "node_name": "node1"}
    if reason:
        f["drop_reason_desc"] = reason
    return f


def _action(egress, ingress):
    c = Peer("pod", "ns/client", "10.244.1.5")
    e = Peer("pod", "ns/echo", "10.244.1.7", 8080)
    return Action("t", "pod-to-pod", ActionSpec("curl-0", c, e, "curl"), egress, ingress,
                  local_ports=(20000, 20007))


def test_flow_rules_need_syn_and_fin_and_no_drop():
    a = _action(OK, OK)
    syn = _flow("10.244.1.5", 20001, "10.244.1.7", 8080, ["SYN"])
    fin = _flow("10.244.1.7", 8080, "10.244.1.5", 20001, ["ACK", "FIN"])
    assert flows.evaluate(a, [syn, fin], []).ok
    assert not flows.evaluate(a, [syn], []).ok                       # no FIN
    other_port = _flow("10.244.1.5", 30001, "10.244.1.7", 8080, ["SYN"])
    assert not flows.evaluate(a, [other_port, fin], []).ok           # another action's SYN
    drop = _flow("10.244.1.5", 20001, "10.244.1.7", 8080, ["SYN"], "DROPPED", "POLICY_DENIED")
    assert not flows.evaluate(a, [syn, fin, drop], []).ok


def test_flow_rules_check_drop_reason_and_direction():
    a = _action(NONE, DEFAULT_DENY_DROP)
    syn = _flow("10.244.1.5", 20003, "10.244.1.7", 8080, ["SYN"])
    ingress_drop = _flow("10.244.1.5", 20003, "10.244.1.7", 8080, ["SYN"], "DROPPED",
                         "POLICY_DENIED", "INGRESS")
    assert flows.evaluate(a, [syn, ingress_drop], []).ok
    deny = dict(ingress_drop, drop_reason_desc="POLICY_DENY")
    assert not flows.evaluate(a, [syn, deny], []).ok                 # wrong reason
    egress_drop = dict(ingress_drop, traffic_direction="EGRESS")
    assert not flows.evaluate(a, [syn, egress_drop], []).ok          # wrong side
    synack = _flow("10.244.1.7", 8080, "10.244.1.5", 20003, ["SYN", "ACK"])
    assert not flows.evaluate(a, [syn, ingress_drop, synack], []).ok  # it was answered


# --- on labs ----------------------------------------------------------------------------------



def run_test(lab: Lab, *args: str, timeout: float = 240) -> tuple[int, str, dict | None]:
    out = f"/tmp/{lab.name}-ct.json"
    try:
        r = lab.cilia("connectivity", "test", "--json-output", out, *args, check=False,
                      timeout=timeout)
        data = json.load(open(out)) if os.path.exists(out) else None
    finally:
        if os.path.exists(out):
            os.unlink(out)
    return r.rc, r.out + r.err, data


def assert_nothing_left(lab: Lab) -> None:
    nss = [n["metadata"]["name"] for n in lab.cilia("get", "namespaces", "-o", "json").json()["items"]]
    assert NS not in nss
    assert lab.cilia("get", "pods", "-n", NS, "-o", "json").json()["items"] == []
    assert lab.cilia("get", "cnp", "-n", NS, "-o", "json").json()["items"] == []
    addrs = lab.cilia("lab", "exec", "world", "--", "ip", "-j", "addr", "show", "dev", "eth0").json()
    assert [a["local"] for a in addrs[0]["addr_info"] if a["family"] == "inet"] == ["198.51.100.100"]
    listening = lab.cilia("lab", "exec", "world", "--", "ss", "-Hltn").out
    assert ":80 " not in listening and ":443 " not in listening, listening


def assert_all_passed(rc: int, out: str, data: dict | None) -> None:
    assert rc == 0, out
    assert f"✅ All {ALL_TESTS} tests (" in out, out
    assert data is not None and data["summary"]["failed"] == 0
    actions = [a for t in data["tests"] for a in t["actions"]]
    assert len(actions) > 100
    # Flow validation ran on every action, or the run said plainly why it did not.
    if data["flow_validation"].startswith("skipped"):
        assert "flow API unavailable" in out
    else:
        assert data["flow_validation"] == "strict"
        assert {a["flow_validation"] for a in actions} == {"ok", "n/a"}, \
            [a["id"] for a in actions if a["flow_validation"] not in ("ok", "n/a")]


@pytest.fixture(scope="module")
def tunnel_lab(lab_factory):
    return lab_factory(nodes=2, routing="tunnel", prefix="ct")


@pytest.mark.root
def test_suite_passes_in_tunnel_mode(tunnel_lab, tmp_path):
    junit = tmp_path / "junit.xml"
    rc, out, data = run_test(tunnel_lab, "--junit-file", str(junit))
    assert_all_passed(rc, out, data)
    assert "[=] Test [no-policies] [1/16]" in out
    suite = ET.parse(junit).getroot().find("testsuite")
    assert (suite.get("tests"), suite.get("failures"), suite.get("skipped")) == ("16", "0", "0")
    assert_nothing_left(tunnel_lab)


BREAK_ONE = """apiVersion: cilium.io/v2
kind: CiliumClusterwideNetworkPolicy
metadata: {name: ct-break-client2-world-443}
spec:
  endpointSelector:
    matchLabels: {k8s:io.kubernetes.pod.namespace: cilia-test, name: client2}
  egress:
  - toEntities: [all]
  egressDeny:
  - toCIDR: [198.51.100.100/32]
    toPorts: [{ports: [{port: "443", protocol: TCP}]}]
"""


@pytest.mark.root
def test_a_policy_breaking_one_action_fails_the_run_and_names_it(tunnel_lab, tmp_path):
    tunnel_lab.cilia("apply", "--wait", "-f", "-", input=BREAK_ONE)
    try:
        rc, out, data = run_test(tunnel_lab, "--test", "no-policies", "--junit-file",
                                 str(tmp_path / "junit.xml"))
    finally:
        tunnel_lab.cilia("delete", "--wait", "-f", "-", input=BREAK_ONE)
    assert rc != 0, out
    assert "📋 Test Report" in out
    assert "❌ 1/1 tests failed (1/" in out, out
    failed = [a for t in data["tests"] for a in t["actions"] if a["status"] == "failed"]
    assert [a["name"] for a in failed] == ["http-to-world-443-1"], failed
    assert f"  ❌ no-policies/pod-to-world/http-to-world-443-1: {NS}/client2-" in out
    assert "198.51.100.100:443" in out
    case = ET.parse(tmp_path / "junit.xml").getroot().find("testsuite/testcase[@name='no-policies']")
    assert case.get("status") == "failed"
    assert "no-policies/pod-to-world/http-to-world-443-1" in case.find("failure").text
    if data["flow_validation"] == "strict":
        # The flows say why: the SYN was dropped by the deny rule on the way out.
        assert any("L3/L4 Drop found" in line for line in failed[0]["log"]), failed[0]["log"]
        assert any("DROPPED POLICY_DENY" in line for line in failed[0]["log"]), failed[0]["log"]
    assert_nothing_left(tunnel_lab)


@pytest.mark.root
def test_sigint_mid_policy_test_removes_everything(tunnel_lab):
    # Long probe timeouts keep the test inside its policy window while we interrupt it.
    p = subprocess.Popen([CILIA, "connectivity", "test", "--test", "all-ingress-deny",
                          "--connect-timeout", "30", "--request-timeout", "35"],
                         env=tunnel_lab.env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                         text=True, start_new_session=True)
    seen = []
    try:
        deadline = time.monotonic() + 120
        for line in p.stdout:
            seen.append(line)
            if line.startswith("[=] Test [all-ingress-deny]"):
                break
            assert time.monotonic() < deadline, "".join(seen)
        # Interrupt once the policy is in place and the dropped probes are still waiting.
        while not tunnel_lab.cilia("get", "cnp", "-n", NS, "-o", "json").json()["items"]:
            assert time.monotonic() < deadline and p.poll() is None, "policy never applied"
            time.sleep(0.2)
        time.sleep(0.5)
        p.send_signal(signal.SIGINT)
        rest, _ = p.communicate(timeout=90)
    finally:
        if p.poll() is None:
            os.killpg(p.pid, signal.SIGKILL)
            p.wait()
    out = "".join(seen) + rest
    assert p.returncode == 130, out
    assert "SIGINT" in out and "interrupted" in out, out
    assert_nothing_left(tunnel_lab)


@pytest.mark.root
def test_suite_passes_in_native_routing_mode(lab_factory):
    lab = lab_factory(nodes=2, routing="native", prefix="ct")
    try:
        rc, out, data = run_test(lab)
        assert_all_passed(rc, out, data)
        assert_nothing_left(lab)
    finally:
        lab.down()

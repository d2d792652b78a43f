"""Lab lifecycle: 100 pods in and out without leaks, bad input rejected whole, two labs side
by side, and `lab down` leaving nothing behind. Oracles: iproute2, bpftool, /proc."""
from __future__ import annotations

import json
import os

import pytest

from cilia import netns
from tests.e2e.conftest import CILIA, Lab, unique_lab_name
from tests.netns.helpers import links, map_dump

pytestmark = pytest.mark.root


@pytest.fixture(scope="module")
def lab(lab_factory):
    return lab_factory(nodes=2)


def idle_deployment(name: str, replicas: int) -> str:
    return f"""
apiVersion: apps/v1
kind: Deployment
metadata: {{name: {name}}}
spec:
  replicas: {replicas}
  selector: {{matchLabels: {{app: {name}}}}}
  template:
    metadata: {{labels: {{app: {name}}}}}
    spec:
      containers: [{{name: idle, image: busybox}}]
"""


def running(pid: int, start: int) -> bool:
    """The process we recorded still exists and is not a zombie awaiting its reaper."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
    except FileNotFoundError:
        return False
    return int(fields[19]) == start and fields[0] != "Z"


def lab_state(lab: Lab) -> dict:
    """Everything a pod leaves behind anywhere, seen without cilia's code."""
    out = {"netns": sorted(n for n in netns.list_names(f"{lab.name}-")
                           if not n.endswith(("-fabric", "-world")) and "-node" not in n)}
    for node in ("node1", "node2"):
        ns = f"{lab.name}-{node}"
        out[f"{node}/lxc"] = sorted(l for l in links(ns) if l.startswith("lxc"))
        pins = f"/sys/fs/bpf/cilia/{lab.name}/{node}"
        out[f"{node}/cilia_lxc"] = len(map_dump(f"{pins}/cilia_lxc"))
        out[f"{node}/cilia_lxc_if"] = len(map_dump(f"{pins}/cilia_lxc_if"))
        st = lab.cilia("status", "--verbose", "--node", node, "-o", "json").json()
        out[f"{node}/ipam"] = st["ipam"]["allocated"]
        out[f"{node}/endpoints"] = st["endpoints"]
        with open(f"/run/cilia/{lab.name}/{node}/pods.json") as f:
            pods = json.load(f)
        out[f"{node}/pods"] = len(pods)
        out[f"{node}/routes"] = sorted(
            r["dst"] for r in json.loads(os.popen(
                f"nsenter --net=/run/netns/{ns} ip -j route show").read())
            if r["dst"].startswith("10.244."))
    return out


def test_100_pods_created_and_deleted_leave_nothing(lab):
    empty = lab_state(lab)
    assert empty["netns"] == [] and empty["node1/ipam"] == 0
    lab.apply(idle_deployment("many", 100))
    lab.cilia("wait", "--for=condition=Ready", "pods", "-l", "app=many", "--timeout", "180s",
              timeout=240)
    full = lab_state(lab)
    assert len(full["netns"]) == 100
    assert full["node1/ipam"] + full["node2/ipam"] == 100
    assert full["node1/cilia_lxc"] + full["node2/cilia_lxc"] == 100
    assert len(full["node1/lxc"]) + len(full["node2/lxc"]) == 100
    pods = lab.pods()
    ips = [p["status"]["podIP"] for p in pods.values()]
    assert len(set(ips)) == 100  # no address handed out twice
    pids = []
    for node in ("node1", "node2"):
        with open(f"/run/cilia/{lab.name}/{node}/pods.json") as f:
            for run in json.load(f).values():
                pids += [(c["proc"]["pid"], c["proc"]["start"]) for c in run["containers"]]
    assert len(pids) == 100
    lab.cilia("delete", "deployment", "many", "--timeout", "180", timeout=240)
    assert lab_state(lab) == empty
    for pid, start in pids:
        assert not running(pid, start), f"pod process {pid} still running"


BAD = {
    "malformed.yaml": ("apiVersion: v1\nkind: Pod\nmetadata: {name: x\n", "invalid YAML"),
    "unknownkind.yaml": ("apiVersion: v1\nkind: Gizmo\nmetadata: {name: x}\n", 'unsupported kind "Gizmo"'),
    "missingfield.yaml": ("apiVersion: v1\nkind: Pod\nmetadata: {name: nocontainers}\nspec: {}\n",
                          "Pod default/nocontainers: spec.containers"),
    "badname.yaml": ("apiVersion: v1\nkind: Pod\nmetadata: {name: Bad_Name}\n"
                     "spec: {containers: [{name: c, image: busybox}]}\n", "metadata.name"),
    "badport.yaml": ("apiVersion: v1\nkind: Pod\nmetadata: {name: p}\nspec:\n  containers:\n"
                     "  - {name: c, image: cilia/echo, ports: [{containerPort: 70000}]}\n",
                     "spec.containers[0].ports[0].containerPort"),
}

GOOD_FIRST = "apiVersion: v1\nkind: Pod\nmetadata: {name: good-first}\nspec: {containers: [{name: c, image: busybox}]}\n---\n"


@pytest.mark.parametrize("fname", sorted(BAD))
def test_bad_input_is_one_line_and_applies_nothing(lab, tmp_path, fname):
    body, needle = BAD[fname]
    path = tmp_path / fname
    path.write_text(GOOD_FIRST + body)
    before = set(lab.pods())
    r = lab.cilia("apply", "-f", str(path), check=False)
    assert r.rc != 0
    lines = r.err.strip().splitlines()
    assert len(lines) == 1, r.err
    assert fname in lines[0] and needle in lines[0], lines[0]
    assert set(lab.pods()) == before  # the valid first document was not applied either


def test_missing_namespace_is_refused_whole(lab, tmp_path):
    path = tmp_path / "ns.yaml"
    path.write_text(GOOD_FIRST + "apiVersion: v1\nkind: Pod\nmetadata: {name: lost, namespace: nowhere}\n"
                    "spec: {containers: [{name: c, image: busybox}]}\n")
    r = lab.cilia("apply", "-f", str(path), check=False)
    assert r.rc != 0 and 'namespaces "nowhere" not found' in r.err
    assert "good-first" not in lab.pods()


def test_unknown_node_pin_is_refused(lab):
    r = lab.cilia("apply", "-f", "-", check=False, input=(
        "apiVersion: v1\nkind: Pod\nmetadata: {name: pinned}\n"
        "spec: {nodeName: node9, containers: [{name: c, image: busybox}]}\n"))
    assert r.rc != 0 and "spec.nodeName" in r.err and "node9" in r.err


def test_two_labs_coexist_and_down_leaves_nothing(lab):
    other = Lab(unique_lab_name("o"))
    try:
        other.cilia("lab", "up", "--name", other.name, "--nodes", "1", timeout=120)
        other.apply("apiVersion: v1\nkind: Pod\nmetadata: {name: same}\nspec: {nodeName: node1, "
                    "containers: [{name: c, image: cilia/echo, ports: [{containerPort: 80}]}]}\n")
        lab.apply("apiVersion: v1\nkind: Pod\nmetadata: {name: same}\nspec: {nodeName: node1, "
                  "containers: [{name: c, image: cilia/echo, ports: [{containerPort: 80}]}]}\n")
        other.cilia("wait", "pod/same")
        lab.cilia("wait", "pod/same")
        # The same address plan in both labs, each pod answering inside its own lab.
        for lb in (other, lab):
            ip = lb.pod_ip("same")
            assert ip.startswith("10.244.1.")
            r = lb.cilia("lab", "exec", "node1", "--", "curl", "-s", "-m", "5", f"http://{ip}/")
            assert json.loads(r.out)["podIP"] == ip
        assert other.pod_ip("same") == "10.244.1.2"  # a fresh lab starts its pool afresh
        names = [l["name"] for l in json.loads(os.popen(f"{CILIA} lab list -o json").read())]
        assert lab.name in names and other.name in names
        pidfiles = [f"/run/cilia/{other.name}/node1/{p}.pid" for p in ("agent", "runtime")]
        procs = [json.load(open(p)) for p in pidfiles]
        with open(f"/run/cilia/{other.name}/node1/pods.json") as f:
            procs += [c["proc"] for run in json.load(f).values() for c in run["containers"]]
    finally:
        other.cilia("lab", "down", "--name", other.name, check=False)
    assert netns.list_names(f"{other.name}-") == []
    assert not os.path.exists(f"/sys/fs/bpf/cilia/{other.name}")
    assert not os.path.exists(f"/run/cilia/{other.name}")
    for p in procs:
        assert not running(p["pid"], p["start"]), p
    # The first lab is untouched.
    assert lab.cilia("status").rc == 0
    lab.cilia("delete", "pod", "same")

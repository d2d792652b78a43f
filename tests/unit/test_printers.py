"""kubectl-shaped `get` output: columns, alignment, AGE, wide, -A, List/JSON/YAML."""

from __future__ import annotations

import json
import re
from datetime import datetime, timedelta, timezone

import pytest
import yaml
from hypothesis import given, strategies as st

from cilia.k8s import dump, human_duration, no_resources_message, print_table, to_list
from cilia.k8s.printers import pod_status_text, render_columns

NOW = datetime(2024, 5, 1, 12, 0, 0, tzinfo=timezone.utc)


def ts(seconds_ago: float) -> str:
    return (NOW - timedelta(seconds=seconds_ago)).strftime("%Y-%m-%dT%H:%M:%SZ")


def pod(name, ns="default", *, age=5, phase="Running", ready=(True,), restarts=0, ip="10.244.1.5",
        node="node1", **extra):
    statuses = [{"name": f"c{i}", "ready": r, "restartCount": restarts if i == 0 else 0,
                 "state": {"running": {"startedAt": ts(age)}} if phase == "Running" else {}}
                for i, r in enumerate(ready)]
    obj = {
        "apiVersion": "v1", "kind": "Pod",
        "metadata": {"name": name, "namespace": ns, "creationTimestamp": ts(age)},
        "spec": {"nodeName": node, "containers": [{"name": f"c{i}", "image": "x"} for i in range(len(ready))]},
        "status": {"phase": phase, "podIP": ip, "hostIP": "172.29.0.11", "containerStatuses": statuses,
                   "conditions": [{"type": "Ready", "status": "True" if all(ready) else "False"}]},
    }
    for key, value in extra.items():
        obj[key] = value
    return obj


def node(name="node1", *, ready="True", age=3600, labels=None, ip="172.29.0.11"):
    return {
        "apiVersion": "v1", "kind": "Node",
        "metadata": {"name": name, "creationTimestamp": ts(age), "labels": labels or {}},
        "spec": {"podCIDR": "10.244.1.0/24"},
        "status": {
            "addresses": [{"type": "InternalIP", "address": ip}, {"type": "Hostname", "address": name}],
            "conditions": [{"type": "Ready", "status": ready}],
            "nodeInfo": {"kernelVersion": "6.18.0", "osImage": "Debian GNU/Linux 12 (bookworm)",
                         "containerRuntimeVersion": "cilia-lab://0.1", "kubeletVersion": "v1.30.0-cilia"},
        },
    }


@pytest.mark.parametrize("seconds,expected", [
    (0, "0s"), (5, "5s"), (59, "59s"), (119, "119s"), (120, "2m"), (182, "3m2s"), (599, "9m59s"),
    (600, "10m"), (10799, "179m"), (10800, "3h"), (2 * 3600 + 5 * 60, "125m"), (3 * 3600 + 5 * 60, "3h5m"), (7 * 3600 + 59 * 60, "7h59m"),
    (8 * 3600, "8h"), (47 * 3600 + 59 * 60, "47h"), (48 * 3600, "2d"), (3 * 86400 + 4 * 3600, "3d4h"),
    (8 * 86400, "8d"), (729 * 86400, "729d"), (730 * 86400, "2y"), (731 * 86400, "2y1d"),
    (8 * 365 * 86400, "8y"), (-1, "0s"), (-2, "<invalid>"), (5.9, "5s"),
])
def test_human_duration_table(seconds, expected):
    assert human_duration(seconds) == expected


_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400, "y": 365 * 86400}


@given(st.integers(min_value=0, max_value=20 * 365 * 86400))
def test_human_duration_never_overstates_and_loses_less_than_last_unit(seconds):
    text = human_duration(seconds)
    parts = re.findall(r"(\d+)([smhdy])", text)
    assert "".join(n + u for n, u in parts) == text and 1 <= len(parts) <= 2
    shown = sum(int(n) * _UNITS[u] for n, u in parts)
    last_unit = _UNITS[parts[-1][1]]
    assert shown <= seconds < shown + last_unit


def test_render_columns_matches_go_tabwriter():
    # kubectl: minwidth 6, padding 3; the last column is not padded.
    assert render_columns([["A", "B", "C"], ["xx", "yyyyyyyy", "z"]]) == (
        "A     B          C\n"
        "xx    yyyyyyyy   z\n")


def test_pods_table_exact():
    out = print_table("pods", [pod("web", age=5), pod("client-with-long-name", age=182, ready=(True, False))],
                      now=NOW)
    assert out == (
        "NAME                    READY   STATUS    RESTARTS   AGE\n"
        "client-with-long-name   1/2     Running   0          3m2s\n"
        "web                     1/1     Running   0          5s\n")


def test_pods_wide_and_all_namespaces():
    pods = [pod("b", "kube-system", ip="10.244.2.7", node="node2"), pod("a", "default")]
    out = print_table("Pod", pods, wide=True, all_namespaces=True, now=NOW)
    lines = out.splitlines()
    assert re.split(r"\s{3,}", lines[0]) == ["NAMESPACE", "NAME", "READY", "STATUS", "RESTARTS", "AGE", "IP", "NODE",
                                   "NOMINATED NODE", "READINESS GATES"]
    # Sorted by namespace, then name, like the API server's listing.
    assert lines[1].split() == ["default", "a", "1/1", "Running", "0", "5s", "10.244.1.5", "node1",
                                "<none>", "<none>"]
    assert lines[2].split() == ["kube-system", "b", "1/1", "Running", "0", "5s", "10.244.2.7", "node2",
                                "<none>", "<none>"]
    # Every column starts at the same offset on every line.
    starts = [m.start() for m in re.finditer(r"(?:^|(?<=   ))(?=\S)", lines[0])]
    assert len(starts) == 10
    for line in lines[1:]:
        assert all(line[i] != " " and (i == 0 or line[i - 1] == " ") for i in starts), line


def test_pod_without_ip_or_node_shows_none():
    p = pod("p", phase="Pending", ready=(False,))
    del p["status"]["podIP"], p["spec"]["nodeName"]
    row = print_table("pods", [p], wide=True, now=NOW).splitlines()[1].split()
    assert row[5:7] == ["<none>", "<none>"]


@pytest.mark.parametrize("mutate,expected", [
    (lambda p: None, "Running"),
    (lambda p: p.pop("status"), "Pending"),
    (lambda p: p["status"].update(phase="Pending", containerStatuses=[
        {"name": "c0", "ready": False, "restartCount": 0, "state": {"waiting": {"reason": "ContainerCreating"}}}]),
     "ContainerCreating"),
    (lambda p: p["metadata"].update(deletionTimestamp=ts(1)), "Terminating"),
    (lambda p: p["status"]["containerStatuses"][0].update(
        state={"waiting": {"reason": "CrashLoopBackOff"}}), "CrashLoopBackOff"),
    (lambda p: p["status"].update(phase="Succeeded", containerStatuses=[
        {"name": "c0", "ready": False, "state": {"terminated": {"exitCode": 0, "reason": "Completed"}}}]),
     "Completed"),
    (lambda p: p["status"].update(phase="Failed", containerStatuses=[
        {"name": "c0", "ready": False, "state": {"terminated": {"exitCode": 3}}}]), "ExitCode:3"),
    (lambda p: p["status"].update(phase="Failed", containerStatuses=[
        {"name": "c0", "ready": False, "state": {"terminated": {"exitCode": 137, "signal": 9}}}]), "Signal:9"),
    (lambda p: (p["spec"].update(initContainers=[{"name": "i", "image": "x"}]),
                p["status"].update(phase="Pending", initContainerStatuses=[
                    {"name": "i", "ready": False, "state": {"running": {}}}])), "Init:0/1"),
])
def test_pod_status_column(mutate, expected):
    p = pod("p")
    mutate(p)
    assert pod_status_text(p) == expected


def test_restarts_with_last_restart_age():
    p = pod("p", restarts=2, age=3600)
    p["status"]["containerStatuses"][0]["lastState"] = {"terminated": {"exitCode": 1, "finishedAt": ts(300)}}
    row = print_table("pods", [p], now=NOW).splitlines()[1]
    assert "2 (5m ago)" in row


def test_nodes_table_and_wide():
    nodes = [node("node1", labels={"node-role.kubernetes.io/control-plane": ""}),
             node("node2", ready="False", age=90, ip="172.29.0.12")]
    assert print_table("nodes", nodes, now=NOW) == (
        "NAME    STATUS     ROLES           AGE   VERSION\n"
        "node1   Ready      control-plane   60m   v1.30.0-cilia\n"
        "node2   NotReady   <none>          90s   v1.30.0-cilia\n")
    wide = print_table("no", nodes, wide=True, all_namespaces=True, now=NOW).splitlines()
    assert wide[0].startswith("NAME ")  # cluster-scoped: no NAMESPACE even with -A
    assert re.split(r"\s{3,}", wide[0]) == ["NAME", "STATUS", "ROLES", "AGE", "VERSION", "INTERNAL-IP",
                                            "EXTERNAL-IP", "OS-IMAGE", "KERNEL-VERSION", "CONTAINER-RUNTIME"]
    assert re.split(r"\s{3,}", wide[1]) == ["node1", "Ready", "control-plane", "60m", "v1.30.0-cilia",
                                            "172.29.0.11", "<none>", "Debian GNU/Linux 12 (bookworm)",
                                            "6.18.0", "cilia-lab://0.1"]


def test_node_without_ready_condition_is_unknown():
    n = node()
    n["status"]["conditions"] = []
    n["spec"]["unschedulable"] = True
    assert print_table("nodes", [n], now=NOW).splitlines()[1].split()[1] == "Unknown,SchedulingDisabled"


def test_namespaces_table():
    nss = [{"kind": "Namespace", "metadata": {"name": n, "creationTimestamp": ts(a)}, "status": {"phase": p}}
           for n, a, p in [("kube-system", 3 * 86400 + 4 * 3600, "Active"), ("default", 10, "Active"),
                           ("old", 2, "Terminating")]]
    assert print_table("ns", nss, all_namespaces=True, now=NOW) == (
        "NAME          STATUS        AGE\n"
        "default       Active        10s\n"
        "kube-system   Active        3d4h\n"
        "old           Terminating   2s\n")


def test_deployments_table_and_wide():
    dep = {"apiVersion": "apps/v1", "kind": "Deployment",
           "metadata": {"name": "web", "namespace": "prod", "creationTimestamp": ts(3 * 3600 + 5 * 60)},
           "spec": {"replicas": 3, "selector": {"matchLabels": {"tier": "fe", "app": "web"}},
                    "template": {"spec": {"containers": [{"name": "a", "image": "nginx"},
                                                         {"name": "b", "image": "busybox"}]}}},
           "status": {"readyReplicas": 2, "updatedReplicas": 3, "availableReplicas": 2}}
    assert print_table("deployments", [dep], now=NOW) == (
        "NAME   READY   UP-TO-DATE   AVAILABLE   AGE\n"
        "web    2/3     3            2           3h5m\n")
    assert print_table("deploy", [dep], wide=True, all_namespaces=True, now=NOW) == (
        "NAMESPACE   NAME   READY   UP-TO-DATE   AVAILABLE   AGE    CONTAINERS   IMAGES          SELECTOR\n"
        "prod        web    2/3     3            2           3h5m   a,b          nginx,busybox   app=web,tier=fe\n")


def test_fresh_deployment_without_status():
    dep = {"kind": "Deployment", "metadata": {"name": "d", "namespace": "default", "creationTimestamp": ts(1)},
           "spec": {"replicas": 2}}
    assert print_table("Deployment", [dep], now=NOW).splitlines()[1].split() == ["d", "0/2", "0", "0", "1s"]


def test_unknown_kind_gets_name_and_age():
    cm = {"kind": "ConfigMap", "metadata": {"name": "s", "namespace": "default", "creationTimestamp": ts(30)}}
    assert print_table("ConfigMap", [cm], all_namespaces=True, now=NOW) == (
        "NAMESPACE   NAME   AGE\n"
        "default     s      30s\n")


def test_missing_creation_timestamp_is_unknown_age():
    p = pod("p")
    del p["metadata"]["creationTimestamp"]
    assert print_table("pods", [p], now=NOW).splitlines()[1].split()[-1] == "<unknown>"


def test_empty_listing():
    assert print_table("pods", [], now=NOW) == ""
    assert no_resources_message("default") == "No resources found in default namespace."
    assert no_resources_message(all_namespaces=True) == "No resources found"
    assert no_resources_message(namespaced=False) == "No resources found"


def test_to_list_shape():
    assert to_list([{"a": 1}]) == {"apiVersion": "v1", "kind": "List", "items": [{"a": 1}],
                                   "metadata": {"resourceVersion": ""}}


def test_dump_json_like_kubectl():
    out = dump(to_list([pod("web")]), "json")
    assert out.startswith('{\n    "apiVersion": "v1",\n    "items": [\n        {\n            "apiVersion": "v1",')
    assert out.endswith('    "kind": "List",\n    "metadata": {\n        "resourceVersion": ""\n    }\n}\n')
    assert json.loads(out) == to_list([pod("web")])


def test_dump_yaml_like_kubectl():
    obj = to_list([pod("web")])
    obj["items"][0]["metadata"]["annotations"] = {"long": "x" * 200, "port": "80"}
    out = dump(obj, "yaml")
    assert out.startswith("apiVersion: v1\nitems:\n- apiVersion: v1\n  kind: Pod\n  metadata:\n")
    assert out.endswith('kind: List\nmetadata:\n  resourceVersion: ""\n')
    assert f'    creationTimestamp: "{ts(5)}"\n' in out  # go-yaml quotes with double quotes
    assert '      port: "80"\n' in out
    assert "      long: " + "x" * 200 + "\n" in out  # never folded onto a second line
    assert yaml.safe_load(out) == obj


def test_dump_rejects_unknown_format():
    with pytest.raises(ValueError, match="allowed formats"):
        dump({}, "xml")

"""`cilia apply`'s server side against a real SQLite store (no lab needed)."""
from __future__ import annotations

import pytest

from cilia.cluster import ApplyError, Cluster
from cilia.k8s.loader import load_manifests
from cilia.objects import encode, key


@pytest.fixture
def cl(tmp_path):
    c = Cluster(f"sqlite://{tmp_path}/store.db")
    c.store.put(key("namespaces", None, "default"), encode(
        {"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": "default"}}))
    for n in ("node1", "node2"):
        c.store.put(key("nodes", None, n), encode({
            "apiVersion": "v1", "kind": "Node", "metadata": {"name": n},
            "status": {"conditions": [{"type": "Ready", "status": "True"}]}}))
    yield c
    c.close()


def objs(tmp_path, text: str) -> list[dict]:
    p = tmp_path / "m.yaml"
    p.write_text(text)
    return load_manifests([str(p)])


POD = """
apiVersion: v1
kind: Pod
metadata: {{name: {name}, labels: {{app: {app}}}}}
spec:
  containers: [{{name: c, image: busybox}}]
"""


def test_create_then_unchanged_then_label_change(cl, tmp_path):
    assert [str(c) for c in cl.apply(objs(tmp_path, POD.format(name="a", app="x")))] == ["pod/a created"]
    assert [str(c) for c in cl.apply(objs(tmp_path, POD.format(name="a", app="x")))] == ["pod/a unchanged"]
    assert [str(c) for c in cl.apply(objs(tmp_path, POD.format(name="a", app="y")))] == ["pod/a configured"]
    pod = cl.get("Pod", "default", "a")
    assert pod["metadata"]["labels"] == {"app": "y"}
    assert pod["metadata"]["uid"] and pod["spec"]["nodeName"] in ("node1", "node2")


def test_spec_change_of_a_pod_is_refused(cl, tmp_path):
    cl.apply(objs(tmp_path, POD.format(name="a", app="x")))
    changed = POD.format(name="a", app="x").replace("busybox", "alpine")
    with pytest.raises(ApplyError, match="pod updates may not change"):
        cl.apply(objs(tmp_path, changed))


def test_nothing_written_when_one_object_is_bad(cl, tmp_path):
    text = POD.format(name="ok", app="x") + "---\n" + POD.format(name="lost", app="x").replace(
        "metadata: {", "metadata: {namespace: nowhere, ")
    rev = cl.store.revision()
    with pytest.raises(ApplyError, match='namespaces "nowhere" not found'):
        cl.apply(objs(tmp_path, text))
    assert cl.store.revision() == rev
    assert cl.get("Pod", "default", "ok") is None


def test_namespace_in_the_same_apply_is_fine(cl, tmp_path):
    text = "apiVersion: v1\nkind: Namespace\nmetadata: {name: shop}\n---\n" + \
        POD.format(name="p", app="x").replace("metadata: {", "metadata: {namespace: shop, ")
    changes = [str(c) for c in cl.apply(objs(tmp_path, text))]
    assert changes == ["namespace/shop created", "pod/p created"]
    ns = cl.get("Namespace", None, "shop")
    assert ns["metadata"]["labels"]["kubernetes.io/metadata.name"] == "shop"


def test_unpinned_pods_are_spread(cl, tmp_path):
    text = "---\n".join(POD.format(name=f"p{i}", app="x") for i in range(6))
    cl.apply(objs(tmp_path, text))
    nodes = [p["spec"]["nodeName"] for p in cl.list("Pod", "default")]
    assert nodes.count("node1") == 3 and nodes.count("node2") == 3


def test_pin_to_unknown_node_is_refused(cl, tmp_path):
    text = POD.format(name="p", app="x").replace("spec:\n", "spec:\n  nodeName: node7\n")
    with pytest.raises(ApplyError, match='spec.nodeName: node "node7" not found'):
        cl.apply(objs(tmp_path, text))


DEPLOY = """
apiVersion: apps/v1
kind: Deployment
metadata: {{name: web}}
spec:
  replicas: {n}
  selector: {{matchLabels: {{app: web}}}}
  template:
    metadata: {{labels: {{app: web}}}}
    spec:
      containers: [{{name: c, image: {image}}}]
"""


def live_pods(cl) -> list[dict]:
    return [p for p in cl.list("Pod", "default") if not p["metadata"].get("deletionTimestamp")]


def test_deployment_expands_scales_and_rolls(cl, tmp_path):
    cl.apply(objs(tmp_path, DEPLOY.format(n=3, image="busybox")))
    pods = live_pods(cl)
    assert len(pods) == 3
    assert all(p["metadata"]["name"].startswith("web-") for p in pods)
    assert all(p["metadata"]["ownerReferences"][0]["name"] == "web" for p in pods)
    assert [str(c) for c in cl.apply(objs(tmp_path, DEPLOY.format(n=3, image="busybox")))] == \
        ["deployment.apps/web unchanged"]
    cl.apply(objs(tmp_path, DEPLOY.format(n=5, image="busybox")))
    assert len(live_pods(cl)) == 5
    cl.apply(objs(tmp_path, DEPLOY.format(n=2, image="busybox")))
    assert len(live_pods(cl)) == 2
    old = {p["metadata"]["name"] for p in live_pods(cl)}
    cl.apply(objs(tmp_path, DEPLOY.format(n=2, image="alpine")))
    new = {p["metadata"]["name"] for p in live_pods(cl)}
    assert len(new) == 2 and not (old & new)
    dep = cl.get("Deployment", "default", "web")
    assert dep["status"]["replicas"] == 2


def test_delete_marks_pods_for_the_node_runtime(cl, tmp_path):
    cl.apply(objs(tmp_path, DEPLOY.format(n=2, image="busybox")))
    pending = cl.delete("Deployment", "default", "web")
    assert len(pending) == 2
    assert cl.get("Deployment", "default", "web") is None
    assert all(p["metadata"].get("deletionTimestamp") for p in cl.list("Pod", "default"))
    with pytest.raises(ApplyError, match="NotFound"):
        cl.delete("Pod", "default", "nope")


POLICIES = """
apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata: {{name: np}}
spec: {{podSelector: {{matchLabels: {{app: {app}}}}}}}
---
apiVersion: cilium.io/v2
kind: CiliumClusterwideNetworkPolicy
metadata: {{name: ccnp}}
spec:
  endpointSelector: {{matchLabels: {{app: {app}}}}}
  ingress: [{{fromEntities: [cluster]}}]
"""


def test_policies_created_unchanged_configured_deleted_with_revisions(cl, tmp_path):
    changes = cl.apply(objs(tmp_path, POLICIES.format(app="x")))
    assert [str(c) for c in changes] == ["networkpolicy.networking.k8s.io/np created",
                                         "ciliumclusterwidenetworkpolicy.cilium.io/ccnp created"]
    first = cl.revision
    assert first > 0 and cl.store.get(key("ciliumclusterwidenetworkpolicies", None, "ccnp")) is not None
    assert [c.action for c in cl.apply(objs(tmp_path, POLICIES.format(app="x")))] == ["unchanged"] * 2
    assert [c.action for c in cl.apply(objs(tmp_path, POLICIES.format(app="y")))] == ["configured"] * 2
    assert cl.revision > first
    cl.delete("CiliumClusterwideNetworkPolicy", None, "ccnp")
    assert cl.get("CiliumClusterwideNetworkPolicy", None, "ccnp") is None
    with pytest.raises(ApplyError, match="ciliumclusterwidenetworkpolicies.cilium.io \"ccnp\" not found"):
        cl.delete("CiliumClusterwideNetworkPolicy", None, "ccnp")

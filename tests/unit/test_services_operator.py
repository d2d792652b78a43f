"""Service addresses and EndpointSlices: the pure planners, the operator's controller against
a real SQLite store, and the real cilia-operator process."""
from __future__ import annotations

import asyncio
import json
import signal
import time

import pytest

from cilia.agent.supervisor import Supervisor
from cilia.kvstore import SyncStore, open_store
from cilia.loadbalancer.endpointslices import desired_slices
from cilia.loadbalancer.ipam import (CLUSTER_IPS, LB_IPS, NODE_PORTS, Ranges, claim_key,
                                     claim_unused, plan_allocations)
from cilia.objects import decode, encode, key
from cilia.operator.services import ServiceController
from tests.unit.test_kvstore_contract import arun
from tests.unit.test_operator import Operators, wait_until  # noqa: F401  (fixture helper)

pytestmark = pytest.mark.timeout(120)


def svc(name, stype="ClusterIP", ports=None, uid=None, ns="default", **spec):
    s = {"apiVersion": "v1", "kind": "Service",
         "metadata": {"name": name, "namespace": ns, "uid": uid or f"uid-{name}"},
         "spec": {"type": stype, "ports": ports or [{"name": "http", "port": 80, "protocol": "TCP",
                                                     "targetPort": 8080}], **spec},
         "status": {"loadBalancer": {}}}
    if stype == "LoadBalancer":
        s["spec"].setdefault("allocateLoadBalancerNodePorts", True)
    return s


def owner(name, uid=None, ns="default"):
    return {"namespace": ns, "name": name, "uid": uid or f"uid-{name}"}


def plan(services, claims=None, ranges=Ranges()):
    by_key = {(s["metadata"]["namespace"], s["metadata"]["name"]): s for s in services}
    return {a.key[1]: a for a in plan_allocations(by_key, claims or {}, list(by_key), ranges, "T")}


# ---------------------------------------------------------------- pure allocation


def test_cluster_ips_lowest_free_never_network_address_never_twice():
    claims = {CLUSTER_IPS: {"10.96.0.1": owner("kubernetes", "k")}}
    got = plan([svc("a"), svc("b"), svc("c", clusterIP="10.96.0.3")], claims)
    assert got["a"].obj["spec"]["clusterIP"] == "10.96.0.2"
    # b skips .3, which c requested (not yet claimed) in the same pass.
    assert got["b"].obj["spec"]["clusterIP"] == "10.96.0.4"
    assert got["c"].claims == [(CLUSTER_IPS, "10.96.0.3")]
    assert got["a"].claims == [(CLUSTER_IPS, "10.96.0.2")] and got["a"].obj["spec"]["clusterIPs"] == ["10.96.0.2"]


def test_requested_cluster_ip_taken_or_outside_range_is_a_condition():
    claims = {CLUSTER_IPS: {"10.96.0.5": owner("other")}}
    got = plan([svc("a", clusterIP="10.96.0.5"), svc("b", clusterIP="10.97.0.5"),
                svc("c", clusterIP="10.96.255.255")], claims)
    for name, text in (("a", "already allocated to service default/other"),
                       ("b", "outside the service range"), ("c", "outside the service range")):
        [cond] = got[name].obj["status"]["conditions"]
        assert cond["type"] == "cilia.io/AddressesAllocated" and cond["status"] == "False"
        assert text in cond["message"] and got[name].claims == []


def test_exhausted_service_range():
    r = Ranges(service_cidr="10.96.0.0/30")   # .1 and .2 only
    got = plan([svc("a"), svc("b"), svc("c")], ranges=r)
    assert [got[n].obj["spec"].get("clusterIP") for n in "abc"] == ["10.96.0.1", "10.96.0.2", None]
    assert "exhausted" in got["c"].obj["status"]["conditions"][0]["message"]


def test_adopts_own_claim_after_a_crash_and_keeps_allocations_stable():
    claims = {CLUSTER_IPS: {"10.96.0.9": owner("a")}, NODE_PORTS: {"30500": owner("a")}}
    got = plan([svc("a", "NodePort")], claims)
    assert got["a"].obj["spec"]["clusterIP"] == "10.96.0.9"
    assert got["a"].obj["spec"]["ports"][0]["nodePort"] == 30500
    assert got["a"].claims == []
    # Planning the result again changes nothing: no write loop.
    again = plan([got["a"].obj], {**claims})
    assert not again["a"].changed


def test_node_ports_requested_taken_shared_across_protocols():
    claims = {NODE_PORTS: {"30000": owner("x"), "30007": owner("y")}}
    ports = [{"name": "dns", "port": 53, "protocol": "UDP", "nodePort": 30053},
             {"name": "dns-tcp", "port": 53, "protocol": "TCP", "nodePort": 30053},
             {"name": "http", "port": 80, "protocol": "TCP"}]
    got = plan([svc("a", "NodePort", ports=ports), svc("b", "NodePort", ports=[
        {"name": "http", "port": 80, "protocol": "TCP", "nodePort": 30007}])], claims)
    assert [p["nodePort"] for p in got["a"].obj["spec"]["ports"]] == [30053, 30053, 30001]
    assert got["a"].claims == [(CLUSTER_IPS, "10.96.0.1"), (NODE_PORTS, "30053"), (NODE_PORTS, "30001")]
    assert "nodePort 30007 is already allocated to service default/y" in got["b"].obj["status"]["conditions"][0]["message"]


def test_node_port_range_exhausted():
    r = Ranges(node_port_min=30000, node_port_max=30001)
    got = plan([svc("a", "NodePort", ports=[{"name": "a", "port": 1, "protocol": "TCP"},
                                            {"name": "b", "port": 2, "protocol": "TCP"},
                                            {"name": "c", "port": 3, "protocol": "TCP"}])], ranges=r)
    assert "NodePort range 30000-30001 is exhausted" in got["a"].obj["status"]["conditions"][0]["message"]
    assert got["a"].claims == []   # nothing claimed for a service that cannot be completed


def test_load_balancer_ips_from_pool_requested_and_conditions():
    claims = {LB_IPS: {"172.30.0.1": owner("first")}}
    lb_req = svc("req", "LoadBalancer", loadBalancerIP="172.30.0.50")
    lb_ann = svc("ann", "LoadBalancer")
    lb_ann["metadata"]["annotations"] = {"lbipam.cilium.io/ips": "172.30.0.60"}
    got = plan([svc("auto", "LoadBalancer"), lb_req, lb_ann, svc("out", "LoadBalancer", loadBalancerIP="10.0.0.1")],
               claims)
    assert got["auto"].obj["status"]["loadBalancer"] == {"ingress": [{"ip": "172.30.0.2", "ipMode": "VIP"}]}
    assert got["req"].obj["status"]["loadBalancer"]["ingress"][0]["ip"] == "172.30.0.50"
    assert got["ann"].obj["status"]["loadBalancer"]["ingress"][0]["ip"] == "172.30.0.60"
    cond = {c["type"]: c for c in got["auto"].obj["status"]["conditions"]}
    assert cond["cilium.io/IPRequestSatisfied"]["status"] == "True"
    cond = {c["type"]: c for c in got["out"].obj["status"]["conditions"]}
    assert cond["cilium.io/IPRequestSatisfied"]["reason"] == "out_of_range"
    assert got["out"].obj["status"]["loadBalancer"] == {}
    # LoadBalancer services get NodePorts too, in key order (ann, auto, out, req).
    assert [got[n].obj["spec"]["ports"][0].get("nodePort") for n in ("ann", "auto", "out", "req")] == \
        [30000, 30001, 30002, 30003]


def test_claim_unused_keeps_claims_of_in_flight_allocations():
    a = svc("a", "NodePort")
    assert claim_unused(CLUSTER_IPS, "10.96.0.7", owner("a"), None)                      # service gone
    assert claim_unused(CLUSTER_IPS, "10.96.0.7", owner("a", "old-uid"), a)               # re-created
    assert not claim_unused(CLUSTER_IPS, "10.96.0.7", owner("a"), a)                      # being allocated
    assert claim_unused(CLUSTER_IPS, "10.96.0.7", owner("a"), {**a, "spec": {**a["spec"], "clusterIP": "10.96.0.8"}})
    assert not claim_unused(NODE_PORTS, "30001", owner("a"), a)
    assert claim_unused(NODE_PORTS, "30001", owner("a"), svc("a"))                        # now ClusterIP
    assert claim_unused(LB_IPS, "172.30.0.3", owner("a"), a)


# ---------------------------------------------------------------- EndpointSlice derivation


def pod(name, ip, node="node1", labels=None, ready=True, deleting=False, ports=None, phase="Running"):
    p = {"apiVersion": "v1", "kind": "Pod",
         "metadata": {"name": name, "namespace": "default", "uid": f"pod-{name}",
                      "labels": {"app": "web"} if labels is None else labels},
         "spec": {"nodeName": node, "containers": [{"name": "c", "image": "echo",
                                                    "ports": ports or [{"name": "http", "containerPort": 8080}]}]},
         "status": {"phase": phase, "podIP": ip,
                    "conditions": [{"type": "Ready", "status": "True" if ready else "False"}]}}
    if deleting:
        p["metadata"]["deletionTimestamp"] = "2024-01-01T00:00:00Z"
    return p


def test_slices_readiness_terminating_and_target_refs():
    s = svc("web", ports=[{"name": "http", "port": 80, "protocol": "TCP", "targetPort": 8080}], selector={"app": "web"})
    pods = [pod("a", "10.244.1.2"), pod("b", "10.244.2.2", node="node2", ready=False),
            pod("c", "10.244.1.3", deleting=True), pod("d", "", ready=False),
            pod("e", "10.244.1.4", labels={"app": "db"}), pod("f", "10.244.1.5", phase="Succeeded")]
    [sl] = desired_slices(s, pods)
    assert sl["metadata"]["labels"] == {"kubernetes.io/service-name": "web",
                                        "endpointslice.kubernetes.io/managed-by": "endpointslice-controller.k8s.io"}
    assert sl["metadata"]["name"].startswith("web-") and len(sl["metadata"]["name"]) == 14
    assert sl["metadata"]["ownerReferences"][0]["uid"] == "uid-web"
    assert sl["ports"] == [{"name": "http", "port": 8080, "protocol": "TCP"}]
    by_ip = {e["addresses"][0]: e for e in sl["endpoints"]}
    assert list(by_ip) == ["10.244.1.2", "10.244.1.3", "10.244.2.2"]
    assert by_ip["10.244.1.2"]["conditions"] == {"ready": True, "serving": True, "terminating": False}
    assert by_ip["10.244.2.2"]["conditions"] == {"ready": False, "serving": False, "terminating": False}
    assert by_ip["10.244.1.3"]["conditions"] == {"ready": False, "serving": True, "terminating": True}
    assert by_ip["10.244.2.2"]["nodeName"] == "node2"
    assert by_ip["10.244.1.2"]["targetRef"] == {"kind": "Pod", "namespace": "default", "name": "a", "uid": "pod-a"}
    s["spec"]["publishNotReadyAddresses"] = True
    [sl] = desired_slices(s, pods)
    assert all(e["conditions"]["ready"] for e in sl["endpoints"])


def test_named_target_ports_resolve_per_pod_into_separate_slices():
    s = svc("web", ports=[{"name": "http", "port": 80, "protocol": "TCP", "targetPort": "web"}], selector={"app": "web"})
    pods = [pod("a", "10.244.1.2", ports=[{"name": "web", "containerPort": 8080}]),
            pod("b", "10.244.1.3", ports=[{"name": "web", "containerPort": 9090}]),
            pod("c", "10.244.1.4", ports=[{"name": "other", "containerPort": 7070}])]
    slices = desired_slices(s, pods)
    got = {sl["ports"][0]["port"]: [e["addresses"][0] for e in sl["endpoints"]] for sl in slices}
    assert got == {8080: ["10.244.1.2"], 9090: ["10.244.1.3"]}   # c names no "web" port
    assert len({sl["metadata"]["name"] for sl in slices}) == 2
    assert desired_slices(s, pods) == slices   # deterministic names and content


def test_selectorless_service_has_no_managed_slices():
    assert desired_slices(svc("ext"), [pod("a", "10.244.1.2")]) == []


# ---------------------------------------------------------------- controller on SQLite


def put(s, obj, plural="services"):
    md = obj["metadata"]
    s.put(key(plural, md.get("namespace"), md["name"]), encode(obj))


def get(s, name, plural="services"):
    kv = s.get(key(plural, "default", name))
    return decode(kv.value) if kv else None


def slices_of(s, name):
    kvs, _ = s.list("/cilia/k8s/endpointslices/default/")
    return [decode(kv.value) for kv in kvs
            if decode(kv.value)["metadata"].get("labels", {}).get("kubernetes.io/service-name") == name]


async def _controller(url):
    store = open_store(url)
    ctl = ServiceController(store)
    sup = Supervisor()
    ctl.add_tasks(sup)
    return store, ctl, sup, asyncio.create_task(sup.run())


def test_controller_allocates_derives_and_cleans_up(tmp_path):
    url = f"sqlite://{tmp_path}/kv.db?poll_interval=0.02"

    async def main():
        store, ctl, sup, runner = await _controller(url)
        sync = await asyncio.to_thread(SyncStore, url)
        try:
            def until(cond, what):
                return asyncio.to_thread(wait_until, cond, 10, what)
            user_slice = {"apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice",
                          "metadata": {"name": "ext-1", "namespace": "default",
                                       "labels": {"kubernetes.io/service-name": "ext"}},
                          "addressType": "IPv4", "ports": [{"name": "http", "port": 80, "protocol": "TCP"}],
                          "endpoints": [{"addresses": ["198.51.100.10"], "conditions": {"ready": True}}]}
            await asyncio.to_thread(put, sync, user_slice, "endpointslices")
            await asyncio.to_thread(put, sync, svc("ext", ports=[{"name": "http", "port": 80, "protocol": "TCP"}]))
            await asyncio.to_thread(put, sync, pod("a", "10.244.1.2"), "pods")
            await asyncio.to_thread(put, sync, svc("web", "LoadBalancer", selector={"app": "web"}))
            web = await until(lambda: (get(sync, "web") or {}).get("status", {}).get("loadBalancer", {}).get("ingress")
                              and get(sync, "web"), "web allocated")
            assert web["spec"]["ports"][0]["nodePort"] == 30000
            assert web["status"]["loadBalancer"]["ingress"][0]["ip"] == "172.30.0.1"
            [sl] = await until(lambda: slices_of(sync, "web"), "web slice")
            assert [e["addresses"] for e in sl["endpoints"]] == [["10.244.1.2"]]
            ext = await until(lambda: (get(sync, "ext") or {}).get("spec", {}).get("clusterIP") and get(sync, "ext"),
                              "ext allocated")
            assert {web["spec"]["clusterIP"], ext["spec"]["clusterIP"]} == {"10.96.0.1", "10.96.0.2"}
            assert sync.get(claim_key(CLUSTER_IPS, ext["spec"]["clusterIP"])) is not None

            # A pod becomes terminating, another appears: the slice follows from watch events.
            p = pod("a", "10.244.1.2", deleting=True)
            await asyncio.to_thread(put, sync, p, "pods")
            await asyncio.to_thread(put, sync, pod("b", "10.244.2.2", node="node2"), "pods")

            def two():
                got = slices_of(sync, "web")
                return got and len(got[0]["endpoints"]) == 2 and got[0]
            sl = await until(two, "two endpoints")
            conds = {e["addresses"][0]: e["conditions"] for e in sl["endpoints"]}
            assert conds["10.244.1.2"] == {"ready": False, "serving": True, "terminating": True}
            assert conds["10.244.2.2"]["ready"] is True

            # The selector-less service's user slice is untouched throughout.
            assert slices_of(sync, "ext") == [user_slice]

            # Deleting web: its managed slice goes and its addresses are released.
            await asyncio.to_thread(sync.delete, key("services", "default", "web"))
            await until(lambda: not slices_of(sync, "web") and sync.get(claim_key(NODE_PORTS, 30000)) is None
                        and sync.get(claim_key(LB_IPS, "172.30.0.1")) is None
                        and sync.get(claim_key(CLUSTER_IPS, web["spec"]["clusterIP"])) is None, "release")
            assert slices_of(sync, "ext") == [user_slice]
        finally:
            sup.request_stop()
            await asyncio.wait_for(runner, 10)
            await store.close()
            await asyncio.to_thread(sync.close)

    arun(main(), timeout=60)


def test_two_controllers_never_hand_out_an_address_twice(tmp_path):
    url = f"sqlite://{tmp_path}/kv.db?poll_interval=0.02"

    async def main():
        a = await _controller(url)
        b = await _controller(url)
        sync = await asyncio.to_thread(SyncStore, url)
        try:
            for i in range(30):
                await asyncio.to_thread(put, sync, svc(f"s{i:02d}", "NodePort"))
            def done():
                kvs, _ = sync.list("/cilia/k8s/services/")
                objs = [decode(kv.value) for kv in kvs]
                return len(objs) == 30 and all(o["spec"].get("clusterIP") and o["spec"]["ports"][0].get("nodePort")
                                               for o in objs) and objs
            objs = await asyncio.to_thread(wait_until, done, 20, "30 services allocated")
            await asyncio.sleep(0.3)
            kvs, _ = await asyncio.to_thread(sync.list, "/cilia/k8s/services/")
            objs = [decode(kv.value) for kv in kvs]
            ips = [o["spec"]["clusterIP"] for o in objs]
            ports = [o["spec"]["ports"][0]["nodePort"] for o in objs]
            assert len(set(ips)) == 30 and len(set(ports)) == 30
            claims, _ = await asyncio.to_thread(sync.list, "/cilia/services/v1/clusterips/")
            owners = {kv.key.rsplit("/", 1)[1]: json.loads(kv.value)["name"] for kv in claims}
            assert owners == {o["spec"]["clusterIP"]: o["metadata"]["name"] for o in objs}
        finally:
            for store, _, sup, runner in (a, b):
                sup.request_stop()
                await asyncio.wait_for(runner, 10)
                await store.close()
            await asyncio.to_thread(sync.close)

    arun(main(), timeout=90)


# ---------------------------------------------------------------- the real process


@pytest.fixture
def operators(tmp_path):
    ops = Operators(tmp_path)
    try:
        yield ops
    finally:
        ops.cleanup()


def test_operator_process_allocates_services_and_slices(tmp_path, operators):
    url = f"sqlite://{tmp_path}/kv.db?poll_interval=0.02"
    with SyncStore(url) as s:
        put(s, pod("a", "10.244.1.2"), "pods")
        put(s, svc("web", "NodePort", selector={"app": "web"}))
        p = operators.start(url, "--lb-pool", "172.30.0.0/28")
        web = wait_until(lambda: (get(s, "web") or {}).get("spec", {}).get("clusterIP") and get(s, "web"),
                         what="clusterIP from the operator process")
        assert web["spec"]["clusterIP"] == "10.96.0.1" and web["spec"]["ports"][0]["nodePort"] == 30000
        wait_until(lambda: slices_of(s, "web"), what="EndpointSlice from the operator process")
        put(s, svc("lb", "LoadBalancer"))
        lb = wait_until(lambda: (get(s, "lb") or {}).get("status", {}).get("loadBalancer", {}).get("ingress")
                        and get(s, "lb"), timeout=10, what="LB IP")
        assert lb["status"]["loadBalancer"]["ingress"][0]["ip"] == "172.30.0.1"
        status = json.loads(s.get("/cilia/operator/v1/status").value)
        assert status["serviceCIDR"] == "10.96.0.0/16" and status["lbPool"] == "172.30.0.0/28"
        p.send_signal(signal.SIGTERM)
        assert p.wait(15) == 0, operators.logs()
        # Restarted, it keeps every allocation.
        p2 = operators.start(url)
        wait_until(lambda: s.get("/cilia/operator/v1/status"), what="restarted operator")
        time.sleep(0.5)
        assert get(s, "web")["spec"]["clusterIP"] == "10.96.0.1"
        assert get(s, "lb")["spec"]["clusterIP"] == "10.96.0.2"
        assert lb["status"]["loadBalancer"] == get(s, "lb")["status"]["loadBalancer"]
        p2.send_signal(signal.SIGTERM)
        assert p2.wait(15) == 0, operators.logs()

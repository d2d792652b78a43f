"""LBReconciler: diffing desired vs programmed against a recording datapath (the unit-test
seam; the same code path runs against NodeDatapath in the datapath/netns tests), id
persistence across restarts, and the incremental cost at 10,000 services."""
from __future__ import annotations

import asyncio
import copy
import json
import time

import pytest

from cilia.loadbalancer.datapath import DatapathBackend
from cilia.loadbalancer.ids import IdAllocator, IdExhausted
from cilia.loadbalancer.model import LBConfig
from cilia.loadbalancer.reconciler import LBReconciler
from cilia.loadbalancer.view import service_list_rows
from tests.unit.test_lb_desired import NODE_IPS, ep, eslice, service


class RecordingDatapath:
    """Keeps the service/backend maps as dicts, like the BPF maps would, and logs calls."""

    def __init__(self, fail_on: set[str] | None = None):
        self.calls: list[tuple] = []
        self.services: dict[tuple, dict] = {}
        self.backends: dict[int, DatapathBackend] = {}
        self.fail_on = fail_on or set()

    def upsert_service(self, rev_nat_index, address, port, proto, backends, *, kind="ClusterIP",
                       scope="external", algorithm="random", maglev_table=None, affinity_timeout=0,
                       local_only=False):
        if address in self.fail_on:
            raise OSError(28, "No space left on device")
        self.calls.append(("upsert", address, port, proto, scope))
        self.services[(address, port, proto, scope)] = dict(
            rev_nat=rev_nat_index, backends=[b.id for b in backends], kind=kind, algorithm=algorithm,
            maglev=maglev_table, affinity=affinity_timeout, local_only=local_only)
        for b in backends:
            self.backends[b.id] = b

    def delete_service(self, address, port, proto, scope="external"):
        self.calls.append(("delete", address, port, proto, scope))
        return self.services.pop((address, port, proto, scope), None) is not None

    def delete_backend(self, id):
        self.calls.append(("delete_backend", id))
        return self.backends.pop(id, None) is not None


def run(coro):
    return asyncio.run(coro)


@pytest.fixture
def dp():
    return RecordingDatapath()


def rec(dp, tmp_path, **kw):
    return LBReconciler(dp, str(tmp_path), "node1", NODE_IPS, backend_factory=DatapathBackend, **kw)


SVC = service(stype="NodePort")
SL = eslice(endpoints=[ep("10.244.1.5", "node1"), ep("10.244.2.5", "node2")])


def test_first_sync_programs_everything_then_nothing(dp, tmp_path):
    r = rec(dp, tmp_path)
    assert run(r.sync([SVC], [SL])) == 3
    assert sorted(dp.services) == [("10.244.1.1", 30080, 6, "external"), ("10.96.0.10", 80, 6, "external"),
                                   ("172.29.0.11", 30080, 6, "external")]
    assert len(dp.backends) == 2
    dp.calls.clear()
    assert run(r.sync([copy.deepcopy(SVC)], [copy.deepcopy(SL)])) == 0
    assert dp.calls == []


def test_only_changed_frontends_are_written(dp, tmp_path):
    r = rec(dp, tmp_path)
    other = service("db", cip="10.96.0.20", ports=[{"name": "pg", "port": 5432, "protocol": "TCP"}])
    db_slice = eslice("db", [ep("10.244.1.7", "node1")], ports=(("pg", 5432, "TCP"),))
    run(r.sync([SVC, other], [SL, db_slice]))
    dp.calls.clear()
    # A backend of web goes away: web's three frontends change, db's does not, and the
    # backend is deleted after the frontends stopped using it.
    sl2 = eslice(endpoints=[ep("10.244.1.5", "node1")])
    run(r.sync([SVC, other], [sl2, db_slice]))
    assert [c[0] for c in dp.calls] == ["upsert", "upsert", "upsert", "delete_backend"]
    assert all(c[1] != "10.96.0.20" for c in dp.calls)
    gone = dp.calls[-1][1]
    assert gone not in dp.backends and all(gone not in s["backends"] for s in dp.services.values())


def test_service_type_change_and_removal_delete_frontends_and_ids(dp, tmp_path):
    r = rec(dp, tmp_path)
    run(r.sync([SVC], [SL]))
    dp.calls.clear()
    as_cluster_ip = service()
    run(r.sync([as_cluster_ip], [SL]))
    assert sorted(c for c in dp.calls if c[0] == "delete") == [
        ("delete", "10.244.1.1", 30080, 6, "external"), ("delete", "172.29.0.11", 30080, 6, "external")]
    assert ("10.96.0.10", 80, 6, "external") in dp.services
    run(r.sync([], [SL]))
    assert dp.services == {} and dp.backends == {}
    assert len(r.revnat) == 0 and len(r.backend_ids) == 0


def test_ids_are_stable_across_restart_and_stale_entries_are_swept(dp, tmp_path):
    r = rec(dp, tmp_path)
    run(r.sync([SVC], [SL]))
    ids = {k: v["rev_nat"] for k, v in dp.services.items()}
    backend_ids = sorted(dp.backends)
    saved = json.loads((tmp_path / "lb-revnat-ids.json").read_text())
    assert sorted(saved["ids"].values()) == sorted(ids.values())

    # The agent restarts; meanwhile the NodePort went away. Same ids for what stays,
    # and the NodePort frontends (known only from the id file) are deleted.
    dp.calls.clear()
    r2 = rec(dp, tmp_path)
    run(r2.sync([service()], [SL]))
    assert dp.services[("10.96.0.10", 80, 6, "external")]["rev_nat"] == ids[("10.96.0.10", 80, 6, "external")]
    assert sorted(dp.backends) == backend_ids
    assert sorted(c[1] for c in dp.calls if c[0] == "delete") == ["10.244.1.1", "172.29.0.11"]
    assert list(dp.services) == [("10.96.0.10", 80, 6, "external")]


def test_failed_upsert_is_reported_and_retried(tmp_path):
    dp = RecordingDatapath(fail_on={"10.96.0.10"})
    r = rec(dp, tmp_path)
    run(r.sync([SVC], [SL]))
    view = {s["spec"]["frontend-address"]["ip"]: s for s in r.services_view()}
    assert view["10.96.0.10"]["status"]["realized"] is None
    assert "No space left" in view["10.96.0.10"]["status"]["error"]
    assert view["172.29.0.11"]["status"]["realized"] == view["172.29.0.11"]["spec"]
    dp.fail_on.clear()
    assert run(r.sync([SVC], [SL])) == 1   # only the failed one, without any input change
    assert ("10.96.0.10", 80, 6, "external") in dp.services and not r.errors


def test_maglev_table_flags_and_affinity_reach_the_datapath(dp, tmp_path):
    svc = service(sessionAffinity="ClientIP", sessionAffinityConfig={"clientIP": {"timeoutSeconds": 30}})
    svc["metadata"]["annotations"] = {"service.cilium.io/lb-algorithm": "maglev"}
    sl = eslice(endpoints=[ep("10.244.1.5", "node1"), ep("10.244.2.5", "node2"),
                           ep("10.244.2.6", "node2", ready=False, serving=True, terminating=True)])
    r = rec(dp, tmp_path, config=LBConfig(maglev_table_size=251))
    run(r.sync([svc], [sl]))
    [s] = dp.services.values()
    assert s["algorithm"] == "maglev" and s["affinity"] == 30 and len(s["maglev"]) == 251
    active = {b for b in s["backends"] if dp.backends[b].state == "active"}
    assert set(s["maglev"]) == active and len(active) == 2   # terminating backends are not in the table
    assert {dp.backends[b].state for b in s["backends"]} == {"active", "terminating"}


def test_services_view_is_ciliums_model_and_lists(dp, tmp_path):
    r = rec(dp, tmp_path)
    run(r.sync([SVC], [SL]))
    view = r.services_view()
    assert [v["spec"]["id"] for v in view] == sorted(v["spec"]["id"] for v in view)
    cip = next(v for v in view if v["spec"]["flags"]["type"] == "ClusterIP")
    assert cip["spec"]["frontend-address"] == {"ip": "10.96.0.10", "port": 80, "protocol": "TCP", "scope": "external"}
    assert cip["spec"]["backend-addresses"][0] == {"ip": "10.244.1.5", "port": 8080, "protocol": "TCP",
                                                   "state": "active", "nodeName": "node1", "weight": 100}
    assert cip["spec"]["flags"]["name"] == "web" and cip["spec"]["flags"]["namespace"] == "default"
    assert cip["status"]["realized"] == cip["spec"]
    rows = service_list_rows(view)
    assert rows[0] == ["ID", "Frontend", "Service Type", "Backend"]
    assert rows[1][2:] == ["NodePort", "1 => 10.244.1.5:8080/TCP (active)"]
    assert ["", "", "", "2 => 10.244.2.5:8080/TCP (active)"] in rows
    assert any(r_[1] == "10.96.0.10:80/TCP" for r_ in rows)


def test_id_allocator_cursor_wraps_and_persists(tmp_path):
    path = str(tmp_path / "ids.json")
    a = IdAllocator(path, 1, 3)
    assert [a.acquire(k) for k in "abc"] == [1, 2, 3]
    with pytest.raises(IdExhausted):
        a.acquire("d")
    a.release("b")
    assert a.acquire("d") == 2          # the only free one
    a.release("a")
    a.release("c")
    assert a.acquire("e") == 3          # the cursor moves on rather than reusing 1 at once
    a.save()
    b = IdAllocator(path, 1, 3)
    assert b.ids == {"d": 2, "e": 3} and b.acquire("f") == 1
    (tmp_path / "bad.json").write_text("{not json")
    assert len(IdAllocator(str(tmp_path / "bad.json"))) == 0


def test_ten_thousand_services_resync_is_incremental(dp, tmp_path):
    svcs, slices = {}, {}
    for i in range(10_000):
        name = f"s{i}"
        svcs[name] = service(name, cip=f"10.96.{i // 250}.{i % 250 + 1}",
                             ports=[{"name": "http", "port": 80, "protocol": "TCP"}])
        slices[name] = eslice(name, [ep(f"10.244.{i // 250}.{i % 250 + 1}", "node1")])
    r = rec(dp, tmp_path)
    run(r.sync(svcs, slices))
    assert len(dp.services) == 10_000
    dp.calls.clear()
    # One service changes: one datapath write, and the pass is far cheaper than the first.
    slices["s42"] = eslice("s42", [ep("10.244.0.200", "node2")])
    t = time.perf_counter()
    assert run(r.sync(svcs, slices)) == 1
    elapsed = time.perf_counter() - t
    assert [c[0] for c in dp.calls] == ["upsert", "delete_backend"]
    assert elapsed < 0.5, elapsed


class BatchingDatapath(RecordingDatapath):
    """Also takes the datapath's batched call, with its real LBService/LBBackend values."""

    def __init__(self):
        super().__init__()
        self.batches = 0

    def upsert_services(self, specs):
        self.batches += 1
        for s in specs:
            self.upsert_service(s.rev_nat_index, s.address, s.port, s.proto, s.backends, kind=s.kind,
                                scope=s.scope, algorithm=s.algorithm, maglev_table=s.maglev_table,
                                affinity_timeout=s.affinity_timeout, local_only=s.local_only)


def test_full_resync_is_batched_with_the_datapaths_types(tmp_path):
    from cilia.datapath.lb import LBBackend, LBService  # noqa: F401  (the real value types)
    dp = BatchingDatapath()
    r = LBReconciler(dp, str(tmp_path), "node1", NODE_IPS)
    svcs = [service(f"s{i}", cip=f"10.96.1.{i + 1}", externalIPs=["198.51.100.1"] if i == 0 else [],
                    ports=[{"name": "http", "port": 80, "protocol": "TCP"}]) for i in range(40)]
    slices = [eslice(f"s{i}", [ep(f"10.244.1.{i + 1}", "node1")]) for i in range(40)]
    run(r.sync(svcs, slices))
    assert dp.batches == 1 and len(dp.services) == 41
    assert all(isinstance(b, LBBackend) for b in dp.backends.values())
    # Cilium calls them ExternalIPs; the datapath's kind is ExternalIP.
    assert dp.services[("198.51.100.1", 80, 6, "external")]["kind"] == "ExternalIP"
    assert r.services_view()[0]["spec"]["flags"]["type"] in ("ClusterIP", "ExternalIPs")
    # A small change goes one by one.
    run(r.sync(svcs[:39], slices))
    assert dp.batches == 1 and len(dp.services) == 40 and ("10.96.1.40", 80, 6, "external") not in dp.services


def test_maglev_without_active_backends_has_no_table(dp, tmp_path):
    svc = service()
    svc["metadata"]["annotations"] = {"service.cilium.io/lb-algorithm": "maglev"}
    sl = eslice(endpoints=[ep("10.244.2.6", "node2", ready=False, serving=True, terminating=True)])
    run(rec(dp, tmp_path).sync([svc], [sl]))
    [s] = dp.services.values()
    assert s["algorithm"] == "maglev" and s["maglev"] is None and len(s["backends"]) == 1

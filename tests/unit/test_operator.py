"""cilia-operator: pod CIDR allocation and identity GC, as pure functions, against real
stores (SQLite files, a real etcd for the cross-backend race), and as a real subprocess."""
from __future__ import annotations

import asyncio
import json
import signal
import subprocess
import sys
import time

import pytest

from cilia.agent.supervisor import Supervisor
from cilia.identity.allocator import ID_PREFIX, IdentityAllocator, id_key, value_key
from cilia.kvstore import SyncStore, open_store
from cilia.operator.identity_gc import IdentityGC, gc_candidates
from cilia.operator.main import STATUS_KEY, Operator, OperatorConfig, parse_args
from cilia.operator.podcidr import (
    CLAIMS_PREFIX,
    ERRORS_PREFIX,
    PODCIDRS_PREFIX,
    PodCIDRAllocator,
    PodCIDRState,
    claim_key,
    pick_pod_cidr,
    plan_pod_cidrs,
    podcidr_key,
    should_release,
)
from tests.unit.test_kvstore_contract import EtcdServer, arun

pytestmark = pytest.mark.timeout(120)

POOL = "10.244.0.0/16"


# ---------------------------------------------------------------- pure allocation logic


def test_pick_preferred_when_free():
    assert pick_pod_cidr(POOL, 24, [], "10.244.3.0/24") == "10.244.3.0/24"
    assert pick_pod_cidr(POOL, 24, ["10.244.1.0/24"], "10.244.3.0/24") == "10.244.3.0/24"


def test_pick_lowest_free_skips_first_subnet_and_used():
    assert pick_pod_cidr(POOL, 24, []) == "10.244.1.0/24"
    assert pick_pod_cidr(POOL, 24, ["10.244.1.0/24", "10.244.2.0/24"]) == "10.244.3.0/24"
    # A taken preference falls back to the lowest free, not to a neighbour of the preference.
    assert pick_pod_cidr(POOL, 24, ["10.244.3.0/24"], "10.244.3.0/24") == "10.244.1.0/24"
    # A /23 left over from a different mask blocks both /24s inside it.
    assert pick_pod_cidr(POOL, 24, ["10.244.0.0/23"]) == "10.244.2.0/24"


@pytest.mark.parametrize("preferred", [
    "10.244.0.0/24",   # the pool's first subnet is never handed out
    "10.245.3.0/24",   # outside the pool
    "10.244.3.0/25",   # wrong size
    "10.244.3.7/24",   # not a network address
    "garbage", "", None,
])
def test_pick_ignores_unusable_preference(preferred):
    assert pick_pod_cidr(POOL, 24, [], preferred) == "10.244.1.0/24"


def test_pick_exhausted_and_other_masks():
    small = "10.244.0.0/22"
    used = ["10.244.1.0/24", "10.244.2.0/24", "10.244.3.0/24"]
    assert pick_pod_cidr(small, 24, used) is None
    assert pick_pod_cidr(POOL, 26, []) == "10.244.0.64/26"
    with pytest.raises(ValueError):
        pick_pod_cidr(POOL, 16, [])


@pytest.mark.parametrize("registered, k8s_node, release", [
    (True, True, False),
    (True, False, False),
    (False, True, False),   # agent restarting: its lease expired but the Node is there
    (False, False, True),
])
def test_should_release(registered, k8s_node, release):
    regs = {"n1": {}} if registered else {}
    nodes = {"n1"} if k8s_node else set()
    assert should_release("n1", regs, nodes) is release


def test_plan_honours_preferences_before_lowest_free():
    st = PodCIDRState(registrations={"a": {}, "b": {"preferredPodCIDR": "10.244.1.0/24"},
                                     "c": {"preferredPodCIDR": "10.244.1.0/24"}})
    plan = plan_pod_cidrs(st, POOL, 24)
    # b and c are served first (b wins .1 by name); a must not take .1 although it sorts first.
    assert plan.allocate == {"b": "10.244.1.0/24", "c": "10.244.2.0/24", "a": "10.244.3.0/24"}


def test_plan_crash_leftovers_and_releases():
    st = PodCIDRState(
        registrations={"n1": {}, "n2": {}, "n4": {}},
        k8s_nodes={"n1", "n3"},
        podcidrs={"n1": "10.244.1.0/24", "n3": "10.244.3.0/24", "n5": "10.244.5.0/24", "n4": "10.244.4.0/24"},
        claims={"10.244.1.0/24": "n1", "10.244.3.0/24": "n3", "10.244.5.0/24": "n5",
                "10.244.2.0/24": "n2",     # claimed, operator died before podcidrs: adopt
                "10.244.9.0/24": "n1",     # lost race leftover: n1 already has .1
                "10.244.8.0/24": "gone"},  # node gone entirely
        errors={"n1": "old message"},
    )
    plan = plan_pod_cidrs(st, POOL, 24)
    assert plan.release == ["n5"]
    assert plan.adopt == {"n2": "10.244.2.0/24"}
    assert plan.drop_claims == {"10.244.9.0/24": "n1", "10.244.8.0/24": "gone"}
    assert plan.restore_claims == {"10.244.4.0/24": "n4"}
    assert plan.allocate == {}
    assert plan.clear_errors == ["n1"]


def test_plan_exhaustion_error_once():
    st = PodCIDRState(registrations={f"n{i}": {} for i in range(1, 5)})
    plan = plan_pod_cidrs(st, "10.244.0.0/22", 24)
    assert sorted(plan.allocate) == ["n1", "n2", "n3"]
    assert list(plan.errors) == ["n4"]
    msg = plan.errors["n4"]
    assert "exhausted" in msg and "10.244.0.0/22" in msg and "n4" in msg
    st.errors = {"n4": msg}
    assert plan_pod_cidrs(st, "10.244.0.0/22", 24).errors == {}  # not re-written every pass


def test_gc_candidates_need_grace_of_continuous_unreference():
    due, since = gc_candidates({300, 301, 302}, {301}, {}, now=100.0, grace=30)
    assert due == [] and since == {300: 100.0, 302: 100.0}
    due, since = gc_candidates({300, 301, 302}, {302}, since, now=131.0, grace=30)
    # 302 got a ref (its clock is gone), 301 lost its ref (its clock starts now).
    assert due == [300] and since == {300: 100.0, 301: 131.0}
    due, since = gc_candidates({300, 302}, set(), since, now=135.0, grace=30)
    assert due == [300] and since[302] == 135.0


def test_parse_args_validates():
    a = parse_args(["--store", "sqlite:///tmp/x.db"])
    assert (a.cluster_cidr, a.node_cidr_mask_size, a.identity_gc_interval, a.identity_gc_grace) == \
        ("10.244.0.0/16", 24, 10.0, 30.0)
    for bad in (["--store", "sqlite:///tmp/x.db", "--cluster-cidr", "10.244.0.1/16"],
                ["--store", "sqlite:///tmp/x.db", "--node-cidr-mask-size", "8"],
                ["--store", "bogus://x"], []):
        with pytest.raises(SystemExit) as e:
            parse_args(bad)
        assert e.value.code == 2


# ---------------------------------------------------------------- against real stores


def reg(name: str, preferred: str | None = None) -> bytes:
    d = {"name": name, "ip": "172.29.0.9"}
    if preferred:
        d["preferredPodCIDR"] = preferred
    return json.dumps(d).encode()


async def converge(alloc: PodCIDRAllocator, rounds: int = 20):
    for _ in range(rounds):
        plan, clean = await alloc.reconcile()
        if clean and plan.empty():
            return
    raise AssertionError("pod CIDR reconcile did not converge")


async def allocations(store) -> tuple[dict[str, str], dict[str, str], dict[str, str]]:
    pods, _ = await store.list(PODCIDRS_PREFIX)
    claims, _ = await store.list(CLAIMS_PREFIX)
    errors, _ = await store.list(ERRORS_PREFIX)
    return ({kv.key[len(PODCIDRS_PREFIX):]: json.loads(kv.value)["cidr"] for kv in pods},
            {kv.key[len(CLAIMS_PREFIX):]: json.loads(kv.value)["node"] for kv in claims},
            {kv.key[len(ERRORS_PREFIX):]: json.loads(kv.value)["error"] for kv in errors})


def assert_consistent(pods: dict[str, str], claims: dict[str, str]) -> None:
    assert len(set(pods.values())) == len(pods), f"a CIDR was handed out twice: {pods}"
    assert {c.replace("/", "-"): n for n, c in pods.items()} == claims


@pytest.fixture(scope="module")
def etcd():
    srv = EtcdServer()
    try:
        srv.start()
        yield srv
    finally:
        srv.cleanup()


@pytest.mark.parametrize("backend", ["sqlite", "etcd"])
def test_two_operators_racing_never_hand_out_a_cidr_twice(backend, tmp_path, request):
    url = f"sqlite://{tmp_path}/kv.db" if backend == "sqlite" else request.getfixturevalue("etcd").url

    async def main():
        s1, s2 = open_store(url), open_store(url)
        try:
            await s1.delete_prefix("/cilia/")
            a1, a2 = PodCIDRAllocator(s1), PodCIDRAllocator(s2)
            done = asyncio.Event()

            async def register():
                # Nodes arrive while both operators work, so their snapshots differ and the
                # same CIDR is planned for different nodes. Half want the same CIDR too.
                for i in range(30):
                    await s1.put(f"/cilia/nodes/v1/n{i:02d}", reg(f"n{i:02d}", "10.244.5.0/24" if i % 2 else None))
                    await asyncio.sleep(0.001 * (i % 3))
                done.set()

            async def operate(a):
                while not done.is_set():
                    await a.reconcile()
                await converge(a)

            await asyncio.gather(register(), operate(a1), operate(a2))
            await asyncio.gather(converge(a1), converge(a2))
            pods, claims, errors = await allocations(s1)
            assert len(pods) == 30 and errors == {}
            assert_consistent(pods, claims)
            assert list(pods.values()).count("10.244.5.0/24") == 1
            assert "10.244.0.0/24" not in pods.values()
        finally:
            await s1.close()
            await s2.close()

    arun(main(), timeout=60)


def test_allocation_survives_restart_and_agent_restart(tmp_path):
    url = f"sqlite://{tmp_path}/kv.db"

    async def main():
        s = open_store(url)
        try:
            lease = await s.lease_grant(60)
            await s.put("/cilia/nodes/v1/node1", reg("node1", "10.244.7.0/24"), lease=lease)
            await s.put("/cilia/k8s/nodes/node1", b'{"kind":"Node"}')
            await s.put("/cilia/nodes/v1/node2", reg("node2"))
            await converge(PodCIDRAllocator(s))
            before, claims, _ = await allocations(s)
            assert before == {"node1": "10.244.7.0/24", "node2": "10.244.1.0/24"}
            # The agent on node1 restarts: its registration lease expires...
            await s.lease_revoke(lease)
            # ...and a new operator process starts meanwhile: state lives only in the store.
            fresh = PodCIDRAllocator(s)
            await converge(fresh)
            assert (await allocations(s))[0] == before
            # A third node registers while node1 is away and must not get node1's CIDR.
            await s.put("/cilia/nodes/v1/node3", reg("node3", "10.244.7.0/24"))
            await converge(fresh)
            await s.put("/cilia/nodes/v1/node1", reg("node1"))  # back, without a preference
            await converge(fresh)
            pods, claims, _ = await allocations(s)
            assert pods == {"node1": "10.244.7.0/24", "node2": "10.244.1.0/24", "node3": "10.244.2.0/24"}
            assert_consistent(pods, claims)
        finally:
            await s.close()

    arun(main())


def test_release_only_when_node_object_and_registration_are_gone(tmp_path):
    url = f"sqlite://{tmp_path}/kv.db"

    async def main():
        s = open_store(url)
        try:
            a = PodCIDRAllocator(s)
            await s.put("/cilia/nodes/v1/node1", reg("node1"))
            await s.put("/cilia/k8s/nodes/node1", b"{}")
            await converge(a)
            assert (await allocations(s))[0] == {"node1": "10.244.1.0/24"}
            await s.delete("/cilia/k8s/nodes/node1")
            await converge(a)
            assert (await allocations(s))[0] == {"node1": "10.244.1.0/24"}
            await s.put("/cilia/k8s/nodes/node1", b"{}")
            await s.delete("/cilia/nodes/v1/node1")
            await converge(a)
            assert (await allocations(s))[0] == {"node1": "10.244.1.0/24"}
            await s.delete("/cilia/k8s/nodes/node1")
            await converge(a)
            assert await allocations(s) == ({}, {}, {})
            # The freed CIDR is handed out again.
            await s.put("/cilia/nodes/v1/node9", reg("node9"))
            await converge(a)
            assert (await allocations(s))[0] == {"node9": "10.244.1.0/24"}
        finally:
            await s.close()

    arun(main())


def test_exhaustion_writes_error_and_recovers(tmp_path):
    url = f"sqlite://{tmp_path}/kv.db"

    async def main():
        s = open_store(url)
        try:
            a = PodCIDRAllocator(s, "10.244.0.0/22", 24)
            for i in range(1, 5):
                await s.put(f"/cilia/nodes/v1/n{i}", reg(f"n{i}"))
            await converge(a)
            pods, claims, errors = await allocations(s)
            assert sorted(pods) == ["n1", "n2", "n3"]
            assert list(errors) == ["n4"] and "exhausted" in errors["n4"]
            await s.delete("/cilia/nodes/v1/n2")
            await converge(a)
            pods, claims, errors = await allocations(s)
            assert pods == {"n1": "10.244.1.0/24", "n3": "10.244.3.0/24", "n4": "10.244.2.0/24"}
            assert errors == {}
            assert_consistent(pods, claims)
        finally:
            await s.close()

    arun(main())


def test_crash_leftovers_are_repaired(tmp_path):
    url = f"sqlite://{tmp_path}/kv.db"

    async def main():
        s = open_store(url)
        try:
            await s.put("/cilia/nodes/v1/a", reg("a"))
            await s.put("/cilia/nodes/v1/b", reg("b"))
            await s.put(claim_key("10.244.4.0/24"), b'{"node":"a"}')     # died before podcidrs
            await s.put(claim_key("10.244.9.0/24"), b'{"node":"ghost"}')  # node long gone
            await s.put(podcidr_key("b"), b'{"cidr":"10.244.6.0/24"}')   # claim lost
            await converge(PodCIDRAllocator(s))
            pods, claims, _ = await allocations(s)
            assert pods == {"a": "10.244.4.0/24", "b": "10.244.6.0/24"}
            assert_consistent(pods, claims)
        finally:
            await s.close()

    arun(main())


def test_identity_gc_after_grace_keeps_referenced(tmp_path):
    url = f"sqlite://{tmp_path}/kv.db"

    async def main():
        s = open_store(url)
        a = IdentityAllocator(s, "node1")
        try:
            await a.start()
            used = await a.allocate(["k8s:app=used"])
            unused = await a.allocate(["k8s:app=unused"])
            await a.release(unused.id)
            gc = IdentityGC(s, grace=30)
            t0 = time.monotonic()
            assert (await gc.run_once(now=t0)).deleted == []
            assert (await gc.run_once(now=t0 + 29)).deleted == []
            assert (await gc.run_once(now=t0 + 31)).deleted == [unused.id]
            assert await s.get(id_key(unused.id)) is None
            assert await s.get(value_key(unused.labels)) is None
            assert await s.get(id_key(used.id)) is not None
            assert (await gc.run_once(now=t0 + 100)).deleted == []
            # Once its last ref goes, the used one follows after its own grace period.
            await a.release(used.id)
            assert (await gc.run_once(now=t0 + 101)).deleted == []
            assert (await gc.run_once(now=t0 + 132)).deleted == [used.id]
            assert (await s.list(ID_PREFIX))[0] == []
        finally:
            await a.close()
            await s.close()

    arun(main())


def test_a_dying_root_task_stops_the_operator_non_zero(tmp_path):
    url = f"sqlite://{tmp_path}/kv.db?poll_interval=0.02"

    async def main():
        s = open_store(url)
        op = Operator(s, OperatorConfig(identity_gc_interval=60))
        sup = Supervisor()
        op.add_tasks(sup)
        runner = asyncio.create_task(sup.run())
        try:
            deadline = time.monotonic() + 10
            while await s.get(STATUS_KEY) is None:
                assert time.monotonic() < deadline
                await asyncio.sleep(0.02)
            await s.close()  # every watch ends: the operator must not limp on without them
            rc = await asyncio.wait_for(runner, 10)
        finally:
            await op.shutdown()
            await s.close()
        assert rc == 1

    arun(main(), timeout=30)


# ---------------------------------------------------------------- the real process


class Operators:
    """cilia-operator subprocesses started by this test; only these are ever killed."""

    def __init__(self, tmp_path):
        self.tmp_path = tmp_path
        self.procs: list[subprocess.Popen] = []

    def start(self, url: str, *extra: str) -> subprocess.Popen:
        log = open(self.tmp_path / f"operator{len(self.procs)}.log", "wb")
        p = subprocess.Popen([sys.executable, "-m", "cilia.operator.main", "--store", url,
                              "--identity-gc-interval", "0.2", "--identity-gc-grace", "0.5", *extra],
                             stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
        log.close()
        self.procs.append(p)
        return p

    def logs(self) -> str:
        return "\n".join((self.tmp_path / f"operator{i}.log").read_text(errors="replace")
                         for i in range(len(self.procs)))

    def cleanup(self) -> None:
        for p in self.procs:
            if p.poll() is None:
                p.kill()
                p.wait(10)


@pytest.fixture
def operators(tmp_path):
    ops = Operators(tmp_path)
    try:
        yield ops
    finally:
        ops.cleanup()


def wait_until(cond, timeout: float = 15.0, what: str = "condition"):
    deadline = time.monotonic() + timeout
    while True:
        got = cond()
        if got:
            return got
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.05)


def test_operator_process_end_to_end(tmp_path, operators):
    url = f"sqlite://{tmp_path}/kv.db?poll_interval=0.02"
    with SyncStore(url) as s:
        s.put("/cilia/nodes/v1/node1", reg("node1", "10.244.3.0/24"))
        s.put("/cilia/nodes/v1/node2", reg("node2", "10.244.3.0/24"))
        # An identity nobody references and one a live node references.
        lease = s.lease_grant(60)
        s.put(id_key(300), b'{"labels":["k8s:app=dead"]}')
        s.put(value_key(["k8s:app=dead"]), b'{"id":300}')
        s.put(id_key(301), b'{"labels":["k8s:app=live"]}')
        s.put(value_key(["k8s:app=live"]), b'{"id":301}')
        s.put("/cilia/identities/v1/refs/301/node1", b"", lease=lease)

        p = operators.start(url)
        try:
            status = wait_until(lambda: s.get(STATUS_KEY), what="operator status")
            st = json.loads(status.value)
            assert st["ok"] is True and st["pid"] == p.pid and abs(st["time"] - time.time()) < 10
            assert status.lease != 0
            pods = wait_until(lambda: len(s.list(PODCIDRS_PREFIX)[0]) == 2 and s.list(PODCIDRS_PREFIX)[0],
                              what="pod CIDRs")
            got = {kv.key[len(PODCIDRS_PREFIX):]: json.loads(kv.value)["cidr"] for kv in pods}
            assert got == {"node1": "10.244.3.0/24", "node2": "10.244.1.0/24"}
            # A node that registers later is handled from the watch, within moments.
            s.put("/cilia/nodes/v1/node3", reg("node3"))
            wait_until(lambda: s.get(podcidr_key("node3")), timeout=5, what="node3's CIDR")
            assert json.loads(s.get(podcidr_key("node3")).value) == {"cidr": "10.244.2.0/24"}
            wait_until(lambda: s.get(id_key(300)) is None, timeout=10, what="identity GC")
            assert s.get(value_key(["k8s:app=dead"])) is None
            time.sleep(0.8)  # more than the grace period and a few GC runs
            assert s.get(id_key(301)) is not None
            p.send_signal(signal.SIGTERM)
            assert p.wait(15) == 0, operators.logs()
            # A clean stop revokes the lease: `cilia status` sees the operator gone at once.
            assert s.get(STATUS_KEY) is None

            # A restarted operator keeps every allocation.
            p2 = operators.start(url)
            wait_until(lambda: s.get(STATUS_KEY), what="restarted operator")
            s.put("/cilia/nodes/v1/node4", reg("node4"))
            wait_until(lambda: s.get(podcidr_key("node4")), what="node4's CIDR")
            pods = {kv.key[len(PODCIDRS_PREFIX):]: json.loads(kv.value)["cidr"]
                    for kv in s.list(PODCIDRS_PREFIX)[0]}
            assert pods == {"node1": "10.244.3.0/24", "node2": "10.244.1.0/24",
                            "node3": "10.244.2.0/24", "node4": "10.244.4.0/24"}
            p2.send_signal(signal.SIGTERM)
            assert p2.wait(15) == 0, operators.logs()
        finally:
            s.lease_revoke(lease)


def test_two_operator_processes_racing(tmp_path, operators):
    url = f"sqlite://{tmp_path}/kv.db?poll_interval=0.02"
    with SyncStore(url) as s:
        procs = [operators.start(url), operators.start(url)]
        wait_until(lambda: s.get(STATUS_KEY), what="operators up")
        time.sleep(0.3)
        for i in range(40):
            s.put(f"/cilia/nodes/v1/n{i:02d}", reg(f"n{i:02d}", "10.244.9.0/24" if i % 3 == 0 else None))
            time.sleep(0.005 * (i % 4))
        wait_until(lambda: len(s.list(PODCIDRS_PREFIX)[0]) == 40, what="40 pod CIDRs")
        time.sleep(0.5)  # let both settle: no late duplicate may appear
        pods = {kv.key[len(PODCIDRS_PREFIX):]: json.loads(kv.value)["cidr"] for kv in s.list(PODCIDRS_PREFIX)[0]}
        claims = {kv.key[len(CLAIMS_PREFIX):]: json.loads(kv.value)["node"] for kv in s.list(CLAIMS_PREFIX)[0]}
        assert_consistent(pods, claims)
        assert list(pods.values()).count("10.244.9.0/24") == 1
        for p in procs:
            assert p.poll() is None, operators.logs()
            p.send_signal(signal.SIGTERM)
        for p in procs:
            assert p.wait(15) == 0, operators.logs()

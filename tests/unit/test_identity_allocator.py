"""Cluster-wide identity allocation on real stores: SQLite files and a real etcd.

Several IdentityAllocator instances, each with its own store connection, stand in for the
agents of several nodes; on SQLite two extra OS processes race as well.
"""
from __future__ import annotations

import asyncio
import json
import random
import subprocess
import sys
import time

import pytest

from cilia.identity.allocator import (
    ID_PREFIX,
    REFS_PREFIX,
    VALUE_PREFIX,
    IdentityAllocator,
    IdentityExhausted,
    encode_id_value,
    id_key,
    parse_id_kv,
    parse_ref_key,
    parse_value_kv,
    ref_key,
    value_key,
)
from cilia.identity.labels import normalize
from cilia.identity.reserved import MAX_GLOBAL, MIN_GLOBAL, Identity
from cilia.kvstore import StoreUnavailable, open_store
from cilia.operator.identity_gc import IdentityGC
from tests.unit.test_kvstore_contract import EtcdServer, arun

pytestmark = pytest.mark.timeout(120)


@pytest.fixture(scope="module")
def etcd():
    srv = EtcdServer()
    try:
        srv.start()
        yield srv
    finally:
        srv.cleanup()


@pytest.fixture(params=["sqlite", "etcd"])
def url(request, tmp_path):
    if request.param == "sqlite":
        return f"sqlite://{tmp_path}/kv.db?poll_interval=0.02"
    srv = request.getfixturevalue("etcd")
    # A fresh etcd per test would cost seconds; wipe what an earlier test left instead.
    async def wipe():
        s = open_store(srv.url)
        try:
            await s.delete_prefix("/cilia/")
        finally:
            await s.close()
    arun(wipe())
    return srv.url


def labelset(i: int) -> list[str]:
    return [f"k8s:app=app{i}", "k8s:io.kubernetes.pod.namespace=default", f"k8s:tier=t{i % 3}"]


class Nodes:
    """n allocators, each with its own store connection, closed whatever happens."""

    def __init__(self, url: str, n: int, **kw):
        self.url, self.n, self.kw = url, n, kw
        self.stores = []
        self.allocs: list[IdentityAllocator] = []

    async def __aenter__(self) -> list[IdentityAllocator]:
        for i in range(self.n):
            s = open_store(self.url)
            self.stores.append(s)
            a = IdentityAllocator(s, f"node{i + 1}", **self.kw)
            self.allocs.append(a)
            await a.start()
        return self.allocs

    async def __aexit__(self, *exc):
        for a in self.allocs:
            try:
                await a.close()
            except Exception:
                pass
        for s in self.stores:
            await s.close()


async def store_state(url: str):
    s = open_store(url)
    try:
        ids, _ = await s.list(ID_PREFIX)
        values, _ = await s.list(VALUE_PREFIX)
        refs, _ = await s.list(REFS_PREFIX)
    finally:
        await s.close()
    by_id = {i.id: i.labels for i in (parse_id_kv(kv.key, kv.value) for kv in ids)}
    by_labels = dict(parse_value_kv(kv.key, kv.value) for kv in values)
    return by_id, by_labels, refs


def assert_bijection(by_id: dict, by_labels: dict) -> None:
    assert len(set(by_id.values())) == len(by_id), "one label set has two id keys"
    assert len(set(by_labels.values())) == len(by_labels), "one id is indexed for two label sets"
    for labels, n in by_labels.items():
        assert by_id.get(n) == labels, f"value key {labels} -> {n}, but id {n} is {by_id.get(n)}"
    assert set(by_id) == set(by_labels.values())


def test_same_labels_same_id_across_nodes_and_order(url):
    async def main():
        async with Nodes(url, 2) as (a, b):
            i1 = await a.allocate(["k8s:app=web", "k8s:io.kubernetes.pod.namespace=default"])
            i2 = await b.allocate(["k8s:io.kubernetes.pod.namespace=default", "k8s:app=web"])
            assert i1 == i2
            assert isinstance(i1, Identity) and MIN_GLOBAL <= i1.id <= MAX_GLOBAL
            assert i1.labels == ("k8s:app=web", "k8s:io.kubernetes.pod.namespace=default")
            other = await b.allocate(["k8s:app=db", "k8s:io.kubernetes.pod.namespace=default"])
            assert other.id != i1.id
            assert await a.lookup(other.id) == other  # a never allocated it: read from the store
            assert await a.lookup(1) == Identity(1, ("reserved:host",))
            assert await a.lookup(65000 if i1.id != 65000 else 65001) is None
            assert [i.id for i in await a.list()] == sorted([i1.id, other.id])
            assert await b.lookup_labels(["k8s:io.kubernetes.pod.namespace=default", "k8s:app=db"]) == other
            # Reserved label sets never touch the store.
            assert await a.allocate(["reserved:world"]) == Identity(2, ("reserved:world",))
            with pytest.raises(ValueError):
                await a.allocate([])
        by_id, by_labels, refs = await store_state(url)
        assert_bijection(by_id, by_labels)
        assert refs == []  # close() revoked both leases

    arun(main())


def test_concurrent_allocators_form_a_bijection(url):
    """8 nodes x 50 label sets, all at once, every node in its own order."""
    async def main():
        sets = [labelset(i) for i in range(50)]
        async with Nodes(url, 8) as allocs:
            async def node_run(a: IdentityAllocator, seed: int):
                order = list(range(50))
                random.Random(seed).shuffle(order)
                got = await asyncio.gather(*(a.allocate(sets[i]) for i in order))
                return {order[k]: ident.id for k, ident in enumerate(got)}

            results = await asyncio.gather(*(node_run(a, k) for k, a in enumerate(allocs)))
            for i in range(50):
                assert len({r[i] for r in results}) == 1, f"label set {i} got several ids"
            ids = [results[0][i] for i in range(50)]
            assert len(set(ids)) == 50
            assert all(MIN_GLOBAL <= n <= MAX_GLOBAL for n in ids)
            by_id, by_labels, refs = await store_state(url)
            assert_bijection(by_id, by_labels)
            assert {by_labels[normalize(sets[i])] for i in range(50)} == set(ids)
            assert len(by_id) == 50  # losers of the value race removed their id keys
            assert len(refs) == 8 * 50
            assert all(kv.lease != 0 for kv in refs)
            assert {parse_ref_key(kv.key) for kv in refs} == {(n, f"node{k + 1}") for n in ids for k in range(8)}

    arun(main(), timeout=60)


CHILD = r"""
import asyncio, json, sys, time
from cilia.kvstore import open_store
from cilia.identity.allocator import IdentityAllocator
url, node, start_at, count = sys.argv[1], sys.argv[2], float(sys.argv[3]), int(sys.argv[4])

async def main():
    s = open_store(url)
    a = IdentityAllocator(s, node)
    await a.start()
    while time.time() < start_at:
        await asyncio.sleep(0.002)
    out = {}
    for i in range(count):
        labels = [f"k8s:app=app{i}", "k8s:io.kubernetes.pod.namespace=default", f"k8s:tier=t{i % 3}"]
        out[i] = (await a.allocate(labels)).id
    print(json.dumps(out), flush=True)
    # Leave the refs to the lease: the parent checks the store while we are gone.
    await s.close()

asyncio.run(main())
"""


def test_two_processes_and_tasks_race_on_sqlite(tmp_path):
    url = f"sqlite://{tmp_path}/kv.db?poll_interval=0.02"
    start_at = time.time() + 1.5  # after both interpreters have imported everything
    procs = [subprocess.Popen([sys.executable, "-c", CHILD, url, f"proc{k}", str(start_at), "50"],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for k in range(2)]
    try:
        async def main():
            async with Nodes(url, 2) as allocs:
                while time.time() < start_at:
                    await asyncio.sleep(0.002)

                async def run(a):
                    return {i: (await a.allocate(labelset(i))).id for i in range(50)}
                return await asyncio.gather(*(run(a) for a in allocs))

        mine = arun(main(), timeout=60)
        theirs = []
        for p in procs:
            out, err = p.communicate(timeout=60)
            assert p.returncode == 0, err
            theirs.append({int(k): v for k, v in json.loads(out).items()})
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
    results = mine + theirs
    for i in range(50):
        assert len({r[i] for r in results}) == 1, f"label set {i}: {[r[i] for r in results]}"
    assert len({results[0][i] for i in range(50)}) == 50
    by_id, by_labels, _ = arun(store_state(url))
    assert_bijection(by_id, by_labels)
    assert len(by_id) == 50


def test_refs_carry_the_lease_and_vanish_with_it(url):
    async def main():
        async with Nodes(url, 2) as (a, b):
            ident = await a.allocate(labelset(1))
            await b.allocate(labelset(1))
            s = a.store
            kv = await s.get(ref_key(ident.id, "node1"))
            assert kv is not None and kv.lease == a.lease != 0
            await s.lease_revoke(a.lease)  # what an expired lease does
            assert await s.get(ref_key(ident.id, "node1")) is None
            assert await s.get(ref_key(ident.id, "node2")) is not None
            # The identity itself is not lease-bound: only the GC removes it.
            assert await s.get(id_key(ident.id)) is not None

    arun(main())


def test_release_drops_ref_after_last_local_user(url):
    async def main():
        async with Nodes(url, 1) as (a,):
            ident = await a.allocate(labelset(2))
            again = await a.allocate(list(reversed(labelset(2))))
            assert again is ident and a.refcount(ident.id) == 2
            key = ref_key(ident.id, "node1")
            assert await a.release(ident.id) is False
            assert await a.store.get(key) is not None
            assert await a.release(ident.id) is True
            assert await a.store.get(key) is None
            with pytest.raises(KeyError):
                await a.release(ident.id)
            assert await a.release(2) is False  # reserved: nothing to drop
            # The identity stays in the store for the next user until the GC takes it.
            assert (await a.allocate(labelset(2))).id == ident.id

    arun(main())


def test_resync_after_lease_loss_rewrites_refs(url):
    async def main():
        async with Nodes(url, 1, lease_ttl=60) as (a,):
            held = [await a.allocate(labelset(i)) for i in range(5)]
            old = a.lease
            await a.store.lease_revoke(old)
            refs, _ = await a.store.list(REFS_PREFIX)
            assert refs == []
            changed = await a.resync()
            assert changed == {}
            assert a.lease not in (0, old)
            refs, _ = await a.store.list(REFS_PREFIX)
            assert {parse_ref_key(kv.key)[0] for kv in refs} == {i.id for i in held}
            assert all(kv.lease == a.lease for kv in refs)
            # Allocation after resync still sees the held set with its refcount.
            assert await a.allocate(labelset(0)) == held[0] and a.refcount(held[0].id) == 2

    arun(main())


def test_keepalive_resyncs_by_itself_after_lease_loss(tmp_path):
    url = f"sqlite://{tmp_path}/kv.db?poll_interval=0.02"

    async def main():
        async with Nodes(url, 1, lease_ttl=1) as (a,):
            ident = await a.allocate(labelset(3))
            await a.store.lease_revoke(a.lease)
            deadline = time.monotonic() + 5
            while await a.store.get(ref_key(ident.id, "node1")) is None:
                assert time.monotonic() < deadline, "keepalive did not restore the ref"
                await asyncio.sleep(0.05)
            # and it keeps the new lease alive past its TTL
            await asyncio.sleep(1.6)
            assert await a.store.get(ref_key(ident.id, "node1")) is not None

    arun(main())


def test_resync_recreates_collected_identity_or_replaces_it(url):
    async def main():
        # A long TTL keeps the keepalive loop from resyncing on its own mid-test.
        async with Nodes(url, 2, lease_ttl=60) as (a, b):
            keep = await a.allocate(labelset(10))
            lose = await a.allocate(labelset(11))
            changes = []
            a.on_change = changes.append
            await a.store.lease_revoke(a.lease)
            # The operator's GC collects both while node1 is cut off.
            gc = IdentityGC(b.store, grace=0)
            assert sorted((await gc.run_once()).deleted) == sorted([keep.id, lose.id])
            # Meanwhile node2 gives labelset(11) a new id.
            taken = await b.allocate(labelset(11))
            assert taken.id != lose.id
            changed = await a.resync()
            assert changed == {lose.id: taken}
            assert changes == [changed]
            assert await a.lookup(keep.id) == keep  # re-created under its old number
            assert await a.allocate(labelset(11)) == taken
            by_id, by_labels, _ = await store_state(url)
            assert_bijection(by_id, by_labels)

    arun(main())


def test_gc_never_collects_an_identity_in_use(tmp_path):
    """Allocators churn while a zero-grace GC runs flat out: every identity a node holds
    must exist in the store with its labels, and no label set may have two ids."""
    url = f"sqlite://{tmp_path}/kv.db?poll_interval=0.02"

    async def main():
        async with Nodes(url, 3) as allocs:
            gc_store = open_store(url)
            gc = IdentityGC(gc_store, grace=0)
            stop = asyncio.Event()
            collected = 0

            async def gc_loop():
                nonlocal collected
                while not stop.is_set():
                    collected += len((await gc.run_once()).deleted)
                    await asyncio.sleep(0)

            async def churn(a: IdentityAllocator, seed: int):
                rng = random.Random(seed)
                held: list[Identity] = []
                while not stop.is_set():
                    if held and rng.random() < 0.5:
                        await a.release(held.pop(rng.randrange(len(held))).id)
                    else:
                        held.append(await a.allocate(labelset(rng.randrange(6))))
                    for ident in a.held():
                        kv = await a.store.get(id_key(ident.id))
                        assert kv is not None, f"identity {ident.id} held by {a.node} was collected"
                        assert parse_id_kv(kv.key, kv.value).labels == ident.labels

            tasks = [asyncio.create_task(gc_loop())] + [
                asyncio.create_task(churn(a, k)) for k, a in enumerate(allocs)]
            try:
                await asyncio.sleep(3)
            finally:
                stop.set()
                await asyncio.gather(*tasks)
                await gc_store.close()
            assert collected > 0, "the GC never ran into the allocators; the test proves nothing"
            ids = {}
            for a in allocs:
                for ident in a.held():
                    assert ids.setdefault(ident.labels, ident.id) == ident.id, "two ids for one label set in use"

    arun(main(), timeout=60)


def test_allocator_unmarks_identity_the_gc_is_about_to_delete(url):
    async def main():
        async with Nodes(url, 1) as (a,):
            ident = await a.allocate(labelset(20))
            await a.release(ident.id)
            s = a.store
            kv = await s.get(id_key(ident.id))
            # The GC marked it (step one of its handshake) and then got slow.
            assert await s.cas(kv.key, encode_id_value(ident.labels, deleting=True), kv.mod_revision)
            again = await a.allocate(labelset(20))
            assert again.id == ident.id
            assert "deleting" not in json.loads((await s.get(id_key(ident.id))).value)
            # The GC's final step is a CAS at the marked revision; it must now fail.
            gc = IdentityGC(s, grace=0)
            assert await gc.collect(ident.id) is False
            assert await s.get(id_key(ident.id)) is not None

    arun(main())


def test_stale_value_keys_are_repaired_not_trusted(url):
    async def main():
        async with Nodes(url, 2) as (a, b):
            s = a.store
            # An index entry whose identity vanished (a GC that died between its deletes).
            assert await s.cas(value_key(labelset(30)), b'{"id": 4242}', 0)
            # And one that points at an id now owned by another label set.
            other = await a.allocate(labelset(31))
            assert await s.cas(value_key(labelset(32)), json.dumps({"id": other.id}).encode(), 0)
            # And an unreadable one.
            assert await s.cas(value_key(labelset(33)), b"garbage", 0)
            got33 = await b.allocate(labelset(33))
            assert await a.lookup(got33.id) == got33
            got30 = await a.allocate(labelset(30))
            got32a = await a.allocate(labelset(32))  # a holds `other`: caught from its cache
            got32b = await b.allocate(labelset(32))  # b does not: caught by the id key check
            assert got32a == got32b and got32a.id != other.id
            assert (await b.lookup(got30.id)).labels == normalize(labelset(30))
            assert await b.lookup(other.id) == other
            if got30.id != 4242:
                assert await s.get(ref_key(4242, "node1")) is None
            by_id, by_labels, _ = await store_state(url)
            assert_bijection(by_id, by_labels)
            assert len(by_id) == 4

    arun(main())


def test_exhausted_range_raises(tmp_path):
    url = f"sqlite://{tmp_path}/kv.db"

    async def main():
        async with Nodes(url, 1, min_id=300, max_id=303) as (a,):
            got = {(await a.allocate(labelset(i))).id for i in range(4)}
            assert got == {300, 301, 302, 303}
            with pytest.raises(IdentityExhausted):
                await a.allocate(labelset(99))

    arun(main())


def test_cached_allocation_survives_store_outage_new_one_raises():
    srv = EtcdServer()
    try:
        srv.start()

        async def main():
            s = open_store(f"etcd://{srv.endpoint}?timeout=1")
            a = IdentityAllocator(s, "node1")
            try:
                await a.start()
                ident = await a.allocate(labelset(40))
                srv.stop()
                # A held label set is answered locally: no store round trip at all.
                assert await a.allocate(labelset(40)) == ident
                with pytest.raises(StoreUnavailable):
                    await a.allocate(labelset(41))
            finally:
                await a.close()  # the lease revoke fails and is only logged
                await s.close()

        arun(main(), timeout=30)
    finally:
        srv.cleanup()

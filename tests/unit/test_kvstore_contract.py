"""One contract suite for every kvstore backend, against real backends only.

sqlite runs on a real file in a tmp dir; etcd runs as a real etcd process this
module starts on free loopback ports with a throwaway data dir, and kills and
removes at teardown (failed tests included). Tests that stop or restart etcd
get their own instance; the rest share one per module and isolate themselves
with a unique key prefix (so etcd tests never assume absolute revisions).
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
import uuid

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from cilia.kvstore import (
    KV,
    MAX_TXN_OPS,
    Compacted,
    Event,
    LeaseNotFound,
    Store,
    StoreUnavailable,
    SyncStore,
    open_store,
)

ETCD = shutil.which("etcd") or "/usr/bin/etcd"

pytestmark = pytest.mark.timeout(120)


# ---------------------------------------------------------------- helpers


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _die_with_parent() -> None:
    # If pytest itself is killed, the kernel kills the etcd we started.
    ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG


class EtcdServer:
    """An etcd process owned by the test session; stop/start keep ports and data."""

    def __init__(self) -> None:
        base = "/dev/shm" if os.path.isdir("/dev/shm") else None  # tmpfs: fsyncs are free
        self.dir = tempfile.mkdtemp(prefix="cilia-test-etcd-", dir=base)
        self.client_port = _free_port()
        self.peer_port = _free_port()
        self.proc: subprocess.Popen | None = None

    @property
    def endpoint(self) -> str:
        return f"127.0.0.1:{self.client_port}"

    @property
    def url(self) -> str:
        return f"etcd://{self.endpoint}?timeout=3"

    def start(self, timeout: float = 20.0) -> None:
        assert self.proc is None or self.proc.poll() is not None
        peer = f"http://127.0.0.1:{self.peer_port}"
        client = f"http://{self.endpoint}"
        log = open(os.path.join(self.dir, "etcd.log"), "ab")
        self.proc = subprocess.Popen(
            [ETCD, "--name", "t", "--data-dir", os.path.join(self.dir, "data"),
             "--listen-client-urls", client, "--advertise-client-urls", client,
             "--listen-peer-urls", peer, "--initial-advertise-peer-urls", peer,
             "--initial-cluster", f"t={peer}", "--log-level", "warn", "--logger", "zap"],
            stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
            preexec_fn=_die_with_parent,
        )
        log.close()
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"etcd exited with {self.proc.returncode}: {self.log_tail()}")
            try:
                with urllib.request.urlopen(f"{client}/health", timeout=1) as r:
                    if json.load(r).get("health") == "true":
                        return
            except OSError:
                pass
            time.sleep(0.05)
        raise RuntimeError(f"etcd not healthy after {timeout}s: {self.log_tail()}")

    def stop(self, sig: int = signal.SIGTERM) -> None:
        if self.proc is None or self.proc.poll() is not None:
            return
        self.proc.send_signal(sig)
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(10)

    def cleanup(self) -> None:
        try:
            self.stop(signal.SIGKILL)
        finally:
            shutil.rmtree(self.dir, ignore_errors=True)

    def log_tail(self) -> str:
        with contextlib.suppress(OSError), open(os.path.join(self.dir, "etcd.log"), "rb") as f:
            return f.read()[-2000:].decode(errors="replace")
        return ""


@pytest.fixture(scope="module")
def etcd_server():
    srv = EtcdServer()
    try:
        srv.start()
        yield srv
    finally:
        srv.cleanup()


@pytest.fixture
def etcd_own():
    """A private etcd for tests that stop or restart it."""
    srv = EtcdServer()
    try:
        srv.start()
        yield srv
    finally:
        srv.cleanup()


@pytest.fixture(params=["sqlite", "etcd"])
def store_url(request, tmp_path):
    if request.param == "sqlite":
        return f"sqlite://{tmp_path}/kv.db?poll_interval=0.02"
    return request.getfixturevalue("etcd_server").url


def arun(coro, timeout: float = 30.0):
    """Run a test coroutine; fail on timeout and on tasks it leaves running."""

    async def main():
        try:
            return await asyncio.wait_for(coro, timeout)
        finally:
            # Cancelled gRPC calls need a few loop turns to finish their own
            # bookkeeping; anything still running after the grace period leaked.
            others = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
            if others:
                await asyncio.wait(others, timeout=1.0)
            leaked = [t for t in others if not t.done()]
            for t in leaked:
                t.cancel()
            assert not leaked, f"test leaked tasks: {leaked}"

    return asyncio.run(main())


@contextlib.asynccontextmanager
async def opened(url: str):
    s = open_store(url)
    try:
        yield s
    finally:
        await s.close()


def new_prefix() -> str:
    return f"/test/{uuid.uuid4().hex[:12]}/"


async def take(agen, n: int, timeout: float = 10.0) -> list[Event]:
    """The first n events of a watch, then close it."""
    out: list[Event] = []

    async def run():
        async with contextlib.aclosing(agen):
            async for ev in agen:
                out.append(ev)
                if len(out) >= n:
                    return

    try:
        await asyncio.wait_for(run(), timeout)
    except asyncio.TimeoutError:
        raise AssertionError(f"got {len(out)} of {n} events: {out}") from None
    return out


async def assert_no_event(agen, within: float = 0.3) -> None:
    async with contextlib.aclosing(agen):
        with pytest.raises(asyncio.TimeoutError):
            ev = await asyncio.wait_for(agen.__anext__(), within)
            pytest.fail(f"unexpected event {ev}")


async def eventually(fn, timeout: float = 10.0, interval: float = 0.05):
    """Await fn() until it returns truthy; returns its value."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            v = await fn()
            if v:
                return v
        except StoreUnavailable:
            if time.monotonic() > deadline:
                raise
        if time.monotonic() > deadline:
            raise AssertionError(f"condition not met within {timeout}s")
        await asyncio.sleep(interval)


# ---------------------------------------------------------------- basic ops


def test_get_put_delete_list(store_url):
    P = new_prefix()

    async def body():
        async with opened(store_url) as s:
            assert isinstance(s, Store)
            r0 = await s.revision()
            assert await s.get(P + "a") is None
            r1 = await s.put(P + "b", b"1")
            r2 = await s.put(P + "a", b"2")
            r3 = await s.put(P + "b", b"3")
            assert (r1, r2, r3) == (r0 + 1, r0 + 2, r0 + 3)
            assert await s.get(P + "b") == KV(P + "b", b"3", r1, r3, 0)
            assert await s.get(P + "a") == KV(P + "a", b"2", r2, r2, 0)

            sibling = P[:-1] + "x"  # shares the text but not the prefix "…/"
            await s.put(sibling, b"s")
            await s.put(P + "a/nested", b"n")
            await s.put(P + "Z", b"z")
            await s.put(P + "é", b"e")  # sorts after ASCII as UTF-8 bytes
            items, rev = await s.list(P)
            assert [kv.key for kv in items] == [P + "Z", P + "a", P + "a/nested", P + "b", P + "é"]
            assert [kv.value for kv in items] == [b"z", b"2", b"n", b"3", b"e"]
            assert rev == await s.revision() == r0 + 7
            assert (await s.list(P + "a"))[0] == [items[1], items[2]]

            assert await s.delete(P + "a") is True
            rev = await s.revision()
            assert await s.delete(P + "a") is False
            assert await s.revision() == rev, "a no-op delete must not bump the revision"
            assert await s.delete_prefix(P) == 4
            assert (await s.list(P))[0] == []
            assert await s.delete_prefix(P) == 0
            assert (await s.get(sibling)).value == b"s"
            await s.delete(sibling)

    arun(body())


def test_revisions_are_monotonic_and_match_kv(store_url):
    P = new_prefix()

    async def body():
        async with opened(store_url) as s:
            revs = []
            for i in range(30):
                revs.append(await s.put(P + f"k{i % 4}", str(i).encode()))
                assert await s.revision() == revs[-1]
            assert revs == list(range(revs[0], revs[0] + 30))
            items, rev = await s.list(P)
            assert rev == revs[-1]
            assert sorted(kv.mod_revision for kv in items) == revs[-4:]
            assert all(kv.create_revision == revs[int(kv.key[-1])] for kv in items)

    arun(body())


def test_rejects_bad_arguments(store_url):
    async def body():
        async with opened(store_url) as s:
            with pytest.raises(ValueError):
                await s.put("", b"x")
            with pytest.raises(TypeError):
                await s.put("/k", "not bytes")  # type: ignore[arg-type]
            with pytest.raises(ValueError):
                await s.cas_delete("/k", 0)

    arun(body())


def test_etcd_list_pages_are_one_snapshot(etcd_server, monkeypatch):
    import cilia.kvstore.etcd as etcd_backend

    monkeypatch.setattr(etcd_backend, "_LIST_PAGE", 7)
    P = new_prefix()

    async def body():
        async with opened(etcd_server.url) as s, opened(etcd_server.url) as other:
            rev = await s.txn_put_many([(P + f"k{i:02d}", b"old") for i in range(30)])
            original = s._call

            async def write_between_pages(fn, lease=0):
                # Another client rewrites everything while the pages are read.
                out = await original(fn, lease)
                await other.txn_put_many([(P + f"k{i:02d}", b"new") for i in range(30)])
                return out

            s._call = write_between_pages
            items, list_rev = await s.list(P)
            assert list_rev == rev
            assert [kv.key for kv in items] == [P + f"k{i:02d}" for i in range(30)]
            assert {kv.value for kv in items} == {b"old"}
            s._call = original
            await s.delete_prefix(P)

    arun(body())


# ---------------------------------------------------------------- watch


def test_list_then_watch_loses_nothing_under_concurrent_writers(store_url):
    P, Q = new_prefix(), new_prefix()

    async def body():
        async with opened(store_url) as writer, opened(store_url) as reader:
            log: list[tuple[int, str, str, bytes | None]] = []  # (rev, type, key, value) under P
            live: set[str] = set()
            progressed = asyncio.Event()

            async def write():
                for i in range(500):
                    key = P + f"k{i % 37:02d}"
                    if i % 7 == 3 and key in live:
                        rev = await writer.txn_put_many([], [key])
                        live.discard(key)
                        log.append((rev, "DELETE", key, None))
                    elif i % 5 == 0:
                        await writer.put(Q + "noise", str(i).encode())
                    else:
                        rev = await writer.put(key, str(i).encode())
                        live.add(key)
                        log.append((rev, "PUT", key, str(i).encode()))
                    if i == 100:
                        progressed.set()
                    await asyncio.sleep(0)

            wtask = asyncio.create_task(write())
            try:
                await progressed.wait()
                items, list_rev = await reader.list(P)
                state = {kv.key: kv.value for kv in items}
                events: list[Event] = []
                watch = reader.watch(P, list_rev + 1)
                async with contextlib.aclosing(watch):
                    await wtask
                    expected = [e for e in log if e[0] > list_rev]
                    assert expected, "writer finished before the list: nothing concurrent was tested"
                    async for ev in watch:
                        events.append(ev)
                        if ev.revision >= expected[-1][0]:
                            break
            finally:
                wtask.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await wtask
            assert [(e.revision, e.type, e.key, e.value) for e in events] == expected
            for ev in events:
                if ev.type == "PUT":
                    state[ev.key] = ev.value
                else:
                    del state[ev.key]
            final, _ = await reader.list(P)
            assert state == {kv.key: kv.value for kv in final}

    arun(body(), timeout=60)


def test_watch_replays_history_with_prev_values(store_url):
    P = new_prefix()

    async def body():
        async with opened(store_url) as s:
            r1 = await s.put(P + "a", b"1")
            r2 = await s.put(P + "b", b"2")
            r3 = await s.put(P + "a", b"3")
            assert await s.delete(P + "a")
            r4 = await s.revision()
            r5 = await s.txn_put_many([(P + "c", b"c")], [P + "b"])
            await s.put("/elsewhere" + P, b"x")
            want = [
                Event("PUT", P + "a", b"1", r1, None),
                Event("PUT", P + "b", b"2", r2, None),
                Event("PUT", P + "a", b"3", r3, b"1"),
                Event("DELETE", P + "a", None, r4, b"3"),
                Event("PUT", P + "c", b"c", r5, None),
                Event("DELETE", P + "b", None, r5, b"2"),
            ]
            assert await take(s.watch(P, r1), 6) == want
            assert await take(s.watch(P, r3), 4) == want[2:]
            # Nothing more is pending after the last event.
            await assert_no_event(s.watch(P, r5 + 1))

            # Events arriving after the watch started are delivered live.
            w = s.watch(P, r5 + 1)
            consumer = asyncio.create_task(take(w, 3))
            await asyncio.sleep(0.1)
            await s.put(P + "d", b"d")
            n = await s.delete_prefix(P)
            assert n == 2
            live = await consumer
            r7 = await s.revision()
            assert live[0].type == "PUT" and live[0].key == P + "d"
            assert live[1:] == [
                Event("DELETE", P + "c", None, r7, b"c"),
                Event("DELETE", P + "d", None, r7, b"d"),
            ]
            await s.delete("/elsewhere" + P)

    arun(body())


def test_watch_from_compacted_revision_raises(store_url):
    P = new_prefix()

    async def body():
        async with opened(store_url) as s:
            r1 = await s.put(P + "a", b"1")
            await s.put(P + "a", b"2")
            r3 = await s.put(P + "a", b"3")
            r4 = await s.put(P + "a", b"4")
            await s.compact(r3)
            await s.compact(r1)  # older than the current compaction: a no-op
            with pytest.raises(Compacted):
                await take(s.watch(P, r1), 1)
            assert [e.value for e in await take(s.watch(P, r3 + 1), 1)] == [b"4"]
            assert (await s.get(P + "a")).mod_revision == r4
            with pytest.raises(ValueError):
                await s.compact(r4 + 100)

    arun(body())


def test_sqlite_compacts_automatically_and_lagging_watch_raises(tmp_path):
    url = f"sqlite://{tmp_path}/kv.db?compact_keep=10&poll_interval=0.02"

    async def body():
        async with opened(url) as s:
            revs = [await s.put("/c/k", str(i).encode()) for i in range(30)]
            with pytest.raises(Compacted) as exc:
                await take(s.watch("/c/", revs[0]), 1)
            assert exc.value.compact_revision > revs[0]
            assert len(await take(s.watch("/c/", revs[-10]), 10)) == 10

            # A watcher that falls behind the retained history must be told, not skip events.
            w = s.watch("/c/", revs[-1])
            async with contextlib.aclosing(w):
                assert (await w.__anext__()).revision == revs[-1]
                for i in range(40):
                    await s.put("/c/k", b"x")
                with pytest.raises(Compacted):
                    await asyncio.wait_for(w.__anext__(), 5)

    arun(body())


# ---------------------------------------------------------------- cas / txn


def test_cas_create_update_conflict(store_url):
    P = new_prefix()

    async def body():
        async with opened(store_url) as s:
            assert await s.cas(P + "id", b"v1", 0) is True
            kv = await s.get(P + "id")
            assert kv.value == b"v1"
            assert await s.cas(P + "id", b"other", 0) is False, "expected 0 means: must not exist"
            assert await s.cas(P + "id", b"v2", kv.mod_revision) is True
            rev = await s.revision()
            assert await s.cas(P + "id", b"v3", kv.mod_revision) is False, "stale revision must lose"
            assert (await s.get(P + "id")).value == b"v2"
            assert await s.revision() == rev, "a failed cas must not write"

            lease = await s.lease_grant(30)
            assert await s.cas(P + "leased", b"x", 0, lease=lease)
            assert (await s.get(P + "leased")).lease == lease
            await s.lease_revoke(lease)
            with pytest.raises(LeaseNotFound):
                await s.cas(P + "leased2", b"x", 0, lease=lease)
            await s.delete_prefix(P)

    arun(body())


def test_cas_delete(store_url):
    P = new_prefix()

    async def body():
        async with opened(store_url) as s:
            r = await s.put(P + "k", b"1")
            assert await s.cas_delete(P + "k", r + 1000) is False
            assert await s.get(P + "k") is not None
            r2 = await s.put(P + "k", b"2")
            assert await s.cas_delete(P + "k", r) is False, "stale revision must lose"
            assert await s.cas_delete(P + "k", r2) is True
            assert await s.get(P + "k") is None
            assert await s.cas_delete(P + "k", r2) is False

    arun(body())


def test_txn_is_all_or_nothing(store_url):
    P = new_prefix()

    async def body():
        async with opened(store_url) as s:
            await s.put(P + "x", b"old")
            await s.put(P + "gone", b"g")
            rev = await s.revision()
            # The duplicate comes last, after other writes of the same txn.
            with pytest.raises(ValueError):
                await s.txn_put_many([(P + "x", b"new"), (P + "y", b"y"), (P + "x", b"again")])
            with pytest.raises(ValueError):
                await s.txn_put_many([(P + "z", b"z")], [P + "gone", P + "z"])
            with pytest.raises(ValueError):
                await s.txn_put_many([(P + f"many{i}", b"") for i in range(MAX_TXN_OPS + 1)])
            assert await s.revision() == rev
            items, _ = await s.list(P)
            assert {kv.key: kv.value for kv in items} == {P + "x": b"old", P + "gone": b"g"}

            batch = [(P + f"n{i:03d}", str(i).encode()) for i in range(MAX_TXN_OPS - 2)]
            r = await s.txn_put_many(batch + [(P + "x", b"new")], [P + "gone"])
            assert r == rev + 1, "one transaction is one revision"
            items, _ = await s.list(P)
            assert len(items) == MAX_TXN_OPS - 1  # 126 new + x; gone is gone
            assert {kv.mod_revision for kv in items} == {r}
            events = await take(s.watch(P, r), MAX_TXN_OPS)
            assert {e.revision for e in events} == {r}
            assert events[-1] == Event("DELETE", P + "gone", None, r, b"g")
            await s.delete_prefix(P)

    arun(body())


# ---------------------------------------------------------------- leases


def test_lease_expiry_keepalive_and_revoke(store_url):
    P = new_prefix()

    async def body():
        async with opened(store_url) as s:
            a = await s.lease_grant(2)
            b = await s.lease_grant(2)
            t0 = time.monotonic()
            assert a != b and a > 0 and b > 0
            await s.put(P + "a1", b"1", lease=a)
            await s.put(P + "a2", b"2", lease=a)
            await s.put(P + "b1", b"3", lease=b)
            rev = await s.put(P + "plain", b"4")
            assert (await s.get(P + "a1")).lease == a

            expiry = asyncio.create_task(take(s.watch(P, rev + 1), 2, timeout=15))
            # Keep b alive past twice its TTL while a runs out.
            while time.monotonic() - t0 < 4.5:
                await s.lease_keepalive(b)
                await asyncio.sleep(0.5)
            evs = await expiry
            assert [(e.type, e.key, e.prev_value) for e in evs] == [
                ("DELETE", P + "a1", b"1"), ("DELETE", P + "a2", b"2")]
            assert evs[0].revision == evs[1].revision
            items, _ = await s.list(P)
            assert [kv.key for kv in items] == [P + "b1", P + "plain"], "keepalive must have kept b"

            with pytest.raises(LeaseNotFound):
                await s.lease_keepalive(a)
            with pytest.raises(LeaseNotFound):
                await s.put(P + "late", b"x", lease=a)

            rev = await s.revision()
            await s.lease_revoke(b)
            assert await take(s.watch(P, rev + 1), 1) == [Event("DELETE", P + "b1", None, rev + 1, b"3")]
            assert [kv.key for kv in (await s.list(P))[0]] == [P + "plain"]
            with pytest.raises(LeaseNotFound):
                await s.lease_revoke(b)
            with pytest.raises(LeaseNotFound):
                await s.lease_keepalive(b)
            await s.delete_prefix(P)

    arun(body())


# ---------------------------------------------------------------- availability


ALL_OPS = [
    ("get", lambda s: s.get("/k")),
    ("put", lambda s: s.put("/k", b"v")),
    ("delete", lambda s: s.delete("/k")),
    ("delete_prefix", lambda s: s.delete_prefix("/")),
    ("list", lambda s: s.list("/")),
    ("cas", lambda s: s.cas("/k", b"v", 0)),
    ("cas_delete", lambda s: s.cas_delete("/k", 5)),
    ("txn_put_many", lambda s: s.txn_put_many([("/k", b"v")], ["/j"])),
    ("lease_grant", lambda s: s.lease_grant(10)),
    ("lease_keepalive", lambda s: s.lease_keepalive(12345)),
    ("lease_revoke", lambda s: s.lease_revoke(12345)),
    ("revision", lambda s: s.revision()),
    ("compact", lambda s: s.compact(1)),
]


async def assert_all_unavailable(s) -> None:
    for name, op in ALL_OPS:
        t = time.monotonic()
        with pytest.raises(StoreUnavailable):
            await op(s)
            pytest.fail(f"{name} did not raise")
        assert time.monotonic() - t < 5, f"{name} took too long to fail"
    st = await s.status()
    assert st["ok"] is False and st["error"], st


def test_sqlite_unavailable_then_recovers(tmp_path):
    missing_dir = tmp_path / "not-yet"
    garbage = tmp_path / "garbage.db"
    garbage.write_bytes(b"this is not an sqlite database" * 100)

    async def body():
        async with opened(f"sqlite://{missing_dir}/kv.db") as s:
            await assert_all_unavailable(s)
            missing_dir.mkdir()
            assert await s.put("/k", b"v") == 2
            st = await s.status()
            assert st == {"backend": "sqlite", "endpoints": [f"{missing_dir}/kv.db"], "revision": 2,
                          "ok": True, "error": None}
        async with opened(f"sqlite://{garbage}") as s:
            await assert_all_unavailable(s)

    arun(body())


def test_etcd_unavailable_then_recovers(etcd_own):
    async def body():
        async with opened(etcd_own.url) as s:
            rev = await s.put("/k", b"v")
            st = await s.status()
            assert st["ok"] and st["backend"] == "etcd" and st["revision"] == rev
            assert st["endpoints"] == [etcd_own.endpoint]
            etcd_own.stop()
            await assert_all_unavailable(s)
            etcd_own.start()
            assert (await eventually(lambda: s.get("/k"))).value == b"v"
            assert (await s.status())["ok"]
        async with opened(f"etcd://127.0.0.1:{_free_port()}") as s:
            await assert_all_unavailable(s)

    arun(body(), timeout=60)


def test_etcd_fails_over_to_next_endpoint(etcd_server):
    dead = _free_port()
    P = new_prefix()

    async def body():
        async with opened(f"etcd://127.0.0.1:{dead},{etcd_server.endpoint}") as s:
            rev = await s.put(P + "k", b"v")
            assert (await s.get(P + "k")).mod_revision == rev
            assert [e.key for e in await take(s.watch(P, rev), 1)] == [P + "k"]
            st = await s.status()
            assert st["ok"] and st["endpoints"] == [f"127.0.0.1:{dead}", etcd_server.endpoint]
            await s.delete_prefix(P)

    arun(body())


def test_watch_resumes_after_etcd_restart(etcd_own):
    P = new_prefix()

    async def body():
        async with opened(etcd_own.url) as w, opened(etcd_own.url) as s:
            written = [await s.put(P + f"k{i}", f"a{i}".encode()) for i in range(5)]
            seen: list[Event] = []
            got5 = asyncio.Event()

            async def consume():
                async with contextlib.aclosing(w.watch(P, written[0])) as it:
                    async for ev in it:
                        seen.append(ev)
                        if len(seen) == 5:
                            got5.set()
                        if len(seen) == 15:
                            return

            task = asyncio.create_task(consume())
            try:
                await asyncio.wait_for(got5.wait(), 10)
                etcd_own.stop(signal.SIGKILL)
                await asyncio.sleep(1.0)  # the watcher notices and starts retrying
                etcd_own.start()
                # Written right after restart, likely before the watcher is back:
                # only resuming from the last revision can deliver these.
                for i in range(5, 10):
                    written.append(await eventually(lambda i=i: s.put(P + f"k{i}", f"b{i}".encode())))
                await asyncio.sleep(0.5)
                for i in range(10, 15):
                    written.append(await s.put(P + f"k{i}", f"c{i}".encode()))
                await asyncio.wait_for(task, 20)
            finally:
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await task
            assert [e.revision for e in seen] == written
            assert [e.value for e in seen][4:7] == [b"a4", b"b5", b"b6"]

    arun(body(), timeout=60)


# ---------------------------------------------------------------- processes and facades


_WRITER = """
import os, sys, time
from cilia.kvstore import SyncStore
url, name, n, go = sys.argv[1:]
s = SyncStore(url)
s.revision()
print("ready", flush=True)
while not os.path.exists(go):
    time.sleep(0.002)
revs = [s.put(f"/mp/{name}/{i:04d}", f"{name}{i}".encode()) for i in range(int(n))]
s.close()
print(" ".join(map(str, revs)), flush=True)
"""


def test_sqlite_multiprocess_writers(tmp_path):
    url = f"sqlite://{tmp_path}/kv.db"
    go = tmp_path / "go"
    n = 300
    procs = []
    try:
        for name in ("a", "b"):
            procs.append(subprocess.Popen(
                [sys.executable, "-c", _WRITER, url, name, str(n), str(go)],
                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, preexec_fn=_die_with_parent))
        for p in procs:
            assert p.stdout.readline().strip() == "ready", p.stderr.read()
        go.touch()
        revs = {}
        for name, p in zip(("a", "b"), procs):
            out, err = p.communicate(timeout=60)
            assert p.returncode == 0, err
            revs[name] = [int(x) for x in out.split()]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
    a, b = revs["a"], revs["b"]
    assert len(a) == len(b) == n
    assert len(set(a) | set(b)) == 2 * n, "revisions must be unique across processes"
    assert a == sorted(a) and b == sorted(b)
    assert not (max(a) < min(b) or max(b) < min(a)), "writers did not overlap; nothing concurrent was tested"

    async def body():
        async with opened(url) as s:
            items, rev = await s.list("/mp/")
            assert rev == max(a + b)
            assert {kv.key: kv.value for kv in items} == {
                f"/mp/{w}/{i:04d}": f"{w}{i}".encode() for w in "ab" for i in range(n)}
            events = await take(s.watch("/mp/", 1), 2 * n)
            assert [e.revision for e in events] == sorted(a + b)

    arun(body())


def test_sync_facade(store_url):
    P = new_prefix()

    def check():
        with SyncStore(store_url) as s:
            r = s.put(P + "k", b"v")
            assert s.get(P + "k") == KV(P + "k", b"v", r, r, 0)
            assert s.cas(P + "k", b"w", r)
            assert s.list(P)[0][0].value == b"w"
            assert s.revision() == r + 1
            assert s.status()["ok"]
            lease = s.lease_grant(30)
            s.lease_keepalive(lease)
            s.lease_revoke(lease)
            assert s.delete_prefix(P) == 1

    check()

    async def inside_a_running_loop():
        # The CLI may call the facade from code that already runs a loop.
        await asyncio.to_thread(check)
        check()

    arun(inside_a_running_loop())


# ---------------------------------------------------------------- model-based


KEYS = ["a", "b", "ab", "b/c", "é"]
_op = st.one_of(
    st.tuples(st.just("put"), st.sampled_from(KEYS), st.binary(max_size=4)),
    st.tuples(st.just("delete"), st.sampled_from(KEYS)),
    st.tuples(st.just("delete_prefix"), st.sampled_from(["", "a", "b", "b/", "x"])),
    st.tuples(st.just("cas"), st.sampled_from(KEYS), st.binary(max_size=4), st.booleans()),
    st.tuples(st.just("cas_delete"), st.sampled_from(KEYS), st.booleans()),
    st.tuples(st.just("txn"), st.lists(st.tuples(st.sampled_from(KEYS), st.binary(max_size=2)), max_size=3),
              st.lists(st.sampled_from(KEYS), max_size=2)),
)


async def _check_against_model(url: str, P: str, ops: list[tuple]) -> None:
    async with opened(url) as s:
        base = rev = await s.revision()
        model: dict[str, tuple[bytes, int, int]] = {}  # key -> (value, create, mod)

        def bump_put(keys_values):
            nonlocal rev
            rev += 1
            for k, v in keys_values:
                model[k] = (v, model[k][1] if k in model else rev, rev)

        for op in ops:
            kind = op[0]
            if kind == "put":
                _, k, v = op
                assert await s.put(P + k, v) == rev + 1
                bump_put([(k, v)])
            elif kind == "delete":
                _, k = op
                assert await s.delete(P + k) == (k in model)
                if k in model:
                    rev += 1
                    del model[k]
            elif kind == "delete_prefix":
                _, p = op
                doomed = [k for k in model if k.encode().startswith(p.encode())]
                assert await s.delete_prefix(P + p) == len(doomed)
                if doomed:
                    rev += 1
                    for k in doomed:
                        del model[k]
            elif kind == "cas":
                _, k, v, right = op
                current = model[k][2] if k in model else 0
                expected = current if right else current + 1
                assert await s.cas(P + k, v, expected) == right
                if right:
                    bump_put([(k, v)])
            elif kind == "cas_delete":
                _, k, right = op
                current = model[k][2] if k in model else 0
                ok = right and k in model
                assert await s.cas_delete(P + k, current if right and current else 10**9) == ok
                if ok:
                    rev += 1
                    del model[k]
            elif kind == "txn":
                _, puts, dels = op
                put_keys = [k for k, _ in puts]
                # etcd's rule: a key may be put once per txn and not also deleted;
                # deleting the same key twice is allowed.
                if len(set(put_keys)) != len(put_keys) or set(put_keys) & set(dels):
                    with pytest.raises(ValueError):
                        await s.txn_put_many([(P + k, v) for k, v in puts], [P + k for k in dels])
                    continue
                changed = bool(puts) or any(k in model for k in dels)
                r = await s.txn_put_many([(P + k, v) for k, v in puts], [P + k for k in dels])
                if changed:
                    bump_put(puts)
                    for k in dels:
                        model.pop(k, None)
                assert r == rev
            assert await s.revision() == rev
        items, list_rev = await s.list(P)
        assert list_rev == rev
        assert [(kv.key, kv.value, kv.create_revision, kv.mod_revision) for kv in items] == [
            (P + k, *model[k]) for k in sorted(model, key=str.encode)]
        # Replaying the full history must rebuild the same state; a sentinel
        # written last marks the end, so no event of the last revision is cut off.
        sentinel = await s.put(P + "~end", b"")
        replay: dict[str, bytes] = {}
        async with contextlib.aclosing(s.watch(P, base + 1)) as w:
            async for ev in w:
                if ev.revision == sentinel:
                    break
                if ev.type == "PUT":
                    assert ev.prev_value == replay.get(ev.key)
                    replay[ev.key] = ev.value
                else:
                    assert ev.prev_value == replay.pop(ev.key)
        assert replay == {kv.key: kv.value for kv in items}


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(ops=st.lists(_op, max_size=25))
def test_sqlite_matches_dict_model(ops):
    with tempfile.TemporaryDirectory(prefix="cilia-kv-prop-") as d:
        arun(_check_against_model(f"sqlite://{d}/kv.db", "/p/", ops))


@settings(max_examples=15, deadline=None,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
@given(ops=st.lists(_op, max_size=25))
def test_etcd_matches_dict_model(etcd_server, ops):
    arun(_check_against_model(etcd_server.url, new_prefix(), ops))

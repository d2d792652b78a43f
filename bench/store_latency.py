"""Store latency on both backends, in one run: the embedded SQLite store (a file in a tmp dir, the
lab's default `--store local`) and a real etcd started here (Debian's /usr/bin/etcd on free
loopback ports, data dir in the same tmp dir, stopped afterwards by its process id).

put: wall time of `await store.put(key, value)` (value: 200 bytes), one at a time.
put -> watch: from just before put() is called to the moment a watcher's `async for` receives the
    event with the revision put() returned. The watcher is a second store object (its own
    connection), as an agent in another process sees the writer; for SQLite that watcher polls
    the events table every poll_interval (50 ms, the default) and is woken early only by writes
    through its own store object, so SQLite is also measured with the watcher on the writer's
    store object ("same store"). Writer and watcher share one asyncio loop; the writer waits
    for each event before the next put, so there is one operation in flight.
resync of 10,000 keys (a restarted agent): a fresh store object `list(prefix)` (all values),
    then `watch(prefix, rev + 1)`; "list + watch" ends when the watch delivers the first new
    event (a put through another store object right after list returned), so it includes one
    put -> watch. "replay" is the alternative: watch(prefix, first revision) until all 10,000
    historical events have arrived.
"""
from __future__ import annotations

import asyncio
import random
import shutil
import tempfile
import time

from bench.common import fmt, log, median, summary, table
from bench.identity_alloc import Etcd  # the etcd-on-loopback helper that benchmark already has
from cilia.kvstore import open_store

VALUE = b"v" * 200
RESYNC_KEYS = 10_000
BATCH = 128  # MAX_TXN_OPS
CASES = ("sqlite", "sqlite same store", "etcd")
SQLITE_POLL_S = 0.05  # the SQLite store's default watch poll interval


class Watcher:
    """Runs a store's watch in a task; records when each revision arrived."""

    def __init__(self, store, prefix: str, start_revision: int):
        self.arrived: dict[int, float] = {}
        self.waiting: dict[int, asyncio.Future] = {}
        self.count = 0
        self.task = asyncio.create_task(self._loop(store, prefix, start_revision))

    async def _loop(self, store, prefix: str, start: int) -> None:
        async for ev in store.watch(prefix, start):
            t = time.perf_counter()
            self.count += 1
            self.arrived[ev.revision] = t
            fut = self.waiting.pop(ev.revision, None)
            if fut is not None and not fut.done():
                fut.set_result(t)

    async def until(self, rev: int, timeout: float = 10) -> float:
        if rev in self.arrived:
            return self.arrived.pop(rev)
        fut = asyncio.get_running_loop().create_future()
        self.waiting[rev] = fut
        try:
            t = await asyncio.wait_for(fut, timeout)
        except asyncio.TimeoutError:
            raise RuntimeError(f"watch did not deliver revision {rev} within {timeout:.0f}s")
        self.arrived.pop(rev, None)
        return t

    async def stop(self) -> None:
        # Cancel until the task is really done: on Python 3.11 a cancel that lands while the
        # SQLite watch's `asyncio.wait_for(wake.wait(), poll_interval)` is being woken by a
        # write through the same store object is swallowed by wait_for, and the watch then
        # keeps polling forever (seen here after a delete_prefix on the watched store).
        for _ in range(100):
            self.task.cancel()
            done, _ = await asyncio.wait({self.task}, timeout=0.1)
            if done:
                break
        if self.task.done() and not self.task.cancelled():
            self.task.exception()  # retrieve it; a watch error after the measurement is moot


async def put_watch(url: str, ops: int, same_store: bool, tag: str, jitter_s: float = 0) -> dict:
    writer = open_store(url)
    reader = writer if same_store else open_store(url)
    prefix = f"/bench/pw/{tag}/"
    watcher = None
    try:
        start = await writer.revision() + 1
        watcher = Watcher(reader, prefix, start)
        warm = 20
        put_ms, pw_ms = [], []
        rnd = random.Random(42)
        for i in range(warm + ops):
            if jitter_s:
                await asyncio.sleep(rnd.uniform(0, jitter_s))
            t0 = time.perf_counter()
            rev = await writer.put(f"{prefix}k{i % 500:04d}", VALUE)
            t1 = time.perf_counter()
            t2 = await watcher.until(rev)
            if i >= warm:  # the first few set up connections and the watch stream
                put_ms.append((t1 - t0) * 1e3)
                pw_ms.append((t2 - t0) * 1e3)
        await writer.delete_prefix(prefix)
        return {"put_ms": summary(put_ms), "put_watch_ms": summary(pw_ms)}
    finally:
        if watcher is not None:
            await watcher.stop()
        await writer.close()
        if reader is not writer:
            await reader.close()


async def resync(url: str, keys: int, reps: int, tag: str) -> dict:
    prefix = f"/bench/resync/{tag}/"
    w = open_store(url)
    out: dict = {"list_s": [], "list_watch_s": [], "replay_s": [], "listed": None}
    try:
        first = await w.revision() + 1
        t = time.perf_counter()
        for b in range(0, keys, BATCH):
            await w.txn_put_many([(f"{prefix}k{i:05d}", VALUE)
                                  for i in range(b, min(b + BATCH, keys))])
        out["populate_s"] = time.perf_counter() - t
        for rep in range(reps):
            r = open_store(url)  # a restarted agent: new connection, nothing cached
            watcher = None
            try:
                t0 = time.perf_counter()
                items, rev = await r.list(prefix)
                t1 = time.perf_counter()
                watcher = Watcher(r, prefix, rev + 1)
                new_rev = await w.put(f"{prefix}sentinel{rep}", VALUE)
                t2 = await watcher.until(new_rev, timeout=30)
                out["list_s"].append(t1 - t0)
                out["list_watch_s"].append(t2 - t0)
                out["listed"] = len(items)
            finally:
                if watcher is not None:
                    await watcher.stop()
                await r.close()
            r = open_store(url)
            watcher = None
            try:
                # The populate transactions are revisions first..first+ceil(keys/BATCH)-1, each
                # with up to BATCH events: replay until the last populated key has arrived.
                last_rev = first + (keys + BATCH - 1) // BATCH - 1
                t0 = time.perf_counter()
                watcher = Watcher(r, prefix, first)
                await watcher.until(last_rev, timeout=60)
                deadline = time.perf_counter() + 60
                while watcher.count < keys and time.perf_counter() < deadline:
                    await asyncio.sleep(0.001)
                out["replay_s"].append(time.perf_counter() - t0)
                out["replayed"] = watcher.count
            finally:
                if watcher is not None:
                    await watcher.stop()
                await r.close()
        await w.delete_prefix(prefix)
    finally:
        await w.close()
    for k in ("list_s", "list_watch_s", "replay_s"):
        out[k + "_median"] = median(out[k])
    return out


def run(quick: bool = False, reps: int | None = None, ops: int | None = None) -> dict:
    ops = ops or (300 if quick else 1000)
    reps = reps or (1 if quick else 3)
    res: dict = {"benchmark": "store", "ops": ops, "resync_keys": RESYNC_KEYS, "resync_reps": reps,
                 "value_bytes": len(VALUE), "cases": {}, "resync": {}}
    base = tempfile.mkdtemp(prefix="cilia-bench-store-")
    etcd = Etcd(base)
    try:
        sqlite_url = f"sqlite://{base}/kv.db"
        res["sqlite_url"] = sqlite_url
        for case, same in (("sqlite", False), ("sqlite same store", True)):
            log(f"{case}: {ops} put -> watch")
            res["cases"][case] = asyncio.run(put_watch(
                sqlite_url, ops, same, case.replace(" ", "_"),
                jitter_s=0 if same else SQLITE_POLL_S))
        log(f"sqlite: resync {RESYNC_KEYS} keys x {reps}")
        res["resync"]["sqlite"] = asyncio.run(resync(sqlite_url, RESYNC_KEYS, reps, "s"))
        etcd.start()
        res["etcd_url"] = etcd.url
        log(f"etcd: {ops} put -> watch ({etcd.url})")
        res["cases"]["etcd"] = asyncio.run(put_watch(etcd.url, ops, False, "etcd"))
        log(f"etcd: resync {RESYNC_KEYS} keys x {reps}")
        res["resync"]["etcd"] = asyncio.run(resync(etcd.url, RESYNC_KEYS, reps, "e"))
    finally:
        etcd.stop()
        shutil.rmtree(base, ignore_errors=True)
    return res


def render(res: dict) -> str:
    rows = []
    for case in CASES:
        c = res["cases"].get(case)
        if not c:
            continue
        rows.append([case, fmt(c["put_ms"]["p50"], 2), fmt(c["put_ms"]["p99"], 2),
                     fmt(c["put_watch_ms"]["p50"], 2), fmt(c["put_watch_ms"]["p99"], 2),
                     fmt(c["put_watch_ms"]["max"], 1)])
    sq, et = res["cases"].get("sqlite"), res["cases"].get("etcd")
    out = [table([f"store, {res['ops']} ops, {res['value_bytes']} B values", "put p50 ms",
                  "put p99 ms", "put→watch p50 ms", "put→watch p99 ms", "put→watch max ms"],
                 rows)]
    if sq and et:
        out.append(f"\netcd ÷ sqlite (separate store objects): put p50 "
                   f"{et['put_ms']['p50'] / sq['put_ms']['p50']:.2f}, put→watch p50 "
                   f"{et['put_watch_ms']['p50'] / sq['put_watch_ms']['p50']:.2f}")
    rows = []
    for b in ("sqlite", "etcd"):
        r = res["resync"].get(b)
        if r:
            rows.append([b, fmt(r["populate_s"] * 1e3, 0), fmt(r["list_s_median"] * 1e3, 0),
                         fmt(r["list_watch_s_median"] * 1e3, 0),
                         fmt(r["replay_s_median"] * 1e3, 0)])
    out.append("")
    out.append(table([f"resync of {res['resync_keys']:,} keys, median of {res['resync_reps']}",
                      "populate ms (txn of 128)", "list ms", "list + watch ms",
                      "replay watch ms"], rows))
    return "\n".join(out)

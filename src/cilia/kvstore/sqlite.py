"""Embedded store: one SQLite file shared by every process on a host.

Several processes (CLI, per-node agents, lab runtimes) open the same file,
so nothing may live only in one process's memory: the revision counter, the
event history that makes watches exact, and lease expiry times are all rows.
Writers serialize with BEGIN IMMEDIATE; WAL lets readers and watch pollers
run beside a writer. There is no server, so expired leases are reaped by
whichever client touches the store next (every operation and every watch
poll checks the expiry index, which costs one index probe).
"""

from __future__ import annotations

import asyncio
import functools
import secrets
import sqlite3
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from typing import AsyncIterator, Callable, TypeVar

from .api import (
    KV,
    Compacted,
    Event,
    LeaseNotFound,
    StoreUnavailable,
    check_key,
    check_txn,
    prefix_end,
)

T = TypeVar("T")

_PUT, _DELETE = 0, 1  # etcd's mvccpb.Event_EventType numbering
_WATCH_BATCH = 1000

_SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (k TEXT PRIMARY KEY, v INTEGER NOT NULL);
-- revision starts at 1 like etcd; compact_revision is the oldest revision a
-- watch may start from; compact_id is the highest event id already deleted.
INSERT OR IGNORE INTO meta VALUES ('schema', 1), ('revision', 1),
    ('compact_revision', 0), ('compact_id', 0);
CREATE TABLE IF NOT EXISTS kv (
    key BLOB PRIMARY KEY,
    value BLOB NOT NULL,
    create_revision INTEGER NOT NULL,
    mod_revision INTEGER NOT NULL,
    lease INTEGER NOT NULL DEFAULT 0
) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS kv_by_lease ON kv(lease) WHERE lease != 0;
-- AUTOINCREMENT: ids must never be reused after compaction, because
-- watchers keep their position as an event id.
CREATE TABLE IF NOT EXISTS events (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    revision INTEGER NOT NULL,
    type INTEGER NOT NULL,
    key BLOB NOT NULL,
    value BLOB,
    prev BLOB
);
CREATE INDEX IF NOT EXISTS events_by_revision ON events(revision);
CREATE TABLE IF NOT EXISTS leases (
    id INTEGER PRIMARY KEY,
    ttl INTEGER NOT NULL,
    expiry REAL NOT NULL
);
CREATE INDEX IF NOT EXISTS leases_by_expiry ON leases(expiry);
"""


def _meta(conn: sqlite3.Connection, k: str) -> int:
    return conn.execute("SELECT v FROM meta WHERE k = ?", (k,)).fetchone()[0]


def _set_meta(conn: sqlite3.Connection, k: str, v: int) -> None:
    conn.execute("UPDATE meta SET v = ? WHERE k = ?", (v, k))


def _range_sql(lo: bytes, hi: bytes | None) -> tuple[str, tuple]:
    if hi is None:
        return "key >= ?", (lo,)
    return "key >= ? AND key < ?", (lo, hi)


class _Revision:
    """The mutations of one store revision, inside an open write transaction.

    The revision is only bumped if something changed, as in etcd.
    """

    def __init__(self, conn: sqlite3.Connection):
        self.conn = conn
        self.base = _meta(conn, "revision")
        self.rev = self.base + 1
        self.changed = False

    def put(self, key: bytes, value: bytes, lease: int) -> None:
        row = self.conn.execute("SELECT value FROM kv WHERE key = ?", (key,)).fetchone()
        if row is None:
            self.conn.execute(
                "INSERT INTO kv (key, value, create_revision, mod_revision, lease) VALUES (?, ?, ?, ?, ?)",
                (key, value, self.rev, self.rev, lease),
            )
            prev = None
        else:
            self.conn.execute(
                "UPDATE kv SET value = ?, mod_revision = ?, lease = ? WHERE key = ?",
                (value, self.rev, lease, key),
            )
            prev = row[0]
        self.conn.execute(
            "INSERT INTO events (revision, type, key, value, prev) VALUES (?, ?, ?, ?, ?)",
            (self.rev, _PUT, key, value, prev),
        )
        self.changed = True

    def delete(self, key: bytes) -> bool:
        row = self.conn.execute("SELECT value FROM kv WHERE key = ?", (key,)).fetchone()
        if row is None:
            return False
        self.conn.execute("DELETE FROM kv WHERE key = ?", (key,))
        self.conn.execute(
            "INSERT INTO events (revision, type, key, value, prev) VALUES (?, ?, ?, NULL, ?)",
            (self.rev, _DELETE, key, row[0]),
        )
        self.changed = True
        return True

    def finish(self) -> int:
        if not self.changed:
            return self.base
        _set_meta(self.conn, "revision", self.rev)
        return self.rev


class SQLiteStore:
    def __init__(
        self,
        path: str,
        *,
        poll_interval: float = 0.05,
        compact_keep: int = 100_000,
        busy_timeout: float = 30.0,
    ):
        if compact_keep < 1:
            raise ValueError("compact_keep must be >= 1")
        self.path = path
        self.poll_interval = poll_interval
        self.compact_keep = compact_keep
        # Compact in batches so the delete cost is amortised over many writes.
        self._compact_slack = max(1, compact_keep // 10)
        self.busy_timeout = busy_timeout
        self._local = threading.local()
        # One thread for operations and one shared by all watch pollers, so a
        # writer waiting on another process's lock does not stall watches.
        self._ops = ThreadPoolExecutor(1, thread_name_prefix="kvstore-sqlite-ops")
        self._polls = ThreadPoolExecutor(1, thread_name_prefix="kvstore-sqlite-watch")
        self._wakeups: set[asyncio.Event] = set()
        self._wrote = False
        self._closed = False

    # ---- connection and transaction plumbing (runs on executor threads) ----

    def _conn(self) -> sqlite3.Connection:
        conn = getattr(self._local, "conn", None)
        if conn is not None:
            return conn
        conn = sqlite3.connect(self.path, timeout=self.busy_timeout, isolation_level=None)
        try:
            conn.execute(f"PRAGMA busy_timeout = {int(self.busy_timeout * 1000)}")
            if conn.execute("PRAGMA journal_mode = WAL").fetchone()[0].lower() != "wal":
                raise sqlite3.OperationalError(f"cannot switch {self.path} to WAL mode")
            # NORMAL in WAL mode survives process crashes; only an OS crash can
            # lose the last commits, which is the trade etcd's users make too.
            conn.execute("PRAGMA synchronous = NORMAL")
            conn.executescript("BEGIN IMMEDIATE;" + _SCHEMA + "COMMIT;")
        except BaseException:
            conn.close()
            raise
        self._local.conn = conn
        return conn

    def _drop_conn(self) -> None:
        conn = getattr(self._local, "conn", None)
        self._local.conn = None
        if conn is not None:
            try:
                conn.close()
            except sqlite3.Error:
                pass

    def _guard(self, fn: Callable[[], T]) -> T:
        try:
            return fn()
        except (sqlite3.IntegrityError, sqlite3.ProgrammingError, sqlite3.InterfaceError):
            raise
        except sqlite3.Error as e:
            # The connection may be wedged (file replaced, disk gone): reopen
            # next time so the store recovers once the path is usable again.
            self._drop_conn()
            raise StoreUnavailable(f"sqlite {self.path}: {e}") from e

    def _txn(self, conn: sqlite3.Connection, fn: Callable[[sqlite3.Connection], T]) -> T:
        conn.execute("BEGIN IMMEDIATE")
        try:
            out = fn(conn)
            conn.execute("COMMIT")
        except BaseException:
            if conn.in_transaction:
                try:
                    conn.execute("ROLLBACK")
                except sqlite3.Error:
                    pass
            raise
        self._wrote = True
        return out

    def _write(self, fn: Callable[[sqlite3.Connection], T]) -> T:
        conn = self._conn()
        # Reaping commits on its own, so an operation that fails (e.g. a
        # keepalive of the lease that just expired) does not roll it back.
        self._reap_if_due(conn)
        return self._txn(conn, fn)

    def _read(self, fn: Callable[[sqlite3.Connection], T]) -> T:
        conn = self._conn()
        self._reap_if_due(conn)
        # One read transaction so values and the revision come from one snapshot.
        conn.execute("BEGIN")
        try:
            return fn(conn)
        finally:
            conn.execute("COMMIT")

    def _reap_if_due(self, conn: sqlite3.Connection) -> None:
        if conn.execute("SELECT 1 FROM leases WHERE expiry < ? LIMIT 1", (time.time(),)).fetchone():
            self._txn(conn, self._reap)

    def _reap(self, conn: sqlite3.Connection) -> None:
        # Re-read under the write lock: another process may have reaped them already.
        expired = conn.execute(
            "SELECT id FROM leases WHERE expiry < ? ORDER BY expiry", (time.time(),)
        ).fetchall()
        for (lease,) in expired:
            self._revoke_locked(conn, lease)

    def _revoke_locked(self, conn: sqlite3.Connection, lease: int) -> None:
        # One revision per lease, as etcd's lessor revokes each lease in its own txn.
        r = _Revision(conn)
        for (key,) in conn.execute("SELECT key FROM kv WHERE lease = ? ORDER BY key", (lease,)).fetchall():
            r.delete(key)
        self._finish(conn, r)
        conn.execute("DELETE FROM leases WHERE id = ?", (lease,))

    def _check_lease(self, conn: sqlite3.Connection, lease: int) -> None:
        if lease and conn.execute("SELECT 1 FROM leases WHERE id = ?", (lease,)).fetchone() is None:
            raise LeaseNotFound(lease)

    def _finish(self, conn: sqlite3.Connection, r: _Revision) -> int:
        rev = r.finish()
        if r.changed:
            self._maybe_compact(conn)
        return rev

    def _maybe_compact(self, conn: sqlite3.Connection) -> None:
        maxid = conn.execute("SELECT max(id) FROM events").fetchone()[0] or 0
        if maxid - _meta(conn, "compact_id") <= self.compact_keep + self._compact_slack:
            return
        row = conn.execute(
            "SELECT revision FROM events WHERE id > ? ORDER BY id LIMIT 1", (maxid - self.compact_keep,)
        ).fetchone()
        if row is not None:
            self._compact_locked(conn, row[0])

    def _compact_locked(self, conn: sqlite3.Connection, revision: int) -> None:
        if revision <= _meta(conn, "compact_revision"):
            return
        # Whole revisions go at once so a watcher never sees half a transaction.
        first = conn.execute("SELECT min(id) FROM events WHERE revision >= ?", (revision,)).fetchone()[0]
        if first is None:
            first = (conn.execute("SELECT max(id) FROM events").fetchone()[0] or 0) + 1
        cid = max(first - 1, _meta(conn, "compact_id"))
        conn.execute("DELETE FROM events WHERE id <= ?", (cid,))
        _set_meta(conn, "compact_revision", revision)
        _set_meta(conn, "compact_id", cid)

    async def _run(self, fn: Callable[[], T], executor: ThreadPoolExecutor | None = None) -> T:
        if self._closed:
            raise StoreUnavailable("store is closed")
        loop = asyncio.get_running_loop()
        try:
            out = await loop.run_in_executor(executor or self._ops, self._guard, fn)
        finally:
            if self._wrote:
                self._wrote = False
                for ev in self._wakeups:
                    ev.set()
        return out

    # ---- the Store contract ----

    async def get(self, key: str) -> KV | None:
        check_key(key)
        k = key.encode()

        def op(conn: sqlite3.Connection) -> KV | None:
            row = conn.execute(
                "SELECT key, value, create_revision, mod_revision, lease FROM kv WHERE key = ?", (k,)
            ).fetchone()
            return None if row is None else KV(row[0].decode(), row[1], row[2], row[3], row[4])

        return await self._run(lambda: self._read(op))

    async def put(self, key: str, value: bytes, lease: int = 0) -> int:
        check_txn([(key, value)], [])

        def op(conn: sqlite3.Connection) -> int:
            self._check_lease(conn, lease)
            r = _Revision(conn)
            r.put(key.encode(), bytes(value), lease)
            return self._finish(conn, r)

        return await self._run(lambda: self._write(op))

    async def delete(self, key: str) -> bool:
        check_key(key)

        def op(conn: sqlite3.Connection) -> bool:
            r = _Revision(conn)
            deleted = r.delete(key.encode())
            self._finish(conn, r)
            return deleted

        return await self._run(lambda: self._write(op))

    async def delete_prefix(self, prefix: str) -> int:
        lo = prefix.encode()
        where, args = _range_sql(lo, prefix_end(lo))

        def op(conn: sqlite3.Connection) -> int:
            r = _Revision(conn)
            keys = conn.execute(f"SELECT key FROM kv WHERE {where} ORDER BY key", args).fetchall()
            for (k,) in keys:
                r.delete(k)
            self._finish(conn, r)
            return len(keys)

        return await self._run(lambda: self._write(op))

    async def list(self, prefix: str) -> tuple[list[KV], int]:
        lo = prefix.encode()
        where, args = _range_sql(lo, prefix_end(lo))

        def op(conn: sqlite3.Connection) -> tuple[list[KV], int]:
            rev = _meta(conn, "revision")
            rows = conn.execute(
                f"SELECT key, value, create_revision, mod_revision, lease FROM kv WHERE {where} ORDER BY key",
                args,
            ).fetchall()
            return [KV(r[0].decode(), r[1], r[2], r[3], r[4]) for r in rows], rev

        return await self._run(lambda: self._read(op))

    async def cas(self, key: str, value: bytes, expected_mod_revision: int, lease: int = 0) -> bool:
        check_txn([(key, value)], [])
        k = key.encode()

        def op(conn: sqlite3.Connection) -> bool:
            row = conn.execute("SELECT mod_revision FROM kv WHERE key = ?", (k,)).fetchone()
            if (row[0] if row else 0) != expected_mod_revision:
                return False
            self._check_lease(conn, lease)
            r = _Revision(conn)
            r.put(k, bytes(value), lease)
            self._finish(conn, r)
            return True

        return await self._run(lambda: self._write(op))

    async def cas_delete(self, key: str, expected_mod_revision: int) -> bool:
        check_key(key)
        if expected_mod_revision <= 0:
            raise ValueError("cas_delete needs the mod_revision of an existing key")
        k = key.encode()

        def op(conn: sqlite3.Connection) -> bool:
            row = conn.execute("SELECT mod_revision FROM kv WHERE key = ?", (k,)).fetchone()
            if row is None or row[0] != expected_mod_revision:
                return False
            r = _Revision(conn)
            r.delete(k)
            self._finish(conn, r)
            return True

        return await self._run(lambda: self._write(op))

    async def txn_put_many(self, items: list[tuple[str, bytes]], deletes: list[str] = []) -> int:
        check_txn(items, deletes)

        def op(conn: sqlite3.Connection) -> int:
            r = _Revision(conn)
            seen: set[str] = set()
            # Duplicates are detected inside the transaction, after earlier
            # writes happened, so rejecting them exercises the rollback: etcd
            # rejects the same requests as a whole.
            for key, value in items:
                if key in seen:
                    raise ValueError(f"duplicate key {key!r} in transaction")
                seen.add(key)
                r.put(key.encode(), bytes(value), 0)
            # Deleting a key twice is harmless and etcd accepts it; a key both
            # put and deleted has no defined outcome, and etcd rejects it.
            for key in deletes:
                if key in seen:
                    raise ValueError(f"key {key!r} is both put and deleted in one transaction")
            for key in deletes:
                r.delete(key.encode())
            return self._finish(conn, r)

        return await self._run(lambda: self._write(op))

    async def lease_grant(self, ttl_seconds: int) -> int:
        if ttl_seconds < 1:
            raise ValueError("lease TTL must be >= 1 second")

        def op(conn: sqlite3.Connection) -> int:
            while True:
                # Random like etcd's ids, so ids from different processes do not collide.
                lease = secrets.randbits(62) + 1
                try:
                    conn.execute(
                        "INSERT INTO leases (id, ttl, expiry) VALUES (?, ?, ?)",
                        (lease, ttl_seconds, time.time() + ttl_seconds),
                    )
                    return lease
                except sqlite3.IntegrityError:
                    continue

        return await self._run(lambda: self._write(op))

    async def lease_keepalive(self, lease: int) -> None:
        def op(conn: sqlite3.Connection) -> None:
            # _write reaped first, so an expired lease is already gone here.
            cur = conn.execute(
                "UPDATE leases SET expiry = ? + ttl WHERE id = ?", (time.time(), lease)
            )
            if cur.rowcount == 0:
                raise LeaseNotFound(lease)

        await self._run(lambda: self._write(op))

    async def lease_revoke(self, lease: int) -> None:
        def op(conn: sqlite3.Connection) -> None:
            self._check_lease(conn, lease)
            self._revoke_locked(conn, lease)

        await self._run(lambda: self._write(op))

    async def revision(self) -> int:
        return await self._run(lambda: self._read(lambda conn: _meta(conn, "revision")))

    async def compact(self, revision: int) -> None:
        def op(conn: sqlite3.Connection) -> None:
            if revision > _meta(conn, "revision"):
                raise ValueError(f"cannot compact at future revision {revision}")
            self._compact_locked(conn, revision)

        await self._run(lambda: self._write(op))

    async def status(self) -> dict:
        st: dict = {"backend": "sqlite", "endpoints": [self.path], "revision": None, "ok": False, "error": None}
        try:
            st["revision"] = await self.revision()
            st["ok"] = True
        except StoreUnavailable as e:
            st["error"] = str(e)
        return st

    async def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        for ev in self._wakeups:
            ev.set()
        loop = asyncio.get_running_loop()
        for ex in (self._ops, self._polls):
            await loop.run_in_executor(ex, self._drop_conn)
            ex.shutdown(wait=False)

    # ---- watch ----

    def _poll(
        self, conn: sqlite3.Connection, lo: bytes, hi: bytes | None, start: int, cursor: int | None, last_rev: int
    ) -> tuple[list[tuple], int]:
        """Events after event id `cursor` (None: from revision `start`) and the new cursor."""
        self._reap_if_due(conn)
        where, args = _range_sql(lo, hi)
        conn.execute("BEGIN")
        try:
            compact_rev = _meta(conn, "compact_revision")
            maxid = conn.execute("SELECT max(id) FROM events").fetchone()[0] or 0
            if cursor is None:
                if start < compact_rev:
                    raise Compacted(start, compact_rev)
                first = conn.execute("SELECT min(id) FROM events WHERE revision >= ?", (start,)).fetchone()[0]
                cursor = first - 1 if first is not None else maxid
            elif cursor < _meta(conn, "compact_id"):
                raise Compacted(last_rev + 1, compact_rev)
            rows = conn.execute(
                f"SELECT id, revision, type, key, value, prev FROM events"
                f" WHERE id > ? AND id <= ? AND revision >= ? AND {where} ORDER BY id LIMIT ?",
                (cursor, maxid, start, *args, _WATCH_BATCH),
            ).fetchall()
            return rows, (rows[-1][0] if len(rows) == _WATCH_BATCH else maxid)
        finally:
            conn.execute("COMMIT")

    async def watch(self, prefix: str, start_revision: int) -> AsyncIterator[Event]:
        """Poll the events table; an unreachable file is retried, never raised."""
        lo = prefix.encode()
        hi = prefix_end(lo)
        wake = asyncio.Event()
        self._wakeups.add(wake)
        try:
            start = start_revision
            cursor: int | None = None
            last_rev = start - 1
            backoff = self.poll_interval
            while not self._closed:
                wake.clear()
                try:
                    if start <= 0:
                        start = await self.revision() + 1
                        last_rev = start - 1
                    rows, cursor = await self._run(
                        functools.partial(self._poll_conn, lo, hi, start, cursor, last_rev), self._polls
                    )
                    backoff = self.poll_interval
                except StoreUnavailable:
                    if self._closed:
                        return
                    await asyncio.sleep(backoff)
                    backoff = min(backoff * 2, 1.0)
                    continue
                for _id, rev, typ, key, value, prev in rows:
                    last_rev = rev
                    if typ == _PUT:
                        yield Event("PUT", key.decode(), value, rev, prev)
                    else:
                        yield Event("DELETE", key.decode(), None, rev, prev)
                if len(rows) == _WATCH_BATCH:
                    continue
                # Not asyncio.wait_for: on Python 3.11 it can swallow a cancellation that
                # races with the event being set, and the watch would never stop.
                waiter = asyncio.ensure_future(wake.wait())
                try:
                    await asyncio.wait({waiter}, timeout=self.poll_interval)
                finally:
                    waiter.cancel()
        finally:
            self._wakeups.discard(wake)

    def _poll_conn(self, lo, hi, start, cursor, last_rev):
        return self._poll(self._conn(), lo, hi, start, cursor, last_rev)


__all__ = ["SQLiteStore"]

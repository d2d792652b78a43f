"""Optional on-disk flow history: flow records in a SQLite file, kept for a retention
period, queryable by time. Hubble OSS keeps only its ring; this lets `cilia observe
--since` reach past the ring and past an agent restart.

Writes come in batches (one transaction per read cycle of the event reader); WAL mode so
readers (API queries) do not block the writer."""
from __future__ import annotations

import json
import sqlite3
import time
from typing import Iterable

DEFAULT_RETENTION_S = 24 * 3600
DEFAULT_MAX_ROWS = 1_000_000


class FlowLog:
    def __init__(self, path: str, retention_s: float = DEFAULT_RETENTION_S, max_rows: int = DEFAULT_MAX_ROWS):
        if retention_s <= 0:
            raise ValueError(f"flow log retention must be > 0 seconds, not {retention_s}")
        self.path = path
        self.retention_ns = int(retention_s * 1e9)
        self.max_rows = max_rows
        self.db = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
        self.db.execute("PRAGMA journal_mode=WAL")
        self.db.execute("PRAGMA synchronous=NORMAL")
        self.db.execute("CREATE TABLE IF NOT EXISTS flows (time_ns INTEGER NOT NULL, record TEXT NOT NULL)")
        self.db.execute("CREATE INDEX IF NOT EXISTS flows_time ON flows(time_ns)")
        self.written = 0
        self._last_prune = time.monotonic()

    def append(self, items: Iterable[tuple[int, dict]]) -> int:
        rows = [(ns, json.dumps(rec, separators=(",", ":"))) for ns, rec in items]
        if not rows:
            return 0
        self.db.execute("BEGIN")
        self.db.executemany("INSERT INTO flows(time_ns, record) VALUES (?, ?)", rows)
        self.db.execute("COMMIT")
        self.written += len(rows)
        if time.monotonic() - self._last_prune > 10:
            self.prune()
        return len(rows)

    def prune(self, now_ns: int | None = None) -> int:
        """Drops rows older than the retention and beyond max_rows (oldest first)."""
        self._last_prune = time.monotonic()
        cutoff = (now_ns if now_ns is not None else time.time_ns()) - self.retention_ns
        n = self.db.execute("DELETE FROM flows WHERE time_ns < ?", (cutoff,)).rowcount
        count = self.db.execute("SELECT COUNT(*) FROM flows").fetchone()[0]
        if count > self.max_rows:
            n += self.db.execute(
                "DELETE FROM flows WHERE rowid IN (SELECT rowid FROM flows ORDER BY time_ns LIMIT ?)",
                (count - self.max_rows,)).rowcount
        return n

    def query(self, *, since_ns: int | None = None, until_ns: int | None = None, first: int | None = None,
              last: int | None = None) -> list[tuple[int, dict]]:
        """(ns, record) in time order within [since, until]; the oldest ``first`` or the
        newest ``last`` of them."""
        where, args = [], []
        if since_ns is not None:
            where.append("time_ns >= ?")
            args.append(since_ns)
        if until_ns is not None:
            where.append("time_ns <= ?")
            args.append(until_ns)
        sql = "SELECT time_ns, record FROM flows" + (" WHERE " + " AND ".join(where) if where else "")
        if last is not None:
            sql += " ORDER BY time_ns DESC, rowid DESC LIMIT ?"
            rows = self.db.execute(sql, (*args, last)).fetchall()[::-1]
        else:
            sql += " ORDER BY time_ns, rowid"
            if first is not None:
                sql += " LIMIT ?"
                args.append(first)
            rows = self.db.execute(sql, args).fetchall()
        return [(ns, json.loads(r)) for ns, r in rows]

    def count(self) -> int:
        return self.db.execute("SELECT COUNT(*) FROM flows").fetchone()[0]

    def close(self) -> None:
        self.db.close()

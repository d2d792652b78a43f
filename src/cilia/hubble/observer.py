"""The agent's flow ring (Hubble's observer): the newest N flow records, and subscribers
that see every record as it is added (follow streams, metrics).

A record is what /v1/flows streams: {"flow": {...}, "node_name": ..., "time": ...}.
Everything runs on the agent's event loop: no locks."""
from __future__ import annotations

import logging
import time
from collections import deque
from typing import Callable, Iterable

log = logging.getLogger("cilia.hubble")

DEFAULT_MAX_FLOWS = 4095  # Hubble's default ring capacity


class Observer:
    def __init__(self, max_flows: int = DEFAULT_MAX_FLOWS):
        if max_flows < 1:
            raise ValueError(f"max_flows must be >= 1, not {max_flows}")
        self.max_flows = max_flows
        # (unix ns, record): the time is kept as a number so since/until need no parsing.
        self._ring: deque[tuple[int, dict]] = deque(maxlen=max_flows)
        self._subs: dict[int, Callable[[dict], None]] = {}
        self._next_sub = 0
        self.seen_flows = 0
        self.lost_events = 0       # set by the reader: events the datapath could not queue
        self.started_ns = time.time_ns()

    def add(self, record: dict, time_ns: int | None = None) -> None:
        self._ring.append((time_ns if time_ns is not None else time.time_ns(), record))
        self.seen_flows += 1
        for sid, cb in list(self._subs.items()):
            try:
                cb(record)
            except Exception:  # one broken subscriber must not stop the others or the reader
                log.exception("flow subscriber %d failed; removed", sid)
                self._subs.pop(sid, None)

    def add_many(self, items: Iterable[tuple[int, dict]]) -> None:
        for ns, rec in items:
            self.add(rec, ns)

    def subscribe(self, callback: Callable[[dict], None]) -> Callable[[], None]:
        sid = self._next_sub
        self._next_sub += 1
        self._subs[sid] = callback

        def unsubscribe() -> None:
            self._subs.pop(sid, None)
        return unsubscribe

    @property
    def subscribers(self) -> int:
        return len(self._subs)

    def snapshot(self) -> list[dict]:
        return [r for _, r in self._ring]

    def query(self, *, first: int | None = None, last: int | None = None, since_ns: int | None = None,
              until_ns: int | None = None, predicate: Callable[[dict], bool] | None = None) -> list[dict]:
        """Records in time order within [since, until] that pass ``predicate``; then the
        oldest ``first`` or the newest ``last`` of them."""
        out = [r for ns, r in self._ring
               if (since_ns is None or ns >= since_ns) and (until_ns is None or ns <= until_ns)
               and (predicate is None or predicate(r))]
        if first is not None:
            out = out[:first]
        if last is not None:
            out = out[-last:] if last else []
        return out

    def status(self) -> dict:
        return {"num_flows": len(self._ring), "max_flows": self.max_flows, "seen_flows": self.seen_flows,
                "lost_events": self.lost_events, "uptime_ns": time.time_ns() - self.started_ns}

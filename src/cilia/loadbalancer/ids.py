"""Small numeric ids for string keys, persisted in a JSON file.

The datapath names frontends by rev-NAT index and backends by id; conntrack entries carry
them. Keeping the numbers across agent restarts (the file lives in the agent's state dir)
means established connections still reverse-NAT correctly after a restart, and ids freed by
a deleted service are handed out again only after the cursor has gone round the whole
range, so a stale CT entry is unlikely to point at a new service.
"""
from __future__ import annotations

import json
import logging
import os

from cilia.paths import write_atomic

log = logging.getLogger("cilia.lb.ids")


class IdExhausted(Exception):
    pass


class IdAllocator:
    def __init__(self, path: str | None, first: int = 1, last: int = 65535):
        if not 0 < first <= last:
            raise ValueError(f"id range {first}..{last} is empty")
        self.path = path
        self.first, self.last = first, last
        self.ids: dict[str, int] = {}
        self._used: set[int] = set()
        self._next = first
        self._dirty = False
        if path:
            self._load()

    def _load(self) -> None:
        try:
            with open(self.path) as f:
                data = json.load(f)
        except FileNotFoundError:
            return
        except (OSError, ValueError) as e:
            # A corrupt file must not stop the agent; ids restart from scratch and the
            # reconciler reprograms every frontend anyway.
            log.warning("ignoring unreadable id file %s: %s", self.path, e)
            return
        for key, value in (data.get("ids") or {}).items():
            if isinstance(value, int) and self.first <= value <= self.last and value not in self._used:
                self.ids[key] = value
                self._used.add(value)
        nxt = data.get("next")
        if isinstance(nxt, int) and self.first <= nxt <= self.last:
            self._next = nxt

    def __len__(self) -> int:
        return len(self.ids)

    def __contains__(self, key: str) -> bool:
        return key in self.ids

    def get(self, key: str) -> int | None:
        return self.ids.get(key)

    def acquire(self, key: str) -> int:
        have = self.ids.get(key)
        if have is not None:
            return have
        if len(self._used) >= self.last - self.first + 1:
            raise IdExhausted(f"all ids {self.first}..{self.last} are in use")
        candidate = self._next
        while candidate in self._used:
            candidate = self.first if candidate >= self.last else candidate + 1
        self.ids[key] = candidate
        self._used.add(candidate)
        self._next = self.first if candidate >= self.last else candidate + 1
        self._dirty = True
        return candidate

    def release(self, key: str) -> int | None:
        value = self.ids.pop(key, None)
        if value is not None:
            self._used.discard(value)
            self._dirty = True
        return value

    def save(self) -> None:
        if not self.path or not self._dirty:
            return
        os.makedirs(os.path.dirname(self.path) or ".", exist_ok=True)
        write_atomic(self.path, json.dumps({"next": self._next, "ids": self.ids},
                                           sort_keys=True, separators=(",", ":")))
        self._dirty = False

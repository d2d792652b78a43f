"""LBReconciler: keeps a node's BPF service maps equal to desired_entries(), touching only
what changed.

Incremental by construction: sync() receives the full set of services and slices (the
caller's watch cache), but recomputes entries only for services whose object or slices
changed (identity first, then equality), and calls the datapath only for frontends whose
entry differs from what was programmed. At 10,000 services an unchanged sync is a dict walk.

Ids (rev-NAT index per frontend, backend id per ip:port/proto) persist in the state dir.
After a restart nothing is known about the maps, so the first sync upserts every desired
frontend and deletes every frontend and backend the id files remember but nobody wants.
"""
from __future__ import annotations

import asyncio
import logging
import os
import time
from collections import Counter
from dataclasses import dataclass
from typing import Any, Awaitable, Callable, Iterable, Mapping, Sequence

from .datapath import LBDatapath, datapath_kind, default_backend_factory, default_service_factory
from .desired import ServiceKey, group_slices, service_entries, service_key
from .ids import IdAllocator
from .maglev import backend_table
from .model import PROTO_NUMBERS, STATE_ACTIVE, Frontend, LBConfig, LBEntry
from .view import service_model

log = logging.getLogger("cilia.lb")

REVNAT_FILE = "lb-revnat-ids.json"
BACKEND_FILE = "lb-backend-ids.json"
MAX_REVNAT = 65535
BATCH_MIN = 32   # fewer upserts than this go one by one

RunBlocking = Callable[[Callable[[], Any]], Awaitable[Any]]


@dataclass(frozen=True)
class Programmed:
    entry: LBEntry
    rev_nat: int
    backend_ids: tuple[int, ...]


@dataclass
class _Op:
    kind: str                 # upsert | delete
    frontend: Frontend
    entry: LBEntry | None = None
    rev_nat: int = 0
    backend_ids: tuple[int, ...] = ()
    maglev: list[int] | None = None
    error: str | None = None


def _same_inputs(old: tuple[dict, tuple[dict, ...]], new: tuple[dict, tuple[dict, ...]]) -> bool:
    (osvc, osl), (nsvc, nsl) = old, new
    if not (osvc is nsvc or osvc == nsvc) or len(osl) != len(nsl):
        return False
    return all(a is b or a == b for a, b in zip(osl, nsl))


def _parse_frontend_key(key: str) -> Frontend | None:
    """Inverse of Frontend.key(): "10.96.0.1:80/TCP/internal"."""
    try:
        addr_port, proto, scope = key.split("/")
        addr, port = addr_port.rsplit(":", 1)
        return Frontend(addr, int(port), PROTO_NUMBERS[proto], scope)
    except (ValueError, KeyError):
        return None


class LBReconciler:
    def __init__(self, datapath: LBDatapath, state_dir: str | None, node: str,
                 node_ips: Sequence[str] = (), config: LBConfig | None = None, *,
                 run_blocking: RunBlocking | None = None,
                 backend_factory: Callable[..., Any] | None = None,
                 service_factory: Callable[..., Any] | None = None,
                 max_backend_id: int = 65535):
        self.dp = datapath
        self.node = node
        self.node_ips = list(node_ips)
        self.cfg = config or LBConfig()
        self._run_blocking = run_blocking
        self._backend = backend_factory or default_backend_factory()
        # Batched writes need the datapath's LBService; a custom backend type means a test
        # seam, which gets one call per frontend.
        self._service = service_factory if service_factory is not None else (
            default_service_factory() if backend_factory is None else None)
        self.revnat = IdAllocator(os.path.join(state_dir, REVNAT_FILE) if state_dir else None, 1, MAX_REVNAT)
        self.backend_ids = IdAllocator(os.path.join(state_dir, BACKEND_FILE) if state_dir else None,
                                       1, max_backend_id)
        self._inputs: dict[ServiceKey, tuple[dict, tuple[dict, ...]]] = {}
        self._entries: dict[ServiceKey, dict[Frontend, LBEntry]] = {}
        self._claims: dict[Frontend, set[ServiceKey]] = {}
        self.desired: dict[Frontend, LBEntry] = {}
        self.programmed: dict[Frontend, Programmed] = {}
        self._backend_refs: Counter[str] = Counter()
        self._failed: set[Frontend] = set()
        self._orphans: set[str] = set()   # backends whose delete failed: retried each sync
        self.errors: dict[Frontend, str] = {}
        self._last_node_ips: list[str] | None = None
        self._first = True
        self.syncs = 0
        self.last_sync_ms = 0.0
        self.last_changes = 0

    # --- computing what is wanted -----------------------------------------------------------

    def _node_ips(self, nodes: Mapping[str, Any] | None) -> list[str]:
        ips = list(self.node_ips)
        mine = (nodes or {}).get(self.node)
        ip = mine if isinstance(mine, str) else (mine or {}).get("ip") if isinstance(mine, dict) else None
        if ip and ip not in ips:
            ips.append(ip)
        return ips

    def _update_service(self, key: ServiceKey, entries: dict[Frontend, LBEntry], touched: set[Frontend]) -> None:
        for fe in self._entries.get(key, {}):
            owners = self._claims.get(fe)
            if owners is not None:
                owners.discard(key)
                if not owners:
                    del self._claims[fe]
            touched.add(fe)
        if entries:
            self._entries[key] = entries
        else:
            self._entries.pop(key, None)
        for fe in entries:
            self._claims.setdefault(fe, set()).add(key)
            touched.add(fe)

    def _refresh_desired(self, touched: Iterable[Frontend]) -> None:
        for fe in touched:
            owners = self._claims.get(fe)
            if not owners:
                self.desired.pop(fe, None)
                continue
            winner = min(owners)
            if len(owners) > 1:
                log.warning("frontend %s is claimed by %s; %s/%s keeps it", fe,
                            ", ".join("/".join(k) for k in sorted(owners)), *winner)
            self.desired[fe] = self._entries[winner][fe]

    def compute(self, services: Iterable[dict] | Mapping[Any, dict], slices: Iterable[dict] | Mapping[Any, dict],
                nodes: Mapping[str, Any] | None = None) -> set[Frontend]:
        """Update self.desired from the inputs; returns the frontends that may have changed."""
        svcs = list(services.values()) if isinstance(services, Mapping) else list(services)
        sls = list(slices.values()) if isinstance(slices, Mapping) else list(slices)
        ips = self._node_ips(nodes)
        everything = ips != self._last_node_ips
        self._last_node_ips = ips
        groups = group_slices(sls)
        current = {service_key(s): s for s in svcs}
        touched: set[Frontend] = set()
        for key, svc in current.items():
            new = (svc, tuple(groups.get(key, ())))
            old = self._inputs.get(key)
            if not everything and old is not None and _same_inputs(old, new):
                continue
            self._inputs[key] = new
            entries = {e.frontend: e for e in service_entries(svc, new[1], self.node, ips, self.cfg)}
            self._update_service(key, entries, touched)
        for key in [k for k in self._inputs if k not in current]:
            del self._inputs[key]
            self._update_service(key, {}, touched)
        self._refresh_desired(touched)
        return touched

    # --- planning datapath operations ------------------------------------------------------

    def _maglev(self, entry: LBEntry, ids: dict[str, int], memo: dict) -> list[int] | None:
        # As in Cilium, the table holds active backends only (terminating ones keep their
        # established flows through conntrack); with none active there is no table.
        pool = [b for b in entry.backends if b.state == STATE_ACTIVE]
        if entry.algorithm != "maglev" or not pool:
            return None
        names = {b.key(): ids[b.key()] for b in pool}
        key = tuple(sorted(names.items()))
        if key not in memo:
            memo[key] = backend_table(names, self.cfg.maglev_table_size, self.cfg.maglev_hash_seed)
        return memo[key]

    def _plan(self, touched: set[Frontend]) -> list[_Op]:
        ops: list[_Op] = []
        memo: dict = {}
        for fe in sorted(touched):
            want, have = self.desired.get(fe), self.programmed.get(fe)
            if want is None:
                if have is not None or fe.key() in self.revnat:
                    ops.append(_Op("delete", fe))
                continue
            if have is not None and have.entry == want and fe not in self._failed:
                continue
            ids = {b.key(): self.backend_ids.acquire(b.key()) for b in want.backends}
            ops.append(_Op("upsert", fe, want, self.revnat.acquire(fe.key()),
                           tuple(ids[b.key()] for b in want.backends), self._maglev(want, ids, memo)))
        return ops

    def _backends_of(self, op: _Op) -> list:
        assert op.entry is not None
        return [self._backend(id=i, address=b.address, port=b.port, proto=b.proto, state=b.state)
                for i, b in zip(op.backend_ids, op.entry.backends)]

    def _upsert_one(self, op: _Op) -> None:
        e, fe = op.entry, op.frontend
        assert e is not None
        self.dp.upsert_service(op.rev_nat, fe.address, fe.port, fe.proto, self._backends_of(op),
                               kind=datapath_kind(e.kind), scope=fe.scope, algorithm=e.algorithm,
                               maglev_table=op.maglev, affinity_timeout=e.affinity_timeout,
                               local_only=e.local_only)

    def _upsert_batch(self, ops: list[_Op]) -> bool:
        """A full resync in a few batched map writes; False (nothing assumed written) when the
        datapath cannot batch or the batch fails, so each op is retried alone for its error."""
        batch = getattr(self.dp, "upsert_services", None)
        if batch is None or self._service is None or len(ops) < BATCH_MIN:
            return False
        try:
            batch([self._service(op.rev_nat, op.frontend.address, op.frontend.port, op.frontend.proto,
                                 self._backends_of(op), kind=datapath_kind(op.entry.kind),
                                 scope=op.frontend.scope, algorithm=op.entry.algorithm,
                                 maglev_table=op.maglev, affinity_timeout=op.entry.affinity_timeout,
                                 local_only=op.entry.local_only) for op in ops])
            return True
        except Exception as ex:  # one bad frontend; find it below
            log.warning("batched LB upsert of %d frontends failed (%s); retrying one by one", len(ops), ex)
            return False

    def _execute(self, ops: list[_Op]) -> None:
        """Runs in the datapath's thread; one failing frontend does not stop the others."""
        upserts = [op for op in ops if op.kind == "upsert"]
        batched = self._upsert_batch(upserts)
        for op in ops:
            if batched and op.kind == "upsert":
                continue
            fe = op.frontend
            try:
                if op.kind == "upsert":
                    self._upsert_one(op)
                else:
                    self.dp.delete_service(fe.address, fe.port, fe.proto, scope=fe.scope)
            except Exception as ex:  # reported per frontend and retried on the next sync
                op.error = f"{type(ex).__name__}: {ex}"

    def _delete_backends(self, ids: list[int]) -> list[tuple[int, str]]:
        failed = []
        for i in ids:
            try:
                self.dp.delete_backend(i)
            except Exception as ex:
                failed.append((i, f"{type(ex).__name__}: {ex}"))
        return failed

    async def _blocking(self, fn: Callable[[], Any]) -> Any:
        if self._run_blocking is None:
            return fn()
        return await self._run_blocking(fn)

    def _account(self, op: _Op) -> set[str]:
        """Record an op's outcome; returns the backend keys that may have lost their last user."""
        fe = op.frontend
        maybe_unused = {b.key() for b in op.entry.backends} if op.entry else set()
        if op.error is not None:
            log.error("LB %s %s failed: %s", op.kind, fe, op.error)
            self.errors[fe] = op.error
            self._failed.add(fe)
            return maybe_unused
        self.errors.pop(fe, None)
        self._failed.discard(fe)
        old = self.programmed.pop(fe, None)
        if old is not None:
            self._backend_refs.subtract(b.key() for b in old.entry.backends)
            maybe_unused |= {b.key() for b in old.entry.backends}
        if op.kind == "upsert":
            assert op.entry is not None
            self.programmed[fe] = Programmed(op.entry, op.rev_nat, op.backend_ids)
            self._backend_refs.update(b.key() for b in op.entry.backends)
        else:
            self.revnat.release(fe.key())
        return maybe_unused

    # --- the entry point -----------------------------------------------------------------------

    async def sync(self, services: Iterable[dict] | Mapping[Any, dict],
                   slices: Iterable[dict] | Mapping[Any, dict],
                   nodes: Mapping[str, Any] | None = None) -> int:
        """Program the datapath for these inputs; returns how many frontends were written."""
        start = time.perf_counter()
        touched = self.compute(services, slices, nodes) | self._failed
        if self._first:
            touched |= set(self.desired)
            touched |= {fe for fe in map(_parse_frontend_key, list(self.revnat.ids)) if fe is not None}
        ops = self._plan(touched)
        if ops:
            await self._blocking(lambda: self._execute(ops))
        elif not self._first and not self._orphans:
            self._finish(start, 0)
            return 0
        candidates: set[str] = set(self.backend_ids.ids) if self._first else set(self._orphans)
        for op in ops:
            candidates |= self._account(op)
        # Backends go last: a frontend may still point at them until its upsert is done.
        unused = sorted(k for k in candidates
                        if k in self.backend_ids and self._backend_refs.get(k, 0) <= 0)
        if unused:
            ids = [self.backend_ids.ids[k] for k in unused]
            failed = dict(await self._blocking(lambda: self._delete_backends(ids)))
            for k, i in zip(unused, ids):
                if i in failed:
                    log.error("LB delete backend %d (%s) failed: %s", i, k, failed[i])
                    self._orphans.add(k)
                else:
                    self._orphans.discard(k)
                    self.backend_ids.release(k)
                    self._backend_refs.pop(k, None)
        if self._first:
            for stale in [k for k in self.revnat.ids if _parse_frontend_key(k) is None]:
                self.revnat.release(stale)
        self.revnat.save()
        self.backend_ids.save()
        self._first = False
        self._finish(start, len(ops))
        return len(ops)

    def _finish(self, start: float, changes: int) -> None:
        self.syncs += 1
        self.last_changes = changes
        self.last_sync_ms = (time.perf_counter() - start) * 1000

    # --- views for the API ---------------------------------------------------------------------

    def services_view(self) -> list[dict]:
        """Cilium's REST model (GET /v1/service): spec = wanted, status.realized = programmed."""
        out = []
        for fe in set(self.desired) | set(self.programmed):
            want, have = self.desired.get(fe), self.programmed.get(fe)
            rev = have.rev_nat if have else (self.revnat.get(fe.key()) or 0)
            spec = service_model(want, rev) if want else None
            realized = service_model(have.entry, have.rev_nat) if have else None
            item = {"spec": spec or realized, "status": {"realized": realized}}
            if fe in self.errors:
                item["status"]["error"] = self.errors[fe]
            out.append(item)
        return sorted(out, key=lambda s: s["spec"]["id"])

    def stats(self) -> dict:
        return {"frontends": len(self.programmed), "desired": len(self.desired),
                "backends": len(self.backend_ids), "services": len(self._inputs),
                "syncs": self.syncs, "last_sync_ms": round(self.last_sync_ms, 3),
                "last_changes": self.last_changes, "errors": len(self.errors)}


def run_in_executor(executor) -> RunBlocking:
    """A run_blocking for a concurrent.futures executor (the agent's datapath thread)."""
    async def run(fn: Callable[[], Any]) -> Any:
        return await asyncio.get_running_loop().run_in_executor(executor, fn)
    return run


"""etcd v3 backend over gRPC.

aetcd provides the channel and the generated etcd v3 protobuf stubs; the
store calls the stubs directly because aetcd's convenience wrappers drop the
response headers (revisions) and its shared watcher cannot resume a stream.
Each watch() owns one gRPC Watch stream and, when the stream breaks (etcd
restarted, endpoint down), opens a new one from the last delivered revision
+ 1, so a consumer sees every event exactly once across outages.
"""

from __future__ import annotations

import asyncio
from typing import AsyncIterator, Awaitable, Callable, TypeVar

import aetcd
import grpc
from aetcd import rpc

from .api import (
    KV,
    Compacted,
    Event,
    KVStoreError,
    LeaseNotFound,
    StoreUnavailable,
    check_key,
    check_txn,
    prefix_end,
)

T = TypeVar("T")

_CHANNEL_OPTIONS = {
    # gRPC's default reconnect backoff grows to 120 s; after an etcd outage the
    # agents must resync within about a second of etcd coming back.
    "grpc.initial_reconnect_backoff_ms": 100,
    "grpc.min_reconnect_backoff_ms": 100,
    "grpc.max_reconnect_backoff_ms": 1000,
    # Detect a silently dead peer (host gone, partition) on idle watch streams;
    # etcd's server rejects pings more often than every 5 s.
    "grpc.keepalive_time_ms": 10_000,
    "grpc.keepalive_timeout_ms": 5_000,
    "grpc.max_receive_message_length": 256 * 1024 * 1024,
}
_LIST_PAGE = 5000
_WATCH_BACKOFF_MAX = 1.0
_UNAVAILABLE = {
    grpc.StatusCode.UNAVAILABLE,
    grpc.StatusCode.DEADLINE_EXCEEDED,
    grpc.StatusCode.CANCELLED,
    grpc.StatusCode.UNKNOWN,  # connection resets surface as UNKNOWN on some grpc versions
}


def _key_range(prefix: str) -> tuple[bytes, bytes]:
    lo = prefix.encode()
    hi = prefix_end(lo)
    # etcd: an empty key is invalid, and range_end "\0" means "no upper bound".
    return (lo or b"\0"), (hi if hi is not None else b"\0")


def _kv(kv) -> KV:
    return KV(kv.key.decode(), bytes(kv.value), kv.create_revision, kv.mod_revision, kv.lease)


def _map_error(e: grpc.aio.AioRpcError, lease: int = 0) -> Exception:
    code, details = e.code(), e.details() or ""
    if code in _UNAVAILABLE:
        return StoreUnavailable(f"etcd: {code.name}: {details}")
    if code == grpc.StatusCode.NOT_FOUND and "lease" in details:
        return LeaseNotFound(lease)
    if code == grpc.StatusCode.INVALID_ARGUMENT:
        return ValueError(f"etcd: {details}")
    return KVStoreError(f"etcd: {code.name}: {details}")


class EtcdStore:
    def __init__(self, endpoints: list[tuple[str, int]], *, timeout: float = 5.0):
        if not endpoints:
            raise ValueError("at least one etcd endpoint is needed")
        self.endpoints = list(endpoints)
        self.timeout = timeout
        self._idx = 0
        self._client: aetcd.Client | None = None
        self._closed = False

    @property
    def _endpoint_names(self) -> list[str]:
        return [f"{h}:{p}" for h, p in self.endpoints]

    async def _get_client(self) -> aetcd.Client:
        if self._closed:
            raise StoreUnavailable("store is closed")
        if self._client is None:
            host, port = self.endpoints[self._idx]
            client = aetcd.Client(host=host, port=port, timeout=self.timeout, options=_CHANNEL_OPTIONS)
            await client.connect()  # builds the channel; no network I/O yet
            self._client = client
        return self._client

    async def _rotate(self, failed: aetcd.Client) -> None:
        """Move to the next endpoint after `failed` could not be reached."""
        if len(self.endpoints) == 1 or self._client is not failed:
            return
        self._client = None
        self._idx = (self._idx + 1) % len(self.endpoints)
        await failed.close()

    async def _call(self, fn: Callable[[aetcd.Client], Awaitable[T]], lease: int = 0) -> T:
        last: Exception | None = None
        # Try each endpoint once. A request that failed as UNAVAILABLE was not
        # applied by the endpoint that refused it, so resending it elsewhere is safe.
        for _ in range(len(self.endpoints)):
            client = await self._get_client()
            try:
                return await fn(client)
            except grpc.aio.AioRpcError as e:
                err = _map_error(e, lease)
                if not isinstance(err, StoreUnavailable):
                    raise err from e
                last = err
                if e.code() != grpc.StatusCode.UNAVAILABLE:
                    break  # a timed-out write may have been applied: do not repeat it
            except grpc.aio.UsageError as e:  # channel closed under us by another task's rotation
                last = StoreUnavailable(f"etcd: {e}")
            await self._rotate(client)
        assert last is not None
        raise last

    # ---- the Store contract ----

    async def get(self, key: str) -> KV | None:
        check_key(key)

        async def op(c: aetcd.Client):
            return await c.kvstub.Range(rpc.RangeRequest(key=key.encode()), timeout=self.timeout, metadata=c.metadata)

        resp = await self._call(op)
        return _kv(resp.kvs[0]) if resp.kvs else None

    async def put(self, key: str, value: bytes, lease: int = 0) -> int:
        check_txn([(key, value)], [])

        async def op(c: aetcd.Client):
            req = rpc.PutRequest(key=key.encode(), value=bytes(value), lease=lease)
            return await c.kvstub.Put(req, timeout=self.timeout, metadata=c.metadata)

        return (await self._call(op, lease)).header.revision

    async def delete(self, key: str) -> bool:
        check_key(key)

        async def op(c: aetcd.Client):
            req = rpc.DeleteRangeRequest(key=key.encode())
            return await c.kvstub.DeleteRange(req, timeout=self.timeout, metadata=c.metadata)

        return (await self._call(op)).deleted > 0

    async def delete_prefix(self, prefix: str) -> int:
        lo, hi = _key_range(prefix)

        async def op(c: aetcd.Client):
            req = rpc.DeleteRangeRequest(key=lo, range_end=hi)
            return await c.kvstub.DeleteRange(req, timeout=self.timeout, metadata=c.metadata)

        return (await self._call(op)).deleted

    async def list(self, prefix: str) -> tuple[list[KV], int]:
        lo, hi = _key_range(prefix)
        items: list[KV] = []
        rev = 0
        start = lo
        while True:
            # Later pages are read at the first page's revision: one snapshot.
            async def op(c: aetcd.Client, start=start, rev=rev):
                req = rpc.RangeRequest(
                    key=start,
                    range_end=hi,
                    limit=_LIST_PAGE,
                    revision=rev,
                    sort_order=rpc.RangeRequest.ASCEND,
                    sort_target=rpc.RangeRequest.KEY,
                )
                return await c.kvstub.Range(req, timeout=self.timeout, metadata=c.metadata)

            try:
                resp = await self._call(op)
            except KVStoreError as e:
                if rev and "compacted" in str(e):
                    raise StoreUnavailable(f"etcd: list snapshot compacted while paging: {e}") from e
                raise
            if not rev:
                rev = resp.header.revision
            items.extend(_kv(kv) for kv in resp.kvs)
            if not resp.more or not resp.kvs:
                return items, rev
            start = resp.kvs[-1].key + b"\0"

    async def cas(self, key: str, value: bytes, expected_mod_revision: int, lease: int = 0) -> bool:
        check_txn([(key, value)], [])
        k = key.encode()

        async def op(c: aetcd.Client):
            req = rpc.TxnRequest(
                compare=[rpc.Compare(key=k, target=rpc.Compare.MOD, result=rpc.Compare.EQUAL,
                                     mod_revision=expected_mod_revision)],
                success=[rpc.RequestOp(request_put=rpc.PutRequest(key=k, value=bytes(value), lease=lease))],
            )
            return await c.kvstub.Txn(req, timeout=self.timeout, metadata=c.metadata)

        return (await self._call(op, lease)).succeeded

    async def cas_delete(self, key: str, expected_mod_revision: int) -> bool:
        check_key(key)
        if expected_mod_revision <= 0:
            raise ValueError("cas_delete needs the mod_revision of an existing key")
        k = key.encode()

        async def op(c: aetcd.Client):
            req = rpc.TxnRequest(
                compare=[rpc.Compare(key=k, target=rpc.Compare.MOD, result=rpc.Compare.EQUAL,
                                     mod_revision=expected_mod_revision)],
                success=[rpc.RequestOp(request_delete_range=rpc.DeleteRangeRequest(key=k))],
            )
            return await c.kvstub.Txn(req, timeout=self.timeout, metadata=c.metadata)

        return (await self._call(op)).succeeded

    async def txn_put_many(self, items: list[tuple[str, bytes]], deletes: list[str] = []) -> int:
        check_txn(items, deletes)
        ops = [rpc.RequestOp(request_put=rpc.PutRequest(key=k.encode(), value=bytes(v))) for k, v in items]
        ops += [rpc.RequestOp(request_delete_range=rpc.DeleteRangeRequest(key=k.encode())) for k in deletes]

        async def op(c: aetcd.Client):
            return await c.kvstub.Txn(rpc.TxnRequest(success=ops), timeout=self.timeout, metadata=c.metadata)

        return (await self._call(op)).header.revision

    async def lease_grant(self, ttl_seconds: int) -> int:
        if ttl_seconds < 1:
            raise ValueError("lease TTL must be >= 1 second")

        async def op(c: aetcd.Client):
            return await c.leasestub.LeaseGrant(
                rpc.LeaseGrantRequest(TTL=ttl_seconds), timeout=self.timeout, metadata=c.metadata
            )

        resp = await self._call(op)
        if resp.error:
            raise KVStoreError(f"etcd: lease grant: {resp.error}")
        return resp.ID

    async def lease_keepalive(self, lease: int) -> None:
        async def op(c: aetcd.Client):
            call = c.leasestub.LeaseKeepAlive(timeout=self.timeout, metadata=c.metadata)
            try:
                await call.write(rpc.LeaseKeepAliveRequest(ID=lease))
                resp = await call.read()
            finally:
                call.cancel()
            if resp is grpc.aio.EOF:
                raise StoreUnavailable("etcd: keepalive stream closed before answering")
            return resp

        resp = await self._call(op, lease)
        if resp.TTL <= 0:  # etcd answers an unknown lease with TTL 0, not an error
            raise LeaseNotFound(lease)

    async def lease_revoke(self, lease: int) -> None:
        async def op(c: aetcd.Client):
            return await c.leasestub.LeaseRevoke(
                rpc.LeaseRevokeRequest(ID=lease), timeout=self.timeout, metadata=c.metadata
            )

        await self._call(op, lease)

    async def revision(self) -> int:
        async def op(c: aetcd.Client):
            # Any linearizable read returns the current revision in its header.
            req = rpc.RangeRequest(key=b"\0", count_only=True)
            return await c.kvstub.Range(req, timeout=self.timeout, metadata=c.metadata)

        return (await self._call(op)).header.revision

    async def compact(self, revision: int) -> None:
        async def op(c: aetcd.Client):
            req = rpc.CompactionRequest(revision=revision, physical=True)
            return await c.kvstub.Compact(req, timeout=self.timeout, metadata=c.metadata)

        try:
            await self._call(op)
        except KVStoreError as e:
            msg = str(e)
            if "has been compacted" in msg:
                return  # already compacted at or past it: same outcome as SQLite
            if "future revision" in msg:
                raise ValueError(f"cannot compact at future revision {revision}") from e
            raise

    async def status(self) -> dict:
        st: dict = {
            "backend": "etcd",
            "endpoints": self._endpoint_names,
            "revision": None,
            "ok": False,
            "error": None,
        }

        async def op(c: aetcd.Client):
            return await c.maintenancestub.Status(rpc.StatusRequest(), timeout=self.timeout, metadata=c.metadata)

        try:
            resp = await self._call(op)
            st.update(revision=resp.header.revision, ok=True, version=resp.version,
                      endpoint=self._endpoint_names[self._idx])
        except KVStoreError as e:
            st["error"] = str(e)
        return st

    async def close(self) -> None:
        self._closed = True
        client, self._client = self._client, None
        if client is not None:
            await client.close()

    # ---- watch ----

    async def watch(self, prefix: str, start_revision: int) -> AsyncIterator[Event]:
        """Stream events; outages are retried with backoff, only Compacted is raised."""
        lo, hi = _key_range(prefix)
        next_rev = start_revision
        backoff = 0.05
        while not self._closed:
            call = None
            client = None
            try:
                if next_rev <= 0:
                    next_rev = await self.revision() + 1
                client = await self._get_client()
                call = rpc.WatchStub(client.channel).Watch(metadata=client.metadata)
                await call.write(
                    rpc.WatchRequest(
                        create_request=rpc.WatchCreateRequest(
                            key=lo, range_end=hi, start_revision=next_rev, prev_kv=True
                        )
                    )
                )
                while True:
                    resp = await call.read()
                    if resp is grpc.aio.EOF:
                        break
                    if resp.compact_revision:
                        raise Compacted(next_rev, resp.compact_revision)
                    if resp.canceled:
                        break
                    backoff = 0.05
                    for ev in resp.events:
                        next_rev = ev.kv.mod_revision + 1
                        if ev.type == rpc.Event.PUT:
                            yield Event("PUT", ev.kv.key.decode(), bytes(ev.kv.value), ev.kv.mod_revision,
                                        bytes(ev.prev_kv.value) if ev.HasField("prev_kv") else None)
                        else:
                            yield Event("DELETE", ev.kv.key.decode(), None, ev.kv.mod_revision,
                                        bytes(ev.prev_kv.value) if ev.HasField("prev_kv") else None)
            except grpc.aio.AioRpcError as e:
                err = _map_error(e)
                if not isinstance(err, StoreUnavailable):
                    raise err from e
                if client is not None:
                    await self._rotate(client)
            except (StoreUnavailable, grpc.aio.UsageError):
                pass
            except asyncio.CancelledError:
                # A cancelled stream (our channel closed by close() or a rotation)
                # is not a cancellation of the consumer's task.
                task = asyncio.current_task()
                if task is not None and task.cancelling():
                    raise
                if call is None or not call.cancelled():
                    raise
            finally:
                if call is not None:
                    call.cancel()
            if self._closed:
                return
            await asyncio.sleep(backoff)
            backoff = min(backoff * 2, _WATCH_BACKOFF_MAX)


__all__ = ["EtcdStore"]

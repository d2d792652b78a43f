"""ServiceWatcher: the agent's store feed into LBReconciler, on a real SQLite store."""
from __future__ import annotations

import asyncio
import time

import pytest

from cilia.kvstore import open_store
from cilia.loadbalancer.datapath import DatapathBackend
from cilia.loadbalancer.reconciler import LBReconciler
from cilia.loadbalancer.watch import ServiceWatcher
from cilia.objects import encode, key
from tests.unit.test_kvstore_contract import arun
from tests.unit.test_lb_desired import NODE_IPS, ep, eslice, service
from tests.unit.test_lb_reconciler import RecordingDatapath

pytestmark = pytest.mark.timeout(60)


async def until(cond, timeout=10.0):
    deadline = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < deadline, "timed out"
        await asyncio.sleep(0.02)


def test_watcher_programs_changes_from_store_events(tmp_path):
    url = f"sqlite://{tmp_path}/kv.db?poll_interval=0.02"

    async def main():
        store = open_store(url)
        dp = RecordingDatapath()
        r = LBReconciler(dp, str(tmp_path), "node1", NODE_IPS, backend_factory=DatapathBackend)
        # Present before the watcher starts: comes from the initial list.
        await store.put(key("services", "default", "web"), encode(service()))
        w = ServiceWatcher(store, r, debounce=0.01)
        task = asyncio.create_task(w.run())
        try:
            await until(lambda: ("10.96.0.10", 80, 6, "external") in dp.services)
            assert dp.services[("10.96.0.10", 80, 6, "external")]["backends"] == []
            await store.put(key("endpointslices", "default", "web-x"),
                            encode(eslice(endpoints=[ep("10.244.1.5", "node1")])))
            await until(lambda: len(dp.services[("10.96.0.10", 80, 6, "external")]["backends"]) == 1)
            await store.delete(key("services", "default", "web"))
            await until(lambda: not dp.services and not dp.backends)
            assert r.syncs >= 3
        finally:
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
            await store.close()

    arun(main(), timeout=30)

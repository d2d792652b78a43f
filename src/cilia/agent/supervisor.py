"""Guarded root tasks: if any root task dies, the daemon stops in order (kopf-style)
instead of limping on with a dead component."""
from __future__ import annotations

import asyncio
import logging
import signal
from typing import Awaitable, Callable

log = logging.getLogger("cilia.supervisor")


class Supervisor:
    def __init__(self) -> None:
        self._factories: list[tuple[str, Callable[[], Awaitable[None]]]] = []
        self.stopping = asyncio.Event()
        self.failure: BaseException | None = None

    def add(self, name: str, factory: Callable[[], Awaitable[None]]) -> None:
        self._factories.append((name, factory))

    def request_stop(self) -> None:
        self.stopping.set()

    async def run(self) -> int:
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, self.request_stop)
        tasks = {asyncio.create_task(f(), name=n): n for n, f in self._factories}
        stop_waiter = asyncio.create_task(self.stopping.wait(), name="stop-signal")
        done, _ = await asyncio.wait([*tasks, stop_waiter], return_when=asyncio.FIRST_COMPLETED)
        rc = 0
        for t in done:
            if t is stop_waiter:
                continue
            name = tasks[t]
            exc = t.exception() if not t.cancelled() else None
            log.error("root task %s ended%s; stopping", name, f": {exc!r}" if exc else "")
            if exc is not None:
                log.error("task %s failure", name, exc_info=exc)
            self.failure = exc
            rc = 1
        # Stop in reverse start order so the API goes away before what it serves.
        for t in reversed(list(tasks)):
            if not t.done():
                t.cancel()
                try:
                    await t
                except asyncio.CancelledError:
                    pass
                except Exception as e:  # already stopping; report, don't mask rc
                    log.warning("task %s failed while stopping: %r", tasks[t], e)
        stop_waiter.cancel()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.remove_signal_handler(sig)
        return rc

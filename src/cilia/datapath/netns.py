"""Run datapath calls inside a network namespace.

tc/XDP attach and BPF_PROG_TEST_RUN's ifindex resolve in the calling thread's netns.
Python 3.11 has no os.setns, and setns moves only the calling thread, so a dedicated
thread enters the namespace once and executes submitted calls there.
"""

from __future__ import annotations

import concurrent.futures

from cilia.netns import enter


class NetnsExecutor:
    """A single thread living in one netns; ``run(fn, *a)`` executes fn there."""

    def __init__(self, netns_path: str):
        self.netns_path = netns_path
        self._pool = concurrent.futures.ThreadPoolExecutor(max_workers=1, thread_name_prefix="netns")
        self._pool.submit(enter, netns_path).result()

    def run(self, fn, *args, **kwargs):
        return self._pool.submit(fn, *args, **kwargs).result()

    def close(self) -> None:
        # The thread dies with the pool; its netns membership dies with it.
        self._pool.shutdown(wait=True)

    def __enter__(self) -> "NetnsExecutor":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

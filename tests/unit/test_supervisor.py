import asyncio

from cilia.agent.supervisor import Supervisor


def test_one_dead_root_task_stops_the_others_in_order():
    stopped = []

    async def healthy(name):
        try:
            await asyncio.Event().wait()
        finally:
            stopped.append(name)

    async def dies():
        await asyncio.sleep(0.01)
        raise RuntimeError("boom")

    async def main():
        s = Supervisor()
        s.add("a", lambda: healthy("a"))
        s.add("b", lambda: healthy("b"))
        s.add("c", dies)
        rc = await s.run()
        return rc, s.failure

    rc, failure = asyncio.run(main())
    assert rc == 1
    assert isinstance(failure, RuntimeError)
    assert stopped == ["b", "a"]  # reverse start order


def test_stop_request_ends_cleanly():
    async def main():
        s = Supervisor()
        s.add("idle", lambda: asyncio.Event().wait())
        asyncio.get_running_loop().call_later(0.01, s.request_stop)
        return await s.run()

    assert asyncio.run(main()) == 0

"""on_own_thread: blocking work on a daemon thread of its own, its result or exception handed back."""
import asyncio
import threading

import pytest

from engine.errors import AdapterLoadsBusy
from engine.service.threads import ThreadSlots, on_own_thread


def test_results_errors_and_a_caller_that_gives_up():
    release = threading.Event()

    def stop():
        raise StopIteration  # a future refuses it: the caller waited forever

    async def run():
        assert await on_own_thread(lambda: threading.current_thread().daemon, "t") is True
        with pytest.raises(KeyError):
            await on_own_thread(lambda: {}["x"], "t")
        with pytest.raises(RuntimeError, match="t raised StopIteration"):
            await asyncio.wait_for(on_own_thread(stop, "t"), 10)
        with pytest.raises(asyncio.TimeoutError):  # stops waiting; the thread runs on and its result is dropped
            await asyncio.wait_for(on_own_thread(lambda: release.wait(10), "t"), 0.1)
        release.set()
        await asyncio.sleep(0.1)  # its result arrives for a cancelled future: dropped without an error
        return "done"

    assert asyncio.run(run()) == "done"


def test_thread_slots_count_each_call_until_its_thread_ends():
    release = threading.Event()
    slots = ThreadSlots(3, 2, "adapter loads")

    async def run():
        hung = [asyncio.ensure_future(slots.submit(lambda: release.wait(10), "t", "acme")) for _ in range(2)]
        with pytest.raises(AdapterLoadsBusy, match="2 adapter loads of 'acme' are under way"):
            slots.submit(lambda: None, "t", "acme")
        third = asyncio.ensure_future(slots.submit(lambda: release.wait(10), "t", None))  # operators: no per-key
        with pytest.raises(AdapterLoadsBusy, match="3 adapter loads are under way"):
            slots.submit(lambda: None, "t", "globex")
        for waiting in (*hung, third):  # the callers give up; their threads still hold the slots
            waiting.cancel()
        await asyncio.sleep(0.05)
        with pytest.raises(AdapterLoadsBusy):
            slots.submit(lambda: None, "t", "globex")
        release.set()
        for _ in range(100):  # the threads end and give their slots back
            await asyncio.sleep(0.02)
            try:
                return await slots.submit(lambda: "ran", "t", "acme")
            except AdapterLoadsBusy:
                continue

    assert asyncio.run(run()) == "ran"

"""start_thread: blocking work on a daemon thread of its own, its result or exception handed back."""
import asyncio
import threading

import pytest

from engine.errors import AdapterLoadsBusy
from engine.service.threads import ThreadSlots, start_thread


def test_results_errors_and_a_caller_that_gives_up():
    release = threading.Event()

    def stop():
        raise StopIteration  # a future refuses it: the caller waited forever

    async def run():
        assert await start_thread(lambda: threading.current_thread().daemon, "t") is True
        with pytest.raises(KeyError):
            await start_thread(lambda: {}["x"], "t")
        with pytest.raises(RuntimeError, match="t raised StopIteration"):
            await asyncio.wait_for(start_thread(stop, "t"), 10)
        with pytest.raises(asyncio.TimeoutError):  # stops waiting; the thread runs on and its result is dropped
            await asyncio.wait_for(start_thread(lambda: release.wait(10), "t"), 0.1)
        release.set()
        await asyncio.sleep(0.1)  # its result arrives for a cancelled future: dropped without an error
        return "done"

    assert asyncio.run(run()) == "done"


def test_thread_slots_count_each_call_until_its_thread_ends():
    release = threading.Event()
    slots = ThreadSlots(4, 3, 2, "adapter loads", "tenant")

    def hang():
        return asyncio.ensure_future(slots.submit(lambda: release.wait(10), "t", "acme"))

    async def run():
        hung = [hang(), hang()]
        with pytest.raises(AdapterLoadsBusy, match="adapter loads under way: at most 2 for tenant 'acme' at once"):
            slots.submit(lambda: None, "t", "acme")
        hung.append(asyncio.ensure_future(slots.submit(lambda: release.wait(10), "t", "globex")))
        with pytest.raises(AdapterLoadsBusy, match="at most 3 for all tenants together at once"):
            slots.submit(lambda: None, "t", "initech")
        hung.append(asyncio.ensure_future(slots.submit(lambda: release.wait(10), "t", None)))  # operators' share
        with pytest.raises(AdapterLoadsBusy, match="adapter loads under way: at most 4 at once"):
            slots.submit(lambda: None, "t", None)
        for waiting in hung:  # the callers give up; their threads still hold the slots
            waiting.cancel()
        await asyncio.sleep(0.05)
        with pytest.raises(AdapterLoadsBusy):
            slots.submit(lambda: None, "t", None)
        release.set()
        for _ in range(100):  # the threads end and give their slots back
            await asyncio.sleep(0.02)
            try:
                return await slots.submit(lambda: "ran", "t", "acme")
            except AdapterLoadsBusy:
                continue

    assert asyncio.run(run()) == "ran"


def test_a_process_without_threads_left_is_busy_and_loses_no_slot(monkeypatch):
    slots = ThreadSlots(1, 1, 1, "adapter loads", "tenant")

    def no_thread(self):
        raise RuntimeError("can't start new thread")

    async def run():
        with monkeypatch.context() as patch:
            patch.setattr(threading.Thread, "start", no_thread)
            with pytest.raises(AdapterLoadsBusy, match="no thread could be started"):  # was INTERNAL
                slots.submit(lambda: None, "t", "acme")
        return await slots.submit(lambda: "ran", "t", "acme")  # its slot came back

    assert asyncio.run(run()) == "ran"

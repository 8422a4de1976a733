"""on_own_thread: blocking work on a daemon thread of its own, its result or exception handed back."""
import asyncio
import threading

import pytest

from engine.service.threads import on_own_thread


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

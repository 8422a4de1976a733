"""Blocking work that an RPC or the drain waits for, each call on a daemon thread of its own.

Not asyncio.to_thread: its shared pool has min(32, cores + 4) workers (6 on two cores), so a few adapter reads
hung on a stalled mount (an NFS store, a hub download) took every worker, and from then on every other load and
the drain itself waited behind them; and Python 3.11's asyncio.run joins that pool at exit with no time limit,
so a server with one hung read never exited on SIGTERM. A daemon thread per call blocks only its own caller and
never the exit.
"""
import asyncio
import threading
from typing import Callable, TypeVar

T = TypeVar("T")


async def on_own_thread(work: Callable[[], T], name: str) -> T:
    """``work()`` on a new daemon thread named ``name``; its result or its exception. A caller that is
    cancelled stops waiting; the thread runs on and its result is dropped."""
    loop = asyncio.get_running_loop()
    future: asyncio.Future = loop.create_future()

    def run() -> None:
        try:
            result, error = work(), None
        except BaseException as exc:  # handed to the caller, whatever it is
            result, error = None, exc
            if isinstance(exc, StopIteration):  # a future refuses it (TypeError), and its caller would wait forever
                error = RuntimeError(f"{name} raised StopIteration")
                error.__cause__ = exc
        try:
            loop.call_soon_threadsafe(_settle, future, result, error)
        except RuntimeError:  # the event loop closed meanwhile: nobody waits any more
            pass

    threading.Thread(target=run, name=name, daemon=True).start()
    return await future


def _settle(future: asyncio.Future, result, error: BaseException | None) -> None:
    if future.done():  # cancelled: its caller gave up
        return
    if error is None:
        future.set_result(result)
    else:
        future.set_exception(error)

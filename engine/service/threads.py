"""Blocking work that an RPC or the drain waits for, each call on a daemon thread of its own.

Not asyncio.to_thread: its shared pool has min(32, cores + 4) workers (6 on two cores), so a few adapter reads
hung on a stalled mount (an NFS store, a hub download) took every worker, and from then on every other load and
the drain itself waited behind them; and Python 3.11's asyncio.run joins that pool at exit with no time limit,
so a server with one hung read never exited on SIGTERM. A daemon thread per call blocks only its own caller and
never the exit.
"""
import asyncio
import collections
import threading
from typing import Callable, TypeVar

from engine.errors import AdapterLoadsBusy

T = TypeVar("T")


async def on_own_thread(work: Callable[[], T], name: str) -> T:
    """``work()`` on a new daemon thread named ``name``; its result or its exception. A caller that is
    cancelled stops waiting; the thread runs on and its result is dropped."""
    return await start_thread(work, name)


def start_thread(work: Callable[[], T], name: str) -> asyncio.Future:
    """Starts ``work()`` on a new daemon thread now (call it on the event loop); the future gets its result or
    exception. Cancelling the future drops them; the thread runs on."""
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
    return future


def _settle(future: asyncio.Future, result, error: BaseException | None) -> None:
    if future.done():  # cancelled: its caller gave up
        return
    if error is None:
        future.set_result(result)
    else:
        future.set_exception(error)


class ThreadSlots:
    """At most ``limit`` blocking calls on threads at once, and ``per_key`` of them for one key (None: no per-key
    bound), each counted until its thread ends: a caller that gives up frees nothing while its read still hangs,
    so hung reads cannot pile up threads without bound."""

    def __init__(self, limit: int, per_key: int, what: str):
        self.limit, self.per_key, self.what = limit, per_key, what  # what: e.g. "adapter loads"
        self._lock = threading.Lock()
        self._running: collections.Counter = collections.Counter()  # key -> calls on threads now; None: all

    def submit(self, work: Callable[[], T], name: str, key: str | None = None) -> asyncio.Future:
        """Takes a slot and starts ``work`` on its own thread now (start_thread), or raises AdapterLoadsBusy."""
        with self._lock:
            if self._running[None] >= self.limit:
                raise AdapterLoadsBusy(f"{self.limit} {self.what} are under way; try again in a moment")
            if key is not None and self._running[key] >= self.per_key:
                raise AdapterLoadsBusy(f"{self.per_key} {self.what} of {key!r} are under way; try again in a moment")
            self._running.update((None, key) if key is not None else (None,))

        def counted() -> T:
            try:
                return work()
            finally:
                with self._lock:
                    self._running.subtract((None, key) if key is not None else (None,))

        try:
            return start_thread(counted, name)
        except BaseException:  # no thread started (none left to the process): nothing will give the slot back
            with self._lock:
                self._running.subtract((None, key) if key is not None else (None,))
            raise

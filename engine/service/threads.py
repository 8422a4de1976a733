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


def start_thread(work: Callable[[], T], name: str) -> asyncio.Future:
    """Starts ``work()`` on a new daemon thread named ``name`` now (call it on the event loop); await the future
    for its result or exception. A caller that cancels it stops waiting; the thread runs on, its result dropped."""
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


KEYED = object()  # ThreadSlots' count of all keyed calls together


class ThreadSlots:
    """At most ``limit`` blocking calls on threads at once; of them at most ``keyed`` with a key (a tenant, a
    name) together, so that calls without one (operators) keep ``limit - keyed`` of their own, and ``per_key``
    for one key. Each is counted until its thread ends: a caller that gives up frees nothing while its read
    still hangs, so hung reads cannot pile up threads without bound."""

    def __init__(self, limit: int, keyed: int, per_key: int, what: str, key_kind: str):
        self.limit, self.keyed, self.per_key = limit, keyed, per_key
        self.what, self.key_kind = what, key_kind  # e.g. "adapter loads", "tenant": for the messages
        self._lock = threading.Lock()
        self._running: collections.Counter = collections.Counter()  # key -> calls now; None: all; KEYED: keyed

    def submit(self, work: Callable[[], T], name: str, key: str | None = None) -> asyncio.Future:
        """Takes a slot and starts ``work`` on its own thread now (start_thread), or raises AdapterLoadsBusy."""
        limits = [(None, self.limit, "")]
        if key is not None:
            limits += [(KEYED, self.keyed, f" for all {self.key_kind}s together"),
                       (key, self.per_key, f" for {self.key_kind} {key!r}")]
        counts = [count for count, _, _ in limits]
        with self._lock:
            for count, most, scope in limits:
                if self._running[count] >= most:
                    raise AdapterLoadsBusy(f"{self.what} under way: at most {most}{scope} at once; try again in a "
                                           "moment")
            self._running.update(counts)

        def counted() -> T:
            try:
                return work()
            finally:
                with self._lock:
                    self._running.subtract(counts)

        try:
            return start_thread(counted, name)
        except BaseException as exc:  # no thread started: nothing else will give the slot back
            with self._lock:
                self._running.subtract(counts)
            if isinstance(exc, RuntimeError):  # "can't start new thread": the process has no more to give
                raise AdapterLoadsBusy(f"{self.what}: no thread could be started ({exc}); try again in a "
                                       "moment") from None
            raise

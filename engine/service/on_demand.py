"""Loading on first use: an inference request naming an adapter that nobody loaded, which the adapter store
holds, loads it (``serve --adapter-store DIR --load-on-demand``; LoRAX's dynamic adapter loading).

Why: behind an adapter-affinity proxy (deploy/envoy) each adapter goes to a few pods, but which pods changes
as pods come and go; declaring every adapter on every pod (``--adapter``) makes every pod read every adapter.
With this, a pod reads only the adapters its requests name. The request names the store folder, e.g.
``bert/sentiment`` (as ``adapterserve adapters catalog`` lists it); it is loaded from ``store://bert/sentiment``
under that name as a shared adapter, visible to every tenant like the catalog itself, and then moves through
the tiers as any other adapter (device slot, host copy, read back from the store).

- One load per name at a time: requests naming it meanwhile wait for that load, none starts its own.
- A name the store does not hold, or whose load failed, gets the same answer for RETRY_AFTER_S without a new
  look at the store (a flood of unknown names must not become a flood of file-system reads), remembered for
  at most MAX_REMEMBERED names.
- The look and the load run on a daemon thread each, never on the event loop or a pool shared with other
  work (a stalled mount must hold neither). At most MAX_READS run at once and one per name, counted until
  their thread ends; beyond that a request naming a name not loaded yet is refused RESOURCE_EXHAUSTED, to try
  again in a second (as when every adapter slot is busy). A load's callers wait at most LOAD_WAIT_S: then the
  name is answered AdapterSourceError for RETRY_AFTER_S, while its thread, if hung, still holds its read.
- Unloading such an adapter lasts until a request names it again: with this on, the store decides what is
  served; take a folder out of the store to stop serving it. Only folders the catalog lists load: not one
  kept inside another adapter's folder.
- When the drain begins, callers still waiting for a load are refused ShuttingDown (retry elsewhere).
- A tenant's own adapter, or one an operator loaded, is never replaced: the load does not overwrite.
"""
import asyncio
import collections
import functools
import logging
import time

from engine.adapters.store import SCHEME
from engine.engine import Engine
from engine.errors import (AdapterNameTaken, AdapterNotFound, AdapterServeError, AdapterSourceError,
                           AdapterSourceRefused, ShuttingDown)
from engine.names import name_problem
from engine.service.metrics import Metrics
from engine.service.threads import ThreadSlots
from engine.types import AdapterInfo

log = logging.getLogger("adapterserve.on_demand")

RETRY_AFTER_S = 10.0
MAX_REMEMBERED = 4096
MAX_READS = 8
LOAD_WAIT_S = 30.0
LOADED, NOT_IN_STORE, TAKEN = "ok", "not_in_store", "taken"  # how a load ended: its metric label too


class OnDemandLoader:
    def __init__(self, engine: Engine, metrics: Metrics, retry_after_s: float = RETRY_AFTER_S,
                 wait_s: float = LOAD_WAIT_S):
        if engine.adapters.store is None:
            raise ValueError("loading adapters on demand needs an adapter store (--adapter-store)")
        self.engine, self.metrics, self.retry_after_s, self.wait_s = engine, metrics, retry_after_s, wait_s
        # one read per name: a name whose read hung past the wait limit must not start another after each retry
        self._reads = ThreadSlots(MAX_READS, MAX_READS, 1, "adapter reads from the store", "name")
        self._closed = asyncio.Event()
        self._loading: dict[str, asyncio.Future] = {}  # name -> its load: its result (see _load) or error
        # name -> (when it failed, the error to answer or None for "not in the store"), oldest first
        self._failed: collections.OrderedDict[str, tuple[float, Exception | None]] = collections.OrderedDict()

    async def lookup(self, name: str, tenant: str | None, missing: AdapterNotFound) -> AdapterInfo:
        """The adapter ``name`` as ``tenant`` sees it, once loaded from the store; ``missing`` (the registry's
        answer) when the store holds no such folder."""
        if name_problem(name) is not None:  # no name an adapter could be loaded under
            raise missing
        failed = self._failed.get(name)
        if failed is not None and time.monotonic() - failed[0] < self.retry_after_s:
            raise _copy(failed[1]) if failed[1] is not None else missing
        load = self._loading.get(name)
        if load is None:
            read = self._reads.submit(functools.partial(self._load, name), "adapter-on-demand", name)  # or busy
            load = self._loading[name] = asyncio.ensure_future(self._load_within(name, read))
            load.add_done_callback(lambda done: self._done(name, done))
        if not load.done():  # asyncio.wait: a caller that gives up (or is refused) leaves the load to the others
            closed = asyncio.ensure_future(self._closed.wait())
            try:
                await asyncio.wait((load, closed), return_when=asyncio.FIRST_COMPLETED)
            finally:
                closed.cancel()
            if not load.done():  # a drain began: the caller retries on another replica, not after a hung read
                raise ShuttingDown("the server is draining; retry on another replica")
        if load.result() == NOT_IN_STORE:  # raises the load's error
            raise missing
        return self.engine.registry.lookup(name, tenant)  # may raise: unloaded again since

    def close(self) -> None:
        """The drain began: callers waiting for a load are refused ShuttingDown at once."""
        self._closed.set()

    async def _load_within(self, name: str, read: asyncio.Future) -> str:
        try:
            return await asyncio.wait_for(read, self.wait_s)
        except asyncio.TimeoutError:  # the thread runs on, holding its read; if it ends well, the adapter is there
            if not read.cancelled():  # the read's own TimeoutError (an OSError: ETIMEDOUT), not the wait limit
                raise
            log.warning("loading adapter %r on first use: no answer from the adapter store within %g s", name,
                        self.wait_s)
            raise AdapterSourceError(SCHEME + name, f"the adapter store gave no answer within {self.wait_s:g} s; "
                                                    f"tried again after {self.retry_after_s:g} s") from None

    def _load(self, name: str) -> str:
        """Runs on a thread of its own: LOADED, NOT_IN_STORE, or TAKEN (an operator loaded it meanwhile)."""
        source = SCHEME + name
        store = self.engine.adapters.store
        try:
            folder = store.folder(source)
        except (AdapterSourceError, AdapterSourceRefused, OSError):  # no such folder, one outside the store, or
            return NOT_IN_STORE  # a name no file system takes (a component of over 255 bytes): not ours to load
        if store.source_of(folder) != source:  # "minilm//x", "../store/minilm/x": one adapter, one name
            return NOT_IN_STORE
        if store.inside_adapter(folder):  # a checkpoint kept in an adapter's folder: the catalog lists no such
            return NOT_IN_STORE
        try:
            info = self.engine.load_adapter(source, name=name, overwrite_ok=False)
        except AdapterNameTaken:  # theirs stands
            return TAKEN
        log.info("loaded adapter %r from %s on first use (%s, %d parameters)", name, source, info.method,
                 info.num_params)
        return LOADED

    def _done(self, name: str, load: asyncio.Future) -> None:
        del self._loading[name]
        if load.cancelled():  # the event loop is closing
            return
        error = load.exception()
        outcome = "error" if error is not None else load.result()
        self.metrics.on_demand_loads.labels(outcome).inc()
        self._failed.pop(name, None)  # forgotten when loaded; else re-added at the end, the last to be dropped
        if outcome in (LOADED, TAKEN):
            return
        if error is not None and not isinstance(error, AdapterServeError):
            log.error("loading adapter %r on first use failed", name, exc_info=error)
        # a copy: the error itself goes on to this load's callers, and its traceback would keep their frames
        # (their requests, up to the message limit each) for as long as it is remembered
        self._failed[name] = (time.monotonic(), None if error is None else _copy(error))
        while len(self._failed) > MAX_REMEMBERED:
            self._failed.popitem(last=False)


def _copy(error: Exception) -> Exception:
    """The same error (class, message, fields) without traceback or context: each caller raises one of its own."""
    fresh = type(error).__new__(type(error))
    fresh.__dict__.update(error.__dict__)
    fresh.args = error.args
    return fresh

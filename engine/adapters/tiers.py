"""Where each adapter version lives: a device slot, the CPU tier (a host copy), or only its source.

Budgets: ``max_device_adapters`` slots and optionally ``max_device_bytes`` of resident adapter weights on
the device; ``max_cpu_adapters`` host copies of versions that are not on the device. Each tier keeps an
LRU order: the device by last use, the CPU tier by arrival there (a version evicted from the device
arrives as the most recent). A version on the device keeps its host copy, so evicting it to the CPU
tier copies nothing. Versions in use (``record.refs > 0``) and pinned ones are never evicted; versions
without a source (averages) keep their host copy for as long as they live.

A host copy that a queued request was told is ready (`prefetch`), or that was just read for one, outlives
CPU-tier trims for ``HOLD_S``: the scheduler takes the request on that promise, and the engine loop must not
then find the copy gone and read it again itself while every other request waits.

Locking: one lock guards the entries, the LRU orders and every pool call (slot writes and batch
metadata). It is held only for bookkeeping, host->device slot copies and metadata builds, never for
file I/O: reads from a source run on their own threads (one per version being read), and whoever needs
the result waits on its future outside the lock. Reads are single-flight per version. The work per batch
grows with its rows and evictions, not with the number of registered adapters.
"""
import logging
import threading
import time
from collections import OrderedDict
from concurrent.futures import Future
from dataclasses import dataclass
from typing import Callable

import torch

from engine.adapters.pool import AdapterPool
from engine.adapters.registry import AdapterRecord
from engine.adapters.spec import AdapterSpec
from engine.errors import AdapterCapacityExceeded, AdapterLoadsBusy, AdapterServeError, AdapterSourceError

log = logging.getLogger("adapterserve.adapters")

HOLD_S = 5.0  # seconds a promised or freshly read host copy is kept over the CPU budget (see the module docstring)


@dataclass(frozen=True)
class TierBudget:
    max_device_bytes: int | None  # None = slot count only
    max_cpu_adapters: int


@dataclass(eq=False)
class Residency:
    """One version's place; every field but the first four is guarded by the tiers lock."""

    record: AdapterRecord  # its refs say whether it is in use
    read: Callable[[], AdapterSpec] | None  # reads it again from its source; None = no source, keep the host copy
    nbytes: int  # its weights in the serving dtype
    pinned: bool
    spec: AdapterSpec | None = None  # host copy; always set while on the device
    slot: int = -1
    reading: Future | None = None
    error: Exception | None = None  # of the last failed read, until one succeeds
    read_at: float = 0.0  # time.monotonic() when the last read began
    hold_until: float = 0.0  # time.monotonic() until which CPU-tier trims keep its host copy

    @property
    def key(self) -> int:
        return self.record.key

    @property
    def tier(self) -> str:
        return "device" if self.slot >= 0 else "cpu" if self.spec is not None else "source"


class AdapterTiers:
    def __init__(self, pool: AdapterPool, budget: TierBudget):
        self.pool, self.budget = pool, budget
        self._lock = threading.Lock()
        self._entries: dict[int, Residency] = {}  # every live version, by key
        self._on_device: OrderedDict[int, Residency] = OrderedDict()  # least recently used first
        self._on_host: OrderedDict[int, Residency] = OrderedDict()  # the CPU tier, oldest first
        self._device_bytes = 0
        self._retrim: tuple[float, threading.Timer] | None = None  # a trim due when a held copy's hold ends

    def add(self, entry: Residency, spec: AdapterSpec, replaces: int | None = None) -> None:
        """A freshly read version: onto the device if it fits without evicting anything, else the CPU tier.
        A pinned one evicts idle versions, or raises `AdapterCapacityExceeded` having changed nothing. The version
        it ``replaces`` (its key; the one its name holds now) may be evicted though pinned, when idle: it is
        retired next, so a pinned swap on a device full of pinned versions needs no slot of its own."""
        limit = self.budget.max_device_bytes
        if limit is not None and entry.nbytes > limit:
            raise AdapterCapacityExceeded(f"adapter {entry.record.info.name!r} needs {entry.nbytes / 2**20:.2f} MB, "
                                          f"more than the whole device budget of {limit / 2**20:.2f} MB")
        with self._lock:
            victims = self._victims(entry, replaces) if entry.pinned or self._fits(entry) else None
            entry.spec = spec
            if victims is not None:
                self._to_device(entry, victims)  # if the copy fails (device out of memory), nothing of entry stays
            else:
                self._on_host[entry.key] = entry
            self._entries[entry.key] = entry
            self._trim_cpu()

    def drop(self, key: int) -> None:
        """Frees a retired, unused version: its slot and host copy."""
        with self._lock:
            entry = self._entries.pop(key, None)
            if entry is None:
                return
            if self._on_device.pop(key, None) is not None:
                self.pool.free(entry.slot)
                self._device_bytes -= entry.nbytes
                entry.slot = -1
            self._on_host.pop(key, None)
            entry.spec = None

    def place(self, keys: list[int], build: Callable[[dict[int, int]], object]):
        """Brings acquired versions onto the device and returns ``build({key: slot})``, computed under the
        same lock hold so no slot changes in between. Waits (outside the lock) only for reads of these
        versions themselves."""
        while True:
            with self._lock:
                entries = [self._entries[k] for k in keys]
                pending = [self._start_read(e) for e in entries if e.slot < 0 and e.spec is None]
                if not pending:
                    evicted = False
                    for entry in entries:
                        if entry.slot >= 0:
                            self._on_device.move_to_end(entry.key)
                        else:
                            victims = self._victims(entry)
                            self._to_device(entry, victims)
                            evicted = evicted or bool(victims)
                    if evicted:
                        self._trim_cpu()
                    return build({e.key: e.slot for e in entries})
            for future in pending:  # in use, so their host copies cannot be trimmed before we take the lock again
                future.result()

    def host_spec(self, key: int) -> AdapterSpec:
        """The host copy of an acquired version, read from its source if needed (waits outside the lock)."""
        while True:
            with self._lock:
                entry = self._entries[key]
                if entry.spec is not None:
                    return entry.spec
                pending = self._start_read(entry)
            pending.result()

    def prefetch(self, key: int, since: float | None = None) -> bool:
        """True when the version can be served without reading files (its host copy is then held for the
        caller); else starts reading it and returns False. When its last read failed, raises that error (a
        queued request is failed instead of waiting for a read that keeps failing) and reads once more in
        the background, so a source that is back serves the next request. With ``since`` (when the asking
        request was queued), a failed read begun before it is read again instead, and the request waits for
        that read: it failed the first request after a source was back."""
        with self._lock:
            entry = self._entries.get(key)
            if entry is None:
                return True
            if entry.spec is not None:
                entry.hold_until = time.monotonic() + HOLD_S
                return True
            stale = since is not None and entry.read_at < since
            failed = entry.error if entry.reading is None and not stale else None
            self._start_read(entry)
            if failed is not None:
                raise failed if isinstance(failed, AdapterServeError) else AdapterSourceError(
                    entry.record.info.source, f"reading it again failed: {type(failed).__name__}: {failed}")
            return False

    def released(self, keys: list[int]) -> None:
        """Versions just released: host copies read while they were in use may now exceed the CPU budget."""
        with self._lock:
            if any(k in self._on_host for k in keys):
                self._trim_cpu()

    def describe(self, key: int) -> tuple[str, int, str, bool] | None:
        """(tier, slot, state, pinned) of a version; None once it is freed."""
        with self._lock:
            entry = self._entries.get(key)
            if entry is None:
                return None
            state = "loading" if entry.reading else "failed" if entry.error and entry.spec is None else "ready"
            return entry.tier, entry.slot, state, entry.pinned

    def _fits(self, entry: Residency) -> bool:
        limit = self.budget.max_device_bytes
        return self.pool.num_free > 0 and (limit is None or self._device_bytes + entry.nbytes <= limit)

    def _victims(self, entry: Residency, replaces: int | None = None) -> list[Residency]:
        """Least recently used idle, unpinned versions on the device (and the idle one ``entry`` replaces) to
        evict so that ``entry`` fits."""
        need_slots = 1 - self.pool.num_free
        limit = self.budget.max_device_bytes
        need_bytes = 0 if limit is None else self._device_bytes + entry.nbytes - limit
        victims = []
        # the version entry replaces first (a stable sort keeps the LRU order of the rest): it is retired next anyway,
        # and an older idle one would be evicted for nothing (its next use reading its files again)
        for other in sorted(self._on_device.values(), key=lambda e: e.key != replaces):
            if need_slots <= 0 and need_bytes <= 0:
                return victims
            if (not other.pinned or other.key == replaces) and other.record.refs == 0:
                victims.append(other)
                need_slots, need_bytes = need_slots - 1, need_bytes - other.nbytes
        if need_slots > 0 or need_bytes > 0:
            budget = "" if limit is None else f" (and the {limit / 2**20:.2f} MB device budget)"
            raise AdapterCapacityExceeded(
                f"all {self.pool.capacity} adapter slots{budget} hold adapters in use or pinned; "
                f"cannot bring in {entry.record.info.name!r} now")
        return victims

    def _to_device(self, entry: Residency, victims: list[Residency]) -> None:
        for victim in victims:  # to the CPU tier: the host copy stays
            self.pool.free(victim.slot)
            victim.slot = -1
            self._device_bytes -= victim.nbytes
            del self._on_device[victim.key]
            self._on_host[victim.key] = victim
        try:
            self._onto_device(entry)
        except BaseException:  # the device is out of memory, say: the victims go back (a pinned one among them)
            for victim in victims:
                try:
                    self._onto_device(victim)
                except Exception:  # it stays on the host, served from there once a slot frees
                    pass
            raise

    def _onto_device(self, entry: Residency) -> None:
        """Copies a version with a host copy into a free slot and files it on the device."""
        entry.slot = self.pool.load(entry.spec)
        self._device_bytes += entry.nbytes
        self._on_host.pop(entry.key, None)
        self._on_device[entry.key] = entry

    def _trim_cpu(self) -> None:
        """Drops the oldest host copies over ``max_cpu_adapters``: those that can be read again, are idle and
        are not held for a queued request."""
        excess = len(self._on_host) - self.budget.max_cpu_adapters
        now, held = time.monotonic(), []
        for entry in list(self._on_host.values()) if excess > 0 else ():
            if excess <= 0:
                break
            if entry.read is not None and entry.record.refs == 0:
                if entry.hold_until > now:
                    held.append(entry.hold_until)
                    continue
                entry.spec = None
                del self._on_host[entry.key]
                excess -= 1
        if excess > 0 and held:
            self._trim_when_hold_ends(min(held))

    def _trim_when_hold_ends(self, at: float) -> None:
        """Trims again when a hold ends: otherwise an idle server keeps the copies over budget until some later
        load, eviction or release. Copies in use are trimmed by `released` instead."""
        if self._retrim is not None:
            if self._retrim[0] <= at:
                return
            self._retrim[1].cancel()
        timer = threading.Timer(at - time.monotonic() + 0.01, lambda: self._trim_now(timer))
        timer.daemon = True
        try:
            timer.start()
        except RuntimeError as exc:  # no thread left in this process: the next load, eviction or release trims
            self._retrim = None
            log.warning("cannot start the CPU-tier trim timer (%s); copies over budget wait for the next trim", exc)
            return
        self._retrim = (at, timer)

    def _trim_now(self, timer: threading.Timer) -> None:
        with self._lock:
            if self._retrim is not None and self._retrim[1] is timer:  # not a newer one, scheduled meanwhile
                self._retrim = None
            self._trim_cpu()

    def _start_read(self, entry: Residency) -> Future:
        """One read per version at a time, each on its own thread: with a shared pool of two, two reads hung on
        a stalled mount or download held back every other adapter's read, and the requests waiting for them."""
        if entry.reading is None:
            future = Future()
            try:  # the thread waits for our lock before it records anything, so reading is set first
                threading.Thread(target=self._read, args=(entry, future), name=f"adapter-read-{entry.key}",
                                 daemon=True).start()
            except RuntimeError as exc:  # no thread left in this process: nothing changed, the next request retries
                raise AdapterLoadsBusy(f"cannot start a thread to read adapter {entry.record.info.name!r} ({exc}); "
                                       "try again shortly") from None
            entry.read_at, entry.reading = time.monotonic(), future
        return entry.reading

    def _read(self, entry: Residency, future: Future) -> None:
        try:
            spec = entry.read()
        except BaseException as exc:
            with self._lock:
                entry.reading, entry.error = None, exc
            future.set_exception(exc)
            return
        with self._lock:
            entry.reading, entry.error = None, None
            if entry.key in self._entries and entry.spec is None:
                entry.spec, entry.hold_until = spec, time.monotonic() + HOLD_S  # for the request that asked
                self._on_host[entry.key] = entry
                self._trim_cpu()
        future.set_result(spec)


def device_bytes(spec: AdapterSpec, dtype: torch.dtype) -> int:
    """Bytes the version's own weights take in the serving dtype (the pool pads stacks to the largest rank)."""
    return sum(t.numel() for t in spec.named_tensors().values()) * dtype.itemsize

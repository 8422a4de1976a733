"""Admission and batching across tenants and adapters. Pure Python: no torch, testable alone.

Requests wait in one FIFO per tenant; `schedule` takes them round-robin over tenants (so one tenant's
flood cannot starve another), up to a row count and a padded-token budget, waiting at most `max_wait_s`
for a batch to fill. Expired or cancelled requests are dropped before any compute, and so are those whose
deadline comes before one forward could end (the loop reports how long forwards take) while other requests can
still make theirs: under overload a FIFO queue otherwise spends the device on requests that expire while
computed, and serves almost none in time. When none could (the estimate may be stale: it changes only with
forwards), nothing is dropped for it.
"""
import threading
import time
from collections import OrderedDict, deque
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Callable
from enum import Enum

from engine.errors import AdapterServeError, InvalidRequest, ShuttingDown
from engine.text import EncodedRow


class QueueFull(AdapterServeError):
    """The waiting queue is at its bound; the client should retry later or elsewhere."""


class DeadlineExpired(AdapterServeError):
    """The request's deadline passed while it waited; it was dropped before compute."""


class Task(Enum):
    CLASSIFY = "classify"
    EMBED = "embed"
    TAG = "tag"


@dataclass(frozen=True)
class SchedulerConfig:
    max_queue: int = 1024  # waiting requests (not rows) before RESOURCE_EXHAUSTED
    max_batch_rows: int = 64
    max_batch_tokens: int = 8192  # rows x padded length of one forward
    max_wait_s: float = 0.005  # how long a non-full batch waits for more requests

    def __post_init__(self):
        if min(self.max_queue, self.max_batch_rows, self.max_batch_tokens) < 1 or self.max_wait_s < 0:
            raise ValueError("scheduler limits must be positive")


@dataclass(eq=False)
class Request:
    task: Task
    tenant: str | None
    adapter: str | None
    rows: list[EncodedRow]
    deadline: float | None = None  # time.monotonic() seconds
    request_id: str = ""
    future: Future = field(default_factory=Future)  # result set by the engine loop
    enqueued_at: float = field(default_factory=time.monotonic)

    @property
    def longest(self) -> int:
        return max(len(r.ids) for r in self.rows)


def split_rows(rows: list[EncodedRow], max_rows: int, max_tokens: int) -> list[list[EncodedRow]]:
    """A request's rows, in order, cut into parts that each fit one forward (rows x padded length within
    the budget), so a request within the input limits is never refused for its total size (as TEI splits
    a request's inputs). A row longer than the whole budget stays alone and `Scheduler.add` refuses it."""
    parts: list[list[EncodedRow]] = []
    longest = 0
    for row in rows:
        n = len(row.ids)
        if parts and len(parts[-1]) < max_rows and (len(parts[-1]) + 1) * max(longest, n) <= max_tokens:
            parts[-1].append(row)
            longest = max(longest, n)
        else:
            parts.append([row])
            longest = n
    return parts


class Scheduler:
    def __init__(self, config: SchedulerConfig, ready: Callable[[Request], bool] = lambda request: True,
                 max_adapters: int | None = None):
        """``ready(request)`` says whether a request's adapter can be used without waiting for a read;
        requests that are not ready stay queued while others are scheduled, and requests for which it
        raises fail with its error (an `AdapterServeError`, or a bug's, which the service answers INTERNAL).
        ``max_adapters``: distinct adapters one batch may name, the engine's device slots (a batch naming more
        fails whole in the forward, and the loop then runs its requests one by one); None: no limit."""
        self.config, self._ready, self._max_adapters = config, ready, max_adapters
        self._queues: OrderedDict[str | None, deque[Request]] = OrderedDict()
        self._cond = threading.Condition()
        self._size = 0
        self._closed = False
        self._forward_s = 0.0  # a moving average of recent forwards' compute time: no request gets less

    def observe_forward(self, seconds: float) -> None:
        """A forward's compute time, from the engine loop."""
        with self._cond:
            self._forward_s = seconds if not self._forward_s else 0.8 * self._forward_s + 0.2 * seconds

    def add(self, request: Request) -> None:
        self.add_parts([request])

    def add_parts(self, parts: list[Request]) -> None:
        """Queues the parts of one request (`split_rows`) together, or none of them: one admission decision
        against ``max_queue`` (which counts requests), so a request cut into many parts is not refused as
        a full queue when the queue is empty."""
        for request in parts:
            if len(request.rows) > self.config.max_batch_rows:
                raise InvalidRequest(f"{len(request.rows)} inputs exceed the limit of {self.config.max_batch_rows} "
                                     "per request", "inputs")
            if request.longest * len(request.rows) > self.config.max_batch_tokens:
                raise InvalidRequest(f"request needs {request.longest * len(request.rows)} padded tokens, "
                                     f"over the batch budget of {self.config.max_batch_tokens}", "inputs")
        with self._cond:
            if self._closed:
                raise ShuttingDown("the server is draining; retry on another replica")
            if self._size >= self.config.max_queue:
                self._purge_dead()
            if self._size >= self.config.max_queue:
                raise QueueFull(f"queue is full ({self.config.max_queue} requests waiting)")
            for request in parts:
                self._queues.setdefault(request.tenant, deque()).append(request)
            self._size += len(parts)
            self._cond.notify()

    @property
    def num_waiting(self) -> int:
        return self._size

    def waiting_adapters(self) -> set[str]:
        with self._cond:
            return {r.adapter for queue in self._queues.values() for r in queue if r.adapter}

    def close(self) -> None:
        """Refuse new requests; queued ones are still scheduled (drain)."""
        with self._cond:
            self._closed = True
            self._cond.notify_all()

    def schedule(self, timeout: float) -> list[Request]:
        """Blocks up to ``timeout`` for work; returns one batch (possibly empty)."""
        with self._cond:
            if not self._cond.wait_for(lambda: self._size > 0, timeout):  # closed too: the loop ran flat out
                return []  # for the whole drain, and took the GIL from the calls it was letting finish
            fill_by = time.monotonic() + self.config.max_wait_s
            while self._size < self.config.max_batch_rows and not self._closed:
                remaining = fill_by - time.monotonic()
                if remaining <= 0 or not self._cond.wait(remaining):
                    break
            batch = self._take()
            if not batch and self._size:  # everything waits for adapters being read: don't spin
                self._cond.wait(0.005)
            return batch

    def _take(self) -> list[Request]:
        """Round-robin: each pass over the tenants takes one ready request from each; a tenant that was
        served moves to the back, so the next batch starts with the others."""
        self._purge_dead()  # expired or cancelled requests never reach compute
        batch, rows, longest, adapters = [], 0, 0, set()
        progress = True
        while progress:
            progress = False
            for tenant in list(self._queues):
                queue = self._queues[tenant]
                request = self._first_ready(queue)
                if request is None:
                    continue  # its adapters are still being read: its place in line is kept
                new_longest = max(longest, request.longest)
                new_rows = rows + len(request.rows)
                new_adapters = adapters | {(request.tenant, request.adapter)} if request.adapter else adapters
                if (new_rows > self.config.max_batch_rows or new_rows * new_longest > self.config.max_batch_tokens
                        or self._max_adapters is not None and len(new_adapters) > self._max_adapters):
                    return batch  # this tenant stays in front and goes first in the next batch
                queue.remove(request)
                self._size -= 1
                batch.append(request)
                rows, longest, adapters, progress = new_rows, new_longest, new_adapters, True
                if queue:
                    self._queues.move_to_end(tenant)
                else:
                    del self._queues[tenant]
        return batch

    def _first_ready(self, queue: deque) -> Request | None:
        """The first request of a tenant's queue whose adapter can be used now. A request whose readiness
        check raises (its adapter was unloaded while queued, or its source read failed) fails here at
        once: it would otherwise wait for its deadline, or forever."""
        for request in list(queue):
            try:
                if self._ready(request):
                    return request
            except Exception as exc:  # a bug in the check too: this request fails, not every schedule()
                queue.remove(request)
                self._size -= 1
                _fail(request, exc)
        return None

    def _purge_dead(self) -> None:
        """Drops cancelled and expired requests everywhere (they should not hold queue places), and those due
        before a forward could end when some other request could run now and is not."""
        now = time.monotonic()
        done_by = now + self._forward_s
        if not any(not self._is_dead(r, done_by) and self._runs_now(r)
                   for queue in self._queues.values() for r in queue):
            done_by = now  # no request could make it by the estimate: drop only the expired, run the rest
        for tenant in list(self._queues):
            queue = self._queues[tenant]
            for request in [r for r in queue if self._is_dead(r, done_by)]:
                queue.remove(request)
                self._size -= 1
                self._fail_expired(request, now)
            if not queue:
                del self._queues[tenant]

    def _runs_now(self, request: Request) -> bool:
        """Whether its adapter is ready: one waiting for a read cannot run in the next forward, so it must not keep
        the others from running either (a stale estimate then dropped every ready request, and no forward came
        to correct it, for as long as the read took). A failing check counts as not ready; `_first_ready` fails
        the request."""
        try:
            return self._ready(request)
        except Exception:
            return False

    @staticmethod
    def _is_dead(request: Request, done_by: float) -> bool:
        """Cancelled, or due before ``done_by`` (when a forward begun now would end)."""
        return request.future.cancelled() or (request.deadline is not None and done_by > request.deadline)

    def _fail_expired(self, request: Request, now: float) -> None:
        late = request.deadline is None or now > request.deadline  # None: cancelled, and told nothing
        why = "expired in the queue" if late else (
            f"would expire before a forward could end (they take {self._forward_s:.3f} s now)")
        _fail(request, DeadlineExpired(f"request {request.request_id or '?'} {why}"))


def _fail(request: Request, exc: Exception) -> None:
    """Fails a queued request unless it was cancelled. It is claimed first (RUNNING), in one step that a cancel
    cannot split: checking cancelled() and then setting the exception let the asyncio side's cancel() land in
    between, and set_exception then raised InvalidStateError out of schedule(), in the engine loop (a probe)."""
    if request.future.set_running_or_notify_cancel():
        request.future.set_exception(exc)

"""Scheduler alone (no torch work): fairness across tenants, budgets, queue bound, deadlines, cancellation."""
import time
from concurrent.futures import Future

import pytest

from engine.errors import AdapterSourceError, InvalidRequest, ShuttingDown
from engine.scheduler import DeadlineExpired, QueueFull, Request, Scheduler, SchedulerConfig, Task, split_rows
from engine.text import EncodedRow


def _req(tenant, rows=1, length=4, deadline=None):
    return Request(Task.EMBED, tenant, None, [EncodedRow(tuple(range(length)), None, None)] * rows, deadline)


def test_a_flooding_tenant_cannot_starve_another():
    sched = Scheduler(SchedulerConfig(max_batch_rows=4, max_wait_s=0))
    flood = [_req("flood") for _ in range(40)]
    for r in flood:
        sched.add(r)
    victim = _req("victim")
    sched.add(victim)
    first = sched.schedule(timeout=1)
    assert victim in first and len(first) == 4  # served in the first batch despite 40 queued before it
    assert sched.num_waiting == 37


def test_round_robin_order_across_batches():
    sched = Scheduler(SchedulerConfig(max_batch_rows=2, max_wait_s=0))
    for tenant in "aaabbc":
        sched.add(_req(tenant))
    tenants = [[r.tenant for r in sched.schedule(timeout=1)] for _ in range(3)]
    assert tenants == [["a", "b"], ["c", "a"], ["b", "a"]]


def test_token_budget_and_request_limits():
    sched = Scheduler(SchedulerConfig(max_batch_rows=8, max_batch_tokens=40, max_wait_s=0))
    sched.add(_req("a", rows=2, length=10))  # 20 padded tokens
    sched.add(_req("b", rows=2, length=15))  # with a: 4 rows x 15 = 60 > 40
    assert len(sched.schedule(timeout=1)) == 1
    assert len(sched.schedule(timeout=1)) == 1
    with pytest.raises(InvalidRequest, match="over the batch budget"):
        sched.add(_req("a", rows=3, length=20))
    with pytest.raises(InvalidRequest, match="exceed the limit of 8"):
        sched.add(_req("a", rows=9))


def test_queue_bound_and_dead_requests_free_their_place():
    sched = Scheduler(SchedulerConfig(max_queue=2, max_wait_s=0))
    expiring = _req("a", deadline=time.monotonic() + 0.05)
    cancelled = _req("b")
    sched.add(expiring)
    sched.add(cancelled)
    with pytest.raises(QueueFull, match="2 requests waiting"):
        sched.add(_req("c"))
    cancelled.future.cancel()
    time.sleep(0.06)
    survivor = _req("c")
    sched.add(survivor)  # both dead requests were purged to make room
    assert sched.schedule(timeout=1) == [survivor]
    with pytest.raises(DeadlineExpired):
        expiring.future.result(0)


def test_close_refuses_new_work_but_keeps_queued():
    sched = Scheduler(SchedulerConfig(max_wait_s=0))
    queued = _req("a")
    sched.add(queued)
    sched.close()
    with pytest.raises(ShuttingDown, match="draining"):
        sched.add(_req("a"))
    assert sched.schedule(timeout=1) == [queued]
    assert sched.schedule(timeout=0.01) == []


def test_requests_waiting_for_their_adapter_do_not_block_others():
    loading = {"cold"}
    sched = Scheduler(SchedulerConfig(max_wait_s=0), ready=lambda r: r.adapter not in loading)
    cold = Request(Task.EMBED, "a", "cold", [EncodedRow((1, 2), None, None)])
    warm_same_tenant = Request(Task.EMBED, "a", "warm", [EncodedRow((1, 2), None, None)])
    other = _req("b")
    for r in (cold, warm_same_tenant, other):
        sched.add(r)
    assert sched.schedule(timeout=1) == [warm_same_tenant, other]
    assert sched.schedule(timeout=0.01) == []  # still loading: held, not dropped
    loading.clear()
    assert sched.schedule(timeout=1) == [cold]


def test_a_request_whose_adapter_cannot_be_read_fails_at_once():
    def ready(request):
        if request.adapter == "broken":  # its source read failed (or it was unloaded while queued)
            raise AdapterSourceError("/adapters/broken", "its files changed since it was loaded")
        return True

    sched = Scheduler(SchedulerConfig(max_wait_s=0), ready=ready)
    broken = Request(Task.EMBED, "a", "broken", [EncodedRow((1, 2), None, None)])
    fine = Request(Task.EMBED, "a", "fine", [EncodedRow((1, 2), None, None)])
    sched.add(broken)
    sched.add(fine)
    assert sched.schedule(timeout=1) == [fine]
    with pytest.raises(AdapterSourceError, match="changed since it was loaded"):
        broken.future.result(timeout=0)
    assert sched.num_waiting == 0


def _rows(*lengths):
    return [EncodedRow(tuple(range(n)), None, None) for n in lengths]


def test_split_rows_keeps_order_and_fits_every_part_in_one_forward():
    rows = _rows(10, 10, 30, 5, 5, 5, 40, 2)
    parts = split_rows(rows, max_rows=3, max_tokens=60)
    assert [r for part in parts for r in part] == rows  # nothing lost, nothing reordered
    assert [[len(r.ids) for r in part] for part in parts] == [[10, 10], [30, 5], [5, 5], [40], [2]]
    assert all(len(p) <= 3 and len(p) * max(len(r.ids) for r in p) <= 60 for p in parts)
    assert split_rows(_rows(4, 4), max_rows=8, max_tokens=100) == [_rows(4, 4)]  # one part when it fits


def test_a_row_longer_than_the_whole_budget_stays_alone_and_is_refused():
    parts = split_rows(_rows(3, 50, 3), max_rows=8, max_tokens=20)
    assert [[len(r.ids) for r in part] for part in parts] == [[3], [50], [3]]
    sched = Scheduler(SchedulerConfig(max_batch_tokens=20))
    with pytest.raises(InvalidRequest, match="needs 50 padded tokens, over the batch budget of 20"):
        sched.add(Request(Task.EMBED, None, None, parts[1]))


def test_the_parts_of_one_request_are_admitted_together():
    sched = Scheduler(SchedulerConfig(max_queue=2, max_wait_s=0))
    parts = [_req("a") for _ in range(5)]
    sched.add_parts(parts)  # more parts than max_queue: one request, and the queue had room
    assert sched.num_waiting == 5
    with pytest.raises(QueueFull):
        sched.add_parts([_req("b"), _req("b")])  # all or none
    assert sched.num_waiting == 5


class CancelledJustAfterEachCheck(Future):
    """A future the asyncio side cancels right after every cancelled() check, as a client's deadline can."""

    def cancelled(self):
        self.cancel()
        return False  # what the check saw, an instant before the cancel


@pytest.mark.parametrize("why", ["expired", "unreadable adapter"])
def test_a_cancel_racing_the_schedulers_failure_of_a_request_is_no_error(why):
    """set_exception on a future cancelled after the check raised InvalidStateError out of schedule(): in the
    engine loop's thread, which then ended (found by a probe)."""
    def ready(request):
        raise AdapterSourceError("x", "its folder is gone")
    sched = Scheduler(SchedulerConfig(max_wait_s=0), ready if why != "expired" else lambda request: True)
    request = _req("a", deadline=time.monotonic() - 1 if why == "expired" else None)
    request.future = CancelledJustAfterEachCheck()
    sched.add(request)
    assert sched.schedule(timeout=1) == [] and sched.num_waiting == 0
    assert request.future.done() and not request.future.running()  # cancelled, as its caller asked


def test_the_engine_loop_outlives_a_scheduling_bug(caplog):
    from engine.loop import EngineLoop
    from engine.service.metrics import Metrics

    class Faulty(Scheduler):
        calls = 0

        def schedule(self, timeout):
            self.calls += 1
            if self.calls == 1:
                raise RuntimeError("a bug")
            return super().schedule(timeout)
    sched = Faulty(SchedulerConfig())
    loop = EngineLoop(None, sched, Metrics())  # no batch reaches the engine here
    loop.start()
    deadline = time.monotonic() + 10
    while sched.calls < 3 and time.monotonic() < deadline:
        time.sleep(0.01)
    alive = loop._thread.is_alive()
    loop.stop(5)
    assert sched.calls >= 3 and alive  # it went on scheduling after the bug
    assert "scheduling failed" in caplog.text and "a bug" in caplog.text


def test_requests_due_before_a_forward_could_end_are_dropped_before_compute():
    """Under overload a FIFO queue served requests that expired while computed (26 of 101k in time, a probe)."""
    sched = Scheduler(SchedulerConfig(max_wait_s=0))
    sched.observe_forward(1.0)
    sched.observe_forward(1.0)
    hopeless, fine, unbounded = _req("a", deadline=time.monotonic() + 0.5), _req("a", deadline=time.monotonic() + 30), \
        _req("b")
    for request in (hopeless, fine, unbounded):
        sched.add(request)
    assert sched.schedule(timeout=1) == [fine, unbounded]
    with pytest.raises(DeadlineExpired, match="would expire before a forward could end .they take 1.000 s now."):
        hopeless.future.result(timeout=0)
    sched.observe_forward(0.0)  # a moving average: one fast forward does not make every deadline look easy
    soon, later = _req("a", deadline=time.monotonic() + 0.5), _req("b", deadline=time.monotonic() + 30)
    sched.add(soon)
    sched.add(later)
    assert sched.schedule(timeout=1) == [later] and isinstance(soon.future.exception(timeout=0), DeadlineExpired)


def test_a_stale_estimate_never_keeps_every_request_from_running():
    """A slow first forward (warm-up, a read) once made the estimate exceed every deadline: with no forward run
    since, it never changed, and every request was refused (review)."""
    sched = Scheduler(SchedulerConfig(max_wait_s=0))
    sched.observe_forward(10.0)
    short = [_req("a", deadline=time.monotonic() + 1) for _ in range(2)]
    for request in short:
        sched.add(request)
    assert sched.schedule(timeout=1) == short  # none could make it by the estimate: all run


def test_a_readiness_check_that_breaks_fails_its_request_alone():
    def ready(request):
        if request.adapter == "odd":
            raise KeyError("a bug")
        return True
    sched = Scheduler(SchedulerConfig(max_wait_s=0), ready=ready)
    odd, fine = Request(Task.EMBED, "a", "odd", [EncodedRow((1,), None, None)]), _req("b")
    sched.add(odd)
    sched.add(fine)
    assert sched.schedule(timeout=1) == [fine]  # every schedule() raised, starving all tenants
    with pytest.raises(KeyError):
        odd.future.result(timeout=0)


def test_a_request_waiting_for_a_read_does_not_keep_a_stale_estimate_from_running_the_others():
    """It counted as one that could make its deadline, so every ready request due within the stale estimate was
    dropped, no forward ran to correct it, for as long as the read took (review)."""
    sched = Scheduler(SchedulerConfig(max_wait_s=0), ready=lambda request: request.adapter != "being-read")
    sched.observe_forward(10.0)
    waiting = Request(Task.EMBED, "a", "being-read", [EncodedRow((1,), None, None)])  # no deadline
    short = [_req("b", deadline=time.monotonic() + 2) for _ in range(3)]
    for request in (waiting, *short):
        sched.add(request)
    assert sched.schedule(timeout=1) == short
    assert sched.num_waiting == 1 and not waiting.future.done()


def test_a_batch_names_no_more_adapters_than_the_device_has_slots():
    """A batch naming more failed whole in the forward (AdapterCapacityExceeded), and the loop then ran its
    requests one by one (review)."""
    sched = Scheduler(SchedulerConfig(max_wait_s=0), max_adapters=2)
    requests = [Request(Task.EMBED, tenant, adapter, [EncodedRow((1,), None, None)])
                for tenant, adapter in (("t", "a"), ("t", "b"), ("u", "a"), ("t", None), ("t", "c"), ("t", "a"))]
    for request in requests:
        sched.add(request)
    batches = [sched.schedule(timeout=1) for _ in range(3)]
    assert batches[0] == requests[:3:2]  # t's "a", u's "a" (another adapter): t's "b" would make a third
    assert all(len({(r.tenant, r.adapter) for r in batch if r.adapter}) <= 2 for batch in batches)
    assert sorted(map(id, sum(batches, []))) == sorted(map(id, requests)) and sched.num_waiting == 0


def test_a_closed_scheduler_with_nothing_queued_waits_instead_of_spinning():
    """Closed and empty, schedule() returned at once: the engine loop ran flat out for the whole drain (review)."""
    sched = Scheduler(SchedulerConfig(max_wait_s=0))
    sched.close()
    start = time.monotonic()
    assert sched.schedule(timeout=0.2) == []
    assert time.monotonic() - start >= 0.19

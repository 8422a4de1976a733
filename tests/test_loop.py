"""The engine loop over a stand-in engine: what happens when a batch's forward fails."""
import time
from types import SimpleNamespace

import pytest
import torch

from engine.errors import AdapterCapacityExceeded
from engine.loop import EngineLoop
from engine.scheduler import DeadlineExpired, Request, Scheduler, SchedulerConfig, Task
from engine.service.metrics import Metrics
from engine.text import EncodedRow


class OneAdapterAtATime:
    """Fails any batch naming two adapters, as a device with one slot would; records each forward's adapters."""

    pad_token_id, info = 0, SimpleNamespace(is_decoder=False)

    def __init__(self, on_forward=lambda: None):
        self.forwards, self.on_forward = [], on_forward

    def forward(self, ids, mask, adapters, types, tenants):
        self.forwards.append(adapters)
        self.on_forward()
        if len(set(adapters)) > 1:
            raise AdapterCapacityExceeded("one slot")
        rows = ids.shape[0]
        return SimpleNamespace(logits=(None,) * rows, embeddings=torch.zeros(rows, 2), heads=(None,) * rows)


def _request(adapter, deadline=None):
    return Request(Task.EMBED, "t", adapter, [EncodedRow((1, 2), None, None)], deadline)


def _observations(histogram) -> float:
    return next(s.value for s in histogram.collect()[0].samples if s.name.endswith("_count"))


def test_a_failed_batch_run_again_request_by_request_counts_each_queue_time_once():
    metrics = Metrics()
    engine = OneAdapterAtATime()
    loop = EngineLoop(engine, Scheduler(SchedulerConfig()), metrics)
    batch = [_request(a) for a in "abc"]
    loop.step(batch)
    assert engine.forwards == [["a", "b", "c"], ["a"], ["b"], ["c"]]
    assert all(r.future.result(timeout=0).embeddings.shape == (1, 2) for r in batch)
    assert _observations(metrics.queue_time) == 3  # it was 6: once per forward each request was in


def test_a_request_that_expires_while_its_failed_batch_is_run_again_is_not_computed():
    engine = OneAdapterAtATime(on_forward=lambda: time.sleep(0.1))
    loop = EngineLoop(engine, Scheduler(SchedulerConfig()), Metrics())
    patient, hurried = _request("a"), _request("b", deadline=time.monotonic() + 0.15)
    loop.step([patient, hurried])  # the failed batch and patient's re-run take 0.2 s: hurried's client gave up
    assert engine.forwards == [["a", "b"], ["a"]]
    assert patient.future.result(timeout=0)
    with pytest.raises(DeadlineExpired, match="expired while its batch, which failed, was run again"):
        hurried.future.result(timeout=0)

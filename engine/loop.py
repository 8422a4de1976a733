"""The engine loop: schedule -> pad -> one forward -> hand each request its rows. Runs in one thread.

Admission happens in the service (tokenise, look up, `Scheduler.add`); this loop only computes. If a
batch fails on a request-level error (an adapter unloaded while its request waited), each request is
re-run alone so only the faulty one fails and the others still get their results.
"""
import logging
import threading
import time
from dataclasses import dataclass

import torch

from engine.engine import Engine
from engine.errors import AdapterServeError
from engine.scheduler import DeadlineExpired, Request, Scheduler
from engine.service.metrics import Metrics
from engine.text import pad_rows
from engine.types import RowHead

log = logging.getLogger("adapterserve.loop")


@dataclass(frozen=True)
class RequestOutput:
    logits: tuple[torch.Tensor | None, ...]  # per row: [L] or [T, L] (tagging), None without head
    embeddings: torch.Tensor  # [n, H]
    heads: tuple[RowHead | None, ...]  # per row: the head its logits came from (`ForwardOutput.heads`)

    @staticmethod
    def concat(parts: "list[RequestOutput]") -> "RequestOutput":
        """The outputs of a request's parts (`split_rows`), in order, as one."""
        if len(parts) == 1:
            return parts[0]
        return RequestOutput(tuple(x for p in parts for x in p.logits), torch.cat([p.embeddings for p in parts]),
                             tuple(h for p in parts for h in p.heads))


class EngineLoop:
    def __init__(self, engine: Engine, scheduler: Scheduler, metrics: Metrics):
        self.engine, self.scheduler, self.metrics = engine, scheduler, metrics
        self.running_adapters: frozenset[str] = frozenset()  # adapters of the batch in flight
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="engine-loop", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self, timeout: float | None = None) -> None:
        """Finishes what is queued (the scheduler is closed first), then stops."""
        self._stop.set()
        self._thread.join(timeout)

    def _run(self) -> None:
        while not (self._stop.is_set() and self.scheduler.num_waiting == 0):
            try:
                batch = self.scheduler.schedule(timeout=0.05)
            except Exception:  # a bug must not end the loop: every later request would wait forever
                log.exception("scheduling failed")
                time.sleep(0.05)
                continue
            self.metrics.waiting.set(self.scheduler.num_waiting)
            if batch:
                self.step(batch)

    def step(self, batch: list[Request]) -> None:
        live = [r for r in batch if r.future.set_running_or_notify_cancel()]  # cancelled ones are dropped here
        if not live:
            return
        now = time.monotonic()
        for request in live:  # here, not in _forward: a request re-run alone was counted twice
            self.metrics.queue_time.observe(now - request.enqueued_at)
        self.metrics.running.set(len(live))
        self.running_adapters = frozenset(r.adapter for r in live if r.adapter)
        try:
            outputs = self._forward(live)
        except AdapterServeError:
            outputs = None
        except Exception:  # a bug must not kill the loop: fail this batch, keep serving
            log.exception("batch of %d requests failed", len(live))
            outputs = None
        if outputs is None:  # only the faulty requests fail when each runs alone
            for request in live:
                self._step_alone(request)
        else:
            for request, output in zip(live, outputs):
                request.future.set_result(output)
        self.metrics.running.set(0)
        self.running_adapters = frozenset()

    def _step_alone(self, request: Request) -> None:
        if request.deadline is not None and time.monotonic() > request.deadline:  # its client has given up
            request.future.set_exception(DeadlineExpired(f"request {request.request_id or '?'} expired while its "
                                                         "batch, which failed, was run again request by request"))
            return
        try:
            request.future.set_result(self._forward([request])[0])
        except Exception as exc:
            if not isinstance(exc, AdapterServeError):
                log.exception("request %s failed", request.request_id)
            request.future.set_exception(exc)

    def _forward(self, batch: list[Request]) -> list[RequestOutput]:
        rows = [row for r in batch for row in r.rows]
        adapters = [r.adapter for r in batch for _ in r.rows]
        tenants = [r.tenant for r in batch for _ in r.rows]
        ids, mask, types = pad_rows(rows, self.engine.pad_token_id, not self.engine.info.is_decoder)
        now = time.monotonic()
        out = self.engine.forward(ids, mask, adapters, types, tenants)
        # on the host here, in this thread: a CUDA forward returns once its kernels are queued, so the copies are
        # what waits for them (the time measured then is the device's), and a logit's .tolist() on the asyncio
        # thread would have held the event loop until the device was done
        embeddings = out.embeddings.cpu()
        logits = tuple(None if x is None else x.cpu() for x in out.logits)
        elapsed = time.monotonic() - now
        self.metrics.compute_time.observe(elapsed)
        self.scheduler.observe_forward(elapsed)
        self.metrics.batch_rows.observe(len(rows))
        self.metrics.batch_adapters.observe(len({a for a in adapters if a}))
        self.metrics.tokens.inc(int(mask.sum()))
        outputs, start = [], 0
        for request in batch:
            end = start + len(request.rows)
            outputs.append(RequestOutput(logits[start:end], embeddings[start:end], out.heads[start:end]))
            start = end
        return outputs

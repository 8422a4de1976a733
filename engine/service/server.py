"""The server process: gRPC (inference, admin, health, reflection), metrics HTTP, engine loop, drain.

Health ("" and the inference service) is NOT_SERVING until a warm-up forward has run, and again as soon
as a drain starts. Drain (SIGTERM): stop admitting, let accepted requests finish within the grace
period, stop the engine loop, exit 0.
"""
import asyncio
import collections
import functools
import logging
import signal
import time
from dataclasses import dataclass

import grpc
import torch
from adapterserve.v1 import adapter_service_pb2, adapter_service_pb2_grpc, inference_service_pb2
from adapterserve.v1 import inference_service_pb2_grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from engine.engine import Engine
from engine.loop import EngineLoop
from engine.scheduler import Request, Scheduler, SchedulerConfig
from engine.service.admin import AdapterServicer, ServerServicer, versions
from engine.service.auth import Authenticator
from engine.service.inference import InferenceServicer
from engine.service.metrics import Metrics
from engine.service.on_demand import OnDemandLoader
from engine.service.threads import start_thread

log = logging.getLogger("adapterserve.server")
INFERENCE_SERVICE = inference_service_pb2.DESCRIPTOR.services_by_name["InferenceService"].full_name
SERVICES = (INFERENCE_SERVICE,
            adapter_service_pb2.DESCRIPTOR.services_by_name["AdapterService"].full_name,
            adapter_service_pb2.DESCRIPTOR.services_by_name["ServerService"].full_name)


@dataclass(frozen=True)
class ServerConfig:
    host: str = "0.0.0.0"
    port: int = 50051  # 0 picks a free port (tests)
    metrics_port: int | None = 9090  # None: no metrics endpoint
    api_keys: str | None = None  # key file; None: auth off
    grace_s: float = 30.0  # drain: how long accepted requests may take to finish
    max_message_mb: int = 16
    reflection: bool = True
    vllm_compat_metrics: bool = False
    metrics_per_adapter: int = 0  # request counts of the N busiest adapters (the rest: adapter=""); 0: none
    load_on_demand: bool = False  # load a store adapter the first time a request names it (engine.service.on_demand)


class AdapterServer:
    def __init__(self, engine: Engine, config: ServerConfig, scheduler_config: SchedulerConfig):
        self.engine, self.config = engine, config
        self.auth = Authenticator.from_file(config.api_keys)
        self.metrics = Metrics(vllm_compat=config.vllm_compat_metrics, per_adapter_top=config.metrics_per_adapter)
        self.scheduler = Scheduler(scheduler_config, ready=self._adapter_ready,
                                   max_adapters=engine.config.max_device_adapters)
        self.loop = EngineLoop(engine, self.scheduler, self.metrics)
        self.health = health.aio.HealthServicer()
        on_demand = OnDemandLoader(engine, self.metrics) if config.load_on_demand else None
        self.inference = InferenceServicer(engine, self.scheduler, self.auth, self.metrics, self.message_bytes,
                                           on_demand)
        self.admin = AdapterServicer(engine, self.auth, self.metrics, self.message_bytes)
        self.server_info = ServerServicer(engine, scheduler_config, self.auth, self.metrics, self.message_bytes)
        self.port: int | None = None
        self.metrics_port: int | None = None
        self._metrics_http = None
        self._grpc: grpc.aio.Server | None = None
        self._stopped = asyncio.Event()
        self._draining = False
        self._tasks: list[asyncio.Task] = []

    @property
    def message_bytes(self) -> int:
        """gRPC's limit on one message, either way."""
        return self.config.max_message_mb * 1024 * 1024

    def _adapter_ready(self, request: Request) -> bool:
        """Hold a request whose adapter is still being read from its source; others go ahead meanwhile. Raises
        (the scheduler then fails this request only) when it was unloaded while queued or a read begun since it
        was queued failed."""
        return request.adapter is None or self.engine.adapters_ready([request.adapter], request.tenant,
                                                                     since=request.enqueued_at)

    def _residency(self) -> dict[str, int]:
        return dict(collections.Counter(info.tier for info in self.engine.list_adapters()))

    async def start(self) -> int:
        size = self.message_bytes
        self._grpc = grpc.aio.server(options=[
            ("grpc.max_receive_message_length", size), ("grpc.max_send_message_length", size),
            ("grpc.keepalive_time_ms", 30_000), ("grpc.keepalive_timeout_ms", 10_000),
            ("grpc.keepalive_permit_without_calls", 1),  # clients' keepalive pings on idle connections: no GOAWAY
            ("grpc.http2.min_ping_interval_without_data_ms", 10_000),
            ("grpc.max_connection_age_ms", 300_000), ("grpc.max_connection_age_grace_ms", 30_000)])
        inference_service_pb2_grpc.add_InferenceServiceServicer_to_server(self.inference, self._grpc)
        adapter_service_pb2_grpc.add_AdapterServiceServicer_to_server(self.admin, self._grpc)
        adapter_service_pb2_grpc.add_ServerServiceServicer_to_server(self.server_info, self._grpc)
        health_pb2_grpc.add_HealthServicer_to_server(self.health, self._grpc)
        for name in ("", *SERVICES):
            await self.health.set(name, health_pb2.HealthCheckResponse.NOT_SERVING)
        if self.config.reflection:
            reflection.enable_server_reflection((*SERVICES, health.SERVICE_NAME, reflection.SERVICE_NAME), self._grpc)
        address = f"{self.config.host}:{self.config.port}"
        try:
            self.port = self._grpc.add_insecure_port(address)
        except RuntimeError as exc:  # grpc's way of saying the port is taken or the host is not ours
            raise OSError(f"cannot listen on {address}: {exc}") from None
        await self._grpc.start()
        if self.config.metrics_port is not None:
            try:
                self._metrics_http, _ = self.metrics.serve(self.config.metrics_port, self.config.host)
            except OSError as exc:
                await self._grpc.stop(None)  # not left to the garbage collector of a closed event loop
                raise OSError(f"cannot serve metrics on {self.config.host}:{self.config.metrics_port}: {exc}") from None
            self.metrics_port = self._metrics_http.server_port
        self.metrics.build_info.labels(versions().get("adapterserve", "dev"), self.engine.config.model).set(1)
        self.metrics.slots.set(self.engine.config.max_device_adapters)
        self.metrics.watch_residency(self._residency)
        if not self.auth.enabled:
            log.warning("authentication is OFF: every caller is an operator (pass --api-keys to enable it)")
        else:
            self.auth.log_keys(f"authentication is on, from {self.auth.path}")
        self.loop.start()
        await asyncio.to_thread(self._warm_up)
        for name in ("", *SERVICES):
            await self.health.set(name, health_pb2.HealthCheckResponse.SERVING)
        self._tasks.append(asyncio.create_task(self._publish_lora_info()))
        log.info("serving %s on %s:%d", self.engine.config.model, self.config.host, self.port)
        return self.port

    def _warm_up(self) -> None:
        ids = torch.full((1, 4), self.engine.pad_token_id, dtype=torch.long)
        self.engine.forward(ids, torch.ones_like(ids), [None])

    async def _publish_lora_info(self) -> None:
        while True:
            self.metrics.set_lora_info(self.engine.config.max_device_adapters, set(self.loop.running_adapters),
                                       self.scheduler.waiting_adapters())
            await asyncio.sleep(1.0)

    async def drain(self) -> None:
        """Stop admitting, finish accepted requests within the grace period, then stop everything.

        Health goes NOT_SERVING, then the gRPC server stops at once (serving-conventions 1.7): it sends GOAWAY
        and takes no new calls, while accepted ones have the grace period to finish. It used to keep answering
        (NOT_SERVING, and UNAVAILABLE to new calls) until they had: a client whose one connection went through a
        ClusterIP Service to this pod then had every retry refused here for as long, where GOAWAY makes it
        reconnect, through the Service, to another pod.
        """
        if self._draining:  # SIGTERM and SIGINT may both arrive
            return
        self._draining = True
        log.info("draining: health NOT_SERVING, no new requests, %.0fs grace", self.config.grace_s)
        await self.health.enter_graceful_shutdown()
        self.inference.draining = True  # a call already past the gRPC server's door is refused by name
        if self.inference.on_demand is not None:
            self.inference.on_demand.close()  # and one waiting for a load on first use, which may hang
        self.scheduler.close()
        give_up = time.monotonic() + self.config.grace_s
        await self._grpc.stop(self.config.grace_s)
        # a thread of its own: hung adapter reads may hold every worker of asyncio's shared pool
        await start_thread(functools.partial(self.loop.stop, max(1.0, give_up - time.monotonic())), "drain")
        for task in self._tasks:
            task.cancel()
        if self._metrics_http is not None:
            self._metrics_http.shutdown()
        self._stopped.set()

    async def serve_until_signal(self) -> None:
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, lambda: asyncio.ensure_future(self.drain()))
        await self._stopped.wait()
        log.info("stopped")

"""The wrapper every RPC goes through: request id, auth, error mapping, metrics, one log line.

Health and reflection are separate servicers and never pass through here, so probes need no key.
"""
import asyncio
import functools
import json
import logging
import time
import uuid

import grpc

from engine.service.auth import Authenticator, Principal, Role
from engine.service.metrics import Metrics
from engine.service.status import to_status

log = logging.getLogger("adapterserve.rpc")
# One JSON line per call at INFO, in a logger of its own so that it can be turned off alone (serve --no-access-log)
access_log = logging.getLogger("adapterserve.access")


class RpcContext:
    """What a servicer method gets besides its request: who calls, and the raw gRPC context."""

    def __init__(self, principal: Principal, metadata: dict[str, str], request_id: str, grpc_context):
        self.principal, self.metadata, self.request_id, self.grpc = principal, metadata, request_id, grpc_context

    def tenant(self, requested: str = "") -> str | None:
        """The tenant this call acts for: the request's field, else `x-tenant-id` metadata, within the key's scope."""
        return self.principal.scope(requested or self.metadata.get("x-tenant-id") or None)

    def deadline(self) -> float | None:
        """The client deadline as time.monotonic() seconds, or None."""
        remaining = self.grpc.time_remaining()
        return None if remaining is None else time.monotonic() + remaining


class Servicer:
    """Base of our servicers: holds what `rpc` needs."""

    def __init__(self, auth: Authenticator, metrics: Metrics):
        self.auth, self.metrics = auth, metrics


def metadata_of(context: grpc.aio.ServicerContext) -> dict[str, str]:
    return {k.lower(): v for k, v in context.invocation_metadata() or () if isinstance(v, str)}


async def check_caller(servicer: Servicer, context: grpc.aio.ServicerContext, role: Role) -> None:
    """Auth for a streaming handler, which `rpc` does not wrap: aborts with the mapped status when refused."""
    try:
        servicer.auth.authenticate(metadata_of(context)).check_role(role)
    except Exception as exc:
        await context.abort_with_status(to_status(exc, uuid.uuid4().hex))


def rpc(role: Role):
    """Decorates ``async def Method(self, request, ctx: RpcContext)`` into a gRPC handler."""

    def wrap(method):
        name = method.__name__

        @functools.wraps(method)
        async def handler(self: Servicer, request, context: grpc.aio.ServicerContext):
            start = time.perf_counter()
            metadata = metadata_of(context)
            request_id = getattr(request, "request_id", "") or metadata.get("x-request-id") or uuid.uuid4().hex

            def record(code: grpc.StatusCode) -> None:
                elapsed = time.perf_counter() - start
                self.metrics.requests.labels(name, code.name).inc()
                self.metrics.latency.labels(name).observe(elapsed)
                if access_log.isEnabledFor(logging.INFO):  # skip building the line when it is off
                    access_log.info(json.dumps({"rpc": name, "request_id": request_id, "code": code.name,
                                                "ms": round(elapsed * 1000, 2), "peer": context.peer()}))

            try:
                principal = self.auth.authenticate(metadata)
                principal.check_role(role)
                response = await method(self, request, RpcContext(principal, metadata, request_id, context))
            except asyncio.CancelledError:  # the client cancelled, or its deadline passed: count it all the same
                remaining = context.time_remaining()
                expired = remaining is not None and remaining <= 0
                record(grpc.StatusCode.DEADLINE_EXCEEDED if expired else grpc.StatusCode.CANCELLED)
                raise
            except Exception as exc:  # every error leaves through the one mapping
                status = to_status(exc, request_id)
                if status.code == grpc.StatusCode.INTERNAL:
                    log.exception("rpc %s request %s failed", name, request_id)
                # recorded before the abort: it sends the status at once, and a client that scrapes
                # /metrics right after its error must find it counted
                record(status.code)
                await context.abort_with_status(status)
            record(grpc.StatusCode.OK)
            return response

        return handler

    return wrap

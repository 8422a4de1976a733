"""The wrapper every RPC goes through: request id, auth, error mapping, metrics, one log line.

Health and reflection are separate servicers and never pass through here, so probes need no key.
"""
import asyncio
import contextlib
import functools
import inspect
import json
import logging
import time
import uuid
from typing import Callable

import grpc

from engine.errors import AdapterServeError, InvalidRequest, ReplyTooLarge, Unauthenticated
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
        """The tenant this call acts for: the request's field, else `x-tenant-id` metadata (equal if both: which one
        counted was a matter of precedence nobody reads), within the key's scope."""
        header = self.metadata.get(TENANT_HEADER) or ""
        if requested and header and requested != header:
            raise InvalidRequest(f"tenant {requested!r} differs from the x-tenant-id metadata {header!r}", "tenant")
        return self.principal.scope(requested or header or None)

    def deadline(self) -> float | None:
        """The client deadline as time.monotonic() seconds, or None."""
        remaining = self.grpc.time_remaining()
        return None if remaining is None else time.monotonic() + remaining


class Servicer:
    """Base of our servicers: holds what `rpc` needs."""

    def __init__(self, auth: Authenticator, metrics: Metrics, max_reply_bytes: int):
        self.auth, self.metrics = auth, metrics
        self.max_reply_bytes = max_reply_bytes  # the server's max_send_message_length


TENANT_HEADER = "x-tenant-id"
TENANT_HEADER_BIN = "x-tenant-id-bin"  # UTF-8 bytes: gRPC sends only printable ASCII in text headers
MAX_REQUEST_ID_CHARS = 256  # the id goes into every log line and reply: a 5 MB one made a 5 MB log line (a probe)


# Headers that choose who calls, for whom and with what: sent twice, which one counts would depend on
# the order a proxy and a client wrote them in, so a second copy is refused.
SINGLE_HEADERS = ("authorization", TENANT_HEADER, TENANT_HEADER_BIN, "x-adapter-id", "x-request-id")


def metadata_of(context: grpc.aio.ServicerContext) -> tuple[dict[str, str], AdapterServeError | None]:
    """Text metadata by lower-case key, with a tenant sent as UTF-8 in ``x-tenant-id-bin`` read as
    ``x-tenant-id``; and the error to answer if they are wrong, or None: a header of SINGLE_HEADERS sent twice
    (authorization: Unauthenticated), bytes in ``x-tenant-id-bin`` that are no UTF-8 (decoding them with
    replacement made different byte strings one tenant), or both tenant headers naming different tenants."""
    metadata, tenant_bin, seen, problems, not_utf8 = {}, None, set(), [], False
    for key, value in context.invocation_metadata() or ():
        key = key.lower()
        if key in seen and key in SINGLE_HEADERS:
            problems.append(key)
        seen.add(key)
        if isinstance(value, str):
            metadata[key] = value
        elif key == TENANT_HEADER_BIN:
            try:
                tenant_bin = value.decode("utf-8")
            except UnicodeDecodeError:
                not_utf8 = True
    if "authorization" in problems:  # which key to check is itself in doubt
        return metadata, Unauthenticated("the authorization header was sent more than once")
    if problems:
        return metadata, InvalidRequest(f"the {problems[0]} header was sent more than once", problems[0])
    if not_utf8:
        return metadata, InvalidRequest(f"the {TENANT_HEADER_BIN} header holds bytes that are not UTF-8",
                                        TENANT_HEADER_BIN)
    if tenant_bin is not None and metadata.setdefault(TENANT_HEADER, tenant_bin) != tenant_bin:
        return metadata, InvalidRequest(f"the {TENANT_HEADER} and {TENANT_HEADER_BIN} headers name different "
                                        "tenants", TENANT_HEADER)
    return metadata, None


class _Call:
    """One call's request id, timing and outcome: every call is counted and logged once, however it ends."""

    def __init__(self, servicer: Servicer, name: str, request, context: grpc.aio.ServicerContext):
        self.servicer, self.name, self.context = servicer, name, context
        self.peer = context.peer()  # now: once the call is cancelled or past its deadline, gRPC reports ""
        self.start = time.perf_counter()
        self.metadata, self.bad_metadata = metadata_of(context)
        given = getattr(request, "request_id", "") or self.metadata.get("x-request-id") or ""
        self.bad_request_id = bool(given) and (len(given) > MAX_REQUEST_ID_CHARS or not given.isprintable())
        self.request_id = uuid.uuid4().hex if not given or self.bad_request_id else given  # a bad one is not logged
        self.principal: Principal | None = None  # once authenticated

    def rpc_context(self, role: Role) -> RpcContext:
        if isinstance(self.bad_metadata, Unauthenticated):
            raise self.bad_metadata
        self.principal = principal = self.servicer.auth.authenticate(self.metadata)
        principal.check_role(role)
        if self.bad_metadata is not None:  # after authentication: callers without a key learn nothing more
            raise self.bad_metadata
        if self.bad_request_id:  # refused here, where errors are answered through the one mapping
            raise InvalidRequest(f"request_id must be 1..{MAX_REQUEST_ID_CHARS} printable characters (the server "
                                 f"named this call {self.request_id})", "request_id")
        return RpcContext(principal, self.metadata, self.request_id, self.context)

    def record(self, code: grpc.StatusCode) -> None:
        elapsed = time.perf_counter() - self.start
        self.servicer.metrics.requests.labels(self.name, code.name).inc()
        self.servicer.metrics.latency.labels(self.name).observe(elapsed)
        if access_log.isEnabledFor(logging.INFO):  # skip building the line when it is off
            access_log.info(json.dumps({"rpc": self.name, "request_id": self.request_id, "code": code.name,
                                        "ms": round(elapsed * 1000, 2), "peer": self.peer}))

    def cancelled(self) -> None:
        """The client cancelled, or its deadline passed: counted all the same."""
        remaining = self.context.time_remaining()
        expired = remaining is not None and remaining <= 0
        self.record(grpc.StatusCode.DEADLINE_EXCEEDED if expired else grpc.StatusCode.CANCELLED)

    @contextlib.asynccontextmanager
    async def outcome(self):
        """Around the method: counts and logs how the call ended, errors through the one mapping."""
        try:
            yield
        except asyncio.CancelledError:
            self.cancelled()
            raise
        except Exception as exc:
            await self.fail(exc)
        else:
            self.record(grpc.StatusCode.OK)

    async def fail(self, exc: Exception) -> None:
        """Every error leaves through the one mapping; aborting raises, ending the handler."""
        tenant_key = self.principal is not None and self.principal.tenant is not None
        status = to_status(exc, self.request_id, hide_paths=tenant_key)
        if status.code == grpc.StatusCode.INTERNAL:
            log.exception("rpc %s request %s failed", self.name, self.request_id)
        # recorded before the abort: it sends the status at once, and a client that scrapes
        # /metrics right after its error must find it counted
        self.record(status.code)
        await self.context.abort_with_status(status)


def fewer_inputs(request) -> str:
    """What a caller whose reply was over the message limit can ask for instead (most RPCs)."""
    return "less in one call (fewer inputs)"


def rpc(role: Role, smaller: Callable[[object], str] = fewer_inputs):
    """Decorates ``async def Method(self, request, ctx: RpcContext)`` into a gRPC handler; an async generator
    method becomes a server-streaming handler, counted and logged the same way. ``smaller(request)`` says what
    to ask for when a reply is over the message limit."""

    def wrap(method):
        name = method.__name__

        if inspect.isasyncgenfunction(method):
            @functools.wraps(method)
            async def stream_handler(self: Servicer, request, context: grpc.aio.ServicerContext):
                call = _Call(self, name, request, context)
                async with call.outcome():
                    async for response in method(self, request, call.rpc_context(role)):
                        yield _within_limit(response, self.max_reply_bytes, smaller, request)

            return stream_handler

        @functools.wraps(method)
        async def handler(self: Servicer, request, context: grpc.aio.ServicerContext):
            call = _Call(self, name, request, context)
            async with call.outcome():
                response = await method(self, request, call.rpc_context(role))
                return _within_limit(response, self.max_reply_bytes, smaller, request)

        return handler

    return wrap


def _within_limit(response, limit: int, smaller: Callable[[object], str], request):
    """The reply, unless gRPC would fail to send it: then REPLY_TOO_LARGE by name, counted and logged as such (the
    call was logged OK while the client got gRPC's own RESOURCE_EXHAUSTED; a Classify reply holds every label of the
    head with its score, for every input: 64 inputs of a head with many labels pass 16 MB)."""
    size = response.ByteSize()
    if size > limit:
        raise ReplyTooLarge(f"the reply takes {size} bytes, over the server's message limit of {limit} bytes: ask "
                            f"for {smaller(request)}")
    return response

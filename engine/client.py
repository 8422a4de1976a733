"""Typed Python client: `Client` (sync) and `AsyncClient` (asyncio) over the gRPC API.

Errors arrive as `RpcError` with the gRPC code, the server's ErrorInfo reason and its message.
Inputs are strings (tokenised by the server) or lists of token ids. Calls that end UNAVAILABLE (a draining
server, a connection that dropped), and calls that change nothing (inference, listings) that end CANCELLED (a
stopping server cancels those it had not yet started, and those that outlive its grace), are retried by gRPC
itself, up to 3 attempts with backoff (a request over 256 KiB is sent once): behind a Kubernetes Service the
channel reconnects to another replica. Calls the server refuses as overloaded
(RESOURCE_EXHAUSTED with a RetryInfo: its queue is full, every adapter slot is busy) are tried again after the
delay it asks for, up to 3 attempts; RESOURCE_EXHAUSTED without RetryInfo (a message over the size limit) is not.
``timeout`` bounds a whole call, its tries included: a retry whose wait would end past it is not made, and the
refusal is raised at once. A call on a closed client raises `ClientClosed`. Listings are read page by page.
"""
import asyncio
import math
import time
from typing import AsyncIterator, Callable, Iterator, Sequence

import grpc
from adapterserve.v1 import adapter_service_pb2_grpc as admin_grpc
from adapterserve.v1 import inference_service_pb2 as pb
from adapterserve.v1 import inference_service_pb2_grpc as pb_grpc
from google.rpc import error_details_pb2
from grpc_status import rpc_status

from engine.client_calls import CHANNEL_OPTIONS, Call, Calls, Inputs, Pager
from engine.types import AdapterInfo, CatalogEntry, Classification, ServerInfo, TokenTag

OVERLOAD_ATTEMPTS = 3  # tries of a call refused as overloaded, the first included
MAX_OVERLOAD_WAIT_S = 5.0  # the longest RetryInfo delay honoured before a retry
# Longer timeouts are taken as this (~3 years): gRPC's deadline overflows between 1e9 and 1e10 s from now,
# and the call then ends DEADLINE_EXCEEDED at once (measured with grpcio 1.85)
MAX_TIMEOUT_S = 1e8


class ClientClosed(RuntimeError):
    """A call on a Client or AsyncClient after its close()."""


class RpcError(Exception):
    def __init__(self, code: grpc.StatusCode, reason: str, message: str):
        self.code, self.reason, self.message = code, reason, message
        super().__init__(f"{code.name} ({reason or 'no reason'}): {message}")


def _detail(exc: grpc.RpcError, kind):
    """The google.rpc detail of type ``kind`` (ErrorInfo, RetryInfo, ...) the status carries, or None."""
    try:
        status = rpc_status.from_call(exc)
    except ValueError:  # details of another status than the call's: gRPC replaced it (trailers over its limit)
        return None
    for detail in status.details if status else ():
        if detail.Is(kind.DESCRIPTOR):
            message = kind()
            detail.Unpack(message)
            return message
    return None


def _error(exc: grpc.RpcError) -> RpcError:
    info = _detail(exc, error_details_pb2.ErrorInfo)
    return RpcError(exc.code(), info.reason if info else "", exc.details() or "")


def _overload_wait(exc: grpc.RpcError) -> float | None:
    """Seconds to wait before trying a call again that the server refused as overloaded, None for other errors."""
    if exc.code() != grpc.StatusCode.RESOURCE_EXHAUSTED:
        return None
    retry = _detail(exc, error_details_pb2.RetryInfo)
    return None if retry is None else min(retry.retry_delay.ToTimedelta().total_seconds(), MAX_OVERLOAD_WAIT_S)


def _deadline(timeout: float | None) -> float | None:
    return None if timeout is None else time.monotonic() + timeout


def _left(deadline: float | None) -> float | None:
    """The timeout for the next try: what is left of the call's deadline."""
    return None if deadline is None else max(deadline - time.monotonic(), 0.0)


def _retry_wait(exc: grpc.RpcError, attempt: int, deadline: float | None) -> float | None:
    """How long to wait before trying an overloaded call again; None: raise it now."""
    wait = _overload_wait(exc)
    if wait is None or attempt == OVERLOAD_ATTEMPTS or (deadline is not None and time.monotonic() + wait >= deadline):
        return None
    return wait


def _timeout(timeout: float | None) -> float | None:
    if timeout is None:
        return None
    if isinstance(timeout, bool) or not isinstance(timeout, (int, float)) or math.isnan(timeout) or timeout <= 0:
        raise ValueError(f"timeout must be None or a number of seconds > 0, got {timeout!r}")
    return min(timeout, MAX_TIMEOUT_S)


def _tenant_header(tenant: str) -> tuple[str, str | bytes]:
    """gRPC sends only printable ASCII in a text header (anything else fails each call as INTERNAL "Invalid
    metadata"), so other tenants go as UTF-8 in ``x-tenant-id-bin``, which the server reads alike."""
    if tenant.isascii() and tenant.isprintable():
        return "x-tenant-id", tenant
    return "x-tenant-id-bin", tenant.encode("utf-8")  # a lone surrogate: UnicodeEncodeError, a ValueError


class _Base:
    def __init__(self, channel, api_key: str | None, tenant: str | None, timeout: float | None):
        if api_key and not (api_key.isascii() and api_key.isprintable()):  # gRPC logged C-core internals, then
            channel.close()  # INTERNAL "Invalid metadata", on every call (a probe)
            raise ValueError("an API key must be printable ASCII: it travels as a gRPC text header")
        self.channel, self.timeout, self.closed = channel, _timeout(timeout), False
        self.metadata = tuple(([("authorization", f"Bearer {api_key}")] if api_key else [])
                              + ([_tenant_header(tenant)] if tenant else []))
        self.stubs = {"inference": pb_grpc.InferenceServiceStub(channel),
                      "admin": admin_grpc.AdapterServiceStub(channel), "server": admin_grpc.ServerServiceStub(channel)}

    def _method(self, call: Call):
        return getattr(self.stubs[call.stub], call.method)

    def _check_open(self) -> None:
        # gRPC itself raises ValueError (sync) or UsageError (aio) here; one error for both clients
        if self.closed:
            raise ClientClosed(f"this {type(self).__name__} is closed")


class Client(_Base):
    """Blocking client: ``with Client("localhost:50051", api_key=...) as c: c.classify(["text"], "imdb")``."""

    def __init__(self, target: str = "localhost:50051", api_key: str | None = None, tenant: str | None = None,
                 timeout: float | None = 60.0):
        super().__init__(grpc.insecure_channel(target, options=CHANNEL_OPTIONS), api_key, tenant, timeout)

    def _invoke(self, call: Call):
        self._check_open()
        deadline = _deadline(self.timeout)
        for attempt in range(1, OVERLOAD_ATTEMPTS + 1):
            try:
                return call.convert(self._method(call)(call.request, metadata=self.metadata + call.metadata,
                                                       timeout=_left(deadline)))
            except grpc.RpcError as exc:
                wait = _retry_wait(exc, attempt, deadline)
                if wait is None:
                    raise _error(exc) from None
            time.sleep(wait)

    def classify(self, inputs: Inputs, adapter: str) -> list[Classification]:
        return self._invoke(Calls.classify(inputs, adapter))

    def embed(self, inputs: Inputs, adapter: str | None = None) -> list[list[float]]:
        return self._invoke(Calls.embed(inputs, adapter))

    def tag(self, inputs: Inputs, adapter: str) -> list[list[TokenTag]]:
        return self._invoke(Calls.tag(inputs, adapter))

    def load_adapter(self, source: str, name: str | None = None, tenant: str | None = None,
                     pin: bool = False) -> AdapterInfo:
        return self._invoke(Calls.load_adapter(source, name, tenant, pin))

    def average_adapters(self, name: str, sources: Sequence[tuple[str, float]], tenant: str | None = None,
                         combine_strategy: str = "linear", svd_rank: int | None = None,
                         overwrite_ok: bool = False, normalize_weights: bool = True) -> AdapterInfo:
        """A new adapter, the weighted average of loaded ones: ``sources`` is [(name, weight), ...]; the weights
        are normalised to sum to 1 unless ``normalize_weights`` is False."""
        return self._invoke(Calls.average_adapters(name, sources, tenant, combine_strategy, svd_rank, overwrite_ok,
                                                   normalize_weights))

    def unload_adapter(self, name: str, tenant: str | None = None) -> None:
        return self._invoke(Calls.unload_adapter(name, tenant))

    def list_adapters(self, tenant: str | None = None) -> list[AdapterInfo]:
        return self._all_pages(lambda token, size: Calls.list_adapters(tenant, token, size))

    def catalog(self) -> list[CatalogEntry]:
        """The adapter store's folders (`--adapter-store`); each entry's `source` loads it."""
        return self._all_pages(Calls.catalog)

    def _all_pages(self, page: Callable[[str, int], Call]) -> list:
        pager = Pager(page)
        while not pager.done:
            try:
                pager.took(*self._invoke(pager.call()))
            except RpcError as exc:
                if not pager.shrunk(exc.reason):
                    raise
        return pager.items

    def get_adapter(self, name: str, tenant: str | None = None) -> AdapterInfo:
        return self._invoke(Calls.get_adapter(name, tenant))

    def server_info(self) -> ServerInfo:
        return self._invoke(Calls.server_info())

    def generate(self, prompt: str, adapter: str | None = None, max_new_tokens: int = 64) -> Iterator[str]:
        """Streams generated text pieces (decoder bases)."""
        request = pb.GenerateStreamRequest(adapter_id=adapter or "", input=pb.Input(text=prompt),
                                           max_new_tokens=max_new_tokens)
        self._check_open()
        try:
            for piece in self.stubs["inference"].GenerateStream(request, metadata=self.metadata, timeout=self.timeout):
                yield piece.text
        except grpc.RpcError as exc:
            raise _error(exc) from None

    def close(self) -> None:
        self.closed = True
        self.channel.close()

    def __enter__(self) -> "Client":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


class AsyncClient(_Base):
    """asyncio client with the same methods as `Client`, each a coroutine."""

    def __init__(self, target: str = "localhost:50051", api_key: str | None = None, tenant: str | None = None,
                 timeout: float | None = 60.0):
        super().__init__(grpc.aio.insecure_channel(target, options=CHANNEL_OPTIONS), api_key, tenant, timeout)

    async def _invoke(self, call: Call):
        self._check_open()
        deadline = _deadline(self.timeout)
        for attempt in range(1, OVERLOAD_ATTEMPTS + 1):
            try:
                return call.convert(await self._method(call)(call.request, metadata=self.metadata + call.metadata,
                                                             timeout=_left(deadline)))
            except grpc.RpcError as exc:
                wait = _retry_wait(exc, attempt, deadline)
                if wait is None:
                    raise _error(exc) from None
            await asyncio.sleep(wait)

    async def classify(self, inputs: Inputs, adapter: str) -> list[Classification]:
        return await self._invoke(Calls.classify(inputs, adapter))

    async def embed(self, inputs: Inputs, adapter: str | None = None) -> list[list[float]]:
        return await self._invoke(Calls.embed(inputs, adapter))

    async def tag(self, inputs: Inputs, adapter: str) -> list[list[TokenTag]]:
        return await self._invoke(Calls.tag(inputs, adapter))

    async def load_adapter(self, source: str, name: str | None = None, tenant: str | None = None,
                           pin: bool = False) -> AdapterInfo:
        return await self._invoke(Calls.load_adapter(source, name, tenant, pin))

    async def average_adapters(self, name: str, sources: Sequence[tuple[str, float]], tenant: str | None = None,
                               combine_strategy: str = "linear", svd_rank: int | None = None,
                               overwrite_ok: bool = False, normalize_weights: bool = True) -> AdapterInfo:
        return await self._invoke(Calls.average_adapters(name, sources, tenant, combine_strategy, svd_rank,
                                                          overwrite_ok, normalize_weights))

    async def unload_adapter(self, name: str, tenant: str | None = None) -> None:
        return await self._invoke(Calls.unload_adapter(name, tenant))

    async def list_adapters(self, tenant: str | None = None) -> list[AdapterInfo]:
        return await self._all_pages(lambda token, size: Calls.list_adapters(tenant, token, size))

    async def catalog(self) -> list[CatalogEntry]:
        """The adapter store's folders (`--adapter-store`); each entry's `source` loads it."""
        return await self._all_pages(Calls.catalog)

    async def _all_pages(self, page: Callable[[str, int], Call]) -> list:
        pager = Pager(page)
        while not pager.done:
            try:
                pager.took(*await self._invoke(pager.call()))
            except RpcError as exc:
                if not pager.shrunk(exc.reason):
                    raise
        return pager.items

    async def get_adapter(self, name: str, tenant: str | None = None) -> AdapterInfo:
        return await self._invoke(Calls.get_adapter(name, tenant))

    async def server_info(self) -> ServerInfo:
        return await self._invoke(Calls.server_info())

    async def generate(self, prompt: str, adapter: str | None = None, max_new_tokens: int = 64) -> AsyncIterator[str]:
        """Streams generated text pieces (decoder bases)."""
        request = pb.GenerateStreamRequest(adapter_id=adapter or "", input=pb.Input(text=prompt),
                                           max_new_tokens=max_new_tokens)
        self._check_open()
        try:
            async for piece in self.stubs["inference"].GenerateStream(request, metadata=self.metadata,
                                                                      timeout=self.timeout):
                yield piece.text
        except grpc.RpcError as exc:
            raise _error(exc) from None

    async def close(self) -> None:
        self.closed = True
        await self.channel.close()

    async def __aenter__(self) -> "AsyncClient":
        return self

    async def __aexit__(self, *exc) -> None:
        await self.close()

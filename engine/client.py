"""Typed Python client: `Client` (sync) and `AsyncClient` (asyncio) over the gRPC API.

Errors arrive as `RpcError` with the gRPC code, the server's ErrorInfo reason and its message.
Inputs are strings (tokenised by the server) or lists of token ids. Calls that end UNAVAILABLE (a draining
server, a connection that dropped) are retried by gRPC itself, up to 3 attempts with backoff: behind a
Kubernetes Service the channel reconnects to another replica. Calls the server refuses as overloaded
(RESOURCE_EXHAUSTED with a RetryInfo: its queue is full, every adapter slot is busy) are tried again after the
delay it asks for, up to 3 attempts; RESOURCE_EXHAUSTED without RetryInfo (a message over the size limit) is not.
``timeout`` bounds a whole call, its tries included: a retry whose wait would end past it is not made, and the
refusal is raised at once.
"""
import asyncio
import json
import time
from dataclasses import dataclass
from typing import AsyncIterator, Callable, Iterator, Sequence

import grpc
from adapterserve.v1 import adapter_service_pb2 as admin_pb
from adapterserve.v1 import adapter_service_pb2_grpc as admin_grpc
from adapterserve.v1 import inference_service_pb2 as pb
from adapterserve.v1 import inference_service_pb2_grpc as pb_grpc
from google.rpc import error_details_pb2
from grpc_status import rpc_status

from engine.types import AdapterInfo, CatalogEntry, Classification, ServerInfo, TokenTag

Inputs = Sequence[str | Sequence[int]]
# gRPC's own retries (service config); every method: inference is stateless, a repeated load swaps versions
CHANNEL_OPTIONS = [("grpc.enable_retries", 1), ("grpc.service_config", json.dumps({"methodConfig": [{
    "name": [{"service": "adapterserve.v1.InferenceService"}, {"service": "adapterserve.v1.AdapterService"},
             {"service": "adapterserve.v1.ServerService"}],
    "retryPolicy": {"maxAttempts": 3, "initialBackoff": "0.2s", "maxBackoff": "2s", "backoffMultiplier": 2,
                    "retryableStatusCodes": ["UNAVAILABLE"]}}]}))]


OVERLOAD_ATTEMPTS = 3  # tries of a call refused as overloaded, the first included
MAX_OVERLOAD_WAIT_S = 5.0  # the longest RetryInfo delay honoured before a retry


class RpcError(Exception):
    def __init__(self, code: grpc.StatusCode, reason: str, message: str):
        self.code, self.reason, self.message = code, reason, message
        super().__init__(f"{code.name} ({reason or 'no reason'}): {message}")


def _detail(exc: grpc.RpcError, kind):
    """The google.rpc detail of type ``kind`` (ErrorInfo, RetryInfo, ...) the status carries, or None."""
    status = rpc_status.from_call(exc)
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


def _inputs(items: Inputs) -> list[pb.Input]:
    """A str, or a list or tuple of inputs: a set or dict has no order that results could follow."""
    if isinstance(items, str):
        items = [items]
    if not isinstance(items, (list, tuple)):
        raise TypeError(f"inputs must be a str or a list of inputs, got {type(items).__name__}")
    return [_input(i, n) for n, i in enumerate(items)]


def _input(item: str | Sequence[int], n: int) -> pb.Input:
    """A text, or token ids as a list or tuple (bytes would pass as ids and a set has no order)."""
    if isinstance(item, str):
        return pb.Input(text=item)
    if not isinstance(item, (list, tuple)):
        raise TypeError(f"inputs[{n}] must be a str or a list of token ids, got {type(item).__name__}")
    return pb.Input(token_ids=pb.TokenIds(ids=list(item)))


def _classification(c: pb.Classification) -> Classification:
    return Classification(c.label, {s.label: s.score for s in c.scores}, tuple(c.labels))


def _tags(t: pb.TokenTags) -> list[TokenTag]:
    return [TokenTag(x.token, x.start, x.end, x.label, x.score) for x in t.tags]


def _info(a: admin_pb.Adapter) -> AdapterInfo:
    return AdapterInfo(name=a.name, tenant=a.tenant or None, method=a.method, source=a.source,
                       num_params=a.num_params, head_type=a.head_type or None, labels=tuple(a.labels),
                       slot=-1, tier=a.tier, state=a.state, pinned=a.pinned)  # slots are server-internal


def _catalog_entry(e: admin_pb.CatalogEntry) -> CatalogEntry:
    return CatalogEntry(name=e.name, source=e.source, format=e.format, method=e.method,
                        base_model=e.base_model or None, model_type=e.model_type or None,
                        head_type=e.head_type or None, size_bytes=e.size_bytes)


def _server_info(r: admin_pb.GetServerInfoResponse) -> ServerInfo:
    return ServerInfo(base_model=r.base_model, model_type=r.model_type, dtype=r.dtype, device=r.device,
                      hidden_size=r.hidden_size, max_seq_len=r.max_seq_len, max_batch_rows=r.max_batch_rows,
                      max_batch_tokens=r.max_batch_tokens, max_inputs_per_request=r.max_inputs_per_request,
                      max_device_adapters=r.max_device_adapters, auth_enabled=r.auth_enabled, pooling=r.pooling,
                      versions=dict(r.versions))


@dataclass(frozen=True)
class _Call:
    """One RPC, built once for both clients: which stub and method, the request, how to read the reply."""

    stub: str
    method: str
    request: object
    convert: Callable


class _Calls:
    """Request construction shared by `Client` and `AsyncClient`."""

    @staticmethod
    def classify(items: Inputs, adapter: str) -> _Call:
        return _Call("inference", "Classify", pb.ClassifyRequest(adapter_id=adapter, inputs=_inputs(items)),
                     lambda r: [_classification(c) for c in r.results])

    @staticmethod
    def embed(items: Inputs, adapter: str | None) -> _Call:
        return _Call("inference", "Embed", pb.EmbedRequest(adapter_id=adapter or "", inputs=_inputs(items)),
                     lambda r: [list(e.values) for e in r.embeddings])

    @staticmethod
    def tag(items: Inputs, adapter: str) -> _Call:
        return _Call("inference", "Tag", pb.TagRequest(adapter_id=adapter, inputs=_inputs(items)),
                     lambda r: [_tags(t) for t in r.results])

    @staticmethod
    def load_adapter(source: str, name: str | None, tenant: str | None, pin: bool) -> _Call:
        request = admin_pb.LoadAdapterRequest(source=str(source), name=name or "", tenant=tenant or "", pin=pin)
        return _Call("admin", "LoadAdapter", request, lambda r: _info(r.adapter))

    @staticmethod
    def average_adapters(name: str, sources: Sequence[tuple[str, float]], tenant: str | None, combine_strategy: str,
                         svd_rank: int | None, overwrite_ok: bool) -> _Call:
        if isinstance(sources, str) or not all(isinstance(s, (list, tuple)) and len(s) == 2 for s in sources):
            raise TypeError(f"sources must be a list of (adapter, weight) pairs, got {sources!r}")
        request = admin_pb.AverageAdaptersRequest(
            name=name, sources=[admin_pb.WeightedAdapter(name=n, weight=w) for n, w in sources], tenant=tenant or "",
            combine_strategy=combine_strategy, svd_rank=svd_rank or 0, overwrite_ok=overwrite_ok)
        return _Call("admin", "AverageAdapters", request, lambda r: _info(r.adapter))

    @staticmethod
    def unload_adapter(name: str, tenant: str | None) -> _Call:
        return _Call("admin", "UnloadAdapter", admin_pb.UnloadAdapterRequest(name=name, tenant=tenant or ""),
                     lambda r: None)

    @staticmethod
    def list_adapters(tenant: str | None) -> _Call:
        return _Call("admin", "ListAdapters", admin_pb.ListAdaptersRequest(tenant=tenant or ""),
                     lambda r: [_info(a) for a in r.adapters])

    @staticmethod
    def catalog() -> _Call:
        return _Call("admin", "ListAdapters", admin_pb.ListAdaptersRequest(include_catalog=True),
                     lambda r: [_catalog_entry(e) for e in r.catalog])

    @staticmethod
    def get_adapter(name: str, tenant: str | None) -> _Call:
        return _Call("admin", "GetAdapter", admin_pb.GetAdapterRequest(name=name, tenant=tenant or ""),
                     lambda r: _info(r.adapter))

    @staticmethod
    def server_info() -> _Call:
        return _Call("server", "GetServerInfo", admin_pb.GetServerInfoRequest(), _server_info)


class _Base:
    def __init__(self, channel, api_key: str | None, tenant: str | None, timeout: float | None):
        self.channel, self.timeout = channel, timeout
        self.metadata = tuple(([("authorization", f"Bearer {api_key}")] if api_key else [])
                              + ([("x-tenant-id", tenant)] if tenant else []))
        self.stubs = {"inference": pb_grpc.InferenceServiceStub(channel),
                      "admin": admin_grpc.AdapterServiceStub(channel), "server": admin_grpc.ServerServiceStub(channel)}

    def _method(self, call: _Call):
        return getattr(self.stubs[call.stub], call.method)


class Client(_Base):
    """Blocking client: ``with Client("localhost:50051", api_key=...) as c: c.classify(["text"], "imdb")``."""

    def __init__(self, target: str = "localhost:50051", api_key: str | None = None, tenant: str | None = None,
                 timeout: float | None = 60.0):
        super().__init__(grpc.insecure_channel(target, options=CHANNEL_OPTIONS), api_key, tenant, timeout)

    def _invoke(self, call: _Call):
        deadline = _deadline(self.timeout)
        for attempt in range(1, OVERLOAD_ATTEMPTS + 1):
            try:
                return call.convert(self._method(call)(call.request, metadata=self.metadata, timeout=_left(deadline)))
            except grpc.RpcError as exc:
                wait = _retry_wait(exc, attempt, deadline)
                if wait is None:
                    raise _error(exc) from None
            time.sleep(wait)

    def classify(self, inputs: Inputs, adapter: str) -> list[Classification]:
        return self._invoke(_Calls.classify(inputs, adapter))

    def embed(self, inputs: Inputs, adapter: str | None = None) -> list[list[float]]:
        return self._invoke(_Calls.embed(inputs, adapter))

    def tag(self, inputs: Inputs, adapter: str) -> list[list[TokenTag]]:
        return self._invoke(_Calls.tag(inputs, adapter))

    def load_adapter(self, source: str, name: str | None = None, tenant: str | None = None,
                     pin: bool = False) -> AdapterInfo:
        return self._invoke(_Calls.load_adapter(source, name, tenant, pin))

    def average_adapters(self, name: str, sources: Sequence[tuple[str, float]], tenant: str | None = None,
                         combine_strategy: str = "linear", svd_rank: int | None = None,
                         overwrite_ok: bool = False) -> AdapterInfo:
        """A new adapter, the weighted average of loaded ones: ``sources`` is [(name, weight), ...]."""
        return self._invoke(_Calls.average_adapters(name, sources, tenant, combine_strategy, svd_rank, overwrite_ok))

    def unload_adapter(self, name: str, tenant: str | None = None) -> None:
        return self._invoke(_Calls.unload_adapter(name, tenant))

    def list_adapters(self, tenant: str | None = None) -> list[AdapterInfo]:
        return self._invoke(_Calls.list_adapters(tenant))

    def catalog(self) -> list[CatalogEntry]:
        """The adapter store's folders (`--adapter-store`); each entry's `source` loads it."""
        return self._invoke(_Calls.catalog())

    def get_adapter(self, name: str, tenant: str | None = None) -> AdapterInfo:
        return self._invoke(_Calls.get_adapter(name, tenant))

    def server_info(self) -> ServerInfo:
        return self._invoke(_Calls.server_info())

    def generate(self, prompt: str, adapter: str | None = None, max_new_tokens: int = 64) -> Iterator[str]:
        """Streams generated text pieces (decoder bases)."""
        request = pb.GenerateStreamRequest(adapter_id=adapter or "", input=pb.Input(text=prompt),
                                           max_new_tokens=max_new_tokens)
        try:
            for piece in self.stubs["inference"].GenerateStream(request, metadata=self.metadata, timeout=self.timeout):
                yield piece.text
        except grpc.RpcError as exc:
            raise _error(exc) from None

    def close(self) -> None:
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

    async def _invoke(self, call: _Call):
        deadline = _deadline(self.timeout)
        for attempt in range(1, OVERLOAD_ATTEMPTS + 1):
            try:
                return call.convert(await self._method(call)(call.request, metadata=self.metadata,
                                                             timeout=_left(deadline)))
            except grpc.RpcError as exc:
                wait = _retry_wait(exc, attempt, deadline)
                if wait is None:
                    raise _error(exc) from None
            await asyncio.sleep(wait)

    async def classify(self, inputs: Inputs, adapter: str) -> list[Classification]:
        return await self._invoke(_Calls.classify(inputs, adapter))

    async def embed(self, inputs: Inputs, adapter: str | None = None) -> list[list[float]]:
        return await self._invoke(_Calls.embed(inputs, adapter))

    async def tag(self, inputs: Inputs, adapter: str) -> list[list[TokenTag]]:
        return await self._invoke(_Calls.tag(inputs, adapter))

    async def load_adapter(self, source: str, name: str | None = None, tenant: str | None = None,
                           pin: bool = False) -> AdapterInfo:
        return await self._invoke(_Calls.load_adapter(source, name, tenant, pin))

    async def average_adapters(self, name: str, sources: Sequence[tuple[str, float]], tenant: str | None = None,
                               combine_strategy: str = "linear", svd_rank: int | None = None,
                               overwrite_ok: bool = False) -> AdapterInfo:
        return await self._invoke(_Calls.average_adapters(name, sources, tenant, combine_strategy, svd_rank,
                                                          overwrite_ok))

    async def unload_adapter(self, name: str, tenant: str | None = None) -> None:
        return await self._invoke(_Calls.unload_adapter(name, tenant))

    async def list_adapters(self, tenant: str | None = None) -> list[AdapterInfo]:
        return await self._invoke(_Calls.list_adapters(tenant))

    async def catalog(self) -> list[CatalogEntry]:
        """The adapter store's folders (`--adapter-store`); each entry's `source` loads it."""
        return await self._invoke(_Calls.catalog())

    async def get_adapter(self, name: str, tenant: str | None = None) -> AdapterInfo:
        return await self._invoke(_Calls.get_adapter(name, tenant))

    async def server_info(self) -> ServerInfo:
        return await self._invoke(_Calls.server_info())

    async def generate(self, prompt: str, adapter: str | None = None, max_new_tokens: int = 64) -> AsyncIterator[str]:
        """Streams generated text pieces (decoder bases)."""
        request = pb.GenerateStreamRequest(adapter_id=adapter or "", input=pb.Input(text=prompt),
                                           max_new_tokens=max_new_tokens)
        try:
            async for piece in self.stubs["inference"].GenerateStream(request, metadata=self.metadata,
                                                                      timeout=self.timeout):
                yield piece.text
        except grpc.RpcError as exc:
            raise _error(exc) from None

    async def close(self) -> None:
        await self.channel.close()

    async def __aenter__(self) -> "AsyncClient":
        return self

    async def __aexit__(self, *exc) -> None:
        await self.close()

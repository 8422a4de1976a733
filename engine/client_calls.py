"""What each RPC sends and how its reply reads, built once for `Client` and `AsyncClient` (engine.client)."""
import json
from dataclasses import dataclass
from typing import Callable, Sequence

from adapterserve.v1 import adapter_service_pb2 as admin_pb
from adapterserve.v1 import inference_service_pb2 as pb

from engine.types import AdapterInfo, CatalogEntry, Classification, ServerInfo, TokenTag

Inputs = Sequence[str | Sequence[int]]


def _retried(codes: list[str]) -> dict:
    """A gRPC retry policy for ``codes``: 3 attempts, backoff 0.2 s doubling up to 2 s."""
    return {"maxAttempts": 3, "initialBackoff": "0.2s", "maxBackoff": "2s", "backoffMultiplier": 2,
            "retryableStatusCodes": codes}


# gRPC's own retries (service config), made only before any reply arrived, and only while the request fits gRPC's
# retry buffer (grpc.per_rpc_retry_buffer_size, 256 KiB: a larger request is sent once). UNAVAILABLE on every
# method: inference is stateless, a repeated load swaps versions. CANCELLED on the calls that change nothing
# (inference, listings, lookups): a server that begins to stop (drain) cancels the calls that reached it but not yet
# a handler (seen in test_drain under load), and those still running when its grace ends; sent again, they do no
# harm. An unload, load or average cancelled after the grace may have done its work, so it is not sent again.
# round_robin: a target naming several replicas (dns:///adapterserve-headless:50051) spreads calls, and retries,
# over all of them (gRPC's default, pick_first, kept one connection to one pod, a draining one included).
# -1: replies as large as the server sends (its --max-message-mb decides); gRPC's 4 MiB default refused pages and
# replies the server had checked against its own 16 MB, with no reason the pager could act on
READ_ONLY = [{"service": "adapterserve.v1.InferenceService"}, {"service": "adapterserve.v1.ServerService"},
             {"service": "adapterserve.v1.AdapterService", "method": "ListAdapters"},
             {"service": "adapterserve.v1.AdapterService", "method": "GetAdapter"}]
CHANNEL_OPTIONS = [("grpc.max_receive_message_length", -1), ("grpc.enable_retries", 1),
                   ("grpc.service_config", json.dumps({"loadBalancingConfig": [{"round_robin": {}}], "methodConfig": [
                       {"name": READ_ONLY, "retryPolicy": _retried(["UNAVAILABLE", "CANCELLED"])},
                       # the rest of AdapterService: a method's own entry above wins over its service's
                       {"name": [{"service": "adapterserve.v1.AdapterService"}],
                        "retryPolicy": _retried(["UNAVAILABLE"])}]}))]
# Listings come in pages of up to this many (the server's largest): one reply of everything broke gRPC's message
# limit once there were enough adapters. A page over the limit (REPLY_TOO_LARGE: heads with many labels) is asked
# for again at half the size. A server without paging answers everything at once, with no next token.
LIST_PAGE_SIZE = 1000


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


def _adapter_header(adapter: str | None) -> tuple[tuple[str, str], ...]:
    """x-adapter-id, for proxies that hash on it (deploy/envoy): the server checks it equals the body's. Only a
    printable ASCII name fits a text header; another one travels in the body alone."""
    return (("x-adapter-id", adapter),) if adapter and adapter.isascii() and adapter.isprintable() else ()


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
class Call:
    """One RPC, built once for both clients: which stub and method, the request, how to read the reply."""

    stub: str
    method: str
    request: object
    convert: Callable
    metadata: tuple[tuple[str, str], ...] = ()  # sent besides the client's own (key, tenant)


class Pager:
    """Where a paged listing stands: the page to ask for next, and what came so far (for both clients)."""

    def __init__(self, page: Callable[[str, int], Call]):
        self.page, self.items, self.token, self.size, self.done = page, [], "", LIST_PAGE_SIZE, False

    def call(self) -> Call:
        return self.page(self.token, self.size)

    def took(self, items: list, next_token: str) -> None:
        self.items += items
        self.token, self.done = next_token, not next_token

    def shrunk(self, reason: str) -> bool:
        """Halves the page after one over the message limit; False when that cannot help (the error stands)."""
        if reason != "REPLY_TOO_LARGE" or self.size == 1:
            return False
        self.size //= 2
        return True


class Calls:
    """Request construction shared by `Client` and `AsyncClient`."""

    @staticmethod
    def classify(items: Inputs, adapter: str) -> Call:
        return Call("inference", "Classify", pb.ClassifyRequest(adapter_id=adapter, inputs=_inputs(items)),
                     lambda r: [_classification(c) for c in r.results], _adapter_header(adapter))

    @staticmethod
    def embed(items: Inputs, adapter: str | None) -> Call:
        return Call("inference", "Embed", pb.EmbedRequest(adapter_id=adapter or "", inputs=_inputs(items)),
                     lambda r: [list(e.values) for e in r.embeddings], _adapter_header(adapter))

    @staticmethod
    def tag(items: Inputs, adapter: str) -> Call:
        return Call("inference", "Tag", pb.TagRequest(adapter_id=adapter, inputs=_inputs(items)),
                     lambda r: [_tags(t) for t in r.results], _adapter_header(adapter))

    @staticmethod
    def load_adapter(source: str, name: str | None, tenant: str | None, pin: bool) -> Call:
        request = admin_pb.LoadAdapterRequest(source=str(source), name=name or "", tenant=tenant or "", pin=pin)
        return Call("admin", "LoadAdapter", request, lambda r: _info(r.adapter))

    @staticmethod
    def average_adapters(name: str, sources: Sequence[tuple[str, float]], tenant: str | None, combine_strategy: str,
                         svd_rank: int | None, overwrite_ok: bool, normalize_weights: bool) -> Call:
        if isinstance(sources, str) or not all(isinstance(s, (list, tuple)) and len(s) == 2 for s in sources):
            raise TypeError(f"sources must be a list of (adapter, weight) pairs, got {sources!r}")
        request = admin_pb.AverageAdaptersRequest(
            name=name, sources=[admin_pb.WeightedAdapter(name=n, weight=w) for n, w in sources], tenant=tenant or "",
            combine_strategy=combine_strategy, svd_rank=svd_rank or 0, overwrite_ok=overwrite_ok,
            weights_as_given=not normalize_weights)
        return Call("admin", "AverageAdapters", request, lambda r: _info(r.adapter))

    @staticmethod
    def unload_adapter(name: str, tenant: str | None) -> Call:
        return Call("admin", "UnloadAdapter", admin_pb.UnloadAdapterRequest(name=name, tenant=tenant or ""),
                     lambda r: None)

    @staticmethod
    def list_adapters(tenant: str | None, page_token: str, page_size: int) -> Call:
        """One page: ([AdapterInfo], next_page_token); the clients ask until the token is empty."""
        request = admin_pb.ListAdaptersRequest(tenant=tenant or "", page_size=page_size, page_token=page_token)
        return Call("admin", "ListAdapters", request, lambda r: ([_info(a) for a in r.adapters], r.next_page_token))

    @staticmethod
    def catalog(page_token: str, page_size: int) -> Call:
        """One page: ([CatalogEntry], next_page_token)."""
        request = admin_pb.ListAdaptersRequest(include_catalog=True, omit_adapters=True, page_size=page_size,
                                               page_token=page_token)
        return Call("admin", "ListAdapters", request,
                     lambda r: ([_catalog_entry(e) for e in r.catalog], r.next_page_token))

    @staticmethod
    def get_adapter(name: str, tenant: str | None) -> Call:
        return Call("admin", "GetAdapter", admin_pb.GetAdapterRequest(name=name, tenant=tenant or ""),
                     lambda r: _info(r.adapter))

    @staticmethod
    def server_info() -> Call:
        return Call("server", "GetServerInfo", admin_pb.GetServerInfoRequest(), _server_info)

"""AdapterService (admin keys) and ServerService (any key): runtime adapter management and server info.

Loads run in a worker thread, so reading and validating a large adapter never blocks the event loop or
the engine loop; the engine makes the new adapter visible atomically when it is ready.
"""
import asyncio
import functools
import platform
import time
from importlib import metadata

from adapterserve.v1 import adapter_service_pb2 as pb
from adapterserve.v1 import adapter_service_pb2_grpc as pb_grpc

from engine.engine import Engine
from engine.errors import InvalidRequest, PermissionDenied
from engine.scheduler import SchedulerConfig
from engine.service import paging
from engine.service.auth import Authenticator, Role
from engine.service.convert import adapter_pb, catalog_entry_pb
from engine.service.metrics import Metrics
from engine.service.rpc import RpcContext, Servicer, rpc
from engine.service.threads import ThreadSlots, start_thread
from engine.types import AdapterInfo


# LoadAdapter and AverageAdapters calls on threads at once: in all, by tenant keys together (operators keep the
# rest, whatever tenants' downloads hang), and by one tenant
MAX_LOADS, MAX_TENANT_LOADS, MAX_LOADS_PER_TENANT = 16, 12, 4


class AdapterServicer(Servicer, pb_grpc.AdapterServiceServicer):
    def __init__(self, engine: Engine, auth: Authenticator, metrics: Metrics, max_reply_bytes: int):
        super().__init__(auth, metrics, max_reply_bytes)
        self.engine = engine
        # each load reads on a thread of its own until it ends, also after its caller gave up: bounded, and per
        # tenant, so that one tenant's loads from a URL that never answers cannot pile up threads or take every
        # slot, nor can all tenants together take the operators' slots
        self._loads = ThreadSlots(MAX_LOADS, MAX_TENANT_LOADS, MAX_LOADS_PER_TENANT, "adapter loads", "tenant")

    @rpc(Role.ADMIN)
    async def LoadAdapter(self, request: pb.LoadAdapterRequest, ctx: RpcContext) -> pb.LoadAdapterResponse:
        load = asyncio.ensure_future(self._load(request, ctx))
        load.add_done_callback(functools.partial(self._count_load, time.perf_counter()))
        # shielded: a client that gives up cannot stop the load's thread, so the load is counted when it ends
        info = await asyncio.shield(load)
        return pb.LoadAdapterResponse(adapter=adapter_pb(info, ctx.principal.tenant))

    def _count_load(self, start: float, load: asyncio.Future) -> None:
        """Every call that passed auth is counted, refused requests included."""
        if load.cancelled() or load.exception() is not None:
            self.metrics.loads.labels("error").inc()
            return
        self.metrics.loads.labels("ok").inc()
        self.metrics.load_time.observe(time.perf_counter() - start)

    async def _load(self, request: pb.LoadAdapterRequest, ctx: RpcContext) -> AdapterInfo:
        if not request.source:
            raise InvalidRequest("source is required", "source")
        tenant = ctx.tenant(request.tenant)
        source = request.source
        if ctx.principal.tenant is not None:  # a tenant's admin must not make the server read its own file system
            if not _remote_source(source):
                raise PermissionDenied("tenant keys may load from the adapter store (store://), the hub (hf://, "
                                       f"org/name) or {', '.join(sorted(REMOTE_SCHEMES))} URLs, not from server paths "
                                       "or other filesystems")
            if "://" not in source:  # "org/name" is a hub id here, even where a server folder of that name exists
                source = "hf://" + source
        load = functools.partial(self.engine.load_adapter, source, request.name or None, tenant, request.pin)
        return await self._loads.submit(load, "adapter-load", ctx.principal.tenant)

    @rpc(Role.ADMIN)
    async def AverageAdapters(self, request: pb.AverageAdaptersRequest, ctx: RpcContext) -> pb.AverageAdaptersResponse:
        if not request.name:
            raise InvalidRequest("name is required", "name")
        tenant = ctx.tenant(request.tenant)  # a tenant key reads and writes its own tenant's adapters only
        names, weights = [s.name for s in request.sources], [s.weight for s in request.sources]
        average = functools.partial(self.engine.average_adapters, request.name, names, weights, tenant,
                                    request.combine_strategy or "linear", svd_rank=request.svd_rank or None,
                                    overwrite_ok=request.overwrite_ok, normalize_weights=not request.weights_as_given)
        info = await self._loads.submit(average, "adapter-average", ctx.principal.tenant)
        return pb.AverageAdaptersResponse(adapter=adapter_pb(info, ctx.principal.tenant))

    @rpc(Role.ADMIN)
    async def UnloadAdapter(self, request: pb.UnloadAdapterRequest, ctx: RpcContext) -> pb.UnloadAdapterResponse:
        if not request.name:
            raise InvalidRequest("name is required", "name")
        unload = functools.partial(self.engine.unload_adapter, request.name, ctx.tenant(request.tenant))
        await start_thread(unload, "adapter-unload")
        return pb.UnloadAdapterResponse()

    @rpc(Role.ADMIN, smaller=paging.smaller_pages)
    async def ListAdapters(self, request: pb.ListAdaptersRequest, ctx: RpcContext) -> pb.ListAdaptersResponse:
        if request.omit_adapters and not request.include_catalog:  # a listing of nothing: surely not what was meant
            raise InvalidRequest("omit_adapters lists the catalog alone and needs include_catalog", "omit_adapters")
        tenant = ctx.tenant(request.tenant)
        size = paging.page_size(request.page_size)
        cursor = paging.read_token(request.page_token, [tenant, request.include_catalog, request.omit_adapters])
        adapters = [] if request.omit_adapters else self.engine.list_adapters(tenant)
        adapters, adapters_after, more = paging.cut(adapters, _adapter_key, cursor.adapters_after, size)
        catalog, catalog_after = [], cursor.catalog_after
        if request.include_catalog:
            catalog, catalog_after, more_catalog = paging.cut(self.engine.catalog(), lambda e: [e.name],
                                                              cursor.catalog_after, size)
            more = more or more_catalog
        response = pb.ListAdaptersResponse(adapters=[adapter_pb(i, ctx.principal.tenant) for i in adapters],
                                           catalog=[catalog_entry_pb(e) for e in catalog])
        if more:
            response.next_page_token = paging.write_token(paging.Cursor(cursor.listing, adapters_after, catalog_after))
        return response  # checked against the message limit by `rpc`, which asks for `paging.smaller_pages`

    @rpc(Role.ADMIN)
    async def GetAdapter(self, request: pb.GetAdapterRequest, ctx: RpcContext) -> pb.GetAdapterResponse:
        if not request.name:
            raise InvalidRequest("name is required", "name")
        info = self.engine.get_adapter(request.name, ctx.tenant(request.tenant))
        return pb.GetAdapterResponse(adapter=adapter_pb(info, ctx.principal.tenant))


class ServerServicer(Servicer, pb_grpc.ServerServiceServicer):
    def __init__(self, engine: Engine, scheduler_config: SchedulerConfig, auth: Authenticator, metrics: Metrics,
                 max_reply_bytes: int):
        super().__init__(auth, metrics, max_reply_bytes)
        self.engine, self.scheduler_config = engine, scheduler_config

    @rpc(Role.INFERENCE)
    async def GetServerInfo(self, request: pb.GetServerInfoRequest, ctx: RpcContext) -> pb.GetServerInfoResponse:
        e = self.engine
        return pb.GetServerInfoResponse(
            base_model=e.config.model, model_type=e.info.model_type, dtype=str(e.dtype).removeprefix("torch."),
            device=str(e.device), hidden_size=e.info.hidden_size, max_seq_len=e.max_seq_len,
            max_batch_rows=self.scheduler_config.max_batch_rows,
            max_batch_tokens=self.scheduler_config.max_batch_tokens,
            max_inputs_per_request=self.scheduler_config.max_batch_rows,
            max_device_adapters=e.config.max_device_adapters, auth_enabled=self.auth.enabled,
            versions=versions(), pooling=e.pooling.value)


def _adapter_key(info: AdapterInfo) -> paging.Key:
    return [info.tenant or "", info.name]  # shared adapters ("") first


# Network filesystems a tenant key may load from. A list of those allowed, not of those refused: fsspec reaches the
# server's own files through many protocols besides file:// (local://, and chains such as simplecache::file://
# or zip://x::file://, which loaded server files for a tenant admin: found by a probe), and others are in-process
# (memory://)
REMOTE_SCHEMES = frozenset({"http", "https", "s3", "s3a", "gs", "gcs", "az", "abfs", "abfss"})


def _remote_source(source: str) -> bool:
    """store://, hf://, org/name hub ids and URLs of a network filesystem; no local path, no other protocol, and no
    fsspec chain ("::", whose later links may be local)."""
    scheme, sep, _ = source.partition("://")
    if sep:
        return "::" not in source and scheme in REMOTE_SCHEMES | {"store", "hf"}
    return not source.startswith((".", "/", "~")) and source.count("/") == 1


def versions() -> dict[str, str]:
    found = {"python": platform.python_version()}
    for package in ("adapterserve", "torch", "transformers", "grpcio", "protobuf", "triton"):
        try:
            found[package] = metadata.version(package)
        except metadata.PackageNotFoundError:
            continue
    return found

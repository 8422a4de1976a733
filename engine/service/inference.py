"""InferenceService: admission (adapter lookup, tokenising, limits), then wait for the engine loop."""
import asyncio
from concurrent.futures import ThreadPoolExecutor

from adapterserve.v1 import inference_service_pb2 as pb
from adapterserve.v1 import inference_service_pb2_grpc as pb_grpc

from engine.engine import Engine
from engine.errors import AdapterNotFound, InvalidRequest, NotImplementedYet, ShuttingDown
from engine.loop import RequestOutput
from engine.names import check_tenant
from engine.scheduler import Request, Scheduler, Task, split_rows
from engine.service.auth import Authenticator, Role
from engine.service.convert import classification_pb, token_tags_pb
from engine.service.metrics import Metrics
from engine.service.on_demand import OnDemandLoader
from engine.service.rpc import RpcContext, Servicer, rpc
from engine.text import (CLASSIFY_HEADS, TAG_HEADS, EncodedRow, check_text, classifications, encode_ids, require_head,
                         token_tags, tokenize)
from engine.types import AdapterInfo


class InferenceServicer(Servicer, pb_grpc.InferenceServiceServicer):
    def __init__(self, engine: Engine, scheduler: Scheduler, auth: Authenticator, metrics: Metrics,
                 max_reply_bytes: int, on_demand: OnDemandLoader | None = None):
        super().__init__(auth, metrics, max_reply_bytes)
        self.engine, self.scheduler, self.on_demand = engine, scheduler, on_demand
        self.draining = False
        # Tokenising runs here, off the event loop: a request of 64 long texts held it ~3 s, and health checks with
        # it (readiness failed under load). One thread: a fast tokenizer set to truncate is borrowed mutably per
        # call, and two threads in it at once raise "Already borrowed".
        self._tokenizing = ThreadPoolExecutor(max_workers=1, thread_name_prefix="tokenize")

    @rpc(Role.INFERENCE)
    async def Classify(self, request: pb.ClassifyRequest, ctx: RpcContext) -> pb.ClassifyResponse:
        self._check_count(request.inputs)
        adapter, tenant = self._adapter(request.adapter_id, ctx, required=True)
        require_head(adapter, (await self._lookup(adapter, tenant)).head_type, CLASSIFY_HEADS, "Classify")
        _, output = await self._submit(Task.CLASSIFY, request.inputs, adapter, tenant, ctx)
        results = classifications(output.logits, output.heads, adapter, "Classify")
        return pb.ClassifyResponse(results=[classification_pb(c) for c in results], request_id=ctx.request_id)

    @rpc(Role.INFERENCE)
    async def Embed(self, request: pb.EmbedRequest, ctx: RpcContext) -> pb.EmbedResponse:
        self._check_count(request.inputs)
        adapter, tenant = self._adapter(request.adapter_id, ctx, required=False)
        if adapter:
            await self._lookup(adapter, tenant)
        _, output = await self._submit(Task.EMBED, request.inputs, adapter, tenant, ctx)
        return pb.EmbedResponse(embeddings=[pb.Embedding(values=row) for row in output.embeddings.float().tolist()],
                                request_id=ctx.request_id)

    @rpc(Role.INFERENCE)
    async def Tag(self, request: pb.TagRequest, ctx: RpcContext) -> pb.TagResponse:
        self._check_count(request.inputs)
        adapter, tenant = self._adapter(request.adapter_id, ctx, required=True)
        require_head(adapter, (await self._lookup(adapter, tenant)).head_type, TAG_HEADS, "Tag")
        rows, output = await self._submit(Task.TAG, request.inputs, adapter, tenant, ctx)
        tags = token_tags(output.logits, output.heads, rows, self.engine.tokenizer, adapter, "Tag")
        return pb.TagResponse(results=[token_tags_pb(t) for t in tags], request_id=ctx.request_id)

    @rpc(Role.INFERENCE)
    async def GenerateStream(self, request: pb.GenerateStreamRequest, ctx: RpcContext):
        kind = "a decoder" if self.engine.info.is_decoder else f"an encoder ({self.engine.info.model_type})"
        raise NotImplementedYet(f"text generation is not implemented yet; the base model is {kind}")
        yield pb.GenerateStreamResponse()  # unreachable: makes this an async generator (a server-streaming RPC)

    def _adapter(self, body: str, ctx: RpcContext, required: bool) -> tuple[str | None, str | None]:
        """The adapter from the body or `x-adapter-id` metadata (equal if both), and the caller's tenant."""
        header = ctx.metadata.get("x-adapter-id", "")
        if body and header and body != header:
            raise InvalidRequest(f"adapter_id {body!r} differs from x-adapter-id metadata {header!r}", "adapter_id")
        adapter = body or header or None
        if required and adapter is None:
            raise InvalidRequest("adapter_id is required (body or x-adapter-id metadata)", "adapter_id")
        return adapter, ctx.tenant()

    async def _lookup(self, adapter: str, tenant: str | None) -> AdapterInfo:
        """The adapter as the caller's tenant sees it, loaded from the store first if it is not loaded and the
        server loads on demand; counted per adapter only once found (unknown ids must not take the bounded
        per-adapter label set)."""
        try:
            info = self.engine.registry.lookup(adapter, tenant)
        except AdapterNotFound as missing:
            if self.on_demand is None:
                raise
            check_tenant(tenant)  # what would refuse the request anyway refuses it before a load, not after
            self._refuse_if_draining()
            info = await self.on_demand.lookup(adapter, tenant, missing)
        self.metrics.count_adapter(info.name, info.tenant)
        return info

    async def _submit(self, task: Task, inputs, adapter, tenant,
                      ctx: RpcContext) -> tuple[list[EncodedRow], RequestOutput]:
        """Queues the request, in parts when it exceeds one forward's token budget, and waits for all of them."""
        self._refuse_if_draining()
        text_limit = self.engine.embed_max_len if task is Task.EMBED else self.engine.max_seq_len
        rows = await asyncio.get_running_loop().run_in_executor(self._tokenizing, self._encode, inputs, text_limit)
        budget = self.scheduler.config.max_batch_tokens
        for i, row in enumerate(rows):
            if len(row.ids) > budget:  # a part of its own would not fit one forward either
                raise InvalidRequest(f"inputs[{i}] has {len(row.ids)} tokens, over the {budget} of one forward "
                                     "(the server's --max-batch-tokens)", f"inputs[{i}]")
        parts = [Request(task, tenant, adapter, part, ctx.deadline(), ctx.request_id)
                 for part in split_rows(rows, self.scheduler.config.max_batch_rows, budget)]
        try:
            self.scheduler.add_parts(parts)
            self.metrics.waiting.set(self.scheduler.num_waiting)
            outputs = await asyncio.gather(*(asyncio.wrap_future(part.future) for part in parts))
            return rows, RequestOutput.concat(list(outputs))
        except BaseException:
            for part in parts:
                part.future.cancel()  # still queued: the scheduler drops it before compute
            raise

    def _refuse_if_draining(self) -> None:
        if self.draining:
            raise ShuttingDown("the server is draining; retry on another replica")

    def _check_count(self, inputs) -> None:
        """First of all: a request refused anyway must not load its adapter on first use."""
        if not inputs:
            raise InvalidRequest("inputs must not be empty", "inputs")
        most = self.scheduler.config.max_batch_rows  # the advertised max_inputs_per_request; over the token budget
        if len(inputs) > most:  # a request is split, over this count it is refused (TEI's max client batch size)
            raise InvalidRequest(f"{len(inputs)} inputs exceed the limit of {most} per request", "inputs")

    def _encode(self, inputs, text_limit: int) -> list[EncodedRow]:
        """Checks every input (their count was checked first), then tokenises all texts of the request in one
        tokenizer call, cutting them at ``text_limit`` tokens; token ids may hold up to max_seq_len."""
        limit, vocab = self.engine.max_seq_len, self.engine.model_config.vocab_size
        rows: list[EncodedRow | None] = []
        texts, text_rows = [], []
        for i, item in enumerate(inputs):
            kind = item.WhichOneof("content")
            if kind == "text":
                check_text(item.text, f"inputs[{i}].text")
                texts.append(item.text)
                text_rows.append(len(rows))
                rows.append(None)
            elif kind == "token_ids":
                rows.append(encode_ids(list(item.token_ids.ids), vocab, limit, f"inputs[{i}].token_ids"))
            else:
                raise InvalidRequest(f"inputs[{i}] has neither text nor token_ids", f"inputs[{i}]")
        if texts:
            fields = [f"inputs[{position}].text" for position in text_rows]
            for position, row in zip(text_rows, tokenize(self.engine.tokenizer, texts, text_limit, fields)):
                rows[position] = row
        return rows

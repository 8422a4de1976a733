"""`Engine`: the in-process API. One resident base model; every row of a batch may use its own adapter.

The gRPC service wraps exactly these methods. Loading validates the whole adapter before anything
is visible; a forward admits its rows' adapters (acquire, bring onto the device, batch metadata), runs
ONE pass over the model and releases them. Adapter lifecycle and what blocks what:
`engine.adapters.lifecycle`.
"""
import logging
from pathlib import Path

import torch

from engine.adapters.files import TargetModel
from engine.adapters.lifecycle import AdapterLifecycle
from engine.adapters.pool import AdapterPool
from engine.allocator import keep_freed_memory
from engine.batch import AdapterBatch
from engine.config import EngineConfig
from engine.errors import InvalidRequest
from engine.model.heads import apply_heads, head_token_index, pool
from engine.model.sites import BottleneckSite, name_sites
from engine.model.weights import load_base_model
from engine.resolve import default_pooling, resolve_device, resolve_model, sentence_max_tokens
from engine.text import CLASSIFY_HEADS, TAG_HEADS, classifications, encode_texts, pad_rows, require_head, token_tags
from engine.types import AdapterInfo, CatalogEntry, Classification, ForwardOutput, RowHead, TokenTag

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}

log = logging.getLogger("adapterserve.engine")


class Engine:
    def __init__(self, config: EngineConfig):
        if config.num_threads is not None:
            torch.set_num_threads(config.num_threads)
        self.config = config
        self.device = resolve_device(config.device)
        if config.keep_freed_memory and self.device.type == "cpu":
            keep_freed_memory()
        dtype = DTYPES[config.dtype] if config.dtype else None
        self.model, self.model_config, self.model_dir = load_base_model(resolve_model(config.model), dtype, self.device)
        self.dtype = next(self.model.parameters()).dtype
        self.info = self.model.info
        sites = name_sites(self.model)
        linear = {p: (m.in_features, m.out_features) for p, m in sites.items() if not isinstance(m, BottleneckSite)}
        junctions = [p for p, m in sites.items() if isinstance(m, BottleneckSite)]
        has_pooler = getattr(self.model, "pooler", None) is not None  # None: the checkpoint has no pooler.* weights
        self.target = TargetModel(self.info, linear, frozenset(junctions), has_pooler)
        self.pool = AdapterPool(linear, junctions, self.info.hidden_size, config.max_device_adapters, self.device, self.dtype)
        self.adapters = AdapterLifecycle(self.target, self.pool, config)
        self.registry = self.adapters.registry  # names and versions (the text API checks an adapter's head there first)
        pooling, normalize = default_pooling(self.model_dir, self.info.is_decoder)
        self.pooling = config.pooling or pooling
        self.normalize = normalize if config.normalize_embeddings is None else config.normalize_embeddings
        self.max_seq_len = config.max_seq_len or self.model.max_tokens
        if self.max_seq_len > self.model.max_tokens:  # past the position table: IndexError in the embeddings
            raise ValueError(f"max_seq_len {self.max_seq_len} exceeds the {self.model.max_tokens} tokens a row of "
                             f"this {self.info.model_type} model holds")
        # texts to embed are cut where sentence-transformers cuts them (TEI too), other tasks' at max_seq_len
        self.embed_max_len = min(sentence_max_tokens(self.model_dir) or self.max_seq_len, self.max_seq_len)
        self._tokenizer, self.tokenizer_problem = _load_tokenizer(self.model_dir)  # problem: None, or why not

    @classmethod
    def from_pretrained(cls, model: str | Path | None = None, device: str = "auto", dtype: str | None = None,
                        config: EngineConfig | None = None) -> "Engine":
        base = config or EngineConfig()
        overrides = {"device": device, "dtype": dtype} | ({"model": str(model)} if model is not None else {})
        return cls(EngineConfig(**{**base.__dict__, **overrides}))

    @property
    def tokenizer(self):
        """The base model folder's tokenizer; a base without one serves token ids only."""
        if self._tokenizer is None:
            raise InvalidRequest(f"the base model has no tokenizer ({self.tokenizer_problem}): texts cannot be "
                                 "tokenised nor tags named; Classify and Embed take token ids",
                                 "inputs")
        return self._tokenizer

    @property
    def pad_token_id(self) -> int:
        """The id padding is written with: the config's, else the tokenizer's, else 0, and always an id of the
        vocabulary. A config pad of -1 (some converted LLaMA checkpoints carry it) made the engine's own padding
        fail its id check: every call with texts of different lengths, and the server's warm-up, were refused."""
        vocab = self.model_config.vocab_size
        pad = getattr(self.model_config, "pad_token_id", None)
        if not (isinstance(pad, int) and 0 <= pad < vocab):
            pad = self._tokenizer.pad_token_id if self._tokenizer is not None else None
        return pad if isinstance(pad, int) and 0 <= pad < vocab else 0

    # ---- adapters -------------------------------------------------------------------------------
    def load_adapter(self, source: str | Path, name: str | None = None, tenant: str | None = None,
                     pin: bool = False, overwrite_ok: bool = True) -> AdapterInfo:
        """Fetches, validates and registers an adapter; re-loading a name swaps to the new version
        atomically (in-flight rows finish on the old one), or, without ``overwrite_ok``, raises
        AdapterNameTaken. ``source``: a folder, ``store://<path>``, ``org/name[@revision]`` (Hugging Face),
        or an fsspec URL (`engine.adapters.sources`). A pinned adapter is placed on the device now and never
        evicted."""
        return self.adapters.load(source, name, tenant, pin, overwrite_ok)

    def unload_adapter(self, name: str, tenant: str | None = None) -> None:
        """New requests get AdapterNotFound at once; memory is freed when in-flight rows are done."""
        self.adapters.unload(name, tenant)

    def list_adapters(self, tenant: str | None = None) -> list[AdapterInfo]:
        """Adapters visible to ``tenant`` (its own and shared); every adapter when tenant is None."""
        return self.adapters.infos(tenant)

    def get_adapter(self, name: str, tenant: str | None = None) -> AdapterInfo:
        return self.adapters.get(name, tenant)

    def catalog(self, base_model: str | None = None, method: str | None = None) -> list[CatalogEntry]:
        """The adapter store's folders (empty without ``adapter_store``), by base model name or type and method."""
        return self.adapters.catalog(base_model, method)

    def average_adapters(self, name: str, sources: list[str], weights: list[float], tenant: str | None = None,
                         combine_strategy: str = "linear", *, svd_rank: int | None = None,
                         overwrite_ok: bool = False, normalize_weights: bool = True) -> AdapterInfo:
        """A new adapter, the weighted average of loaded ones (the `adapters` library's `average_adapter`):
        combine_strategy "linear", "lora_linear_only_negate_b" or "lora_delta_w_svd" (needs svd_rank). The
        weights are normalised to sum to 1 unless ``normalize_weights`` is False (then [1, 1] is the sum of two
        adapters' weights, [1, -1] their difference). Like the library, it refuses a name already loaded (for this
        tenant) unless ``overwrite_ok``, which hot-swaps it as a re-load does."""
        return self.adapters.average(name, sources, weights, tenant, combine_strategy, svd_rank, overwrite_ok,
                                     normalize_weights)

    def adapters_ready(self, adapters: list[str | None], tenant: str | None | list[str | None] = None,
                       since: float | None = None) -> bool:
        """True when every named adapter can be served without reading files; otherwise starts bringing the
        missing ones in from their sources and returns False. A scheduler can hold such requests and
        schedule others, so nobody waits for the read; `forward` would wait for it. Raises `AdapterNotFound`
        for an unknown name, and the read's error when an adapter's last read failed (it is read again);
        with ``since`` (the request's time.monotonic() when queued), only that of a read begun since then: an
        older failure is read again first, so the first request after a source is back is served."""
        return self.adapters.ready(adapters, self._row_tenants(adapters, tenant), since)

    # ---- inference ------------------------------------------------------------------------------
    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, adapters: list[str | None],
                token_type_ids: torch.Tensor | None = None,
                tenant: str | None | list[str | None] = None) -> ForwardOutput:
        """One pass for the whole batch; ``adapters[b]`` names row b's adapter (None = base model).

        ``tenant`` is the caller's tenant for every row, or one tenant per row (a server batch mixes tenants).
        Adapters not on the device are brought in first, evicting idle ones (`AdapterCapacityExceeded` when
        every slot is in use or pinned); for those only at their source, this waits for their own read.
        """
        self._check_batch(input_ids, attention_mask, adapters, token_type_ids)
        with self.adapters.admit(adapters, self._row_tenants(adapters, tenant)) as batch:
            return self._run(input_ids, attention_mask, token_type_ids, batch.meta, batch.row_slots, batch.heads)

    def classify(self, texts: list[str], adapter: str, tenant: str | None = None) -> list[Classification]:
        """Labels and scores from the adapter's (multi-label) classification head."""
        require_head(adapter, self.registry.lookup(adapter, tenant).head_type, CLASSIFY_HEADS, "classify")
        return [c for out, _ in self._forward_texts(texts, adapter, tenant)
                for c in classifications(out.logits, out.heads, adapter, "classify")]

    def tag(self, texts: list[str], adapter: str, tenant: str | None = None) -> list[list[TokenTag]]:
        """One label per token (special tokens skipped), with character offsets into the text."""
        require_head(adapter, self.registry.lookup(adapter, tenant).head_type, TAG_HEADS, "tag")
        return [t for out, rows in self._forward_texts(texts, adapter, tenant)
                for t in token_tags(out.logits, out.heads, rows, self.tokenizer, adapter, "tag")]

    def embed(self, texts: list[str], adapter: str | None = None, tenant: str | None = None) -> torch.Tensor:
        """[n, H] sentence embeddings (the engine's pooling), through the adapter if one is named; texts are cut at
        ``embed_max_len`` tokens (the model folder's sentence-transformers max_seq_length, else max_seq_len)."""
        return torch.cat([out.embeddings for out, _ in self._forward_texts(texts, adapter, tenant,
                                                                           self.embed_max_len)])

    def _forward_texts(self, texts: list[str], adapter: str | None, tenant: str | None, limit: int | None = None):
        """Tokenises (cut at ``limit`` tokens, default max_seq_len), then runs chunks of at most max_batch_rows rows,
        all on the adapter version current at the start (a re-load meanwhile serves later calls): [(output, rows)]
        per chunk."""
        rows = encode_texts(self.tokenizer, texts, limit or self.max_seq_len)
        step, results = self.config.max_batch_rows, []
        with self.adapters.acquired([adapter], [tenant]) as version:
            for i in range(0, len(rows), step):
                chunk = rows[i:i + step]
                ids, mask, types = pad_rows(chunk, self.pad_token_id, not self.info.is_decoder)
                self._check_batch(ids, mask, [adapter] * len(chunk), types)
                batch = self.adapters.place(version * len(chunk))
                results.append((self._run(ids, mask, types, batch.meta, batch.row_slots, batch.heads), chunk))
        return results

    def _model_pass(self, input_ids, attention_mask, token_type_ids, meta: AdapterBatch | None) -> torch.Tensor:
        """The base model over the batch in the batcher's row order; hidden states back in the caller's order."""
        if meta is None or meta.order is None:
            return self.model(input_ids, attention_mask, token_type_ids, meta)
        order = meta.order
        types = token_type_ids.index_select(0, order) if token_type_ids is not None else None
        hidden = self.model(input_ids.index_select(0, order), attention_mask.index_select(0, order), types, meta)
        return hidden.index_select(0, meta.inverse)

    def _run(self, input_ids, attention_mask, token_type_ids, meta: AdapterBatch | None, row_slots, heads):
        d = self.device
        input_ids, attention_mask = input_ids.to(d), attention_mask.to(d)
        token_type_ids = token_type_ids.to(d) if token_type_ids is not None else None
        with torch.inference_mode():
            hidden = self._model_pass(input_ids, attention_mask, token_type_ids, meta)
            embeddings = pool(hidden, attention_mask, self.pooling, self.normalize)
            logits = (None,) * len(row_slots)
            if heads:
                if self.info.is_decoder:
                    pad = getattr(self.model_config, "pad_token_id", None)
                    token = head_token_index(input_ids, attention_mask, pad)
                    summary = hidden[torch.arange(hidden.shape[0], device=d), token]
                else:
                    summary = hidden[:, 0]
                needs_pooler = any(h.use_pooler for h in heads.values())
                pooled = self.model.pooler(hidden) if needs_pooler and self.model.pooler is not None else None
                logits = apply_heads(heads, row_slots, hidden, summary, pooled)
        row_heads = tuple(RowHead(heads[s].head_type.value, heads[s].labels) if s in heads else None
                          for s in row_slots)
        return ForwardOutput(hidden, embeddings, logits, row_heads)

    @staticmethod
    def _row_tenants(adapters: list[str | None], tenant: str | None | list[str | None]) -> list[str | None]:
        if not isinstance(tenant, list):
            return [tenant] * len(adapters)
        if len(tenant) != len(adapters):
            raise InvalidRequest(f"tenant names {len(tenant)} rows, the batch has {len(adapters)}", "tenant")
        return tenant

    def _check_batch(self, input_ids, attention_mask, adapters, token_type_ids) -> None:
        for field, value in (("input_ids", input_ids), ("attention_mask", attention_mask),
                             ("token_type_ids", token_type_ids)):
            if value is None and field == "token_type_ids":
                continue
            if not isinstance(value, torch.Tensor):
                raise InvalidRequest(f"{field} must be a torch tensor, got {type(value).__name__}", field)
            if field != "attention_mask" and (value.is_floating_point() or value.is_complex()
                                              or value.dtype == torch.bool):
                raise InvalidRequest(f"{field} must hold integers, got {value.dtype}", field)
        if input_ids.dim() != 2 or attention_mask.shape != input_ids.shape:
            raise InvalidRequest(f"input_ids and attention_mask must both be [B, T], got {tuple(input_ids.shape)} and {tuple(attention_mask.shape)}")
        if token_type_ids is not None and token_type_ids.shape != input_ids.shape:
            raise InvalidRequest(f"token_type_ids must be [B, T] like input_ids, got {tuple(token_type_ids.shape)}")
        b, t = input_ids.shape
        if len(adapters) != b:
            raise InvalidRequest(f"adapters names {len(adapters)} rows, the batch has {b}")
        if b == 0 or b > self.config.max_batch_rows:
            raise InvalidRequest(f"batch size {b} is outside 1..{self.config.max_batch_rows}")
        if t == 0 or t > self.max_seq_len:
            raise InvalidRequest(f"sequence length {t} is outside 1..{self.max_seq_len}")
        if not bool(((attention_mask == 0) | (attention_mask == 1)).all()):  # pooling weighs tokens by the mask
            raise InvalidRequest("attention_mask must hold only 0 and 1", "attention_mask")
        if bool((attention_mask.sum(1) == 0).any()):
            raise InvalidRequest("every row needs at least one token with attention_mask 1")
        vocab = self.model_config.vocab_size
        if bool((input_ids < 0).any()) or bool((input_ids >= vocab).any()):
            raise InvalidRequest(f"input_ids must lie in 0..{vocab - 1}")
        types = getattr(self.model_config, "type_vocab_size", vocab)  # GPT-2 embeds token types with its vocabulary
        if token_type_ids is not None and (bool((token_type_ids < 0).any()) or bool((token_type_ids >= types).any())):
            raise InvalidRequest(f"token_type_ids must lie in 0..{types - 1}", "token_type_ids")


def _load_tokenizer(model_dir: Path):
    """(the model folder's tokenizer, None) or (None, why there is none), read at start: read on first use, a
    folder without one started, then its warm-up died with a traceback (GPT-2) or every text request failed
    INTERNAL (a probe)."""
    from transformers import AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(model_dir)
        if len(tokenizer) <= len(set(tokenizer.all_special_ids)):  # transformers 5 makes one without any files
            raise ValueError("the tokenizer it makes holds no vocabulary beyond its special tokens")
    except Exception as exc:  # transformers 4 raises TypeError, AttributeError, OSError... for missing files
        log.warning("no tokenizer in the model folder %s (%s: %s): only token ids can be served", model_dir,
                    type(exc).__name__, exc)
        return None, "its folder holds no tokenizer files that transformers can read"
    if tokenizer.pad_token_id is None:  # GPT-2 style tokenizers: pad (right) with EOS
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer, None

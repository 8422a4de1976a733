"""Public result and info types of the in-process API (the gRPC layer converts exactly these).

torch only for annotations: the client imports these types and must not need torch.
"""
from __future__ import annotations

from dataclasses import dataclass
from enum import Enum
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch


class Pooling(Enum):
    MEAN = "mean"  # masked mean over real tokens (sentence-transformers)
    CLS = "cls"  # first token
    LAST = "last"  # last real token (decoders)


@dataclass(frozen=True)
class AdapterInfo:
    name: str
    tenant: str | None  # None = shared with every tenant
    method: str  # "bottleneck" | "lora" | "ia3"
    source: str
    num_params: int
    head_type: str | None  # "classification" | "multilabel_classification" | "tagging" | None
    labels: tuple[str, ...]  # label names by index, empty without head
    slot: int  # device slot, -1 when not on the device
    tier: str = "device"  # where it is now: "device" (slot), "cpu" (host copy), "source" (read again on use)
    state: str = "ready"  # "ready"; "loading" while read back from its source; "failed" when that read failed
    pinned: bool = False  # kept on the device, never evicted


@dataclass(frozen=True)
class CatalogEntry:
    """One adapter folder of the adapter store (like an AdapterHub `list_adapters` entry)."""

    name: str  # path inside the store, e.g. "bert/sentiment"
    source: str  # what to pass to `Engine.load_adapter`: "store://<name>"
    format: str  # "adapterhub" | "peft"
    method: str  # "bottleneck" | "lora" | "ia3", or the saved architecture of methods not served yet
    base_model: str | None  # the model name it was saved from (model_name / base_model_name_or_path)
    model_type: str | None  # e.g. "bert"; None when the folder does not say (PEFT)
    head_type: str | None  # AdapterHub head saved beside it, if any
    size_bytes: int  # files in the folder


@dataclass(frozen=True)
class ServerInfo:
    """What a running server serves, and its limits (`Client.server_info`, `adapterserve info`)."""

    base_model: str
    model_type: str  # e.g. "bert"
    dtype: str  # "float32", ...
    device: str
    hidden_size: int
    max_seq_len: int  # tokens of one input
    max_batch_rows: int  # rows of one forward
    max_batch_tokens: int  # rows x padded length of one forward; a larger request runs as several
    max_inputs_per_request: int
    max_device_adapters: int
    auth_enabled: bool
    pooling: str  # "mean", "cls" or "last"
    versions: dict[str, str]  # package -> version


@dataclass(frozen=True)
class RowHead:
    """The head of the adapter version that ran a row: a re-load may land between a caller's lookup of
    the adapter and its forward, so labels are read from here, never from an earlier lookup."""

    head_type: str  # "classification" | "multilabel_classification" | "tagging"
    labels: tuple[str, ...]  # index -> label name


@dataclass(frozen=True)
class ForwardOutput:
    last_hidden_state: torch.Tensor  # [B, T, H]
    embeddings: torch.Tensor  # [B, H] pooled per the engine's pooling (L2-normalised if configured)
    logits: tuple[torch.Tensor | None, ...]  # per row: [L] (classification), [T, L] (tagging), None without head
    heads: tuple[RowHead | None, ...]  # per row: the head its logits came from, None without head


@dataclass(frozen=True)
class Classification:
    label: str  # best label (classification) or the first label over 0.5 (multilabel; "" if none)
    scores: dict[str, float]  # softmax (classification), sigmoid (multilabel) or the raw value (one-label regression)
    labels: tuple[str, ...]  # multilabel: every label with score > 0.5; classification: (label,)


@dataclass(frozen=True)
class TokenTag:
    token: str
    start: int  # character offsets into the input text
    end: int
    label: str
    score: float

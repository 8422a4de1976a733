"""Per-batch adapter metadata passed explicitly through the model (punica style, no globals).

Built once per forward by `engine.batcher`; read by the adapter sites. Tensors named ``*_slots`` hold
one pool slot per row (int64, ``-1`` = no adapter of that kind at that site). Table tensors are the
pool's own stacks (never copied per batch).
"""
from dataclasses import dataclass
from enum import Enum
from typing import Mapping

import torch


class ResidualBeforeLN(Enum):
    """`BnConfig.residual_before_ln`: which tensor the adapter's residual connection takes."""

    TRUE = "true"  # the sublayer output h
    FALSE = "false"  # the adapter input (after the optional original LN)
    POST_ADD = "post_add"  # h + x, before the original LN


@dataclass(frozen=True)
class BottleneckVariant:
    """The config fields that change the control flow around a bottleneck; one code path each."""

    is_parallel: bool
    original_ln_before: bool
    original_ln_after: bool
    residual_before_ln: ResidualBeforeLN
    adapter_residual_before_ln: bool
    ln_before: bool
    ln_after: bool


@dataclass(frozen=True)
class LoraTables:
    lora_a: torch.Tensor  # [S, R, K]
    lora_b: torch.Tensor  # [S, N, R]
    scaling: torch.Tensor  # [S] float32
    ranks: torch.Tensor  # [S] int32


@dataclass(frozen=True)
class BottleneckTables:
    w_down: torch.Tensor  # [S, H, R]
    b_down: torch.Tensor  # [S, R]
    w_up: torch.Tensor  # [S, R, H]
    b_up: torch.Tensor  # [S, H]
    scaling: torch.Tensor  # [S, H]
    act_ids: torch.Tensor  # [S] int32
    ranks: torch.Tensor  # [S] int32
    ln_before_weight: torch.Tensor  # [S, H] (ones where unused)
    ln_before_bias: torch.Tensor  # [S, H]
    ln_after_weight: torch.Tensor  # [S, H]
    ln_after_bias: torch.Tensor  # [S, H]


@dataclass(frozen=True)
class LinearSiteBatch:
    """Adapter terms of one linear layer for this batch; a None table means no row uses it."""

    lora: LoraTables | None
    lora_slots: torch.Tensor | None  # [B]
    ia3_out: torch.Tensor | None  # [S, N] scales the layer output (bias included)
    ia3_out_slots: torch.Tensor | None  # [B]
    ia3_in: torch.Tensor | None  # [S, K] scales the layer input (PEFT feed-forward IA3)
    ia3_in_slots: torch.Tensor | None  # [B]


@dataclass(frozen=True)
class BottleneckGroup:
    """Rows of one variant at one site."""

    variant: BottleneckVariant
    rows: torch.Tensor | None  # [g] row indices into the batch; None = every row of the batch
    slots: torch.Tensor  # [g] their slots (all >= 0)


@dataclass(frozen=True)
class BottleneckSiteBatch:
    tables: BottleneckTables
    groups: tuple[BottleneckGroup, ...]
    plain_rows: torch.Tensor | None  # [p] rows without an adapter here; None when there are none


@dataclass(frozen=True)
class AdapterBatch:
    row_slots: torch.Tensor  # [B] int64 pool slot of each row's adapter, -1 for none
    linear: Mapping[str, LinearSiteBatch]  # site path -> terms; absent path = no adapter rows
    bottleneck: Mapping[str, BottleneckSiteBatch]

    @staticmethod
    def empty(batch_size: int, device: torch.device) -> "AdapterBatch":
        return AdapterBatch(torch.full((batch_size,), -1, dtype=torch.long, device=device), {}, {})

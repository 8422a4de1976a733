"""Per-batch adapter metadata passed explicitly through the model (punica style, no globals).

Built once per forward by `engine.batcher`; read by the adapter sites. The batcher sorts the rows so
that rows sharing a method (and a rank bucket, activation or variant) are neighbours: each site then
works on contiguous row slices (views, no copies). ``rows`` fields are such a slice, or an index tensor
when a site's rows are not contiguous (say, Houlsby rows among Pfeiffer rows at the attention junction,
or an adapter that leaves this layer out). Tensors named ``*_slots`` hold the pool slot of each of those
rows. Table tensors are the pool's own stacks (never copied per batch).
"""
from dataclasses import dataclass
from enum import Enum
from typing import Mapping

import torch

Rows = slice | torch.Tensor  # a contiguous row range, or row indices [n] (int64)


class ResidualBeforeLN(Enum):
    """`BnConfig.residual_before_ln`: which tensor the adapter's residual connection takes."""

    TRUE = "true"  # the sublayer output h
    FALSE = "false"  # the adapter input (after the optional original LN)
    POST_ADD = "post_add"  # h + x, before the original LN


class Source(Enum):
    """The adapter input of a variant whose junction reduces to ``ln(h + x + f(t))``."""

    PLAIN = "plain"  # ln(h + x): original_ln_before (Pfeiffer, seq_bn)
    OUTPUT = "output"  # h, the sublayer output (Houlsby, double_seq_bn)
    INPUT = "input"  # x, the sublayer input (parallel adapters)


@dataclass(frozen=True)
class BottleneckVariant:
    """The config fields that change the control flow around a bottleneck."""

    is_parallel: bool
    original_ln_before: bool
    original_ln_after: bool
    residual_before_ln: ResidualBeforeLN
    adapter_residual_before_ln: bool
    ln_before: bool
    ln_after: bool

    @property
    def reads_plain(self) -> bool:
        """The adapter input is ln(h + x), the junction's plain output (original_ln_before, sequential)."""
        return self.original_ln_before and not self.is_parallel

    @property
    def fused_source(self) -> Source | None:
        """The adapter input t when the junction computes ``ln(h + x + f(t))``, None for other variants.

        That holds (see `engine.model.sites._apply_group`) when the original LN follows, no adapter LN
        is used and the adapter's residual is h: always for parallel adapters (out = f + h), and for
        sequential ones unless post_add or residual_before_ln=False after the original LN.
        """
        if self.ln_before or self.ln_after or not self.original_ln_after:
            return None
        if self.is_parallel:
            return Source.INPUT
        if not self.original_ln_before:
            return None if self.residual_before_ln == ResidualBeforeLN.POST_ADD else Source.OUTPUT
        return Source.PLAIN if self.residual_before_ln == ResidualBeforeLN.TRUE else None


@dataclass(frozen=True)
class LoraTables:
    lora_a: torch.Tensor  # [S, R, K]
    lora_b: torch.Tensor  # [S, R, N]
    scaling: torch.Tensor  # [S] float32
    ranks: torch.Tensor  # [S] int32


@dataclass(frozen=True)
class BottleneckTables:
    w_down: torch.Tensor  # [S, R, H]
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
class RowSet:
    """The rows of the batch that use one kind of term at one site, and their slots."""

    rows: Rows
    slots: torch.Tensor  # [n] int64 slot per row in ``rows`` (-1 only when rows is the whole batch)


@dataclass(frozen=True)
class LinearSiteBatch:
    """Adapter terms of one linear layer for this batch; None where no row uses that kind."""

    lora: LoraTables | None
    lora_rows: RowSet | None
    ia3_out: torch.Tensor | None  # [S, N] scales the layer output (bias included)
    ia3_out_rows: RowSet | None
    ia3_in: torch.Tensor | None  # [S, K] scales the layer input (PEFT feed-forward IA3)
    ia3_in_rows: RowSet | None


@dataclass(frozen=True)
class FusedBottleneck:
    """The rows of a site whose variants reduce to ``ln(h + x + f(t))``: one adapter body for all of them."""

    rows: Rows
    runs: tuple[tuple[Source, slice], ...]  # ``rows`` as contiguous batch ranges, in order, with their input
    slots: torch.Tensor  # [n] their slots


@dataclass(frozen=True)
class BottleneckGroup:
    """The rows of one other variant (adapter LayerNorms, post_add, ...) at one site: the general code path."""

    variant: BottleneckVariant
    rows: Rows
    slots: torch.Tensor  # [g] their slots


@dataclass(frozen=True)
class BottleneckSiteBatch:
    tables: BottleneckTables
    fused: FusedBottleneck | None
    groups: tuple[BottleneckGroup, ...]
    plain: slice | None  # the batch rows whose ln(h + x) an adapter reads as its input
    groups_cover_batch: bool  # every row is in a general group: no row needs the plain junction output


@dataclass(frozen=True)
class AdapterBatch:
    order: torch.Tensor | None  # [B] batch row -> original row (the sort); None = already in order
    inverse: torch.Tensor | None  # [B] original row -> batch row
    linear: Mapping[str, LinearSiteBatch]  # site path -> terms; absent path = no adapter rows
    bottleneck: Mapping[str, BottleneckSiteBatch]

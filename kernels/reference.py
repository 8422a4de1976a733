"""Torch reference implementations of the adapter ops: the CPU serving path and the test oracle.

Every op takes the batch as rows ``[B, T, ·]`` and one slot id per row (``row_slots``, int64, ``-1`` =
no adapter at this site). Slot tables are stacks over all slots of the pool, padded to the largest
rank with zeros, so an adapter's padding columns contribute exactly nothing. The Triton kernels in
this package have the same signatures; each public op's ``Semantics:`` lives in ``kernels/__init__``.

Why rows and not tokens: every token of a row uses that row's adapter, so gathering the weights once
per row (``[B, H, R]``) and running one ``bmm`` costs a few percent of the base layer, while a
per-token gather would copy ``T`` times more weight bytes.
"""
import torch

from .activations import Act, apply_act


def _active_rows(row_slots: torch.Tensor) -> torch.Tensor | None:
    """Indices of rows with an adapter, or None when every row has one (the common case: no copy)."""
    active = row_slots >= 0
    if bool(active.all()):
        return None
    return active.nonzero().squeeze(1)


def add_lora(
    y: torch.Tensor,  # [B, T, N] base layer output, updated in place
    x: torch.Tensor,  # [B, T, K] base layer input
    lora_a: torch.Tensor,  # [S, R, K]
    lora_b: torch.Tensor,  # [S, N, R]
    scaling: torch.Tensor,  # [S] float32
    ranks: torch.Tensor,  # [S] int32, columns >= rank are zero
    row_slots: torch.Tensor,  # [B] int64
) -> torch.Tensor:
    rows = _active_rows(row_slots)
    slots = row_slots if rows is None else row_slots[rows]
    if slots.numel() == 0:
        return y
    r = int(ranks[slots].max())
    if r == 0:
        return y
    xs = x if rows is None else x.index_select(0, rows)
    a = lora_a[slots, :r, :]  # [b, r, K]
    b = lora_b[slots, :, :r]  # [b, N, r]
    delta = torch.bmm(torch.bmm(xs, a.transpose(1, 2)), b.transpose(1, 2))
    delta = delta * scaling[slots].to(delta.dtype)[:, None, None]
    if rows is None:
        y.add_(delta)
    else:
        y.index_add_(0, rows, delta)
    return y


def scale_ia3(
    y: torch.Tensor,  # [B, T, N] base layer output (bias included), updated in place
    ia3: torch.Tensor,  # [S, N] per-slot scale vectors
    row_slots: torch.Tensor,  # [B] int64
) -> torch.Tensor:
    rows = _active_rows(row_slots)
    if rows is None:
        y.mul_(ia3[row_slots][:, None, :])
    elif rows.numel() > 0:
        y[rows] = y.index_select(0, rows) * ia3[row_slots[rows]][:, None, :]
    return y


def bottleneck(
    t: torch.Tensor,  # [B, T, H] adapter input
    w_down: torch.Tensor,  # [S, H, R]
    b_down: torch.Tensor,  # [S, R]
    w_up: torch.Tensor,  # [S, R, H]
    b_up: torch.Tensor,  # [S, H]
    scaling: torch.Tensor,  # [S, H] scalar scalings are broadcast into the row at load time
    act_ids: torch.Tensor,  # [S] int32, values of kernels.activations.Act
    ranks: torch.Tensor,  # [S] int32
    row_slots: torch.Tensor,  # [B] int64
) -> torch.Tensor:  # [B, T, H], zero for rows with slot -1
    rows = _active_rows(row_slots)
    slots = row_slots if rows is None else row_slots[rows]
    out = torch.zeros_like(t) if rows is not None else None
    if slots.numel() == 0:
        return out
    r = int(ranks[slots].max())
    ts = t if rows is None else t.index_select(0, rows)
    z = torch.baddbmm(b_down[slots, None, :r], ts, w_down[slots, :, :r])  # [b, T, r]
    z = _apply_act_per_row(z, act_ids[slots])
    f = torch.baddbmm(b_up[slots, None, :], z, w_up[slots, :r, :]) * scaling[slots, None, :]
    if rows is None:
        return f
    out.index_copy_(0, rows, f)
    return out


def _apply_act_per_row(z: torch.Tensor, row_acts: torch.Tensor) -> torch.Tensor:
    """One activation per row; a loop over the (few) distinct activations, never over rows."""
    kinds = torch.unique(row_acts).tolist()
    if len(kinds) == 1:
        return apply_act(z, Act(kinds[0]))
    out = torch.empty_like(z)
    for kind in kinds:
        rows = (row_acts == kind).nonzero().squeeze(1)
        out[rows] = apply_act(z.index_select(0, rows), Act(kind))
    return out


def layer_norm_rows(
    t: torch.Tensor,  # [B, T, H]
    weight: torch.Tensor,  # [S, H]
    bias: torch.Tensor,  # [S, H]
    eps: float,
    row_slots: torch.Tensor,  # [B] int64, all >= 0
) -> torch.Tensor:
    """LayerNorm whose affine parameters are the row's slot's (an adapter's ln_before / ln_after)."""
    normed = torch.nn.functional.layer_norm(t, t.shape[-1:], eps=eps)
    return torch.addcmul(bias[row_slots, None, :], normed, weight[row_slots, None, :])

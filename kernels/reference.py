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


def _plan(row_slots: torch.Tensor, ranks: torch.Tensor | None = None):
    """Host-side view of the rows: (rows with an adapter or None for all, their slots, largest rank).

    The reference is the CPU serving path, where reading a few dozen ints on the host is cheaper than
    the device-style reductions (``all``, ``max``, ``unique``) it replaces; that keeps each op at a
    handful of torch calls even when a batch mixes many adapters.
    """
    slots = row_slots.tolist()
    if min(slots, default=0) >= 0:
        rows, active = None, row_slots
    else:
        picked = [i for i, s in enumerate(slots) if s >= 0]
        rows = torch.tensor(picked, dtype=torch.long, device=row_slots.device)
        active = row_slots.index_select(0, rows)
        slots = [slots[i] for i in picked]
    max_rank = 0
    if ranks is not None and slots:
        rank_list = ranks.tolist()
        max_rank = max(rank_list[s] for s in slots)
    return rows, active, slots, max_rank


def _gather(table: torch.Tensor, slots: torch.Tensor, dim: int | None = None, size: int | None = None) -> torch.Tensor:
    """table[slots], narrowed to ``size`` along ``dim`` first so only the used rank columns are copied."""
    if dim is not None:
        table = table.narrow(dim, 0, size)
    return table.index_select(0, slots)


def add_lora(
    y: torch.Tensor,  # [B, T, N] base layer output, updated in place
    x: torch.Tensor,  # [B, T, K] base layer input
    lora_a: torch.Tensor,  # [S, R, K]
    lora_b: torch.Tensor,  # [S, N, R]
    scaling: torch.Tensor,  # [S] float32
    ranks: torch.Tensor,  # [S] int32, columns >= rank are zero
    row_slots: torch.Tensor,  # [B] int64
) -> torch.Tensor:
    rows, slots, _, r = _plan(row_slots, ranks)
    if r == 0:  # no row with an adapter
        return y
    xs = x if rows is None else x.index_select(0, rows)
    a = _gather(lora_a, slots, 1, r)  # [b, r, K]
    b = _gather(lora_b, slots, 2, r)  # [b, N, r]
    delta = torch.bmm(torch.bmm(xs, a.transpose(1, 2)), b.transpose(1, 2))
    delta = delta * scaling.index_select(0, slots).to(delta.dtype)[:, None, None]
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
    rows, slots, slot_list, _ = _plan(row_slots)
    if not slot_list:
        return y
    scale = ia3.index_select(0, slots)[:, None, :]
    if rows is None:
        y.mul_(scale)
    else:
        y.index_copy_(0, rows, y.index_select(0, rows) * scale)
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
    rows, slots, slot_list, r = _plan(row_slots, ranks)
    if rows is not None and not slot_list:
        return torch.zeros_like(t)
    ts = t if rows is None else t.index_select(0, rows)
    z = torch.baddbmm(_gather(b_down, slots, 1, r)[:, None, :], ts, _gather(w_down, slots, 2, r))  # [b, T, r]
    z = _apply_act_per_row(z, act_ids, slot_list)
    f = torch.baddbmm(b_up.index_select(0, slots)[:, None, :], z, _gather(w_up, slots, 1, r))
    f = f * scaling.index_select(0, slots)[:, None, :]
    if rows is None:
        return f
    return torch.zeros_like(t).index_copy_(0, rows, f)


def _apply_act_per_row(z: torch.Tensor, act_ids: torch.Tensor, slots: list[int]) -> torch.Tensor:
    """One activation per row; a loop over the (few) distinct activations, never over rows."""
    acts = act_ids.tolist()
    row_acts = [acts[s] for s in slots]
    kinds = sorted(set(row_acts))
    if len(kinds) == 1:
        return apply_act(z, Act(kinds[0]))
    out = torch.empty_like(z)
    for kind in kinds:
        rows = torch.tensor([i for i, a in enumerate(row_acts) if a == kind], dtype=torch.long, device=z.device)
        out.index_copy_(0, rows, apply_act(z.index_select(0, rows), Act(kind)))
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
    return torch.addcmul(bias.index_select(0, row_slots)[:, None, :], normed, weight.index_select(0, row_slots)[:, None, :])

"""Torch reference implementations of the adapter ops: the CPU serving path and the test oracle.

Every op takes the batch as rows ``[B, T, ·]`` and one slot id per row (``row_slots``, int64, ``-1`` =
no adapter at this site). Slot tables are stacks over all slots of the pool, padded to the largest
rank with zeros, so an adapter's padding columns contribute exactly nothing. The Triton kernels in
this package have the same signatures; each public op's ``Semantics:`` lives in ``kernels/__init__``.

Why rows and not tokens: every token of a row uses that row's adapter, so gathering the weights once
per row (``[B, R, H]``) and running one ``bmm`` costs a few percent of the base layer, while a
per-token gather would copy ``T`` times more weight bytes. Rows of very different ranks are split into
runs (`_rank_runs`), each gathered only up to its own largest rank.

Down-projections are computed rank-major, ``W [n, r, K] @ x^T -> [n, r, T]``: MKL's batched GEMM runs
the narrow side (r of 4-24) as its M dimension 1.2-3x faster than as N (``x @ W^T -> [n, T, r]``),
with outputs bitwise equal in our runs (measured on AMD Zen 5, 2 threads; wider ranks run alike either way).
All tables are stored rank-major (``lora_a [S, R, K]``, ``lora_b [S, R, N]``, ``w_down``/``w_up [S, R, H]``),
so a gathered W is contiguous: as a transposed view MKL ran the down-projection 3.5-7x slower at 1-8 tokens per
row (decode steps, short texts; 9 rows of rank 24, 1 thread: 43 vs 8 us at 1 token, 117 vs 31 us at 8) and
LoRA's up-projection 2-3x slower at 1 token (10 rows of rank 16, 2 threads: 9 vs 4 us at N=384, 24 vs 8 us at
N=1536), the same from 16 tokens on.
"""
import torch

from .activations import Act, apply_act_


def _plan(row_slots: torch.Tensor):
    """Host-side view of the rows: (rows with an adapter or None for all, their slots, as a list).

    The reference is the CPU serving path, where reading a few dozen ints on the host is cheaper than
    the device-style reductions (``all``, ``max``, ``unique``) it replaces; that keeps each op at a
    handful of torch calls even when a batch mixes many adapters.
    """
    slots = row_slots.tolist()
    if min(slots, default=0) >= 0:
        return None, row_slots, slots
    picked = [i for i, s in enumerate(slots) if s >= 0]
    rows = torch.tensor(picked, dtype=torch.long, device=row_slots.device)
    return rows, row_slots.index_select(0, rows), [slots[i] for i in picked]


def rank_bucket(rank: int) -> int:
    """The power-of-two bucket (at least 16) a rank is padded to at first; the batcher sorts rows by it."""
    return max(16, 1 << (rank - 1).bit_length())


def _gather(table: torch.Tensor, slots: torch.Tensor, dim: int | None = None, size: int | None = None) -> torch.Tensor:
    """table[slots], narrowed to ``size`` along ``dim`` first so only the used rank columns are copied."""
    if dim is not None:
        table = table.narrow(dim, 0, size)
    return table.index_select(0, slots)


# Padding work (multiply-adds x 2) worth one more pair of bmm calls on CPU: a pair of small bmm calls plus
# their gathers costs ~50 us of dispatch, which is ~8 MFLOP at the ~150 GFLOP/s MKL reaches here (measured).
MERGE_FLOPS = 8e6
# A padded rank column is also gathered: its weights are copied out of a slot table that is mostly in DRAM, at
# ~10 GB/s against those ~150 GFLOP/s, so one gathered float costs about 60 FLOPs. Counting only the multiply-adds
# merged every run at a few tokens per row, which then gathered every row up to the largest rank (32 rows, typical
# mix, 2 tokens, Intel Xeon, 2 threads: 21.3 ms over the base without this term, 15.9 ms with it; 16 and 128 tokens
# the same within noise).
GATHER_FLOPS_PER_FLOAT = 60


def _rank_runs(row_ranks: list[int], flops_per_rank: int) -> list[tuple[int, int, int]]:
    """Splits rows into contiguous runs that share one padded rank: [(start, end, rank)].

    Starts from runs of one power-of-two rank bucket (the batcher sorts rows by it) and merges
    neighbours while padding the smaller ranks costs less than another pair of bmm calls, so long
    prompts pay for few padded columns and short ones for few calls. ``flops_per_rank`` is the cost of
    one rank column for one row: its multiply-adds and its gather, in FLOPs.
    """
    runs = [[start, end, max(row_ranks[start:end])] for start, end, _ in _runs([rank_bucket(r) for r in row_ranks])]
    merged = [runs[0]]
    for start, end, r in runs[1:]:
        prev = merged[-1]
        n_prev, n = prev[1] - prev[0], end - start
        separate = (n_prev * prev[2] + n * r) * flops_per_rank + MERGE_FLOPS
        if (n_prev + n) * max(prev[2], r) * flops_per_rank <= separate:
            prev[1], prev[2] = end, max(prev[2], r)
        else:
            merged.append([start, end, r])
    return [tuple(run) for run in merged]


def add_lora(
    y: torch.Tensor,  # [B, T, N] base layer output, updated in place
    x: torch.Tensor,  # [B, T, K] base layer input
    lora_a: torch.Tensor,  # [S, R, K]
    lora_b: torch.Tensor,  # [S, R, N]
    scaling: torch.Tensor,  # [S] float32
    ranks: torch.Tensor,  # [S] int32, columns >= rank are zero
    row_slots: torch.Tensor,  # [B] int64
) -> torch.Tensor:
    rows, slots, slot_list = _plan(row_slots)
    if not slot_list:  # no row with an adapter
        return y
    rank_list = ranks.tolist()
    xs = x if rows is None else x.index_select(0, rows)
    cost = (2 * x.shape[1] + GATHER_FLOPS_PER_FLOAT) * (x.shape[2] + y.shape[2])  # one rank column of one row
    for start, end, r in _rank_runs([rank_list[s] for s in slot_list], cost):
        run = slots[start:end]
        a = _gather(lora_a, run, 1, r)  # [n, r, K]
        b = _gather(lora_b, run, 1, r)  # [n, r, N]
        z = torch.bmm(a, xs[start:end].transpose(1, 2))  # [n, r, T], rank-major (see the module docstring)
        z.mul_(scaling.index_select(0, run).to(z.dtype)[:, None, None])  # scale the small side
        if rows is None:
            y[start:end].baddbmm_(z.transpose(1, 2), b)
        else:
            y.index_add_(0, rows[start:end], torch.bmm(z.transpose(1, 2), b))
    return y


def scale_ia3(
    y: torch.Tensor,  # [B, T, N] base layer output (bias included), updated in place
    ia3: torch.Tensor,  # [S, N] per-slot scale vectors
    row_slots: torch.Tensor,  # [B] int64
) -> torch.Tensor:
    # in place over each contiguous range of rows with an adapter: no gather and scatter of y
    for start, end, present in _runs([s >= 0 for s in row_slots.tolist()]):
        if present:
            y[start:end].mul_(ia3.index_select(0, row_slots[start:end])[:, None, :])
    return y


def bottleneck(
    y: torch.Tensor,  # [B, T, H] accumulator (the junction's h + x, or zeros), updated in place
    t: torch.Tensor,  # [B, T, H] adapter input
    w_down: torch.Tensor,  # [S, R, H]
    b_down: torch.Tensor,  # [S, R]
    w_up: torch.Tensor,  # [S, R, H]
    b_up: torch.Tensor,  # [S, H]
    scaling: torch.Tensor,  # [S, H] scalar scalings are broadcast into the row at load time
    act_ids: torch.Tensor,  # [S] int32, values of kernels.activations.Act
    ranks: torch.Tensor,  # [S] int32
    row_slots: torch.Tensor,  # [B] int64
) -> torch.Tensor:  # y, rows with slot -1 untouched
    rows, slots, slot_list = _plan(row_slots)
    if not slot_list:
        return y
    ts = t if rows is None else t.index_select(0, rows)
    rank_list, acts = ranks.tolist(), act_ids.tolist()
    cost = (4 * t.shape[1] + 2 * GATHER_FLOPS_PER_FLOAT) * t.shape[2]  # one rank column of one row: down and up
    for start, end, r in _rank_runs([rank_list[s] for s in slot_list], cost):
        run = slots[start:end]
        w = _gather(w_down, run, 1, r)  # [n, r, H]
        z = torch.baddbmm(_gather(b_down, run, 1, r)[:, :, None], w, ts[start:end].transpose(1, 2))  # [n, r, T]
        _apply_act_runs(z, [acts[s] for s in slot_list[start:end]])
        scale = scaling.index_select(0, run)[:, None, :]  # folded into the up weights: [n, r, H], not [n, T, H]
        up, up_bias = _gather(w_up, run, 1, r).mul_(scale), b_up.index_select(0, run)[:, None, :].mul_(scale)
        if rows is None:  # accumulate into y's rows in place: no [n, T, H] temporary to write, read and add
            y[start:end].add_(up_bias).baddbmm_(z.transpose(1, 2), up)
        else:
            y.index_add_(0, rows[start:end], torch.baddbmm(up_bias, z.transpose(1, 2), up))
    return y


def _apply_act_runs(z: torch.Tensor, row_acts: list[int]) -> None:
    """Applies each row's activation to z [n, r, T] in place, once per run of rows sharing one.

    The batcher sorts rows by activation within a rank bucket, so the runs are few; never a loop
    over rows.
    """
    for start, end, act in _runs(row_acts):
        apply_act_(z[start:end], Act(act))


def _runs(values: list) -> list[tuple[int, int, object]]:
    """The maximal ranges [start, end) of equal neighbouring values, each with its value."""
    runs = []
    for i, v in enumerate(values):
        if runs and runs[-1][2] == v:
            runs[-1][1] = i + 1
        else:
            runs.append([i, i + 1, v])
    return [tuple(run) for run in runs]


def layer_norm_rows(
    t: torch.Tensor,  # [B, T, H]
    weight: torch.Tensor,  # [S, H]
    bias: torch.Tensor,  # [S, H]
    eps: float,
    row_slots: torch.Tensor,  # [B] int64, all >= 0
) -> torch.Tensor:
    """LayerNorm whose affine parameters are the row's slot's (an adapter's ln_before / ln_after)."""
    normed = torch.nn.functional.layer_norm(t, t.shape[-1:], eps=eps)
    weight, bias = weight.index_select(0, row_slots)[:, None, :], bias.index_select(0, row_slots)[:, None, :]
    return torch.addcmul(bias, normed, weight)

"""Triton bottleneck adapter body: one fused launch for every adapter of a mixed batch.

Per program (a block of BLOCK_M tokens of one slot, see `segments.token_block`):
    z = act(t @ w_down[s, :r].T + b_down[s, :r])         [BLOCK_M, BLOCK_R] fp32, in registers only
    y[:, n] += scaling[s, n] * (z @ w_up[s, :r, n] + b_up[s, n])   for each BLOCK_N chunk of H
Columns at or beyond the slot's rank are masked in both GEMMs, so a rank-8 slot in a rank-64 table
loads 8 weight columns, not 64, and its padding contents never matter. Rows with slot -1 are not
touched. Each output element is read and written by exactly one program (the BLOCK_N chunks of a
token block are split over programs, never shared), so the read-add-write needs no atomics.
"""
import torch
import triton
import triton.language as tl

from .segments import FLOAT_DTYPES, check_rows, check_table, mma, plan_launch, token_block


@triton.jit
def _tanh(u):
    # libdevice.tanh is unavailable to the interpreter; this identity is exact up to rounding
    return 2.0 * tl.sigmoid(2.0 * u) - 1.0


@triton.jit
def activation(z, act):
    """z (fp32) through `kernels.activations.Act(act)`; act is one runtime scalar per program."""
    if act == 1:  # RELU
        z = tl.maximum(z, 0.0)
    elif act == 2:  # GELU (erf)
        z = 0.5 * z * (1.0 + tl.erf(z * 0.7071067811865476))  # 1/sqrt(2)
    elif act == 3:  # GELU_TANH
        z = 0.5 * z * (1.0 + _tanh(0.7978845608028654 * (z + 0.044715 * z * z * z)))  # sqrt(2/pi)
    elif act == 4:  # SILU
        z = z * tl.sigmoid(z)
    elif act == 5:  # TANH
        z = _tanh(z)
    elif act == 6:  # LEAKY_RELU, slope 0.01
        z = tl.where(z >= 0.0, z, 0.01 * z)
    elif act == 7:  # SIGMOID
        z = tl.sigmoid(z)
    elif act == 8:  # QUICK_GELU
        z = z * tl.sigmoid(1.702 * z)
    elif act == 9:  # MISH: z * tanh(softplus(z)); softplus is z itself past 20, as torch's
        z = z * _tanh(tl.where(z > 20.0, z, tl.log(1.0 + tl.exp(tl.minimum(z, 20.0)))))
    elif act == 10:  # RELU6
        z = tl.minimum(tl.maximum(z, 0.0), 6.0)
    elif act == 11:  # RELU_SQUARED
        z = tl.maximum(z, 0.0)
        z = z * z
    elif act == 12:  # GELU_CLIPPED
        z = tl.minimum(tl.maximum(0.5 * z * (1.0 + tl.erf(z * 0.7071067811865476)), -10.0), 10.0)
    elif act == 13:  # LAPLACE
        z = 0.5 * (1.0 + tl.erf((z - 0.707107) / (0.282095 * 1.4142135623730951)))  # sqrt(2)
    return z  # 0 = IDENTITY


@triton.jit
def _bottleneck_kernel(
    t_ptr, y_ptr, wd_ptr, bd_ptr, wu_ptr, bu_ptr, sc_ptr, act_ptr, rank_ptr, slots_ptr, perm_ptr,
    num_rows, T, H, R,  # R: padded rank of the tables (their middle dim)
    stride_tb, stride_tt, stride_yb, stride_yt,
    SEGMENTED: tl.constexpr, DOT_FP32: tl.constexpr, BLOCK_ROWS: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_R: tl.constexpr,
):
    pid_n, num_splits = tl.program_id(2), tl.num_programs(2)
    slot, row, tok, m_mask = token_block(tl.program_id(0), tl.program_id(1), T, num_rows, slots_ptr, perm_ptr,
                                         SEGMENTED, BLOCK_ROWS, BLOCK_M)
    if tl.sum(m_mask.to(tl.int32), axis=0) == 0:
        return  # a block past the end of its segment
    t_rows = t_ptr + row * stride_tb + tok * stride_tt  # [BLOCK_M] row starts (int64 offsets)
    y_rows = y_ptr + row * stride_yb + tok * stride_yt
    offs_k, offs_n = tl.arange(0, BLOCK_K), tl.arange(0, BLOCK_N)
    n_step = num_splits * BLOCK_N  # this program's output chunks: pid_n, pid_n + num_splits, ...

    if slot < 0:
        return  # no adapter: y stays as it is

    s = slot.to(tl.int64)
    rank = tl.load(rank_ptr + s)
    act = tl.load(act_ptr + s)
    offs_r = tl.arange(0, BLOCK_R)
    r_mask = offs_r < rank
    wd = wd_ptr + s * R * H
    wu = wu_ptr + s * R * H

    # down-projection over H in BLOCK_K chunks
    acc = tl.zeros([BLOCK_M, BLOCK_R], dtype=tl.float32)
    for k0 in range(0, H, BLOCK_K):
        k = k0 + offs_k
        k_mask = k < H
        x = tl.load(t_rows[:, None] + k[None, :], mask=m_mask[:, None] & k_mask[None, :], other=0.0)
        w = tl.load(wd + offs_r[None, :] * H + k[:, None], mask=k_mask[:, None] & r_mask[None, :], other=0.0)
        acc = mma(x, w, acc, DOT_FP32)
    b_down = tl.load(bd_ptr + s * R + offs_r, mask=r_mask, other=0.0).to(tl.float32)
    z = activation(acc + b_down[None, :], act)
    z = tl.where(r_mask[None, :], z, 0.0)  # act(0) != 0 for sigmoid: keep padding columns exactly zero

    # up-projection, bias and per-channel scale, one BLOCK_N chunk of H at a time
    for n0 in range(pid_n * BLOCK_N, H, n_step):
        n = n0 + offs_n
        n_mask = n < H
        w = tl.load(wu + offs_r[:, None] * H + n[None, :], mask=r_mask[:, None] & n_mask[None, :], other=0.0)
        f = mma(z, w, tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32), DOT_FP32)
        b_up = tl.load(bu_ptr + s * H + n, mask=n_mask, other=0.0).to(tl.float32)
        scale = tl.load(sc_ptr + s * H + n, mask=n_mask, other=0.0).to(tl.float32)
        f = (f + b_up[None, :]) * scale[None, :]
        mask = m_mask[:, None] & n_mask[None, :]
        y = tl.load(y_rows[:, None] + n[None, :], mask=mask, other=0.0).to(tl.float32)
        tl.store(y_rows[:, None] + n[None, :], (y + f).to(y_ptr.dtype.element_ty), mask=mask)


def bottleneck(y, t, w_down, b_down, w_up, b_up, scaling, act_ids, ranks, row_slots, *,
               segmented: bool | None = None, block_m: int | None = None, n_splits: int | None = None):
    """Same contract as `kernels.bottleneck`; the keyword-only knobs exist for tests and benchmarks."""
    B, T, H = t.shape
    S, R, _ = w_down.shape
    dtype, dev = t.dtype, t.device
    assert dtype in FLOAT_DTYPES, f"t: unsupported dtype {dtype}"
    check_rows("y", y, dtype, (B, T, H))
    check_rows("t", t, dtype, (B, T, H))
    check_table("w_down", w_down, dtype, (S, R, H), dev)
    check_table("b_down", b_down, dtype, (S, R), dev)
    check_table("w_up", w_up, dtype, (S, R, H), dev)
    check_table("b_up", b_up, dtype, (S, H), dev)
    check_table("scaling", scaling, dtype, (S, H), dev)
    check_table("act_ids", act_ids, torch.int32, (S,), dev)
    check_table("ranks", ranks, torch.int32, (S,), dev)
    check_table("row_slots", row_slots, torch.int64, (B,), dev)
    if y.numel() == 0:
        return y
    grid, slots, perm, cfg = plan_launch(row_slots, T, R, H, dtype, segmented, block_m, n_splits)
    _bottleneck_kernel[grid](
        t, y, w_down, b_down, w_up, b_up, scaling, act_ids, ranks, slots, perm,
        B, T, H, R, t.stride(0), t.stride(1), y.stride(0), y.stride(1), **cfg)
    return y

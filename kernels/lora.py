"""Triton multi-LoRA: shrink (x @ A^T) and expand (@ B^T) fused, added into y in place.

Prefill (T > 1) is SGMV-like: rows sorted by slot, tokens of a segment in BLOCK_M blocks sharing the
slot's A and B tiles. Decode (T == 1) is BGMV-like: one program per row, no sort. Either way the
rank-r intermediate stays in registers. Columns >= ranks[s] are masked in both GEMMs; rows with
slot -1 are never touched (their programs return before loading anything).
"""
import torch
import triton
import triton.language as tl

from .segments import FLOAT_DTYPES, check_rows, check_table, mma, plan_launch, token_block


@triton.jit
def _lora_kernel(
    y_ptr, x_ptr, a_ptr, b_ptr, scaling_ptr, rank_ptr, slots_ptr, perm_ptr,
    num_rows, T, K, N, R,  # K: in features, N: out features, R: padded rank of the tables
    stride_yb, stride_yt, stride_xb, stride_xt,
    SEGMENTED: tl.constexpr, DOT_FP32: tl.constexpr, BLOCK_ROWS: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_R: tl.constexpr,
):
    pid_n, num_splits = tl.program_id(2), tl.num_programs(2)
    slot, row, tok, m_mask = token_block(tl.program_id(0), tl.program_id(1), T, num_rows, slots_ptr, perm_ptr,
                                         SEGMENTED, BLOCK_ROWS, BLOCK_M)
    if (slot < 0) | (tl.sum(m_mask.to(tl.int32), axis=0) == 0):
        return
    s = slot.to(tl.int64)
    rank = tl.load(rank_ptr + s)
    if rank == 0:
        return
    x_rows = x_ptr + row * stride_xb + tok * stride_xt  # [BLOCK_M] row starts (int64 offsets)
    y_rows = y_ptr + row * stride_yb + tok * stride_yt
    offs_k, offs_n, offs_r = tl.arange(0, BLOCK_K), tl.arange(0, BLOCK_N), tl.arange(0, BLOCK_R)
    r_mask = offs_r < rank
    a = a_ptr + s * R * K  # A[s] is [R, K]: read as a [BLOCK_K, BLOCK_R] tile of A^T
    b = b_ptr + s * R * N  # B[s] is stored rank-major, [R, N] (= B^T): read as [BLOCK_R, BLOCK_N] tiles

    # shrink: x @ A^T over K in BLOCK_K chunks
    acc = tl.zeros([BLOCK_M, BLOCK_R], dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        k = k0 + offs_k
        k_mask = k < K
        xt = tl.load(x_rows[:, None] + k[None, :], mask=m_mask[:, None] & k_mask[None, :], other=0.0)
        at = tl.load(a + offs_r[None, :] * K + k[:, None], mask=k_mask[:, None] & r_mask[None, :], other=0.0)
        acc = mma(xt, at, acc, DOT_FP32)
    scale = tl.load(scaling_ptr + s)

    # expand and accumulate into y, one BLOCK_N chunk of N at a time (chunks pid_n, pid_n + splits, ...)
    for n0 in range(pid_n * BLOCK_N, N, num_splits * BLOCK_N):
        n = n0 + offs_n
        mask = m_mask[:, None] & (n < N)[None, :]
        bt = tl.load(b + offs_r[:, None] * N + n[None, :], mask=r_mask[:, None] & (n < N)[None, :], other=0.0)
        delta = mma(acc, bt, tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32), DOT_FP32)
        y = tl.load(y_rows[:, None] + n[None, :], mask=mask, other=0.0).to(tl.float32)
        tl.store(y_rows[:, None] + n[None, :], (y + scale * delta).to(y_ptr.dtype.element_ty), mask=mask)


def add_lora(y, x, lora_a, lora_b, scaling, ranks, row_slots, *,
             segmented: bool | None = None, block_m: int | None = None, n_splits: int | None = None):
    """Same contract as `kernels.add_lora` (y updated in place and returned); keyword-only knobs for tests."""
    B, T, K = x.shape
    S, R, _ = lora_a.shape
    N = y.shape[-1]
    dtype, dev = x.dtype, x.device
    assert dtype in FLOAT_DTYPES, f"x: unsupported dtype {dtype}"
    check_rows("x", x, dtype, (B, T, K))
    check_rows("y", y, dtype, (B, T, N))
    assert y.device == dev, f"y on {y.device}, x on {dev}"
    check_table("lora_a", lora_a, dtype, (S, R, K), dev)
    check_table("lora_b", lora_b, dtype, (S, R, N), dev)
    check_table("scaling", scaling, torch.float32, (S,), dev)
    check_table("ranks", ranks, torch.int32, (S,), dev)
    check_table("row_slots", row_slots, torch.int64, (B,), dev)
    if y.numel() == 0 or K == 0:
        return y
    grid, slots, perm, cfg = plan_launch(row_slots, T, R, N, dtype, segmented, block_m, n_splits)
    _lora_kernel[grid](
        y, x, lora_a, lora_b, scaling, ranks, slots, perm,
        B, T, K, N, R, y.stride(0), y.stride(1), x.stride(0), x.stride(1), **cfg)
    return y

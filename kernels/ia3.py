"""Triton IA3: y[b, t, :] *= ia3[row_slots[b]], in place.

Purely elementwise, so there is nothing to share between rows of one slot beyond a vector of N
values that stays in L2: one program per (row, token block, column block), no sort, no segments.
Rows with slot -1 return before touching memory.
"""
import torch
import triton
import triton.language as tl

from .segments import FLOAT_DTYPES, check_rows, check_table


@triton.jit
def _ia3_kernel(y_ptr, v_ptr, slots_ptr, T, N, stride_yb, stride_yt,
                BLOCK_T: tl.constexpr, BLOCK_N: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    slot = tl.load(slots_ptr + row)
    if slot < 0:
        return
    tok = tl.program_id(1) * BLOCK_T + tl.arange(0, BLOCK_T)
    n = tl.program_id(2) * BLOCK_N + tl.arange(0, BLOCK_N)
    n_mask = n < N
    mask = (tok < T)[:, None] & n_mask[None, :]
    v = tl.load(v_ptr + slot * N + n, mask=n_mask, other=1.0).to(tl.float32)
    ptrs = y_ptr + row * stride_yb + tok.to(tl.int64)[:, None] * stride_yt + n[None, :]
    y = tl.load(ptrs, mask=mask, other=0.0).to(tl.float32)
    # the fp32 product of two half values is exact, so this rounds once, as torch's mul_ does
    tl.store(ptrs, (y * v[None, :]).to(y_ptr.dtype.element_ty), mask=mask)


def launch_config(T: int, N: int) -> dict:
    block_n = min(1024, triton.next_power_of_2(N))
    return dict(BLOCK_T=max(1, min(triton.next_power_of_2(T), 4096 // block_n)), BLOCK_N=block_n)


def scale_ia3(y, ia3, row_slots):
    """Same contract as `kernels.scale_ia3`: y scaled in place and returned."""
    B, T, N = y.shape
    S = ia3.shape[0]
    assert y.dtype in FLOAT_DTYPES, f"y: unsupported dtype {y.dtype}"
    check_rows("y", y, y.dtype, (B, T, N))
    check_table("ia3", ia3, y.dtype, (S, N), y.device)
    check_table("row_slots", row_slots, torch.int64, (B,), y.device)
    if y.numel() == 0:
        return y
    cfg = launch_config(T, N)
    grid = (B, triton.cdiv(T, cfg["BLOCK_T"]), triton.cdiv(N, cfg["BLOCK_N"]))
    _ia3_kernel[grid](y, ia3, row_slots, T, N, y.stride(0), y.stride(1), **cfg)
    return y

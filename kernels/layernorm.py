"""Triton LayerNorm over the last dim with per-row affine parameters from the row's slot.

Each program normalises BLOCK_T tokens of one row with the whole feature dim in one tile
(BLOCK_H = next power of two >= H), so mean and variance need no second pass over memory.
The row's slot selects weight/bias; both are H values, read once per program.
"""
import torch
import triton
import triton.language as tl

from .segments import FLOAT_DTYPES, check_rows, check_table


@triton.jit
def _layer_norm_kernel(t_ptr, out_ptr, w_ptr, b_ptr, slots_ptr, T, H, eps, stride_tb, stride_tt,
                       BLOCK_T: tl.constexpr, BLOCK_H: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    slot = tl.load(slots_ptr + row)
    tok = tl.program_id(1) * BLOCK_T + tl.arange(0, BLOCK_T)
    h = tl.arange(0, BLOCK_H)
    h_mask = h < H
    mask = (tok < T)[:, None] & h_mask[None, :]
    x = tl.load(t_ptr + row * stride_tb + tok.to(tl.int64)[:, None] * stride_tt + h[None, :],
                mask=mask, other=0.0).to(tl.float32)
    mean = tl.sum(x, axis=1) / H
    xc = tl.where(mask, x - mean[:, None], 0.0)
    rstd = 1.0 / tl.sqrt(tl.sum(xc * xc, axis=1) / H + eps)  # biased variance, as nn.LayerNorm
    # Slot -1 is outside the contract (callers pass adapter rows only); normalise without an affine
    # rather than read another slot's parameters.
    # (a block, not a scalar: triton 3.9's interpreter rejects a mask made from a scalar and a block)
    affine_mask = h_mask & ((h * 0 + slot) >= 0)
    s = tl.maximum(slot, 0)
    w = tl.load(w_ptr + s * H + h, mask=affine_mask, other=1.0).to(tl.float32)
    b = tl.load(b_ptr + s * H + h, mask=affine_mask, other=0.0).to(tl.float32)
    y = xc * rstd[:, None] * w[None, :] + b[None, :]
    out = out_ptr + (row * T + tok.to(tl.int64))[:, None] * H + h[None, :]  # out is contiguous [B, T, H]
    tl.store(out, y.to(out_ptr.dtype.element_ty), mask=mask)


def launch_config(T: int, H: int) -> dict:
    block_h = triton.next_power_of_2(H)
    # ~4K fp32 values per program: whole rows in registers without spilling at H = 4096
    return dict(BLOCK_T=max(1, min(triton.next_power_of_2(T), 4096 // block_h)), BLOCK_H=block_h)


def layer_norm_rows(t, weight, bias, eps, row_slots):
    """Same contract as `kernels.layer_norm_rows`; returns a new contiguous tensor."""
    B, T, H = t.shape
    S = weight.shape[0]
    assert t.dtype in FLOAT_DTYPES, f"t: unsupported dtype {t.dtype}"
    check_rows("t", t, t.dtype, (B, T, H))
    check_table("weight", weight, t.dtype, (S, H), t.device)
    check_table("bias", bias, t.dtype, (S, H), t.device)
    check_table("row_slots", row_slots, torch.int64, (B,), t.device)
    out = torch.empty((B, T, H), dtype=t.dtype, device=t.device)
    if out.numel() == 0:
        return out
    cfg = launch_config(T, H)
    num_warps = 4 if cfg["BLOCK_H"] <= 2048 else 8
    _layer_norm_kernel[(B, triton.cdiv(T, cfg["BLOCK_T"]))](
        t, out, weight, bias, row_slots, T, H, float(eps), t.stride(0), t.stride(1), num_warps=num_warps, **cfg)
    return out

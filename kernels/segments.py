"""Shared Triton pieces: which tokens a program owns, the GEMM step, launch checks and choices.

Two ways to hand out work, both without a host sync (so a step can be captured in a CUDA graph):

* per row (BGMV, decode): program (b, j) owns tokens ``j*BLOCK_M ...`` of row b. No sort at all.
* segmented (SGMV, prefill): rows are stably sorted by slot on the device; the rows of one slot form
  a segment, and its tokens (row-major over the segment) are cut into BLOCK_M blocks, so rows that
  share an adapter share its weight tiles. Program (p, j) sits at sorted position p; it finds its
  segment by comparing slot values (they are sorted), and owns block ``(p - first) * blocks_per_row + j``
  of it. That is at most one program per (row, row-block) as in the per-row grid, and segments need
  no table: the extra blocks simply return.
"""
import functools
import os

import torch
import triton
import triton.language as tl

# Read once, like the @triton.jit decorators of the kernel modules (imported together with this one):
# the launch mode of a kernel is fixed when it is defined, not when it is called.
INTERPRET = os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")
FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


@triton.jit
def token_block(pid_row, pid_blk, T, num_rows, slots_ptr, perm_ptr,
                SEGMENTED: tl.constexpr, BLOCK_ROWS: tl.constexpr, BLOCK_M: tl.constexpr):
    """-> (slot, row [BLOCK_M] int64, token [BLOCK_M] int64, mask [BLOCK_M]) for program (pid_row, pid_blk).

    SEGMENTED: slots_ptr holds the sorted slots and perm_ptr the row of each sorted position;
    otherwise slots_ptr holds row_slots and perm_ptr is unused.
    """
    offs = tl.arange(0, BLOCK_M)
    slot = tl.load(slots_ptr + pid_row)
    if SEGMENTED:
        idx = tl.arange(0, BLOCK_ROWS)
        in_range = idx < num_rows
        all_slots = tl.load(slots_ptr + idx, mask=in_range, other=0)
        first = tl.sum((in_range & (all_slots < slot)).to(tl.int32), axis=0)  # sorted: count of smaller slots
        count = tl.sum((in_range & (all_slots == slot)).to(tl.int32), axis=0)
        j = ((pid_row - first) * tl.cdiv(T, BLOCK_M) + pid_blk) * BLOCK_M + offs
        mask = j < count * T
        row = tl.load(perm_ptr + first + j // T, mask=mask, other=0).to(tl.int64)
    else:
        j = pid_blk * BLOCK_M + offs
        mask = j < T
        row = tl.zeros([BLOCK_M], dtype=tl.int64) + pid_row
    return slot, row, (j % T).to(tl.int64), mask


@triton.jit
def mma(a, b, acc, DOT_FP32: tl.constexpr):
    """acc += a @ b with fp32 accumulation. DOT_FP32 feeds fp32 operands with "ieee" precision (Triton's
    default for fp32 is tf32, ~1e-3 off); otherwise `a` is cast to b's half type for the tensor cores."""
    if DOT_FP32:
        acc = tl.dot(a.to(tl.float32), b.to(tl.float32), acc, input_precision="ieee")
    else:
        acc = tl.dot(a.to(b.dtype), b, acc)
    return acc


def dot_fp32(dtype: torch.dtype) -> bool:
    """fp32 data, and bf16 under the interpreter (it multiplies bf16 bit patterns as integers in tl.dot)."""
    return dtype == torch.float32 or (INTERPRET and dtype == torch.bfloat16)


def block_r(max_rank: int) -> int:
    """The whole padded rank in one tile (the bottleneck activations stay in registers); compiled tl.dot
    needs every dim >= 16, so rank 8 still takes a 16-wide tile (its extra columns are masked)."""
    return max(16, triton.next_power_of_2(max_rank))


def row_order(row_slots: torch.Tensor, T: int, segmented: bool | None):
    """-> (slots for the kernel, perm, SEGMENTED). Segments for prefill, per row for decode (T == 1)."""
    if segmented is None:
        segmented = T > 1
    if not segmented:
        return row_slots, row_slots, False
    sorted_slots, perm = torch.sort(row_slots, stable=True)
    return sorted_slots, perm, True


def block_rows(num_rows: int) -> int:
    """Width of the vector of sorted slots each segmented program scans (a constexpr: one compile per power of 2)."""
    return max(16, triton.next_power_of_2(num_rows))


def launch_config(T: int, max_rank: int, dtype: torch.dtype, num_rows: int, segmented: bool | None = None,
                  block_m: int | None = None) -> dict:
    """The constexprs of a bottleneck or LoRA launch (also what the AOT compile test compiles)."""
    seg = T > 1 if segmented is None else segmented
    br = block_r(max_rank)
    if block_m is None:  # decode: 16 (the tl.dot minimum); prefill: fewer rows when the rank tile is wide
        block_m = 16 if T == 1 else (64 if br <= 64 else 32 if br <= 128 else 16)
    return dict(SEGMENTED=seg, DOT_FP32=dot_fp32(dtype), BLOCK_ROWS=block_rows(num_rows) if seg else 16,
                BLOCK_M=block_m, BLOCK_K=64, BLOCK_N=64, BLOCK_R=br)


def plan_launch(row_slots: torch.Tensor, T: int, max_rank: int, n: int, dtype: torch.dtype,
                segmented: bool | None, block_m: int | None, n_splits: int | None):
    """-> (grid, slots, perm, constexprs) of a bottleneck or LoRA launch over ``row_slots`` [B], output width n."""
    B = row_slots.shape[0]
    cfg = launch_config(T, max_rank, dtype, B, segmented, block_m)
    slots, perm, cfg["SEGMENTED"] = row_order(row_slots, T, cfg["SEGMENTED"])
    row_blocks = triton.cdiv(T, cfg["BLOCK_M"])
    splits = n_splits or num_n_splits(B * row_blocks, n, cfg["BLOCK_N"], row_slots.device)
    return (B, row_blocks, splits), slots, perm, cfg


def num_n_splits(programs: int, n: int, block: int, device: torch.device) -> int:
    """Programs per row block along the output dim. Decode has few row blocks; splitting N fills the
    GPU at the price of recomputing the (small) shrink once per split. One split under the interpreter."""
    if device.type != "cuda" or INTERPRET:
        return 1
    return max(1, min(triton.cdiv(2 * _num_sms(device.index), max(programs, 1)), triton.cdiv(n, block)))


@functools.lru_cache(maxsize=None)
def _num_sms(index: int | None) -> int:
    index = torch.cuda.current_device() if index is None else index
    return torch.cuda.get_device_properties(index).multi_processor_count


def check_rows(name: str, x: torch.Tensor, dtype: torch.dtype, shape: tuple) -> None:
    """Activations: [B, T, H] of the op's dtype; rows may be strided, the feature dim must be dense."""
    assert x.dtype == dtype, f"{name}: dtype {x.dtype}, expected {dtype}"
    assert tuple(x.shape) == tuple(shape), f"{name}: shape {tuple(x.shape)}, expected {tuple(shape)}"
    assert x.stride(-1) == 1 or x.shape[-1] == 1, f"{name}: last dim must be contiguous, strides {x.stride()}"


def check_table(name: str, x: torch.Tensor, dtype: torch.dtype, shape: tuple, device: torch.device) -> None:
    """Slot tables: the pool's own contiguous stacks, on the activations' device."""
    assert x.dtype == dtype, f"{name}: dtype {x.dtype}, expected {dtype}"
    assert tuple(x.shape) == tuple(shape), f"{name}: shape {tuple(x.shape)}, expected {tuple(shape)}"
    assert x.is_contiguous(), f"{name}: must be contiguous"
    assert x.device == device, f"{name}: on {x.device}, activations on {device}"

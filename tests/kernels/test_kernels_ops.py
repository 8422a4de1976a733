"""Triton adapter ops vs the torch reference (`kernels.reference`), on every adapter-popularity pattern.

Without CUDA the kernels run in the Triton interpreter on CPU tensors (tests/conftest.py sets
TRITON_INTERPRET=1); with CUDA the same tests run compiled. Shapes are small because the interpreter
costs ~1-2 ms per program-loop iteration. Padding columns beyond each slot's rank hold 1e3 in the
kernel's tables (zeros in the reference's), so reading any of them fails loudly.

Tolerances (kernel vs reference evaluated in fp32 on the same rounded inputs), `adapter_tables.TOL`:

    dtype   atol   rtol   why
    fp32    1e-5   1e-4   fp32 accumulation in a different order ("ieee" dots on GPU, never tf32)
    fp16    4e-3   4e-3   output rounding (2^-11) + the fp16 rank-r intermediate of the second GEMM
    bf16    3e-2   2e-2   output rounding (2^-8; the interpreter truncates instead of rounding) + the same
"""
import sys
import zlib

import pytest
import torch

from adapter_tables import (PATTERNS, TOL, bottleneck_tables, lora_tables, mixed_ranks, row_slots,
                            to_device, to_fp32)
from kernels import Act, reference

bn = sys.modules["kernels.bottleneck"]  # the attribute `kernels.bottleneck` is the public op
lora = sys.modules["kernels.lora"]
ia3 = sys.modules["kernels.ia3"]
ln = sys.modules["kernels.layernorm"]

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
DTYPES = (torch.float32, torch.float16, torch.bfloat16)
S = 8  # slots
# (H, max rank) pairs cycled over the cases: odd H (not a multiple of the 64-wide blocks), narrow/wide rank tiles
SHAPES = ((72, 16), (100, 48), (128, 24))


def _gen(*key) -> torch.Generator:
    return torch.Generator().manual_seed(zlib.crc32(repr(key).encode()))  # stable across processes


def _batch(pattern: str, T: int, H: int, dtype, gen, num_rows: int = 12) -> tuple[torch.Tensor, torch.Tensor]:
    slots = row_slots(pattern, S if pattern == "distinct" else num_rows, S, gen)
    return torch.randn(len(slots), T, H, generator=gen).to(dtype), slots


def _close(out: torch.Tensor, expected: torch.Tensor, dtype) -> None:
    assert out.dtype == dtype
    torch.testing.assert_close(out.float().cpu(), expected.float().cpu(), **TOL[dtype])


def run_bottleneck(pattern, T, dtype, H, R, act_offset=0, device=DEVICE, num_rows=12, **knobs):
    gen = _gen("bn", pattern, T, dtype, H, R, act_offset, num_rows)
    t, slots = _batch(pattern, T, H, dtype, gen, num_rows)
    acts = (torch.arange(S) + act_offset) % len(Act)  # every Act id over the cases, several per batch
    kern, ref = bottleneck_tables(S, H, R, mixed_ranks(S, R, gen), acts, dtype, gen)
    y = torch.randn(t.shape, generator=gen).to(dtype)  # what the adapter is added into (h + x at a junction)
    y_dev = y.clone().to(device)  # .to() alone would alias y on CPU, and the op works in place
    out = bn.bottleneck(y_dev, t.to(device), row_slots=slots.to(device), **to_device(kern, device), **knobs)
    assert out is y_dev, "bottleneck works in place and returns y"
    expected = reference.bottleneck(y.float().clone(), t.float(), row_slots=slots, **to_fp32(ref))
    _close(out, expected, dtype)
    untouched = slots < 0
    assert torch.equal(out.cpu()[untouched], y[untouched]), "rows without adapter must be bit-identical"


def run_lora(pattern, T, dtype, K, N, R, device=DEVICE, num_rows=12, **knobs):
    gen = _gen("lora", pattern, T, dtype, K, N, R, num_rows)
    x, slots = _batch(pattern, T, K, dtype, gen, num_rows)
    y = torch.randn(len(slots), T, N, generator=gen).to(dtype)
    kern, ref = lora_tables(S, K, N, R, mixed_ranks(S, R, gen), dtype, gen)
    y_dev = y.clone().to(device)  # .to() alone would alias y on CPU, and the op works in place
    out = lora.add_lora(y_dev, x.to(device), row_slots=slots.to(device), **to_device(kern, device), **knobs)
    assert out is y_dev, "add_lora works in place and returns y"
    expected = reference.add_lora(y.float().clone(), x.float(), row_slots=slots, **to_fp32(ref))
    _close(out, expected, dtype)
    untouched = slots < 0
    assert torch.equal(out.cpu()[untouched], y[untouched]), "rows without adapter must be bit-identical"


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("T", [1, 6])
@pytest.mark.parametrize("pattern", PATTERNS)
def test_bottleneck_matches_reference(pattern, T, dtype):
    i = PATTERNS.index(pattern)
    H, R = SHAPES[i % len(SHAPES)]
    run_bottleneck(pattern, T, dtype, H, R, act_offset=i)


@pytest.mark.parametrize("act", range(9))
def test_bottleneck_every_activation_alone(act):
    run_bottleneck("one", 3, torch.float32, 72, 16, act_offset=act - S // 2)  # pattern "one" uses slot S // 2


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("T", [1, 6])
@pytest.mark.parametrize("pattern", PATTERNS)
def test_add_lora_matches_reference(pattern, T, dtype):
    i = PATTERNS.index(pattern)
    H, R = SHAPES[i % len(SHAPES)]
    run_lora(pattern, T, dtype, K=H, N=SHAPES[(i + 1) % len(SHAPES)][0], R=R)


# Launch paths the default heuristics do not pick for these small shapes: segments longer than one
# block (BLOCK_M=16, 12 rows x 8 tokens), per-row blocks for T > 1, segments for T = 1 (1-row
# segments), and output columns split over several programs.
KNOBS = [dict(block_m=16), dict(segmented=False), dict(segmented=True), dict(n_splits=3),
         dict(segmented=True, block_m=16, n_splits=2)]


@pytest.mark.parametrize("knobs", KNOBS, ids=lambda k: "-".join(f"{a}={b}" for a, b in k.items()))
@pytest.mark.parametrize("T", [1, 8])
def test_bottleneck_launch_paths(knobs, T):
    run_bottleneck("skewed", T, torch.float32, 100, 24, act_offset=T, **knobs)
    run_bottleneck("some_none", T, torch.float16, 72, 16, act_offset=T + 3, **knobs)


@pytest.mark.parametrize("knobs", KNOBS, ids=lambda k: "-".join(f"{a}={b}" for a, b in k.items()))
@pytest.mark.parametrize("T", [1, 8])
def test_add_lora_launch_paths(knobs, T):
    run_lora("skewed", T, torch.float32, K=100, N=72, R=24, **knobs)
    run_lora("some_none", T, torch.float16, K=72, N=128, R=16, **knobs)


def test_single_row_and_rank_zero():
    """B = 1 (one 1-row segment) and a slot of rank 0 (only the biases remain in the bottleneck)."""
    gen = _gen("rank0")
    H, R = 72, 16
    ranks = torch.tensor([0, 16, 4, 0, 8, 1, 16, 2], dtype=torch.int32)
    kern, ref = bottleneck_tables(S, H, R, ranks, torch.arange(S) % len(Act), torch.float32, gen)
    for slots in (torch.tensor([0]), torch.tensor([3, 0, 3, 1])):
        t, y = torch.randn(len(slots), 5, H, generator=gen), torch.randn(len(slots), 5, H, generator=gen)
        out = bn.bottleneck(y.clone().to(DEVICE), t.to(DEVICE), row_slots=slots.to(DEVICE), **to_device(kern, DEVICE))
        _close(out, reference.bottleneck(y.clone(), t, row_slots=slots, **ref), torch.float32)
    lk, lr = lora_tables(S, H, 40, R, ranks, torch.float32, gen)
    x, y = torch.randn(4, 5, H, generator=gen), torch.randn(4, 5, 40, generator=gen)
    slots = torch.tensor([0, 3, 1, 0])
    out = lora.add_lora(y.clone().to(DEVICE), x.to(DEVICE), row_slots=slots.to(DEVICE), **to_device(lk, DEVICE))
    _close(out, reference.add_lora(y.clone(), x, row_slots=slots, **lr), torch.float32)


def test_strided_rows():
    """Activations may be views with strided rows/tokens (only the feature dim must be dense)."""
    gen = _gen("strided")
    H, N, R = 72, 40, 16
    base_t = torch.randn(6, 10, H, generator=gen)
    t = base_t[:, 2:7]  # [6, 5, H], row stride 10 * H
    slots = torch.tensor([1, -1, 4, 1, 0, 7])
    kern, ref = bottleneck_tables(S, H, R, mixed_ranks(S, R, gen), torch.arange(S), torch.float32, gen)
    acc_full = torch.randn(6, 8, H, generator=gen)
    acc_dev = acc_full.clone().to(DEVICE)
    bn.bottleneck(acc_dev[:, 1:6], t.to(DEVICE), row_slots=slots.to(DEVICE), **to_device(kern, DEVICE))
    expected = acc_full.clone()
    reference.bottleneck(expected[:, 1:6], t, row_slots=slots, **ref)
    _close(acc_dev, expected, torch.float32)  # includes the untouched tokens outside 1:6

    lk, lr = lora_tables(S, H, N, R, mixed_ranks(S, R, gen), torch.float32, gen)
    y_full = torch.randn(6, 9, N, generator=gen)
    y_dev = y_full.clone().to(DEVICE)
    lora.add_lora(y_dev[:, ::2], t.to(DEVICE), row_slots=slots.to(DEVICE), **to_device(lk, DEVICE))
    expected = y_full.clone()
    reference.add_lora(expected[:, ::2], t, row_slots=slots, **lr)
    _close(y_dev, expected, torch.float32)  # includes the untouched odd tokens


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("T", [1, 6])
@pytest.mark.parametrize("pattern", PATTERNS)
def test_scale_ia3_matches_reference(pattern, T, dtype):
    gen = _gen("ia3", pattern, T, dtype)
    N = SHAPES[PATTERNS.index(pattern) % len(SHAPES)][0]
    y, slots = _batch(pattern, T, N, dtype, gen)
    vectors = (1.0 + 0.3 * torch.randn(S, N, generator=gen)).to(dtype)
    y_dev = y.clone().to(DEVICE)
    out = ia3.scale_ia3(y_dev, vectors.to(DEVICE), slots.to(DEVICE))
    assert out is y_dev
    _close(out, reference.scale_ia3(y.float().clone(), vectors.float(), slots), dtype)
    assert torch.equal(out.cpu()[slots < 0], y[slots < 0])


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("T", [1, 6])
@pytest.mark.parametrize("pattern", [p for p in PATTERNS if "none" not in p])  # contract: every slot >= 0
def test_layer_norm_rows_matches_reference(pattern, T, dtype):
    gen = _gen("ln", pattern, T, dtype)
    H = SHAPES[PATTERNS.index(pattern) % len(SHAPES)][0]
    t, slots = _batch(pattern, T, H, dtype, gen)
    t = (3.0 * t.float() + 1.0).to(dtype)  # a mean and a scale for the normalisation to remove
    weight = (1.0 + 0.2 * torch.randn(S, H, generator=gen)).to(dtype)
    bias = (0.1 * torch.randn(S, H, generator=gen)).to(dtype)
    out = ln.layer_norm_rows(t.to(DEVICE), weight.to(DEVICE), bias.to(DEVICE), 1e-5, slots.to(DEVICE))
    _close(out, reference.layer_norm_rows(t.float(), weight.float(), bias.float(), 1e-5, slots), dtype)


def test_layer_norm_rows_without_slot_has_no_affine():
    """Outside the contract, but defined for the kernel: slot -1 normalises without weight and bias."""
    gen = _gen("ln-none")
    t = torch.randn(3, 4, 100, generator=gen)
    weight, bias = torch.randn(S, 100, generator=gen), torch.randn(S, 100, generator=gen)
    slots = torch.tensor([2, -1, 5])
    out = ln.layer_norm_rows(t.to(DEVICE), weight.to(DEVICE), bias.to(DEVICE), 1e-5, slots.to(DEVICE)).cpu()
    torch.testing.assert_close(out[1], torch.nn.functional.layer_norm(t[1], (100,), eps=1e-5), **TOL[torch.float32])
    _close(out[[0, 2]], reference.layer_norm_rows(t[[0, 2]], weight, bias, 1e-5, slots[[0, 2]]), torch.float32)

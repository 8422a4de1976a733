"""Test inputs for the kernel tests: how adapters are spread over rows, and padded slot tables.

Tables are made twice: `kernel` tables have their padding (columns >= rank) filled with PAD = 1e3, so
any read of padding shows up as a huge error; `ref` tables are the same values with zero padding, the
pool's invariant that the torch reference relies on.
"""
import math

import torch

PAD = 1e3
PATTERNS = ("one", "distinct", "uniform", "zipf", "skewed", "some_none", "all_none")

# Tolerances vs the torch reference evaluated in fp32 on the same (rounded) inputs. Half dtypes differ
# by the final rounding of the output and the half-precision rank-r intermediate fed to the second GEMM
# (as on the tensor cores); bf16 also by the interpreter's truncating fp32 -> bf16 cast (1 ulp = 2^-8).
TOL = {
    torch.float32: dict(atol=1e-5, rtol=1e-4),
    torch.float16: dict(atol=4e-3, rtol=4e-3),
    torch.bfloat16: dict(atol=3e-2, rtol=2e-2),
}


def row_slots(pattern: str, num_rows: int, num_slots: int, gen: torch.Generator) -> torch.Tensor:
    """[B] int64 slots for one adapter-popularity pattern (-1 = no adapter)."""
    if pattern == "one":
        return torch.full((num_rows,), num_slots // 2, dtype=torch.int64)
    if pattern == "distinct":
        assert num_rows <= num_slots
        return torch.randperm(num_slots, generator=gen)[:num_rows]
    if pattern == "uniform":
        return torch.randint(0, num_slots, (num_rows,), generator=gen)
    if pattern == "zipf":  # P(slot k) ~ 1 / (k + 1)
        p = torch.tensor([1.0 / (k + 1) for k in range(num_slots)])
        return torch.multinomial(p, num_rows, replacement=True, generator=gen)
    if pattern == "skewed":  # one hot adapter, a thin tail
        hot = torch.rand(num_rows, generator=gen) < 0.75
        tail = torch.randint(1, num_slots, (num_rows,), generator=gen)
        return torch.where(hot, torch.zeros_like(tail), tail)
    if pattern == "some_none":
        slots = torch.randint(0, num_slots, (num_rows,), generator=gen)
        slots[torch.randperm(num_rows, generator=gen)[: max(1, num_rows // 3)]] = -1
        return slots
    if pattern == "all_none":
        return torch.full((num_rows,), -1, dtype=torch.int64)
    raise ValueError(pattern)


def mixed_ranks(num_slots: int, max_rank: int, gen: torch.Generator) -> torch.Tensor:
    """[S] int32 ranks in 1..max_rank, always including max_rank and 1."""
    ranks = torch.randint(1, max_rank + 1, (num_slots,), generator=gen)
    ranks[0], ranks[-1] = max_rank, 1
    return ranks.to(torch.int32)


def _normal(shape, std: float, gen: torch.Generator) -> torch.Tensor:
    return torch.randn(shape, generator=gen) * std


def _pad(table: torch.Tensor, ranks: torch.Tensor, dim: int, value: float) -> torch.Tensor:
    """Sets entries at positions >= ranks[s] along `dim` (of each slot s) to value."""
    table = table.clone()
    for s, r in enumerate(ranks.tolist()):
        table[s].narrow(dim - 1, r, table.shape[dim] - r).fill_(value)
    return table


def bottleneck_tables(S: int, H: int, R: int, ranks: torch.Tensor, act_ids: torch.Tensor, dtype, gen):
    """-> (kernel tables, ref tables): dicts with the keyword names of `kernels.bottleneck`."""
    raw = dict(w_down=_normal((S, R, H), 1.5 / math.sqrt(H), gen), b_down=_normal((S, R), 0.3, gen),
               w_up=_normal((S, R, H), 1.0 / math.sqrt(R), gen), b_up=_normal((S, H), 0.1, gen),
               scaling=0.5 + torch.rand((S, H), generator=gen))
    raw = {k: v.to(dtype) for k, v in raw.items()}
    pad_dims = dict(w_down=1, b_down=1, w_up=1)
    common = dict(act_ids=act_ids.to(torch.int32), ranks=ranks)
    kernel = {k: _pad(v, ranks, pad_dims[k], PAD) if k in pad_dims else v for k, v in raw.items()}
    ref = {k: _pad(v, ranks, pad_dims[k], 0.0) if k in pad_dims else v for k, v in raw.items()}
    return kernel | common, ref | common


def lora_tables(S: int, K: int, N: int, R: int, ranks: torch.Tensor, dtype, gen):
    """-> (kernel tables, ref tables): dicts with the keyword names of `kernels.add_lora`."""
    a = _normal((S, R, K), 1.5 / math.sqrt(K), gen).to(dtype)
    b = _normal((S, R, N), 1.0 / math.sqrt(R), gen).to(dtype)
    common = dict(scaling=0.25 + torch.rand(S, generator=gen), ranks=ranks)
    kernel = dict(lora_a=_pad(a, ranks, 1, PAD), lora_b=_pad(b, ranks, 1, PAD))
    ref = dict(lora_a=_pad(a, ranks, 1, 0.0), lora_b=_pad(b, ranks, 1, 0.0))
    return kernel | common, ref | common


def to_fp32(tables: dict) -> dict:
    """Upcasts float tables: the reference is evaluated in fp32 on the same rounded values."""
    return {k: v.float() if v.is_floating_point() else v for k, v in tables.items()}


def to_device(tables: dict, device) -> dict:
    return {k: v.to(device) for k, v in tables.items()}

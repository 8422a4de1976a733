"""The bottleneck junction on a mixed batch equals each row's own variant math, row by row.

`_apply_group` is the per-variant math that the oracle tests check against the `adapters` library; here
random batches (random variants and ranks, adapters present at only some junctions, rows without adapter,
post-LN and pre-LN junctions) go through `BottleneckSite` with its fused path and general groups, and each
row is compared with `_apply_group` on that row alone, in float64.
"""
import random

import pytest
import torch
from torch import nn

from engine.adapters.pool import AdapterPool
from engine.adapters.spec import AdapterSpec, BottleneckWeights, Method
from engine.batch import BottleneckGroup, BottleneckVariant, ResidualBeforeLN
from engine.batcher import build_adapter_batch
from engine.model.sites import BottleneckSite, _apply_group
from kernels import Act

H, T = 8, 3
COMMON = [  # Pfeiffer, Houlsby, parallel, and one with adapter LayerNorms (general path)
    BottleneckVariant(False, True, True, ResidualBeforeLN.TRUE, False, False, False),
    BottleneckVariant(False, False, True, ResidualBeforeLN.TRUE, False, False, False),
    BottleneckVariant(True, False, True, ResidualBeforeLN.TRUE, False, False, False),
    BottleneckVariant(False, False, True, ResidualBeforeLN.TRUE, True, True, False),
]


def _variant(rng: random.Random) -> BottleneckVariant:
    if rng.random() < 0.7:
        return rng.choice(COMMON)
    return BottleneckVariant(rng.random() < 0.3, rng.random() < 0.5, rng.random() < 0.8,
                             rng.choice(list(ResidualBeforeLN)), rng.random() < 0.5, rng.random() < 0.2,
                             rng.random() < 0.2)


def _weights(rank: int, g: torch.Generator) -> BottleneckWeights:
    def norm():
        return torch.rand(H, generator=g) + 0.5, torch.randn(H, generator=g)
    return BottleneckWeights(torch.randn(rank, H, generator=g), torch.randn(rank, generator=g),
                             torch.randn(rank, H, generator=g), torch.randn(H, generator=g),
                             torch.rand(H, generator=g) + 0.5, norm(), norm())


@pytest.mark.parametrize("seed", range(400))
def test_junction_rows_equal_their_variant_alone(seed):
    rng, g = random.Random(seed), torch.Generator().manual_seed(seed)
    pool = AdapterPool({}, ["a", "b"], H, 8, torch.device("cpu"), torch.float64)
    slots = []
    for i in range(rng.randint(1, 6)):
        sites = [s for s in ("a", "b") if rng.random() < 0.7] or ["b"]  # "b" only: absent at the junction tested
        junctions = {s: _weights(rng.choice([1, 4, 8, 20, 40]), g) for s in sites}
        spec = AdapterSpec(f"ad{i}", Method.BOTTLENECK, "test", act=rng.choice([Act.RELU, Act.IDENTITY, Act.TANH]),
                           variant=_variant(rng), bottleneck=junctions)
        slots.append(pool.load(spec))
    _assert_rows_match(pool, [rng.choice(slots + [-1]) for _ in range(rng.randint(1, 7))], g, rng.random() < 0.5)


def test_general_rows_outside_the_plain_span():
    """A general group split by an adapter that skips this junction, after a Pfeiffer row: the plain
    ln(h + x) is computed for the Pfeiffer row only, and the group must not read it."""
    g = torch.Generator().manual_seed(0)
    ln_before = COMMON[3]  # general path, input h
    pool = AdapterPool({}, ["a", "b"], H, 8, torch.device("cpu"), torch.float64)
    rows = [pool.load(AdapterSpec("p", Method.BOTTLENECK, "test", variant=COMMON[0], bottleneck={"a": _weights(4, g)})),
            pool.load(AdapterSpec("x", Method.BOTTLENECK, "test", variant=ln_before,
                                  bottleneck={"a": _weights(4, g), "b": _weights(4, g)})),
            pool.load(AdapterSpec("y", Method.BOTTLENECK, "test", variant=ln_before, bottleneck={"b": _weights(4, g)})),
            pool.load(AdapterSpec("z", Method.BOTTLENECK, "test", variant=ln_before,
                                  bottleneck={"a": _weights(4, g), "b": _weights(4, g)}))]
    _assert_rows_match(pool, rows, g, post_ln=True)


def _assert_rows_match(pool: AdapterPool, row_slots: list[int], g: torch.Generator, post_ln: bool) -> None:
    meta = build_adapter_batch(row_slots, pool)
    batch_slots = row_slots if meta.order is None else [row_slots[i] for i in meta.order.tolist()]  # sorted rows
    b = len(batch_slots)
    h = torch.randn(b, T, H, generator=g, dtype=torch.float64)
    x = torch.randn(b, T, H, generator=g, dtype=torch.float64)
    ln = None  # pre-LN (decoder) junction: a plain sum
    if post_ln:  # post-LN (encoder) junction
        ln = nn.LayerNorm(H).double()
        with torch.no_grad():
            ln.weight.uniform_(0.5, 1.5)
            ln.bias.normal_()
    site = BottleneckSite()
    site.path = "a"
    h0, x0 = h.clone(), x.clone()
    with torch.no_grad():
        y = site(h, x, ln, meta)
        assert torch.equal(h, h0) and torch.equal(x, x0), "the junction changed its inputs"
        tables, variants = pool.bottleneck["a"].tables, pool.bottleneck["a"].variants
        for r, s in enumerate(batch_slots):
            hr, xr = h[r:r + 1], x[r:r + 1]
            plain = hr + xr if ln is None else ln(hr + xr)
            if s in variants:
                want = _apply_group(tables, BottleneckGroup(variants[s], slice(0, 1), torch.tensor([s])), hr, xr,
                                    hr + xr, plain, ln)
            else:
                want = plain
            torch.testing.assert_close(y[r:r + 1], want, atol=1e-9, rtol=1e-9)

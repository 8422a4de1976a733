"""The torch reference ops equal their `Semantics:` docstrings, written here as plain per-row loops.

The reference is both the CPU serving path and the oracle for the Triton kernels, so it is checked
against the naive math across adapter popularity patterns (punica's test_sgmv idea).
"""
import pytest
import torch

from kernels import Act, apply_act, reference
from kernels.activations import ACT_BY_NAME, apply_act_

S, H, K = 6, 24, 20
RANKS = {  # per-slot ranks: one rank bucket, and ranks over four buckets (split into runs, then merged or not)
    "narrow": [8, 3, 5, 1, 8, 2],
    "wide": [2, 20, 40, 64, 9, 33],
}
PATTERNS = {
    "one_adapter": [2] * 8,
    "all_distinct": [0, 1, 2, 3, 4, 5],
    "zipf": [0, 0, 0, 0, 1, 1, 2, 5],
    "skewed_with_base_rows": [3, -1, 3, 3, -1, 3, 1],
    "base_rows_at_both_ends": [-1, 2, 2, -1, 4, -1],
    "no_adapter": [-1, -1, -1],
    "single_row": [4],
}


def _tables(gen, rank_list):
    ranks, R = torch.tensor(rank_list, dtype=torch.int32), max(rank_list)
    a, b = torch.randn(S, R, K, generator=gen), torch.randn(S, R, H, generator=gen)
    w_down, w_up = torch.randn(S, R, H, generator=gen), torch.randn(S, R, H, generator=gen)
    b_down = torch.randn(S, R, generator=gen)
    for s, r in enumerate(ranks.tolist()):  # the pool keeps padding columns at zero
        a[s, r:], b[s, r:], w_down[s, r:], w_up[s, r:], b_down[s, r:] = 0, 0, 0, 0, 0
    return ranks, a, b, w_down, b_down, w_up


@pytest.mark.parametrize("merge", ["merge_by_cost", "never_merge"])
@pytest.mark.parametrize("rank_set", RANKS)
@pytest.mark.parametrize("pattern", PATTERNS)
def test_ops_equal_their_semantics(pattern, rank_set, merge, monkeypatch):
    if merge == "never_merge":  # every rank bucket its own run (long prompts); tiny shapes otherwise merge all
        monkeypatch.setattr(reference, "MERGE_FLOPS", 0)
    gen = torch.Generator().manual_seed(1)
    slots = torch.tensor(PATTERNS[pattern])
    n, t = len(slots), 5
    ranks, a, b, w_down, b_down, w_up = _tables(gen, RANKS[rank_set])
    scaling, scale_vec = torch.rand(S, generator=gen), torch.rand(S, H, generator=gen)
    b_up, ia3 = torch.randn(S, H, generator=gen), torch.rand(S, H, generator=gen)
    acts = torch.tensor([Act.RELU, Act.GELU, Act.SILU, Act.TANH, Act.SIGMOID, Act.GELU_TANH], dtype=torch.int32)
    ln_w, ln_b = torch.rand(S, H, generator=gen), torch.randn(S, H, generator=gen)
    x, y = torch.randn(n, t, K, generator=gen), torch.randn(n, t, H, generator=gen)

    lora_out = reference.add_lora(y.clone(), x, a, b, scaling, ranks, slots)
    ia3_out = reference.scale_ia3(y.clone(), ia3, slots)
    acc = torch.randn(n, t, H, generator=gen)  # what the bottleneck adds into
    bn_out = reference.bottleneck(acc.clone(), y, w_down, b_down, w_up, b_up, scale_vec, acts, ranks, slots)
    for row, s in enumerate(slots.tolist()):
        if s < 0:
            assert torch.equal(lora_out[row], y[row]) and torch.equal(ia3_out[row], y[row])
            assert torch.equal(bn_out[row], acc[row])
            continue
        r = int(ranks[s])
        want = y[row] + scaling[s] * (x[row] @ a[s, :r].T) @ b[s, :r]
        torch.testing.assert_close(lora_out[row], want, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(ia3_out[row], y[row] * ia3[s])
        hidden = apply_act(y[row] @ w_down[s, :r].T + b_down[s, :r], Act(int(acts[s])))
        torch.testing.assert_close(bn_out[row], acc[row] + scale_vec[s] * (hidden @ w_up[s, :r] + b_up[s]),
                                   atol=1e-5, rtol=1e-5)
    active = slots[slots >= 0]
    if len(active):
        rows = (slots >= 0).nonzero().squeeze(1)
        normed = reference.layer_norm_rows(y[rows], ln_w, ln_b, 1e-5, active)
        want = torch.stack([torch.nn.functional.layer_norm(y[r], (H,), ln_w[s], ln_b[s], 1e-5)
                            for r, s in zip(rows.tolist(), active.tolist())])
        torch.testing.assert_close(normed, want)


def test_rank_runs_split_by_bucket_and_merge_when_padding_is_cheap(monkeypatch):
    ranks = [3, 12, 20, 24, 48, 200]  # buckets 16, 16, 32, 32, 64, 256
    monkeypatch.setattr(reference, "MERGE_FLOPS", 0)
    assert reference._rank_runs(ranks, 1) == [(0, 2, 12), (2, 4, 24), (4, 5, 48), (5, 6, 200)]
    monkeypatch.setattr(reference, "MERGE_FLOPS", 100)  # merging costs padding x 1 flop: cheap up to 100
    # [0,2)+[2,4): 4*24 = 96 <= 2*12+2*24+100; +[4,5): 5*48 = 240 <= 96+48+100; +[5,6): 6*200 > 240+200+100
    assert reference._rank_runs(ranks, 1) == [(0, 5, 48), (5, 6, 200)]


def test_short_rows_are_not_gathered_up_to_the_largest_rank(monkeypatch):
    # at a few tokens per row the multiply-adds of padding cost next to nothing, but its gathered weights do not:
    # counting only the former merged MiniLM's ranks 12-192 into one run that copied every row's weights at rank 192
    gathered = []
    gather = reference._gather
    monkeypatch.setattr(reference, "_gather", lambda table, slots, dim=None, size=None: (
        gathered.append(size), gather(table, slots, dim, size))[1])
    hidden, ranks = 384, [12, 24, 24, 48, 96, 192]
    n = len(ranks)
    slots = torch.arange(n)
    table = torch.zeros(n, max(ranks), hidden)
    acc, t = torch.zeros(n, 2, hidden), torch.randn(n, 2, hidden)
    act_ids = torch.zeros(n, dtype=torch.int32)
    reference.bottleneck(acc, t, table, torch.zeros(n, max(ranks)), table, torch.zeros(n, hidden),
                         torch.ones(n, hidden), act_ids, torch.tensor(ranks, dtype=torch.int32), slots)
    assert 192 not in gathered[:1] and len(set(gathered)) > 1, gathered


@pytest.mark.parametrize("name", sorted(ACT_BY_NAME))
def test_activations_match_transformers(name):
    from transformers.activations import get_activation

    x = torch.linspace(-12, 12, 2001)  # past gelu_10's clip and mish's softplus threshold
    # the adapters library maps "leakyrelu" to F.leaky_relu itself; every other name goes to transformers
    want = torch.nn.functional.leaky_relu(x) if name == "leakyrelu" else get_activation(name)(x)
    torch.testing.assert_close(apply_act(x, ACT_BY_NAME[name]), want, atol=1e-6, rtol=1e-6)  # formula order only


@pytest.mark.parametrize("act", list(Act))
def test_in_place_activations_equal_the_others_bitwise(act):
    x = torch.linspace(-12, 12, 2001).reshape(3, 667)
    y = x.clone()
    apply_act_(y[1:], act)  # a slice of a tensor, as the reference applies them per run of rows
    assert torch.equal(y[0], x[0]) and torch.equal(y[1:], apply_act(x[1:], act))


def test_every_activation_has_a_name():
    assert set(ACT_BY_NAME.values()) == set(Act)

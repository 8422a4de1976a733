"""Engine vs the `adapters` library (and PEFT) on tiny random bases: every case alone, then one mixed batch.

fp32, atol 1e-5 on every real (non-pad) token. The oracle (tests/oracle.py) records each adapter with the
whole shared batch; a mixed batch routes row j to adapter j, so its expected row is that case's row.
"""
import pytest
import torch

from engine import Engine
from oracle import ARCHS, build_oracle

ATOL = 1e-5


@pytest.fixture(scope="module", params=ARCHS)
def setup(request, tmp_path_factory):
    oracle = build_oracle(request.param, tmp_path_factory.mktemp(request.param))
    engine = Engine.from_pretrained(oracle.path, device="cpu")
    for name, case in oracle.cases.items():
        engine.load_adapter(case.path, name=name)
    return oracle, engine


def _diff_rows(got: torch.Tensor, want: torch.Tensor, mask: torch.Tensor) -> float:
    return (got - want)[mask.bool()].abs().max().item()


def test_base_model_equals_transformers(setup):
    oracle, engine = setup
    out = engine.forward(oracle.input_ids, oracle.attention_mask, [None] * 4, oracle.token_type_ids)
    assert _diff_rows(out.last_hidden_state, oracle.base_hidden, oracle.attention_mask) < ATOL
    assert all(logits is None for logits in out.logits)


def test_each_adapter_alone(setup):
    oracle, engine = setup
    assert len(oracle.cases) >= 30
    errors = {}
    for name, case in oracle.cases.items():
        out = engine.forward(oracle.input_ids, oracle.attention_mask, [name] * 4, oracle.token_type_ids)
        errors[name] = _diff_rows(out.last_hidden_state, case.hidden, oracle.attention_mask)
        if case.logits is not None:
            errors[name + ":head"] = _head_error(out.logits, case, oracle.attention_mask)
        else:
            assert all(logits is None for logits in out.logits), name
    bad = {k: v for k, v in errors.items() if not v < ATOL}
    assert not bad, f"cases over {ATOL}: {bad}"


def test_mixed_batch_every_row_a_different_adapter(setup):
    oracle, engine = setup
    names = list(oracle.cases) + [None, None]  # every case once, plus rows without adapter
    rows = [j % 4 for j in range(len(names))]
    names = names[1::2] + names[0::2]  # interleave methods so neighbouring rows differ in method
    ids, mask = oracle.input_ids[rows], oracle.attention_mask[rows]
    types = oracle.token_type_ids[rows] if oracle.token_type_ids is not None else None
    out = engine.forward(ids, mask, names, types)
    assert out.last_hidden_state.shape[0] == len(names) > 30
    for j, (name, row) in enumerate(zip(names, rows)):
        want = oracle.base_hidden[row] if name is None else oracle.cases[name].hidden[row]
        assert _diff_rows(out.last_hidden_state[j:j + 1], want[None], mask[j:j + 1]) < ATOL, (j, name)
        case = oracle.cases.get(name)
        if case is not None and case.logits is not None:
            assert _head_error((out.logits[j],), case, mask[j:j + 1], rows=[row]) < ATOL, (j, name)
        else:
            assert out.logits[j] is None


def _head_error(logits, case, mask, rows=None) -> float:
    rows = rows if rows is not None else range(len(logits))
    errs = []
    for got, row, m in zip(logits, rows, mask):
        want = case.logits[row]
        if case.head_type == "tagging":
            got, want = got[m.bool()], want[m.bool()]
        errs.append((got - want).abs().max().item())
    return max(errs)

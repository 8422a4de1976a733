"""Helpers of the lifecycle tests: compare a forward's rows with the oracle (the `adapters` library) row by row."""
import torch
from oracle import OracleBase

from engine import Engine

ATOL = 1e-5


def run(engine: Engine, bert: OracleBase, names: list[str | None], rows: list[int] | None = None, tenant=None):
    """Forward of oracle rows ``rows`` (default 0..len-1) with ``names[j]`` on row j."""
    rows = rows if rows is not None else list(range(len(names)))
    types = bert.token_type_ids[rows] if bert.token_type_ids is not None else None
    return engine.forward(bert.input_ids[rows], bert.attention_mask[rows], names, types, tenant)


def row_error(bert: OracleBase, got: torch.Tensor, row: int, case: str | None) -> float:
    """Max difference on the real tokens of oracle row ``row`` between ``got`` [T, H] and case ``case``."""
    want = bert.base_hidden[row] if case is None else bert.cases[case].hidden[row]
    mask = bert.attention_mask[row].bool()
    return (got[mask] - want[mask]).abs().max().item()


def assert_rows(bert: OracleBase, out, cases: list[str | None], rows: list[int] | None = None) -> None:
    rows = rows if rows is not None else list(range(len(cases)))
    for j, (case, row) in enumerate(zip(cases, rows)):
        assert row_error(bert, out.last_hidden_state[j], row, case) < ATOL, (j, case)


def placement(engine: Engine) -> dict[str, str]:
    """name -> tier, for every adapter."""
    return {info.name: info.tier for info in engine.list_adapters()}

"""Fixtures of the lifecycle tests: engines with chosen budgets on the session's tiny BERT oracle (`bert`, in
tests/conftest.py). The helpers the tests import live in `lifecycle_helpers`: a module named conftest is shadowed
by other folders'."""
import pytest

from engine import Engine, EngineConfig


@pytest.fixture()
def make_engine(bert):
    def make(**config) -> Engine:
        return Engine(EngineConfig(model=str(bert.path), device="cpu", **config))

    return make

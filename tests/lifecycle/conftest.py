"""Fixtures of the lifecycle tests: one tiny BERT oracle per session and engines with chosen budgets (the
helpers the tests import live in `lifecycle_helpers`: a module named conftest is shadowed by other folders')."""
import pytest
from oracle import OracleBase, build_oracle

from engine import Engine, EngineConfig


@pytest.fixture(scope="session")
def bert(tmp_path_factory) -> OracleBase:
    return build_oracle("bert", tmp_path_factory.mktemp("lifecycle-bert"))


@pytest.fixture()
def make_engine(bert):
    def make(**config) -> Engine:
        return Engine(EngineConfig(model=str(bert.path), device="cpu", **config))

    return make

"""The tiny BERT with every saved adapter case (tests/oracle.py), shared by the validation tests."""
import pytest

from engine import Engine
from oracle import build_oracle


@pytest.fixture(scope="module")
def bert(tmp_path_factory):
    return build_oracle("bert", tmp_path_factory.mktemp("bert"))


@pytest.fixture()
def engine(bert):
    return Engine.from_pretrained(bert.path, device="cpu")

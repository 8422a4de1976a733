"""A fresh engine on the shared tiny BERT (the `bert` fixture of tests/conftest.py) for each validation test."""
import pytest

from engine import Engine


@pytest.fixture()
def engine(bert):
    return Engine.from_pretrained(bert.path, device="cpu")

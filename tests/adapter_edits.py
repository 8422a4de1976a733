"""Copies and edits of the adapters an oracle saved (tests/oracle.py), and the check that a refused load leaves
the engine as it was."""
import json
import shutil
from pathlib import Path

import pytest
import torch
from oracle import OracleBase


def copy_case(bert: OracleBase, case: str, dst: Path) -> Path:
    """Case ``case``'s folder copied to ``dst``, to edit without touching the oracle's."""
    shutil.copytree(bert.cases[case].path, dst)
    return dst


def edit_config(folder, **changes):
    meta = json.loads((folder / "adapter_config.json").read_text())
    for key, value in changes.items():
        if key.startswith("config."):
            meta["config"][key[len("config."):]] = value
        else:
            meta[key] = value
    (folder / "adapter_config.json").write_text(json.dumps(meta))


def edit_weights(folder, edit):
    path = folder / "pytorch_adapter.bin"
    state = torch.load(path, weights_only=True)
    edit(state)
    torch.save(state, path)


def assert_refused(engine, folder, error, *fragments):
    before = (engine.list_adapters(), engine.pool.num_free)
    with pytest.raises(error) as info:
        engine.load_adapter(folder)
    for fragment in fragments:
        assert fragment in str(info.value), str(info.value)
    assert (engine.list_adapters(), engine.pool.num_free) == before  # nothing became visible

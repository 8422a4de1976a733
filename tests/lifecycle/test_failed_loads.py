"""A failed or corrupt load leaves the registry, the tiers and the download folder exactly as before, both
for a new name and for a re-load that would have replaced a serving version."""
import errno
import json
import re

import pytest
import torch
from adapter_edits import copy_case
from lifecycle_helpers import assert_rows, run

import engine.adapters.files as files
from engine import AdapterSourceError, InvalidAdapter, UnsupportedAdapter


def truncate(folder, name="pytorch_adapter.bin"):
    data = (folder / name).read_bytes()
    (folder / name).write_bytes(data[: len(data) // 2])


def bad_json(folder):
    (folder / "adapter_config.json").write_text('{"config": {"architecture": "lora"')


def wrong_shape(folder):
    state = torch.load(folder / "pytorch_adapter.bin", weights_only=True)
    state["bert.encoder.layer.1.attention.self.value.loras.ia3.lora_B"] = torch.ones(48, 1)
    torch.save(state, folder / "pytorch_adapter.bin")


CORRUPTIONS = {  # name: (oracle case, how to break its copy, error, message fragment)
    "truncated bin": ("par_bn", truncate, InvalidAdapter, "cannot read pytorch_adapter.bin"),
    "truncated safetensors": ("seq_bn_st", lambda f: truncate(f, "adapter.safetensors"), InvalidAdapter,
                              "cannot read adapter.safetensors"),
    "bad json": ("lora_leave1", bad_json, InvalidAdapter, "cannot read adapter_config.json"),
    "wrong shape": ("ia3", wrong_shape, InvalidAdapter, "shape (48, 1)"),
}


def _state(engine):
    downloads = sorted(engine.adapters.sources.download_dir.iterdir())
    return engine.list_adapters(), engine.pool.num_free, downloads


@pytest.fixture()
def serving(make_engine, bert):
    engine = make_engine(max_device_adapters=3)
    engine.load_adapter(bert.cases["lora"].path, name="x")
    engine.load_adapter(bert.cases["double_seq_bn"].path, name="other", tenant="acme")
    return engine


@pytest.mark.parametrize("corruption", CORRUPTIONS)
@pytest.mark.parametrize("name", ["new", "x"])  # "x" re-loads the serving adapter's name
def test_corrupt_files_change_nothing(serving, bert, tmp_path, corruption, name):
    case, breaks, error, fragment = CORRUPTIONS[corruption]
    folder = copy_case(bert, case, tmp_path / case)
    breaks(folder)
    before = _state(serving)
    with pytest.raises(error, match=re.escape(fragment)):
        serving.load_adapter(folder, name=name)
    assert _state(serving) == before
    assert_rows(bert, run(serving, bert, ["x", None]), ["lora", None])  # the old version still serves


@pytest.mark.parametrize("name", ["new", "x"])
def test_disk_error_mid_read_changes_nothing(serving, bert, tmp_path, monkeypatch, name):
    folder = copy_case(bert, "seq_bn_st", tmp_path / "seq_bn_st")

    read = files.read_regular

    def failing_disk(path):
        if path.suffix != ".safetensors":
            return read(path)  # the config reads fine, then the medium fails under the weights
        with open(path, "rb") as f:
            f.read(64)
        raise OSError(errno.EIO, "Input/output error", str(path))

    monkeypatch.setattr(files, "read_regular", failing_disk)
    before = _state(serving)
    with pytest.raises(AdapterSourceError, match="I/O error reading adapter.safetensors"):
        serving.load_adapter(folder, name=name)
    assert _state(serving) == before
    assert_rows(bert, run(serving, bert, ["x"]), ["lora"])


def test_unsupported_config_of_a_reload_keeps_the_old_version(serving, bert, tmp_path):
    folder = copy_case(bert, "seq_bn_rf", tmp_path / "rf")
    meta = json.loads((folder / "adapter_config.json").read_text())
    meta["config"]["phm_layer"] = True
    (folder / "adapter_config.json").write_text(json.dumps(meta))
    before = _state(serving)
    with pytest.raises(UnsupportedAdapter, match="Compacter"):
        serving.load_adapter(folder, name="x")
    assert _state(serving) == before


@pytest.mark.parametrize("name", ["new", "x"])
def test_failed_device_copy_changes_nothing(serving, bert, monkeypatch, name):
    def out_of_memory(slot, spec):
        raise RuntimeError("device out of memory")  # e.g. growing a stack for a larger rank

    monkeypatch.setattr(serving.pool, "_write", out_of_memory)
    before, versions = _state(serving), len(serving.adapters.tiers._entries)
    with pytest.raises(RuntimeError, match="out of memory"):
        serving.load_adapter(bert.cases["ia3"].path, name=name, pin=True)
    assert (_state(serving), len(serving.adapters.tiers._entries)) == (before, versions)
    monkeypatch.undo()
    assert_rows(bert, run(serving, bert, ["x"]), ["lora"])

"""Oracles written to disk and read back, so the engine can be checked where the `adapters` library is absent.

The library pins transformers 4.57, but the engine must also run on transformers 5.x (the GPU machines have
it, and so will many users). With ``ADAPTERSERVE_ORACLE_DIR`` set, `tests.oracle.build_oracle` keeps each
architecture's oracle in ``<dir>/<arch>``: a run with the library writes it, a run without it (a transformers
5 venv, a GPU machine) reads it. The folder holds what `build_oracle` makes (``base/``, ``adapters/<name>/``)
plus ``oracle.json`` (case names and head types) and ``oracle.safetensors`` (inputs and reference outputs).
Each test gets its own copy of the folder, so tests that edit adapter files never touch the stored one; the
copies' adapter configs name the copy's base model, as the library would have written them there.
``<dir>/minilm`` holds the headed adapters on the real MiniLM of the text API and service tests (`tests.minilm`).
"""
from __future__ import annotations

import importlib
import json
import os
import shutil
from pathlib import Path

from safetensors.torch import load_file, save_file

ORACLE_DIR_ENV = "ADAPTERSERVE_ORACLE_DIR"
INDEX, TENSORS = "oracle.json", "oracle.safetensors"


def library_installed() -> bool:
    """Whether the `adapters` library can write oracles here."""
    try:  # importing it: its lazy module has no __spec__, so importlib.util.find_spec cannot tell
        importlib.import_module("adapters")
    except ImportError:
        return False
    return True


def stored_oracle_dir(arch: str) -> Path | None:
    """``<ADAPTERSERVE_ORACLE_DIR>/<arch>``, or None when oracles are built afresh for every test."""
    root = os.environ.get(ORACLE_DIR_ENV)
    return Path(root).resolve() / arch if root else None


def save_oracle(oracle, root: Path) -> None:
    """Writes the index and tensors of an `OracleBase` whose folders already lie under ``root``."""
    tensors = {"input_ids": oracle.input_ids, "attention_mask": oracle.attention_mask,
               "base_hidden": oracle.base_hidden}
    optional = {"token_type_ids": oracle.token_type_ids, "pooled": oracle.pooled}
    tensors |= {k: v for k, v in optional.items() if v is not None}
    for name, case in oracle.cases.items():
        tensors[f"hidden.{name}"] = case.hidden
        if case.logits is not None:
            tensors[f"logits.{name}"] = case.logits
    save_file({k: v.contiguous() for k, v in tensors.items()}, root / TENSORS)
    index = {"arch": oracle.arch, "cases": {name: case.head_type for name, case in oracle.cases.items()}}
    (root / INDEX).write_text(json.dumps(index, indent=1))


def copy_oracle(stored: Path, root: Path, peft: bool):
    """The oracle stored under ``stored``, copied to ``root`` (paths point into the copy); peft=False drops
    the PEFT cases as `build_oracle` would not have made them."""
    from oracle import OracleBase, OracleCase

    if not (stored / INDEX).is_file():
        raise FileNotFoundError(f"no stored oracle in {stored}: run the tests once with the `adapters` library "
                                f"installed and {ORACLE_DIR_ENV} set to write it")
    shutil.copytree(stored, root, dirs_exist_ok=True)
    for config in (root / "adapters").glob("*/adapter_config.json"):  # as if built here: base path of the copy
        meta = json.loads(config.read_text())
        for key in ("model_name", "base_model_name_or_path"):  # AdapterHub, PEFT
            if meta.get(key) == str(stored / "base"):
                meta[key] = str(root / "base")
        config.write_text(json.dumps(meta, indent=2))
    index = json.loads((root / INDEX).read_text())
    t = load_file(root / TENSORS)
    cases = {name: OracleCase(name, root / "adapters" / name, t[f"hidden.{name}"], t.get(f"logits.{name}"), head)
             for name, head in index["cases"].items() if peft or not name.startswith("peft_")}
    return OracleBase(index["arch"], root / "base", t["input_ids"], t["attention_mask"], t.get("token_type_ids"),
                      t["base_hidden"], t.get("pooled"), cases)


if __name__ == "__main__":  # python tests/oracle_store.py: makes sure every oracle is stored
    import tempfile

    from minilm import build_minilm_adapters
    from oracle import ARCHS, build_oracle

    if stored_oracle_dir("any") is None:
        raise SystemExit(f"set {ORACLE_DIR_ENV} to the folder to write the oracles to")
    with tempfile.TemporaryDirectory() as tmp:
        for arch in ARCHS:
            build_oracle(arch, Path(tmp) / arch)
        build_minilm_adapters(Path(tmp) / "minilm")

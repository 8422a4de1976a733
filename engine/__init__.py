"""adapterserve engine: one resident base model, a different adapter on every row of a batch."""
import kernels as _kernels

if not hasattr(_kernels, "add_lora"):  # checked first: otherwise the failure is an ImportError of some name deep down
    raise ImportError(
        f"`import kernels` found {getattr(_kernels, '__file__', _kernels)}, not adapterserve's adapter ops: another "
        "installed package has the same top-level name, most likely huggingface's `kernels` (a dependency of "
        "transformers >= 5.25). Uninstall it (`pip uninstall kernels`; adapterserve requires transformers < 5.25, "
        "which does not need it) and start again.")
from engine.config import EngineConfig
from engine.engine import Engine
from engine.errors import (AdapterCapacityExceeded, AdapterNotFound, AdapterServeError, AdapterSourceError,
                           AdapterSourceRefused, InvalidAdapter, InvalidRequest, ModelLoadError, UnsupportedAdapter)
from engine.types import AdapterInfo, CatalogEntry, Classification, ForwardOutput, Pooling, TokenTag

__all__ = ["Engine", "EngineConfig", "AdapterInfo", "CatalogEntry", "Classification", "ForwardOutput", "Pooling",
           "TokenTag", "AdapterServeError", "AdapterNotFound", "AdapterCapacityExceeded", "AdapterSourceError",
           "AdapterSourceRefused", "InvalidAdapter", "InvalidRequest", "ModelLoadError", "UnsupportedAdapter"]

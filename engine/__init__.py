"""adapterserve engine: one resident base model, a different adapter on every row of a batch."""
from engine.config import EngineConfig
from engine.engine import Engine
from engine.errors import (AdapterCapacityExceeded, AdapterNotFound, AdapterServeError, AdapterSourceError,
                           AdapterSourceRefused, InvalidAdapter, InvalidRequest, ModelLoadError, UnsupportedAdapter)
from engine.types import AdapterInfo, CatalogEntry, Classification, ForwardOutput, Pooling, TokenTag

__all__ = ["Engine", "EngineConfig", "AdapterInfo", "CatalogEntry", "Classification", "ForwardOutput", "Pooling",
           "TokenTag", "AdapterServeError", "AdapterNotFound", "AdapterCapacityExceeded", "AdapterSourceError",
           "AdapterSourceRefused", "InvalidAdapter", "InvalidRequest", "ModelLoadError", "UnsupportedAdapter"]

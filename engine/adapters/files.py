"""Reading adapter files safely: JSON, safetensors or torch .bin (``weights_only=True``), checked values.

Every failure becomes `InvalidAdapter` naming the file, so a corrupt upload never surfaces as a raw
pickle, JSON or OS error; a failing medium (EIO and the like) becomes `AdapterSourceError` instead.
"""
import errno
import io
import json
import math
import os
import stat
from dataclasses import dataclass
from pathlib import Path
from typing import Mapping

import safetensors.torch
import torch

from engine.errors import AdapterSourceError, InvalidAdapter
from engine.model.common import ArchInfo

# OSErrors of the medium or of access, not of the file's content: the source is at fault and a retry may
# work (AdapterSourceError); any other read failure means a corrupt file (InvalidAdapter)
MEDIUM_ERRNOS = frozenset({errno.EIO, errno.ENXIO, errno.ENODEV, errno.ESTALE, errno.ETIMEDOUT, errno.EAGAIN,
                           errno.EACCES, errno.EPERM, errno.ENOMEM})


@dataclass(frozen=True)
class TargetModel:
    """What validation needs to know of the base model an adapter will be attached to."""

    info: ArchInfo
    linear: Mapping[str, tuple[int, int]]  # site path -> (in_features, out_features)
    junctions: frozenset[str]  # bottleneck site paths
    has_pooler: bool = False  # an encoder whose checkpoint holds its pooler (use_pooler heads read it)


def read_json(path: Path) -> dict:
    try:
        data = json.loads(read_regular(path).decode("utf-8"))
    except FileNotFoundError:
        present(path)  # a link to no file is named as one
        raise InvalidAdapter(str(path.parent), f"missing {path.name}") from None
    except ValueError as exc:  # not UTF-8, not JSON, or an integer past Python's 4300 digits
        raise InvalidAdapter(str(path.parent), f"cannot read {path.name}: {exc}") from None
    except RecursionError:  # json's decoder recurses once per nesting level: "[[[[..." a few thousand deep
        raise InvalidAdapter(str(path.parent), f"cannot read {path.name}: nested too deeply") from None
    except OSError as exc:
        if exc.errno in MEDIUM_ERRNOS:
            raise AdapterSourceError(str(path.parent), f"I/O error reading {path.name}: {exc}") from None
        if exc.errno == errno.ELOOP:
            present(path)
        raise InvalidAdapter(str(path.parent), f"cannot read {path.name}: {exc}") from None
    if not isinstance(data, dict):
        raise InvalidAdapter(str(path.parent), f"{path.name} must hold a JSON object")
    return data


def present(path: Path) -> bool:
    """Whether the folder holds ``path``. A symbolic link that leads to no file (dangling, or a loop) is refused,
    not read as absent: as absent it dropped a head without a word, or served the other of two weights files."""
    if path.exists():
        return True
    if path.is_symlink():
        raise InvalidAdapter(str(path.parent), f"{path.name} is a symbolic link that leads to no file (its target is "
                                               "missing, or the links form a loop)")
    return False


def read_weights(folder: Path, safetensors_name: str, bin_name: str) -> dict[str, torch.Tensor]:
    """The weights file that exists. When both do, they must hold the same tensors: the `adapters` library
    reads the .bin by default, PEFT and `use_safetensors=True` the safetensors, so either choice of ours would
    serve one of them wrongly."""
    found = [name for name in (safetensors_name, bin_name) if present(folder / name)]
    if not found:
        raise InvalidAdapter(str(folder), f"no weights file ({safetensors_name} or {bin_name})")
    states = [_read_weights_file(folder, name) for name in found]
    if len(states) == 2 and not _same_tensors(*states):
        raise InvalidAdapter(str(folder), f"{safetensors_name} and {bin_name} hold different weights (the adapters "
                                          "library reads the .bin by default, PEFT the safetensors): keep one")
    return states[0]


def _read_weights_file(folder: Path, name: str) -> dict[str, torch.Tensor]:
    """The file is read into memory we own, then parsed: safetensors' default mmap would keep host copies backed
    by the file, and a file rewritten in place under a cached adapter would then crash the process (SIGBUS).
    .bin files are unpickled with weights_only only."""
    path = folder / name
    try:
        data = read_regular(path)
        if name.endswith(".safetensors"):  # in key order, as load_file gives them: errors name the first bad key
            return dict(sorted(safetensors.torch.load(data).items()))
        state = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    except InvalidAdapter:
        raise
    except Exception as exc:  # truncated zip, bad header, refused pickle: a corrupt file; or a failing disk
        if isinstance(exc, OSError) and exc.errno in MEDIUM_ERRNOS:
            raise AdapterSourceError(str(folder), f"I/O error reading {name}: {exc}") from None
        raise InvalidAdapter(str(folder), f"cannot read {name}: {type(exc).__name__}: {exc}") from None
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise InvalidAdapter(str(folder), f"{name} is not a state dict of tensors")
    for key, value in state.items():  # weights_only also unpickles sparse, meta and quantized tensors
        if not isinstance(key, str):
            raise InvalidAdapter(str(folder), f"{name} is not a state dict: key {key!r} is no string")
        if value.layout != torch.strided or value.is_meta or value.is_quantized:
            kind = "a meta" if value.is_meta else "a quantized" if value.is_quantized else f"a {value.layout}"
            raise InvalidAdapter(str(folder), f"{kind} tensor, not dense weights ({name})", key)
    return state


def _same_tensors(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    """Same keys, dtypes, shapes and values. By value, not bit for bit: -0.0 equals 0.0 (the two serve alike), and
    a NaN equals any NaN, whatever its payload, so a folder with NaN in both is refused for the NaN by the value
    checks later, not as two differing files."""
    return a.keys() == b.keys() and all(_same_values(a[k], b[k]) for k in a)


def _same_values(x: torch.Tensor, y: torch.Tensor) -> bool:
    if x.dtype != y.dtype or x.shape != y.shape:
        return False
    if not x.is_floating_point():
        return torch.equal(x, y)
    return bool(torch.eq(x, y).logical_or_(x.isnan().logical_and_(y.isnan())).all())


def read_regular(path: Path) -> bytes:
    """The bytes of ``path`` if it is a regular file (after symbolic links), else InvalidAdapter.

    Opening a FIFO would wait for a writer forever, holding a worker thread (a few of those stop every admin
    call), so it is opened without blocking and checked on the open descriptor: a check before a separate open
    could be raced by swapping the file in between. FileNotFoundError when missing.
    """
    fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK)
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):  # before fdopen, which refuses a directory as "[Errno 21] ...: <fd>"
            raise InvalidAdapter(str(path.parent), f"{path.name} is not a regular file")
        file = os.fdopen(fd, "rb")
    except BaseException:
        os.close(fd)
        raise
    with file:
        return file.read()


def checked(tensor: torch.Tensor, source: str, key: str, shape: tuple[int, ...]) -> torch.Tensor:
    """The tensor as float32 if it has the expected shape and only finite values."""
    if tuple(tensor.shape) != tuple(shape):
        raise InvalidAdapter(source, f"shape {tuple(tensor.shape)} does not fit the base model, expected {tuple(shape)}", key)
    if not tensor.is_floating_point():
        raise InvalidAdapter(source, f"dtype {tensor.dtype} is not a floating point type", key)
    tensor = tensor.float()
    if not bool(torch.isfinite(tensor).all()):
        raise InvalidAdapter(source, "contains NaN or infinite values", key)
    return tensor


def layer_list(value, source: str, field: str) -> list[int]:
    """A config field holding layer numbers (``leave_out``): a JSON list of integers."""
    if not isinstance(value, list) or not all(isinstance(v, int) and not isinstance(v, bool) for v in value):
        raise InvalidAdapter(source, f"{field} must be a list of layer numbers, got {value!r}")
    return value


def finite_number(value, source: str, field: str) -> float:
    """A numeric config field (alpha, scaling): a JSON number, not NaN or infinite (which would make every
    output of the adapter NaN without an error)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise InvalidAdapter(source, f"{field} must be a finite number, got {value!r}")
    return float(value)


def positive_int(value, source: str, field: str) -> int:
    """An integer config field that must be at least 1 (a LoRA rank): a JSON integer, not a bool."""
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise InvalidAdapter(source, f"{field} must be a positive integer, got {value!r}")
    return value


def take(state: dict[str, torch.Tensor], key: str, source: str) -> torch.Tensor:
    """Pops a required key; its absence is an error naming the key."""
    if key not in state:
        raise InvalidAdapter(source, "missing key", key)
    return state.pop(key)

"""Activation table shared by the kernels and the model code.

Adapters choose their activation per slot, so kernels receive an integer id per slot and apply the
function for that id. Names follow `transformers.get_activation` plus the `adapters` library's extra
"leakyrelu" spelling; the math matches those modules exactly (fp32, 1e-7), not approximately.
"""
import math
from enum import IntEnum

import torch
import torch.nn.functional as F


class Act(IntEnum):
    """Activation ids as stored in per-slot tables (int32 on device)."""

    IDENTITY = 0
    RELU = 1
    GELU = 2  # exact erf GELU
    GELU_TANH = 3  # tanh approximation ("gelu_new", "gelu_pytorch_tanh")
    SILU = 4  # "swish", "silu"
    TANH = 5
    LEAKY_RELU = 6  # negative slope 0.01
    SIGMOID = 7
    QUICK_GELU = 8


ACT_BY_NAME: dict[str, Act] = {
    "linear": Act.IDENTITY,
    "identity": Act.IDENTITY,
    "relu": Act.RELU,
    "gelu": Act.GELU,
    "gelu_new": Act.GELU_TANH,
    "gelu_pytorch_tanh": Act.GELU_TANH,
    "swish": Act.SILU,
    "silu": Act.SILU,
    "tanh": Act.TANH,
    "leakyrelu": Act.LEAKY_RELU,
    "leaky_relu": Act.LEAKY_RELU,
    "sigmoid": Act.SIGMOID,
    "quick_gelu": Act.QUICK_GELU,
}


def act_from_name(name: str | None) -> Act:
    """Resolves a config string; raises KeyError for names we do not implement (or values that are no string)."""
    if name is None:
        return Act.IDENTITY
    if not isinstance(name, str):
        raise KeyError(name)
    return ACT_BY_NAME[name.lower()]


def apply_act(x: torch.Tensor, act: Act) -> torch.Tensor:
    """Applies one activation with the same formula as transformers' module of that name."""
    if act == Act.IDENTITY:
        return x
    if act == Act.RELU:
        return F.relu(x)
    if act == Act.GELU:
        return F.gelu(x)
    if act == Act.GELU_TANH:
        return 0.5 * x * (1.0 + torch.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * torch.pow(x, 3.0))))
    if act == Act.SILU:
        return F.silu(x)
    if act == Act.TANH:
        return torch.tanh(x)
    if act == Act.LEAKY_RELU:
        return F.leaky_relu(x)
    if act == Act.SIGMOID:
        return torch.sigmoid(x)
    if act == Act.QUICK_GELU:
        return x * torch.sigmoid(1.702 * x)
    raise ValueError(f"unknown activation id {act!r}")

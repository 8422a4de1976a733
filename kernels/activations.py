"""Activation table shared by the kernels and the model code.

Adapters choose their activation per slot, so kernels receive an integer id per slot and apply the
function for that id. Names follow `transformers.get_activation` plus the `adapters` library's extra
"leakyrelu" spelling; the math is those modules' formulas (fp32 results within 1e-6: aliases such as
"gelu_python" or "gelu_fast" compute the same function with their terms in another order), not approximations.
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
    MISH = 9
    RELU6 = 10
    RELU_SQUARED = 11  # "relu2"
    GELU_CLIPPED = 12  # "gelu_10": erf GELU clipped to [-10, 10]
    LAPLACE = 13  # 0.5 * (1 + erf((x - 0.707107) / (0.282095 * sqrt(2))))


ACT_BY_NAME: dict[str, Act] = {
    "linear": Act.IDENTITY,
    "relu": Act.RELU,
    "gelu": Act.GELU,
    "gelu_python": Act.GELU,
    "gelu_new": Act.GELU_TANH,
    "gelu_pytorch_tanh": Act.GELU_TANH,
    "gelu_python_tanh": Act.GELU_TANH,
    "gelu_accurate": Act.GELU_TANH,
    "gelu_fast": Act.GELU_TANH,  # the same tanh approximation, its terms in another order (1e-7 apart)
    "swish": Act.SILU,
    "silu": Act.SILU,
    "tanh": Act.TANH,
    "leakyrelu": Act.LEAKY_RELU,
    "leaky_relu": Act.LEAKY_RELU,
    "sigmoid": Act.SIGMOID,
    "quick_gelu": Act.QUICK_GELU,
    "mish": Act.MISH,
    "relu6": Act.RELU6,
    "relu2": Act.RELU_SQUARED,
    "gelu_10": Act.GELU_CLIPPED,
    "laplace": Act.LAPLACE,
}  # transformers' "prelu" and "xielu" have parameters of their own: not served


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
    if act == Act.MISH:
        return F.mish(x)
    if act == Act.RELU6:
        return F.relu6(x)
    if act == Act.RELU_SQUARED:
        return torch.square(F.relu(x))
    if act == Act.GELU_CLIPPED:
        return torch.clip(F.gelu(x), -10.0, 10.0)
    if act == Act.LAPLACE:
        return 0.5 * (1.0 + torch.erf((x - 0.707107).div(0.282095 * math.sqrt(2.0))))
    raise ValueError(f"unknown activation id {act!r}")


# In-place forms of the activations that have one: the same kernels as `apply_act`'s (bitwise equal), without
# a temporary and a copy back, which cost as much as the activation itself on small adapter activations.
_IN_PLACE = {
    Act.RELU: torch.relu_,
    Act.GELU: torch.ops.aten.gelu_,
    Act.SILU: lambda x: F.silu(x, inplace=True),
    Act.TANH: torch.tanh_,
    Act.LEAKY_RELU: F.leaky_relu_,
    Act.SIGMOID: torch.sigmoid_,
}


def apply_act_(x: torch.Tensor, act: Act) -> None:
    """`apply_act` in place: x = act(x)."""
    if act in _IN_PLACE:
        _IN_PLACE[act](x)
    elif act != Act.IDENTITY:
        x.copy_(apply_act(x, act))

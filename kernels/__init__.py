"""Adapter ops: every adapter of a mixed batch applied in one call per site.

Conventions for all ops: the batch is ``[B, T, ·]`` rows, ``row_slots[b]`` is row b's slot in the
pool (int64, ``-1`` = no adapter at this site), and per-slot tables are stacks ``[S, ...]`` padded to
the largest rank with zeros. CPU tensors run the torch reference (``kernels.reference``); CUDA tensors
run the Triton kernels (``kernels.bottleneck``/``lora``/``ia3``/``layernorm``), which take the same
arguments. ``ADAPTERSERVE_KERNELS`` (read at every call) overrides the choice: ``auto`` (default),
``torch``, or ``triton`` (on CPU tensors only when ``TRITON_INTERPRET=1`` was set before this package
was imported; otherwise a RuntimeError). Triton is optional: without it, ``auto`` always uses torch.
"""
import os

import torch

from . import reference
from .activations import Act, act_from_name, apply_act

# The Triton modules are imported here, BEFORE the public functions below are defined: the submodule
# `kernels.bottleneck` has the same name as the op `bottleneck`, and importing a submodule binds it as
# an attribute of the package. Defining the functions afterwards makes `kernels.bottleneck` the op.
# (Reach the module itself with `from kernels.bottleneck import ...` or sys.modules.)
try:
    from . import bottleneck as _bottleneck_triton
    from . import ia3 as _ia3_triton
    from . import layernorm as _layernorm_triton
    from . import lora as _lora_triton
    from .segments import INTERPRET as _INTERPRET
except ImportError as e:  # triton (or numpy, which its interpreter needs) is not installed
    _TRITON_MISSING: str | None = f"{type(e).__name__}: {e}"
    _INTERPRET = False
else:
    _TRITON_MISSING = None

__all__ = ["Act", "act_from_name", "apply_act", "add_lora", "scale_ia3", "bottleneck", "layer_norm_rows"]
BACKEND_ENV = "ADAPTERSERVE_KERNELS"


def use_triton(x: torch.Tensor) -> bool:
    """The backend for an op whose activations are `x`: True = Triton kernel, False = torch reference."""
    mode = os.environ.get(BACKEND_ENV, "auto")
    if mode == "torch":
        return False
    if mode == "auto":
        return x.is_cuda and _TRITON_MISSING is None
    if mode != "triton":
        raise ValueError(f"{BACKEND_ENV} must be auto, torch or triton, got {mode!r}")
    if _TRITON_MISSING is not None:
        raise RuntimeError(f"{BACKEND_ENV}=triton but the Triton kernels could not be imported ({_TRITON_MISSING})")
    if not x.is_cuda and not _INTERPRET:
        raise RuntimeError(f"{BACKEND_ENV}=triton on {x.device} tensors needs TRITON_INTERPRET=1 set before "
                           "`kernels` is imported (the Triton kernels otherwise need CUDA tensors)")
    return True


def add_lora(y, x, lora_a, lora_b, scaling, ranks, row_slots) -> torch.Tensor:
    """Multi-LoRA: adds each row's low-rank update into the base layer's output, in place.

    Semantics: for each row b with s = row_slots[b] >= 0 and every token t,
        y[b, t] += scaling[s] * (x[b, t] @ lora_a[s, :ranks[s]].T) @ lora_b[s, :ranks[s]]
    rows with s = -1 are untouched. Returns y. Columns >= ranks[s] are never read by the Triton kernel
    (the reference relies on them being zero).
    """
    impl = _lora_triton if use_triton(y) else reference
    return impl.add_lora(y, x, lora_a, lora_b, scaling, ranks, row_slots)


def scale_ia3(y, ia3, row_slots) -> torch.Tensor:
    """IA3: multiplies each row's base layer output (bias included) by its slot's vector, in place.

    Semantics: y[b, t] *= ia3[s] for s = row_slots[b] >= 0; rows with s = -1 are untouched. Returns y.
    """
    impl = _ia3_triton if use_triton(y) else reference
    return impl.scale_ia3(y, ia3, row_slots)


def bottleneck(y, t, w_down, b_down, w_up, b_up, scaling, act_ids, ranks, row_slots) -> torch.Tensor:
    """Gathered bottleneck adapter body (down-projection, activation, up-projection, scale), added into y.

    Semantics: for s = row_slots[b] >= 0, r = ranks[s], act = Act(act_ids[s]):
        y[b, t] += scaling[s] * (act(t[b, t] @ w_down[s, :r].T + b_down[s, :r]) @ w_up[s, :r] + b_up[s])
    in place; rows with s = -1 are untouched. Returns y. Accumulating (like `add_lora`) lets the
    junction add the adapter straight into h + x, with no [B, T, H] temporary written and read back.
    The residual and LayerNorm variants are applied by the caller (from zeros or their residual).
    Columns >= ranks[s] are never read by the Triton kernel (the reference relies on them being zero).
    """
    impl = _bottleneck_triton if use_triton(t) else reference
    return impl.bottleneck(y, t, w_down, b_down, w_up, b_up, scaling, act_ids, ranks, row_slots)


def layer_norm_rows(t, weight, bias, eps, row_slots) -> torch.Tensor:
    """LayerNorm over the last dim with per-row affine parameters taken from the row's slot.

    Semantics: out[b, t] = (t[b, t] - mean) / sqrt(var + eps) * weight[s] + bias[s], s = row_slots[b] >= 0,
    with mean and the biased var over the last dim; returns a new tensor. Every row needs s >= 0
    (callers pass adapter rows only); s = -1 is outside the contract: the Triton kernel then applies no
    affine, the torch reference does not define it.
    """
    impl = _layernorm_triton if use_triton(t) else reference
    return impl.layer_norm_rows(t, weight, bias, eps, row_slots)

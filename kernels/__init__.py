"""Adapter ops: every adapter of a mixed batch applied in one call per site.

Conventions for all ops: the batch is ``[B, T, ·]`` rows, ``row_slots[b]`` is row b's slot in the
pool (int64, ``-1`` = no adapter at this site), and per-slot tables are stacks ``[S, ...]`` padded to
the largest rank with zeros. CPU tensors run the torch reference (``kernels.reference``); the Triton
kernels take the same arguments.
"""
import torch

from . import reference
from .activations import Act, act_from_name, apply_act

__all__ = ["Act", "act_from_name", "apply_act", "add_lora", "scale_ia3", "bottleneck", "layer_norm_rows"]


def add_lora(y, x, lora_a, lora_b, scaling, ranks, row_slots) -> torch.Tensor:
    """Multi-LoRA: adds each row's low-rank update into the base layer's output, in place.

    Semantics: for each row b with s = row_slots[b] >= 0 and every token t,
        y[b, t] += scaling[s] * (x[b, t] @ lora_a[s, :ranks[s]].T) @ lora_b[s, :, :ranks[s]].T
    rows with s = -1 are untouched. Returns y.
    """
    return reference.add_lora(y, x, lora_a, lora_b, scaling, ranks, row_slots)


def scale_ia3(y, ia3, row_slots) -> torch.Tensor:
    """IA3: multiplies each row's base layer output (bias included) by its slot's vector, in place.

    Semantics: y[b, t] *= ia3[s] for s = row_slots[b] >= 0; rows with s = -1 are untouched. Returns y.
    """
    return reference.scale_ia3(y, ia3, row_slots)


def bottleneck(t, w_down, b_down, w_up, b_up, scaling, act_ids, ranks, row_slots) -> torch.Tensor:
    """Gathered bottleneck adapter body (down-projection, activation, up-projection, scale).

    Semantics: for s = row_slots[b] >= 0, r = ranks[s], act = Act(act_ids[s]):
        out[b, t] = scaling[s] * (act(t[b, t] @ w_down[s, :, :r] + b_down[s, :r]) @ w_up[s, :r] + b_up[s])
    and out[b] = 0 for rows with s = -1. The residual and LayerNorm variants are applied by the caller.
    """
    return reference.bottleneck(t, w_down, b_down, w_up, b_up, scaling, act_ids, ranks, row_slots)


def layer_norm_rows(t, weight, bias, eps, row_slots) -> torch.Tensor:
    """LayerNorm over the last dim with per-row affine parameters taken from the row's slot.

    Semantics: out[b, t] = (t[b, t] - mean) / sqrt(var + eps) * weight[s] + bias[s], s = row_slots[b] >= 0.
    """
    return reference.layer_norm_rows(t, weight, bias, eps, row_slots)

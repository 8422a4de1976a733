"""LoRA and IA3 from AdapterHub keys (``<site>.loras.<name>.lora_A / lora_B``).

LoRA: ``y += (alpha / r) * x A^T B^T``. IA3 (composition_mode "scale"): ``y *= alpha * lora_B[:, 0]``,
the bias included. GPT-2's merged ``c_attn`` stores only the enabled q/k/v blocks: LoRA's ``lora_A``
is ``[r * n, in]`` and ``lora_B`` ``[H * n, r]`` applied group-wise; we expand that into one LoRA of
rank ``r * n`` with a block-structured ``[3H, r * n]`` B, and IA3's vector into ``[3H]`` with ones.
"""
import torch

from engine.adapters.files import TargetModel, checked, finite_number, layer_list, positive_int, take
from engine.adapters.spec import AdapterSpec, IA3Weights, LoraWeights, Method
from engine.errors import InvalidAdapter, UnsupportedAdapter

DEFAULTS = {"selfattn_lora": True, "intermediate_lora": False, "output_lora": False, "leave_out": [],
            "r": 8, "alpha": 8, "attn_matrices": ["q", "v"], "composition_mode": "add", "use_gating": False,
            "use_dora": False, "vera_d": None, "vera_b": None}
INERT = {"architecture", "dropout", "init_weights", "init_weights_seed", "dtype"}
MATRICES = ("q", "k", "v")


def parse_lora(name: str, config: dict, state: dict, target: TargetModel, source: str) -> AdapterSpec:
    cfg = {**DEFAULTS, **config}
    unknown = sorted(set(cfg) - set(DEFAULTS) - INERT)
    if unknown:
        raise UnsupportedAdapter(source, f"LoRA config fields {unknown} are not supported")
    for flag, what in (("use_dora", "DoRA"), ("use_gating", "gated LoRA (UniPELT)")):
        if cfg[flag]:
            raise UnsupportedAdapter(source, f"{what} is not supported yet")
    if cfg["vera_d"] is not None or cfg["vera_b"] is not None:
        raise UnsupportedAdapter(source, "VeRA is not supported yet")
    if cfg["composition_mode"] not in ("add", "scale"):
        raise UnsupportedAdapter(source, f"composition_mode {cfg['composition_mode']!r} is not supported")
    attn = cfg["attn_matrices"]
    if not isinstance(attn, list) or any(m not in MATRICES for m in attn):
        raise InvalidAdapter(source, f"attn_matrices must be a list of 'q', 'k' and 'v', got {attn!r}")
    alpha = finite_number(cfg["alpha"], source, "alpha")
    r = positive_int(cfg["r"], source, "r")
    leave_out = layer_list(cfg["leave_out"], source, "leave_out")
    is_ia3 = cfg["composition_mode"] == "scale"
    if is_ia3 and r != 1:  # the library refuses it too (methods/lora.py)
        raise InvalidAdapter(source, f"composition_mode 'scale' (IA3) needs r = 1, got r={r}")
    layout = target.info.layout
    weights = {}
    for i in range(target.info.num_layers):
        if i in leave_out:
            continue
        matrices = [m for m in MATRICES if m in attn] if cfg["selfattn_lora"] else []
        if matrices and layout.merged_qkv:
            site = layout.q.format(i=i)
            weights[site] = _merged(state, site, name, matrices, r, alpha, is_ia3, target, source)
            matrices = []
        sites = [getattr(layout, m).format(i=i) for m in matrices]
        sites += [layout.intermediate.format(i=i)] if cfg["intermediate_lora"] else []
        sites += [layout.output.format(i=i)] if cfg["output_lora"] else []
        for site in sites:
            weights[site] = _single(state, site, name, r, alpha, is_ia3, target, source)
    method = Method.IA3 if is_ia3 else Method.LORA
    return AdapterSpec(name, method, source, ia3=weights if is_ia3 else {}, lora={} if is_ia3 else weights, config=config)


def _single(state, site, name, r, alpha, is_ia3, target, source):
    in_f, out_f = target.linear[site]
    prefix = f"{site}.loras.{name}."
    if is_ia3:
        vec = checked(take(state, prefix + "lora_B", source), source, prefix + "lora_B", (out_f, 1))
        return IA3Weights(vec[:, 0] * alpha, on_input=False)
    a = checked(take(state, prefix + "lora_A", source), source, prefix + "lora_A", (r, in_f))
    b = checked(take(state, prefix + "lora_B", source), source, prefix + "lora_B", (out_f, r))
    return LoraWeights(a, b, alpha / r)


def _merged(state, site, name, matrices, r, alpha, is_ia3, target, source):
    in_f, out_f = target.linear[site]
    block, n = out_f // 3, len(matrices)
    prefix = f"{site}.loras.{name}."
    if is_ia3:
        vec = checked(take(state, prefix + "lora_B", source), source, prefix + "lora_B", (block * n, 1))[:, 0]
        full = torch.ones(out_f)
        for j, m in enumerate(matrices):
            q = MATRICES.index(m)
            full[q * block:(q + 1) * block] = vec[j * block:(j + 1) * block]
        return IA3Weights(full * alpha, on_input=False)
    a = checked(take(state, prefix + "lora_A", source), source, prefix + "lora_A", (r * n, in_f))
    b = checked(take(state, prefix + "lora_B", source), source, prefix + "lora_B", (block * n, r))
    full_b = torch.zeros(out_f, r * n)
    for j, m in enumerate(matrices):
        q = MATRICES.index(m)
        full_b[q * block:(q + 1) * block, j * r:(j + 1) * r] = b[j * block:(j + 1) * block]
    return LoraWeights(a, full_b, alpha / r)

"""Bottleneck adapters (seq_bn, double_seq_bn, par_bn, scaled and custom `BnConfig`s) from AdapterHub keys.

Key layout per junction (``<site>.adapters.<name>.``): ``adapter_down.0`` Linear (or, with ln_before,
``adapter_norm_before`` + ``adapter_down.1`` Linear, ``adapter_down.0`` being a duplicate of the norm),
``adapter_up``, optional ``scaling`` and ``adapter_norm_after``.
"""
import math

import torch

from engine.adapters.files import TargetModel, checked, finite_number, layer_list, take
from engine.adapters.spec import AdapterSpec, BottleneckWeights, Method
from engine.batch import BottleneckVariant, ResidualBeforeLN
from engine.errors import InvalidAdapter, UnsupportedAdapter
from kernels import act_from_name

FLOAT32_MAX = torch.finfo(torch.float32).max

DEFAULTS = {  # BnConfig field defaults, for configs saved by older versions that lack a field
    "original_ln_before": False, "original_ln_after": True, "ln_before": False, "ln_after": False,
    "is_parallel": False, "scaling": 1.0, "use_gating": False, "residual_before_ln": True,
    "adapter_residual_before_ln": False, "inv_adapter": None, "leave_out": [], "phm_layer": False,
}
# model types the library has no model code for: it serves them through its plugin interface, whose bottleneck layer
# hooks refuse original_ln_after=false (methods/bottleneck.py LAYER_HOOK_UNSUPPORTED)
LAYER_HOOKED = {"qwen2"}
REQUIRED = ("mh_adapter", "output_adapter", "reduction_factor", "non_linearity")
# fields that only matter in training, or for the compacter/invertible/cross options refused below
INERT = {
    "init_weights", "init_weights_seed", "dropout", "stochastic_depth", "cross_adapter", "inv_adapter_reduction_factor",
    "phm_dim", "phm_rank", "phm_init_range", "phm_c_init", "phm_bias", "learn_phm", "shared_phm_rule",
    "factorized_phm_rule", "factorized_phm_W", "shared_W_phm", "hypercomplex_nonlinearity", "architecture",
}


def parse_bottleneck(name: str, config: dict, state: dict, target: TargetModel, source: str) -> AdapterSpec:
    cfg = {**DEFAULTS, **config}
    legacy_inv = cfg.pop("invertible_adapter", None)  # v1 configs nest it; `BnConfig.__setattr__` maps it
    if legacy_inv:
        cfg["inv_adapter"] = legacy_inv.get("block_type") if isinstance(legacy_inv, dict) else legacy_inv
    unknown = sorted(set(cfg) - set(DEFAULTS) - set(REQUIRED) - INERT)
    if unknown:
        raise UnsupportedAdapter(source, f"bottleneck config fields {unknown} are not supported")
    missing = [k for k in REQUIRED if k not in cfg]
    if missing:
        raise InvalidAdapter(source, f"adapter_config.json lacks bottleneck fields {missing}")
    if cfg["phm_layer"]:
        raise UnsupportedAdapter(source, "Compacter (phm_layer=true) is not supported yet")
    if cfg["use_gating"]:
        raise UnsupportedAdapter(source, "gated bottleneck adapters (use_gating, UniPELT) are not supported yet")
    if cfg["inv_adapter"] and any(".invertible_adapters." in k or k.startswith("invertible_adapters.") for k in state):
        raise UnsupportedAdapter(source, "invertible adapters (inv_adapter) are not supported yet")
    try:
        if cfg["non_linearity"] is None:  # act_from_name(None) is the identity (for heads); the library fails here
            raise KeyError(None)
        act = act_from_name(cfg["non_linearity"])
    except KeyError:
        raise UnsupportedAdapter(source, f"activation {cfg['non_linearity']!r} is not supported") from None
    if target.info.model_type in LAYER_HOOKED and cfg["original_ln_after"] is False:
        raise UnsupportedAdapter(source, f"original_ln_after=false on {target.info.model_type}: the adapters library "
                                 "adds bottlenecks to this model through its layer hooks, which refuse that option, so "
                                 "there is no reference to serve")
    variant = _variant(cfg, source, pre_ln=target.info.is_decoder)
    hidden = target.info.hidden_size
    scaling_kind = _scaling_kind(cfg["scaling"], source)
    leave_out = layer_list(cfg["leave_out"], source, "leave_out")
    junctions = {}
    for i in range(target.info.num_layers):
        if i in leave_out:
            continue
        rank = max(1, int(hidden // _reduction_factor(cfg["reduction_factor"], i, source)))
        for enabled, template in ((cfg["mh_adapter"], target.info.layout.attn_junction),
                                  (cfg["output_adapter"], target.info.layout.ffn_junction)):
            if enabled:
                site = template.format(i=i)
                junctions[site] = _junction(state, f"{site}.adapters.{name}.", hidden, rank, cfg, scaling_kind, source)
    return AdapterSpec(name, Method.BOTTLENECK, source, act=act, variant=variant, bottleneck=junctions, config=config)


def _variant(cfg: dict, source: str, pre_ln: bool) -> BottleneckVariant:
    rbl = cfg["residual_before_ln"]
    mapping = {True: ResidualBeforeLN.TRUE, False: ResidualBeforeLN.FALSE, "post_add": ResidualBeforeLN.POST_ADD}
    if not isinstance(rbl, (bool, str)) or rbl not in mapping:
        raise InvalidAdapter(source, f"residual_before_ln must be true, false or 'post_add', got {rbl!r}")
    if rbl == "post_add" and not cfg["is_parallel"] and (pre_ln or not cfg["original_ln_before"]):
        # the library leaves the residual undefined here (UnboundLocalError): nothing to reproduce
        raise InvalidAdapter(source, "residual_before_ln='post_add' needs original_ln_before=true and a post-LN (encoder) base")
    flags = ("is_parallel", "original_ln_before", "original_ln_after", "adapter_residual_before_ln", "ln_before", "ln_after")
    return BottleneckVariant(residual_before_ln=mapping[rbl], **{f: bool(cfg[f]) for f in flags})


def _scaling_kind(scaling, source: str):
    # the library tests isinstance(float): a JSON integer such as 4 is refused there too
    if isinstance(scaling, float) and math.isfinite(scaling) and abs(scaling) > FLOAT32_MAX:  # 1e300 overflowed a table
        raise InvalidAdapter(source, f"scaling {scaling!r} overflows float32 (at most {FLOAT32_MAX:.4g} in magnitude)")
    if isinstance(scaling, float) and math.isfinite(scaling) or scaling in ("learned", "channel"):
        return scaling
    raise InvalidAdapter(source, f"unknown scaling {scaling!r} (a finite float, 'learned' or 'channel')")


def _reduction_factor(rf, layer: int, source: str) -> float:
    if isinstance(rf, dict):
        rf = rf.get(str(layer), rf.get("default"))
    rf = finite_number(rf, source, f"reduction_factor for layer {layer}")
    if rf <= 0:
        raise InvalidAdapter(source, f"reduction_factor for layer {layer} must be positive, got {rf!r}")
    return rf


def _junction(state, prefix, hidden, rank, cfg, scaling_kind, source) -> BottleneckWeights:
    def get(key, shape):
        return checked(take(state, prefix + key, source), source, prefix + key, shape)

    ln_before = None
    down = "adapter_down.0"
    if cfg["ln_before"]:
        ln_before = tuple(_ln_before_param(state, prefix, param, hidden, source) for param in ("weight", "bias"))
        down = "adapter_down.1"
    w_down = get(f"{down}.weight", (rank, hidden))
    b_down = get(f"{down}.bias", (rank,))
    w_up = get("adapter_up.weight", (hidden, rank)).t().contiguous()
    b_up = get("adapter_up.bias", (hidden,))
    if scaling_kind == "learned":
        scaling = get("scaling", (1,)).expand(hidden).clone()
    elif scaling_kind == "channel":
        scaling = get("scaling", (hidden,))
    else:
        scaling = torch.full((hidden,), float(scaling_kind))
    ln_after = None
    if cfg["ln_after"]:
        ln_after = (get("adapter_norm_after.weight", (hidden,)), get("adapter_norm_after.bias", (hidden,)))
    return BottleneckWeights(w_down, b_down, w_up, b_up, scaling, ln_before, ln_after)


def _ln_before_param(state, prefix: str, param: str, hidden: int, source: str) -> torch.Tensor:
    """One parameter of the ln_before LayerNorm, which the library saves twice: as ``adapter_norm_before.<param>``
    and as its duplicate ``adapter_down.0.<param>`` (one module in two places). It loads whichever copies a folder
    holds, each parameter on its own, so either copy alone will do; two copies must agree."""
    norm_key, dup_key = f"{prefix}adapter_norm_before.{param}", f"{prefix}adapter_down.0.{param}"
    if norm_key not in state and dup_key not in state:
        raise InvalidAdapter(source, "missing key", norm_key)
    copies = {key: checked(state.pop(key), source, key, (hidden,)) for key in (norm_key, dup_key) if key in state}
    if len(copies) == 2 and not torch.equal(*copies.values()):
        raise InvalidAdapter(source, f"differs from adapter_norm_before.{param}, of which it is the saved duplicate "
                                     "(one LayerNorm in the library)", dup_key)
    return copies.get(dup_key, copies.get(norm_key))  # the library loads the duplicate last

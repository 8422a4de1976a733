"""A new adapter as the weighted average of loaded ones: the `adapters` library's `average_adapter`
(model_mixin.py; methods/adapter_layer_base.py and methods/lora.py `average_adapter`), on host specs.

As the library: all sources share one method and config (dropout and init_weights aside); weights are
normalised to sum to 1; each parameter is averaged in source order. Bottleneck adapters take only
"linear". LoRA also takes "lora_linear_only_negate_b" (A weighted by |w|, B by w; Zhang et al. 2023) and
"lora_delta_w_svd" (the weighted sum of B @ A split again by SVD at ``svd_rank``; the new config has
r = svd_rank, so its scaling becomes alpha / svd_rank; not on GPT-2, whose merged c_attn the library
refuses). IA3 has only B-like vectors, so negate_b equals linear there. Heads are not averaged
(`average_head` is a separate call in the library).
"""
import math
import numbers
from enum import Enum

import torch

from engine.adapters.files import TargetModel
from engine.adapters.methods.bottleneck import DEFAULTS as BOTTLENECK_DEFAULTS
from engine.adapters.methods.lora import DEFAULTS as LORA_DEFAULTS
from engine.adapters.spec import AdapterSpec, BottleneckWeights, IA3Weights, LoraWeights, Method
from engine.errors import InvalidRequest

IGNORED_CONFIG_KEYS = ("dropout", "init_weights")  # as the library's config comparison
# The library compares the configs it loaded, i.e. with its dataclass defaults filled in (`BnConfig`, `LoRAConfig`;
# IA3 loads as a LoRAConfig too), so a file that leaves out a field at its default has the same config as one that
# saves it; tests/lifecycle/test_aggregation.py checks these against the library's own dataclasses.
LIBRARY_DEFAULTS = {
    Method.BOTTLENECK: {  # the parser's defaults, and those of the fields it ignores
        **BOTTLENECK_DEFAULTS, "init_weights_seed": None, "inv_adapter_reduction_factor": None, "cross_adapter": False,
        "phm_dim": 4, "factorized_phm_W": True, "shared_W_phm": False, "shared_phm_rule": True,
        "factorized_phm_rule": False, "phm_c_init": "normal", "phm_init_range": 0.0001, "learn_phm": True,
        "hypercomplex_nonlinearity": "glorot-uniform", "phm_rank": 1, "phm_bias": True, "stochastic_depth": 0.0},
    Method.LORA: {**LORA_DEFAULTS, "architecture": "lora", "init_weights_seed": None, "dtype": None},
}
LIBRARY_DEFAULTS[Method.IA3] = LIBRARY_DEFAULTS[Method.LORA]
# Fields the library's config hash leaves out at these values (utils.ADAPTER_CONFIG_HASH_IGNORE_DEFAULT)
HASH_IGNORED_DEFAULTS = {
    "phm_layer": True, "phm_dim": 4, "factorized_phm_W": True, "shared_W_phm": False, "shared_phm_rule": True,
    "factorized_phm_rule": False, "phm_c_init": "normal", "phm_init_range": 0.0001, "learn_phm": True,
    "hypercomplex_nonlinearity": "glorot-uniform", "phm_rank": 1, "phm_bias": True, "init_weights": "bert",
    "scaling": 1.0,
}


class CombineStrategy(Enum):
    LINEAR = "linear"
    LORA_LINEAR_ONLY_NEGATE_B = "lora_linear_only_negate_b"
    LORA_DELTA_W_SVD = "lora_delta_w_svd"


def check_request(sources: list[str], weights: list, strategy: str, svd_rank,
                  normalize_weights: bool = True) -> tuple[CombineStrategy, list[float]]:
    """-> (strategy, the weights to apply): the request's own parameters, checked before any source is looked up,
    so a taken name or an unknown source is reported for a request that is otherwise valid. The weights are
    normalised to sum to 1 unless ``normalize_weights`` is False (the library's option: a sum of task vectors, or
    a difference with weights 1 and -1)."""
    if not sources:
        raise InvalidRequest("average_adapters needs at least one source adapter", "sources")
    if len(weights) != len(sources):
        raise InvalidRequest(f"{len(weights)} weights for {len(sources)} source adapters", "weights")
    # numbers.Real: numpy scalars too (np.float32 is no float subclass); bool is a number, but no weight
    if any(isinstance(x, bool) or not isinstance(x, numbers.Real) or not math.isfinite(x) for x in weights):
        raise InvalidRequest(f"weights must be finite numbers, got {weights!r}", "weights")
    weights = [float(x) for x in weights]
    if normalize_weights:
        total = sum(weights)
        if total == 0 or not math.isfinite(total):
            raise InvalidRequest(f"the weights sum to {total}; they are normalised to sum to 1", "weights")
        weights = [x / total for x in weights]
    try:
        combine = CombineStrategy(strategy)
    except ValueError:
        raise InvalidRequest(f"combine_strategy {strategy!r} is not one of {[c.value for c in CombineStrategy]}",
                             "combine_strategy") from None
    if combine is CombineStrategy.LORA_DELTA_W_SVD:
        if isinstance(svd_rank, bool) or not isinstance(svd_rank, int) or svd_rank < 1:
            raise InvalidRequest(f"lora_delta_w_svd needs a positive svd_rank, got {svd_rank!r}", "svd_rank")
    elif svd_rank is not None:
        raise InvalidRequest("svd_rank applies only to combine_strategy 'lora_delta_w_svd'", "svd_rank")
    return combine, weights


def average_specs(name: str, specs: list[AdapterSpec], weights: list[float], combine: CombineStrategy,
                  svd_rank: int | None, target: TargetModel) -> AdapterSpec:
    """The average of ``specs``; ``weights`` and ``combine`` as `check_request` returned them."""
    _check_sources(specs, combine, svd_rank, target)
    first = specs[0]
    config = dict(first.config)
    if first.method is Method.BOTTLENECK:
        parameter_scaling = config.get("scaling") in ("learned", "channel")  # a float scaling is config, not weights
        bottleneck = {site: _bottleneck([s.bottleneck[site] for s in specs], weights, parameter_scaling)
                      for site in first.bottleneck}
        return AdapterSpec(name, first.method, "average", first.act, first.variant, bottleneck=bottleneck,
                           config=config)
    if first.method is Method.IA3:
        ia3 = {site: IA3Weights(_weighted([s.ia3[site].vector for s in specs], weights), first.ia3[site].on_input)
               for site in first.ia3}
        return AdapterSpec(name, first.method, "average", ia3=ia3, config=config)
    if combine is CombineStrategy.LORA_DELTA_W_SVD:
        alpha = config.get("alpha", 8)
        config["r"] = svd_rank
        lora = {site: _svd([s.lora[site] for s in specs], weights, svd_rank, alpha / svd_rank) for site in first.lora}
    else:
        a_weights = [abs(x) for x in weights] if combine is CombineStrategy.LORA_LINEAR_ONLY_NEGATE_B else weights
        lora = {site: LoraWeights(_weighted([s.lora[site].lora_a for s in specs], a_weights),
                                  _weighted([s.lora[site].lora_b for s in specs], weights), first.lora[site].scaling)
                for site in first.lora}
    return AdapterSpec(name, first.method, "average", lora=lora, config=config)


def _check_sources(specs: list[AdapterSpec], combine: CombineStrategy, svd_rank: int | None,
                   target: TargetModel) -> None:
    first = specs[0]
    for spec in specs[1:]:
        if spec.method is not first.method or _comparable(spec) != _comparable(first):
            raise InvalidRequest(f"cannot average adapters with different configurations ({first.name!r} and "
                                 f"{spec.name!r}); all sources need the same method and config", "sources")
        if _shapes(spec) != _shapes(first):
            raise InvalidRequest(f"{spec.name!r} and {first.name!r} have different weight shapes", "sources")
    if combine is not CombineStrategy.LINEAR and first.method is Method.BOTTLENECK:
        raise InvalidRequest(f"combine_strategy {combine.value!r} is for LoRA; bottleneck adapters average linearly",
                             "combine_strategy")
    if combine is CombineStrategy.LORA_DELTA_W_SVD:
        if first.method is not Method.LORA or first.config.get("architecture") != "lora":
            raise InvalidRequest("lora_delta_w_svd needs LoRA adapters of the adapters library", "combine_strategy")
        if target.info.layout.merged_qkv:
            raise InvalidRequest("lora_delta_w_svd is not supported on GPT-2 (merged c_attn), as in the adapters "
                                 "library", "combine_strategy")
        largest = min(min(w.lora_a.shape[1], w.lora_b.shape[0]) for w in first.lora.values())
        if svd_rank > largest:
            raise InvalidRequest(f"svd_rank {svd_rank} exceeds the rank a delta W of these sites can have ({largest})",
                                 "svd_rank")


def _comparable(spec: AdapterSpec) -> dict:
    """The library compares configs by a hash of their non-empty values, dropout and init_weights aside, with its
    defaults filled in and a few fields left out at their defaults. PEFT configs (no library) as saved."""
    def minimal(value):
        if isinstance(value, dict):
            return {k: minimal(v) for k, v in value.items() if v}
        return value

    config = dict(spec.config)
    if "peft_type" not in config:
        config = {**LIBRARY_DEFAULTS[spec.method], **config}
    kept = minimal({k: v for k, v in config.items() if k not in IGNORED_CONFIG_KEYS})
    return {k: v for k, v in kept.items() if not (k in HASH_IGNORED_DEFAULTS and v == HASH_IGNORED_DEFAULTS[k])}


def _shapes(spec: AdapterSpec) -> dict:
    shapes = {site: tuple(w.w_down.shape) for site, w in spec.bottleneck.items()}
    shapes |= {site: (tuple(w.lora_a.shape), tuple(w.lora_b.shape)) for site, w in spec.lora.items()}
    return shapes | {site: tuple(w.vector.shape) for site, w in spec.ia3.items()}


def _weighted(tensors: list[torch.Tensor], weights: list[float]) -> torch.Tensor:
    """sum_i w_i * t_i, accumulated in source order as the library does."""
    total = weights[0] * tensors[0]
    for weight, tensor in zip(weights[1:], tensors[1:]):
        total += weight * tensor
    return total


def _bottleneck(weights: list[BottleneckWeights], w: list[float], parameter_scaling: bool) -> BottleneckWeights:
    def norm(pick):
        norms = [pick(x) for x in weights]
        return None if norms[0] is None else (_weighted([n[0] for n in norms], w), _weighted([n[1] for n in norms], w))

    return BottleneckWeights(
        w_down=_weighted([x.w_down for x in weights], w), b_down=_weighted([x.b_down for x in weights], w),
        w_up=_weighted([x.w_up for x in weights], w), b_up=_weighted([x.b_up for x in weights], w),
        scaling=_weighted([x.scaling for x in weights], w) if parameter_scaling else weights[0].scaling,
        ln_before=norm(lambda x: x.ln_before), ln_after=norm(lambda x: x.ln_after))


def _svd(loras: list[LoraWeights], w: list[float], rank: int, scaling: float) -> LoraWeights:
    """The library's `_average_adapter_lora_delta_w_svd`: delta_w = sum_i w_i B_i A_i = U S V; A = V, B = U S."""
    delta_w = torch.stack([x.lora_b @ x.lora_a for x in loras], dim=0)  # [n, N, K]
    delta_w = (delta_w * torch.tensor(w).view(-1, 1, 1)).sum(dim=0)
    u, s, v = torch.linalg.svd(delta_w)
    return LoraWeights(lora_a=v[:rank, :].contiguous(), lora_b=(u[:, :rank] @ torch.diag(s[:rank])).contiguous(),
                       scaling=scaling)

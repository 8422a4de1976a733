"""Validated adapters as host tensors, independent of the file format they came from.

Weights are already in the layout the pool stacks use (``w_down [R, H]``, ``lora_a [R, K]``: down-projections
rank-major, see `kernels.reference`), so the pool only copies. Every mapping is keyed by the model's site path
(see `engine.model.sites`).
"""
from dataclasses import dataclass, field
from enum import Enum
from typing import Mapping

import torch

from engine.batch import BottleneckVariant
from engine.errors import InvalidAdapter
from kernels import Act


class Method(Enum):
    BOTTLENECK = "bottleneck"
    LORA = "lora"
    IA3 = "ia3"


class HeadType(Enum):
    CLASSIFICATION = "classification"
    MULTILABEL = "multilabel_classification"
    TAGGING = "tagging"


@dataclass(frozen=True)
class BottleneckWeights:
    w_down: torch.Tensor  # [R, H]
    b_down: torch.Tensor  # [R]
    w_up: torch.Tensor  # [R, H]
    b_up: torch.Tensor  # [H]
    scaling: torch.Tensor  # [H] (a float or learned scalar broadcast)
    ln_before: tuple[torch.Tensor, torch.Tensor] | None  # (weight [H], bias [H])
    ln_after: tuple[torch.Tensor, torch.Tensor] | None


@dataclass(frozen=True)
class LoraWeights:
    lora_a: torch.Tensor  # [R, K]
    lora_b: torch.Tensor  # [N, R]
    scaling: float


@dataclass(frozen=True)
class IA3Weights:
    vector: torch.Tensor  # [N] output scale, or [K] input scale when on_input
    on_input: bool  # PEFT scales the input of feed-forward modules instead of the output


@dataclass(frozen=True)
class HeadSpec:
    head_type: HeadType
    layers: tuple[tuple[torch.Tensor, torch.Tensor | None], ...]  # (weight [out, in], bias [out]) per Linear
    activation: Act  # between the linear layers
    use_pooler: bool  # classification input is the BERT pooler output, not the CLS hidden state
    labels: tuple[str, ...]  # index -> label name


@dataclass(frozen=True)
class AdapterSpec:
    name: str  # the name the adapter was saved under (its key namespace)
    method: Method
    source: str  # folder it was read from, for messages
    act: Act = Act.IDENTITY  # bottleneck activation
    variant: BottleneckVariant | None = None
    bottleneck: Mapping[str, BottleneckWeights] = field(default_factory=dict)
    lora: Mapping[str, LoraWeights] = field(default_factory=dict)
    ia3: Mapping[str, IA3Weights] = field(default_factory=dict)
    head: HeadSpec | None = None
    config: Mapping = field(default_factory=dict)  # the saved config, for AdapterInfo
    ignored_modules: tuple[str, ...] = ()  # saved modules its config does not target, dropped (as PEFT drops them)
    unserved_modules: tuple[str, ...] = ()  # saved modules that feed no output we serve (BERT's pooler), dropped

    @property
    def num_params(self) -> int:
        tensors = [t for w in self.bottleneck.values() for t in (w.w_down, w.b_down, w.w_up, w.b_up)]
        tensors += [t for w in self.lora.values() for t in (w.lora_a, w.lora_b)]
        tensors += [w.vector for w in self.ia3.values()]
        return sum(t.numel() for t in tensors)

    def named_tensors(self) -> dict[str, torch.Tensor]:
        """Every tensor the pool holds for this version (weights, scalings, LayerNorms, head), by site and part."""
        named = {}
        for site, w in self.bottleneck.items():
            parts = {"w_down": w.w_down, "b_down": w.b_down, "w_up": w.w_up, "b_up": w.b_up, "scaling": w.scaling}
            for kind, norm in (("ln_before", w.ln_before), ("ln_after", w.ln_after)):
                if norm:
                    parts |= {f"{kind}.weight": norm[0], f"{kind}.bias": norm[1]}
            named |= {f"{site}.{part}": t for part, t in parts.items()}
        for site, w in self.lora.items():
            named |= {f"{site}.lora_A": w.lora_a, f"{site}.lora_B": w.lora_b}
        named |= {f"{site}.ia3": w.vector for site, w in self.ia3.items()}
        for i, (weight, bias) in enumerate(self.head.layers if self.head else ()):
            named |= {f"head.{i}.weight": weight} | ({} if bias is None else {f"head.{i}.bias": bias})
        return named

    def check_representable(self, dtype: torch.dtype) -> None:
        """Raises `InvalidAdapter` when a value overflows the serving ``dtype`` (LoRA scalings are kept in
        float32): the adapter's outputs would be inf or NaN. The readers check weights in float32 and config
        numbers for NaN; what is left is a huge alpha or scaling, or weights beyond fp16's range."""
        for key, tensor in self.named_tensors().items():
            if not bool(torch.isfinite(tensor.to(dtype)).all()):
                raise InvalidAdapter(self.source, f"values overflow the serving dtype {dtype}", key)
        for site, w in self.lora.items():
            if not abs(w.scaling) <= torch.finfo(torch.float32).max:
                raise InvalidAdapter(self.source, f"LoRA scaling alpha / r = {w.scaling:g} overflows float32", site)

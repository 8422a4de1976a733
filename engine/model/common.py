"""Pieces shared by the model files: the attention core, masks and the architecture description."""
import os
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from kernels import Act, act_from_name


def model_act(name, field: str) -> Act:
    """The activation a base model's config names; ValueError (a ModelLoadError at load) for one we do not build,
    such as prelu or xielu, which carry learned parameters."""
    try:
        return act_from_name(name)
    except KeyError:
        raise ValueError(f"{field} {name!r} is not supported") from None


@dataclass(frozen=True)
class SiteLayout:
    """Module paths (with ``{i}`` for the layer) where the `adapters` library attaches each method."""

    attn_junction: str  # bottleneck mh_adapter
    ffn_junction: str  # bottleneck output_adapter
    q: str
    k: str
    v: str
    intermediate: str  # LoRA/IA3 intermediate_lora
    output: str  # LoRA/IA3 output_lora
    merged_qkv: bool = False  # GPT-2: q, k and v are one c_attn linear


@dataclass(frozen=True)
class ArchInfo:
    """What the rest of the engine needs to know about a base model, independent of its family."""

    model_type: str  # config.model_type, e.g. "bert", "llama"
    hidden_size: int
    num_layers: int
    is_decoder: bool  # causal LM family: pools the last token, heads read the last non-pad token
    state_dict_prefixes: tuple[str, ...]  # prefixes the checkpoints of this family may carry ("bert.", ...)
    layout: SiteLayout


# The torch wheels' MKL sgemm takes its AVX2 path on AMD CPUs (97 GFLOP/s per core measured on a Zen 5 EPYC)
# while oneDNN picks its kernels from the CPU's ISA (225 GFLOP/s, AVX-512): base layers go through oneDNN on
# CPU, as vLLM's CPU backend does. Results differ from MKL's by fp32 rounding only (~1e-6 relative).
# ADAPTERSERVE_CPU_GEMM=torch (read at every call, like ADAPTERSERVE_KERNELS) falls back to torch's own GEMM.
CPU_GEMM_ENV = "ADAPTERSERVE_CPU_GEMM"


def _onednn_linear_works() -> bool:
    """Whether this torch build runs oneDNN's linear on this CPU and agrees with F.linear (checked once)."""
    if not (torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_linear_pointwise")):
        return False
    x, w, b = torch.linspace(-1, 1, 24).view(3, 8), torch.linspace(1, -1, 32).view(4, 8), torch.ones(4)
    try:
        y = torch.ops.mkldnn._linear_pointwise(x, w, b, "none", [], "")
    except RuntimeError:
        return False
    return torch.allclose(y, F.linear(x, w, b), atol=1e-5)


_ONEDNN_LINEAR = _onednn_linear_works()


def dense(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """``x @ weight.T + bias`` ([..., K] x [N, K] -> [..., N]), through oneDNN for CPU fp32 and bf16."""
    if _ONEDNN_LINEAR and x.device.type == "cpu" and x.dtype in (torch.float32, torch.bfloat16):
        mode = os.environ.get(CPU_GEMM_ENV, "onednn")
        if mode == "onednn":
            return torch.ops.mkldnn._linear_pointwise(x, weight, bias, "none", [], "")
        if mode != "torch":
            raise ValueError(f"{CPU_GEMM_ENV} must be onednn or torch, got {mode!r}")
    return F.linear(x, weight, bias)


def padding_bias(
    attention_mask: torch.Tensor, dtype: torch.dtype, causal: bool, sliding_window: int | None = None
) -> torch.Tensor:
    """Additive attention bias [B, 1, T, T]: 0 where a query may attend, the dtype's minimum elsewhere.

    Same convention as transformers' eager attention, so padded positions match it too. With a
    sliding window (Mistral), query q sees keys k with q - window < k <= q.
    """
    b, t = attention_mask.shape
    allowed = attention_mask[:, None, None, :].bool()  # [B, 1, 1, T]
    if causal:
        pos = torch.arange(t, device=attention_mask.device)
        offset = pos[:, None] - pos[None, :]  # q - k
        band = offset >= 0
        if sliding_window is not None:
            band = band & (offset < sliding_window)
        allowed = allowed & band
    bias = torch.zeros(allowed.shape, dtype=dtype, device=attention_mask.device)
    return bias.masked_fill(~allowed, torch.finfo(dtype).min).expand(b, 1, t, t)


# Up to this many query and key positions, CPU attention is an explicit matmul-softmax-matmul: torch's
# flash-attention kernel for CPU pays per-tile overheads that dominate short sequences (32 rows x 12 heads,
# 2 threads, per layer: 16 tokens 0.26 ms vs 1.0 ms, 64 tokens 2.4 vs 3.2 ms; at 128 it wins, 9.6 vs 11.2).
SHORT_ATTENTION = 64


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    """softmax(q k^T / sqrt(d) + bias) v over [B, heads, T, d]; k and v may have fewer (GQA) heads."""
    if k.shape[1] != q.shape[1]:
        repeat = q.shape[1] // k.shape[1]
        k = k.repeat_interleave(repeat, dim=1)
        v = v.repeat_interleave(repeat, dim=1)
    # fp32 only: in fp16/bf16 the explicit sum q k^T + bias would round (and overflow to -inf on fully masked
    # rows, giving NaN) where torch's kernel accumulates in fp32
    if q.device.type == "cpu" and q.dtype == torch.float32 and max(q.shape[2], k.shape[2]) <= SHORT_ATTENTION:
        scores = torch.matmul(q, k.transpose(-1, -2)).mul_(q.shape[-1] ** -0.5).add_(bias)
        return torch.matmul(torch.softmax(scores, dim=-1), v)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=bias)


def split_heads(x: torch.Tensor, num_heads: int) -> torch.Tensor:
    """[B, T, heads*d] -> [B, heads, T, d]"""
    b, t, _ = x.shape
    return x.view(b, t, num_heads, -1).transpose(1, 2)


def merge_heads(x: torch.Tensor) -> torch.Tensor:
    """[B, heads, T, d] -> [B, T, heads*d]"""
    b, _, t, _ = x.shape
    return x.transpose(1, 2).reshape(b, t, -1)

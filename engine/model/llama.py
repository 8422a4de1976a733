"""Llama-family decoders (llama, mistral, qwen2): RoPE, GQA, RMSNorm, SwiGLU, with adapter sites.

Names follow the Hugging Face checkpoints (``layers.3.self_attn.q_proj``). Pre-LN blocks: the residual
junctions after attention and MLP are `BottleneckSite`s without a LayerNorm, exactly where the
`adapters` library puts ``attention_adapters`` / ``output_adapters``.
"""
from dataclasses import replace

import torch
from torch import nn

from engine.batch import AdapterBatch
from engine.model.common import (ArchInfo, SiteLayout, attention, merge_heads, model_act, padding_bias,
                                 split_heads)
from engine.model.sites import BottleneckSite, LinearSite
from kernels import apply_act

LLAMA_FAMILY = ("llama", "mistral", "qwen2")
# the adapters library swaps the MLP names on Llama: "intermediate" LoRA/IA3 sits on down_proj
LAYOUT = SiteLayout(
    attn_junction="layers.{i}.attention_adapters",
    ffn_junction="layers.{i}.output_adapters",
    q="layers.{i}.self_attn.q_proj",
    k="layers.{i}.self_attn.k_proj",
    v="layers.{i}.self_attn.v_proj",
    intermediate="layers.{i}.mlp.down_proj",
    output="layers.{i}.mlp.up_proj",
)
# Qwen2 comes through the library's plugin interface (wrappers/interfaces.py), which does not swap them
QWEN2_LAYOUT = replace(LAYOUT, intermediate="layers.{i}.mlp.up_proj", output="layers.{i}.mlp.down_proj")


class RMSNorm(nn.Module):
    def __init__(self, size, eps):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(size))
        self.eps = eps

    def forward(self, x):
        x32 = x.float()
        x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x32.to(x.dtype)


def rope_theta(cfg) -> float:
    """transformers 4.x keeps rope_theta on the config; 5.x moves it into rope_parameters."""
    params = getattr(cfg, "rope_parameters", None) or {}
    theta = getattr(cfg, "rope_theta", None) or params.get("rope_theta")
    scaling = getattr(cfg, "rope_scaling", None) or params
    kind = scaling.get("rope_type", scaling.get("type", "default")) if scaling else "default"
    if kind != "default":
        raise ValueError(f"rope type {kind!r} is not supported yet (only 'default')")
    return float(theta)


class Rotary(nn.Module):
    def __init__(self, head_dim, theta):
        super().__init__()
        inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.int64).float() / head_dim))
        self.register_buffer("inv_freq", inv_freq, persistent=False)

    def forward(self, positions, dtype):  # positions [B, T] -> cos, sin [B, 1, T, head_dim]
        freqs = positions.float()[..., None] * self.inv_freq[None, None, :]
        emb = torch.cat((freqs, freqs), dim=-1)
        return emb.cos().to(dtype)[:, None], emb.sin().to(dtype)[:, None]


def rotate(x, cos, sin):
    half = x.shape[-1] // 2
    rotated = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
    return x * cos + rotated * sin


class SelfAttention(nn.Module):
    def __init__(self, cfg, head_dim):
        super().__init__()
        self.num_heads, self.num_kv_heads = cfg.num_attention_heads, cfg.num_key_value_heads
        qkv_bias = cfg.model_type == "qwen2" or getattr(cfg, "attention_bias", False)
        h, kv = cfg.hidden_size, self.num_kv_heads * head_dim
        self.q_proj = LinearSite(h, self.num_heads * head_dim, bias=qkv_bias)
        self.k_proj = LinearSite(h, kv, bias=qkv_bias)
        self.v_proj = LinearSite(h, kv, bias=qkv_bias)
        self.o_proj = LinearSite(self.num_heads * head_dim, h, bias=getattr(cfg, "attention_bias", False))

    def forward(self, x, cos, sin, bias, meta):
        q = rotate(split_heads(self.q_proj(x, meta), self.num_heads), cos, sin)
        k = rotate(split_heads(self.k_proj(x, meta), self.num_kv_heads), cos, sin)
        v = split_heads(self.v_proj(x, meta), self.num_kv_heads)
        return self.o_proj(merge_heads(attention(q, k, v, bias)), meta)


class MLP(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        bias = getattr(cfg, "mlp_bias", False)
        self.gate_proj = LinearSite(cfg.hidden_size, cfg.intermediate_size, bias=bias)
        self.up_proj = LinearSite(cfg.hidden_size, cfg.intermediate_size, bias=bias)
        self.down_proj = LinearSite(cfg.intermediate_size, cfg.hidden_size, bias=bias)
        self.act = model_act(cfg.hidden_act, "hidden_act")

    def forward(self, x, meta):
        return self.down_proj(apply_act(self.gate_proj(x, meta), self.act) * self.up_proj(x, meta), meta)


class DecoderLayer(nn.Module):
    def __init__(self, cfg, head_dim):
        super().__init__()
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.self_attn = SelfAttention(cfg, head_dim)
        self.attention_adapters = BottleneckSite()
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.mlp = MLP(cfg)
        self.output_adapters = BottleneckSite()

    def forward(self, x, cos, sin, bias, meta):
        h = self.self_attn(self.input_layernorm(x), cos, sin, bias, meta)
        x = self.attention_adapters(h, x, None, meta)
        return self.output_adapters(self.mlp(self.post_attention_layernorm(x), meta), x, None, meta)


class LlamaModel(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
        self.info = ArchInfo(cfg.model_type, cfg.hidden_size, cfg.num_hidden_layers, True, ("model.",),
                             QWEN2_LAYOUT if cfg.model_type == "qwen2" else LAYOUT)
        self.max_tokens = cfg.max_position_embeddings  # tokens one row may hold: what the model was trained for
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(cfg, head_dim) for _ in range(cfg.num_hidden_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.rotary = Rotary(head_dim, rope_theta(cfg))
        if cfg.model_type == "qwen2" and getattr(cfg, "use_sliding_window", False):
            raise ValueError("qwen2 with use_sliding_window (per-layer windows) is not supported")
        self.sliding_window = getattr(cfg, "sliding_window", None) if cfg.model_type == "mistral" else None

    def forward(self, input_ids, attention_mask, token_type_ids=None, meta: AdapterBatch | None = None):
        x = self.embed_tokens(input_ids)
        positions = torch.arange(input_ids.shape[1], device=input_ids.device)[None, :].expand_as(input_ids)
        cos, sin = self.rotary(positions, x.dtype)
        bias = padding_bias(attention_mask, x.dtype, causal=True, sliding_window=self.sliding_window)
        for layer in self.layers:
            x = layer(x, cos, sin, bias, meta)
        return self.norm(x)

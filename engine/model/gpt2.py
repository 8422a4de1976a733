"""GPT-2 decoder with adapter sites.

Names follow the Hugging Face checkpoints (``h.3.attn.c_attn``). GPT-2 stores its projections as
`Conv1D` weights ``[in, out]``; `engine.model.weights` transposes them into our `nn.Linear` layout at
load. ``c_attn`` is one merged q/k/v projection; LoRA on it uses a block-structured ``lora_b``.
"""
from torch import nn

from engine.batch import AdapterBatch
from engine.model.common import (ArchInfo, SiteLayout, attention, merge_heads, model_act, padding_bias,
                                 split_heads)
from engine.model.sites import BottleneckSite, LinearSite
from kernels import apply_act

# Conv1D weights stored [in, out] in GPT-2 checkpoints, transposed at load
CONV1D_SUFFIXES = ("attn.c_attn.weight", "attn.c_proj.weight", "mlp.c_fc.weight", "mlp.c_proj.weight")
LAYOUT = SiteLayout(
    attn_junction="h.{i}.attention_adapters",
    ffn_junction="h.{i}.output_adapters",
    q="h.{i}.attn.c_attn",
    k="h.{i}.attn.c_attn",
    v="h.{i}.attn.c_attn",
    intermediate="h.{i}.mlp.c_fc",
    output="h.{i}.mlp.c_proj",
    merged_qkv=True,
)


class Attention(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        self.num_heads = cfg.n_head
        self.c_attn = LinearSite(cfg.n_embd, 3 * cfg.n_embd)
        self.c_proj = LinearSite(cfg.n_embd, cfg.n_embd)

    def forward(self, x, bias, meta):
        q, k, v = self.c_attn(x, meta).split(x.shape[-1], dim=-1)
        out = attention(*(split_heads(t, self.num_heads) for t in (q, k, v)), bias)
        return self.c_proj(merge_heads(out), meta)


class MLP(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        inner = cfg.n_inner or 4 * cfg.n_embd
        self.c_fc = LinearSite(cfg.n_embd, inner)
        self.c_proj = LinearSite(inner, cfg.n_embd)
        self.act = model_act(cfg.activation_function, "activation_function")

    def forward(self, x, meta):
        return self.c_proj(apply_act(self.c_fc(x, meta), self.act), meta)


class Block(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        self.ln_1 = nn.LayerNorm(cfg.n_embd, eps=cfg.layer_norm_epsilon)
        self.attn = Attention(cfg)
        self.attention_adapters = BottleneckSite()
        self.ln_2 = nn.LayerNorm(cfg.n_embd, eps=cfg.layer_norm_epsilon)
        self.mlp = MLP(cfg)
        self.output_adapters = BottleneckSite()

    def forward(self, x, bias, meta):
        x = self.attention_adapters(self.attn(self.ln_1(x), bias, meta), x, None, meta)
        return self.output_adapters(self.mlp(self.ln_2(x), meta), x, None, meta)


class GPT2Model(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        if not getattr(cfg, "scale_attn_weights", True) or getattr(cfg, "scale_attn_by_inverse_layer_idx", False):
            raise ValueError("GPT-2 attention scaling variants are not supported")
        self.info = ArchInfo(cfg.model_type, cfg.n_embd, cfg.n_layer, True, ("transformer.",), LAYOUT)
        self.max_tokens = cfg.n_positions  # tokens one row may hold: learned positions
        self.wte = nn.Embedding(cfg.vocab_size, cfg.n_embd)
        self.wpe = nn.Embedding(cfg.n_positions, cfg.n_embd)
        self.h = nn.ModuleList(Block(cfg) for _ in range(cfg.n_layer))
        self.ln_f = nn.LayerNorm(cfg.n_embd, eps=cfg.layer_norm_epsilon)

    def forward(self, input_ids, attention_mask, token_type_ids=None, meta: AdapterBatch | None = None):
        # positions count a row's own tokens, as generate() computes them, so a left-padded row equals the row alone
        # (transformers' forward counts from the first column: left padding shifted every position of the row)
        positions = (attention_mask.long().cumsum(1) - 1).clamp_(min=0)  # a float or bool mask counts as 0/1
        x = self.wte(input_ids) + self.wpe(positions)
        if token_type_ids is not None:  # GPT-2 embeds token types with its word embeddings, as transformers does
            x = x + self.wte(token_type_ids)
        bias = padding_bias(attention_mask, x.dtype, causal=True)
        for block in self.h:
            x = block(x, bias, meta)
        return self.ln_f(x)

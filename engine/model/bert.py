"""BERT-family encoders (bert, roberta, xlm-roberta; MiniLM is a BERT) with explicit adapter sites.

Module names follow the Hugging Face checkpoints, so weights load by name and adapter keys
(``encoder.layer.3.attention.self.query.loras.<name>.lora_A``) name our modules directly.
Post-LN blocks: every residual junction is a `BottleneckSite` holding the sublayer's LayerNorm.
"""
import torch
from torch import nn

from engine.batch import AdapterBatch
from engine.model.common import (ArchInfo, SiteLayout, attention, merge_heads, model_act, padding_bias,
                                 split_heads)
from engine.model.sites import BottleneckSite, LinearSite
from kernels import apply_act

BERT_FAMILY = ("bert", "roberta", "xlm-roberta")
LAYOUT = SiteLayout(
    attn_junction="encoder.layer.{i}.attention.output",
    ffn_junction="encoder.layer.{i}.output",
    q="encoder.layer.{i}.attention.self.query",
    k="encoder.layer.{i}.attention.self.key",
    v="encoder.layer.{i}.attention.self.value",
    intermediate="encoder.layer.{i}.intermediate.dense",
    output="encoder.layer.{i}.output.dense",
)


class Embeddings(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        self.word_embeddings = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.position_embeddings = nn.Embedding(cfg.max_position_embeddings, cfg.hidden_size)
        self.token_type_embeddings = nn.Embedding(cfg.type_vocab_size, cfg.hidden_size)
        self.LayerNorm = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)
        # RoBERTa counts positions from padding_idx + 1 and skips pad tokens
        self.roberta_positions = cfg.model_type in ("roberta", "xlm-roberta")
        self.pad_token_id = cfg.pad_token_id

    def forward(self, input_ids, token_type_ids):
        if self.roberta_positions:
            not_pad = input_ids.ne(self.pad_token_id).long()
            positions = torch.cumsum(not_pad, dim=1) * not_pad + self.pad_token_id
        else:
            positions = torch.arange(input_ids.shape[1], device=input_ids.device)[None, :]
        x = self.word_embeddings(input_ids) + self.token_type_embeddings(token_type_ids)
        return self.LayerNorm(x + self.position_embeddings(positions))


class SelfAttention(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        self.num_heads = cfg.num_attention_heads
        self.query = LinearSite(cfg.hidden_size, cfg.hidden_size)
        self.key = LinearSite(cfg.hidden_size, cfg.hidden_size)
        self.value = LinearSite(cfg.hidden_size, cfg.hidden_size)

    def forward(self, x, bias, meta):
        q, k, v = (split_heads(proj(x, meta), self.num_heads) for proj in (self.query, self.key, self.value))
        return merge_heads(attention(q, k, v, bias))


class SublayerOutput(nn.Module):
    """dense -> adapter junction -> LayerNorm; BERT's `BertSelfOutput` and `BertOutput`."""

    def __init__(self, cfg, in_features):
        super().__init__()
        self.dense = LinearSite(in_features, cfg.hidden_size)
        self.LayerNorm = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)
        self.adapters = BottleneckSite()

    def forward(self, h, residual, meta):
        return self.adapters(self.dense(h, meta), residual, self.LayerNorm, meta)


class Attention(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        self.self = SelfAttention(cfg)
        self.output = SublayerOutput(cfg, cfg.hidden_size)


class Intermediate(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        self.dense = LinearSite(cfg.hidden_size, cfg.intermediate_size)
        self.act = model_act(cfg.hidden_act, "hidden_act")


class Layer(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        self.attention = Attention(cfg)
        self.intermediate = Intermediate(cfg)
        self.output = SublayerOutput(cfg, cfg.intermediate_size)

    def forward(self, x, bias, meta):
        x = self.attention.output(self.attention.self(x, bias, meta), x, meta)
        inner = apply_act(self.intermediate.dense(x, meta), self.intermediate.act)
        return self.output(inner, x, meta)


class Encoder(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        self.layer = nn.ModuleList(Layer(cfg) for _ in range(cfg.num_hidden_layers))


class Pooler(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        self.dense = nn.Linear(cfg.hidden_size, cfg.hidden_size)

    def forward(self, hidden):
        return torch.tanh(self.dense(hidden[:, 0]))


class BertModel(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        if getattr(cfg, "position_embedding_type", "absolute") != "absolute":
            raise ValueError(f"position_embedding_type {cfg.position_embedding_type!r} is not supported")
        self.info = ArchInfo(cfg.model_type, cfg.hidden_size, cfg.num_hidden_layers, False, ("bert.", "roberta."), LAYOUT)
        self.embeddings = Embeddings(cfg)
        # tokens one row may hold: RoBERTa's positions start after padding_idx, so 514 positions hold 512 tokens
        offset = cfg.pad_token_id + 1 if self.embeddings.roberta_positions else 0
        self.max_tokens = cfg.max_position_embeddings - offset
        self.encoder = Encoder(cfg)
        self.pooler = Pooler(cfg)

    def forward(self, input_ids, attention_mask, token_type_ids=None, meta: AdapterBatch | None = None):
        if token_type_ids is None:
            token_type_ids = torch.zeros_like(input_ids)
        x = self.embeddings(input_ids, token_type_ids)
        bias = padding_bias(attention_mask, x.dtype, causal=False)
        for layer in self.encoder.layer:
            x = layer(x, bias, meta)
        return x

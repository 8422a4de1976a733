"""Per-adapter prediction heads and embedding pooling, applied per row group after the base pass.

A loop over the distinct adapters *with heads* in a batch, once per forward (not per layer): heads
differ in shape (labels, layers), so they cannot share one stacked matmul.
"""
import torch
import torch.nn.functional as F

from engine.adapters.spec import HeadSpec, HeadType
from engine.types import Pooling
from kernels import apply_act


def last_token_index(attention_mask: torch.Tensor) -> torch.Tensor:
    """[B] index of each row's last real token (right or left padding)."""
    positions = torch.arange(attention_mask.shape[1], device=attention_mask.device)
    return (attention_mask.bool() * positions).amax(dim=1)


def head_token_index(input_ids: torch.Tensor, attention_mask: torch.Tensor, pad_token_id: int | None) -> torch.Tensor:
    """[B] position of the token a decoder's prediction head reads: the one the `adapters` library picks for
    the row run alone, ``torch.ne(input_ids, pad_token_id).sum(-1) - 1`` (its index -1, the last token, without
    a pad_token_id or when that count is 0), counted over the row's attended tokens so padding on either side
    is skipped. It differs from the last attended token when a row holds the pad id as a real token (GPT-2's
    pad is often its EOS): the library then reads an earlier token, and heads trained with it expect that."""
    real = attention_mask.bool()
    counted = real if pad_token_id is None else real & (input_ids != pad_token_id)
    n = counted.sum(1)
    k = torch.where(n > 0, n - 1, real.sum(1) - 1)  # which of the row's attended tokens
    rank = real.long().cumsum(1) - 1  # each position's index among the attended tokens
    return ((rank == k[:, None]) & real).long().argmax(1)


def pool(hidden: torch.Tensor, attention_mask: torch.Tensor, pooling: Pooling, normalize: bool) -> torch.Tensor:
    """[B, T, H] -> [B, H] sentence embeddings."""
    if pooling == Pooling.MEAN:
        mask = attention_mask.unsqueeze(-1).to(hidden.dtype)
        out = (hidden * mask).sum(1) / mask.sum(1).clamp(min=1e-9)
    elif pooling == Pooling.CLS:
        out = hidden[:, 0]
    else:
        out = hidden[torch.arange(hidden.shape[0], device=hidden.device), last_token_index(attention_mask)]
    return F.normalize(out, p=2, dim=-1) if normalize else out


def head_logits(head: HeadSpec, hidden: torch.Tensor, cls_input: torch.Tensor) -> torch.Tensor:
    """Tagging: [n, T, H] -> [n, T, L]; otherwise the row summary [n, H] -> [n, L]."""
    x = hidden if head.head_type == HeadType.TAGGING else cls_input
    for i, (weight, bias) in enumerate(head.layers):
        x = F.linear(x, weight, bias)
        if i < len(head.layers) - 1:
            x = apply_act(x, head.activation)
    return x


def apply_heads(heads: dict[int, HeadSpec], row_slots: list[int], hidden: torch.Tensor, summary: torch.Tensor,
                pooled: torch.Tensor | None) -> tuple[torch.Tensor | None, ...]:
    """Per row logits (None for rows whose adapter has no head).

    ``summary`` [B, H] is the CLS (encoders) or last-token (decoders) state, ``pooled`` the BERT pooler output.
    """
    logits: list[torch.Tensor | None] = [None] * len(row_slots)
    for slot in sorted({s for s in row_slots if s in heads}):
        rows = [r for r, s in enumerate(row_slots) if s == slot]
        index = torch.tensor(rows, device=hidden.device)
        head = heads[slot]
        cls_input = (pooled if head.use_pooler else summary).index_select(0, index)
        out = head_logits(head, hidden.index_select(0, index), cls_input)
        for i, row in enumerate(rows):
            logits[row] = out[i]
    return tuple(logits)

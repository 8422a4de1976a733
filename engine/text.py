"""Rows for text-level tasks: tokenise (or check pre-tokenised ids), pad, and turn logits into labels.

Shared by `Engine.classify/tag/embed` and the gRPC service, so both give identical results.
"""
from dataclasses import dataclass
from typing import Sequence

import torch

from engine.errors import InvalidRequest
from engine.types import Classification, RowHead, TokenTag

CLASSIFY_HEADS = ("classification", "multilabel_classification")
TAG_HEADS = ("tagging",)
MAX_TEXT_CHARS = 100_000  # per input; the tokenizer truncates to the model's limit anyway


@dataclass(frozen=True)
class EncodedRow:
    ids: tuple[int, ...]
    type_ids: tuple[int, ...] | None  # BERT segment ids, None where the tokenizer gives none
    offsets: tuple[tuple[int, int], ...] | None  # character span per token; None for pre-tokenised input
    # per token, whether the tokenizer added it ([CLS], </s>, ...): not tagged. None for pre-tokenised input, or
    # where the tokenizer's mask does not fit its ids (then the special ids but [UNK]'s are skipped)
    added: tuple[bool, ...] | None = None


def check_text(text: object, field: str) -> None:
    """One text input: a string of 1..MAX_TEXT_CHARS characters (an empty one has nothing to serve)."""
    if not isinstance(text, str):
        raise InvalidRequest(f"{field} must be a string, got {type(text).__name__}", field)
    if not 0 < len(text) <= MAX_TEXT_CHARS:
        raise InvalidRequest(f"{field} must hold 1..{MAX_TEXT_CHARS} characters, got {len(text)}", field)


def encode_texts(tokenizer, texts: Sequence[str], max_len: int) -> list[EncodedRow]:
    """Tokenises with truncation to the model's limit; special tokens as the tokenizer adds them."""
    if not isinstance(texts, (list, tuple)) or not texts:
        raise InvalidRequest("texts must be a non-empty list of strings", "texts")
    fields = [f"texts[{i}]" for i in range(len(texts))]
    for text, field in zip(texts, fields):
        check_text(text, field)
    return tokenize(tokenizer, texts, max_len, fields)


def tokenize(tokenizer, texts: Sequence[str], max_len: int, fields: Sequence[str]) -> list[EncodedRow]:
    """`encode_texts` for texts the caller has checked, each named by ``fields`` (the service names them by their
    place in the request)."""
    enc = tokenizer(list(texts), truncation=True, max_length=max_len, return_offsets_mapping=tokenizer.is_fast,
                    return_special_tokens_mask=True)
    rows = []
    for i, field in enumerate(fields):
        if not enc["input_ids"][i]:  # "   " with a tokenizer that adds no special tokens: nothing to run
            raise InvalidRequest(f"{field} holds no tokens once tokenised", field)
        types = enc.get("token_type_ids")
        offsets = enc.get("offset_mapping")
        added = enc["special_tokens_mask"][i]  # one short for some slow tokenizers (CodeGen's with a BOS)
        rows.append(EncodedRow(tuple(enc["input_ids"][i]), tuple(types[i]) if types else None,
                               tuple(map(tuple, offsets[i])) if offsets else None,
                               tuple(map(bool, added)) if len(added) == len(enc["input_ids"][i]) else None))
    return rows


def encode_ids(ids: Sequence[int], vocab_size: int, max_len: int, field: str = "token_ids") -> EncodedRow:
    """A pre-tokenised row, checked against the vocabulary and the length limit; errors name ``field``."""
    if not 0 < len(ids) <= max_len:
        raise InvalidRequest(f"{field} must hold 1..{max_len} ids, got {len(ids)}", field)
    if min(ids) < 0 or max(ids) >= vocab_size:  # the position is looked for only then: this runs for every input
        wrong = next(n for n, i in enumerate(ids) if not 0 <= i < vocab_size)
        raise InvalidRequest(f"{field} must lie in 0..{vocab_size - 1}, got {ids[wrong]} at position {wrong}", field)
    return EncodedRow(tuple(int(i) for i in ids), None, None)


def pad_rows(rows: Sequence[EncodedRow], pad_id: int,
             token_types: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """Right-padded (input_ids, attention_mask, token_type_ids) [B, T] for one forward.

    ``token_types``: whether the model takes the tokenizer's segment ids (encoders, where a row without them gets
    zeros, their default). Decoders get none: GPT-2 adds wte(type) to every token of a row that has types, as
    transformers does, and a pre-tokenised row beside it has none to add, so the rows' results would depend on
    which requests share a forward.
    """
    t = max(len(r.ids) for r in rows)
    ids = torch.full((len(rows), t), pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), t), dtype=torch.long)
    types = torch.zeros((len(rows), t), dtype=torch.long) if token_types and any(r.type_ids for r in rows) else None
    for i, row in enumerate(rows):
        ids[i, :len(row.ids)] = torch.tensor(row.ids)
        mask[i, :len(row.ids)] = 1
        if types is not None and row.type_ids:
            types[i, :len(row.type_ids)] = torch.tensor(row.type_ids)
    return ids, mask, types


def classifications(logits: Sequence[torch.Tensor], heads: Sequence[RowHead | None], adapter: str,
                    task: str) -> list[Classification]:
    """Labels and scores per row, each read with the head its logits came from."""
    results = []
    for row, head in zip(logits, heads):
        require_head(adapter, head and head.head_type, CLASSIFY_HEADS, task)
        if head.head_type == "multilabel_classification":
            probs = torch.sigmoid(row.float())
            chosen = tuple(label for label, p in zip(head.labels, probs.tolist()) if p > 0.5)
            results.append(Classification(chosen[0] if chosen else "", _scores(probs, head.labels), chosen))
        elif len(head.labels) == 1:  # a regression head (the library trains it with MSE): a softmax would be 1.0
            results.append(Classification(head.labels[0], _scores(row.float(), head.labels), head.labels))
        else:
            probs = torch.softmax(row.float(), dim=-1)
            best = head.labels[int(probs.argmax())]
            results.append(Classification(best, _scores(probs, head.labels), (best,)))
    return results


def token_tags(logits: Sequence[torch.Tensor], heads: Sequence[RowHead | None], rows: Sequence[EncodedRow],
               tokenizer, adapter: str, task: str) -> list[list[TokenTag]]:
    """Per row, a tag for each token of the text, read with the row's head. Tokens the tokenizer added ([CLS],
    </s>) are skipped; unknown ones are tagged (skipping every special id dropped [UNK]: "I ❤ Paris" lost its
    heart, an emoji alone got no tag). Pre-tokenised rows skip the special ids but [UNK]'s."""
    special = set(tokenizer.all_special_ids) - {tokenizer.unk_token_id}
    results = []
    for row_logits, head, row in zip(logits, heads, rows):
        require_head(adapter, head and head.head_type, TAG_HEADS, task)
        probs = torch.softmax(row_logits.float(), dim=-1)
        tags = []
        for pos, token_id in enumerate(row.ids):
            if row.added[pos] if row.added is not None else token_id in special:
                continue
            start, end = row.offsets[pos] if row.offsets else (0, 0)
            label = int(probs[pos].argmax())
            tags.append(TokenTag(tokenizer.convert_ids_to_tokens(token_id), start, end, head.labels[label],
                                 float(probs[pos, label])))
        results.append(tags)
    return results


def require_head(adapter: str, head_type: str | None, kinds: tuple[str, ...], task: str) -> None:
    if head_type not in kinds:
        has = f"a {head_type} head" if head_type else "no head"
        raise InvalidRequest(f"adapter {adapter!r} has {has}; {task} needs one of {list(kinds)}")


def _scores(probs: torch.Tensor, labels: tuple[str, ...]) -> dict[str, float]:
    return {label: float(p) for label, p in zip(labels, probs.tolist())}

"""Text-level tasks on top of `Engine.forward`: tokenise, run in row chunks, turn logits into labels."""
import torch

from engine.errors import InvalidRequest
from engine.types import AdapterInfo, Classification, ForwardOutput, TokenTag


def tokenize(tokenizer, texts: list[str], max_len: int) -> dict[str, torch.Tensor]:
    if not texts or not all(isinstance(t, str) for t in texts):
        raise InvalidRequest("texts must be a non-empty list of strings")
    if tokenizer.pad_token is None:  # GPT-2 style tokenizers have none; right padding with EOS
        tokenizer.pad_token = tokenizer.eos_token
    tokenizer.padding_side = "right"
    return tokenizer(texts, padding=True, truncation=True, max_length=max_len, return_tensors="pt",
                     return_offsets_mapping=tokenizer.is_fast)


def classifications(out: ForwardOutput, info: AdapterInfo) -> list[Classification]:
    results = []
    for logits in out.logits:
        if info.head_type == "multilabel_classification":
            probs = torch.sigmoid(logits.float())
            chosen = tuple(info.labels[i] for i in range(len(info.labels)) if probs[i] > 0.5)
            results.append(Classification(chosen[0] if chosen else "", _scores(probs, info), chosen))
        else:
            probs = torch.softmax(logits.float(), dim=-1)
            best = info.labels[int(probs.argmax())]
            results.append(Classification(best, _scores(probs, info), (best,)))
    return results


def token_tags(out: ForwardOutput, info: AdapterInfo, batch, tokenizer) -> list[list[TokenTag]]:
    results = []
    special = set(tokenizer.all_special_ids)
    for row, logits in enumerate(out.logits):
        probs = torch.softmax(logits.float(), dim=-1)
        tags = []
        for pos in range(int(batch["attention_mask"][row].sum())):
            token_id = int(batch["input_ids"][row, pos])
            if token_id in special:
                continue
            start, end = (int(v) for v in batch["offset_mapping"][row, pos]) if "offset_mapping" in batch else (0, 0)
            label = int(probs[pos].argmax())
            tags.append(TokenTag(tokenizer.convert_ids_to_tokens(token_id), start, end, info.labels[label],
                                 float(probs[pos, label])))
        results.append(tags)
    return results


def require_head(info: AdapterInfo, kinds: tuple[str, ...], task: str) -> None:
    if info.head_type not in kinds:
        raise InvalidRequest(f"adapter {info.name!r} has head {info.head_type!r}; {task} needs one of {list(kinds)}")


def _scores(probs: torch.Tensor, info: AdapterInfo) -> dict[str, float]:
    return {label: float(p) for label, p in zip(info.labels, probs.tolist())}

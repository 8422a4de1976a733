"""Prediction heads saved beside AdapterHub adapters (``head_config.json`` + head weights).

The library builds a head as ``[Dropout, Linear(H, H), act] * (layers - 1) + [Dropout, Linear(H, labels)]``
and names the Linears by their index in that list (``heads.<name>.1``, ``heads.<name>.4``).
"""
import logging
from pathlib import Path

from engine.adapters.files import TargetModel, checked, present, read_json, read_weights, take
from engine.adapters.spec import HeadSpec, HeadType
from engine.errors import InvalidAdapter, UnsupportedAdapter
from engine.names import label_problem
from kernels import Act, act_from_name

log = logging.getLogger("adapterserve.adapters")

HEAD_TYPES = {t.value: t for t in HeadType}
# Label names go out in every load reply, GetAdapter and ListAdapters: a head of 200,000 labels loaded, then its
# reply broke gRPC's message limit and the client saw a failure for a load that had taken place. 512 KiB is ~25,000
# labels of 20 bytes, and leaves one adapter's reply (names plus 2-3 bytes of framing each) within the smallest
# limit a server may be given (--max-message-mb 1).
MAX_LABEL_BYTES = 1 << 19


def read_head(folder: Path, target: TargetModel) -> HeadSpec | None:
    """The folder's head, or None when it was saved without one."""
    if not present(folder / "head_config.json"):
        return None
    source = str(folder)
    meta = read_json(folder / "head_config.json")
    cfg, name = meta.get("config"), meta.get("name")
    if not isinstance(cfg, dict) or not isinstance(name, str):
        raise InvalidAdapter(source, "head_config.json needs a 'config' object and a 'name'")
    head_type = HEAD_TYPES.get(cfg.get("head_type")) if isinstance(cfg.get("head_type"), str) else None
    if head_type is None:
        raise UnsupportedAdapter(source, f"head type {cfg.get('head_type')!r} is not supported (classification, multilabel_classification, tagging)")
    # decoder heads read the last token: the library hands it to the head as its cls_output, so use_pooler has no
    # effect there (it refused nothing, and neither do we)
    use_pooler = bool(cfg.get("use_pooler")) and not target.info.is_decoder
    if use_pooler and not target.has_pooler:  # sentence-embedding checkpoints often drop it
        raise InvalidAdapter(source, "use_pooler heads need the base model's pooler, and this checkpoint has no "
                                     "pooler.* weights")
    layers, num_labels = cfg.get("layers"), cfg.get("num_labels")
    if not all(isinstance(n, int) and not isinstance(n, bool) and n >= 1 for n in (layers, num_labels)):
        raise InvalidAdapter(source, f"head layers and num_labels must be positive integers, got {layers!r}, {num_labels!r}")
    try:
        act = act_from_name(cfg.get("activation_function")) if cfg.get("activation_function") else Act.IDENTITY
    except KeyError:
        raise UnsupportedAdapter(source, f"head activation {cfg.get('activation_function')!r} is not supported") from None
    labels = _labels(cfg, num_labels, source)  # before the weights: a head too large to serve is not read
    state = read_weights(folder, "model_head.safetensors", "pytorch_model_head.bin")
    # The library saves (and loads) a head's weights by the substring "heads.<name>", so a folder saved for "sent"
    # beside a head "sent_v2" also holds heads.sent_v2.*: the library's load leaves them aside, and so do we
    spilled = [key for key in state if key.startswith(f"heads.{name}") and not key.startswith(f"heads.{name}.")]
    if spilled:
        log.warning("%s: ignoring %d weights of other heads saved into its head file (the library saves every head "
                    "whose name starts with %r), e.g. %s", source, len(spilled), name, spilled[0])
        for key in spilled:
            del state[key]
    hidden, index, linears = target.info.hidden_size, 0, []
    for layer in range(layers):
        last = layer == layers - 1
        index += 1  # the Dropout before every Linear
        key = f"heads.{name}.{index}."
        out = num_labels if last else hidden
        weight = checked(take(state, key + "weight", source), source, key + "weight", (out, hidden))
        bias = None
        if not last or cfg.get("bias", True):
            bias = checked(take(state, key + "bias", source), source, key + "bias", (out,))
        linears.append((weight, bias))
        index += 1 if last or not cfg.get("activation_function") else 2  # the Linear, and its activation module
    if state:
        raise InvalidAdapter(source, "unexpected head weights", sorted(state)[0])
    return HeadSpec(head_type, tuple(linears), act, use_pooler, labels)


def _labels(cfg: dict, num_labels: int, source: str) -> tuple[str, ...]:
    """The label names in id order, checked by the name rule and, together, by MAX_LABEL_BYTES."""
    if num_labels > MAX_LABEL_BYTES:  # each name takes a byte at least; refused before a list of them is built
        raise _too_large(source, "num_labels", num_labels, None)
    label2id = cfg.get("label2id")
    if not label2id:
        return _served(tuple(f"LABEL_{i}" for i in range(num_labels)), source, "num_labels")
    if not isinstance(label2id, dict) or not all(isinstance(i, int) and not isinstance(i, bool) for i in label2id.values()):
        raise InvalidAdapter(source, f"label2id must map label names to integers, got {label2id!r}")
    for label in label2id:  # labels go out in every reply and listing: a 9 MB one broke ListAdapters for everyone
        problem = label_problem(label)
        if problem is not None:  # "" also means "no label over 0.5" in multi-label replies
            raise InvalidAdapter(source, f"a label name in label2id {problem}")
    if sorted(label2id.values()) != list(range(num_labels)):
        raise InvalidAdapter(source, f"label2id must map onto 0..{num_labels - 1}, got {label2id}")
    return _served(tuple(label for label, _ in sorted(label2id.items(), key=lambda item: item[1])), source, "label2id")


def _served(labels: tuple[str, ...], source: str, field: str) -> tuple[str, ...]:
    size = sum(len(label.encode("utf-8")) for label in labels)
    if size > MAX_LABEL_BYTES:
        raise _too_large(source, field, len(labels), size)
    return labels


def _too_large(source: str, field: str, count: int, size: int | None) -> InvalidAdapter:
    of = "" if size is None else f" of {size} bytes in all"
    return InvalidAdapter(source, f"head_config.json: {field} makes {count} label names{of}; a head may hold at most "
                                  f"{MAX_LABEL_BYTES} bytes of label names (every reply that describes the adapter "
                                  "carries them)")

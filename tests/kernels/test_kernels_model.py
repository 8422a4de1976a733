"""The whole model with the Triton kernels equals the model with the torch reference.

A tiny BERT (hidden 64, 2 layers, 4 heads, intermediate 128, vocab 100) and adapter folders of every
method family from `tests/oracle.py`; one forward per backend (ADAPTERSERVE_KERNELS) on mixed batches
where rows use different adapters (bottleneck variants with different activations and ranks, LoRA,
IA3, PEFT) and some rows none. On CPU the Triton path runs in the interpreter.
"""
import os
import sys

import pytest
import torch

from engine import Engine

LAUNCHERS = {"kernels.bottleneck": "bottleneck", "kernels.lora": "add_lora", "kernels.ia3": "scale_ia3",
             "kernels.layernorm": "layer_norm_rows"}

INTERPRET = os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")
pytestmark = pytest.mark.skipif(not INTERPRET and not torch.cuda.is_available(),
                                reason="the Triton path needs CUDA or TRITON_INTERPRET=1")

ADAPTERS = (
    "seq_bn", "seq_bn_gelu", "seq_bn_gelu_new", "seq_bn_swish", "seq_bn_tanh", "seq_bn_leakyrelu",
    "seq_bn_sigmoid", "seq_bn_rf", "seq_bn_ln_before", "seq_bn_adapter_res_ln", "seq_bn_channel",
    "double_seq_bn", "par_bn", "scaled_par_bn", "bn_custom", "lora", "lora_qkv_ffn", "lora_leave1",
    "ia3", "ia3_qkv_ffn", "peft_lora_rslora", "peft_lora_ffn", "peft_ia3",
)


@pytest.fixture(scope="module")
def engine(tmp_path_factory):
    from oracle import build_oracle
    from transformers import BertConfig, BertModel

    root = tmp_path_factory.mktemp("bert")
    torch.manual_seed(0)
    cfg = BertConfig(vocab_size=100, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                     intermediate_size=128, max_position_embeddings=64)
    BertModel(cfg).save_pretrained(root / "base")
    oracle = build_oracle("bert", root / "oracle", peft=True)  # adapter folders for this config
    eng = Engine.from_pretrained(root / "base", device="cuda" if torch.cuda.is_available() else "cpu")
    for name in ADAPTERS:
        eng.load_adapter(oracle.cases[name].path, name=name)
    return eng


def _forward_both(engine, monkeypatch, adapters, T, seed):
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, 100, (len(adapters), T), generator=gen)
    mask = torch.ones_like(ids)
    mask[::3, max(1, T - 2):] = 0  # some padded rows
    calls = {}
    for module, name in LAUNCHERS.items():  # count Triton launches: the triton run must really use them
        real = getattr(sys.modules[module], name)
        monkeypatch.setattr(sys.modules[module], name,
                            lambda *a, real=real, name=name: calls.update({name: calls.get(name, 0) + 1}) or real(*a))
    out = {}
    for mode in ("torch", "triton"):
        monkeypatch.setenv("ADAPTERSERVE_KERNELS", mode)
        out[mode] = engine.forward(ids, mask, adapters)
        if mode == "torch":
            assert not calls, calls
    return out["torch"], out["triton"], calls


@pytest.mark.parametrize("T", [7, 1])
def test_every_row_a_different_adapter(engine, monkeypatch, T):
    adapters = list(ADAPTERS) + [None]
    ref, tri, calls = _forward_both(engine, monkeypatch, adapters, T, seed=T)
    assert set(calls) == set(LAUNCHERS.values()), calls  # every op ran as a Triton kernel
    torch.testing.assert_close(tri.last_hidden_state, ref.last_hidden_state, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(tri.embeddings, ref.embeddings, atol=1e-5, rtol=1e-5)


def test_rows_sharing_adapters(engine, monkeypatch):
    """Segments of several rows (one hot adapter, a tail, rows without adapter)."""
    adapters = ["lora_qkv_ffn"] * 5 + ["seq_bn_gelu"] * 3 + [None, "par_bn", None, "peft_ia3", "lora_qkv_ffn"]
    ref, tri, _ = _forward_both(engine, monkeypatch, adapters, T=6, seed=1)
    torch.testing.assert_close(tri.last_hidden_state, ref.last_hidden_state, atol=1e-5, rtol=1e-5)

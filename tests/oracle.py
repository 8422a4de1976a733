"""Reference outputs ("oracles") from the `adapters` library, for testing adapterserve.

The engine has to reproduce the library's math, so the library itself is the oracle. `build_oracle` makes a
tiny seeded base model (fp32, eager attention) of one architecture, saves it under `root/base`, then adds each
adapter configuration in turn to an `AutoAdapterModel`, overwrites every adapter (and head) parameter with
seeded random values (many methods are exact no-ops at init: LoRA B=0, par_bn up=0, IA3 ones), runs the WHOLE
shared padded batch with only that adapter active, and saves the adapter to `root/adapters/<name>`.

Each `OracleCase` is therefore "every row run with adapter <name>". The library cannot compute a correct
mixed-adapter batch itself (BatchSplit/Parallel give wrong values or crash for differing methods), so a
mixed-batch test that routes row i to adapter a_i compares against `cases[a_i].hidden[i]`.
With `peft=True`, PEFT LoRA/IA3 adapters on the plain base class are added the same way (names "peft_*").
Case list: `_cases` (identical on all archs, except: pooler head only on encoders; the two residual_before_ln=
"post_add" cases are dropped on llama/gpt2, where adapters 1.3.0 crashes on them).
"""

from __future__ import annotations

import logging
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch
import transformers
from torch import nn

from oracle_store import INDEX, copy_oracle, library_installed, save_oracle, stored_oracle_dir

transformers.logging.set_verbosity_error()
logging.getLogger("adapters").setLevel(logging.ERROR)  # set_active_adapters logs a spurious "none are activated"

VOCAB, HIDDEN, LAYERS, HEADS, INTER, MAX_POS = 100, 64, 2, 4, 128, 64
LENGTHS = (7, 5, 3, 7)  # right padding to T=7: rows of different length, two full rows
ENCODERS = ("bert", "roberta", "xlm-roberta")
ARCHS = (*ENCODERS, "llama", "gpt2")


@dataclass(frozen=True)
class OracleCase:
    name: str  # adapter name == folder name under root/adapters/
    path: Path  # folder written by save_adapter (or PEFT save_pretrained)
    hidden: torch.Tensor  # [B, T, H] final hidden state, whole batch with only this adapter active
    logits: torch.Tensor | None  # [B, L] or [B, T, L] (tagging); None without head
    head_type: str | None  # "classification" | "multilabel_classification" | "tagging" | None


@dataclass(frozen=True)
class OracleBase:
    arch: str  # "bert" | "roberta" | "xlm-roberta" | "llama" | "gpt2"
    path: Path  # base model folder (config.json + model.safetensors) saved by the plain base class
    input_ids: torch.Tensor  # [B, T] int64, right-padded with pad_token_id
    attention_mask: torch.Tensor  # [B, T] int64
    token_type_ids: torch.Tensor | None  # [B, T] for bert, else None
    base_hidden: torch.Tensor  # [B, T, H] transformers' own base output, no adapter
    pooled: torch.Tensor | None  # [B, H] pooler output for the BERT family, else None
    cases: dict[str, OracleCase]


def _base_spec(arch: str) -> tuple[type[transformers.PreTrainedModel], transformers.PretrainedConfig]:
    """Tiny config + plain base class. initializer_range 0.1 (not 0.02) so attention is far from uniform and a
    wrong padding mask or position offset shows up clearly in the outputs."""
    t = transformers
    enc = dict(vocab_size=VOCAB, hidden_size=HIDDEN, num_hidden_layers=LAYERS, num_attention_heads=HEADS,
               intermediate_size=INTER, max_position_embeddings=MAX_POS, initializer_range=0.1)
    if arch == "bert":
        return t.BertModel, t.BertConfig(**enc, type_vocab_size=2, pad_token_id=0)
    if arch in ("roberta", "xlm-roberta"):  # pad 1: position ids start at pad+1 as in transformers
        cls, cfg = (t.RobertaModel, t.RobertaConfig) if arch == "roberta" else (t.XLMRobertaModel, t.XLMRobertaConfig)
        return cls, cfg(**enc, type_vocab_size=1, pad_token_id=1, bos_token_id=0, eos_token_id=2)
    if arch == "llama":
        return t.LlamaModel, t.LlamaConfig(
            vocab_size=VOCAB, hidden_size=HIDDEN, num_hidden_layers=LAYERS, num_attention_heads=HEADS,
            num_key_value_heads=2, intermediate_size=INTER, max_position_embeddings=MAX_POS, initializer_range=0.1,
            pad_token_id=0, bos_token_id=1, eos_token_id=2, tie_word_embeddings=False)
    if arch == "gpt2":
        return t.GPT2Model, t.GPT2Config(
            vocab_size=VOCAB, n_positions=MAX_POS, n_embd=HIDDEN, n_layer=LAYERS, n_head=HEADS, n_inner=INTER,
            initializer_range=0.1, pad_token_id=0, bos_token_id=2, eos_token_id=2)
    raise ValueError(f"unknown arch {arch!r}")


def _cases(arch: str) -> list[tuple[str, Any, tuple[str, dict] | None, bool]]:
    """(name, adapters config, (head type, head kwargs) or None, save as safetensors). Same list on every arch;
    the pooler head exists only on encoders. ln_before must be saved as .bin (safetensors rejects the shared
    adapter_norm_before / adapter_down.0 tensors)."""
    from adapters import BnConfig, DoubleSeqBnConfig, IA3Config, LoRAConfig, ParBnConfig, SeqBnConfig

    cls3 = ("classification", dict(num_labels=3, layers=2, activation_function="tanh"))
    cases: list[tuple[str, Any, tuple[str, dict] | None, bool]] = [
        ("seq_bn", SeqBnConfig(), cls3, False),
        ("seq_bn_st", SeqBnConfig(), None, True),
        ("seq_bn_rf", SeqBnConfig(reduction_factor={"1": 8, "default": 16}), None, False),
    ]
    cases += [(f"seq_bn_{a}", SeqBnConfig(non_linearity=a), None, False)
              for a in ("gelu", "gelu_new", "swish", "tanh", "leakyrelu", "sigmoid")]
    cases += [
        ("seq_bn_res_after_ln", SeqBnConfig(residual_before_ln=False), None, False),
        ("seq_bn_postadd", SeqBnConfig(residual_before_ln="post_add"), None, False),
        ("seq_bn_adapter_res_ln", SeqBnConfig(adapter_residual_before_ln=True, ln_after=True), None, True),
        ("seq_bn_ln_before", SeqBnConfig(ln_before=True), None, False),
        ("seq_bn_no_orig_ln_before", SeqBnConfig(original_ln_before=False), None, False),
        ("seq_bn_no_orig_ln_after", SeqBnConfig(original_ln_after=False), None, False),
        ("seq_bn_scale05", SeqBnConfig(scaling=0.5), None, False),
        ("seq_bn_learned", SeqBnConfig(scaling="learned"), None, False),
        ("seq_bn_channel", SeqBnConfig(scaling="channel"), None, False),
        ("seq_bn_leave0", SeqBnConfig(leave_out=[0]), None, False),
        ("double_seq_bn", DoubleSeqBnConfig(), ("tagging", dict(num_labels=5, layers=1)), False),
        ("double_seq_bn_st", DoubleSeqBnConfig(), None, True),
        ("par_bn", ParBnConfig(), ("multilabel_classification", dict(num_labels=4)), False),
        ("par_bn_ln_after", ParBnConfig(ln_after=True), None, False),
        ("scaled_par_bn", ParBnConfig(scaling="learned"), None, False),
        ("par_bn_no_orig_ln_after", ParBnConfig(original_ln_after=False), None, False),
        ("bn_custom", BnConfig(mh_adapter=True, output_adapter=False, reduction_factor=4, non_linearity="relu",
                               original_ln_before=True, residual_before_ln="post_add", ln_before=True,
                               ln_after=True, adapter_residual_before_ln=True), None, False),
        ("lora", LoRAConfig(), None, True),
        ("lora_qkv_ffn", LoRAConfig(r=4, alpha=16, attn_matrices=["q", "k", "v"], intermediate_lora=True,
                                    output_lora=True), cls3, False),
        ("lora_leave1", LoRAConfig(r=2, alpha=4, leave_out=[1]), None, False),
        ("ia3", IA3Config(), None, False),
        ("ia3_qkv_ffn", IA3Config(attn_matrices=["q", "k", "v"], intermediate_lora=True, output_lora=True),
         None, True),
    ]
    if arch in ENCODERS:
        cases.append(("seq_bn_pooler", SeqBnConfig(), ("classification", dict(num_labels=3, use_pooler=True)), False))
    else:  # residual_before_ln="post_add" crashes on pre-LN decoders (Adapter.pre_forward: `residual` unbound when
        cases = [c for c in cases if c[0] not in ("seq_bn_postadd", "bn_custom")]  # layer_norm is None)
    return cases


def _draw(module: nn.Module, pname: str, p: torch.Tensor, gen: torch.Generator, scale_vec: bool) -> torch.Tensor:
    """Random value for one adapter/head parameter, chosen so that no method is a no-op and activations stay O(1):
    LayerNorm weight ~1, IA3 vectors 1 +- 0.3, learned/channel scaling in [0.5, 1.5], matrices ~N(0, 0.5^2/fan_in)."""
    noise = torch.randn(p.shape, generator=gen, dtype=p.dtype)
    if isinstance(module, nn.LayerNorm):
        return 1.0 + 0.2 * noise if pname == "weight" else 0.1 * noise
    if pname == "scaling":
        return 0.5 + torch.rand(p.shape, generator=gen, dtype=p.dtype)
    if scale_vec:  # IA3: adapters' lora_B / PEFT ia3_l are multiplicative vectors
        return 1.0 + 0.3 * noise
    if p.dim() >= 2:
        return 0.5 * noise / p.shape[-1] ** 0.5
    return 0.1 * noise


@torch.no_grad()
def _randomise(
    model: nn.Module, owns: Callable[[str], bool], gen: torch.Generator, is_scale: Callable[[str], bool]
) -> None:
    """Overwrite every parameter of the modules selected by `owns(module_name)`. Shared tensors (ln_before's
    adapter_norm_before is adapter_down.0) are drawn once; fails if any parameter matching `owns` was missed."""
    seen: set[int] = set()
    for mname, module in model.named_modules():
        if not owns(mname):
            continue
        for pname, p in module.named_parameters(recurse=False):
            if id(p) not in seen:
                seen.add(id(p))
                p.copy_(_draw(module, pname, p, gen, is_scale(pname)))
    missed = [n for n, p in model.named_parameters(remove_duplicate=False) if owns(n) and id(p) not in seen]
    assert seen and not missed, f"not randomised: {missed or 'nothing selected'}"


def _batch(arch: str, pad: int, gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """Right-padded ids avoiding special ids 0..2 (so pad never occurs inside a row), mask, bert token types."""
    T = max(LENGTHS)
    mask = torch.tensor([[1] * n + [0] * (T - n) for n in LENGTHS], dtype=torch.int64)
    ids = torch.randint(3, VOCAB, (len(LENGTHS), T), generator=gen, dtype=torch.int64).masked_fill(mask == 0, pad)
    ttype = None
    if arch == "bert":  # second "segment" = the last third of each real row
        ttype = torch.tensor([[int(n - n // 3 <= t < n) for t in range(T)] for n in LENGTHS], dtype=torch.int64)
    return ids, mask, ttype


def _seed(arch: str, name: str) -> torch.Generator:
    """Stable per-(arch, case) seed, independent of case order."""
    return torch.Generator().manual_seed(zlib.crc32(f"{arch}/{name}".encode()))


def _peft_cases(arch: str) -> list[tuple[str, Any]]:
    """PEFT LoRA (rsLoRA on q/v; plain on attention + FFN; "all-linear") and IA3 (k/v + one feed-forward module)."""
    from peft import IA3Config, LoraConfig

    qv, more, ia3, ff = {
        "llama": (["q_proj", "v_proj"], ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
                  ["k_proj", "v_proj", "down_proj"], ["down_proj"]),
        "gpt2": (["c_attn"], ["c_attn", "c_proj", "c_fc"], ["c_attn", "mlp.c_proj"], ["mlp.c_proj"]),
    }.get(arch, (["query", "value"], ["query", "key", "value", "output.dense", "intermediate.dense"],
                 ["key", "value", "intermediate.dense"], ["intermediate.dense"]))
    fifo = arch == "gpt2"  # GPT-2 Conv1D stores weights as (in, out)
    return [
        ("peft_lora_rslora", LoraConfig(r=4, lora_alpha=8, target_modules=qv, use_rslora=True, fan_in_fan_out=fifo)),
        ("peft_lora_ffn", LoraConfig(r=4, lora_alpha=8, target_modules=more, fan_in_fan_out=fifo)),
        ("peft_ia3", IA3Config(target_modules=ia3, feedforward_modules=ff, fan_in_fan_out=fifo)),
        # every linear layer; on the BERT family that includes the pooler, which nothing served reads
        ("peft_lora_all_linear", LoraConfig(r=2, lora_alpha=4, target_modules="all-linear", fan_in_fan_out=fifo)),
    ]


def build_oracle(arch: str, root: Path, *, peft: bool = True) -> OracleBase:
    """Build the base model, every adapter folder and their reference outputs under `root` (created if missing).

    With ADAPTERSERVE_ORACLE_DIR set (`oracle_store`), the oracle is built once into that folder (PEFT cases
    included) when the library is installed, else read from it, and copied to `root`.
    """
    stored = stored_oracle_dir(arch)
    if stored is None:
        return _build(arch, Path(root), peft)
    if not (stored / INDEX).is_file() and library_installed():
        save_oracle(_build(arch, stored, peft=True), stored)
    return copy_oracle(stored, Path(root), peft)


@torch.no_grad()
def _build(arch: str, root: Path, peft: bool) -> OracleBase:
    from adapters import AutoAdapterModel

    (root / "adapters").mkdir(parents=True, exist_ok=True)
    base_cls, cfg = _base_spec(arch)
    torch.manual_seed(zlib.crc32(arch.encode()))
    base_cls._from_config(cfg, attn_implementation="eager").save_pretrained(root / "base", safe_serialization=True)
    base = base_cls.from_pretrained(root / "base", attn_implementation="eager").eval()

    ids, mask, ttype = _batch(arch, cfg.pad_token_id, _seed(arch, "batch"))
    kw: dict[str, torch.Tensor] = dict(attention_mask=mask) | ({"token_type_ids": ttype} if ttype is not None else {})
    out = base(ids, **kw)
    pooled = out.pooler_output if arch in ENCODERS else None
    cases: dict[str, OracleCase] = {}

    model = AutoAdapterModel.from_pretrained(root / "base", attn_implementation="eager").eval()
    # With a head active the flex model returns head outputs, so read the final hidden state (after the adapters,
    # and after ln_f / norm on decoders) from the inner base model's own output via a hook.
    captured: list[torch.Tensor] = []
    model.base_model.register_forward_hook(lambda _m, _i, o: captured.append(o.last_hidden_state))
    for name, config, head, st in _cases(arch):
        model.add_adapter(name, config=config)
        if head is not None:
            head_type, hkw = head
            if head_type == "tagging":
                model.add_tagging_head(name, **hkw)
            else:
                model.add_classification_head(name, multilabel=head_type != "classification", **hkw)
        composes_by_scale = config.architecture == "lora" and config.composition_mode == "scale"
        _randomise(model, lambda n, name=name: name in n.split("."), _seed(arch, name),  # adapter + its head
                   lambda pn, s=composes_by_scale: s and pn == "lora_B")
        model.set_active_adapters(name)
        captured.clear()
        res = model(ids, head=name, **kw) if head is not None else model(ids, **kw)
        assert len(captured) == 1 and (head is not None or model.active_head is None)
        path = root / "adapters" / name
        model.save_adapter(str(path), name, use_safetensors=st)
        cases[name] = OracleCase(name, path, captured[0].clone(), res.logits.clone() if head else None,
                                 head[0] if head else None)
        model.delete_adapter(name)
        if head is not None:
            model.delete_head(name)

    if peft:
        from peft import get_peft_model

        for name, pcfg in _peft_cases(arch):
            pmodel = get_peft_model(base_cls.from_pretrained(root / "base", attn_implementation="eager"), pcfg).eval()
            _randomise(pmodel, lambda n: bool({"lora_A", "lora_B", "ia3_l"} & set(n.split("."))),
                       _seed(arch, name), lambda pn: pn == "default")  # ia3_l is a ParameterDict {"default": l}
            path = root / "adapters" / name
            hidden = pmodel(ids, **kw).last_hidden_state.clone()
            pmodel.save_pretrained(str(path), safe_serialization=True)
            cases[name] = OracleCase(name, path, hidden, None, None)

    return OracleBase(arch, root / "base", ids, mask, ttype, out.last_hidden_state, pooled, cases)

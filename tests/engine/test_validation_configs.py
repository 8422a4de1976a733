"""Adapter configs and heads: unsupported options, malformed values and PEFT refusals, each named."""
import json
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

from adapter_edits import assert_refused, copy_case, edit_config, edit_weights
from engine import Engine, InvalidAdapter, UnsupportedAdapter
from oracle import build_oracle

import engine.adapters.formats as formats


@pytest.mark.parametrize("changes,fragment", [
    ({"config.architecture": "prefix_tuning"}, "method 'prefix_tuning' is not supported"),
    ({"config.architecture": "union"}, "method 'union'"),
    ({"config.phm_layer": True}, "Compacter"),
    ({"config.use_gating": True}, "gated bottleneck"),
    ({"config.new_field": 1}, "fields ['new_field'] are not supported"),
    ({"config.non_linearity": "prelu"}, "activation 'prelu'"),  # a learned slope: no parameter-free function
])
def test_unsupported_bottleneck_options(engine, bert, tmp_path, changes, fragment):
    folder = copy_case(bert, "seq_bn_rf", tmp_path / "seq_bn_rf")
    edit_config(folder, **changes)
    assert_refused(engine, folder, UnsupportedAdapter, fragment)


@pytest.mark.parametrize("case,changes,fragment", [
    ("lora_leave1", {"config.use_dora": True}, "DoRA"),
    ("lora_leave1", {"config.vera_d": 0.1}, "VeRA"),
    ("seq_bn_rf", {"config.scaling": 4}, "unknown scaling 4"),
    ("seq_bn_rf", {"config.residual_before_ln": "pre"}, "residual_before_ln"),
    ("seq_bn_rf", {"config.reduction_factor": {"3": 2}}, "reduction_factor for layer 0"),
])
def test_invalid_or_unsupported_options(engine, bert, tmp_path, case, changes, fragment):
    folder = copy_case(bert, case, tmp_path / case)
    edit_config(folder, **changes)
    with pytest.raises((InvalidAdapter, UnsupportedAdapter), match=fragment.replace("(", r"\(")):
        engine.load_adapter(folder)


NAN, INF = float("nan"), float("inf")


@pytest.mark.parametrize("case,changes,error,fragment", [  # values of the wrong JSON type or not finite
    ("seq_bn_rf", {"config.leave_out": "0"}, InvalidAdapter, "leave_out must be a list of layer numbers, got '0'"),
    ("lora_leave1", {"config.leave_out": 1}, InvalidAdapter, "leave_out must be a list of layer numbers, got 1"),
    ("seq_bn_rf", {"config.non_linearity": 5}, UnsupportedAdapter, "activation 5 is not supported"),
    ("seq_bn_rf", {"config.non_linearity": None}, UnsupportedAdapter, "activation None is not supported"),  # library
    ("seq_bn_rf", {"config.reduction_factor": NAN}, InvalidAdapter, "reduction_factor for layer 0"),
    ("seq_bn_rf", {"config.scaling": INF}, InvalidAdapter, "unknown scaling inf"),
    ("lora_leave1", {"config.alpha": NAN}, InvalidAdapter, "alpha must be a finite number, got nan"),
    ("ia3", {"config.alpha": "1"}, InvalidAdapter, "alpha must be a finite number, got '1'"),
    ("lora_leave1", {"config.attn_matrices": 3}, InvalidAdapter, "attn_matrices must be a list"),
    ("lora_leave1", {"config.alpha": 1e300}, InvalidAdapter, "alpha / r = 5e+299 overflows float32"),
    ("ia3", {"config.r": 2}, InvalidAdapter, "composition_mode 'scale' (IA3) needs r = 1, got r=2"),  # as the library
])
def test_malformed_config_values(engine, bert, tmp_path, case, changes, error, fragment):
    folder = copy_case(bert, case, tmp_path / case)
    edit_config(folder, **changes)
    assert_refused(engine, folder, error, fragment)


@pytest.mark.parametrize("changes,error,fragment", [
    ({"label2id": ["a", "b", "c"]}, InvalidAdapter, "label2id must map label names to integers"),
    ({"label2id": {"a": 0, "b": "1", "c": 2}}, InvalidAdapter, "label2id must map label names to integers"),
    ({"head_type": ["classification"]}, UnsupportedAdapter, "head type ['classification']"),
    ({"activation_function": 5}, UnsupportedAdapter, "head activation 5"),
    ({"num_labels": True}, InvalidAdapter, "num_labels must be positive integers, got 2, True"),
    # label names go out in every listing (a 9 MB one broke ListAdapters for everyone)
    ({"label2id": {"x" * 300: 0, "pos": 1}}, InvalidAdapter, "a label name in label2id holds at most 256 characters"),
    ({"label2id": {"": 0, "pos": 1}}, InvalidAdapter, "a label name in label2id must be a non-empty string, got ''"),
    ({"label2id": {"a\u202eb": 0, "pos": 1}}, InvalidAdapter, "must not hold control characters or invisible ones"),
    # invisible labels, and look-alikes of a visible one, stay refused (an earlier version of the label rule let them)
    ({"label2id": {"\u200b": 0, "pos": 1}}, InvalidAdapter, "must not hold control characters or invisible ones"),
    ({"label2id": {"neg": 0, "pos\u200b": 1}}, InvalidAdapter, "must not hold control characters or invisible"),
    ({"label2id": {"neg": 0, "pos\u200d": 1}}, InvalidAdapter, "joiners and variation selectors after a visible"),
    ({"label2id": {"\ufe0f": 0, "pos": 1}}, InvalidAdapter, "joiners and variation selectors after a visible"),
    ({"label2id": {"\x85": 0, "pos": 1}}, InvalidAdapter, r"got '\x85'"),
    ({"label2id": {"  ": 0, "pos": 1}}, InvalidAdapter, "a label name in label2id needs a visible character"),
    ({"label2id": {"neg": 0, "a\u2028b": 1}}, InvalidAdapter, r"got 'a\u2028b'"),
    ({"label2id": {"neg": 0, "pos\n": 1}}, InvalidAdapter, "got 'pos\\n'"),
    # every reply describing the adapter carries its labels: 200,000 of them loaded, then broke the load's own reply.
    # Refused before the head weights are read (these would not fit: (2, 64) saved)
    ({"num_labels": 2500, "label2id": {f"{i:0>250}": i for i in range(2500)}}, InvalidAdapter,
     "label2id makes 2500 label names of 625000 bytes in all; a head may hold at most 524288 bytes"),
    ({"num_labels": 2 ** 20, "label2id": None}, InvalidAdapter, "num_labels makes 1048576 label names; a head may"),
])
def test_malformed_head_config(engine, bert, tmp_path, changes, error, fragment):
    folder = copy_case(bert, "seq_bn", tmp_path / "seq_bn")
    head = json.loads((folder / "head_config.json").read_text())
    head["config"].update(changes)
    (folder / "head_config.json").write_text(json.dumps(head))
    assert_refused(engine, folder, error, fragment)


@pytest.mark.parametrize("labels", [
    ("\u2764\ufe0f", "\U0001f494", "\U0001f610"),  # an emoji with its variation selector
    ("\U0001f468\u200d\U0001f469\u200d\U0001f467", "solo", "pair"),  # joined by zero-width joiners
    ("\u0646\u06cc\u0645\u0647\u200c\u0634\u0628", "day", "dusk"),  # Persian, with a zero-width non-joiner
    (" pos", "neg ", "mixed"),  # surrounding spaces, as the author wrote them
])
def test_label_names_in_any_script_load(engine, bert, tmp_path, labels):
    """Labels were held to the adapter-name rule, which refuses every invisible character: the library serves these
    and we refused the whole adapter (review)."""
    folder = copy_case(bert, "seq_bn", tmp_path / "seq_bn")
    head = json.loads((folder / "head_config.json").read_text())
    head["config"]["label2id"] = {label: i for i, label in enumerate(labels)}
    (folder / "head_config.json").write_text(json.dumps(head))
    info = engine.load_adapter(folder, "script-labels")
    try:
        assert info.labels == labels
    finally:
        engine.unload_adapter("script-labels")


def test_weights_of_other_heads_spilled_into_the_head_file_are_left_aside(engine, bert, tmp_path, caplog):
    """The library saves a head by the substring "heads.<name>": beside a head "<name>_v2", that one's weights land in
    this folder too. The library's load leaves them aside; ours refused the folder ("unexpected head weights")."""
    folder = copy_case(bert, "seq_bn", tmp_path / "seq_bn")
    name = json.loads((folder / "head_config.json").read_text())["name"]
    path = next(p for p in (folder / "model_head.safetensors", folder / "pytorch_model_head.bin") if p.exists())
    state = load_file(path) if path.suffix == ".safetensors" else torch.load(path, weights_only=True)
    state |= {f"heads.{name}_v2.{k[len(f'heads.{name}.'):]}": v.clone() for k, v in state.items()}
    save_file(state, path) if path.suffix == ".safetensors" else torch.save(state, path)
    clean = engine.load_adapter(bert.cases["seq_bn"].path, "clean")
    spilled = engine.load_adapter(folder, "spilled")
    assert f"ignoring {len(state) // 2} weights of other heads" in caplog.text
    clean_out, spilled_out = (engine.forward(bert.input_ids, bert.attention_mask, [n] * 4, bert.token_type_ids)
                              for n in ("clean", "spilled"))
    assert all(torch.equal(a, b) for a, b in zip(clean_out.logits, spilled_out.logits))
    assert clean.labels == spilled.labels
    for n in ("clean", "spilled"):
        engine.unload_adapter(n)
    # a key of another head that does not share the prefix is still refused
    state["heads.other.1.bias"] = torch.zeros(2)
    save_file(state, path) if path.suffix == ".safetensors" else torch.save(state, path)
    assert_refused(engine, folder, InvalidAdapter, "unexpected head weights", "heads.other.1.bias")


@pytest.mark.parametrize("case,changes,fragment", [
    ("peft_lora_rslora", {"lora_alpha": "8"}, "lora_alpha for encoder.layer.0.attention.self.query must be a finite"),
    ("peft_lora_rslora", {"rank_pattern": ["x"]}, "rank_pattern must map module patterns to values"),
    ("peft_lora_rslora", {"alpha_pattern": {"[": 2}}, "alpha_pattern holds an invalid regular expression"),
    ("peft_lora_rslora", {"target_modules": ["nonexistent_mod"]}, "its config targets none of the saved modules"),
    ("peft_lora_rslora", {"layers_to_transform": [99]}, "its config targets none of the saved modules"),
    ("peft_lora_rslora", {"target_modules": 5}, "target_modules must be a regex or a list of module names"),
    ("peft_lora_rslora", {"layers_to_transform": "0"}, "layers_to_transform must be a layer index or a list"),
    ("peft_lora_rslora", {"layers_to_transform": [0], "layers_pattern": "("}, "layers_pattern holds an invalid"),
    ("peft_lora_rslora", {"target_modules": ".*query", "layers_to_transform": [0]}, "need a list of target_modules"),
    ("peft_lora_rslora", {"layers_pattern": "layer"}, "layers_pattern needs layers_to_transform"),
    ("peft_ia3", {"feedforward_modules": 5}, "feedforward_modules must be a regex or a list of module names"),
    ("peft_ia3", {"feedforward_modules": "("}, "feedforward_modules holds an invalid regular expression"),
])
def test_malformed_peft_config(engine, bert, tmp_path, case, changes, fragment):
    folder = copy_case(bert, case, tmp_path / case)
    cfg = json.loads((folder / "adapter_config.json").read_text())
    (folder / "adapter_config.json").write_text(json.dumps({**cfg, **changes}))
    assert_refused(engine, folder, InvalidAdapter, fragment)


def test_extra_tensors_of_a_peft_lora_module_are_refused(engine, bert, tmp_path):
    folder = copy_case(bert, "peft_lora_rslora", tmp_path / "peft_lora_rslora")
    path = next(folder.glob("adapter_model.*"))
    state = load_file(path) if path.suffix == ".safetensors" else torch.load(path, weights_only=True)
    key = next(k for k in state if k.endswith("lora_A.weight")).replace("lora_A.weight", "ia3_l")
    state[key] = torch.ones(1, 64)
    save_file(state, folder / "adapter_model.safetensors")
    assert_refused(engine, folder, InvalidAdapter, "unexpected key in a LoRA adapter", key)


def test_config_errors_no_check_names_are_still_typed(engine, bert, tmp_path, monkeypatch):
    def parser_trips(folder, target):  # what a config value of an unforeseen JSON type does to a reader
        raise TypeError("'<' not supported between instances of 'str' and 'int'")

    monkeypatch.setattr(formats, "read_adapterhub", parser_trips)
    assert_refused(engine, copy_case(bert, "seq_bn", tmp_path / "seq_bn"), InvalidAdapter, "malformed config value (TypeError: '<'")


def test_values_beyond_the_serving_dtype_are_refused(bert, tmp_path):
    engine = Engine.from_pretrained(bert.path, device="cpu", dtype="float16")
    folder = copy_case(bert, "lora_leave1", tmp_path / "lora_leave1")
    key = "bert.encoder.layer.0.attention.self.query.loras.lora_leave1.lora_A"
    edit_weights(folder, lambda s: s[key].__setitem__((0, 0), 1e5))  # finite in float32, inf in float16
    assert_refused(engine, folder, InvalidAdapter, "values overflow the serving dtype torch.float16",
                    "encoder.layer.0.attention.self.query.lora_A")


def test_post_add_residual_on_a_decoder_is_refused(tmp_path):
    llama = build_oracle("llama", tmp_path / "llama", peft=False)
    engine = Engine.from_pretrained(llama.path, device="cpu")
    folder = tmp_path / "postadd"
    shutil.copytree(llama.cases["seq_bn"].path, folder)
    edit_config(folder, **{"config.residual_before_ln": "post_add"})
    assert_refused(engine, folder, InvalidAdapter, "post_add")


def test_peft_refusals(engine, bert, tmp_path):
    folder = copy_case(bert, "peft_lora_rslora", tmp_path / "peft_lora_rslora")
    cfg = json.loads((folder / "adapter_config.json").read_text())
    (folder / "adapter_config.json").write_text(json.dumps({**cfg, "use_dora": True}))
    assert_refused(engine, folder, UnsupportedAdapter, "DoRA")
    (folder / "adapter_config.json").write_text(json.dumps({**cfg, "peft_type": "PREFIX_TUNING"}))
    assert_refused(engine, folder, UnsupportedAdapter, "peft_type 'PREFIX_TUNING'")
    (folder / "adapter_config.json").write_text(json.dumps({**cfg, "target_modules": ["classifier"]}))
    save_file({"base_model.model.classifier.lora_A.weight": torch.zeros(4, 64)}, folder / "adapter_model.safetensors")
    assert_refused(engine, folder, UnsupportedAdapter, "'classifier' is not an adapter site")

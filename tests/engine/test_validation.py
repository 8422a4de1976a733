"""Every validation error names the problem, and a failed load leaves the engine exactly as before."""
import json
import os
import shutil
import threading

import pytest
import torch
from safetensors.torch import load_file, save_file

from engine import (AdapterCapacityExceeded, AdapterNotFound, Engine, EngineConfig, InvalidAdapter, InvalidRequest,
                    UnsupportedAdapter)
from oracle import build_oracle

import engine.adapters.formats as formats


@pytest.fixture(scope="module")
def bert(tmp_path_factory):
    return build_oracle("bert", tmp_path_factory.mktemp("bert"))


@pytest.fixture()
def engine(bert):
    return Engine.from_pretrained(bert.path, device="cpu")


def _copy(bert, case: str, tmp_path):
    dst = tmp_path / case
    shutil.copytree(bert.cases[case].path, dst)
    return dst


def _edit_config(folder, **changes):
    meta = json.loads((folder / "adapter_config.json").read_text())
    for key, value in changes.items():
        if key.startswith("config."):
            meta["config"][key[len("config."):]] = value
        else:
            meta[key] = value
    (folder / "adapter_config.json").write_text(json.dumps(meta))


def _edit_weights(folder, edit):
    path = folder / "pytorch_adapter.bin"
    state = torch.load(path, weights_only=True)
    edit(state)
    torch.save(state, path)


def _assert_refused(engine, folder, error, *fragments):
    before = (engine.list_adapters(), engine.pool.num_free)
    with pytest.raises(error) as info:
        engine.load_adapter(folder)
    for fragment in fragments:
        assert fragment in str(info.value), str(info.value)
    assert (engine.list_adapters(), engine.pool.num_free) == before  # nothing became visible


def test_wrong_base_model_type(engine, bert, tmp_path):
    folder = _copy(bert, "seq_bn", tmp_path)
    _edit_config(folder, model_type="llama")
    _assert_refused(engine, folder, InvalidAdapter, "model_type 'llama'", "base model is 'bert'")


def test_wrong_hidden_size(engine, bert, tmp_path):
    folder = _copy(bert, "lora_leave1", tmp_path)
    _edit_config(folder, hidden_size=768)
    _assert_refused(engine, folder, InvalidAdapter, "hidden_size 768", "has 64")


def test_unknown_key(engine, bert, tmp_path):
    folder = _copy(bert, "seq_bn_rf", tmp_path)
    key = "bert.encoder.layer.0.output.adapters.seq_bn_rf.extra.weight"
    _edit_weights(folder, lambda s: s.__setitem__(key, torch.zeros(3)))
    _assert_refused(engine, folder, InvalidAdapter, "unexpected key", "layer.0.output.adapters.seq_bn_rf.extra.weight")


def test_missing_key(engine, bert, tmp_path):
    folder = _copy(bert, "seq_bn_rf", tmp_path)
    _edit_weights(folder, lambda s: s.pop("bert.encoder.layer.1.output.adapters.seq_bn_rf.adapter_up.bias"))
    _assert_refused(engine, folder, InvalidAdapter, "missing key", "layer.1.output.adapters.seq_bn_rf.adapter_up.bias")


def test_wrong_shape(engine, bert, tmp_path):
    folder = _copy(bert, "ia3", tmp_path)
    key = "bert.encoder.layer.0.attention.self.key.loras.ia3.lora_B"
    _edit_weights(folder, lambda s: s.__setitem__(key, torch.ones(32, 1)))
    _assert_refused(engine, folder, InvalidAdapter, "shape (32, 1)", "expected (64, 1)", "attention.self.key.loras.ia3")


def test_non_finite_values(engine, bert, tmp_path):
    folder = _copy(bert, "lora_leave1", tmp_path)
    key = "bert.encoder.layer.0.attention.self.query.loras.lora_leave1.lora_A"
    _edit_weights(folder, lambda s: s[key].__setitem__((0, 0), float("nan")))
    _assert_refused(engine, folder, InvalidAdapter, "NaN", "query.loras.lora_leave1.lora_A")


@pytest.mark.parametrize("kind, make", [
    ("a torch.sparse_coo", lambda t: t.to_sparse()),
    ("a meta", lambda t: torch.empty(t.shape, device="meta")),
    ("a quantized", lambda t: torch.quantize_per_tensor(t, 0.1, 0, torch.qint8)),
])
def test_tensors_that_are_not_dense_weights(engine, bert, tmp_path, kind, make):
    # weights_only unpickles them all; they used to reach the checks and fail there as INTERNAL errors
    folder = _copy(bert, "lora_leave1", tmp_path)
    key = "bert.encoder.layer.0.attention.self.query.loras.lora_leave1.lora_A"
    _edit_weights(folder, lambda s: s.__setitem__(key, make(s[key])))
    _assert_refused(engine, folder, InvalidAdapter, f"{kind} tensor, not dense weights", key.removeprefix("bert."))


def test_config_values_beyond_float32_and_deep_nesting(engine, bert, tmp_path):
    folder = _copy(bert, "seq_bn", tmp_path)
    _edit_config(folder, **{"config.scaling": -1e300})  # was an INTERNAL error while filling the scaling table
    _assert_refused(engine, folder, InvalidAdapter, "scaling -1e+300 overflows float32 (at most 3.403e+38")
    for name in ("adapter_config.json", "head_config.json"):
        folder = _copy(bert, "seq_bn", tmp_path / name)
        (folder / name).write_text("[" * 100_000 + "]" * 100_000)
        _assert_refused(engine, folder, InvalidAdapter, f"cannot read {name}: nested too deeply")
        (folder / name).write_text('{"n": ' + "9" * 5000 + "}")  # Python's int parsing stops at 4300 digits
        _assert_refused(engine, folder, InvalidAdapter, f"cannot read {name}: Exceeds the limit")


def test_ln_before_duplicates_must_agree(engine, bert, tmp_path):
    # the library holds one LayerNorm under two keys and ends up with adapter_down.0's copy; we read the other
    folder = _copy(bert, "seq_bn_ln_before", tmp_path)
    key = "bert.encoder.layer.1.output.adapters.seq_bn_ln_before.adapter_down.0.bias"
    _edit_weights(folder, lambda s: s.__setitem__(key, s[key] + 0.5))  # a tensor of its own: the two share storage
    _assert_refused(engine, folder, InvalidAdapter, "differs from adapter_norm_before.bias", key.removeprefix("bert."))
    assert engine.load_adapter(bert.cases["seq_bn_ln_before"].path).method == "bottleneck"  # equal copies load
    # one copy alone loads as in the library, and computes the same; the library takes each parameter from
    # whichever copy holds it, so a weight from one copy and the bias from the other load too
    ids, mask = torch.tensor([[1, 5, 7, 2]]), torch.ones(1, 4, dtype=torch.long)
    full = engine.forward(ids, mask, ["seq_bn_ln_before"]).last_hidden_state
    dropped = {"dup_only": (".adapter_norm_before.",), "norm_only": (".adapter_down.0.",),
               "mixed": (".adapter_norm_before.bias", ".adapter_down.0.weight")}
    for name, parts in dropped.items():
        only = _copy(bert, "seq_bn_ln_before", tmp_path / name)
        _edit_weights(only, lambda s: [s.pop(k) for k in list(s) if any(p in k for p in parts)])
        engine.load_adapter(only, name=name)
        assert torch.equal(engine.forward(ids, mask, [name]).last_hidden_state, full), name
    neither = _copy(bert, "seq_bn_ln_before", tmp_path / "neither")
    _edit_weights(neither, lambda s: [s.pop(k) for k in list(s) if k.endswith(("adapter_norm_before.bias",
                                                                                "adapter_down.0.bias"))])
    _assert_refused(engine, neither, InvalidAdapter, "missing key", "adapter_norm_before.bias")


def test_bin_and_safetensors_side_by_side_must_agree(engine, bert, tmp_path):
    folder = _copy(bert, "lora_leave1", tmp_path)
    state = torch.load(folder / "pytorch_adapter.bin", weights_only=True)
    save_file(state, folder / "adapter.safetensors")
    assert engine.load_adapter(folder).method == "lora"  # the same tensors in both: either is right
    key = next(iter(state))
    save_file({**state, key: state[key] + 1}, folder / "adapter.safetensors")
    # the library reads the .bin by default, use_safetensors=True the other: either choice is wrong for someone
    _assert_refused(engine, folder, InvalidAdapter, "adapter.safetensors and pytorch_adapter.bin hold different")
    # equal by value, not bit for bit: -0.0 and 0.0 serve alike, and were refused as different files
    signed = {k: v.clone() for k, v in state.items()}
    state[key][0, 1], signed[key][0, 1] = 0.0, -0.0
    torch.save(state, folder / "pytorch_adapter.bin")
    save_file(signed, folder / "adapter.safetensors")
    assert engine.load_adapter(folder, name="signed_zero").method == "lora"
    # NaN in both, with different payloads: refused for the NaN, not as a difference
    payload = signed[key].view(torch.int32)
    state[key][0, 0], payload[0, 0] = float("nan"), 0x7FC00001
    assert torch.isnan(signed[key][0, 0]) and payload[0, 0] != state[key].view(torch.int32)[0, 0]
    torch.save(state, folder / "pytorch_adapter.bin")
    save_file(signed, folder / "adapter.safetensors")
    _assert_refused(engine, folder, InvalidAdapter, "contains NaN or infinite values")


@pytest.mark.parametrize("case,name", [("seq_bn", "head_config.json"), ("seq_bn", "pytorch_adapter.bin"),
                                       ("peft_lora_rslora", "adapter_model.safetensors"),
                                       ("seq_bn", "adapter_config.json")])
@pytest.mark.parametrize("link", ["loop", "dangling"])
def test_a_link_to_no_file_is_refused_not_read_as_absent(engine, bert, tmp_path, case, name, link):
    # read as absent, such a head_config.json dropped the head without a word, and a .bin beside adapter.safetensors
    # left the other file to be served alone
    folder = _copy(bert, case, tmp_path)
    if name == "pytorch_adapter.bin":  # the safetensors twin is the one that would have been served
        save_file(torch.load(folder / name, weights_only=True), folder / "adapter.safetensors")
    (folder / name).unlink()
    if link == "loop":
        (folder / "other").symlink_to(folder / name)
        (folder / name).symlink_to(folder / "other")
    else:
        (folder / name).symlink_to(tmp_path / "gone")
    _assert_refused(engine, folder, InvalidAdapter, f"{name} is a symbolic link that leads to no file")


def test_an_adapter_folder_that_is_a_link_to_nothing_is_named_so(engine, tmp_path):
    (tmp_path / "loop").symlink_to(tmp_path / "loop")
    _assert_refused(engine, tmp_path / "loop", InvalidAdapter, "a symbolic link that leads nowhere")
    (tmp_path / "dangling").symlink_to(tmp_path / "gone")
    _assert_refused(engine, tmp_path / "dangling", InvalidAdapter, "a symbolic link that leads nowhere")


def test_bin_keys_must_be_strings(engine, bert, tmp_path):
    folder = _copy(bert, "lora_leave1", tmp_path)
    _edit_weights(folder, lambda s: s.__setitem__(7, torch.zeros(3)))
    _assert_refused(engine, folder, InvalidAdapter, "pytorch_adapter.bin is not a state dict: key 7 is no string")


@pytest.mark.parametrize("name", ["adapter_config.json", "pytorch_adapter.bin", "head_config.json"])
def test_a_fifo_in_an_adapter_folder_is_refused_at_once(engine, bert, tmp_path, name):
    # opening one waits for a writer forever: each such load held a worker thread, and a few stopped every admin call
    folder = _copy(bert, "seq_bn", tmp_path)
    (folder / name).unlink()
    os.mkfifo(folder / name)
    outcome = []
    worker = threading.Thread(target=lambda: outcome.append(_raised(engine.load_adapter, folder)), daemon=True)
    worker.start()
    worker.join(30)
    assert outcome, f"load_adapter still blocked on the FIFO {name} after 30 s"
    assert isinstance(outcome[0], InvalidAdapter) and f"{name} is not a regular file" in str(outcome[0]), outcome
    assert engine.list_adapters() == []


@pytest.mark.parametrize("name", ["adapter_config.json", "pytorch_adapter.bin"])
def test_a_directory_in_place_of_an_adapter_file_is_named(engine, bert, tmp_path, name):
    # os.fdopen refused it first, as "[Errno 21] Is a directory: 16" (a descriptor number, not the file)
    folder = _copy(bert, "seq_bn", tmp_path)
    (folder / name).unlink()
    (folder / name).mkdir()
    _assert_refused(engine, folder, InvalidAdapter, f"{name} is not a regular file")


def test_a_pooler_head_needs_the_pooler_weights(bert, tmp_path):
    # sentence-embedding checkpoints often drop the pooler; such a head loaded, then failed the whole batch it
    # was in with AttributeError ('NoneType' object has no attribute 'index_select')
    base = tmp_path / "base"
    shutil.copytree(bert.path, base)
    state = load_file(base / "model.safetensors")
    save_file({k: v for k, v in state.items() if not k.startswith("pooler.")}, base / "model.safetensors")
    engine = Engine.from_pretrained(base, device="cpu")
    _assert_refused(engine, bert.cases["seq_bn_pooler"].path, InvalidAdapter, "use_pooler heads need the base "
                    "model's pooler, and this checkpoint has no pooler.* weights")
    assert engine.load_adapter(bert.cases["seq_bn"].path).method == "bottleneck"  # the rest of the model serves


def test_use_pooler_has_no_effect_on_decoder_heads(tmp_path):
    # the library hands decoder heads the last token as their cls_output, whatever use_pooler says; we refused them
    llama = build_oracle("llama", tmp_path / "llama")
    case = llama.cases["lora_qkv_ffn"]
    folder = tmp_path / "pooled"
    shutil.copytree(case.path, folder)
    meta = json.loads((folder / "head_config.json").read_text())
    meta["config"]["use_pooler"] = True
    (folder / "head_config.json").write_text(json.dumps(meta))
    engine = Engine.from_pretrained(llama.path, device="cpu")
    engine.load_adapter(folder, name="pooled")
    rows = len(llama.input_ids)
    out = engine.forward(llama.input_ids, llama.attention_mask, ["pooled"] * rows)
    torch.testing.assert_close(torch.stack(out.logits), case.logits, atol=1e-5, rtol=0)  # the library's logits


def test_peft_weights_of_the_pooler_are_dropped_with_a_warning(engine, bert, tmp_path, caplog):
    # "all-linear" and ["dense"] target BERT's pooler, which no PEFT row reads: such folders were refused whole
    case = bert.cases["peft_lora_all_linear"]
    with caplog.at_level("WARNING", logger="engine"):
        engine.load_adapter(case.path)
    assert any("ignoring the saved weights of pooler.dense" in r.getMessage() for r in caplog.records)
    only = tmp_path / "pooler_only"
    shutil.copytree(case.path, only)
    state = load_file(only / "adapter_model.safetensors")
    save_file({k: v for k, v in state.items() if ".pooler." in k}, only / "adapter_model.safetensors")
    _assert_refused(engine, only, UnsupportedAdapter, "it adapts only pooler.dense, which feeds no "
                    "output served here")


def _raised(fn, *args):
    try:
        fn(*args)
    except Exception as exc:  # noqa: BLE001 - the test inspects it
        return exc
    return None


def test_truncated_weights_file(engine, bert, tmp_path):
    folder = _copy(bert, "par_bn", tmp_path)
    data = (folder / "pytorch_adapter.bin").read_bytes()
    (folder / "pytorch_adapter.bin").write_bytes(data[: len(data) // 2])
    _assert_refused(engine, folder, InvalidAdapter, "cannot read pytorch_adapter.bin")


def test_truncated_safetensors(engine, bert, tmp_path):
    folder = _copy(bert, "seq_bn_st", tmp_path)
    data = (folder / "adapter.safetensors").read_bytes()
    (folder / "adapter.safetensors").write_bytes(data[:100])
    _assert_refused(engine, folder, InvalidAdapter, "cannot read adapter.safetensors")


class Exploit:
    def __reduce__(self):
        return (print, ("pickled code ran",))


def test_pickle_beyond_weights_only_is_refused(engine, bert, tmp_path):
    folder = _copy(bert, "seq_bn", tmp_path)
    torch.save({"x": Exploit()}, folder / "pytorch_adapter.bin")
    _assert_refused(engine, folder, InvalidAdapter, "cannot read pytorch_adapter.bin", "UnpicklingError")


def test_bad_json_and_missing_files(engine, bert, tmp_path):
    folder = _copy(bert, "seq_bn", tmp_path)
    (folder / "adapter_config.json").write_text("{not json")
    _assert_refused(engine, folder, InvalidAdapter, "cannot read adapter_config.json")
    (folder / "adapter_config.json").unlink()
    _assert_refused(engine, folder, InvalidAdapter, "missing adapter_config.json")
    folder = _copy(bert, "lora_leave1", tmp_path)
    (folder / "pytorch_adapter.bin").unlink()
    _assert_refused(engine, folder, InvalidAdapter, "no weights file")
    _assert_refused(engine, tmp_path / "nowhere", InvalidAdapter, "no such folder")
    (tmp_path / "a-file").write_text("{}")
    _assert_refused(engine, tmp_path / "a-file", InvalidAdapter, "a file, not a folder")


def test_corrupt_head(engine, bert, tmp_path):
    folder = _copy(bert, "seq_bn", tmp_path)
    head = json.loads((folder / "head_config.json").read_text())
    head["config"]["num_labels"] = 7
    (folder / "head_config.json").write_text(json.dumps(head))
    _assert_refused(engine, folder, InvalidAdapter, "label2id must map onto 0..6")  # checked before the weights
    head["config"]["label2id"] = {f"L{i}": i for i in range(7)}
    (folder / "head_config.json").write_text(json.dumps(head))
    _assert_refused(engine, folder, InvalidAdapter, "heads.seq_bn.4.weight", "expected (7, 64)")
    head["config"]["head_type"] = "question_answering"
    (folder / "head_config.json").write_text(json.dumps(head))
    _assert_refused(engine, folder, UnsupportedAdapter, "head type 'question_answering'")


@pytest.mark.parametrize("changes,fragment", [
    ({"config.architecture": "prefix_tuning"}, "method 'prefix_tuning' is not supported"),
    ({"config.architecture": "union"}, "method 'union'"),
    ({"config.phm_layer": True}, "Compacter"),
    ({"config.use_gating": True}, "gated bottleneck"),
    ({"config.new_field": 1}, "fields ['new_field'] are not supported"),
    ({"config.non_linearity": "prelu"}, "activation 'prelu'"),  # a learned slope: no parameter-free function
])
def test_unsupported_bottleneck_options(engine, bert, tmp_path, changes, fragment):
    folder = _copy(bert, "seq_bn_rf", tmp_path)
    _edit_config(folder, **changes)
    _assert_refused(engine, folder, UnsupportedAdapter, fragment)


@pytest.mark.parametrize("case,changes,fragment", [
    ("lora_leave1", {"config.use_dora": True}, "DoRA"),
    ("lora_leave1", {"config.vera_d": 0.1}, "VeRA"),
    ("seq_bn_rf", {"config.scaling": 4}, "unknown scaling 4"),
    ("seq_bn_rf", {"config.residual_before_ln": "pre"}, "residual_before_ln"),
    ("seq_bn_rf", {"config.reduction_factor": {"3": 2}}, "reduction_factor for layer 0"),
])
def test_invalid_or_unsupported_options(engine, bert, tmp_path, case, changes, fragment):
    folder = _copy(bert, case, tmp_path)
    _edit_config(folder, **changes)
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
    folder = _copy(bert, case, tmp_path)
    _edit_config(folder, **changes)
    _assert_refused(engine, folder, error, fragment)


@pytest.mark.parametrize("changes,error,fragment", [
    ({"label2id": ["a", "b", "c"]}, InvalidAdapter, "label2id must map label names to integers"),
    ({"label2id": {"a": 0, "b": "1", "c": 2}}, InvalidAdapter, "label2id must map label names to integers"),
    ({"head_type": ["classification"]}, UnsupportedAdapter, "head type ['classification']"),
    ({"activation_function": 5}, UnsupportedAdapter, "head activation 5"),
    ({"num_labels": True}, InvalidAdapter, "num_labels must be positive integers, got 2, True"),
    # label names follow the name rule: they go out in every listing (a 9 MB one broke ListAdapters for everyone)
    ({"label2id": {"x" * 300: 0, "pos": 1}}, InvalidAdapter, "a label name in label2id holds at most 256 characters"),
    ({"label2id": {"": 0, "pos": 1}}, InvalidAdapter, "a label name in label2id must be a non-empty string, got ''"),
    ({"label2id": {"a\u202eb": 0, "pos": 1}}, InvalidAdapter, "must not hold control characters, invisible ones"),
    ({"label2id": {"neg": 0, "pos\n": 1}}, InvalidAdapter, "got 'pos\\n'"),
    # every reply describing the adapter carries its labels: 200,000 of them loaded, then broke the load's own reply.
    # Refused before the head weights are read (these would not fit: (2, 64) saved)
    ({"num_labels": 2500, "label2id": {f"{i:0>250}": i for i in range(2500)}}, InvalidAdapter,
     "label2id makes 2500 label names of 625000 bytes in all; a head may hold at most 524288 bytes"),
    ({"num_labels": 2 ** 20, "label2id": None}, InvalidAdapter, "num_labels makes 1048576 label names; a head may"),
])
def test_malformed_head_config(engine, bert, tmp_path, changes, error, fragment):
    folder = _copy(bert, "seq_bn", tmp_path)
    head = json.loads((folder / "head_config.json").read_text())
    head["config"].update(changes)
    (folder / "head_config.json").write_text(json.dumps(head))
    _assert_refused(engine, folder, error, fragment)


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
    folder = _copy(bert, case, tmp_path)
    cfg = json.loads((folder / "adapter_config.json").read_text())
    (folder / "adapter_config.json").write_text(json.dumps({**cfg, **changes}))
    _assert_refused(engine, folder, InvalidAdapter, fragment)


def test_extra_tensors_of_a_peft_lora_module_are_refused(engine, bert, tmp_path):
    folder = _copy(bert, "peft_lora_rslora", tmp_path)
    path = next(folder.glob("adapter_model.*"))
    state = load_file(path) if path.suffix == ".safetensors" else torch.load(path, weights_only=True)
    key = next(k for k in state if k.endswith("lora_A.weight")).replace("lora_A.weight", "ia3_l")
    state[key] = torch.ones(1, 64)
    save_file(state, folder / "adapter_model.safetensors")
    _assert_refused(engine, folder, InvalidAdapter, "unexpected key in a LoRA adapter", key)


def test_config_errors_no_check_names_are_still_typed(engine, bert, tmp_path, monkeypatch):
    def parser_trips(folder, target):  # what a config value of an unforeseen JSON type does to a reader
        raise TypeError("'<' not supported between instances of 'str' and 'int'")

    monkeypatch.setattr(formats, "read_adapterhub", parser_trips)
    _assert_refused(engine, _copy(bert, "seq_bn", tmp_path), InvalidAdapter, "malformed config value (TypeError: '<'")


def test_values_beyond_the_serving_dtype_are_refused(bert, tmp_path):
    engine = Engine.from_pretrained(bert.path, device="cpu", dtype="float16")
    folder = _copy(bert, "lora_leave1", tmp_path)
    key = "bert.encoder.layer.0.attention.self.query.loras.lora_leave1.lora_A"
    _edit_weights(folder, lambda s: s[key].__setitem__((0, 0), 1e5))  # finite in float32, inf in float16
    _assert_refused(engine, folder, InvalidAdapter, "values overflow the serving dtype torch.float16",
                    "encoder.layer.0.attention.self.query.lora_A")


def test_empty_adapter_names_are_refused(engine, bert):
    with pytest.raises(InvalidRequest, match="an adapter name must be a non-empty string, got ''"):
        engine.load_adapter(bert.cases["lora"].path, name="")
    engine.load_adapter(bert.cases["lora"].path, name="a")
    with pytest.raises(InvalidRequest, match="non-empty string, got ' '"):
        engine.average_adapters(" ", ["a"], [1.0])
    assert [a.name for a in engine.list_adapters()] == ["a"]


@pytest.mark.parametrize("name,fragment", [
    ("a\x00b", "must not hold control characters, invisible ones or surrounding spaces, got 'a\\x00b'"),
    ("a\nb", "must not hold control characters"),
    (" lead", "must not hold control characters, invisible ones or surrounding spaces"),
    ("imdb\u200b", "invisible ones or surrounding spaces, got 'imdb\\u200b'"),  # zero-width space: looks like imdb
    ("\u202eimdb", "got '\\u202eimdb'"),  # right-to-left override
    ("a\u2028b", "got 'a\\u2028b'"),  # line separator
    ("imdb\u3164", "invisible ones"),  # Hangul filler: a letter to Unicode's categories, blank on screen
    ("imdb\ufe0f", "invisible ones"),  # variation selector
    ("a\u034fb", "invisible ones"),  # combining grapheme joiner
    ("x" * 257, "holds at most 256 characters, got 257"),
])
def test_unprintable_or_overlong_adapter_names_are_refused(engine, bert, name, fragment):
    with pytest.raises(InvalidRequest) as info:
        engine.load_adapter(bert.cases["lora"].path, name=name)
    assert fragment in str(info.value)
    engine.load_adapter(bert.cases["lora"].path, name="sentiment v2/ünï")  # spaces inside, slashes, unicode: fine
    assert [a.name for a in engine.list_adapters()] == ["sentiment v2/ünï"]


def test_tenants_follow_the_name_rule(engine, bert):
    # "" is what proto3 sends for "no tenant": a record under it would list as shared and be unreachable
    for tenant in ("", " acme", "a\x00"):
        with pytest.raises(InvalidRequest, match="a tenant must"):
            engine.load_adapter(bert.cases["lora"].path, name="a", tenant=tenant)
    engine.load_adapter(bert.cases["lora"].path, name="a", tenant="acme")
    with pytest.raises(InvalidRequest, match="a tenant must be a non-empty string, got ''"):
        engine.average_adapters("b", ["a"], [1.0], tenant="")
    assert [(a.name, a.tenant) for a in engine.list_adapters()] == [("a", "acme")]
    # every other call refuses them too, rather than acting for "no tenant" (which would see shared adapters only)
    ids, mask = torch.tensor([[1, 5, 2]]), torch.ones(1, 3, dtype=torch.long)
    calls = {"forward": lambda t: engine.forward(ids, mask, [None], tenant=t),
             "forward per row": lambda t: engine.forward(ids, mask, [None], tenant=[t]),
             "list": lambda t: engine.list_adapters(t),
             "get": lambda t: engine.get_adapter("a", t), "unload": lambda t: engine.unload_adapter("a", t),
             "ready": lambda t: engine.adapters_ready(["a"], t)}
    for what, call in calls.items():
        for tenant in ("", "acme\u200b"):
            with pytest.raises(InvalidRequest, match="a tenant must"):
                call(tenant)
    assert engine.forward(ids, mask, ["a"], tenant="acme").embeddings.shape[0] == 1
    assert [(a.name, a.tenant) for a in engine.list_adapters()] == [("a", "acme")]


def test_post_add_residual_on_a_decoder_is_refused(tmp_path):
    llama = build_oracle("llama", tmp_path / "llama", peft=False)
    engine = Engine.from_pretrained(llama.path, device="cpu")
    folder = tmp_path / "postadd"
    shutil.copytree(llama.cases["seq_bn"].path, folder)
    _edit_config(folder, **{"config.residual_before_ln": "post_add"})
    _assert_refused(engine, folder, InvalidAdapter, "post_add")


def test_peft_refusals(engine, bert, tmp_path):
    folder = _copy(bert, "peft_lora_rslora", tmp_path)
    cfg = json.loads((folder / "adapter_config.json").read_text())
    (folder / "adapter_config.json").write_text(json.dumps({**cfg, "use_dora": True}))
    _assert_refused(engine, folder, UnsupportedAdapter, "DoRA")
    (folder / "adapter_config.json").write_text(json.dumps({**cfg, "peft_type": "PREFIX_TUNING"}))
    _assert_refused(engine, folder, UnsupportedAdapter, "peft_type 'PREFIX_TUNING'")
    (folder / "adapter_config.json").write_text(json.dumps({**cfg, "target_modules": ["classifier"]}))
    save_file({"base_model.model.classifier.lora_A.weight": torch.zeros(4, 64)}, folder / "adapter_model.safetensors")
    _assert_refused(engine, folder, UnsupportedAdapter, "'classifier' is not an adapter site")


def test_unknown_adapter_and_tenants(engine, bert):
    engine.load_adapter(bert.cases["seq_bn"].path, name="mine", tenant="acme")
    engine.load_adapter(bert.cases["lora"].path, name="shared")
    ids, mask = bert.input_ids[:1], bert.attention_mask[:1]
    with pytest.raises(AdapterNotFound, match="'nope' is not loaded"):
        engine.forward(ids, mask, ["nope"])
    with pytest.raises(AdapterNotFound, match=r"'mine' is not loaded for tenant 'globex'$"):  # no hint to a tenant
        engine.forward(ids, mask, ["mine"], tenant="globex")
    with pytest.raises(AdapterNotFound, match="'mine' is not loaded as a shared adapter; tenant 'acme' has one"):
        engine.forward(ids, mask, ["mine"])
    engine.forward(ids, mask, ["mine"], tenant="acme")
    engine.forward(ids, mask, ["shared"], tenant="globex")
    with pytest.raises(AdapterNotFound, match="not loaded for tenant 'globex' .the shared adapter of that name is"):
        engine.unload_adapter("shared", tenant="globex")
    assert [a.name for a in engine.list_adapters("globex")] == ["shared"]
    assert {a.name for a in engine.list_adapters("acme")} == {"mine", "shared"}
    with pytest.raises(AdapterNotFound):
        engine.unload_adapter("mine", tenant="globex")
    assert all(r.refs == 0 for r in engine.registry._records.values())  # failed forwards released what they took


def test_capacity_exceeded(bert):  # idle adapters are evicted to the CPU tier; pinned ones never are
    engine = Engine(EngineConfig(model=str(bert.path), device="cpu", max_device_adapters=2))
    engine.load_adapter(bert.cases["seq_bn"].path, name="a", pin=True)
    engine.load_adapter(bert.cases["lora"].path, name="b", pin=True)
    with pytest.raises(AdapterCapacityExceeded, match="all 2 adapter slots"):
        engine.load_adapter(bert.cases["ia3"].path, name="c", pin=True)
    engine.unload_adapter("a")
    engine.load_adapter(bert.cases["ia3"].path, name="c", pin=True)


def test_bad_requests(engine, bert):
    engine.load_adapter(bert.cases["lora"].path)
    ids, mask = bert.input_ids, bert.attention_mask
    with pytest.raises(InvalidRequest, match="adapters names 1 rows, the batch has 4"):
        engine.forward(ids, mask, ["lora"])
    with pytest.raises(InvalidRequest, match="input_ids must lie in 0..99"):
        engine.forward(ids + 1000, mask, [None] * 4)
    with pytest.raises(InvalidRequest, match="sequence length 65"):
        engine.forward(torch.ones(1, 65, dtype=torch.long), torch.ones(1, 65, dtype=torch.long), [None])
    with pytest.raises(InvalidRequest, match="at least one token"):
        engine.forward(ids[:1], torch.zeros_like(ids[:1]), [None])
    with pytest.raises(InvalidRequest, match="must both be"):
        engine.forward(ids, mask[:, :3], [None] * 4)
    with pytest.raises(InvalidRequest, match="input_ids must be a torch tensor, got list"):
        engine.forward(ids.tolist(), mask, [None] * 4)
    with pytest.raises(InvalidRequest, match="input_ids must hold integers, got torch.float32"):
        engine.forward(ids.float(), mask, [None] * 4)
    with pytest.raises(InvalidRequest, match="attention_mask must hold only 0 and 1"):
        engine.forward(ids, mask * 3, [None] * 4)  # mean pooling would weigh tokens by it
    with pytest.raises(InvalidRequest, match=r"token_type_ids must lie in 0\.\.1"):
        engine.forward(ids, mask, [None] * 4, token_type_ids=torch.full_like(ids, 2))

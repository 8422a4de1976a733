"""Adapter files: every validation error names the problem, and a failed load leaves the engine exactly as before."""
import json
import os
import shutil
import threading

import pytest
import torch
from safetensors.torch import load_file, save_file

from adapter_edits import assert_refused, copy_case, edit_config, edit_weights
from engine import Engine, InvalidAdapter, UnsupportedAdapter
from oracle import build_oracle


def test_wrong_base_model_type(engine, bert, tmp_path):
    folder = copy_case(bert, "seq_bn", tmp_path / "seq_bn")
    edit_config(folder, model_type="llama")
    assert_refused(engine, folder, InvalidAdapter, "model_type 'llama'", "base model is 'bert'")


def test_wrong_hidden_size(engine, bert, tmp_path):
    folder = copy_case(bert, "lora_leave1", tmp_path / "lora_leave1")
    edit_config(folder, hidden_size=768)
    assert_refused(engine, folder, InvalidAdapter, "hidden_size 768", "has 64")


def test_unknown_key(engine, bert, tmp_path):
    folder = copy_case(bert, "seq_bn_rf", tmp_path / "seq_bn_rf")
    key = "bert.encoder.layer.0.output.adapters.seq_bn_rf.extra.weight"
    edit_weights(folder, lambda s: s.__setitem__(key, torch.zeros(3)))
    assert_refused(engine, folder, InvalidAdapter, "unexpected key", "layer.0.output.adapters.seq_bn_rf.extra.weight")


def test_missing_key(engine, bert, tmp_path):
    folder = copy_case(bert, "seq_bn_rf", tmp_path / "seq_bn_rf")
    edit_weights(folder, lambda s: s.pop("bert.encoder.layer.1.output.adapters.seq_bn_rf.adapter_up.bias"))
    assert_refused(engine, folder, InvalidAdapter, "missing key", "layer.1.output.adapters.seq_bn_rf.adapter_up.bias")


def test_wrong_shape(engine, bert, tmp_path):
    folder = copy_case(bert, "ia3", tmp_path / "ia3")
    key = "bert.encoder.layer.0.attention.self.key.loras.ia3.lora_B"
    edit_weights(folder, lambda s: s.__setitem__(key, torch.ones(32, 1)))
    assert_refused(engine, folder, InvalidAdapter, "shape (32, 1)", "expected (64, 1)", "attention.self.key.loras.ia3")


def test_non_finite_values(engine, bert, tmp_path):
    folder = copy_case(bert, "lora_leave1", tmp_path / "lora_leave1")
    key = "bert.encoder.layer.0.attention.self.query.loras.lora_leave1.lora_A"
    edit_weights(folder, lambda s: s[key].__setitem__((0, 0), float("nan")))
    assert_refused(engine, folder, InvalidAdapter, "NaN", "query.loras.lora_leave1.lora_A")


@pytest.mark.parametrize("kind, make", [
    ("a torch.sparse_coo", lambda t: t.to_sparse()),
    ("a meta", lambda t: torch.empty(t.shape, device="meta")),
    ("a quantized", lambda t: torch.quantize_per_tensor(t, 0.1, 0, torch.qint8)),
])
def test_tensors_that_are_not_dense_weights(engine, bert, tmp_path, kind, make):
    # weights_only unpickles them all; they used to reach the checks and fail there as INTERNAL errors
    folder = copy_case(bert, "lora_leave1", tmp_path / "lora_leave1")
    key = "bert.encoder.layer.0.attention.self.query.loras.lora_leave1.lora_A"
    edit_weights(folder, lambda s: s.__setitem__(key, make(s[key])))
    assert_refused(engine, folder, InvalidAdapter, f"{kind} tensor, not dense weights", key.removeprefix("bert."))


def test_config_values_beyond_float32_and_deep_nesting(engine, bert, tmp_path):
    folder = copy_case(bert, "seq_bn", tmp_path / "seq_bn")
    edit_config(folder, **{"config.scaling": -1e300})  # was an INTERNAL error while filling the scaling table
    assert_refused(engine, folder, InvalidAdapter, "scaling -1e+300 overflows float32 (at most 3.403e+38")
    for name in ("adapter_config.json", "head_config.json"):
        folder = copy_case(bert, "seq_bn", tmp_path / name)
        (folder / name).write_text("[" * 100_000 + "]" * 100_000)
        assert_refused(engine, folder, InvalidAdapter, f"cannot read {name}: nested too deeply")
        (folder / name).write_text('{"n": ' + "9" * 5000 + "}")  # Python's int parsing stops at 4300 digits
        assert_refused(engine, folder, InvalidAdapter, f"cannot read {name}: Exceeds the limit")


def test_ln_before_duplicates_must_agree(engine, bert, tmp_path):
    # the library holds one LayerNorm under two keys and ends up with adapter_down.0's copy; we read the other
    folder = copy_case(bert, "seq_bn_ln_before", tmp_path / "seq_bn_ln_before")
    key = "bert.encoder.layer.1.output.adapters.seq_bn_ln_before.adapter_down.0.bias"
    edit_weights(folder, lambda s: s.__setitem__(key, s[key] + 0.5))  # a tensor of its own: the two share storage
    assert_refused(engine, folder, InvalidAdapter, "differs from adapter_norm_before.bias", key.removeprefix("bert."))
    assert engine.load_adapter(bert.cases["seq_bn_ln_before"].path).method == "bottleneck"  # equal copies load
    # one copy alone loads as in the library, and computes the same; the library takes each parameter from
    # whichever copy holds it, so a weight from one copy and the bias from the other load too
    ids, mask = torch.tensor([[1, 5, 7, 2]]), torch.ones(1, 4, dtype=torch.long)
    full = engine.forward(ids, mask, ["seq_bn_ln_before"]).last_hidden_state
    dropped = {"dup_only": (".adapter_norm_before.",), "norm_only": (".adapter_down.0.",),
               "mixed": (".adapter_norm_before.bias", ".adapter_down.0.weight")}
    for name, parts in dropped.items():
        only = copy_case(bert, "seq_bn_ln_before", tmp_path / name)
        edit_weights(only, lambda s: [s.pop(k) for k in list(s) if any(p in k for p in parts)])
        engine.load_adapter(only, name=name)
        assert torch.equal(engine.forward(ids, mask, [name]).last_hidden_state, full), name
    neither = copy_case(bert, "seq_bn_ln_before", tmp_path / "neither")
    edit_weights(neither, lambda s: [s.pop(k) for k in list(s) if k.endswith(("adapter_norm_before.bias",
                                                                                "adapter_down.0.bias"))])
    assert_refused(engine, neither, InvalidAdapter, "missing key", "adapter_norm_before.bias")


def test_bin_and_safetensors_side_by_side_must_agree(engine, bert, tmp_path):
    folder = copy_case(bert, "lora_leave1", tmp_path / "lora_leave1")
    state = torch.load(folder / "pytorch_adapter.bin", weights_only=True)
    save_file(state, folder / "adapter.safetensors")
    assert engine.load_adapter(folder).method == "lora"  # the same tensors in both: either is right
    key = next(iter(state))
    save_file({**state, key: state[key] + 1}, folder / "adapter.safetensors")
    # the library reads the .bin by default, use_safetensors=True the other: either choice is wrong for someone
    assert_refused(engine, folder, InvalidAdapter, "adapter.safetensors and pytorch_adapter.bin hold different")
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
    assert_refused(engine, folder, InvalidAdapter, "contains NaN or infinite values")


@pytest.mark.parametrize("case,name", [("seq_bn", "head_config.json"), ("seq_bn", "pytorch_adapter.bin"),
                                       ("peft_lora_rslora", "adapter_model.safetensors"),
                                       ("seq_bn", "adapter_config.json")])
@pytest.mark.parametrize("link", ["loop", "dangling"])
def test_a_link_to_no_file_is_refused_not_read_as_absent(engine, bert, tmp_path, case, name, link):
    # read as absent, such a head_config.json dropped the head without a word, and a .bin beside adapter.safetensors
    # left the other file to be served alone
    folder = copy_case(bert, case, tmp_path / case)
    if name == "pytorch_adapter.bin":  # the safetensors twin is the one that would have been served
        save_file(torch.load(folder / name, weights_only=True), folder / "adapter.safetensors")
    (folder / name).unlink()
    if link == "loop":
        (folder / "other").symlink_to(folder / name)
        (folder / name).symlink_to(folder / "other")
    else:
        (folder / name).symlink_to(tmp_path / "gone")
    assert_refused(engine, folder, InvalidAdapter, f"{name} is a symbolic link that leads to no file")


def test_an_adapter_folder_that_is_a_link_to_nothing_is_named_so(engine, tmp_path):
    (tmp_path / "loop").symlink_to(tmp_path / "loop")
    assert_refused(engine, tmp_path / "loop", InvalidAdapter, "a symbolic link that leads nowhere")
    (tmp_path / "dangling").symlink_to(tmp_path / "gone")
    assert_refused(engine, tmp_path / "dangling", InvalidAdapter, "a symbolic link that leads nowhere")


def test_bin_keys_must_be_strings(engine, bert, tmp_path):
    folder = copy_case(bert, "lora_leave1", tmp_path / "lora_leave1")
    edit_weights(folder, lambda s: s.__setitem__(7, torch.zeros(3)))
    assert_refused(engine, folder, InvalidAdapter, "pytorch_adapter.bin is not a state dict: key 7 is no string")


@pytest.mark.parametrize("name", ["adapter_config.json", "pytorch_adapter.bin", "head_config.json"])
def test_a_fifo_in_an_adapter_folder_is_refused_at_once(engine, bert, tmp_path, name):
    # opening one waits for a writer forever: each such load held a worker thread, and a few stopped every admin call
    folder = copy_case(bert, "seq_bn", tmp_path / "seq_bn")
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
    folder = copy_case(bert, "seq_bn", tmp_path / "seq_bn")
    (folder / name).unlink()
    (folder / name).mkdir()
    assert_refused(engine, folder, InvalidAdapter, f"{name} is not a regular file")


def test_a_pooler_head_needs_the_pooler_weights(bert, tmp_path):
    # sentence-embedding checkpoints often drop the pooler; such a head loaded, then failed the whole batch it
    # was in with AttributeError ('NoneType' object has no attribute 'index_select')
    base = tmp_path / "base"
    shutil.copytree(bert.path, base)
    state = load_file(base / "model.safetensors")
    save_file({k: v for k, v in state.items() if not k.startswith("pooler.")}, base / "model.safetensors")
    engine = Engine.from_pretrained(base, device="cpu")
    assert_refused(engine, bert.cases["seq_bn_pooler"].path, InvalidAdapter, "use_pooler heads need the base "
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
    assert_refused(engine, only, UnsupportedAdapter, "it adapts only pooler.dense, which feeds no "
                    "output served here")


def _raised(fn, *args):
    try:
        fn(*args)
    except Exception as exc:  # noqa: BLE001 - the test inspects it
        return exc
    return None


def test_truncated_weights_file(engine, bert, tmp_path):
    folder = copy_case(bert, "par_bn", tmp_path / "par_bn")
    data = (folder / "pytorch_adapter.bin").read_bytes()
    (folder / "pytorch_adapter.bin").write_bytes(data[: len(data) // 2])
    assert_refused(engine, folder, InvalidAdapter, "cannot read pytorch_adapter.bin")


def test_truncated_safetensors(engine, bert, tmp_path):
    folder = copy_case(bert, "seq_bn_st", tmp_path / "seq_bn_st")
    data = (folder / "adapter.safetensors").read_bytes()
    (folder / "adapter.safetensors").write_bytes(data[:100])
    assert_refused(engine, folder, InvalidAdapter, "cannot read adapter.safetensors")


class Exploit:
    def __reduce__(self):
        return (print, ("pickled code ran",))


def test_pickle_beyond_weights_only_is_refused(engine, bert, tmp_path):
    folder = copy_case(bert, "seq_bn", tmp_path / "seq_bn")
    torch.save({"x": Exploit()}, folder / "pytorch_adapter.bin")
    assert_refused(engine, folder, InvalidAdapter, "cannot read pytorch_adapter.bin", "UnpicklingError")


def test_bad_json_and_missing_files(engine, bert, tmp_path):
    folder = copy_case(bert, "seq_bn", tmp_path / "seq_bn")
    (folder / "adapter_config.json").write_text("{not json")
    assert_refused(engine, folder, InvalidAdapter, "cannot read adapter_config.json")
    (folder / "adapter_config.json").unlink()
    assert_refused(engine, folder, InvalidAdapter, "missing adapter_config.json")
    folder = copy_case(bert, "lora_leave1", tmp_path / "lora_leave1")
    (folder / "pytorch_adapter.bin").unlink()
    assert_refused(engine, folder, InvalidAdapter, "no weights file")
    assert_refused(engine, tmp_path / "nowhere", InvalidAdapter, "no such folder")
    (tmp_path / "a-file").write_text("{}")
    assert_refused(engine, tmp_path / "a-file", InvalidAdapter, "a file, not a folder")


def test_corrupt_head(engine, bert, tmp_path):
    folder = copy_case(bert, "seq_bn", tmp_path / "seq_bn")
    head = json.loads((folder / "head_config.json").read_text())
    head["config"]["num_labels"] = 7
    (folder / "head_config.json").write_text(json.dumps(head))
    assert_refused(engine, folder, InvalidAdapter, "label2id must map onto 0..6")  # checked before the weights
    head["config"]["label2id"] = {f"L{i}": i for i in range(7)}
    (folder / "head_config.json").write_text(json.dumps(head))
    assert_refused(engine, folder, InvalidAdapter, "heads.seq_bn.4.weight", "expected (7, 64)")
    head["config"]["head_type"] = "question_answering"
    (folder / "head_config.json").write_text(json.dumps(head))
    assert_refused(engine, folder, UnsupportedAdapter, "head type 'question_answering'")

"""`Engine.average_adapters` equals the `adapters` library's `average_adapter` on a tiny BERT: linear averages
of bottleneck, LoRA and IA3 adapters and LoRA's two other combine strategies, with a negative weight."""
import pytest
import torch
from oracle import _randomise, _seed

from engine import InvalidRequest

ATOL = 1e-5
WEIGHTS = [0.5, -0.2, 0.9]  # normalised by the sum (1.2), as the library does by default


def _configs():
    from adapters import IA3Config, LoRAConfig, SeqBnConfig

    return {
        "lora": LoRAConfig(r=4, alpha=8, attn_matrices=["q", "v"], intermediate_lora=True),
        "bn": SeqBnConfig(scaling="learned", ln_after=True, reduction_factor=8),
        "ia3": IA3Config(),
    }


@pytest.fixture(scope="module")
def library(bert, tmp_path_factory):
    """The library's model with three randomised adapters per method, each saved to a folder."""
    from adapters import AutoAdapterModel

    root = tmp_path_factory.mktemp("averaged")
    model = AutoAdapterModel.from_pretrained(bert.path, attn_implementation="eager").eval()
    captured = []
    model.base_model.register_forward_hook(lambda _m, _i, o: captured.append(o.last_hidden_state))
    folders = {}
    for method, config in _configs().items():
        for i in range(3):
            name = f"{method}{i}"
            model.add_adapter(name, config=config)
            scale = config.architecture == "lora" and config.composition_mode == "scale"
            _randomise(model, lambda n, name=name: name in n.split("."), _seed("bert", name),
                       lambda pn, s=scale: s and pn == "lora_B")
            model.save_adapter(str(root / name), name)
            folders[name] = root / name

    def averaged(method: str, strategy: str, svd_rank: int | None = None, weights=WEIGHTS,
                 normalize: bool = True) -> torch.Tensor:
        """Hidden states of the oracle batch through the library's average of method0..2."""
        model.average_adapter("avg", [f"{method}{i}" for i in range(3)], weights=weights, combine_strategy=strategy,
                              svd_rank=svd_rank, overwrite_ok=True, normalize_weights=normalize)
        model.set_active_adapters("avg")
        captured.clear()
        with torch.no_grad():
            model(bert.input_ids, attention_mask=bert.attention_mask, token_type_ids=bert.token_type_ids)
        return captured[0].clone()

    return folders, averaged


@pytest.fixture(scope="module")
def engine(bert, library):
    from engine import Engine, EngineConfig

    engine = Engine(EngineConfig(model=str(bert.path), device="cpu", max_device_adapters=4, max_cpu_adapters=0))
    for name, folder in library[0].items():
        engine.load_adapter(folder)
    return engine


@pytest.mark.parametrize("method,strategy,svd_rank", [
    ("bn", "linear", None),
    ("ia3", "linear", None),
    ("ia3", "lora_linear_only_negate_b", None),
    ("lora", "linear", None),
    ("lora", "lora_linear_only_negate_b", None),
    ("lora", "lora_delta_w_svd", 3),
])
def test_average_equals_the_library(bert, library, engine, method, strategy, svd_rank):
    want = library[1](method, strategy, svd_rank)
    name = f"avg-{method}-{strategy}"
    info = engine.average_adapters(name, [f"{method}{i}" for i in range(3)], WEIGHTS, combine_strategy=strategy,
                                   svd_rank=svd_rank)
    assert info.source.startswith(f"average[{strategy}]")
    out = engine.forward(bert.input_ids, bert.attention_mask, [name] * 4, bert.token_type_ids)
    mask = bert.attention_mask.bool()
    assert (out.last_hidden_state - want)[mask].abs().max().item() < ATOL


@pytest.mark.parametrize("method,strategy,svd_rank", [
    ("bn", "linear", None),
    ("ia3", "linear", None),
    ("lora", "lora_linear_only_negate_b", None),
    ("lora", "lora_delta_w_svd", 3),
])
def test_weights_as_given_equal_the_librarys_unnormalised_average(bert, library, engine, method, strategy, svd_rank):
    weights = [1.0, -1.0, 0.0]  # a difference of two adapters: they sum to 0, which normalising refuses
    want = library[1](method, strategy, svd_rank, weights, normalize=False)
    name = f"diff-{method}-{strategy}"
    info = engine.average_adapters(name, [f"{method}{i}" for i in range(3)], weights, combine_strategy=strategy,
                                   svd_rank=svd_rank, normalize_weights=False)
    assert info.source == f"average[{strategy}, weights as given]({method}0*1, {method}1*-1, {method}2*0)"
    out = engine.forward(bert.input_ids, bert.attention_mask, [name] * 4, bert.token_type_ids)
    mask = bert.attention_mask.bool()
    assert (out.last_hidden_state - want)[mask].abs().max().item() < ATOL


def test_an_average_has_no_source_and_stays_on_the_host(bert, engine):
    engine.average_adapters("kept", ["lora0", "lora1"], [1.0, 1.0])
    for i in range(3):  # the four slots fill up with other adapters; the CPU budget is 0
        engine.forward(bert.input_ids, bert.attention_mask, [f"bn{i}", f"ia3{i}", f"lora{i}", None],
                       bert.token_type_ids)
    engine.forward(bert.input_ids, bert.attention_mask, ["bn0", "bn1", "bn2", "ia30"], bert.token_type_ids)
    assert engine.get_adapter("kept").tier == "cpu"  # evicted from the device, but never dropped
    engine.forward(bert.input_ids, bert.attention_mask, ["kept"] * 4, bert.token_type_ids)


def test_an_average_replaces_a_loaded_name_only_when_told(bert, engine):
    # the library's average_adapter refuses too (overwrite_ok=False); a silent swap lost lora0's own weights
    before = engine.list_adapters()
    with pytest.raises(InvalidRequest, match="adapter 'lora0' is already loaded .shared.; replacing it with the "
                                             "average needs overwrite_ok"):
        engine.average_adapters("lora0", ["lora0", "lora1"], [1.0, 1.0])
    assert engine.list_adapters() == before
    info = engine.average_adapters("lora0", ["lora0", "lora1"], [1.0, 1.0], overwrite_ok=True)
    assert info.name == "lora0" and info.source.startswith("average[linear]")
    # a tenant's own adapter may take a shared one's name (it shadows it for that tenant, as a load does)
    assert engine.average_adapters("lora1", ["lora0"], [1.0], tenant="acme").tenant == "acme"


@pytest.mark.parametrize("sources,weights,options,fragment", [
    (["lora0", "bn0"], [1, 1], {}, "different configurations"),
    (["lora0", "lora1"], [1], {}, "1 weights for 2 source adapters"),
    (["lora0", "lora1"], [1, -1], {}, "sum to 0"),
    (["lora0", "lora1"], [float("nan"), 1], {}, "weights must be finite numbers"),
    (["lora0", "lora1"], ["1", "1"], {}, "weights must be finite numbers"),
    (["lora0", "lora1"], [1e308, 1e308], {}, "sum to inf"),
    (["lora0", "lora1"], [1, 1], {"combine_strategy": "lora_delta_w_svd", "svd_rank": 1000}, "svd_rank 1000 exceeds"),
    (["bn0", "bn1"], [1, 1], {"combine_strategy": "lora_linear_only_negate_b"}, "average linearly"),
    (["lora0", "lora1"], [1, 1], {"combine_strategy": "lora_delta_w_svd"}, "positive svd_rank"),
    (["lora0", "lora1"], [1, 1], {"svd_rank": 2}, "svd_rank applies only"),
    (["lora0", "lora1"], [1, 1], {"combine_strategy": "ties"}, "is not one of"),
    ([], [], {}, "at least one"),
    (["lora0", ""], [1, 1], {}, "a source adapter name must be a non-empty string"),  # was an AttributeError
    (["lora0", None], [1, 1], {}, "a source adapter name must be a non-empty string"),
    (["lora0", "lora0"], [0.5, 0.5], {}, "sources name 'lora0' more than once"),  # the library keeps one weight
    (["lora0", "lora1", "lora0"], [1, 1, 1], {}, "sources name 'lora0' more than once"),
    (["lora0", "lora1", "lora2"], [1e20, -1e20, 1e-20], {}, r"the average overflows: .*values overflow the serving"),
])
def test_refused_averages_change_nothing(engine, sources, weights, options, fragment):
    def loaded():  # not where each one lives: reading the sources may bring one to the host for a while
        return [(a.name, a.tenant, a.source, a.num_params) for a in engine.list_adapters()]
    before = loaded()
    with pytest.raises(InvalidRequest, match=fragment):
        engine.average_adapters("refused", sources, weights, **options)
    assert loaded() == before


def _copy_without(folder, tmp_path, name, *fields):
    """A copy of an adapter folder whose adapter_config.json leaves out ``fields`` (as older library versions
    saved configs without the fields added since)."""
    import json
    import shutil

    copy = tmp_path / name
    shutil.copytree(folder, copy)
    saved = json.loads((copy / "adapter_config.json").read_text())
    for field in fields:
        del saved["config"][field]
    (copy / "adapter_config.json").write_text(json.dumps(saved))
    return copy


def test_a_config_that_leaves_out_a_default_averages_as_the_full_one(bert, library, engine, tmp_path):
    """The library compares loaded configs, defaults filled in: the raw files' difference refused these (review)."""
    folders = library[0]
    engine.load_adapter(_copy_without(folders["lora1"], tmp_path, "lora1-min", "composition_mode", "alpha"),
                        "lora1-min")
    engine.load_adapter(_copy_without(folders["bn1"], tmp_path, "bn1-min", "phm_dim", "init_weights_seed"), "bn1-min")
    for method in ("lora", "bn"):
        full = engine.average_adapters(f"{method}-full", [f"{method}0", f"{method}1"], [0.3, 0.7])
        short = engine.average_adapters(f"{method}-short", [f"{method}0", f"{method}1-min"], [0.3, 0.7])
        outs = [engine.forward(bert.input_ids, bert.attention_mask, [info.name] * 4, bert.token_type_ids)
                for info in (full, short)]
        assert torch.equal(outs[0].last_hidden_state, outs[1].last_hidden_state)
    # left out is the default, not a wildcard: a file without alpha (8) against alpha 16 differs, as for the library
    engine.load_adapter(_copy_without(folders["lora2"], tmp_path, "lora2-min", "alpha"), "lora2-min")
    engine.load_adapter(_copy_with(folders["lora0"], tmp_path, "lora-alpha16", alpha=16), "lora-alpha16")
    with pytest.raises(InvalidRequest, match="different configurations"):
        engine.average_adapters("never", ["lora2-min", "lora-alpha16"], [1, 1])


def _copy_with(folder, tmp_path, name, **fields):
    import json

    copy = _copy_without(folder, tmp_path, name)
    saved = json.loads((copy / "adapter_config.json").read_text())
    saved["config"].update(fields)
    (copy / "adapter_config.json").write_text(json.dumps(saved))
    return copy


def test_the_defaults_filled_in_are_the_librarys():
    import dataclasses

    from adapters import BnConfig, LoRAConfig

    from engine.adapters.aggregation import LIBRARY_DEFAULTS, Method

    for method, config in ((Method.BOTTLENECK, BnConfig), (Method.LORA, LoRAConfig)):
        want = {f.name: f.default if f.default is not dataclasses.MISSING else f.default_factory()
                for f in dataclasses.fields(config)
                if f.default is not dataclasses.MISSING or f.default_factory is not dataclasses.MISSING}
        assert LIBRARY_DEFAULTS[method] == {k: v for k, v in want.items() if k not in ("dropout", "init_weights")}


def test_numpy_weights_are_numbers(bert, engine):
    import numpy as np

    as_float = engine.average_adapters("np-float", ["lora0", "lora1"], [0.25, 0.75])
    as_numpy = engine.average_adapters("np-f32", ["lora0", "lora1"], list(np.array([0.25, 0.75], dtype=np.float32)))
    outs = [engine.forward(bert.input_ids, bert.attention_mask, [info.name] * 4, bert.token_type_ids)
            for info in (as_float, as_numpy)]
    assert torch.equal(outs[0].last_hidden_state, outs[1].last_hidden_state)


@pytest.mark.parametrize("sources,weights,options,fragment", [
    ([], [], {}, "at least one"),
    (["lora1"], [1], {"combine_strategy": "lora_delta_w_svd", "svd_rank": -1}, "positive svd_rank"),
    (["missing"], [0], {}, "sum to 0"),  # before the unknown source, too
])
def test_a_bad_request_is_named_before_a_taken_name(engine, sources, weights, options, fragment):
    """A request without sources for a loaded name was answered "already loaded ... needs overwrite_ok" (review)."""
    with pytest.raises(InvalidRequest, match=fragment):
        engine.average_adapters("lora0", sources, weights, **options)

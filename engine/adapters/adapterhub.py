"""AdapterHub folders (`adapters` library): ``adapter_config.json`` + ``adapter.safetensors`` or
``pytorch_adapter.bin``, optionally a head. See ../shared/reference/adapters-library.md §3.
"""
from pathlib import Path

from packaging.version import InvalidVersion, Version

from engine.adapters.files import TargetModel, read_json, read_weights
from engine.adapters.heads import read_head
from engine.adapters.methods.bottleneck import parse_bottleneck
from engine.adapters.methods.lora import parse_lora
from engine.adapters.spec import AdapterSpec
from engine.errors import InvalidAdapter, UnsupportedAdapter

# configs may be saved as a preset name instead of a dict
PRESETS = {
    "seq_bn": {"mh_adapter": False, "output_adapter": True, "reduction_factor": 16, "non_linearity": "relu",
               "original_ln_before": True, "original_ln_after": True, "residual_before_ln": True},
    "double_seq_bn": {"mh_adapter": True, "output_adapter": True, "reduction_factor": 16, "non_linearity": "swish",
                      "original_ln_before": False, "original_ln_after": True, "residual_before_ln": True},
    "par_bn": {"mh_adapter": False, "output_adapter": True, "reduction_factor": 2, "non_linearity": "relu",
               "is_parallel": True, "scaling": 4.0},
    "lora": {"architecture": "lora"},
    "ia3": {"architecture": "lora", "r": 1, "alpha": 1, "attn_matrices": ["k", "v"], "intermediate_lora": True,
            "composition_mode": "scale"},
}
PRESETS["scaled_par_bn"] = {**PRESETS["par_bn"], "scaling": "learned"}
PRESETS.update(pfeiffer=PRESETS["seq_bn"], houlsby=PRESETS["double_seq_bn"], parallel=PRESETS["par_bn"],
               scaled_parallel=PRESETS["scaled_par_bn"])
ACTIVATION_RENAME = {"gelu": "gelu_new", "gelu_orig": "gelu"}  # configs saved before versions were recorded
LEGACY_KEYS = {"attention_text_task_adapters": "adapters", "attention_text_lang_adapters": "adapters",
               "layer_text_task_adapters": "adapters", "layer_text_lang_adapters": "adapters"}


def read_adapterhub(folder: Path, target: TargetModel) -> AdapterSpec:
    source = str(folder)
    meta = read_json(folder / "adapter_config.json")
    config, name = meta.get("config"), meta.get("name")
    if isinstance(config, str):
        if config not in PRESETS:
            raise UnsupportedAdapter(source, f"adapter config {config!r} is not supported")
        config = dict(PRESETS[config])
    if not isinstance(config, dict) or not isinstance(name, str) or not name:
        raise InvalidAdapter(source, "adapter_config.json needs a 'config' object and a 'name'")
    _check_base(meta, target, source)
    config = _legacy_fixes(meta, dict(config))
    state = _normalise_keys(read_weights(folder, "adapter.safetensors", "pytorch_adapter.bin"), target)
    architecture = config.get("architecture")
    if architecture is None:
        spec = parse_bottleneck(name, config, state, target, source)
    elif architecture == "lora":
        spec = parse_lora(name, config, state, target, source)
    else:
        raise UnsupportedAdapter(source, f"method {architecture!r} is not supported yet (bottleneck, lora, ia3)")
    if state:
        raise InvalidAdapter(source, "unexpected key: not part of this adapter's config", sorted(state)[0])
    return AdapterSpec(**{**spec.__dict__, "head": read_head(folder, target)})


def _check_base(meta: dict, target: TargetModel, source: str) -> None:
    model_type, hidden = meta.get("model_type"), meta.get("hidden_size")
    if model_type is not None and model_type != target.info.model_type:
        raise InvalidAdapter(source, f"adapter was trained for model_type {model_type!r}, the base model is {target.info.model_type!r}")
    if hidden is not None and hidden != target.info.hidden_size:
        raise InvalidAdapter(source, f"adapter was trained for hidden_size {hidden!r}, the base model has {target.info.hidden_size}")


def _legacy_fixes(meta: dict, config: dict) -> dict:
    """The two corrections `adapters.loading` applies to configs of older library versions."""
    version = meta.get("version")
    if version is None and config.get("non_linearity") in ACTIVATION_RENAME:
        config["non_linearity"] = ACTIVATION_RENAME[config["non_linearity"]]
    if isinstance(version, str) and version.startswith("adapters.") and config.get("architecture") == "lora":
        try:
            old = Version(version[len("adapters."):]) < Version("1.1.0")
        except InvalidVersion:
            old = False
        if old and config.get("r") != config.get("alpha"):
            config["alpha"] = config.get("r", 8)  # LoRA trained with the faulty pre-1.1 scaling
    return config


def _normalise_keys(state: dict, target: TargetModel) -> dict:
    out = {}
    for key, tensor in state.items():
        for old, new in LEGACY_KEYS.items():
            key = key.replace(old, new)
        for prefix in target.info.state_dict_prefixes:
            if key.startswith(prefix):
                key = key[len(prefix):]
                break
        out[key] = tensor
    return out

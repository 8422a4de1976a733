"""PEFT folders: ``adapter_config.json`` (peft_type LORA or IA3) + ``adapter_model.safetensors``/``.bin``.

Keys are ``base_model.model.<module path>.lora_A.weight`` / ``lora_B.weight`` / ``ia3_l``. LoRA scales by
``alpha / r`` (``alpha / sqrt(r)`` with use_rslora), per module overridable by rank_pattern and
alpha_pattern. IA3 scales a module's output, or its input for feed-forward modules (``ia3_l`` [1, in]).
``fan_in_fan_out`` only changes how PEFT merges Conv1D weights, not the unmerged math served here.

PEFT applies a saved module only where its config targets it (``target_modules``, ``exclude_modules``,
``layers_to_transform``/``layers_pattern``) and drops the other saved weights when loading, so we do too;
a folder whose config targets none of its saved modules is refused (PEFT refuses one that targets nothing).
"""
import math
import re
from pathlib import Path

from engine.adapters.files import TargetModel, checked, finite_number, positive_int, read_json, read_weights
from engine.adapters.spec import AdapterSpec, IA3Weights, LoraWeights, Method
from engine.errors import InvalidAdapter, UnsupportedAdapter

KEY = re.compile(r"^(?:base_model\.model\.)?(?P<module>.+)\.(?P<param>lora_A\.weight|lora_B\.weight|ia3_l)$")
# options that change inference and that we do not implement: refused instead of silently ignored
REFUSED = {"use_dora": "DoRA", "lora_bias": "LoRA bias", "layer_replication": "layer replication",
           "modules_to_save": "modules_to_save", "trainable_token_indices": "trainable tokens",
           "target_parameters": "target_parameters", "use_qalora": "QA-LoRA", "alora_invocation_tokens": "aLoRA"}
# saved modules that feed nothing we serve: BERT's pooler is read only by AdapterHub heads (use_pooler), and a PEFT
# folder brings no head ("all-linear" and ["dense"] target it); dropped with a warning at load
UNSERVED = ("pooler.dense",)
ALL_LINEAR = "all-linear"  # PEFT's shorthand for every linear layer but the output layer: every saved site here


def read_peft(folder: Path, target: TargetModel, name: str) -> AdapterSpec:
    source = str(folder)
    cfg = read_json(folder / "adapter_config.json")
    peft_type = cfg.get("peft_type")
    if peft_type not in ("LORA", "IA3"):
        raise UnsupportedAdapter(source, f"peft_type {peft_type!r} is not supported (LORA, IA3)")
    for field, what in REFUSED.items():
        if cfg.get(field):
            raise UnsupportedAdapter(source, f"{what} ({field}) is not supported")
    if peft_type == "LORA":  # what LoraConfig refuses, so PeftModel.from_pretrained cannot load the folder
        if isinstance(cfg.get("target_modules"), str) and (cfg.get("layers_to_transform") is not None
                                                           or cfg.get("layers_pattern") is not None):
            raise InvalidAdapter(source, "layers_to_transform and layers_pattern need a list of target_modules, "
                                         "not a regex (PEFT refuses this config too)")
        if cfg.get("layers_pattern") and cfg.get("layers_to_transform") is None:
            raise InvalidAdapter(source, "layers_pattern needs layers_to_transform (PEFT refuses this config too)")
    if cfg.get("bias", "none") != "none":
        raise UnsupportedAdapter(source, f"bias={cfg['bias']!r} is not supported (only 'none')")
    state = read_weights(folder, "adapter_model.safetensors", "adapter_model.bin")
    modules: dict[str, dict] = {}
    names: dict[str, str] = {}  # site path -> the module's name in the saved model: what PEFT's patterns match
    untargeted, unserved = set(), set()
    for key, tensor in state.items():
        match = KEY.match(key)
        if match is None:
            raise InvalidAdapter(source, "unexpected key", key)
        if not _targeted(cfg, peft_type, match["module"], source):
            untargeted.add(match["module"])
            continue
        module = _strip_prefix(match["module"], target)
        if module in UNSERVED and module not in target.linear:
            unserved.add(match["module"])
            continue
        if module not in target.linear:
            raise UnsupportedAdapter(source, f"module {module!r} is not an adapter site of this base model ({key})")
        modules.setdefault(module, {})[match["param"]] = (key, tensor)
        names[module] = match["module"]
    if not modules and untargeted:
        fields = ", ".join(f"{f}={cfg.get(f)!r}" for f in ("target_modules", "layers_to_transform", "exclude_modules"))
        saved = sorted(untargeted)
        raise InvalidAdapter(source, f"its config targets none of the saved modules ({fields}; saved: {saved[0]}"
                                     f"{', ...' if len(saved) > 1 else ''})")
    if not modules and unserved:
        raise UnsupportedAdapter(source, f"it adapts only {', '.join(sorted(unserved))}, which feeds no output "
                                         "served here")
    if not modules:
        raise InvalidAdapter(source, "no LoRA or IA3 weights in the file")
    # the load warns of them (`AdapterLifecycle.load`), a re-read does not
    dropped = dict(ignored_modules=tuple(sorted(untargeted)), unserved_modules=tuple(sorted(unserved)))
    if peft_type == "LORA":
        lora = {m: _lora(p, cfg, m, names[m], target, source) for m, p in modules.items()}
        return AdapterSpec(name, Method.LORA, source, lora=lora, config=cfg, **dropped)
    ia3 = {m: _ia3(p, cfg, m, names[m], target, source) for m, p in modules.items()}
    return AdapterSpec(name, Method.IA3, source, ia3=ia3, config=cfg, **dropped)


def _targeted(cfg: dict, peft_type: str, module: str, source: str) -> bool:
    """PEFT's `check_target_module_exists` for the module's name in the saved model.

    No ``target_modules`` means PEFT's default targets for the model type, which the saved weights follow.
    As in PEFT, ``layers_to_transform`` narrows only the list entries that match the end of a module path (not a
    regex, not an exact path), and only for LoRA: IA3's config has no such field, PEFT drops it.
    """
    if _matches(cfg.get("exclude_modules"), module, source, "exclude_modules"):
        return False
    targets = cfg.get("target_modules")
    if targets is None or (isinstance(targets, str) and targets.lower() == ALL_LINEAR):
        return True
    if not _matches(targets, module, source, "target_modules"):
        return False
    if isinstance(targets, str) or module in targets or peft_type != "LORA":
        return True
    layers = cfg.get("layers_to_transform")
    if layers is None or layers == []:
        return True
    if not (isinstance(layers, int) or (isinstance(layers, list) and all(isinstance(i, int) for i in layers))):
        raise InvalidAdapter(source, f"layers_to_transform must be a layer index or a list of them, got {layers!r}")
    patterns = cfg.get("layers_pattern")
    # PEFT's regexes: the first numbered segment after any segment (no pattern) or after a pattern's
    regexes = ([r".*?\.[^.]*\.(?P<idx>\d+)\."] if not patterns else
               [rf"(?:^|.*?\.){p}\.(?P<idx>\d+)\." for p in ([patterns] if isinstance(patterns, str) else patterns)])
    for regex in regexes:
        try:
            match = re.match(regex, module)
        except re.error as exc:
            raise InvalidAdapter(source, f"layers_pattern holds an invalid regular expression {patterns!r}: {exc}"
                                 ) from None
        if match is not None:
            index = int(match["idx"])
            return index == layers if isinstance(layers, int) else index in layers
    return False


def _strip_prefix(module: str, target: TargetModel) -> str:
    for prefix in target.info.state_dict_prefixes:
        if module.startswith(prefix):
            return module[len(prefix):]
    return module


def _pattern_value(cfg: dict, field: str, module: str, default, source: str):
    """PEFT's `get_pattern_key`: the value of the first pattern in ``cfg[field]`` that matches the end of the
    module path, else ``default``."""
    patterns = cfg.get(field) or {}
    if not isinstance(patterns, dict):
        raise InvalidAdapter(source, f"{field} must map module patterns to values, got {patterns!r}")
    for pattern, value in patterns.items():
        if _search(rf"(.*\.)?({pattern})$", module, field, source):
            return value
    return default


def _search(pattern: str, module: str, field: str, source: str) -> bool:
    """Whether the regex ``pattern`` (from the config's ``field``) matches the whole module path."""
    try:
        return re.fullmatch(pattern, module) is not None
    except re.error as exc:
        raise InvalidAdapter(source, f"{field} holds an invalid regular expression {pattern!r}: {exc}") from None


def _lora(params: dict, cfg: dict, module: str, name: str, target: TargetModel, source: str) -> LoraWeights:
    in_f, out_f = target.linear[module]
    r = _pattern_value(cfg, "rank_pattern", name, cfg.get("r", 8), source)
    alpha = finite_number(_pattern_value(cfg, "alpha_pattern", name, cfg.get("lora_alpha", 8), source), source,
                          f"lora_alpha for {module}")
    r = positive_int(r, source, f"r for {module}")
    for param in ("lora_A.weight", "lora_B.weight"):
        if param not in params:
            raise InvalidAdapter(source, "missing key", f"base_model.model.{module}.{param}")
    extra = sorted(set(params) - {"lora_A.weight", "lora_B.weight"})
    if extra:
        raise InvalidAdapter(source, "unexpected key in a LoRA adapter", params[extra[0]][0])
    a = checked(params["lora_A.weight"][1], source, params["lora_A.weight"][0], (r, in_f))
    b = checked(params["lora_B.weight"][1], source, params["lora_B.weight"][0], (out_f, r))
    scaling = alpha / math.sqrt(r) if cfg.get("use_rslora") else alpha / r
    return LoraWeights(a, b, float(scaling))


def _ia3(params: dict, cfg: dict, module: str, name: str, target: TargetModel, source: str) -> IA3Weights:
    in_f, out_f = target.linear[module]
    if set(params) != {"ia3_l"}:
        raise InvalidAdapter(source, "IA3 adapters hold only ia3_l vectors", params[next(iter(params))][0])
    key, tensor = params["ia3_l"]
    feedforward = _matches(cfg.get("feedforward_modules"), name, source, "feedforward_modules")
    if feedforward:
        return IA3Weights(checked(tensor, source, key, (1, in_f))[0], on_input=True)
    return IA3Weights(checked(tensor, source, key, (out_f, 1))[:, 0], on_input=False)


def _matches(targets, module: str, source: str, field: str) -> bool:
    """PEFT's module matching (``target_modules``, ``exclude_modules``, ``feedforward_modules``): a regex
    string must match the whole path, list entries its end."""
    if not targets:
        return False
    if isinstance(targets, str):
        return _search(targets, module, field, source)
    if not isinstance(targets, list) or not all(isinstance(t, str) for t in targets):
        raise InvalidAdapter(source, f"{field} must be a regex or a list of module names, got {targets!r}")
    return module in targets or any(module.endswith(f".{t}") for t in targets)

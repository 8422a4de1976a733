"""The adapter store: a folder whose adapter folders (any depth) form a catalog, listed by base model and
method like `list_adapters(source, model_name)` in the AdapterHub library. Sources name its folders as
``store://<path inside the store>``; a path that leads outside the root (``..``, absolute, or through a
symbolic link) is refused before anything is read.
"""
import json
import os
from pathlib import Path

from engine.adapters.adapterhub import PRESETS
from engine.adapters.files import read_regular
from engine.errors import AdapterSourceError, AdapterSourceRefused, InvalidAdapter
from engine.types import CatalogEntry

SCHEME = "store://"
CONFIG = "adapter_config.json"
MAX_TEXT_CHARS = 1024  # a catalog field (model name, method) longer than this is shown as unknown


class AdapterStore:
    def __init__(self, root: Path):
        self.root = Path(root).expanduser().resolve()

    def source_of(self, folder: Path) -> str:
        """The canonical source of a store folder (``store://bert/./lora`` and ``store://bert//lora`` name
        ``store://bert/lora``), as the catalog lists it: one adapter, one source in listings and logs."""
        return SCHEME + folder.relative_to(self.root).as_posix()

    def folder(self, source: str) -> Path:
        """The store folder a ``store://`` source names."""
        relative = source.removeprefix(SCHEME)
        if not relative or Path(relative).is_absolute():
            raise AdapterSourceRefused(source, "expects store://<path inside the adapter store>")
        folder = _resolve(self.root / relative, source)
        if not folder.is_relative_to(self.root):
            raise AdapterSourceRefused(source, "the path leads outside the adapter store")
        if not (folder / CONFIG).is_file():
            raise AdapterSourceError(source, f"no adapter folder {relative!r} in the adapter store")
        for entry in folder.iterdir():  # the files read are the folder's own: none may link out of the store either
            if not _resolve(entry, source).is_relative_to(self.root):
                raise AdapterSourceRefused(source, f"{entry.name} is a symbolic link leading outside the adapter store")
        return folder

    def inside_adapter(self, folder: Path) -> bool:
        """Whether a folder of the store lies inside another adapter's folder, which the catalog does not list
        (an adapter folder's subfolders are its own: checkpoints, variants)."""
        return any((parent / CONFIG).is_file() for parent in folder.parents if parent.is_relative_to(self.root))

    def catalog(self, base_model: str | None = None, method: str | None = None) -> list[CatalogEntry]:
        """Every adapter folder, filtered by base model (its saved model name or model type) and method."""
        entries = []
        for folder, subfolders, files in os.walk(self.root):  # symbolic links to folders are not followed
            subfolders.sort()
            if CONFIG not in files:
                continue
            subfolders.clear()  # an adapter folder's subfolders are its own (never separate adapters)
            entry = _describe(Path(folder), self.root)
            if entry is None:
                continue
            if base_model is not None and base_model not in (entry.base_model, entry.model_type):
                continue
            if method is not None and method != entry.method:
                continue
            entries.append(entry)
        return sorted(entries, key=lambda e: e.name)


def _resolve(path: Path, source: str) -> Path:
    try:
        return path.resolve()
    except (RuntimeError, OSError) as exc:  # a symbolic link loop: RuntimeError up to Python 3.12, OSError after
        raise AdapterSourceRefused(source, f"cannot resolve {path.name}: {exc}") from None


def _describe(folder: Path, root: Path) -> CatalogEntry | None:
    """The catalog entry of one folder from its JSON files alone; None when the config is unreadable."""
    meta = _json(folder / CONFIG)
    if meta is None:
        return None
    try:
        size = sum(f.stat().st_size for f in folder.iterdir() if f.is_file())
    except OSError:
        return None
    if not isinstance(meta, dict):
        return None
    name = folder.relative_to(root).as_posix()  # the source is SCHEME + name, as `AdapterStore.source_of` gives
    if _text(name) is None:  # a folder name that is not UTF-8 could not even be named in a request
        return None
    if "peft_type" in meta:
        method = _text(meta["peft_type"].lower()) if isinstance(meta["peft_type"], str) else None
        return CatalogEntry(name, SCHEME + name, "peft", method or "unknown",
                            _text(meta.get("base_model_name_or_path")), None, None, size)
    return CatalogEntry(name, SCHEME + name, "adapterhub", adapterhub_method(meta.get("config")),
                        _text(meta.get("model_name")), _text(meta.get("model_type")), _head_type(folder), size)


def _text(value) -> str | None:
    """A descriptive JSON field as the catalog's text; None when it is missing, no string, over MAX_TEXT_CHARS
    (a 5 MB field made the reply too big) or not UTF-8 (a lone surrogate failed the reply's encoding): one
    malformed folder must not break the listing of all the others."""
    if not isinstance(value, str) or len(value) > MAX_TEXT_CHARS:
        return None
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        return None
    return value


def adapterhub_method(config) -> str:
    """The method family of a saved AdapterHub config (dict or preset name), as `AdapterInfo.method` names it."""
    config = PRESETS.get(config, config) if isinstance(config, str) else config
    if isinstance(config, str):  # a preset we do not serve, e.g. "prefix_tuning"
        return _text(config) or "unknown"
    if not isinstance(config, dict):
        return "unknown"
    architecture = config.get("architecture")
    if architecture is None:
        return "bottleneck"
    if architecture == "lora":
        return "ia3" if config.get("composition_mode") == "scale" else "lora"
    return _text(architecture) or "unknown"


def _json(path: Path):
    """A JSON file's data, None when it is missing or unreadable: no regular file (a FIFO would block the
    listing), no JSON, too deeply nested or an integer too long for the decoder. One malformed folder must not
    break the catalog."""
    try:
        return json.loads(read_regular(path).decode("utf-8"))
    except (OSError, ValueError, RecursionError, InvalidAdapter):
        return None


def _head_type(folder: Path) -> str | None:
    head = _json(folder / "head_config.json")
    config = head.get("config") if isinstance(head, dict) else None
    return _text(config.get("head_type")) if isinstance(config, dict) else None

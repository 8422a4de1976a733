"""Adapter folders of any supported format -> validated `AdapterSpec` (nothing is visible before this)."""
import re
from pathlib import Path

from engine.adapters.adapterhub import read_adapterhub
from engine.adapters.files import TargetModel, read_json
from engine.adapters.peft import read_peft
from engine.adapters.spec import AdapterSpec
from engine.errors import AdapterSourceError, InvalidAdapter


def read_adapter(folder: Path, target: TargetModel, name: str | None = None,
                 default_name: str | None = None) -> AdapterSpec:
    """Reads and validates an AdapterHub or PEFT folder; ``name`` overrides the served name. PEFT saves no
    name: it is then ``default_name`` (the source's, e.g. a hub repo's), else the folder's."""
    folder = Path(folder)
    try:
        is_folder = folder.is_dir()
    except (OSError, ValueError) as exc:  # a name too long for the file system, a NUL byte
        raise AdapterSourceError(str(folder), f"cannot open it: {exc}") from None
    if not is_folder:
        if folder.is_symlink() and not folder.exists():
            raise InvalidAdapter(str(folder), "a symbolic link that leads nowhere (its target is missing, or the "
                                              "links form a loop)")
        raise InvalidAdapter(str(folder), "a file, not a folder" if folder.exists() else "no such folder")
    try:
        if "peft_type" in read_json(folder / "adapter_config.json"):
            return read_peft(folder, target, name or default_name or folder.name)
        spec = read_adapterhub(folder, target)
    except (TypeError, ValueError, AttributeError, LookupError, re.error) as exc:
        # a config value of a JSON type no check above expected: still the adapter's fault, not the server's
        raise InvalidAdapter(str(folder), f"malformed config value ({type(exc).__name__}: {exc})") from None
    return spec if name is None else AdapterSpec(**{**spec.__dict__, "name": name})

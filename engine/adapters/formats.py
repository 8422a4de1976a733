"""Adapter folders of any supported format -> validated `AdapterSpec` (nothing is visible before this)."""
from pathlib import Path

from engine.adapters.adapterhub import read_adapterhub
from engine.adapters.files import TargetModel, read_json
from engine.adapters.peft import read_peft
from engine.adapters.spec import AdapterSpec
from engine.errors import InvalidAdapter


def read_adapter(folder: Path, target: TargetModel, name: str | None = None,
                 default_name: str | None = None) -> AdapterSpec:
    """Reads and validates an AdapterHub or PEFT folder; ``name`` overrides the served name. PEFT saves no
    name: it is then ``default_name`` (the source's, e.g. a hub repo's), else the folder's."""
    folder = Path(folder)
    if not folder.is_dir():
        raise InvalidAdapter(str(folder), "not a folder")
    if "peft_type" in read_json(folder / "adapter_config.json"):
        return read_peft(folder, target, name or default_name or folder.name)
    spec = read_adapterhub(folder, target)
    return spec if name is None else AdapterSpec(**{**spec.__dict__, "name": name})

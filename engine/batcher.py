"""Rows' pool slots -> `AdapterBatch`: per-site slot vectors and bottleneck variant groups.

Host-side bookkeeping only (a few hundred dict lookups per batch); the tensors it builds are small
index vectors. Sites no row uses are left out, so the model skips them at no cost.
"""
import torch

from engine.adapters.pool import AdapterPool, BottleneckSlots, LinearSlots
from engine.batch import AdapterBatch, BottleneckGroup, BottleneckSiteBatch, LinearSiteBatch


class _Index:
    """Memoised host list -> device int64 tensor: most sites share the same few slot vectors."""

    def __init__(self, device: torch.device):
        self.device, self.cache = device, {}

    def __call__(self, values: tuple[int, ...]) -> torch.Tensor:
        if values not in self.cache:
            self.cache[values] = torch.tensor(values, dtype=torch.long, device=self.device)
        return self.cache[values]


def build_adapter_batch(row_slots: list[int], pool: AdapterPool) -> AdapterBatch:
    index = _Index(pool.device)
    linear = {}
    for path, site in pool.linear.items():
        entry = _linear_site(row_slots, site, index)
        if entry is not None:
            linear[path] = entry
    bottleneck = {}
    for path, site in pool.bottleneck.items():
        entry = _bottleneck_site(row_slots, site, index)
        if entry is not None:
            bottleneck[path] = entry
    return AdapterBatch(index(tuple(row_slots)), linear, bottleneck)


def _present(row_slots: list[int], present) -> tuple[int, ...] | None:
    slots = tuple(s if s in present else -1 for s in row_slots)
    return None if all(s < 0 for s in slots) else slots


def _linear_site(row_slots: list[int], site: LinearSlots, index: _Index) -> LinearSiteBatch | None:
    lora = _present(row_slots, site.lora_present)
    ia3_out = _present(row_slots, site.ia3_out_present)
    ia3_in = _present(row_slots, site.ia3_in_present)
    if lora is None and ia3_out is None and ia3_in is None:
        return None
    return LinearSiteBatch(
        lora=site.lora if lora else None, lora_slots=index(lora) if lora else None,
        ia3_out=site.ia3_out if ia3_out else None, ia3_out_slots=index(ia3_out) if ia3_out else None,
        ia3_in=site.ia3_in if ia3_in else None, ia3_in_slots=index(ia3_in) if ia3_in else None)


def _bottleneck_site(row_slots: list[int], site: BottleneckSlots, index: _Index) -> BottleneckSiteBatch | None:
    groups: dict = {}
    plain = []
    for row, slot in enumerate(row_slots):
        variant = site.variants.get(slot)
        if variant is None:
            plain.append(row)
        else:
            groups.setdefault(variant, []).append(row)
    if not groups:
        return None
    if not plain and len(groups) == 1:
        variant = next(iter(groups))
        return BottleneckSiteBatch(site.tables, (BottleneckGroup(variant, None, index(tuple(row_slots))),), None)
    built = tuple(BottleneckGroup(v, index(tuple(rows)), index(tuple(row_slots[r] for r in rows)))
                  for v, rows in groups.items())
    return BottleneckSiteBatch(site.tables, built, index(tuple(plain)) if plain else None)

"""Rows' pool slots -> `AdapterBatch`: the row order, per-site row sets and bottleneck groups.

Host-side bookkeeping only (dict lookups per row and site); the tensors it builds are small index
vectors, memoised because most sites share the same few. Rows are sorted by the pool's per-slot key
(method, rank bucket, activation, adapter input, slot: see `engine.adapters.pool.sort_key`), so at
each site the rows of one kind are usually one contiguous slice that the model works on in place,
and the rows of one rank bucket and activation are neighbours for the kernels. Sites no row uses
are left out.
"""
import torch

from engine.adapters.pool import AdapterPool, BottleneckSlots, LinearSlots
from engine.batch import (AdapterBatch, BottleneckGroup, BottleneckSiteBatch, FusedBottleneck, LinearSiteBatch,
                          RowSet, Rows, Source)

NO_ADAPTER = (4,)  # after every adapter kind


class _Index:
    """Memoised host tuple -> device int64 tensor."""

    def __init__(self, device: torch.device):
        self.device, self.cache = device, {}

    def __call__(self, values: tuple[int, ...]) -> torch.Tensor:
        if values not in self.cache:
            self.cache[values] = torch.tensor(values, dtype=torch.long, device=self.device)
        return self.cache[values]


def build_adapter_batch(row_slots: list[int], pool: AdapterPool) -> AdapterBatch:
    index = _Index(pool.device)
    order = sorted(range(len(row_slots)), key=lambda r: (pool.sort_keys.get(row_slots[r], NO_ADAPTER), row_slots[r]))
    slots = [row_slots[r] for r in order]
    identity = order == list(range(len(order)))
    inverse = [0] * len(order)
    for batch_row, original in enumerate(order):
        inverse[original] = batch_row
    linear = {}
    for path, site in pool.linear.items():
        entry = _linear_site(slots, site, index)
        if entry is not None:
            linear[path] = entry
    bottleneck = {}
    for path, site in pool.bottleneck.items():
        entry = _bottleneck_site(slots, site, index)
        if entry is not None:
            bottleneck[path] = entry
    return AdapterBatch(None if identity else index(tuple(order)), None if identity else index(tuple(inverse)),
                        linear, bottleneck)


def _row_set(slots: list[int], present, index: _Index) -> RowSet | None:
    """The rows whose slot is in ``present``: a slice if contiguous, else the whole batch with -1 elsewhere."""
    rows = [r for r, s in enumerate(slots) if s in present]
    if not rows:
        return None
    start, end = rows[0], rows[-1] + 1
    if end - start == len(rows):
        return RowSet(slice(start, end), index(tuple(slots[start:end])))
    return RowSet(slice(0, len(slots)), index(tuple(s if s in present else -1 for s in slots)))


def _linear_site(slots: list[int], site: LinearSlots, index: _Index) -> LinearSiteBatch | None:
    lora = _row_set(slots, site.lora_present, index)
    ia3_out = _row_set(slots, site.ia3_out_present, index)
    ia3_in = _row_set(slots, site.ia3_in_present, index)
    if lora is None and ia3_out is None and ia3_in is None:
        return None
    return LinearSiteBatch(site.lora if lora else None, lora, site.ia3_out if ia3_out else None, ia3_out,
                           site.ia3_in if ia3_in else None, ia3_in)


def _bottleneck_site(slots: list[int], site: BottleneckSlots, index: _Index) -> BottleneckSiteBatch | None:
    fused: list[tuple[int, Source]] = []  # (row, its adapter input)
    groups: dict = {}  # variant -> rows
    for row, slot in enumerate(slots):
        variant = site.variants.get(slot)
        if variant is None:
            continue
        source = variant.fused_source
        if source is not None:
            fused.append((row, source))
        else:
            groups.setdefault(variant, []).append(row)
    if not fused and not groups:
        return None
    plain = [r for r, src in fused if src is Source.PLAIN]
    plain += [r for v, rows in groups.items() if v.reads_plain for r in rows]
    general = tuple(BottleneckGroup(v, _rows(rows, index), index(tuple(slots[r] for r in rows)))
                    for v, rows in groups.items())
    return BottleneckSiteBatch(site.tables, _fused(slots, fused, index) if fused else None, general,
                               slice(min(plain), max(plain) + 1) if plain else None,
                               sum(len(rows) for rows in groups.values()) == len(slots))


def _fused(slots: list[int], rows: list[tuple[int, Source]], index: _Index) -> FusedBottleneck:
    runs: list[tuple[Source, int, int]] = []  # maximal contiguous row ranges with one input
    for row, src in rows:
        if runs and runs[-1][0] is src and runs[-1][2] == row:
            runs[-1] = (src, runs[-1][1], row + 1)
        else:
            runs.append((src, row, row + 1))
    return FusedBottleneck(_rows([r for r, _ in rows], index), tuple((src, slice(a, b)) for src, a, b in runs),
                           index(tuple(slots[r] for r, _ in rows)))


def _rows(rows: list[int], index: _Index) -> Rows:
    """A slice when the (ascending) rows are contiguous, else their index tensor."""
    start, end = rows[0], rows[-1] + 1
    return slice(start, end) if end - start == len(rows) else index(tuple(rows))

"""Device slot stacks per adapter site: the only writer of slot tensors. Not thread-safe on its own:
`engine.adapters.tiers` calls it only under its lock, which decides which version holds which slot.

An adapter occupies one slot index in every site stack it touches. Stacks are created lazily the
first time a method touches a site, and re-allocated (copied) when a larger rank arrives; the old
tensors stay valid for batches that already hold them, so a load never corrupts a running forward.
"""
from dataclasses import dataclass, field, replace

import torch

from engine.adapters.spec import AdapterSpec, BottleneckWeights, HeadSpec, LoraWeights
from engine.batch import BottleneckTables, BottleneckVariant, LoraTables
from engine.errors import AdapterCapacityExceeded
from kernels.reference import rank_bucket


@dataclass
class LinearSlots:
    in_features: int
    out_features: int
    lora: LoraTables | None = None
    lora_present: set[int] = field(default_factory=set)
    ia3_out: torch.Tensor | None = None  # [S, N]
    ia3_out_present: set[int] = field(default_factory=set)
    ia3_in: torch.Tensor | None = None  # [S, K]
    ia3_in_present: set[int] = field(default_factory=set)


@dataclass
class BottleneckSlots:
    tables: BottleneckTables | None = None
    variants: dict[int, BottleneckVariant] = field(default_factory=dict)  # slot -> variant, for present slots


class AdapterPool:
    def __init__(self, linear_dims: dict[str, tuple[int, int]], junctions: list[str], hidden: int,
                 capacity: int, device: torch.device, dtype: torch.dtype):
        self.capacity, self.device, self.dtype, self.hidden = capacity, device, dtype, hidden
        self.linear = {path: LinearSlots(*dims) for path, dims in linear_dims.items()}
        self.bottleneck = {path: BottleneckSlots() for path in junctions}
        self.heads: dict[int, HeadSpec] = {}  # slot -> head weights on device
        self.sort_keys: dict[int, tuple] = {}  # slot -> batch order key (see `sort_key`)
        self._free = list(range(capacity - 1, -1, -1))

    @property
    def num_free(self) -> int:
        return len(self._free)

    def load(self, spec: AdapterSpec) -> int:
        """Copies an adapter into a free slot and returns the slot."""
        if not self._free:
            raise AdapterCapacityExceeded(f"all {self.capacity} adapter slots are in use; unload one first")
        slot = self._free.pop()
        try:
            self._write(slot, spec)
        except BaseException:  # e.g. device out of memory while growing a stack: the slot is not lost
            self.free(slot)
            raise
        return slot

    def _write(self, slot: int, spec: AdapterSpec) -> None:
        for path, w in spec.lora.items():
            self._write_lora(self.linear[path], slot, w)
        for path, w in spec.ia3.items():
            site = self.linear[path]
            if w.on_input:
                site.ia3_in = self._ensure(site.ia3_in, site.in_features)
                site.ia3_in[slot] = w.vector.to(self.dtype)
                site.ia3_in_present.add(slot)
            else:
                site.ia3_out = self._ensure(site.ia3_out, site.out_features)
                site.ia3_out[slot] = w.vector.to(self.dtype)
                site.ia3_out_present.add(slot)
        for path, w in spec.bottleneck.items():
            self._write_bottleneck(self.bottleneck[path], slot, w, int(spec.act), spec.variant)
        if spec.head is not None:
            self.heads[slot] = _head_to(spec.head, self.device, self.dtype)
        self.sort_keys[slot] = sort_key(spec)

    def free(self, slot: int) -> None:
        """Forgets a slot; its stale weights are never read because no site lists it as present."""
        for site in self.linear.values():
            site.lora_present.discard(slot)
            site.ia3_out_present.discard(slot)
            site.ia3_in_present.discard(slot)
        for site in self.bottleneck.values():
            site.variants.pop(slot, None)
        self.heads.pop(slot, None)
        self.sort_keys.pop(slot, None)
        self._free.append(slot)

    def _ensure(self, table: torch.Tensor | None, size: int) -> torch.Tensor:
        if table is None:
            table = torch.ones(self.capacity, size, device=self.device, dtype=self.dtype)
        return table

    def _write_lora(self, site: LinearSlots, slot: int, w: LoraWeights) -> None:
        rank = w.lora_a.shape[0]
        tables = site.lora
        if tables is None or tables.lora_a.shape[1] < rank:
            tables = self._grow_lora(tables, site, rank)
        tables.lora_a[slot].zero_()
        tables.lora_b[slot].zero_()
        tables.lora_a[slot, :rank] = w.lora_a.to(self.dtype)
        tables.lora_b[slot, :rank] = w.lora_b.t().to(self.dtype)  # rank-major, like lora_a
        tables.scaling[slot] = w.scaling
        tables.ranks[slot] = rank
        site.lora = tables
        site.lora_present.add(slot)

    def _grow_lora(self, old: LoraTables | None, site: LinearSlots, rank: int) -> LoraTables:
        s, kw = self.capacity, dict(device=self.device, dtype=self.dtype)
        new = LoraTables(torch.zeros(s, rank, site.in_features, **kw), torch.zeros(s, rank, site.out_features, **kw),
                         torch.zeros(s, device=self.device), torch.zeros(s, dtype=torch.int32, device=self.device))
        if old is not None:
            r = old.lora_a.shape[1]
            new.lora_a[:, :r] = old.lora_a
            new.lora_b[:, :r] = old.lora_b
            new.scaling.copy_(old.scaling)
            new.ranks.copy_(old.ranks)
        return new

    def _write_bottleneck(self, site: BottleneckSlots, slot: int, w: BottleneckWeights, act: int,
                          variant: BottleneckVariant) -> None:
        rank = w.w_down.shape[0]
        tables = site.tables
        if tables is None or tables.w_down.shape[1] < rank:
            tables = self._grow_bottleneck(tables, rank)
        d = self.dtype
        tables.w_down[slot].zero_()
        tables.b_down[slot].zero_()
        tables.w_up[slot].zero_()
        tables.w_down[slot, :rank] = w.w_down.to(d)
        tables.b_down[slot, :rank] = w.b_down.to(d)
        tables.w_up[slot, :rank] = w.w_up.to(d)
        tables.b_up[slot] = w.b_up.to(d)
        tables.scaling[slot] = w.scaling.to(d)
        tables.act_ids[slot] = act
        tables.ranks[slot] = rank
        for norm, weight, bias in ((w.ln_before, tables.ln_before_weight, tables.ln_before_bias),
                                   (w.ln_after, tables.ln_after_weight, tables.ln_after_bias)):
            weight[slot] = norm[0].to(d) if norm else 1.0
            bias[slot] = norm[1].to(d) if norm else 0.0
        site.tables = tables
        site.variants[slot] = variant

    def _grow_bottleneck(self, old: BottleneckTables | None, rank: int) -> BottleneckTables:
        s, h, kw = self.capacity, self.hidden, dict(device=self.device, dtype=self.dtype)
        new = BottleneckTables(
            w_down=torch.zeros(s, rank, h, **kw), b_down=torch.zeros(s, rank, **kw),
            w_up=torch.zeros(s, rank, h, **kw), b_up=torch.zeros(s, h, **kw), scaling=torch.ones(s, h, **kw),
            act_ids=torch.zeros(s, dtype=torch.int32, device=self.device),
            ranks=torch.zeros(s, dtype=torch.int32, device=self.device),
            ln_before_weight=torch.ones(s, h, **kw), ln_before_bias=torch.zeros(s, h, **kw),
            ln_after_weight=torch.ones(s, h, **kw), ln_after_bias=torch.zeros(s, h, **kw))
        if old is not None:
            r = old.w_down.shape[1]
            new.w_down[:, :r] = old.w_down
            new.b_down[:, :r] = old.b_down
            new.w_up[:, :r] = old.w_up
            for name in ("b_up", "scaling", "act_ids", "ranks", "ln_before_weight", "ln_before_bias",
                         "ln_after_weight", "ln_after_bias"):
                getattr(new, name).copy_(getattr(old, name))
        return new


def sort_key(spec: AdapterSpec) -> tuple:
    """Rows are batched in this order: bottleneck adapters, then LoRA, then IA3 (then rows without adapter).

    Bottleneck rows of the common variants (one adapter body per site for all of them) come first, by
    rank bucket, activation and adapter input, so the kernels' rank runs and activation runs are
    contiguous; the other variants follow, by variant, so each is one contiguous general-path group.
    LoRA rows go by rank bucket. `kernels.reference` merges neighbouring buckets when padding is cheaper.
    """
    if spec.bottleneck:
        v = spec.variant
        bucket = rank_bucket(max(w.w_down.shape[0] for w in spec.bottleneck.values()))
        if v.fused_source is not None:
            return (0, bucket, int(spec.act), v.fused_source.value)
        return (1, v.is_parallel, v.original_ln_before, v.original_ln_after, v.residual_before_ln.value,
                v.adapter_residual_before_ln, v.ln_before, v.ln_after, bucket)
    if spec.lora:
        return (2, rank_bucket(max(w.lora_a.shape[0] for w in spec.lora.values())))
    return (3,)


def _head_to(head: HeadSpec, device: torch.device, dtype: torch.dtype) -> HeadSpec:
    layers = tuple((w.to(device, dtype), None if b is None else b.to(device, dtype)) for w, b in head.layers)
    return replace(head, layers=layers)

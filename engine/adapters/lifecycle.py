"""Adapter lifecycle: load, unload, list, average and the forward's admission, over the registry (names
and versions), the tiers (where each version's weights are) and the sources (where its files come from).

What blocks what:
- ``load`` / ``average``: resolving, downloading, reading and validating run in the caller's thread with
  no lock held. Then one short tiers-lock hold (a slot copy when a slot is free or the adapter is
  pinned, else a CPU-tier insert) and one registry-lock hold (the swap). A failure before the swap
  leaves everything as it was.
- a forward (``admit``): one registry-lock hold acquires every row's version; tiers-lock holds copy
  non-resident versions into slots (evicting idle ones) and build the batch metadata. It waits, holding
  no lock, only for reads of its own versions that are at their source tier; never for another
  adapter's files. The model runs with no lock held. Another thread's slot copy (host to device, about
  a millisecond per MB) is the longest a forward may wait for the tiers lock.
- ``unload``: one registry-lock hold; the version is freed when its last in-flight row is released.
"""
import collections
import functools
import itertools
import logging
import threading
from contextlib import contextmanager
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Callable, Iterator

from engine.adapters.aggregation import average_specs, check_request
from engine.adapters.files import TargetModel
from engine.adapters.formats import read_adapter
from engine.adapters.pool import AdapterPool
from engine.adapters.registry import AdapterRecord, AdapterRegistry
from engine.adapters.sources import AdapterFolder, AdapterSources, fingerprint
from engine.adapters.spec import AdapterSpec, HeadSpec
from engine.adapters.store import AdapterStore
from engine.adapters.tiers import AdapterTiers, Residency, TierBudget, device_bytes
from engine.batch import AdapterBatch
from engine.batcher import build_adapter_batch
from engine.config import EngineConfig
from engine.errors import AdapterNameTaken, AdapterNotFound, AdapterSourceError, InvalidAdapter, InvalidRequest
from engine.names import check_name, check_tenant
from engine.types import AdapterInfo, CatalogEntry

log = logging.getLogger(__name__)
# what an AdapterNameTaken says it would take
AVERAGE_REPLACES = "replacing it with the average needs overwrite_ok (CLI: --overwrite)"
LOAD_REPLACES = "replacing it needs overwrite_ok=True"


@dataclass(frozen=True)
class AdmittedBatch:
    row_slots: list[int]  # pool slot per row, -1 without adapter
    meta: AdapterBatch | None  # None when no row has an adapter
    heads: dict[int, HeadSpec]  # slot -> head, for the slots of this batch that have one


class AdapterLifecycle:
    def __init__(self, target: TargetModel, pool: AdapterPool, config: EngineConfig):
        self.target, self.pool = target, pool
        self.registry = AdapterRegistry()
        mb = config.adapter_memory_mb
        self.tiers = AdapterTiers(pool, TierBudget(None if mb is None else int(mb * 2**20), config.max_cpu_adapters))
        self.store = AdapterStore(Path(config.adapter_store)) if config.adapter_store else None
        self.sources = AdapterSources(self.store, config.download_dir, int(config.max_download_mb * 2**20))
        self._keys = itertools.count(1)
        self._downloads_lock = threading.Lock()
        self._downloads: dict[int, AdapterFolder] = {}  # version key -> its downloaded folder, deleted with it

    def load(self, source: str | Path, name: str | None, tenant: str | None, pin: bool,
             overwrite_ok: bool = True) -> AdapterInfo:
        if name is not None:
            check_name(name)
        check_tenant(tenant)
        folder = self.sources.resolve(source)
        try:
            stamp = fingerprint(folder.path)
            spec = read_adapter(folder.path, self.target, name, folder.default_name)
            if name is None:  # a name from the files, folder or repo follows the rule a given name did above
                check_name(spec.name)
            if spec.ignored_modules:  # PEFT drops them too, with a warning of its own; said once, not at re-reads
                log.warning("adapter %s: ignoring the saved weights of %d modules its config does not target, e.g. %s",
                            folder.source, len(spec.ignored_modules), spec.ignored_modules[0])
            if spec.unserved_modules:
                log.warning("adapter %s: ignoring the saved weights of %s, which feed no output served here (no "
                            "head reads the pooler of a PEFT adapter)", folder.source, ", ".join(spec.unserved_modules))
            read = functools.partial(self._read_again, folder, spec.name, stamp)
            return self._publish(spec, tenant, pin, read, folder, overwrite_ok)
        except BaseException:
            self.sources.discard(folder)
            raise

    def average(self, name: str, sources: list[str], weights: list[float], tenant: str | None,
                combine_strategy: str, svd_rank: int | None, overwrite_ok: bool,
                normalize_weights: bool = True) -> AdapterInfo:
        check_name(name)
        check_tenant(tenant)
        for source in sources:  # an empty name would be a row without adapter in the lookup below
            check_name(source, "a source adapter name", "sources")
        twice = sorted(s for s, n in collections.Counter(sources).items() if n > 1)  # linear: sources are unbounded
        if twice:  # the library maps names to weights in a dict: the last weight alone would count
            raise InvalidRequest(f"sources name {', '.join(map(repr, twice))} more than once; give each adapter once, "
                                 "with the sum of its weights", "sources")
        given = list(weights)
        combine, weights = check_request(sources, weights, combine_strategy, svd_rank, normalize_weights)
        if not overwrite_ok and self.registry.own(name, tenant) is not None:  # the library's overwrite_ok=False,
            raise _name_taken(name, tenant, AVERAGE_REPLACES)  # checked again as it is published, for averages
            # racing to one name
        records = self.registry.acquire_rows(list(sources), [tenant] * len(sources))  # nothing frees them meanwhile
        try:
            specs = [self.tiers.host_spec(r.key) for r in records]
        finally:
            self._release(records)
        spec = average_specs(name, specs, weights, combine, svd_rank, self.target)
        try:
            spec.check_representable(self.pool.dtype)
        except InvalidAdapter as exc:  # each source fitted the serving dtype: the weights made the average overflow
            how = "normalised to sum to 1" if normalize_weights else "as given"
            raise InvalidRequest(f"with the weights {given} ({how}) the average overflows: {exc}", "weights") from None
        label = ", ".join(f"{s}*{w:g}" for s, w in zip(sources, given))
        kind = combine_strategy if normalize_weights else f"{combine_strategy}, weights as given"
        return self._publish(replace(spec, source=f"average[{kind}]({label})"), tenant, False, None, None,
                             overwrite_ok, AVERAGE_REPLACES)

    def unload(self, name: str, tenant: str | None) -> None:
        check_tenant(tenant)
        record, unused = self.registry.retire(name, tenant)
        if unused:
            self._free(record)

    def get(self, name: str, tenant: str | None) -> AdapterInfo:
        check_tenant(tenant)
        info = self._describe(self.registry.find(name, tenant))
        if info is None:  # unloaded and freed since the lookup
            raise AdapterNotFound(name, tenant)
        return info

    def infos(self, tenant: str | None) -> list[AdapterInfo]:
        check_tenant(tenant)
        infos = [self._describe(r) for r in self.registry.records(tenant)]
        return [info for info in infos if info is not None]  # None: unloaded and freed since the listing

    def catalog(self, base_model: str | None, method: str | None) -> list[CatalogEntry]:
        return self.store.catalog(base_model, method) if self.store is not None else []

    def ready(self, names: list[str | None], tenants: list[str | None], since: float | None = None) -> bool:
        """True when every named adapter can be served without reading files; otherwise starts reading the
        missing ones in the background (a scheduler can hold those requests and run others meanwhile)."""
        _check_tenants(tenants)
        records = [self.registry.find(n, t) for n, t in zip(names, tenants, strict=True) if n]
        return all([self.tiers.prefetch(r.key, since) for r in records])  # a list: start every read, not just the first

    @contextmanager
    def admit(self, names: list[str | None], tenants: list[str | None]) -> Iterator[AdmittedBatch]:
        """Acquires each row's version, brings it onto the device and yields the batch's slots and metadata;
        releases them on exit (freeing versions retired meanwhile once their last rows are done)."""
        with self.acquired(names, tenants) as records:
            yield self.place(records)

    @contextmanager
    def acquired(self, names: list[str | None], tenants: list[str | None]) -> Iterator[list[AdapterRecord | None]]:
        """Each row's current version, held until exit: batches placed from these records all use the same
        versions even if a name is re-loaded meanwhile (one request split into several batches)."""
        _check_tenants(tenants)
        records = self.registry.acquire_rows(names, tenants)
        try:
            yield records
        finally:
            self._release(records)

    def place(self, records: list[AdapterRecord | None]) -> AdmittedBatch:
        """Slots and metadata for rows of acquired versions (see `acquired`), bringing them onto the device."""
        keys = list(dict.fromkeys(r.key for r in records if r is not None))
        if not keys:
            return AdmittedBatch([-1] * len(records), None, {})
        return self.tiers.place(keys, functools.partial(self._batch, records))

    def _batch(self, records: list[AdapterRecord | None], slots: dict[int, int]) -> AdmittedBatch:
        row_slots = [slots[r.key] if r is not None else -1 for r in records]
        heads = {s: self.pool.heads[s] for s in set(row_slots) if s in self.pool.heads}
        return AdmittedBatch(row_slots, build_adapter_batch(row_slots, self.pool), heads)

    def _publish(self, spec: AdapterSpec, tenant: str | None, pin: bool, read: Callable[[], AdapterSpec] | None,
                 folder: AdapterFolder | None, overwrite_ok: bool, replacing: str = LOAD_REPLACES) -> AdapterInfo:
        """Places a validated version (the only steps that can still fail: values the serving dtype cannot hold,
        a pinned one finding no slot, or the name taken meanwhile without ``overwrite_ok``), then swaps it in
        under its name."""
        spec.check_representable(self.pool.dtype)
        head = spec.head
        info = AdapterInfo(spec.name, tenant, spec.method.value, folder.source if folder else spec.source,
                           spec.num_params, head.head_type.value if head else None, head.labels if head else (), -1)
        record = AdapterRecord(info, next(self._keys))
        entry = Residency(record, read, device_bytes(spec, self.pool.dtype), pin)

        def place(replaced: AdapterRecord | None) -> None:
            self.tiers.add(entry, spec, replaced.key if replaced is not None else None)
            if folder is not None and folder.owned:
                with self._downloads_lock:
                    self._downloads[record.key] = folder
        if overwrite_ok:
            if pin:  # it may evict the version it replaces: filed and swapped in one registry hold
                replaced, unused = self.registry.register(record, place)
            else:  # never evicts the version it replaces: lookups need not wait for its device copy
                place(self.registry.own(spec.name, tenant))
                replaced, unused = self.registry.register(record)
            if unused:
                self._free(replaced)
        else:
            place(None)
            if not self.registry.register_new(record):
                self._free(record)  # its slot or host copy, and the downloaded folder's entry
                raise _name_taken(spec.name, tenant, replacing)
        return self._describe(record) or replace(info, tier="source")  # None: already unloaded by another thread

    def _read_again(self, folder: AdapterFolder, name: str, stamp: tuple) -> AdapterSpec:
        """Reads an evicted version back; refuses files that changed since it was loaded (they would be
        another version under the same record)."""
        if not folder.path.is_dir():  # moved or unmounted for now: a later request reads it again
            raise AdapterSourceError(folder.source, f"its folder {str(folder.path)!r} is gone; the next request "
                                                    "tries again (or load it again from where it is now)")
        if fingerprint(folder.path) != stamp:
            raise AdapterSourceError(folder.source, "its files changed since it was loaded; load it again")
        return read_adapter(folder.path, self.target, name, folder.default_name)

    def _release(self, records: list[AdapterRecord | None]) -> None:
        for record in records:
            if record is not None and self.registry.release(record):
                self._free(record)
        self.tiers.released([r.key for r in records if r is not None])

    def _free(self, record: AdapterRecord) -> None:
        self.tiers.drop(record.key)
        with self._downloads_lock:
            folder = self._downloads.pop(record.key, None)
        if folder is not None:
            self.sources.discard(folder)

    def _describe(self, record: AdapterRecord) -> AdapterInfo | None:
        placed = self.tiers.describe(record.key)
        if placed is None:
            return None
        tier, slot, state, pinned = placed
        return replace(record.info, slot=slot, tier=tier, state=state, pinned=pinned)


def _check_tenants(tenants: list[str | None]) -> None:
    """Each row's tenant follows the name rule: "" would find only shared adapters, as no tenant does."""
    for tenant in tenants:
        check_tenant(tenant)


def _name_taken(name: str, tenant: str | None, replacing: str) -> AdapterNameTaken:
    """``replacing``: what it would take (AVERAGE_REPLACES, LOAD_REPLACES)."""
    owner = "shared" if tenant is None else f"for tenant {tenant!r}"
    return AdapterNameTaken(f"adapter {name!r} is already loaded ({owner}); {replacing}", "name")

"""Adapter names, tenants and reference counts; no tensors (`engine.adapters.tiers` owns those).

An adapter is keyed by (tenant, name); tenant None means shared with every tenant. A tenant's own
adapter shadows a shared one of the same name. Every load makes a new *version* (a record with its
own ``key``): re-loading a name swaps the record atomically and retires the old one.

``acquire`` at admission and ``release`` at completion keep a retired (unloaded or replaced)
version alive until its in-flight rows are done. Whether a retired version may be freed is decided
under the lock by whoever brings its count to zero (``retire``/``register`` or the last
``release``), so it is freed exactly once.
"""
import threading
from dataclasses import dataclass
from typing import Callable

from engine.errors import AdapterNotFound
from engine.types import AdapterInfo


@dataclass(eq=False)
class AdapterRecord:
    info: AdapterInfo  # what does not change while the version lives (tier and slot are filled in on listing)
    key: int  # this version's key in the tiers
    refs: int = 0  # rows in flight, across batches
    retired: bool = False


class AdapterRegistry:
    def __init__(self):
        self._lock = threading.Lock()
        self._records: dict[tuple[str | None, str], AdapterRecord] = {}

    def register(self, record: AdapterRecord,
                 place: Callable[[AdapterRecord | None], None] | None = None) -> tuple[AdapterRecord | None, bool]:
        """Makes ``record`` visible; returns the version it replaced (now retired) and whether to free it now.

        ``place(replaced)``, if given, files the new version first (it may raise: then nothing changes), under the
        same lock hold: a pinned swap may evict the version it replaces, and a batch that acquired that one in
        between found no slot to bring it back to. Every lookup waits meanwhile (a device copy), so only pinned
        swaps pass one."""
        info = record.info
        with self._lock:
            old = self._records.get((info.tenant, info.name))
            if place is not None:
                place(old)
            self._records[(info.tenant, info.name)] = record
            if old is None:
                return None, False
            old.retired = True
            return old, old.refs == 0

    def register_new(self, record: AdapterRecord) -> bool:
        """Makes ``record`` visible unless its tenant already has an adapter of that name (then False): the check
        and the insert under one lock hold, so of two racing callers only one gets the name."""
        key = (record.info.tenant, record.info.name)
        with self._lock:
            if key in self._records:
                return False
            self._records[key] = record
            return True

    def acquire_rows(self, names: list[str | None], tenants: list[str | None]) -> list[AdapterRecord | None]:
        """One record per row (None where no adapter is named), all taken under one lock hold so that a
        batch sees one registry state: two rows naming the same adapter always get the same version.
        Takes nothing when a name is unknown."""
        with self._lock:
            records = [self._find(name, tenant) if name else None for name, tenant in zip(names, tenants, strict=True)]
            for record in records:
                if record is not None:
                    record.refs += 1
            return records

    def release(self, record: AdapterRecord) -> bool:
        """Returns True when this release leaves a retired record unused: free it now (exactly once)."""
        with self._lock:
            record.refs -= 1
            return record.retired and record.refs == 0

    def retire(self, name: str, tenant: str | None) -> tuple[AdapterRecord, bool]:
        """Hides the adapter from new requests; returns it and whether it is unused (free it now)."""
        with self._lock:
            record = self._records.pop((tenant, name), None)
            if record is None:
                raise AdapterNotFound(name, tenant, shared=tenant is not None and (None, name) in self._records)
            record.retired = True
            return record, record.refs == 0

    def find(self, name: str, tenant: str | None) -> AdapterRecord:
        """The version visible to ``tenant`` (its own, else the shared one)."""
        with self._lock:
            return self._find(name, tenant)

    def own(self, name: str, tenant: str | None) -> AdapterRecord | None:
        """``tenant``'s own version of that name (None: shared), not a shared one it would fall back to."""
        with self._lock:
            return self._records.get((tenant, name))

    def lookup(self, name: str, tenant: str | None) -> AdapterInfo:
        return self.find(name, tenant).info

    def records(self, tenant: str | None = None) -> list[AdapterRecord]:
        """Versions visible to ``tenant`` (its own and shared); every one when tenant is None."""
        with self._lock:
            found = [r for (t, _), r in self._records.items() if tenant is None or t in (tenant, None)]
        return sorted(found, key=lambda r: (r.info.tenant or "", r.info.name))

    def _find(self, name: str, tenant: str | None) -> AdapterRecord:
        record = self._records.get((tenant, name)) or self._records.get((None, name))
        if record is None:
            # a caller without tenant (an operator) may learn which tenants hold that name; a tenant never does
            owners = sorted(t for t, n in self._records if n == name) if tenant is None else []
            raise AdapterNotFound(name, tenant, owners)
        return record

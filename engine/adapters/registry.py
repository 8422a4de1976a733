"""Adapter names, tenants and reference counts; no tensors (the pool owns those).

An adapter is keyed by (tenant, name); tenant None means shared with every tenant. A tenant's own
adapter shadows a shared one of the same name. ``acquire`` at admission and ``release`` at completion
keep a retired (unloaded or replaced) adapter's slot alive until its in-flight rows are done.
"""
import threading
from dataclasses import dataclass

from engine.errors import AdapterNotFound
from engine.types import AdapterInfo


@dataclass
class AdapterRecord:
    info: AdapterInfo
    refs: int = 0
    retired: bool = False


class AdapterRegistry:
    def __init__(self):
        self._lock = threading.Lock()
        self._records: dict[tuple[str | None, str], AdapterRecord] = {}

    def register(self, info: AdapterInfo) -> AdapterRecord | None:
        """Makes ``info`` visible; returns the record it replaced (now retired) if any."""
        with self._lock:
            old = self._records.get((info.tenant, info.name))
            self._records[(info.tenant, info.name)] = AdapterRecord(info)
            if old is not None:
                old.retired = True
            return old

    def acquire(self, name: str, tenant: str | None) -> AdapterRecord:
        with self._lock:
            record = self._find(name, tenant)
            record.refs += 1
            return record

    def release(self, record: AdapterRecord) -> bool:
        """Returns True when the record is retired and no longer used: its slot may be freed now."""
        with self._lock:
            record.refs -= 1
            return record.retired and record.refs == 0

    def retire(self, name: str, tenant: str | None) -> AdapterRecord:
        """Hides the adapter from new requests; the caller frees its slot once ``refs`` is 0."""
        with self._lock:
            if (tenant, name) not in self._records:
                raise AdapterNotFound(name, tenant)
            record = self._records.pop((tenant, name))
            record.retired = True
            return record

    def lookup(self, name: str, tenant: str | None) -> AdapterInfo:
        with self._lock:
            return self._find(name, tenant).info

    def list(self, tenant: str | None = None) -> list[AdapterInfo]:
        """Adapters visible to ``tenant`` (its own and shared); every adapter when tenant is None."""
        with self._lock:
            return sorted((r.info for (t, _), r in self._records.items() if tenant is None or t in (tenant, None)),
                          key=lambda info: (info.tenant or "", info.name))

    def _find(self, name: str, tenant: str | None) -> AdapterRecord:
        record = self._records.get((tenant, name)) or self._records.get((None, name))
        if record is None:
            raise AdapterNotFound(name, tenant)
        return record

"""Typed engine errors. The gRPC layer maps each class to one status code, in one place.

Every message names the thing at fault (adapter, file, key, parameter) so a user can fix it.
"""


class AdapterServeError(Exception):
    """Base class of every error the engine raises on purpose."""


class ModelLoadError(AdapterServeError):
    """The base model cannot be resolved, read or matched to our model code."""


class InvalidAdapter(AdapterServeError):
    """An adapter folder is corrupt or does not fit the base model (bad JSON, keys, shapes, values)."""

    def __init__(self, source: str, detail: str, key: str | None = None):
        self.source, self.detail, self.key = source, detail, key
        where = f" [{key}]" if key else ""
        super().__init__(f"invalid adapter {source}{where}: {detail}")


class UnsupportedAdapter(AdapterServeError):
    """A valid adapter whose method or option the engine does not serve (yet)."""

    def __init__(self, source: str, detail: str):
        self.source, self.detail = source, detail
        super().__init__(f"unsupported adapter {source}: {detail}")


class AdapterNotFound(AdapterServeError):
    """No adapter of that name is visible to the caller's tenant."""

    def __init__(self, name: str, tenant: str | None = None):
        self.name, self.tenant = name, tenant
        scope = f" for tenant {tenant!r}" if tenant else ""
        super().__init__(f"adapter {name!r} is not loaded{scope}")


class AdapterCapacityExceeded(AdapterServeError):
    """Every device slot holds an adapter in use; nothing can be evicted now."""


class InvalidRequest(AdapterServeError):
    """A request's own parameters are wrong (shapes, lengths, missing head for the task)."""

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

    def __init__(self, name: str, tenant: str | None = None, owners: list[str] | None = None, shared: bool = False):
        self.name, self.tenant = name, tenant
        scope = f" for tenant {tenant!r}" if tenant else ""
        hint = f" as a shared adapter; tenant {', '.join(map(repr, owners))} has one: pass its tenant" if owners else ""
        if shared:  # unloading: the name the tenant uses is the shared adapter, which only an operator may unload
            hint = " (the shared adapter of that name is: an operator unloads it, without tenant)"
        super().__init__(f"adapter {name!r} is not loaded{scope}{hint}")


class AdapterCapacityExceeded(AdapterServeError):
    """Every device slot (or the adapter_memory_mb budget) is taken by adapters in use or pinned, so nothing
    can be evicted now; or an adapter is larger than the whole device budget."""


class AdapterLoadsBusy(AdapterServeError):
    """Too many adapter loads or reads are under way at once (LoadAdapter and AverageAdapters calls, reads from the
    store on first use), or no thread could be started for one: try again shortly."""


class AdapterSourceError(AdapterServeError):
    """An adapter source cannot be resolved or fetched: no such folder, URL or hub repo, not in the offline
    cache, an I/O error while reading or downloading, fsspec not installed, or files changed since loading."""

    def __init__(self, source: str, detail: str):
        self.source, self.detail = source, detail
        super().__init__(f"adapter source {source}: {detail}")


class AdapterSourceRefused(AdapterServeError):
    """A source refused by policy, before anything of it becomes visible: a path that leads outside the
    adapter store's root, or a download larger than ``max_download_mb``."""

    def __init__(self, source: str, detail: str):
        self.source, self.detail = source, detail
        super().__init__(f"adapter source {source} refused: {detail}")


class InvalidRequest(AdapterServeError):
    """A request's own parameters are wrong (shapes, lengths, missing head for the task)."""

    def __init__(self, message: str, field: str | None = None):
        self.field = field  # the request field at fault, for gRPC BadRequest details
        super().__init__(message)


class AdapterNameTaken(InvalidRequest):
    """A load or average without overwrite_ok found the name already loaded for its tenant."""


class ReplyTooLarge(AdapterServeError):
    """A reply would exceed the server's message limit (gRPC RESOURCE_EXHAUSTED); a smaller request fits."""


class Unauthenticated(AdapterServeError):
    """No API key, or one that is not in the key file."""


class PermissionDenied(AdapterServeError):
    """A valid key whose role or tenant does not allow this call."""


class ShuttingDown(AdapterServeError):
    """The server is draining after SIGTERM and takes no new work."""


class NotImplementedYet(AdapterServeError):
    """A call the API declares that this server does not provide yet (gRPC UNIMPLEMENTED)."""

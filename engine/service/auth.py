"""API keys: a JSON file of SHA-256 hashes, each mapped to a tenant and a role; checked per call.

File format (plaintext keys are never stored)::

    {"keys": [{"sha256": "<hex of sha256(key)>", "tenant": "acme", "role": "inference"},
              {"sha256": "...", "tenant": null, "role": "admin"}]}

``tenant`` null means not bound to one tenant (an operator). An ``admin`` key may also call inference.
Keys arrive as ``authorization: Bearer <key>`` metadata. With auth off every caller is an operator (it may
load from server paths) and picks a tenant with the request's tenant field or ``x-tenant-id`` metadata.
The file is read again when it changes (a rotated Kubernetes Secret), looked at no more than once per
``RELOAD_CHECK_S``; a changed file that cannot be read keeps the keys in use. The file is looked at on a worker
thread that a call waits for only ``RELOAD_WAIT_S``: a read stalled on its mount (NFS, a hung CSI driver) leaves
the keys in use instead of holding the event loop, and with it every call and health check.
"""
import hashlib
import hmac
import json
import logging
import os
import stat
import threading
import time
from dataclasses import dataclass
from enum import Enum
from pathlib import Path

from engine.errors import InvalidRequest, PermissionDenied, Unauthenticated
from engine.names import check_tenant

log = logging.getLogger("adapterserve.auth")
RELOAD_CHECK_S = 1.0
RELOAD_WAIT_S = 0.2  # a local read takes microseconds, so a rotation still applies to the call that sees it


class Role(Enum):
    INFERENCE = "inference"
    ADMIN = "admin"


@dataclass(frozen=True)
class Principal:
    tenant: str | None  # None: an operator, not bound to a tenant
    role: Role

    def check_role(self, needed: Role) -> None:
        if needed == Role.ADMIN and self.role != Role.ADMIN:
            raise PermissionDenied("this call needs an admin key")

    def scope(self, requested: str | None) -> str | None:
        """The tenant a call acts for: a tenant-bound key may only act for its own tenant."""
        if self.tenant is None:
            return requested
        if requested not in (None, self.tenant):
            raise PermissionDenied(f"this key belongs to tenant {self.tenant!r}, not {requested!r}")
        return self.tenant


@dataclass(frozen=True)
class KeyEntry:
    digest: bytes
    principal: Principal


def hash_key(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()


class Authenticator:
    def __init__(self, entries: tuple[KeyEntry, ...] | None, path: Path | None = None):
        self.entries = entries  # None: auth off
        self.path = path  # the key file, watched for changes
        self._stamp, self._checked, self._lock = _stamp(path), time.monotonic(), threading.Lock()
        self._reload: threading.Thread | None = None  # the last look at the file, on a worker thread

    @property
    def enabled(self) -> bool:
        return self.entries is not None

    @classmethod
    def from_file(cls, path: str | Path | None) -> "Authenticator":
        return cls(None) if path is None else cls(_read_keys(Path(path)), Path(path))

    def authenticate(self, metadata: dict[str, str]) -> Principal:
        if self.entries is None:
            return Principal(None, Role.ADMIN)  # an operator: `x-tenant-id` picks the tenant (RpcContext.tenant)
        self._reload_if_changed()
        header = metadata.get("authorization", "")
        if not header.lower().startswith("bearer ") or not header[7:].strip():
            raise Unauthenticated("missing API key: send 'authorization: Bearer <key>' metadata")
        digest = hashlib.sha256(header[7:].strip().encode()).digest()
        for entry in self.entries:
            if hmac.compare_digest(entry.digest, digest):
                return entry.principal
        raise Unauthenticated("unknown API key")

    def log_keys(self, what: str) -> None:
        """``what``: N keys; a warning when there are none (valid JSON, and every call is refused)."""
        none = not self.entries
        log.log(logging.WARNING if none else logging.INFO, "%s: %d API keys%s", what, len(self.entries),
                "; every call will be refused" if none else "")

    def _reload_if_changed(self) -> None:
        now = time.monotonic()
        if self.path is None or now - self._checked < RELOAD_CHECK_S:
            return
        with self._lock:
            if self._reload is not None and self._reload.is_alive():
                return  # the last look at the file has not come back (a stalled mount): keep the keys in use
            self._checked = now
            self._reload = reload = threading.Thread(target=self._read_if_changed, name="api-key-reload", daemon=True)
            reload.start()
        reload.join(RELOAD_WAIT_S)

    def _read_if_changed(self) -> None:
        stamp = _stamp(self.path)
        if stamp == self._stamp:
            return
        self._stamp = stamp  # a bad file is reported once, not on every check
        try:
            self.entries = _read_keys(self.path)
            self.log_keys(f"API key file {self.path} changed")
        except ValueError as exc:
            log.error("%s; keeping the %d keys in use", exc, len(self.entries))


def _read_keys(path: Path) -> tuple[KeyEntry, ...]:
    try:
        data = json.loads(_regular_file_text(path))
        entries = tuple(KeyEntry(bytes.fromhex(k["sha256"]), Principal(k.get("tenant"), Role(k["role"])))
                        for k in data["keys"])
        principals: dict[bytes, Principal] = {}
        for entry in entries:
            check_tenant(entry.principal.tenant, "a key's tenant")
            if len(entry.digest) != hashlib.sha256().digest_size:  # it could never match: a typo, say so
                raise ValueError(f"a sha256 holds 64 hex digits, got {entry.digest.hex()!r}")
            if principals.setdefault(entry.digest, entry.principal) != entry.principal:
                raise ValueError(f"the key {entry.digest.hex()[:12]}... is listed twice, with different tenants or "
                                 "roles")
        return entries
    except (OSError, ValueError, KeyError, TypeError, InvalidRequest) as exc:
        raise ValueError(f"cannot read API key file {path}: {exc}") from exc


def _regular_file_text(path: Path) -> str:
    """The file's text, opened without blocking and refused unless a regular file: a FIFO put in its place
    blocked the read, on the event loop, and every call and health check with it (found by a probe). A
    UTF-8 byte-order mark is allowed (editors on Windows write one)."""
    fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK)
    with os.fdopen(fd, "rb") as file:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise ValueError("it is not a regular file")
        return file.read().decode("utf-8-sig")


def _stamp(path: Path | None) -> tuple | None:
    """What changes when the file is rewritten or a Secret's symlinked copy is swapped; None if unreadable."""
    if path is None:
        return None
    try:
        info = os.stat(path)
    except OSError:
        return None
    return info.st_ino, info.st_mtime_ns, info.st_size

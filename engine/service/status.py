"""Typed engine errors -> gRPC status codes with google.rpc details. The only place that decides codes.

Every status carries ErrorInfo(reason, domain, metadata); bad requests add BadRequest field violations,
retryable overloads add RetryInfo. Unknown exceptions become INTERNAL without leaking internals.
"""
import logging
import re
from dataclasses import dataclass

import grpc
from google.protobuf import any_pb2, duration_pb2
from google.rpc import code_pb2, error_details_pb2, status_pb2
from grpc_status import rpc_status

from engine.errors import (AdapterCapacityExceeded, AdapterLoadsBusy, AdapterNotFound, AdapterServeError,
                           AdapterSourceError, AdapterSourceRefused, InvalidAdapter, InvalidRequest, ModelLoadError,
                           NotImplementedYet, PermissionDenied, ReplyTooLarge, ShuttingDown, Unauthenticated,
                           UnsupportedAdapter)
from engine.scheduler import DeadlineExpired, QueueFull

DOMAIN = "adapterserve.dev"
log = logging.getLogger("adapterserve.service")


@dataclass(frozen=True)
class Mapping:
    code: grpc.StatusCode
    reason: str
    retry_s: float | None = None  # RetryInfo for transient overloads


# most specific first: the first matching class wins
MAPPINGS: tuple[tuple[type[Exception], Mapping], ...] = (
    (AdapterNotFound, Mapping(grpc.StatusCode.NOT_FOUND, "ADAPTER_NOT_FOUND")),
    (InvalidRequest, Mapping(grpc.StatusCode.INVALID_ARGUMENT, "INVALID_REQUEST")),
    (InvalidAdapter, Mapping(grpc.StatusCode.FAILED_PRECONDITION, "ADAPTER_INVALID")),
    (UnsupportedAdapter, Mapping(grpc.StatusCode.FAILED_PRECONDITION, "ADAPTER_UNSUPPORTED")),
    (AdapterSourceRefused, Mapping(grpc.StatusCode.INVALID_ARGUMENT, "ADAPTER_SOURCE_REFUSED")),
    (AdapterSourceError, Mapping(grpc.StatusCode.FAILED_PRECONDITION, "ADAPTER_SOURCE_UNAVAILABLE")),
    (AdapterCapacityExceeded, Mapping(grpc.StatusCode.RESOURCE_EXHAUSTED, "ADAPTER_SLOTS_EXHAUSTED", 1.0)),
    (AdapterLoadsBusy, Mapping(grpc.StatusCode.RESOURCE_EXHAUSTED, "ADAPTER_LOADS_BUSY", 1.0)),
    (QueueFull, Mapping(grpc.StatusCode.RESOURCE_EXHAUSTED, "QUEUE_FULL", 0.1)),
    (ReplyTooLarge, Mapping(grpc.StatusCode.RESOURCE_EXHAUSTED, "REPLY_TOO_LARGE")),
    (DeadlineExpired, Mapping(grpc.StatusCode.DEADLINE_EXCEEDED, "DEADLINE_EXCEEDED")),
    (Unauthenticated, Mapping(grpc.StatusCode.UNAUTHENTICATED, "API_KEY_INVALID")),
    (PermissionDenied, Mapping(grpc.StatusCode.PERMISSION_DENIED, "PERMISSION_DENIED")),
    (ShuttingDown, Mapping(grpc.StatusCode.UNAVAILABLE, "SERVER_SHUTTING_DOWN", 1.0)),
    (ModelLoadError, Mapping(grpc.StatusCode.FAILED_PRECONDITION, "MODEL_LOAD_FAILED")),
    (NotImplementedYet, Mapping(grpc.StatusCode.UNIMPLEMENTED, "NOT_IMPLEMENTED")),
    (AdapterServeError, Mapping(grpc.StatusCode.FAILED_PRECONDITION, "ENGINE_REFUSED")),
)
INTERNAL = Mapping(grpc.StatusCode.INTERNAL, "ENGINE_ERROR")
MAX_MESSAGE_BYTES = 1000  # x3 percent-encoded + 2 x 4/3 base64 copies: ~5.7 KB, within gRPC's 8 KB trailers
MAX_NAME_BYTES = 300  # an adapter name or tenant echoed in the details (names hold at most 256 characters)


def mapping_for(exc: Exception) -> Mapping:
    for cls, mapping in MAPPINGS:
        if isinstance(exc, cls):
            return mapping
    return INTERNAL


# An absolute server path in a message: "/" at the start of a word (not in a URL's "//", nor in "org/name"), up to
# a space or punctuation; a quoted one (repr or '...' in our messages) whole, spaces and colons included
SERVER_PATH = re.compile(r"(?<![\w:/.~])/[^\s'\"()\[\],;:]+")
QUOTED_SERVER_PATH = re.compile(r"(?<![\w])(?:(')/[^'\n]*'|(\")/[^\"\n]*\")")
PATH_TAIL = r"[^\s'\"()\[\],;:]*"  # what may follow a known path in a message: a file inside it


def hide_server_paths(text: str, exc: Exception) -> str:
    """``text`` with absolute server paths replaced by "<server path>". The error's own ``source``, when it is a
    path, is replaced exactly first (with any file path below it): a folder named with spaces or colons is not cut
    in two by the generic pattern, which ends a path at the first of them."""
    source = getattr(exc, "source", None)
    if isinstance(source, str) and source.startswith("/") and source.strip("/"):
        text = re.sub(re.escape(source.rstrip("/")) + PATH_TAIL, lambda _: "<server path>", text)
    text = QUOTED_SERVER_PATH.sub(lambda m: (q := m[1] or m[2]) + "<server path>" + q, text)
    return SERVER_PATH.sub("<server path>", text)


def to_status(exc: Exception, request_id: str, hide_paths: bool = False) -> grpc.Status:
    """The status for ``exc``; messages of unknown errors are replaced (they may hold internals). With
    ``hide_paths`` (a tenant's key) absolute server paths in the message read "<server path>": a shared adapter's
    folder, the store's or the hub cache's place are the operator's business."""
    mapping = mapping_for(exc)
    text = hide_server_paths(str(exc), exc) if hide_paths else str(exc)
    message = _cut(text) if mapping is not INTERNAL else f"internal error (request {request_id}); see server logs"
    info = error_details_pb2.ErrorInfo(reason=mapping.reason, domain=DOMAIN, metadata={"requestId": request_id})
    details = [info]
    if isinstance(exc, AdapterNotFound):  # the name as asked for: a 5000-character one overflowed the trailers too
        name = _cut(exc.name, MAX_NAME_BYTES)
        info.metadata["adapterId"] = name
        details.append(error_details_pb2.ResourceInfo(resource_type="adapter", resource_name=name,
                                                      owner=_cut(exc.tenant or "", MAX_NAME_BYTES),
                                                      description=message))
    if isinstance(exc, InvalidRequest):
        violation = error_details_pb2.BadRequest.FieldViolation(field=exc.field or "", description=message)
        details.append(error_details_pb2.BadRequest(field_violations=[violation]))
    if mapping.retry_s is not None:
        delay = duration_pb2.Duration(seconds=int(mapping.retry_s), nanos=int(mapping.retry_s % 1 * 1e9))
        details.append(error_details_pb2.RetryInfo(retry_delay=delay))
    code = getattr(code_pb2, mapping.code.name)
    return rpc_status.to_status(status_pb2.Status(code=code, message=message, details=[_pack(d) for d in details]))


def _cut(message: str, limit: int = MAX_MESSAGE_BYTES) -> str:
    """The message within ``limit`` bytes of UTF-8 (a lone surrogate, from a JSON string, as "?"). It travels in
    the trailers up to three times (grpc-message, percent-encoded, and the details: ErrorInfo's status, BadRequest
    or ResourceInfo, base64), and trailers over gRPC's 8 KB metadata limit reach the client as RESOURCE_EXHAUSTED
    "Stream removed" instead of this status. Messages echo what was sent (a path, a label2id), so one can be as
    long as the request."""
    data = message.encode(errors="replace")
    if len(data) <= limit:
        return data.decode()
    kept = data[:limit].decode(errors="ignore")  # a character cut in two is dropped
    return f"{kept}... ({len(message) - len(kept)} more characters)"


def _pack(message) -> any_pb2.Any:
    packed = any_pb2.Any()
    packed.Pack(message)
    return packed

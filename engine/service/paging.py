"""Pages of ListAdapters (Google's AIP-158: page_size, page_token, next_page_token).

The listing grows with every adapter loaded and every store folder: past gRPC's message limit the whole reply
failed, for every caller at once, and `adapterserve list` with it. Pages are cut by key, not by offset, so an
adapter loaded or unloaded between two pages neither repeats nor hides another. The token is opaque to
clients: URL-safe base64 of the last keys served and of the request it continues.
"""
import base64
import binascii
import json
from dataclasses import dataclass
from typing import Callable, Sequence, TypeVar

from engine.errors import InvalidRequest

MAX_PAGE_SIZE = 1000
Item = TypeVar("Item")
Key = list[str]  # JSON-friendly sort key: [tenant, name] for adapters, [name] for catalog entries


@dataclass(frozen=True)
class Cursor:
    # what a token continues: [tenant (as resolved, header included; None: all), include_catalog, omit_adapters]
    listing: list
    adapters_after: Key | None  # sort key of the last adapter served; None before the first page
    catalog_after: Key | None


def page_size(requested: int) -> int | None:
    """The number of items per page, or None for the whole listing in one reply."""
    if requested < 0:
        raise InvalidRequest(f"page_size must be 0 (everything) or positive, got {requested}", "page_size")
    return min(requested, MAX_PAGE_SIZE) or None


def read_token(token: str, listing: list) -> Cursor:
    if not token:
        return Cursor(listing, None, None)
    try:
        fields = json.loads(base64.urlsafe_b64decode(token.encode("ascii")))
        cursor = Cursor(fields["listing"], fields["adapters_after"], fields["catalog_after"])
    except (ValueError, UnicodeError, binascii.Error, KeyError, TypeError, RecursionError):  # "[[[[..." nests deep
        raise InvalidRequest("page_token is not one this server handed out", "page_token") from None
    if not all(after is None or (isinstance(after, list) and all(isinstance(k, str) for k in after))
               for after in (cursor.adapters_after, cursor.catalog_after)):
        raise InvalidRequest("page_token is not one this server handed out", "page_token")
    if cursor.listing != listing:
        raise InvalidRequest("page_token continues a listing with another tenant, include_catalog or omit_adapters",
                             "page_token")
    return cursor


def write_token(cursor: Cursor) -> str:
    fields = {"listing": cursor.listing, "adapters_after": cursor.adapters_after, "catalog_after": cursor.catalog_after}
    return base64.urlsafe_b64encode(json.dumps(fields, separators=(",", ":")).encode()).decode("ascii")


def cut(items: Sequence[Item], key: Callable[[Item], Key], after: Key | None,
        size: int | None) -> tuple[list[Item], Key | None, bool]:
    """(the page: up to ``size`` items whose key follows ``after``, the key of its last item, whether more follow)."""
    rest = sorted((item for item in items if after is None or key(item) > after), key=key)
    page = rest if size is None else rest[:size]
    return page, key(page[-1]) if page else after, len(page) < len(rest)


def smaller_pages(request) -> str:
    """What to ask for instead of a listing reply over the message limit (`engine.service.rpc.rpc`'s ``smaller``)."""
    return "a smaller page_size" if request.page_size > 0 else "pages (page_size)"

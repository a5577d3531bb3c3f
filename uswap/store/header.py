"""The store header in slot 0: marks a file as a uswap store so that a
mistyped --backing never overwrites someone's data (mkswap's signature plays
the same role for kernel swap)."""
from __future__ import annotations

import json

from uswap import native
from uswap.store.base import Store

MAGIC = b"USWAP-STORE\n"
PAGE = 4096


def check_existing(first_page: bytes, url: str) -> None:
    """A store file that already held bytes before we opened it must carry our
    header; anything else (text, an image whose first pages are zeros...) is
    someone's data. Called by each store before it resizes anything."""
    if not first_page.startswith(MAGIC):
        raise ValueError(
            f"backing: {url} already holds data that is not a uswap store;"
            " refusing to overwrite it (remove it or choose another path)")


def claim(store: Store) -> None:
    """Refuse a store whose first page is neither zeros nor a uswap header,
    then write our header. Raises ValueError."""
    buf = native.AlignedBuffer(PAGE)
    try:
        store.read(buf.addr, PAGE, 0)
        first = bytes(buf.view())
        if any(first) and not first.startswith(MAGIC):
            raise ValueError(
                f"backing: {store.url} already holds data that is not a uswap store;"
                " refusing to overwrite it (remove it or choose another path)")
        body = MAGIC + json.dumps({"version": 1, "size_bytes": store.size_bytes}).encode() + b"\n"
        view = buf.view()
        view[:] = b"\0" * PAGE
        view[:len(body)] = body
        store.write(buf.addr, PAGE, 0)
    finally:
        buf.free()

"""The store header in slot 0: marks a file as a uswap store so that a
mistyped --backing never overwrites someone's data (mkswap's signature plays
the same role for kernel swap)."""
from __future__ import annotations

import json
import uuid

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


def claim(store: Store) -> str:
    """Refuse a store whose first page is neither zeros nor a uswap header,
    then write our header; return the store's id: the one its header holds
    (the store a daemon's state directory belongs to, statedir.py), or a
    new one for a new store. Raises ValueError."""
    buf = native.AlignedBuffer(PAGE)
    try:
        store.read(buf.addr, PAGE, 0)
        first = bytes(buf.view())
        if any(first) and not first.startswith(MAGIC):
            raise ValueError(
                f"backing: {store.url} already holds data that is not a uswap store;"
                " refusing to overwrite it (remove it or choose another path)")
        store_id = _held_id(first) or uuid.uuid4().hex
        body = MAGIC + json.dumps({"version": 1, "size_bytes": store.size_bytes, "id": store_id}).encode() + b"\n"
        view = buf.view()
        view[:] = b"\0" * PAGE
        view[:len(body)] = body
        store.write(buf.addr, PAGE, 0)
    finally:
        buf.free()
    return store_id


def _held_id(first_page: bytes) -> str | None:
    """The id in a uswap header, if it has one (headers before ids had none)."""
    if not first_page.startswith(MAGIC):
        return None
    line = first_page[len(MAGIC):].split(b"\n", 1)[0]
    try:
        held = json.loads(line)
    except ValueError:
        return None
    return held.get("id") if isinstance(held, dict) and isinstance(held.get("id"), str) else None

"""Byte sizes as users write them: 4096, 64M, 1G, 512MiB, 2k."""
from __future__ import annotations

import re

_UNITS = {"": 1, "k": 1 << 10, "m": 1 << 20, "g": 1 << 30, "t": 1 << 40}
_SIZE_RE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([kmgt]?)(?:i?b)?\s*$", re.IGNORECASE)
ACCEPTED = "a byte count or a number with K, M, G or T (KiB, MiB, ... alike; powers of 1024), e.g. 4096, 64M, 1G, 512MiB"


def parse_size(value: object, what: str = "size") -> int:
    """Parse a size; raise ValueError naming `what`, the value and the accepted form."""
    if isinstance(value, bool):
        raise ValueError(f"{what}: {value!r} is not a size; use {ACCEPTED}")
    if isinstance(value, int):
        if value < 0:
            raise ValueError(f"{what}: {value!r} is negative; use {ACCEPTED}")
        return value
    if not isinstance(value, str):
        raise ValueError(f"{what}: {value!r} is not a size; use {ACCEPTED}")
    m = _SIZE_RE.match(value)
    if not m:
        raise ValueError(f"{what}: {value!r} is not a size; use {ACCEPTED}")
    number, unit = m.groups()
    nbytes = float(number) * _UNITS[unit.lower()]
    if nbytes != int(nbytes):
        raise ValueError(f"{what}: {value!r} is not a whole number of bytes; use {ACCEPTED}")
    return int(nbytes)


def format_size(nbytes: int) -> str:
    for unit, scale in (("GiB", 1 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)):
        if nbytes >= scale:
            return f"{nbytes / scale:.1f} {unit}"
    return f"{nbytes} B"

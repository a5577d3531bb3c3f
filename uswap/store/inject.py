"""Fault injection around a real store, for tests (USWAP_INJECT in the daemon's
environment, changed at run time with the socket's `inject` op).

It wraps a real store and passes every call through, adding delays and
failures on demand, and it checks invariant 3 from the outside: it records
the writes in flight per slot offset and counts any second write to an
offset that already has one in flight, and any read of it.

Spec keys (all optional): write_delay, read_delay (seconds), fail_writes
(list of errno names, cycled, while non-empty), fail_reads (likewise),
corrupt_reads (bool: flip a byte of every read).
"""
from __future__ import annotations

import errno
import logging
import threading
import time

from uswap.store.base import NativeIo, Store

log = logging.getLogger("uswap.inject")
PAGE = 4096


class InjectingStore(Store):
    def __init__(self, inner: Store, spec: dict) -> None:
        self.inner = inner
        self.url = inner.url
        self.size_bytes = inner.size_bytes
        self.alignment = inner.alignment
        self.late_writes_possible = inner.late_writes_possible
        self.lock = threading.Lock()
        self.inflight_writes: dict[int, int] = {}
        self.stats = {"writes": 0, "reads": 0, "injected_write_errors": 0,
                      "injected_read_errors": 0, "overlapping_writes": 0,
                      "reads_during_write": 0, "max_inflight_writes": 0}
        self.spec: dict = {}
        self._fail_idx = 0
        self.update(spec)

    def update(self, spec: dict) -> None:
        if not isinstance(spec, dict):
            raise ValueError(f"inject: spec {spec!r} is not an object")
        for key in ("fail_writes", "fail_reads"):
            names = spec.get(key, [])
            if not isinstance(names, list) or not all(isinstance(n, str) for n in names):
                raise ValueError(f"inject: {key}: {names!r} is not a list of errno names")
        allowed = {"write_delay", "read_delay", "fail_writes", "fail_reads", "corrupt_reads"}
        unknown = set(spec) - allowed
        if unknown:
            raise ValueError(f"inject: unknown keys {sorted(unknown)}; known: {sorted(allowed)}")
        for key in ("fail_writes", "fail_reads"):
            for name in spec.get(key, []):
                if not isinstance(getattr(errno, str(name), None), int):
                    raise ValueError(f"inject: {key}: {name!r} is not an errno name like EIO")
        with self.lock:
            self.spec.update(spec)

    def _maybe_fail(self, key: str, stat: str, offset: int) -> None:
        with self.lock:
            names = self.spec.get(key) or []
            if not names:
                return
            name = names[self._fail_idx % len(names)]
            self._fail_idx += 1
            self.stats[stat] += 1
        code = getattr(errno, name)
        raise OSError(code, f"injected {name} at store offset {offset}")

    def write(self, addr: int, length: int, offset: int) -> None:
        pages = range(offset // PAGE, (offset + length) // PAGE)
        with self.lock:
            for p in pages:
                if self.inflight_writes.get(p):
                    self.stats["overlapping_writes"] += 1
                    log.error("invariant 3 broken: second write to store offset %d while one is in flight", p * PAGE)
                self.inflight_writes[p] = self.inflight_writes.get(p, 0) + 1
            self.stats["writes"] += 1
            self.stats["max_inflight_writes"] = max(self.stats["max_inflight_writes"],
                                                    sum(1 for v in self.inflight_writes.values() if v))
            delay = self.spec.get("write_delay", 0)
        try:
            if delay:
                time.sleep(delay)
            self._maybe_fail("fail_writes", "injected_write_errors", offset)
            self.inner.write(addr, length, offset)
        finally:
            with self.lock:
                for p in pages:
                    self.inflight_writes[p] -= 1
                    if not self.inflight_writes[p]:
                        del self.inflight_writes[p]

    def read(self, addr: int, length: int, offset: int) -> None:
        with self.lock:
            self.stats["reads"] += 1
            if any(self.inflight_writes.get(p) for p in range(offset // PAGE, (offset + length) // PAGE)):
                self.stats["reads_during_write"] += 1
            delay = self.spec.get("read_delay", 0)
            corrupt = self.spec.get("corrupt_reads", False)
        if delay:
            time.sleep(delay)
        self._maybe_fail("fail_reads", "injected_read_errors", offset)
        self.inner.read(addr, length, offset)
        if corrupt:
            from uswap import native
            view = native.buffer_at(addr, length)
            view[0] ^= 0xFF

    def native_io(self) -> NativeIo | None:
        """None, whatever the inner store declares: the delays, failures and
        invariant checks happen here, in Python, and native code that went
        to the inner store directly would skip them."""
        return None

    def close(self) -> None:
        self.inner.close()

    def describe(self) -> dict:
        d = self.inner.describe()
        with self.lock:
            d["inject"] = dict(self.stats, spec=dict(self.spec))
        return d

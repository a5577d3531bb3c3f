"""Store.native_io: each store declares whether native code (the C I/O pool,
the fault fast path) may do its I/O without calling its Python methods, and
those components serve exactly the stores that declare it.

Real stores only: an O_DIRECT file in the test's tmp dir and a file on the
session's NFS server (the `backing` fixture gives one of each). The
"subclass" stores are real FileStore / NfsStore subclasses opened on them.
"""
from __future__ import annotations

import os
import uuid

import numpy as np
import pytest

from tests.harness import wait_for
from uswap import native
from uswap.daemon.cpool import CPool
from uswap.daemon.fastpath import FastPath
from uswap.store import header
from uswap.store.base import NativeIo
from uswap.store.file import FileStore
from uswap.store.inject import InjectingStore
from uswap.store.nfs import NfsStore

PAGE = 4096
SIZE = 1 << 20


def store_class(backing: str) -> type:
    return NfsStore if backing.startswith("nfs://") else FileStore


class ReadCounter:
    """A mixin that puts Python in a store's reads (as a test double of the
    store would): a store with it must not be read around by native code."""

    def read(self, addr: int, length: int, offset: int) -> None:
        self.reads = getattr(self, "reads", 0) + 1
        super().read(addr, length, offset)


class WriteCounter:
    def write(self, addr: int, length: int, offset: int) -> None:
        self.writes = getattr(self, "writes", 0) + 1
        super().write(addr, length, offset)


@pytest.fixture
def opened():
    """Factory: opened(cls, backing) -> cls.open(backing, SIZE), with the
    store header written (so the same backing opens again); all closed at
    teardown."""
    stores = []

    def open_(cls, backing):
        store = cls.open(backing, SIZE)
        stores.append(store)
        header.claim(store)
        return store

    yield open_
    for store in stores:
        store.close()


@pytest.fixture
def eventfd():
    fd = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
    yield fd
    os.close(fd)


def native_write_read(pool: CPool, store, offset: int) -> bytes:
    """Write one page through the C pool, then read it back through the
    store's own read; returns what was read."""
    src = native.AlignedBuffer(PAGE)
    dst = native.AlignedBuffer(PAGE)
    try:
        src.view()[:] = bytes(range(256)) * (PAGE // 256)
        sums, zero = np.zeros(1, np.uint32), np.zeros(1, np.uint8)
        done = []
        # nfs://: False until the store has connected a lent context.
        wait_for("the C pool to take the write",
                 lambda: pool.sum_write(src.addr, PAGE, offset, sums, zero,
                                        lambda result, err: done.append(err)), 20)

        def finished():
            for on_done, result, err in pool.completions():
                on_done(result, err)
            return done
        assert wait_for("the C pool's write", finished, 20) == [None]
        assert int(sums[0]) == native.page_sums(src.addr, 1)[0][0]
        store.read(dst.addr, PAGE, offset)
        return bytes(dst.view())
    finally:
        src.free()
        dst.free()


# ------------------------------------------------------------ the declarations

def test_file_and_nfs_stores_declare_native_io(backing, opened):
    store = opened(store_class(backing), backing)
    io = store.native_io()
    if isinstance(store, NfsStore):
        assert (io.kind, io.fd, io.lender) == (NativeIo.NFS, -1, store)
    else:
        assert (io.kind, io.fd, io.lender) == (NativeIo.FD, store.fd, None)


def test_closed_file_store_declares_none(file_backing):
    store = FileStore.open(file_backing, SIZE)
    store.close()
    assert store.native_io() is None


def test_injector_declares_none_whatever_it_wraps(backing, opened):
    inner = opened(store_class(backing), backing)
    assert inner.native_io() is not None
    assert InjectingStore(inner, {}).native_io() is None


@pytest.mark.parametrize("replaced", [ReadCounter, WriteCounter])
def test_subclass_replacing_read_or_write_declares_none(backing, opened, replaced):
    """The base class's description would let native code skip the
    subclass's own read/write (here a mixin placed before the base)."""
    base = store_class(backing)
    sub = type(f"{replaced.__name__}{base.__name__}", (replaced, base), {})
    assert opened(sub, backing).native_io() is None


# ------------------------------------------- the C components serve exactly those

@pytest.mark.parametrize("component", [CPool, FastPath])
def test_no_native_io_is_refused(backing, opened, eventfd, component):
    """Today's type() tests sat in the engine only: CPool took an injector or
    a FileStore subclass with its own write and would pread/pwrite around
    them; FastPath failed on a missing `fd` attribute."""
    inner = opened(store_class(backing), backing)
    # A second store: one daemon (here, one open store) per backing (store/lock.py).
    counting = opened(type("Counting", (WriteCounter, store_class(backing)), {}), f"{backing}-b")
    for store in (InjectingStore(inner, {}), counting):
        with pytest.raises(ValueError, match="declares no native I/O"):
            component(1, eventfd, store)


def test_subclass_keeping_io_is_served_natively(backing, opened, eventfd):
    """A subclass that adds nothing to read/write keeps its base's native
    I/O: the C pool writes its pages and the store reads them back. (An
    NfsStore subclass was taken for a file store by `type(store) is NfsStore`
    and its jobs looked for an `fd` it does not have.)"""
    base = store_class(backing)
    sub = type(f"Described{base.__name__}", (base,), {"describe": lambda self: {"url": self.url}})
    store = opened(sub, backing)
    assert store.native_io().kind == opened(base, f"{backing}-b").native_io().kind
    pool = CPool(1, eventfd, store)
    try:
        got = native_write_read(pool, store, 3 * PAGE)
    finally:
        pool.stop()
    assert got == bytes(range(256)) * (PAGE // 256)


def test_fast_path_borrows_an_nfs_subclass_contexts(nfs_url, opened, eventfd):
    """The fault threads get lent contexts of an NfsStore subclass (the
    engine lends them, FastPath.top_up hands them to the C threads)."""
    sub = type("DescribedNfsStore", (NfsStore,), {"describe": lambda self: {"url": self.url}})
    store = opened(sub, f"{nfs_url}/native-io-{uuid.uuid4().hex[:12]}")
    fp = FastPath(1, eventfd, store)
    try:
        store.native_io().lender.lend(1)

        def lent():
            fp.lock()
            try:
                fp.top_up()
                return fp.e.nidle == 1
            finally:
                fp.unlock()
        wait_for("a context lent to the fault threads", lent, 20)
    finally:
        fp.stop()

"""NfsStore against a real NFS server (nfs-ganesha from scripts/nfs-server).

The module runs its own server instance, because the timeout and restart
tests stop and crash it.  Needs root (network namespaces, signals to ganesha).
"""
from __future__ import annotations

import ctypes
import errno
import gc
import mmap
import os
import random
import signal
import subprocess
import threading
import time
import uuid

import pytest

from tests.harness import freeze  # noqa: E402
from tests.nfs_fixture import (  # noqa: E402
    instance,
    nfs_server_status,
    restart_ganesha,
    start_nfs_server,
    stop_nfs_server,
)
from uswap.store import header  # noqa: E402
from uswap.store.nfs import URL_FORM, NfsStore, parse_url  # noqa: E402

SERVER = instance("uswap-storetest")
PAGE = 4096
TIMEOUT_MS = 2000
SLACK_S = 1.5  # allowed lateness of a timed-out call


def buffer(n: int) -> tuple[mmap.mmap, int]:
    """n bytes of page-aligned anonymous memory and its address."""
    m = mmap.mmap(-1, n)
    return m, ctypes.addressof(ctypes.c_char.from_buffer(m))


def pattern(seed: int, n: int) -> bytes:
    return random.Random(seed).randbytes(n)


@pytest.fixture(scope="module")
def nfs_server():
    status = start_nfs_server(SERVER)
    yield status
    stop_nfs_server(SERVER)


@pytest.fixture
def url(nfs_server):
    """A fresh file URL on the export (the file is removed afterwards)."""
    u = f"{nfs_server['url']}/store-{uuid.uuid4().hex[:12]}"
    yield u
    path = server_file(nfs_server, u)
    if os.path.isfile(path):
        os.unlink(path)


def server_file(nfs_server, url: str) -> str:
    """The store file's path on the server's own filesystem."""
    return os.path.join(nfs_server["export_dir"], url.rsplit("/", 1)[1])


@pytest.fixture
def ganesha_stopped(nfs_server):
    """Context manager factory: SIGSTOP ganesha inside, SIGCONT on the way out."""
    class Stopped:
        def __enter__(self):
            self.pid = nfs_server_status(SERVER)["ganesha_pid"]
            assert self.pid, "ganesha is not running"
            freeze(self.pid)  # every thread stopped, not just signalled
            return self

        def __exit__(self, *exc):
            os.kill(self.pid, signal.SIGCONT)

    yield Stopped


# ----------------------------------------------------------------- URL parsing

@pytest.mark.parametrize("bad, part", [
    ("http://h/export/f", "scheme"),
    ("nfs:///export/f", "HOST"),
    ("nfs://h", "path"),
    ("nfs://h/", "path"),
    ("nfs://h/f", "EXPORT"),
    ("nfs://h/export/", "FILE"),
    ("nfs://h/export//f", "empty"),
    ("nfs://h/export/../f", "'..'"),
    ("nfs://h:2049/export/f", "port"),
    ("nfs://me@h/export/f", "user"),
    ("nfs://h/export/f?version=4", "query"),
])
def test_malformed_url_names_the_bad_part(bad, part):
    with pytest.raises(ValueError) as ei:
        parse_url(bad)
    msg = str(ei.value)
    assert bad in msg and part in msg and URL_FORM in msg
    with pytest.raises(ValueError):
        NfsStore.open(bad, 1 << 20)


def test_parse_url_splits_host_and_path():
    u = parse_url("nfs://10.0.0.1/export/dir/swapfile")
    assert u.host == "10.0.0.1" and u.parts == ("export", "dir", "swapfile")
    assert parse_url("nfs://[fd00::1]/export/f").host == "fd00::1"


@pytest.mark.parametrize("size", [0, -4096, 1000, 4097])
def test_bad_size_is_refused(size):
    with pytest.raises(ValueError, match="size"):
        NfsStore.open("nfs://h/export/f", size)


# ----------------------------------------------------------------- open-time checks

def test_unknown_export_is_refused(nfs_server):
    bad = nfs_server["url"].rsplit("/", 1)[0] + "/no-such-export/f"
    with pytest.raises(ValueError) as ei:
        NfsStore.open(bad, 1 << 20, TIMEOUT_MS)
    assert bad in str(ei.value) and "/no-such-export" in str(ei.value)


def test_missing_directory_is_refused(nfs_server):
    bad = f"{nfs_server['url']}/no-such-dir/f"
    with pytest.raises(ValueError) as ei:
        NfsStore.open(bad, 1 << 20, TIMEOUT_MS)
    assert bad in str(ei.value) and "/no-such-dir/f" in str(ei.value)


@pytest.mark.parametrize("host", ["127.0.0.1", "no-such-host.invalid"])
def test_unreachable_server_is_refused(host):
    bad = f"nfs://{host}/export/f"
    t = time.monotonic()
    with pytest.raises(ValueError) as ei:
        NfsStore.open(bad, 1 << 20, TIMEOUT_MS)
    assert bad in str(ei.value)
    assert time.monotonic() - t < 3 * TIMEOUT_MS / 1000 + SLACK_S


def test_stopped_server_is_refused_within_timeout(url, ganesha_stopped):
    with ganesha_stopped():
        t = time.monotonic()
        with pytest.raises(ValueError) as ei:
            NfsStore.open(url, 1 << 20, TIMEOUT_MS)
        assert time.monotonic() - t < TIMEOUT_MS / 1000 + SLACK_S
    assert url in str(ei.value) and "timed out" in str(ei.value)


def test_creates_sparse_file_mode_0600(nfs_server, url):
    path = server_file(nfs_server, url)
    assert not os.path.exists(path)
    with NfsStore.open(url, 64 << 20, TIMEOUT_MS) as s:
        assert (s.url, s.size_bytes, s.alignment) == (url, 64 << 20, 4096)
        assert s.describe()["durability"] == "FILE_SYNC"
        st = os.stat(path)
        assert st.st_size == 64 << 20
        assert st.st_mode & 0o777 == 0o600
        assert st.st_blocks * 512 < 1 << 20  # sparse


def test_existing_file_without_header_is_refused_untouched(nfs_server, url):
    path = server_file(nfs_server, url)
    with open(path, "wb") as f:
        f.write(b"\0" * PAGE + b"someone's data")
    with pytest.raises(ValueError) as ei:
        NfsStore.open(url, 1 << 20, TIMEOUT_MS)
    assert "not a uswap store" in str(ei.value) and url in str(ei.value)
    assert os.stat(path).st_size == PAGE + 14


def test_reopen_keeps_data_and_resizes(nfs_server, url):
    m, a = buffer(8 * PAGE)
    m[:] = pattern(1, len(m))
    with NfsStore.open(url, 1 << 20, TIMEOUT_MS) as s:
        header.claim(s)  # a file that already exists must be a uswap store to be reopened
        s.write(a, len(m), 16 * PAGE)
    with NfsStore.open(url, 1 << 20, TIMEOUT_MS) as s:  # same size: untouched
        r, ra = buffer(len(m))
        s.read(ra, len(r), 16 * PAGE)
        assert r[:] == m[:]
    with NfsStore.open(url, 4 << 20, TIMEOUT_MS) as s:  # grown in place
        assert os.stat(server_file(nfs_server, url)).st_size == 4 << 20
        r, ra = buffer(len(m))
        s.read(ra, len(r), 16 * PAGE)
        assert r[:] == m[:]
    with NfsStore.open(url, 1 << 20, TIMEOUT_MS) as s:  # never shrunk: it may not be ours
        assert os.stat(server_file(nfs_server, url)).st_size == 4 << 20
        assert s.size_bytes == 1 << 20


def test_directory_in_place_of_file_is_refused(nfs_server, url):
    os.mkdir(server_file(nfs_server, url))
    try:
        with pytest.raises(ValueError) as ei:
            NfsStore.open(url, 1 << 20, TIMEOUT_MS)
        assert url in str(ei.value) and "regular file" in str(ei.value)
    finally:
        os.rmdir(server_file(nfs_server, url))


def test_existing_file_that_cannot_be_resized_is_refused(nfs_server, url):
    path = server_file(nfs_server, url)
    with open(path, "wb") as f:
        f.truncate(1 << 20)
    assert subprocess.run(["chattr", "+i", path], capture_output=True).returncode == 0
    try:
        with pytest.raises(ValueError) as ei:
            NfsStore.open(url, 2 << 20, TIMEOUT_MS)
        assert url in str(ei.value)
    finally:
        subprocess.run(["chattr", "-i", path], check=True)
    assert os.stat(path).st_size == 1 << 20


# ----------------------------------------------------------------- I/O

def test_round_trip_from_several_threads(url):
    size = 64 << 20
    nthreads = 4
    share = size // nthreads
    s = NfsStore.open(url, size, TIMEOUT_MS)
    written: dict[int, tuple[int, bytes]] = {}  # offset -> (length, data)
    lock = threading.Lock()
    errors: list[BaseException] = []
    start = threading.Barrier(nthreads)

    def worker(k: int) -> None:
        try:
            rnd = random.Random(k)
            base = k * share
            mine = []
            # runs of 1..64 pages, at the start and end of the share and in between,
            # never overlapping (each run gets its own 256 KiB window)
            windows = list(range(0, share, 64 * PAGE))
            picks = [windows[0], windows[-1]] + rnd.sample(windows[1:-1], 14)
            start.wait()
            for i, w in enumerate(picks):
                npages = rnd.choice([1, 2, 3, 16, 63, 64])
                off = base + w + (64 - npages) * PAGE * (i % 2)  # flush left or right
                m, a = buffer(npages * PAGE)
                m[:] = pattern(off, len(m))
                s.write(a, len(m), off)
                mine.append((off, len(m)))
            for off, n in mine:
                r, ra = buffer(n)
                s.read(ra, n, off)
                assert r[:] == pattern(off, n), f"thread {k}: mismatch at {off}"
            with lock:
                for off, n in mine:
                    written[off] = (n, pattern(off, n))
        except BaseException as e:  # noqa: BLE001 - reported by the main thread
            errors.append(e)

    threads = [threading.Thread(target=worker, args=(k,)) for k in range(nthreads)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors
    assert len(written) == nthreads * 16
    # Read everything back again through another context (the main thread's).
    for off, (n, data) in written.items():
        r, ra = buffer(n)
        s.read(ra, n, off)
        assert r[:] == data, f"mismatch at {off} read from another thread"
    # A page nobody wrote reads as zeros (sparse).
    hole = next(p for p in range(0, size, PAGE)
                if not any(o <= p < o + n for o, (n, _) in written.items()))
    z, za = buffer(PAGE)
    z[:] = b"\xff" * PAGE
    s.read(za, PAGE, hole)
    assert z[:] == bytes(PAGE)
    s.close()


def test_thread_contexts_are_released(url):
    s = NfsStore.open(url, 1 << 20, TIMEOUT_MS)
    m, a = buffer(PAGE)

    def io():
        s.write(a, PAGE, 0)

    threads = [threading.Thread(target=io) for _ in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    gc.collect()
    assert s.describe()["contexts"] == 1  # only the opening thread's is left
    s.close()
    assert s.describe()["contexts"] == 0
    s.close()  # idempotent
    with pytest.raises(OSError) as ei:
        s.write(a, PAGE, 0)
    assert ei.value.errno == errno.EBADF


def test_out_of_range_and_misaligned_are_einval(url):
    m, a = buffer(4 * PAGE)
    with NfsStore.open(url, 1 << 20, TIMEOUT_MS) as s:
        for addr, n, off in [
            (a, PAGE, 1 << 20),             # read past the end
            (a, 2 * PAGE, (1 << 20) - PAGE),  # straddles the end
            (a, 100, 0), (a + 1, PAGE, 0), (a, PAGE, 512),
        ]:
            for op in (s.read, s.write):
                with pytest.raises(OSError) as ei:
                    op(addr, n, off)
                assert ei.value.errno == errno.EINVAL


def test_short_read_when_file_shrinks_is_eio(nfs_server, url):
    m, a = buffer(PAGE)
    with NfsStore.open(url, 1 << 20, TIMEOUT_MS) as s:
        s.write(a, PAGE, 512 << 10)
        os.truncate(server_file(nfs_server, url), 256 << 10)  # shrunk on the server under s
        with pytest.raises(OSError) as ei:
            s.read(a, PAGE, 512 << 10)
        assert ei.value.errno == errno.EIO and "short read" in str(ei.value)


# ----------------------------------------------------------------- failures

def test_timeout_then_recovery(url, ganesha_stopped):
    m, a = buffer(16 * PAGE)
    m[:] = pattern(7, len(m))
    s = NfsStore.open(url, 1 << 20, TIMEOUT_MS)
    s.write(a, len(m), 0)  # this thread's context is connected
    errs: list[tuple[int, float]] = []

    def fresh_thread_write():  # no context yet: its mount must time out too
        t = time.monotonic()
        try:
            s.write(a, PAGE, 32 * PAGE)
        except OSError as e:
            errs.append((e.errno, time.monotonic() - t))

    with ganesha_stopped():
        t = time.monotonic()
        with pytest.raises(OSError) as ei:
            s.write(a, len(m), 64 * PAGE)
        dt = time.monotonic() - t
        assert ei.value.errno == errno.ETIMEDOUT, ei.value
        assert TIMEOUT_MS / 1000 * 0.9 <= dt <= TIMEOUT_MS / 1000 + SLACK_S
        t = time.monotonic()
        with pytest.raises(OSError) as ei:
            s.read(a, PAGE, 0)
        assert ei.value.errno == errno.ETIMEDOUT
        assert time.monotonic() - t <= TIMEOUT_MS / 1000 + SLACK_S
        th = threading.Thread(target=fresh_thread_write)
        th.start()
        th.join()
        assert errs and errs[0][0] == errno.ETIMEDOUT and errs[0][1] <= TIMEOUT_MS / 1000 + SLACK_S
    # Server back: the next write succeeds and everything reads back.
    s.write(a, len(m), 64 * PAGE)
    for off in (0, 64 * PAGE):
        r, ra = buffer(len(m))
        s.read(ra, len(r), off)
        assert r[:] == m[:]
    s.close()


def test_server_restart_keeps_store_working_and_data(url):
    """kill -9 ganesha and restart it: every thread's store keeps working and
    data from writes that returned before the crash is intact."""
    nthreads = 3
    s = NfsStore.open(url, 8 << 20, 5000)
    before, after = threading.Barrier(nthreads + 1), threading.Barrier(nthreads + 1)
    errors: list[BaseException] = []

    def worker(k: int) -> None:
        try:
            m, a = buffer(32 * PAGE)
            m[:] = pattern(100 + k, len(m))
            s.write(a, len(m), k * (1 << 20))  # connected and written before the crash
            before.wait()
            after.wait()
            r, ra = buffer(len(m))
            s.read(ra, len(r), k * (1 << 20))
            assert r[:] == m[:], f"thread {k}: data written before the crash changed"
            m[:] = pattern(200 + k, len(m))
            s.write(a, len(m), k * (1 << 20) + (512 << 10))
        except BaseException as e:  # noqa: BLE001
            errors.append(e)
            for b in (before, after):
                b.abort()

    threads = [threading.Thread(target=worker, args=(k,)) for k in range(nthreads)]
    for t in threads:
        t.start()
    mm, ma = buffer(PAGE)
    mm[:] = pattern(99, PAGE)
    s.write(ma, PAGE, 7 << 20)
    before.wait()
    old = nfs_server_status(SERVER)["ganesha_pid"]
    new = restart_ganesha(SERVER)["ganesha_pid"]
    assert new and new != old
    after.wait()
    for t in threads:
        t.join()
    assert not errors, errors
    r, ra = buffer(PAGE)
    s.read(ra, PAGE, 7 << 20)
    assert r[:] == mm[:]
    for k in range(nthreads):
        n = 32 * PAGE
        r, ra = buffer(n)
        s.read(ra, n, k * (1 << 20) + (512 << 10))
        assert r[:] == pattern(200 + k, n)
    s.close()


def test_server_down_fails_fast_then_recovers(nfs_server, url):
    """With ganesha dead (not restarted yet) a call fails with OSError rather
    than hanging; once it is back the same store works again."""
    m, a = buffer(PAGE)
    m[:] = pattern(5, PAGE)
    s = NfsStore.open(url, 1 << 20, TIMEOUT_MS)
    s.write(a, PAGE, 0)
    pid = nfs_server_status(SERVER)["ganesha_pid"]
    os.kill(pid, signal.SIGKILL)
    deadline = time.monotonic() + 10
    while nfs_server_status(SERVER)["ganesha_pid"] and time.monotonic() < deadline:
        time.sleep(0.05)
    try:
        for _ in range(2):  # the old context, then a fresh one
            t = time.monotonic()
            with pytest.raises(OSError):
                s.write(a, PAGE, PAGE)
            assert time.monotonic() - t <= TIMEOUT_MS / 1000 + SLACK_S
    finally:
        restart_ganesha(SERVER)
    s.write(a, PAGE, PAGE)
    r, ra = buffer(2 * PAGE)
    s.read(ra, 2 * PAGE, 0)
    assert r[:PAGE] == m[:] and r[PAGE:] == m[:]
    s.close()

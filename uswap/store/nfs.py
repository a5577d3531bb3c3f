"""The ``nfs://`` backing store: a swap file spoken to over NFSv3 with libnfs.

No kernel NFS client, no mount, no root: the daemon talks NFS itself
(README "NFS").  The C shim (native/nfs.c) does one libnfs call's worth of work;
this module holds the logic:

* URL parsing and export discovery.  ``nfs://HOST/EXPORT/PATH/FILE``: the
  export is the longest prefix of the path's directories that the server
  lets us mount, the rest is the file's path inside it.
* One libnfs context per calling thread (a libnfs 4.0 context is not
  thread-safe), created lazily with the same settings (NFSv3, the RPC
  timeout, libnfs's default autoreconnect) and the same file.
* Error policy.  Every failure raises OSError with an errno; an RPC that hit
  the timeout is ETIMEDOUT.  After any failure that is not a plain answer
  from the server (a timeout, a broken or refused connection, a stale
  handle, ...) the thread's context is destroyed, and its next call builds a
  fresh one (mount, open, check it is still the same file), so a wedged or
  dead context never outlives one failed call.
* Connections lent to the engine's C I/O pool (uswap/daemon/cpool.py).
  ``lend(n)`` keeps up to n more contexts, connected on a helper thread
  (never the engine's); ``checkout()`` hands out an idle one or None at
  once, and ``checkin(conn, error)`` takes it back, destroying it under the
  same error policy (the helper then connects a replacement, backing off
  while the server is unreachable).  A lent context is used by one C job at
  a time and by nothing else.

Durability (docs/design.md invariant 1): the file is opened O_SYNC, so every WRITE3
is sent FILE_SYNC and the server replies only once the data is on stable
storage; ``write`` returning is the proof a page may be dropped.  UNSTABLE
writes plus COMMIT were measured and rejected (native/nfs.c says why).

Caveat for callers: a write that failed with ETIMEDOUT may still be sitting
in the server's queue and land later, after a newer write to the same
offset (ganesha runs requests on several threads).  Its slot's contents are
unknown until it is written again with no timeout pending on it.
"""
from __future__ import annotations

import errno
import logging
import os
import stat
import threading
import time
import weakref
from dataclasses import dataclass
from urllib.parse import urlsplit

from uswap.store.libnfs import errtext, ffi, lib
from uswap.store import lock, nfslock
from uswap.store.base import NativeIo, Store, does_own_io

log = logging.getLogger(__name__)

URL_FORM = "nfs://HOST/EXPORT/PATH/FILE"

#: Errors that are a definite answer from the server about the request itself;
#: the connection is fine and the thread keeps its context.  Anything else
#: (ETIMEDOUT, EIO from a dropped connection, ESTALE, EHOSTUNREACH, ...)
#: discards the context.
_SERVER_ANSWERS = frozenset(
    {errno.ENOSPC, errno.EDQUOT, errno.EFBIG, errno.EROFS, errno.EACCES, errno.EINVAL}
)

#: MOUNT answers meaning "this path is not an export": try a shorter prefix.
_NOT_AN_EXPORT = frozenset({errno.EACCES, errno.ENOENT, errno.ENOTDIR, errno.EPERM})


@dataclass(frozen=True)
class NfsUrl:
    """A parsed ``nfs://HOST/DIR.../FILE`` URL (export not yet resolved)."""

    url: str
    host: str
    parts: tuple[str, ...]  # path components, the last one is the file


def parse_url(url: str) -> NfsUrl:
    """Split an nfs:// URL into host and path components; ValueError names
    the bad part and the accepted form."""
    def bad(what: str) -> ValueError:
        return ValueError(f"bad NFS URL {url!r}: {what}; expected {URL_FORM}")

    if not isinstance(url, str):
        raise ValueError(f"NFS URL must be a string, not {type(url).__name__}; expected {URL_FORM}")
    try:
        u = urlsplit(url)
    except ValueError as e:
        raise bad(str(e)) from None
    if u.scheme != "nfs":
        raise bad(f"scheme {u.scheme + '://' if u.scheme else 'missing'}, must be nfs://")
    if u.query or u.fragment or "?" in url or "#" in url:
        raise bad("query strings and fragments are not supported")
    if "@" in u.netloc:
        raise bad("user info ('USER@') is not supported")
    try:
        port = u.port
    except ValueError:
        raise bad(f"bad port in host {u.netloc!r}") from None
    if port is not None:
        raise bad(f"a port ({port}) is not supported; the server's portmapper is used")
    host = u.hostname or ""
    if not host:
        raise bad("missing HOST")
    parts = tuple(u.path.split("/")[1:]) if u.path.startswith("/") else ()
    if not parts or parts == ("",):
        raise bad("missing /EXPORT/FILE path")
    if parts[-1] == "":
        raise bad(f"path {u.path!r} ends in '/', FILE is missing")
    for p in parts:
        if p in ("", ".", ".."):
            raise bad(f"path {u.path!r} has an empty, '.' or '..' component")
        if "%" in p:
            raise bad(f"percent-escapes in path component {p!r} are not supported")
    if len(parts) < 2:
        raise bad(f"path {u.path!r} names only FILE, the EXPORT is missing")
    return NfsUrl(url=url, host=host, parts=parts)


class _Conn:
    """One thread's libnfs context and its handle on the store file."""

    __slots__ = ("ctx", "fh", "lock", "healthy", "__weakref__")

    def __init__(self, ctx, fh) -> None:
        self.ctx = ctx
        self.fh = fh
        self.lock = threading.Lock()  # held for every call; close() takes it too
        self.healthy = True  # the last call on ctx succeeded or got a server answer

    def destroy(self) -> None:
        """Free the context (caller holds self.lock).  nfs_close is only sent
        on a healthy context: in libnfs 4.0 it COMMITs a written file first
        (redundant after FILE_SYNC writes) and would wait out the timeout on
        a dead server; skipping it leaks only the small handle struct."""
        if self.ctx is None:
            return
        if self.healthy and self.fh is not None:
            lib.us_nfs_close(self.ctx, self.fh)
        lib.us_nfs_destroy(self.ctx)
        self.ctx = self.fh = None


class _ThreadSlot:
    """Lives in the store's threading.local: when its thread ends, the
    thread-local dict is dropped and this releases that thread's context."""

    __slots__ = ("store", "conn")

    def __init__(self, store: "NfsStore", conn: _Conn) -> None:
        self.store = weakref.ref(store)
        self.conn = conn

    def __del__(self) -> None:
        store = self.store()
        if store is not None:
            store._release(self.conn)


class NfsStore(Store):
    """A fixed-size swap file on an NFSv3 server, reached with libnfs.

    Build with :meth:`open`.  Thread-safe: each calling thread gets its own
    libnfs context on first use; :meth:`close` destroys them all.
    """

    alignment = 4096
    durability = "FILE_SYNC"
    # A write that timed out may still sit in the server's queue and land later.
    late_writes_possible = True

    def __init__(self, url: NfsUrl, export: str, path: str, size_bytes: int,
                 timeout_ms: int, ino: int) -> None:
        # Use NfsStore.open(); this only records what open() established.
        self.url = url.url
        self.host = url.host
        self.export = export
        self.path = path
        self.size_bytes = size_bytes
        self.timeout_ms = timeout_ms
        self._ino = ino
        self._local = threading.local()
        self._conns: set[_Conn] = set()
        self._lock = threading.Lock()
        self._closed = False
        # Lent contexts (see lend()); all guarded by _lock, _more waits on it.
        self._more = threading.Condition(self._lock)
        self._lend_target = 0
        self._idle: list[_Conn] = []
        self._out: set[_Conn] = set()
        self._dead: list[_Conn] = []  # checked in after a failure: the helper destroys them
        self._lender: threading.Thread | None = None
        # The store lock (set by open()): released by close().
        self._host_lock: lock.FlockLock | None = None
        self._lock_path: str | None = None

    # ----- opening -------------------------------------------------------

    @classmethod
    def open(cls, url: str, size_bytes: int, timeout_ms: int = 10000) -> "NfsStore":
        """Mount the export named by `url`, create the file (mode 0600) if
        missing and size it to `size_bytes` (sparse).  Raises ValueError,
        naming the URL, if the URL is malformed, the server or export cannot
        be reached, or the file cannot be given that size."""
        u = parse_url(url)
        if isinstance(size_bytes, bool) or not isinstance(size_bytes, int) \
                or size_bytes <= 0 or size_bytes % cls.alignment:
            raise ValueError(f"NFS store {url}: size {size_bytes!r} must be a positive "
                             f"multiple of {cls.alignment}")
        if isinstance(timeout_ms, bool) or not isinstance(timeout_ms, int) or timeout_ms <= 0:
            raise ValueError(f"NFS store {url}: timeout_ms {timeout_ms!r} must be a positive integer")

        # One daemon per store (uswap/store/lock.py): this host's daemons are
        # ordered first, then the lock file in the export orders the hosts.
        host_lock = lock.host_lock(u.url)
        try:
            ctx, export, path = cls._mount_longest(u, timeout_ms)
        except BaseException:
            host_lock.release()
            raise
        fh = None
        lock_path = None
        try:
            lock_path = nfslock.take(u.url, export, ctx, path)
            fh, created = cls._open_or_create(u, ctx, path)
            st = ffi.new("struct nfs_stat_64 *")
            r = lib.us_nfs_fstat(ctx, fh, st)
            if r < 0:
                raise ValueError(f"NFS store {url}: cannot stat {path} in export {export}: "
                                 f"{os.strerror(-r)} ({errtext(ctx)})")
            if not stat.S_ISREG(st.nfs_mode):
                raise ValueError(f"NFS store {url}: {path} in export {export} is not a regular file")
            if not created and st.nfs_size > 0:
                # Before anything is resized: an existing file must be a uswap store.
                from uswap import native
                from uswap.store import header
                page = native.AlignedBuffer(4096)
                try:
                    got = lib.us_nfs_pread_full(ctx, fh, page.addr, 4096, 0)
                    if got < 0:
                        raise ValueError(f"NFS store {url}: cannot read {path}: {os.strerror(-got)}")
                    header.check_existing(bytes(page.view()[:got]), url)
                finally:
                    page.free()
            # Grow only: an existing larger file keeps its size (and whatever
            # it holds) until the store header check has said it is ours.
            if st.nfs_size < size_bytes:
                r = lib.us_nfs_ftruncate(ctx, fh, size_bytes)
                if r < 0:
                    what = "new file" if created else f"existing file has size {st.nfs_size} and"
                    raise ValueError(
                        f"NFS store {url}: {what} cannot be resized to {size_bytes} bytes: "
                        f"{os.strerror(-r)} ({errtext(ctx)})")
                if not created:
                    log.warning("NFS store %s: resized existing file from %d to %d bytes",
                                url, st.nfs_size, size_bytes)
            if created:
                log.info("NFS store %s: created %s (%d bytes) in export %s",
                         url, path, size_bytes, export)
            store = cls(u, export, path, size_bytes, timeout_ms, int(st.nfs_ino))
            store._host_lock, store._lock_path = host_lock, lock_path
        except BaseException:
            if lock_path is not None:
                nfslock.release(ctx, lock_path)
            lib.us_nfs_destroy(ctx)  # no nfs_close: see _Conn.destroy
            host_lock.release()
            raise
        # The opening context becomes the calling thread's.
        store._adopt(_Conn(ctx, fh))
        return store

    @staticmethod
    def _new_ctx(timeout_ms: int):
        ctx = lib.us_nfs_new(timeout_ms)
        if ctx == ffi.NULL:
            raise MemoryError("libnfs: cannot create a context")
        return ctx

    @classmethod
    def _mount_longest(cls, u: NfsUrl, timeout_ms: int):
        """Mount the longest directory prefix of the URL path that the server
        exports; returns (ctx, export, path inside the export)."""
        tried = []
        for k in range(len(u.parts) - 1, 0, -1):
            export = "/" + "/".join(u.parts[:k])
            ctx = cls._new_ctx(timeout_ms)
            r = lib.us_nfs_mount(ctx, u.host.encode(), export.encode())
            if r == 0:
                return ctx, export, "/" + "/".join(u.parts[k:])
            err, text = -r, errtext(ctx)
            lib.us_nfs_destroy(ctx)
            if err not in _NOT_AN_EXPORT:
                raise ValueError(f"NFS store {u.url}: cannot reach NFS server {u.host} "
                                 f"(mounting {export}): {os.strerror(err)} ({text})")
            tried.append(export)
        raise ValueError(f"NFS store {u.url}: server {u.host} exports none of "
                         f"{', '.join(tried)} to us ({text}); expected {URL_FORM}")

    @staticmethod
    def _open_or_create(u: NfsUrl, ctx, path: str):
        """Open path O_RDWR|O_SYNC, creating it (0600, exclusively) if missing.
        Returns (fh, created)."""
        fhp = ffi.new("struct nfsfh **")
        flags = os.O_RDWR | os.O_SYNC  # O_SYNC: every WRITE3 is FILE_SYNC
        for _ in range(3):
            r = lib.us_nfs_open(ctx, path.encode(), flags, 0o600, fhp)
            if r == 0:
                return fhp[0], False
            if r != -errno.ENOENT:
                break
            r = lib.us_nfs_open(ctx, path.encode(), flags | os.O_CREAT | os.O_EXCL, 0o600, fhp)
            if r == 0:
                return fhp[0], True
            if r != -errno.EEXIST:  # EEXIST: created by someone else meanwhile
                break
        hint = " (does its directory exist?)" if r == -errno.ENOENT else ""
        raise ValueError(f"NFS store {u.url}: cannot open or create {path}{hint}: "
                         f"{os.strerror(-r)} ({errtext(ctx)})")

    # ----- per-thread contexts --------------------------------------------

    def _adopt(self, conn: _Conn) -> None:
        with self._lock:
            if self._closed:
                with conn.lock:
                    conn.destroy()
                raise OSError(errno.EBADF, f"NFS store {self.url} is closed")
            self._conns.add(conn)
        self._local.slot = _ThreadSlot(self, conn)

    def _connect(self) -> _Conn:
        """A fresh context for the calling thread: mount, open, and check the
        file is still the one open() sized (not replaced behind our back)."""
        ctx = self._new_ctx(self.timeout_ms)
        fhp = ffi.new("struct nfsfh **")
        try:
            r = lib.us_nfs_mount(ctx, self.host.encode(), self.export.encode())
            what = f"mount {self.export}"
            if r == 0:
                what = f"open {self.path}"
                r = lib.us_nfs_open(ctx, self.path.encode(), os.O_RDWR | os.O_SYNC, 0o600, fhp)
            if r == 0:
                what = f"stat {self.path}"
                st = ffi.new("struct nfs_stat_64 *")
                r = lib.us_nfs_fstat(ctx, fhp[0], st)
                if r == 0 and int(st.nfs_ino) != self._ino:
                    raise OSError(errno.ESTALE, f"NFS store {self.url}: {self.path} was "
                                  f"replaced on the server (inode {self._ino} -> {st.nfs_ino})")
            if r < 0:
                raise OSError(-r, f"NFS store {self.url}: reconnect failed to {what}: "
                                  f"{os.strerror(-r)} ({errtext(ctx)})")
        except BaseException:
            lib.us_nfs_destroy(ctx)
            raise
        return _Conn(ctx, fhp[0])

    def _conn(self) -> _Conn:
        slot = getattr(self._local, "slot", None)
        if slot is not None and slot.conn.ctx is not None:
            return slot.conn
        if self._closed:
            raise OSError(errno.EBADF, f"NFS store {self.url} is closed")
        conn = self._connect()
        self._adopt(conn)
        log.debug("NFS store %s: new context for thread %s", self.url, threading.current_thread().name)
        return conn

    def _release(self, conn: _Conn) -> None:
        """Destroy one context and forget it (thread exit, failure, close)."""
        with conn.lock:
            conn.destroy()
        with self._lock:
            self._conns.discard(conn)

    # ----- contexts lent to the C I/O pool -----------------------------------

    def lend(self, n: int) -> None:
        """Keep up to `n` contexts for checkout(), besides the per-thread ones.
        They are connected on a helper thread, so no caller ever waits for a
        server; until one is ready checkout() returns None."""
        with self._lock:
            if self._closed:
                raise OSError(errno.EBADF, f"NFS store {self.url} is closed")
            self._lend_target = n
            if self._lender is None:
                self._lender = threading.Thread(target=self._lend_loop, name="uswap-nfs-connect",
                                                daemon=True)
                self._lender.start()
            self._more.notify()

    def checkout(self) -> _Conn | None:
        """An idle connected context, now owned by the caller alone (pass
        conn.ctx and conn.fh to one job at a time), or None when none is idle.
        Never blocks on the server."""
        with self._lock:
            if not self._idle:
                return None
            conn = self._idle.pop()
            self._out.add(conn)
            return conn

    def checkin(self, conn: _Conn, error: OSError | None) -> None:
        """Take back a context from checkout(), with the error of the call
        made on it (None: it succeeded).  Same policy as the per-thread
        contexts: after anything but a plain answer from the server the
        context is discarded (the helper thread destroys it, sending no RPC,
        and connects a fresh one).  Never blocks on the server."""
        if error is not None and error.errno not in _SERVER_ANSWERS:
            conn.healthy = False
        with self._lock:
            self._out.discard(conn)
            closed = self._closed
            if not closed:
                (self._idle if conn.healthy else self._dead).append(conn)
                self._more.notify()
        if closed:  # after close() (shutdown only): the helper has gone
            with conn.lock:
                conn.destroy()

    def _lend_loop(self) -> None:
        """Helper thread: destroy discarded contexts and connect new ones
        until lend()'s target is met.  A failed connect (server down or
        frozen: one attempt can take the RPC timeout) is retried after a
        growing delay; meanwhile the engine's I/O runs on the per-thread path."""
        delay, retry_at, failed = 0.0, 0.0, False
        while True:
            with self._lock:
                while True:
                    dead, self._dead = self._dead, []
                    if dead or self._closed:
                        break
                    wait = retry_at - time.monotonic()
                    if wait <= 0 and len(self._idle) + len(self._out) < self._lend_target:
                        break
                    self._more.wait(wait if wait > 0 else None)
                closed = self._closed
            for conn in dead:
                with conn.lock:
                    conn.destroy()
            if closed:
                return
            if dead:
                continue
            try:
                conn = self._connect()
            except Exception as e:  # OSError, MemoryError: try again later
                if not failed:
                    log.warning("NFS store %s: cannot connect a context for the C I/O pool "
                                "(retrying; I/O stays on the Python pool meanwhile): %s", self.url, e)
                failed = True
                delay = min(1.0, max(0.05, 2 * delay))
                retry_at = time.monotonic() + delay
                continue
            if failed:
                log.info("NFS store %s: C I/O pool contexts connect again", self.url)
            failed, delay = False, 0.0
            with self._lock:
                if not self._closed:
                    self._idle.append(conn)
                    continue
            with conn.lock:
                conn.destroy()

    # ----- I/O -------------------------------------------------------------

    def _check(self, addr: int, length: int, offset: int, op: str) -> None:
        a = self.alignment
        if addr <= 0 or addr % a or length < 0 or length % a or offset < 0 or offset % a:
            raise OSError(errno.EINVAL, f"NFS store {self.url}: {op} of {length} bytes at "
                          f"offset {offset} from address {addr:#x}: address, length and "
                          f"offset must be multiples of {a}")
        if offset + length > self.size_bytes:
            raise OSError(errno.EINVAL, f"NFS store {self.url}: {op} of {length} bytes at "
                          f"offset {offset} runs past the end of the store ({self.size_bytes} bytes)")

    def _io(self, fn, op: str, addr: int, length: int, offset: int) -> int:
        self._check(addr, length, offset, op)
        if length == 0:
            return 0
        conn = self._conn()
        with conn.lock:
            if conn.ctx is None:  # closed under us
                raise OSError(errno.EBADF, f"NFS store {self.url} is closed")
            r = fn(conn.ctx, conn.fh, addr, length, offset)
            if r >= 0:
                return r
            error = self.io_error(conn, op, length, offset, -r)
            if error.errno not in _SERVER_ANSWERS:
                conn.healthy = False
        if not conn.healthy:
            # Not a plain answer from the server: start over with a fresh
            # context on this thread's next call.
            self._local.slot = None  # drops the _ThreadSlot -> _release(conn)
            self._release(conn)
        raise error

    def io_error(self, conn: _Conn, op: str, length: int, offset: int, err: int) -> OSError:
        """The OSError for a failed `op` ("read"/"write") on conn, naming the
        offset and libnfs's error text (call it before conn is reused)."""
        return OSError(err, f"NFS store {self.url}: {op} of {length} bytes at offset {offset} "
                            f"failed: {os.strerror(err)} ({errtext(conn.ctx)})")

    def write(self, addr: int, length: int, offset: int) -> None:
        """Write `length` bytes at `addr` to `offset`; returns once the server
        has them on stable storage (FILE_SYNC)."""
        self._io(lib.us_nfs_pwrite_full, "write", addr, length, offset)

    def read(self, addr: int, length: int, offset: int) -> None:
        n = self._io(lib.us_nfs_pread_full, "read", addr, length, offset)
        if n != length:
            raise OSError(errno.EIO, f"NFS store {self.url}: short read at offset {offset}: "
                                     f"{n} of {length} bytes (file shrunk on the server?)")

    def native_io(self) -> NativeIo | None:
        """Lent libnfs contexts (lend/checkout/checkin), on which the C
        threads make the same pread/pwrite calls as read and write; None for
        a subclass that replaced read or write."""
        if not does_own_io(self, NfsStore):
            return None
        return NativeIo.on_nfs(self)

    def close(self) -> None:
        """Destroy every thread's context (waiting for calls in progress).
        Idempotent; I/O afterwards raises OSError(EBADF). Releases the store
        lock: the lock file first, then this host's lock."""
        self._release_store_lock()
        with self._lock:
            self._closed = True
            conns, self._conns = list(self._conns) + self._idle + self._dead, set()
            self._idle, self._dead = [], []
            self._more.notify_all()
        # A context still checked out is destroyed when it is checked in.
        for conn in conns:
            with conn.lock:
                conn.destroy()

    def _release_store_lock(self) -> None:
        lock_path, self._lock_path = self._lock_path, None
        if lock_path is not None:
            # Only on this thread's own context, and only while it is healthy:
            # a new mount, or a call on a context that just failed, could each
            # wait out the RPC timeout on a server that is down. A lock file
            # left behind names this host, whose next daemon takes it over.
            slot = getattr(self._local, "slot", None)
            conn = slot.conn if slot is not None else None
            if conn is not None and conn.ctx is not None and conn.healthy:
                with conn.lock:
                    nfslock.release(conn.ctx, lock_path)
            else:
                log.info("NFS store %s: lock file %s left for this host's next daemon "
                         "(no healthy connection to remove it)", self.url, lock_path)
        host_lock, self._host_lock = self._host_lock, None
        if host_lock is not None:
            host_lock.release()

    def describe(self) -> dict:
        d = super().describe()
        with self._lock:
            n = len(self._conns) + len(self._idle) + len(self._out)
        d.update(host=self.host, export=self.export, path=self.path,
                 durability=self.durability, timeout_ms=self.timeout_ms, contexts=n)
        return d

    def __del__(self) -> None:
        try:
            self.close()
        except Exception:
            pass

    def __enter__(self) -> "NfsStore":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"NfsStore({self.url!r}, size_bytes={self.size_bytes})"

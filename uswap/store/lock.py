"""One daemon per store: the store lock.

Two daemons writing one store overwrite each other's slots, so a store is
locked for as long as a daemon has it open, and a second daemon is refused
with a message naming the holder, as swapon(8) refuses a busy swap file with
EBUSY.

- A local file (or a file on a kernel NFS mount) is locked with flock(2) on
  ``STORE.lock`` beside it. The kernel drops the lock when its holder dies, so
  a lock left by a crashed daemon is taken over without anyone's help; on a
  kernel NFS mount the lock goes through the NFS server's lock manager and
  holds across hosts.
- An ``nfs://`` store (libnfs, no kernel lock manager) has a lock file
  ``FILE.lock`` in the export, created exclusively (NFSv3 exclusive CREATE) and
  removed when the store is closed. Daemons on one host are ordered by a
  host-local flock keyed by the URL (under /run/lock, tmpfs), taken first: so
  the holder of that flock may take over a lock file left by this host (a
  daemon that died, or one from an earlier boot), and only another host's lock
  file is refused. Another host's daemon that died leaves its lock file for
  the operator to remove; the refusal names the file.

Each lock file holds the holder's host, boot id, pid and start time (JSON), so
a refusal can say who holds the store.
"""
from __future__ import annotations

import errno
import fcntl
import hashlib
import json
import os
import socket
import time
from dataclasses import asdict, dataclass

#: Host-local lock files for nfs:// stores: tmpfs, so they go with the boot.
HOST_LOCK_DIR = "/run/lock/uswap"


class StoreBusy(ValueError):
    """The store is locked by another daemon (the message names it)."""


@dataclass(frozen=True)
class Holder:
    """Who holds a store lock."""

    host: str
    boot_id: str
    pid: int
    since: float

    @classmethod
    def me(cls) -> "Holder":
        return cls(socket.gethostname(), boot_id(), os.getpid(), time.time())

    def to_bytes(self) -> bytes:
        return (json.dumps(asdict(self), sort_keys=True) + "\n").encode()

    @classmethod
    def parse(cls, data: bytes) -> "Holder | None":
        """The holder a lock file names, or None when it names none (empty,
        being written, or damaged)."""
        try:
            d = json.loads(data.decode())
            return cls(str(d["host"]), str(d["boot_id"]), int(d["pid"]), float(d["since"]))
        except (ValueError, KeyError, TypeError, UnicodeDecodeError):
            return None

    def describe(self) -> str:
        started = time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(self.since))
        return f"uswap pid {self.pid} on host {self.host} (boot {self.boot_id[:8]}), since {started}"

    def is_this_host(self) -> bool:
        return self.host == socket.gethostname()


def boot_id() -> str:
    with open("/proc/sys/kernel/random/boot_id") as f:
        return f.read().strip()


def busy_error(store: str, holder: Holder | None, lock_path: str) -> StoreBusy:
    who = holder.describe() if holder else "a daemon that did not record itself"
    return StoreBusy(f"backing: {store} is in use by {who} (lock {lock_path}; EBUSY): "
                     "one store serves one daemon; stop that daemon or choose another --backing")


class FlockLock:
    """flock(2) on a lock file, holding the holder's record while locked."""

    def __init__(self, store: str, path: str) -> None:
        self.store = store
        self.path = path
        self.fd = -1

    def acquire(self) -> "FlockLock":
        """Take the lock or raise StoreBusy naming the holder (ValueError for a
        lock file that cannot be opened, locked or written)."""
        try:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
        except OSError as e:
            raise ValueError(f"backing: {self.store}: cannot open its lock file "
                             f"{self.path}: {e.strerror}") from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as e:
            holder = Holder.parse(os.pread(fd, 4096, 0))
            os.close(fd)
            if e.errno in (errno.EWOULDBLOCK, errno.EAGAIN):
                raise busy_error(self.store, holder, self.path) from None
            raise ValueError(f"backing: {self.store}: cannot lock {self.path}: {e.strerror}") from None
        # Locked: whatever the file says is left by a holder that has died.
        try:
            os.ftruncate(fd, 0)
            os.pwrite(fd, Holder.me().to_bytes(), 0)
        except OSError as e:
            # A full or read-only filesystem beside the store: refuse as a
            # bad backing (a clear line from `uswap run`), holding nothing.
            os.close(fd)
            raise ValueError(f"backing: {self.store}: cannot record this daemon in its lock file "
                             f"{self.path}: {e.strerror}") from None
        self.fd = fd
        return self

    def release(self) -> None:
        """Idempotent. The file stays (removing a flock'ed file races with a
        daemon opening it); empty, it names no holder."""
        if self.fd >= 0:
            os.ftruncate(self.fd, 0)
            os.close(self.fd)  # drops the flock
            self.fd = -1


def lock_file(store_path: str) -> FlockLock:
    """Lock the local (or kernel-NFS-mounted) store file `store_path`."""
    return FlockLock(store_path, store_path + ".lock").acquire()


def host_lock(url: str) -> FlockLock:
    """The host-local lock that orders this host's daemons on one nfs:// URL."""
    try:
        os.makedirs(HOST_LOCK_DIR, mode=0o755, exist_ok=True)
    except OSError as e:
        raise ValueError(f"backing: {url}: cannot make the host lock directory {HOST_LOCK_DIR}: "
                         f"{e.strerror}") from None
    key = hashlib.sha256(url.encode()).hexdigest()[:24]
    return FlockLock(url, os.path.join(HOST_LOCK_DIR, f"nfs-{key}.lock")).acquire()

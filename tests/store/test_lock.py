"""One daemon per store (uswap/store/lock.py): a second daemon on the same
--backing is refused with a message naming the holder, locally and over
nfs://; a lock left by a daemon that died on this host is taken over."""
from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time

import pytest

from tests.conftest import NFS_NAME
from tests.daemon_proc import REPO, DaemonProc
from tests.nfs_fixture import nfs_server_status
from uswap.store import lock


def run_second(workdir: str, backing: str) -> subprocess.CompletedProcess:
    """`uswap run` on `backing`, expected to be refused at once."""
    os.makedirs(workdir, exist_ok=True)
    return subprocess.run(
        [sys.executable, "-m", "uswap.cli", "run", "--backing", backing, "--store-size", "64M",
         "--max-resident", "8M", "--socket", os.path.join(workdir, "uswap.sock")],
        capture_output=True, text=True, timeout=60, cwd=REPO)


def export_path(backing: str) -> str:
    """The server-side path of an nfs:// test store's file."""
    export_dir = nfs_server_status(NFS_NAME)["export_dir"]
    return os.path.join(export_dir, backing.rsplit("/", 1)[1])


def test_second_daemon_on_a_store_is_refused_naming_the_first(backing, tmp_path):
    os.makedirs(tmp_path / "a")
    first = DaemonProc(str(tmp_path / "a"), backing, store_size="64M", max_resident="8M")
    try:
        with first.client() as c:
            region = c.alloc(1 << 20)
            region.buf[:] = b"\x5a" * (1 << 20)
            out = run_second(str(tmp_path / "b"), backing)
            assert out.returncode == 2, out
            assert f"uswap pid {first.proc.pid} on host {socket.gethostname()}" in out.stderr, out.stderr
            assert "EBUSY" in out.stderr and backing in out.stderr, out.stderr
            assert not os.path.exists(tmp_path / "b" / "uswap.sock")
            # The first daemon and its client are untouched by the attempt.
            assert first.proc.poll() is None
            assert bytes(region.buf[:16]) == b"\x5a" * 16
    finally:
        first.stop()


def test_lock_of_a_killed_daemon_is_taken_over(backing, tmp_path):
    os.makedirs(tmp_path / "a")
    first = DaemonProc(str(tmp_path / "a"), backing, store_size="64M", max_resident="8M")
    first.stop(signal.SIGKILL)
    os.makedirs(tmp_path / "b")
    second = DaemonProc(str(tmp_path / "b"), backing, store_size="64M", max_resident="8M")
    try:
        assert second.proc.poll() is None
        if backing.startswith("nfs://"):
            assert f"took over the lock left by uswap pid {first.proc.pid}" in second.log_text()
    finally:
        second.stop()


def test_clean_stop_leaves_the_store_free(backing, tmp_path):
    for name in ("a", "b"):
        os.makedirs(tmp_path / name)
        d = DaemonProc(str(tmp_path / name), backing, store_size="64M", max_resident="8M")
        assert d.stop() == 0
        assert "took over" not in d.log_text()
    if backing.startswith("nfs://"):
        assert not os.path.exists(export_path(backing) + ".lock")
    else:
        with open(backing + ".lock") as f:
            assert f.read() == ""  # names no holder


def write_foreign_lock(path: str, host: str, pid: int = 4242) -> lock.Holder:
    holder = lock.Holder(host, "0" * 32, pid, time.time() - 60)
    with open(path, "wb") as f:
        f.write(holder.to_bytes())
    return holder


def test_nfs_lock_of_another_host_is_refused(nfs_url, tmp_path):
    backing = f"{nfs_url}/lock-{os.getpid()}-other"
    lock_file = export_path(backing) + ".lock"
    write_foreign_lock(lock_file, "elsewhere.example")
    try:
        out = run_second(str(tmp_path / "b"), backing)
        assert out.returncode == 2, out
        assert "uswap pid 4242 on host elsewhere.example" in out.stderr, out.stderr
        assert "remove the lock file on the server" in out.stderr, out.stderr
        with open(lock_file) as f:  # the other host's lock is left alone
            assert json.loads(f.read())["host"] == "elsewhere.example"
    finally:
        for p in (lock_file, export_path(backing)):
            if os.path.exists(p):
                os.unlink(p)


def test_nfs_lock_of_this_host_from_an_earlier_boot_is_taken_over(nfs_url, tmp_path):
    backing = f"{nfs_url}/lock-{os.getpid()}-stale"
    lock_file = export_path(backing) + ".lock"
    stale = write_foreign_lock(lock_file, socket.gethostname(), pid=os.getpid())  # a live pid: the boot differs
    os.makedirs(tmp_path / "a")
    d = DaemonProc(str(tmp_path / "a"), backing, store_size="64M", max_resident="8M")
    try:
        assert f"took over the lock left by {stale.describe()}" in d.log_text()
        with open(lock_file) as f:
            assert json.loads(f.read())["pid"] == d.proc.pid
    finally:
        d.stop()
    assert not os.path.exists(lock_file)
    os.unlink(export_path(backing))


def test_nfs_lock_file_naming_no_holder_is_refused(nfs_url, tmp_path):
    backing = f"{nfs_url}/lock-{os.getpid()}-empty"
    lock_file = export_path(backing) + ".lock"
    open(lock_file, "wb").close()
    try:
        out = run_second(str(tmp_path / "b"), backing)
        assert out.returncode == 2, out
        assert "names no holder" in out.stderr and "EBUSY" in out.stderr, out.stderr
    finally:
        os.unlink(lock_file)


def test_flock_refuses_within_one_process(tmp_path):
    """The lock is per open file, so even the same process cannot take it twice."""
    path = str(tmp_path / "swapfile")
    held = lock.lock_file(path)
    try:
        with pytest.raises(lock.StoreBusy, match=f"uswap pid {os.getpid()} "):
            lock.lock_file(path)
    finally:
        held.release()
    lock.lock_file(path).release()


def test_a_full_filesystem_beside_the_store_is_a_clear_refusal(tmp_path):
    """The holder record cannot be written (ENOSPC): a ValueError naming the
    lock file and the cause, which `uswap run` turns into a refusal (it was
    a bare OSError), and the lock is not left held."""
    mnt = tmp_path / "full"
    mnt.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64k", "tmpfs", str(mnt)], check=True)
    try:
        filler = mnt / "filler"
        fd = os.open(filler, os.O_WRONLY | os.O_CREAT, 0o600)
        try:
            with pytest.raises(OSError, match="No space left"):
                while True:
                    os.write(fd, b"\0" * 4096)
        finally:
            os.close(fd)
        path = str(mnt / "swapfile")
        with pytest.raises(ValueError, match=r"cannot record this daemon in its lock file "
                                             rf"{path}\.lock: No space left on device"):
            lock.lock_file(path)
        os.unlink(filler)  # room again: the lock was not left held
        lock.lock_file(path).release()
    finally:
        subprocess.run(["umount", str(mnt)], check=True)

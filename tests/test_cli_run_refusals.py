"""Configuration and command-line refusals (uswap/cli.py `run`): `uswap run`
exits with status 2 and one message naming the bad value, and touches nothing
it was pointed at; a real store written by one run is accepted by the next.
"""
from __future__ import annotations

import os
import pwd
import shutil
import signal
import subprocess
import sys
import uuid

import pytest

from tests.daemon_proc import REPO
from tests.harness import status, wait_for

PAGE = 4096


def uswap_run(tmp_path, *args: str, timeout: float = 30, socket: str | None = None,
              as_user: str | None = None) -> subprocess.CompletedProcess:
    """Run `uswap run` expecting it to refuse; if it starts instead, stop it
    and fail. Small sizes are passed as flags unless the test gives them
    (flags override the config file, so config tests give them in the file).
    `as_user`: run it as that (unprivileged) user."""
    sock = socket or str(tmp_path / f"refused-{uuid.uuid4().hex[:8]}.sock")
    cmd = [sys.executable, "-m", "uswap.cli", "run", "--socket", sock, *args]
    if as_user is not None:
        cmd = ["setpriv", f"--reuid={as_user}", f"--regid={pwd.getpwnam(as_user).pw_gid}", "--clear-groups", *cmd]
    if "--config" not in args:
        for flag, value in {"--store-size": "16M", "--max-resident": "4M"}.items():
            if not any(a == flag or a.startswith(flag + "=") for a in args):
                cmd += [flag, value]
    errpath = tmp_path / f"stderr-{uuid.uuid4().hex[:8]}"
    with open(errpath, "w") as errf:
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=errf, text=True, cwd=REPO)
        try:
            wait_for("uswap run to exit", lambda: proc.poll() is not None or " ready:" in errpath.read_text(),
                     timeout=timeout)
        finally:
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
                proc.wait(30)
                raise AssertionError(f"uswap run {args} started instead of refusing:\n{errpath.read_text()}")
    return subprocess.CompletedProcess(cmd, proc.returncode, proc.stdout.read(), errpath.read_text())


def assert_refused(res: subprocess.CompletedProcess, *words: str) -> None:
    assert res.returncode == 2, (res.returncode, res.stderr)
    errors = [ln for ln in res.stderr.splitlines() if ln.startswith("uswap: error: ")]
    assert len(errors) == 1, res.stderr
    assert "Traceback" not in res.stderr, res.stderr
    for w in words:
        assert w in res.stderr, (w, res.stderr)


@pytest.mark.parametrize("flag,value,words", [
    ("--max-resident", "12X", ("max_resident", "'12X'")),
    ("--max-resident", "-1G", ("max_resident", "'-1G'")),
    ("--max-resident", "4097", ("max_resident", "4097")),
    ("--max-resident", "4K", ("max_resident",)),
    ("--store-size", "lots", ("store_size", "'lots'")),
    ("--store-size", "0", ("store_size", "'0'")),
    ("--store-size", "1.5K", ("store_size",)),
    ("--log-level", "loud", ("log_level", "'loud'")),
])
def test_run_refuses_bad_flags(tmp_path, flag, value, words):
    backing = tmp_path / "swapfile"
    res = uswap_run(tmp_path, "--backing", str(backing), f"{flag}={value}")
    assert_refused(res, *words)
    assert not backing.exists()


@pytest.mark.parametrize("text,words", [
    ("max_residnet: 1G\n", ("max_residnet", "unknown key")),
    ("io_threads: four\n", ("io_threads", "'four'")),
    ("io_threads: 0\n", ("io_threads", "0")),
    ("high_watermark: high\n", ("high_watermark", "'high'")),
    ("max_resident: [1, 2]\n", ("max_resident", "[1, 2]")),
    ("mlock: maybe\n", ("mlock", "'maybe'")),
    ("write_retry_min: soon\n", ("write_retry_min", "'soon'")),
    ("read_failure: panic\n", ("read_failure", "'panic'")),
    ("low_watermark: 0.99\nhigh_watermark: 0.5\n", ("low_watermark",)),
    ("- just\n- a list\n", ("mapping",)),
    ("max_resident: 1G\n  bad: indent\n", ("YAML",)),
])
def test_run_refuses_bad_config(tmp_path, text, words):
    cfg = tmp_path / "uswap.yaml"
    if text.startswith("-") or "indent" in text:
        cfg.write_text(text)
    else:
        sizes = "store_size: 16M\n" + ("" if "max_resident" in text else "max_resident: 4M\n")
        cfg.write_text(sizes + text)
    backing = tmp_path / "swapfile"
    res = uswap_run(tmp_path, "--config", str(cfg), "--backing", str(backing))
    assert_refused(res, *words)
    # The message names the file the bad value is in.
    assert f"config file {cfg}" in res.stderr, res.stderr
    assert not backing.exists()


@pytest.mark.parametrize("flags,config,words", [
    (("--store-size=16M", "--max-resident=32M"), "",
     ("max_resident 32M (command line)", "store_size 16M (command line)")),
    (("--store-size=16M",), "max_resident: 64M\n",
     ("max_resident 64M (config file", "store_size 16M (command line)")),
    (("--store-size=512K", "--max-resident=256K"), "",
     ("write_batch 1M (default)", "store_size 512K (command line)")),
    (("--store-size=16M", "--max-resident=4M"), "readahead: 1M\n",
     ("readahead 1M (config file", "readahead_max 512K (default)")),
    (("--store-size=16M", "--max-resident=4M"), "write_batch: 64K\nreadahead_max: 32M\n",
     ("readahead_max 32M (config file", "store_size 16M (command line)")),
])
def test_run_refuses_impossible_combinations(tmp_path, flags, config, words):
    """Two settings that cannot hold together: refused with both values and
    where each came from, before anything is made."""
    cfg = tmp_path / "uswap.yaml"
    cfg.write_text(config)
    backing = tmp_path / "swapfile"
    res = uswap_run(tmp_path, "--config", str(cfg), "--backing", str(backing), *flags)
    assert_refused(res, *words)
    assert not backing.exists()


def test_version_flag_and_status(backing, start_daemon):
    import uswap
    res = subprocess.run([sys.executable, "-m", "uswap.cli", "--version"], capture_output=True,
                         text=True, cwd=REPO, timeout=30)
    assert res.returncode == 0 and res.stdout.strip() == f"uswap {uswap.__version__}", res
    assert uswap.__version__.count(".") == 2
    d = start_daemon(backing, store_size="16M", max_resident="1M")
    assert status(d)["version"] == uswap.__version__
    text = subprocess.run([sys.executable, "-m", "uswap.cli", "status", "--socket", d.socket],
                          capture_output=True, text=True, cwd=REPO, timeout=30)
    assert f"uswap {uswap.__version__}" in text.stdout, text
    assert d.stop() == 0


def made_files(*paths) -> list[str]:
    """Those of `paths` that exist, with the store's lock file beside each."""
    return [p for path in paths for p in (str(path), f"{path}.lock") if os.path.lexists(p)]


def test_a_busy_socket_is_refused_before_the_store_is_made(backing, start_daemon, tmp_path):
    """Another daemon's live socket: refused naming the path and the cause,
    and no store (nor its lock file) is left behind."""
    d = start_daemon(backing, store_size="16M", max_resident="1M")
    mine = tmp_path / "second-store"
    res = uswap_run(tmp_path, "--backing", str(mine), socket=d.socket)
    assert_refused(res, f"socket: {d.socket}", "another uswap daemon is listening")
    assert made_files(mine) == []
    assert status(d)["pid"] == d.proc.pid  # the first daemon is untouched
    assert d.stop() == 0


@pytest.mark.parametrize("where,words", [
    ("long", ("bytes long", "at most 107")),
    ("under-a-file", ("is not a directory",)),
    ("is-a-file", ("exists and is not a socket",)),
])
def test_an_unusable_socket_path_is_refused_naming_path_and_cause(tmp_path, where, words):
    (tmp_path / "plain").write_text("not a directory\n")
    path = {"long": str(tmp_path / ("s" * 120)) + ".sock",
            "under-a-file": str(tmp_path / "plain" / "uswap.sock"),
            "is-a-file": str(tmp_path / "plain")}[where]
    backing = tmp_path / "swapfile"
    res = uswap_run(tmp_path, "--backing", str(backing), socket=path)
    assert_refused(res, f"socket: {path}", *words)
    assert made_files(backing) == []
    assert (tmp_path / "plain").read_text() == "not a directory\n"


def test_a_socket_the_user_may_not_create_is_refused_naming_path_and_cause(tmp_path):
    """Run as an unprivileged user (root passes every permission check): a
    socket in a directory it may not write to, and one in a directory it may
    not create."""
    base = f"/run/uswap-test-{uuid.uuid4().hex[:8]}"
    os.mkdir(base, 0o755)  # root's: others may read it, not write
    try:
        backing = os.path.join(base, "swapfile")
        for path, cause in [(os.path.join(base, "uswap.sock"), "cannot bind it: Permission denied"),
                            (os.path.join(base, "sub", "uswap.sock"),
                             f"cannot create its directory {base}/sub: Permission denied")]:
            res = uswap_run(tmp_path, "--backing", backing, socket=path, as_user="nobody")
            assert_refused(res, f"socket: {path}", cause)
            assert os.listdir(base) == []
    finally:
        os.rmdir(base)


def test_a_socket_group_the_user_is_not_in_is_refused_naming_group_and_cause(tmp_path):
    """Only root or a member may give a file a group: the daemon's user
    (nobody here) is not in `users`. The socket bound for it is removed."""
    base = f"/run/uswap-test-{uuid.uuid4().hex[:8]}"
    os.mkdir(base, 0o755)
    nobody = pwd.getpwnam("nobody")
    os.chown(base, nobody.pw_uid, nobody.pw_gid)
    cfg = os.path.join(base, "uswap.yaml")  # where nobody may read it (tmp_path is root's alone)
    with open(cfg, "w") as f:
        f.write("store_size: 16M\nmax_resident: 4M\nsocket_group: users\n")
    try:
        path = os.path.join(base, "uswap.sock")
        res = uswap_run(tmp_path, "--config", cfg, "--backing", os.path.join(base, "swapfile"),
                        socket=path, as_user="nobody")
        assert_refused(res, f"socket: {path}: cannot give it socket_group users (gid 100): Operation not permitted")
        assert os.listdir(base) == ["uswap.yaml"]
    finally:
        shutil.rmtree(base, ignore_errors=True)


def test_a_refused_store_takes_the_socket_back(tmp_path):
    """The socket is bound first; a store refused after it leaves neither the
    socket nor the directory made for it."""
    sock_dir = tmp_path / "run" / "uswap"
    sock = sock_dir / "uswap.sock"
    res = uswap_run(tmp_path, "--backing", str(tmp_path), socket=str(sock))
    assert_refused(res, str(tmp_path))
    assert not sock.exists() and not sock_dir.exists()


def test_run_refuses_a_missing_config_file(tmp_path):
    res = uswap_run(tmp_path, "--config", str(tmp_path / "nope.yaml"), "--backing", str(tmp_path / "swapfile"))
    assert_refused(res, "nope.yaml")


@pytest.mark.parametrize("url,words", [
    ("s3://bucket/swapfile", ("s3://bucket/swapfile", "scheme")),
    ("ftp://host/swapfile", ("ftp://host/swapfile", "scheme")),
    ("swapfile", ("'swapfile'", "absolute")),
    ("nfs://", ("nfs://",)),
    ("nfs://host", ("nfs://host",)),
    ("nfs://host/export/", ("nfs://host/export/",)),
    ("nfs://host:2049/export/file", ("port",)),
    ("nfs://host/export/../file", ("'..'",)),
])
def test_run_refuses_bad_backing_urls(tmp_path, url, words):
    res = uswap_run(tmp_path, "--backing", url)
    assert_refused(res, *words)


def snapshot(path) -> tuple[bytes, int, int]:
    st = os.lstat(path)
    with open(path, "rb") as f:
        return f.read(), st.st_size, st.st_mtime_ns


def test_run_refuses_tmpfs_backing(tmp_path):
    shm = f"/dev/shm/uswap-test-{uuid.uuid4().hex[:12]}"
    try:
        res = uswap_run(tmp_path, "--backing", shm)
        assert_refused(res, shm, "tmpfs")
        assert not os.path.exists(shm), "refused, but left the store file it created"
        # An existing file there with data: refused, and not changed.
        with open(shm, "wb") as f:
            f.write(b"someone's data\n" * 100)
        before = snapshot(shm)
        res = uswap_run(tmp_path, "--backing", shm)
        assert_refused(res, shm, "tmpfs")
        assert snapshot(shm) == before
    finally:
        for leftover in (shm, shm + ".lock"):  # the lock file stays by design (store/lock.py)
            if os.path.exists(leftover):
                os.unlink(leftover)


def test_run_refuses_a_symlink_backing(tmp_path):
    target = tmp_path / "target"
    target.write_bytes(b"not yours\n" * 1000)
    link = tmp_path / "swaplink"
    link.symlink_to(target)
    before = snapshot(target)
    res = uswap_run(tmp_path, "--backing", str(link))
    assert_refused(res, str(link), "symbolic link")
    assert snapshot(target) == before
    # A dangling symlink: refused too, and nothing is created where it points.
    dangling = tmp_path / "dangling"
    dangling.symlink_to(tmp_path / "nowhere")
    res = uswap_run(tmp_path, "--backing", str(dangling))
    assert_refused(res, str(dangling), "symbolic link")
    assert not (tmp_path / "nowhere").exists()


def test_run_refuses_a_directory_backing(tmp_path):
    res = uswap_run(tmp_path, "--backing", str(tmp_path))
    assert_refused(res, str(tmp_path))


def foreign_location(backing: str, request) -> tuple[str, str]:
    """(path to write a foreign file at, --backing that names it)."""
    if not backing.startswith("nfs://"):
        return backing, backing
    from tests import conftest
    from tests.nfs_fixture import nfs_server_status
    export_dir = nfs_server_status(conftest.NFS_NAME)["export_dir"]
    name = backing.rsplit("/", 1)[1]
    return os.path.join(export_dir, name), backing


@pytest.mark.parametrize("content", [
    pytest.param(b"precious data\n" * 1000, id="text"),
    pytest.param(b"\x7fELF" + os.urandom(3 * PAGE), id="binary"),
    # Like an ISO 9660 image or a disk image: the first 32 KiB are zeros.
    pytest.param(b"\0" * 32768 + b"CD001 precious data" * 500, id="zero-first-pages"),
    pytest.param(b"\0" * PAGE + b"data after one zero page", id="zero-first-page"),
])
def test_run_refuses_a_file_that_is_not_a_store(backing, request, tmp_path, content):
    path, url = foreign_location(backing, request)
    with open(path, "wb") as f:
        f.write(content)
    before = snapshot(path)
    try:
        res = uswap_run(tmp_path, "--backing", url, "--store-size", "16M")
        assert_refused(res, url, "not a uswap store")
        after = snapshot(path)
        assert after[1] == before[1], f"the refused file's size changed: {before[1]} -> {after[1]}"
        assert after[0] == before[0], "the refused file's contents changed"
    finally:
        os.unlink(path)


def test_run_accepts_its_own_store_again(backing, start_daemon):
    """The check above must not refuse a real store: a store written by one
    daemon run (with pages swapped out) is accepted by the next."""
    d = start_daemon(backing, store_size="16M", max_resident="1M")
    proc = subprocess.run([sys.executable, "-m", "tests.workload", "--socket", d.socket, "--size", "4M",
                           "--passes", "2"], capture_output=True, text=True, cwd=REPO, timeout=60)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert d.stop() == 0
    d2 = start_daemon(backing, store_size="16M", max_resident="1M")
    assert status(d2)["store"]["used_bytes"] == 0
    assert d2.stop() == 0

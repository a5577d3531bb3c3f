"""Fixtures: a real daemon against a real store (an O_DIRECT file on the root
filesystem, or a file on the local NFS server over libnfs)."""
from __future__ import annotations

import os
import subprocess
import uuid

import pytest

from tests import deadline
from tests.daemon_proc import REPO, DaemonProc
from tests.nfs_fixture import instance

NFS_NAME = instance("uswap-test")

# Every page transition is checked (native/pagestate.h); in tests an illegal
# one is fatal -- raised in Python, abort() in the fast path -- in every
# daemon the tests start (they inherit this environment) and in the tests'
# own page tables.
os.environ["USWAP_STRICT_TRANSITIONS"] = "1"


def pytest_addoption(parser):
    parser.addoption("--soak", action="store_true", help="run the long soak tests")


# NFS instances the tests start (scripts/nfs-server keeps each export under
# /var/lib/uswap-nfs/NAME/export); their store files are test artifacts.
TEST_NFS_INSTANCES = tuple(instance(n) for n in ("uswap-test", "uswap-fail", "uswap-full", "uswap-cdeath",
                                                 "uswap-storetest", "uswap-fastpath"))


def pytest_sessionfinish(session, exitstatus):
    """Remove store files the tests left in their NFS exports: sparse at first,
    they fill up as pages are written, and CI machines are reused."""
    for name in TEST_NFS_INSTANCES:
        export = os.path.join("/var/lib/uswap-nfs", name, "export")
        if not os.path.isdir(export):
            continue
        for entry in os.scandir(export):
            if entry.is_file(follow_symlinks=False):
                try:
                    os.unlink(entry.path)
                except OSError:
                    pass


def pytest_collection_modifyitems(config, items):
    if config.getoption("--soak"):
        return
    skip = pytest.mark.skip(reason="soak test: run by hand with --soak")
    for item in items:
        if "soak" in item.keywords:
            item.add_marker(skip)


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_protocol(item, nextitem):
    """Every test, with its fixtures, runs under a deadline (tests/deadline.py)."""
    marker = item.get_closest_marker("deadline")
    guard = deadline.Deadline(item.nodeid, float(marker.args[0]) if marker else deadline.DEFAULT_S)
    try:
        yield
    finally:
        guard.done()


@pytest.fixture(scope="session")
def nfs_url():
    """The export URL of a local NFS server started for the whole session."""
    out = subprocess.run([os.path.join(REPO, "scripts", "nfs-server"), "start", "--name", NFS_NAME],
                         capture_output=True, text=True, timeout=120)
    if out.returncode != 0:
        raise RuntimeError(f"scripts/nfs-server start failed:\n{out.stdout}\n{out.stderr}")
    url = out.stdout.strip().splitlines()[-1]
    yield url
    subprocess.run([os.path.join(REPO, "scripts", "nfs-server"), "stop", "--name", NFS_NAME],
                   capture_output=True, timeout=120)


def _store_location(request, tmp_path, kind: str):
    """A fresh store location of `kind` ("file" or "nfs"), removed after the
    test whatever its outcome: a store is allocated whole, and a failing
    test's tmp_path (kept, pyproject.toml) must not keep its gigabyte."""
    if kind == "file":
        path = tmp_path / "swapfile"
        yield str(path)
        path.unlink(missing_ok=True)
        return
    url = request.getfixturevalue("nfs_url")
    name = f"swap-{uuid.uuid4().hex[:12]}"
    yield f"{url}/{name}"
    from tests.nfs_fixture import nfs_server_status
    export_dir = nfs_server_status(NFS_NAME).get("export_dir")
    if export_dir:
        try:
            os.unlink(os.path.join(export_dir, name))
        except FileNotFoundError:
            pass


@pytest.fixture(params=["file", "nfs"])
def backing(request, tmp_path):
    """A fresh store location of each kind."""
    yield from _store_location(request, tmp_path, request.param)


# Tests whose subject is the daemon's logic (the engine, the protocol, a
# client's misbehaviour), not the store's I/O path, run on the file store in
# CI (the 30-minute budget) and on both stores in the soak (USWAP_SOAK=N, as
# tests/system/test_survival.py). What each store does under the engine is
# the subject of the tests on `backing` and of tests/store.
ENGINE_BACKINGS = ["file", "nfs"] if os.environ.get("USWAP_SOAK") else ["file"]


@pytest.fixture(params=ENGINE_BACKINGS)
def engine_backing(request, tmp_path):
    """`backing`, on the stores ENGINE_BACKINGS names (only the file store in CI)."""
    yield from _store_location(request, tmp_path, request.param)


@pytest.fixture
def file_backing(tmp_path):
    """A file store location, removed after the test (as _store_location)."""
    yield from _store_location(None, tmp_path, "file")


@pytest.fixture
def start_daemon(tmp_path):
    """Factory: start_daemon(backing, **kw) -> DaemonProc; all are stopped at teardown."""
    started: list[DaemonProc] = []

    def start(backing: str, **kw) -> DaemonProc:
        d = DaemonProc(str(tmp_path), backing, **kw)
        started.append(d)
        return d

    yield start
    for d in started:
        d.kill()
    # Every test checks that no daemon it ran made an illegal page transition
    # (each is logged, in Python and in C, before it is fatal).
    illegal = [line for d in started for line in d.illegal_transitions()]
    assert not illegal, "illegal page transitions:\n" + "\n".join(illegal)

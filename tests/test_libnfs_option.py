"""libnfs is optional at build time (native/libnfs_option.py): built with
USWAP_BUILD_NFS=0 into a directory of its own, the native modules compile
without the libnfs headers and link no libnfs, uswap._nfs_cffi is not built,
a file store serves a workload, and an nfs:// backing is refused naming the
Debian package to install, leaving nothing behind."""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
import sysconfig

import pytest

import uswap
from tests.daemon_proc import REPO, DaemonProc

MIB = 1 << 20
PAGE = 4096

BUILD = """
import importlib.util, os, sys
sys.path.insert(0, os.path.join(os.getcwd(), "native"))
sys.dont_write_bytecode = True
import libnfs_option
out = sys.argv[1]
for entry in libnfs_option.cffi_modules():
    path = entry.split(":")[0]
    spec = importlib.util.spec_from_file_location(os.path.basename(path)[:-3], path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    module.ffi.compile(tmpdir=out)
    print(path)
"""


def python_without_this_checkout(where: str) -> str:
    """A Python environment at `where` that sees the test environment's
    libraries (cffi, yaml, numpy) but not its editable install of this
    checkout, whose import hook would find this checkout's uswap._nfs_cffi:
    a .pth naming a directory adds it to the path without running the .pth
    files in it."""
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", where], check=True, timeout=120)
    mine = subprocess.run([where + "/bin/python", "-c", "import sysconfig; print(sysconfig.get_path('purelib'))"],
                          capture_output=True, text=True, check=True).stdout.strip()
    with open(os.path.join(mine, "test-libraries.pth"), "w") as f:
        f.write("\n".join(p for p in sys.path if p.endswith("site-packages")) + "\n")
    return where + "/bin/python"


@pytest.fixture(scope="module")
def build_without_libnfs(tmp_path_factory) -> tuple[str, str]:
    """uswap built with USWAP_BUILD_NFS=0 in a directory of its own (the
    package's Python files and the native modules compiled for it), and the
    Python to run it with."""
    out = str(tmp_path_factory.mktemp("no-libnfs"))
    python = python_without_this_checkout(os.path.join(out, "env"))
    shutil.copytree(os.path.join(REPO, "uswap"), os.path.join(out, "uswap"),
                    ignore=shutil.ignore_patterns("*.so", "__pycache__"))
    env = dict(os.environ, USWAP_BUILD_NFS="0")
    res = subprocess.run([python, "-c", BUILD, out], cwd=REPO, env=env, capture_output=True, text=True,
                         timeout=600)
    assert res.returncode == 0, res.stderr[-5000:]
    assert "native/nfs_build.py" not in res.stdout.split(), res.stdout
    return out, python


def test_the_build_compiles_and_links_no_libnfs(build_without_libnfs):
    out, python = build_without_libnfs
    package = os.path.join(out, "uswap")
    built = sorted(f.split(".")[0] for f in os.listdir(package) if f.endswith(".so"))
    assert built == ["_dio_cffi", "_fastpath_cffi", "_iopool_cffi", "_uffd_cffi"], built
    for f in os.listdir(package):
        if f.endswith(".so"):
            needed = subprocess.run(["readelf", "-d", os.path.join(package, f)], capture_output=True,
                                    text=True, check=True).stdout
            assert "NEEDED" in needed and "libnfs" not in needed, (f, needed)
    # No source of the build reads a libnfs header: each preprocessed as the
    # build compiled it (USWAP_WITHOUT_LIBNFS, from libnfs_option.build_args).
    for f in os.listdir(package):
        if f.endswith("_cffi.c"):
            pre = subprocess.run(["gcc", "-E", "-DUSWAP_WITHOUT_LIBNFS", "-I", os.path.join(REPO, "native"),
                                  "-I", sysconfig.get_paths()["include"], os.path.join(package, f)],
                                 capture_output=True, text=True, check=True).stdout
            assert "libnfs.h" not in pre and "nfs_pwrite" not in pre, f
    # This directory's uswap is the one `python -m uswap.cli` runs from it.
    where = subprocess.run([python, "-c", "import uswap.store as s; print(s.__file__, s.nfs_built())"],
                           cwd=out, capture_output=True, text=True, check=True).stdout.split()
    assert where == [os.path.join(package, "store", "__init__.py"), "False"], where


def test_a_file_store_works_without_libnfs(build_without_libnfs, file_backing, tmp_path):
    out, python = build_without_libnfs
    d = DaemonProc(str(tmp_path), file_backing, store_size="64M", max_resident="8M", cwd=out, python=python)
    try:
        with uswap.connect(d.socket) as c:
            region = c.alloc(24 * MIB)  # three times the budget: pages go to the store and come back
            for off in range(0, region.size, PAGE):
                region.buf[off:off + 8] = off.to_bytes(8, "little")
            bad = sum(bytes(region.buf[off:off + 8]) != off.to_bytes(8, "little")
                      for off in range(0, region.size, PAGE))
            st = c.status()
            region.close()
        assert bad == 0
        assert st["swapouts_total"] > 0 and st["swapins_total"] > 0, st
        assert d.stop() == 0
    finally:
        d.kill()


def test_an_nfs_backing_is_refused_naming_the_package(build_without_libnfs, tmp_path):
    out, python = build_without_libnfs
    sock = str(tmp_path / "uswap.sock")
    res = subprocess.run([python, "-m", "uswap.cli", "run", "--backing", "nfs://127.0.0.1/export/swap",
                          "--store-size", "16M", "--max-resident", "4M", "--socket", sock],
                         cwd=out, capture_output=True, text=True, timeout=60)
    assert res.returncode == 2, res
    assert res.stderr.splitlines() == [
        "uswap: error: backing: nfs://127.0.0.1/export/swap: this uswap was built without libnfs, which nfs://"
        " stores need; install the Debian package libnfs-dev and build uswap again (scripts/install or"
        " scripts/setup), or use a file path (a local disk or a kernel NFS mount)"], res.stderr
    assert not os.path.exists(sock)

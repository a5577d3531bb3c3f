"""A forked child of a program whose regions a file mapping split, under
`uswap exec` (exec_forksplit.c): the child sees the untaken parts of each
region exactly as they were at the fork (swapped out meanwhile: the budget
is a fraction of the regions), its writes and the parent's stay on their
side, the file-mapped parts show the file (shared between the two when
MAP_SHARED, not when MAP_PRIVATE), a range munmapped in the middle of a
region faults in both, the child's own fork (a grandchild) sees the child's
values, and munmapping the split region in both gives the daemon back
every page of it while the parent lives on."""
from __future__ import annotations

import os
import subprocess
import sys

import pytest

from tests.daemon_proc import REPO
from tests.harness import assert_audit, finish_clean, status, wait_for

MiB = 1 << 20
FILE_TAG = 0xF11E000000000000


@pytest.mark.parametrize("mapping", ["private", "shared"])
def test_forked_child_gets_the_untaken_parts_of_a_split_region(tmp_path, start_daemon, mapping):
    exe = str(tmp_path / "exec_forksplit")
    out = subprocess.run(["gcc", "-O1", "-Wall", "-Werror", "-o", exe,
                          os.path.join(REPO, "tests", "system", "exec_forksplit.c")], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    data = tmp_path / "mapped.bin"
    data.write_bytes(b"".join((FILE_TAG | j).to_bytes(8, "little") for j in range(4 * MiB // 8)))
    d = start_daemon(str(tmp_path / "swapfile"), store_size="512M", max_resident="8M")
    proc = subprocess.Popen([sys.executable, "-m", "uswap.cli", "exec", "--socket", d.socket, "--min-size", "1M",
                             "--", exe, str(data), mapping], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, cwd=REPO)
    try:
        lines = []
        for line in proc.stdout:
            lines.append(line.rstrip("\n"))
            if line.startswith(("released", "failures")):
                break
        assert lines and lines[-1] == "released", (lines, d.log_text()[-3000:])
        # Both sides munmapped their copy of the split region, and the parent
        # lives on: the daemon holds no region of its size, and its recount
        # of charged pages and used slots agrees (nothing leaked, nothing
        # freed twice).
        try:
            st = wait_for("the split region released in parent and child", lambda: _released(d, 36 * MiB), 30)
        except AssertionError:
            raise AssertionError(f"not released: {status(d)['clients']}") from None
        assert_audit(st)
        out, err = proc.communicate("\n", timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    lines += out.splitlines()
    assert proc.returncode == 0 and lines[-1] == "failures 0", (lines, err[-2000:], d.log_text()[-3000:])
    assert err == "", err  # no "not mapped here", no set-up failure
    names = {line.split()[1] for line in lines if line.startswith("ok ")}
    assert {"child-sees-the-fork-snapshot", "child-sees-its-own-writes", "child-munmapped-range-faults",
            "grandchild-sees-the-child-at-its-fork", "parent-sees-its-own-writes", "child-munmap-split-region",
            "parent-munmap-split-region", f"parent-{mapping}-file-mapping-{mapping}"} <= names, lines
    st = status(d)
    # The regions went through the store (60 MiB through an 8 MiB budget),
    # and the child's came from a snapshot.
    assert st["swapouts_total"] > 0 and st["swapins_total"] > 0 and st["fork"]["forks_total"] >= 2, st
    text = finish_clean(d)  # every page of every side's regions given back: nothing charged, no slot used
    errors = [line for line in text.splitlines() if " ERROR " in line]
    assert not errors, errors  # no ioctl of the daemon failed on a part a foreign mapping took
    # The snapshot of each split region held its parts mapped in place only.
    assert text.count("snapshotted in 2 part(s)") >= 2, text[-3000:]


def _released(d, size: int) -> dict | None:
    """The status once no client holds a region of `size` bytes and no
    region is closing (the audit is there), else None."""
    st = status(d)
    sizes = [r["size_bytes"] for c in st["clients"] for r in c["regions"]]
    return st if size not in sizes and st["audit"] is not None else None

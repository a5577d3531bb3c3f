"""A MAP_FIXED mapping over a region that the kernel refuses, under `uswap
exec` (exec_failed_fixed.c): the kernel leaves the range as it was, so the
program (and a forked child) must still have every page it wrote there.
The preload used to mark the pages taken by a foreign mapping before it
asked the kernel: a refused mapping over a whole region released the
region (the program then died of SIGSEGV), and over part of one left the
part out of the fork's child, which lost the whole region."""
from __future__ import annotations

import subprocess
import sys

import pytest

from tests.daemon_proc import REPO
from tests.harness import assert_audit, build_test_program, finish_clean, status, wait_for

MiB = 1 << 20


@pytest.mark.parametrize("over", ["whole", "part"])
def test_a_refused_map_fixed_over_a_region_leaves_it_intact(tmp_path, start_daemon, over):
    exe = build_test_program(tmp_path, "exec_failed_fixed")
    data = tmp_path / "readonly.bin"
    data.write_bytes(b"\0" * (4 * MiB))
    d = start_daemon(str(tmp_path / "swapfile"), store_size="256M", max_resident="8M")
    run = subprocess.run([sys.executable, "-m", "uswap.cli", "exec", "--socket", d.socket, "--min-size", "1M",
                          "--", exe, str(data), over], capture_output=True, text=True, cwd=REPO, timeout=120)
    lines = run.stdout.splitlines()
    assert run.returncode == 0 and lines[-1:] == ["failures 0"], (run.returncode, lines, run.stderr[-2000:],
                                                                d.log_text()[-2000:])
    assert run.stderr == "", run.stderr      # no "could not be set up" of the child
    assert {"ok region-intact-after-refused-mapping", "ok child-sees-the-region"} <= set(lines), lines
    st = wait_for("the program's regions released", lambda: _released(d), 30)
    assert st["swapouts_total"] > 0, st       # the region went through the store (36 MiB, 8 MiB budget)
    assert_audit(st)
    finish_clean(d)


def _released(d) -> dict | None:
    """The status once no client holds a region, else None."""
    st = status(d)
    return None if st["clients"] or st["audit"] is None else st


def test_munmap_over_a_file_mapped_part_of_a_region_unmaps_the_file(tmp_path, start_daemon):
    """A file mapped MAP_FIXED over part of a region, then munmapped (alone,
    or with the whole region): no mapping of the file is left, as without
    uswap. The preload used to keep the munmapped file part reserved
    PROT_NONE and, when the region was released, to leave the file mapped
    in the parts it had taken."""
    exe = build_test_program(tmp_path, "exec_failed_fixed")
    data = tmp_path / "mapped.bin"
    data.write_bytes(b"\0" * (4 * MiB))
    d = start_daemon(str(tmp_path / "swapfile"), store_size="256M", max_resident="8M")
    run = subprocess.run([sys.executable, "-m", "uswap.cli", "exec", "--socket", d.socket, "--min-size", "1M",
                          "--", exe, str(data), "munmap"], capture_output=True, text=True, cwd=REPO, timeout=120)
    lines = run.stdout.splitlines()
    assert run.returncode == 0 and lines[-1:] == ["failures 0"], (run.returncode, lines, run.stderr[-2000:])
    assert_audit(wait_for("the program's regions released", lambda: _released(d), 30))
    finish_clean(d)

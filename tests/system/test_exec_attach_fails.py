"""A forked child whose region the daemon refuses to attach, under `uswap
exec` (exec_failed_fixed.c, attach): the child is told and goes on without the
region. It used to hang for ever: its set-up failure path munmapped the
parts it had registered while it still held the new userfaultfd (opened
with UNMAP events), so munmap waited for someone to read the UNMAP event
from a descriptor only the child itself held."""
from __future__ import annotations

import os
import signal
import subprocess
import sys

from tests.daemon_proc import REPO
from tests.harness import build_test_program, finish_clean

MiB = 1 << 20


def test_a_child_refused_its_region_goes_on_without_it(tmp_path, start_daemon):
    exe = build_test_program(tmp_path, "exec_failed_fixed")
    data = tmp_path / "mapped.bin"
    data.write_bytes(b"\0" * (4 * MiB))
    d = start_daemon(str(tmp_path / "swapfile"), store_size="256M", max_resident="8M")
    # Its own process group, so that a hung child is killed with it.
    proc = subprocess.Popen([sys.executable, "-m", "uswap.cli", "exec", "--socket", d.socket, "--min-size", "1M",
                             "--", exe, str(data), "attach"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            cwd=REPO, start_new_session=True)
    try:
        out, err = proc.communicate(timeout=60)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, err = proc.communicate()
        raise AssertionError(f"the program hung (a child stuck setting up its region): {out!r} {err!r}") from None
    lines = out.splitlines()
    assert proc.returncode == 0 and lines[-1:] == ["failures 0"], (proc.returncode, lines, err[-2000:])
    assert "could not be set up" in err, err     # the child was told
    # The daemon said why, naming the request refused (it said "alloc:" for a fork's attach).
    said = [line for line in d.log_text().splitlines() if "is not registered for MISSING|WP|MINOR" in line]
    assert said and all(": fork_attach: [" in line for line in said), d.log_text()[-2000:]
    finish_clean(d)

"""The semantics of anonymous memory under `uswap exec`, checked by a C
program of our own (exec_semantics.c) whose mappings are regions: zero on
first touch, MADV_DONTNEED/FREE discard, a partial munmap, MAP_FIXED over
part, mprotect and mlock on parts, fork (a private snapshot both ways),
mremap grow/shrink/regrow, threads mapping and discarding at once, large
malloc through the preloaded allocator; every region released at exit."""
from __future__ import annotations

import os
import subprocess
import sys

from tests.daemon_proc import REPO
from tests.harness import finish_clean, status


def test_anonymous_memory_semantics(tmp_path, start_daemon):
    exe = str(tmp_path / "exec_semantics")
    out = subprocess.run(["gcc", "-O1", "-Wall", "-Werror", "-pthread", "-o", exe,
                          os.path.join(REPO, "tests", "system", "exec_semantics.c")], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    d = start_daemon(str(tmp_path / "swapfile"), store_size="512M", max_resident="4M")
    out = subprocess.run([sys.executable, "-m", "uswap.cli", "exec", "--socket", d.socket, "--min-size", "1M",
                          "--", exe], capture_output=True, text=True, timeout=600, cwd=REPO)
    lines = out.stdout.splitlines()
    assert out.returncode == 0 and lines[-1] == "failures 0", (lines, out.stderr[-2000:], d.log_text()[-3000:])
    assert out.stderr == "", out.stderr
    names = {line.split()[1] for line in lines if line.startswith("ok ")}
    assert {"mmap-is-a-region", "fork-child-sees-snapshot", "mremap-grow", "threads", "malloc-large"} <= names
    st = status(d)
    assert st["swapouts_total"] > 0 and st["discarded_pages_total"] > 0 and st["fork"]["forks_total"] >= 1, st
    finish_clean(d)  # exit released every region: nothing charged, no slot used

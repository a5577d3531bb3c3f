"""A deadline for every test, so that one hung test fails in minutes with a
diagnosis instead of holding CI until its own timeout kills the whole run
with none (a daemon once blocked on a full notify socket and CI waited 90
minutes on it).

A test that runs past its deadline (DEFAULT_S, or `@pytest.mark.deadline(s)`):
1. every thread's Python stack is written to stderr (faulthandler), and the
   tail of the log of each daemon still running;
2. those daemons and workloads are SIGKILLed: a test blocked on one (a socket
   read without a timeout, a wait) then gets an error and fails normally;
3. if the test still has not returned GRACE_S later (a thread blocked in a
   page fault on a region whose uffd this process holds cannot be woken), the
   stacks are written again and the session exits with status 3.

Processes register themselves here when started (DaemonProc, Workload)."""
from __future__ import annotations

import faulthandler
import os
import signal
import subprocess
import sys
import threading
import weakref

DEFAULT_S = float(os.environ.get("USWAP_TEST_DEADLINE", "600"))
GRACE_S = 60.0

_live: "weakref.WeakSet[object]" = weakref.WeakSet()


def register(owner: object) -> None:
    """`owner` has `.proc` (a Popen) and optionally `.log_text()`: killed and
    its log shown if the running test overruns."""
    _live.add(owner)


def _report_and_kill(name: str, seconds: float) -> None:
    err = sys.__stderr__
    err.write(f"\n=== deadline: {name} still running after {seconds:.0f} s; every thread's stack:\n")
    err.flush()
    faulthandler.dump_traceback(file=err, all_threads=True)
    for owner in list(_live):
        proc: subprocess.Popen = owner.proc
        if proc.poll() is not None:
            continue
        log_text = getattr(owner, "log_text", None)
        if log_text is not None:
            try:
                err.write(f"=== deadline: log of pid {proc.pid} (last 3000 characters):\n{log_text()[-3000:]}\n")
            except OSError:
                pass
        err.write(f"=== deadline: SIGKILL pid {proc.pid} {' '.join(map(str, proc.args))[:200]}\n")
        try:
            os.kill(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    err.flush()


class Deadline:
    """Arms one timer per test; `done()` disarms it."""

    def __init__(self, name: str, seconds: float) -> None:
        self.name, self.seconds = name, seconds
        self.finished = threading.Event()
        self.thread = threading.Thread(target=self._watch, name="test-deadline", daemon=True)
        self.thread.start()

    def _watch(self) -> None:
        if self.finished.wait(self.seconds):
            return
        _report_and_kill(self.name, self.seconds)
        if self.finished.wait(GRACE_S):
            return
        sys.__stderr__.write(f"\n=== deadline: {self.name} did not return {GRACE_S:.0f} s after its daemons were "
                             f"killed; ending the session. Stacks:\n")
        faulthandler.dump_traceback(file=sys.__stderr__, all_threads=True)
        sys.__stderr__.flush()
        os._exit(3)

    def done(self) -> None:
        self.finished.set()

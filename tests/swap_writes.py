"""What reclaim run by given processes wrote to kernel swap, from the
kernel's own record of it: the tracepoint vmscan:mm_vmscan_write_folio,
one event per folio reclaim writes out (a shmem page going to kernel swap
among them), recorded in the task that runs the reclaim -- for
MADV_PAGEOUT, the thread that asked (process_madvise included).

Why not Swap: in /proc/PID/smaps: it counts every page of a mapping that
is in kernel swap, whoever put it there. A host's own reclaim may page out
a memfd's unmapped pages too: this machine runs DAMON (a kdamond with a
physical-address "pageout" scheme for cold, unmapped, non-anonymous pages,
shmem included), and a page the access sampler took out of the client's
page tables is just that once the sampler has let go of it. Traced with
this tracepoint, the 4-8 kB of sampled pages test_sampling_adversarial.py
found in Swap: now and then came each time right after kdamond.0 wrote
pages out (damon_pa_apply_scheme), and the daemon's threads wrote none.

The events are kept in a tracefs instance of this module's own (the
global trace buffer is left alone), filtered in the kernel to the tasks
given and the threads they start later (set_event_pid, event-fork).
Root only, as swapon is; tracefs is mounted when it is not yet (_tracefs)."""
from __future__ import annotations

import itertools
import os
import subprocess
from types import TracebackType

_TRACING = "/sys/kernel/tracing"
_EVENT = "events/vmscan/mm_vmscan_write_folio"
_names = itertools.count()


def _tracefs() -> str:
    """Where tracefs is mounted; mounted at /sys/kernel/tracing when it is
    nowhere yet (a freshly booted machine: systemd mounts it only on
    demand, and CI machines boot fresh). The mount is left in place, as
    systemd's would be."""
    for path in (_TRACING, "/sys/kernel/debug/tracing"):
        if os.path.isdir(f"{path}/instances"):
            return path
    subprocess.run(["mount", "-t", "tracefs", "nodev", _TRACING], check=True)
    assert os.path.isdir(f"{_TRACING}/instances"), f"tracefs mounted at {_TRACING} has no instances/"
    return _TRACING


def _write(path: str, text: str) -> None:
    with open(path, "w") as f:
        f.write(text)


class SwapWrites:
    """Folios written out by reclaim in process `pid` (every thread it has
    now or starts later) while this is open: `count()`."""

    def __init__(self, pid: int) -> None:
        self.dir = f"{_tracefs()}/instances/uswap-swap-writes-{os.getpid()}-{next(_names)}"
        os.mkdir(self.dir)
        try:
            _write(f"{self.dir}/buffer_size_kb", "256")
            _write(f"{self.dir}/options/event-fork", "1")
            tids = os.listdir(f"/proc/{pid}/task")
            _write(f"{self.dir}/set_event_pid", " ".join(tids))
            _write(f"{self.dir}/{_EVENT}/enable", "1")
        except BaseException:
            self.close()
            raise

    def count(self) -> int:
        """Folios written so far: the events in the buffer and those it had
        no room for (overrun; the only event enabled is this one)."""
        total = 0
        for cpu in os.listdir(f"{self.dir}/per_cpu"):
            with open(f"{self.dir}/per_cpu/{cpu}/stats") as f:
                total += sum(int(line.split()[1]) for line in f if line.startswith(("entries:", "overrun:")))
        return total

    def close(self) -> None:
        try:
            _write(f"{self.dir}/{_EVENT}/enable", "0")
        except OSError:
            pass
        os.rmdir(self.dir)

    def __enter__(self) -> "SwapWrites":
        return self

    def __exit__(self, kind: type[BaseException] | None, value: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()

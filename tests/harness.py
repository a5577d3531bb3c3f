"""Helpers shared by the integration tests: a workload child (or a client
program of a test's own) whose output is read with deadlines, control requests
with deadlines, polling, the checks that end a test, and the runner of
scenario clients (a test module run as its own client process)."""
from __future__ import annotations

import contextlib
import json
import os
import queue
import signal
import socket
import subprocess
import sys
import threading
import time
from typing import Iterator

from tests import deadline
from tests.daemon_proc import REPO
from uswap import protocol


class Workload:
    """A tests.workload process whose JSON output lines are read on a thread,
    so that every wait on it has a deadline (a client whose daemon died hangs
    in a page fault for ever)."""

    def __init__(self, socket: str, *args: str) -> None:
        self._spawn([sys.executable, "-m", "tests.workload", "--socket", socket, *args])

    @classmethod
    def script(cls, code: str, *args: object) -> "Workload":
        """A client program of a test's own (`python -c code ARGS...`, from
        the repository root, so it can import uswap and tests), its JSON
        output lines read with deadlines like a workload's."""
        w = cls.__new__(cls)
        w._spawn([sys.executable, "-c", code, *map(str, args)])
        return w

    def _spawn(self, argv: list[str]) -> None:
        """Start the client process and the thread that reads its output."""
        self.proc = subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                     text=True, cwd=REPO)
        deadline.register(self)  # killed if the test overruns its deadline
        self.pid = self.proc.pid
        self.lines: list[dict] = []
        self._q: queue.Queue = queue.Queue()
        threading.Thread(target=self._pump, daemon=True).start()

    def _pump(self) -> None:
        for raw in self.proc.stdout:
            self._q.put(raw)
        self._q.put(None)

    def next(self, timeout: float) -> dict:
        """The next output line; fails if none comes within `timeout` s."""
        try:
            raw = self._q.get(timeout=timeout)
        except queue.Empty:
            raise AssertionError(f"workload {self.pid}: no output within {timeout}s (lines so far {self.lines})") from None
        if raw is None:
            self._q.put(None)
            self.proc.wait(10)
            raise AssertionError(f"workload {self.pid} exited {self.proc.returncode}: {self.lines}"
                                 f" {self.proc.stderr.read()[-3000:]}")
        line = json.loads(raw)
        self.lines.append(line)
        return line

    def wait_line(self, pred, timeout: float) -> dict:
        deadline = time.monotonic() + timeout
        while True:
            line = self.next(max(0.0, deadline - time.monotonic()))
            if pred(line):
                return line

    def send(self, text: str = "go\n") -> None:
        self.proc.stdin.write(text)
        self.proc.stdin.flush()

    def poll(self):
        return self.proc.poll()

    def finish(self, timeout: float) -> list[dict]:
        """Wait for exit (bounded) and return every output line."""
        try:
            self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.kill()
            raise AssertionError(f"workload {self.pid} still running after {timeout}s: {self.lines}") from None
        while True:
            raw = self._q.get(timeout=10)  # the pump ends with None once stdout closes
            if raw is None:
                self._q.put(None)
                return self.lines
            self.lines.append(json.loads(raw))

    def finish_ok(self, timeout: float) -> list[dict]:
        lines = self.finish(timeout)
        assert self.proc.returncode == 0, (lines, self.proc.stderr.read()[-3000:])
        assert lines and lines[-1] == {"done": True, "errors": 0}, lines
        return lines

    def finish_done(self, timeout: float, daemon=None) -> list[dict]:
        """finish(), then the program must have exited 0 after its last line
        {"done": True}; a failure shows its stderr (and the daemon's log)."""
        lines = self.finish(timeout)
        log = daemon.log_text()[-3000:] if daemon is not None else ""
        assert self.proc.returncode == 0, (lines, self.proc.stderr.read()[-3000:], log)
        assert lines and lines[-1] == {"done": True}, (lines, log)
        return lines

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()


@contextlib.contextmanager
def finishing(d, code: str, *args: object, timeout: float = 60.0) -> Iterator[Workload]:
    """A client program of a test's own (Workload.script) on daemon `d`
    (argv: its socket, then `args`): at the end of the block it must finish
    done within `timeout` (Workload.finish_done); killed whatever happens."""
    c = Workload.script(code, d.socket, *args)
    try:
        yield c
        c.finish_done(timeout, d)
    finally:
        c.kill()


def ctl(d, msg: dict, timeout: float = 10.0) -> dict:
    """One request on a fresh connection, with a deadline: uswap.Client has
    none, and a wedged daemon must fail the test, not hang it."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.settimeout(timeout)
        s.connect(d.socket)
        protocol.send(s, {"op": "hello", "version": protocol.VERSION})
        protocol.recv(s)
        protocol.send(s, msg)
        reply, fds = protocol.recv(s)
    for fd in fds:
        os.close(fd)
    assert reply.get("ok"), (msg, reply)
    return reply


def status(d) -> dict:
    return ctl(d, {"op": "status"})["status"]


def inject(d, spec: dict) -> None:
    ctl(d, {"op": "inject", "spec": spec})


def all_threads_stopped(pid: int) -> bool:
    """Every thread of `pid` is in the stopped state (T) of a group stop."""
    states = []
    for tid in os.listdir(f"/proc/{pid}/task"):
        try:
            with open(f"/proc/{pid}/task/{tid}/stat") as f:
                states.append(f.read().rsplit(")", 1)[1].split()[0])
        except FileNotFoundError:
            continue  # a thread that exited meanwhile
    return bool(states) and all(s in "Tt" for s in states)


def freeze(pid: int) -> None:
    """SIGSTOP `pid` and return once every thread of it has stopped.
    kill() returns before the stop is complete: the kernel wakes one thread
    to begin the group stop, and the others stop only after it ran; meanwhile
    a worker thread of a server still answers requests (on a loaded machine
    for milliseconds: 1 run in 4 of the fast path's page-20 tests read their
    page "through a frozen server")."""
    os.kill(pid, signal.SIGSTOP)
    wait_for(f"every thread of pid {pid} stopped", lambda: all_threads_stopped(pid), timeout=30, interval=0.001)


def wait_for(what: str, cond, timeout: float, interval: float = 0.02):
    """Poll `cond()` until it returns something truthy; fail after `timeout` s."""
    deadline = time.monotonic() + timeout
    while True:
        got = cond()
        if got:
            return got
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(interval)


def wait_cgroup_removed(path: str, timeout: float = 30) -> None:
    """rmdir a cgroup (v1) the test made, once its last task has gone (a
    killed process leaves it only when reaped)."""
    def removed():
        try:
            os.rmdir(path)
        except FileNotFoundError:
            return True
        except OSError:
            return False
        return True
    wait_for(f"{path} removed", removed, timeout=timeout)


def wait_clean(d, timeout: float = 30) -> dict:
    """Every region gone: nothing charged, no slot used, accounting exact."""
    def clean():
        st = status(d)
        if (not st["clients"] and st["resident_bytes"] == 0 and st["store"]["used_bytes"] == 0
                and st["writeback_inflight"] == 0 and st["reads_inflight"] == 0
                and st["audit"] is not None):
            return st
        return None
    try:
        st = wait_for("every region released", clean, timeout)
    except AssertionError:
        raise AssertionError(f"not clean: {status(d)}") from None
    assert_audit(st)
    return st


def assert_no_io_overlap(st: dict) -> dict:
    """Invariant 3 seen from the store (the InjectingStore counts both): no
    second write to an offset while one is in flight, no read of it either.
    Returns the store's injection counters."""
    inj = st["store"]["inject"]
    assert inj["overlapping_writes"] == 0 and inj["reads_during_write"] == 0, inj
    return inj


def assert_audit(st: dict) -> None:
    """The engine's own recount of charged pages, used slots and pages being
    evicted agrees (None while a region is closing)."""
    audit = st.get("audit")
    assert audit is None or (audit["charged_ok"] and audit["slots_ok"] and audit["evicting_ok"]), audit


def finish_clean(d, stop_timeout: float = 120.0) -> str:
    """The end of a test whose clients are gone: every region released with
    exact accounting, a clean exit on SIGTERM, no traceback in the daemon's
    log. Returns the whole log, for the test's own checks."""
    wait_clean(d)
    rc = d.stop(timeout=stop_timeout)
    text = d.log_text()
    assert "Traceback" not in text, text[-5000:]
    assert rc == 0, text[-5000:]
    return text


# ---------------------------------------------------------------- scenario clients
# A test module can be its own client program: `python -m MODULE NAME SOCKET N`
# runs the module's scenario_NAME(client, N) in a process of its own (which
# forks, say) and prints the scenario's result as one JSON line.

def settled_audit(client, timeout: float = 30) -> dict:
    """The daemon's audit once it has one: status gives None while a region
    is closing (its I/O still returning), e.g. a forked parent's region the
    scenario just closed."""
    return wait_for("an audit with no region closing", lambda: client.status()["audit"], timeout)


def scenario_main(scenarios: dict, argv: list[str], stops_daemon: tuple[str, ...] = ()) -> None:
    """The client side: connect, run scenario_NAME from `scenarios` (the
    module's globals()), add the daemon's audit unless the scenario is one
    of `stops_daemon`, print the result."""
    import uswap
    name, sock, n = argv[0], argv[1], int(argv[2])
    c = uswap.connect(sock)
    result = scenarios[f"scenario_{name}"](c, n)
    if name not in stops_daemon:
        result["audit"] = settled_audit(c)
        c.close()
    print(json.dumps(result), flush=True)


def run_scenario(module: str, d, name: str, n: int, timeout: float) -> dict:
    """The pytest side: run scenario NAME of `module` against daemon `d`
    (bounded by `timeout`); its result, with the tail of its stderr (the
    children's own account) under "stderr"."""
    # Its own process group: on a timeout the scenario's forked children are
    # killed with it, never left hanging on a daemon the test then stops.
    proc = subprocess.Popen([sys.executable, "-m", module, name, d.socket, str(n)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=REPO,
                            start_new_session=True)
    try:
        stdout, stderr = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        stdout, stderr = proc.communicate()
        raise AssertionError(f"scenario {name} still running after {timeout}s: {stderr[-3000:]}") from None
    out = subprocess.CompletedProcess(proc.args, proc.returncode, stdout, stderr)
    assert out.returncode == 0, (out.stdout, out.stderr[-3000:])
    result = json.loads(out.stdout.strip().splitlines()[-1])
    result["stderr"] = out.stderr[-3000:]
    return result


def wait_forks_released(d, timeout: float = 30) -> None:
    """Every client gone, fork snapshots included: every slot reference
    dropped, every page uncharged, no snapshot pending."""
    def released():
        st = d.status()
        if (not st["clients"] and st["audit"] is not None and st["store"]["used_bytes"] == 0
                and st["fork"]["fork_pending"] == 0):
            return st
        return None
    try:
        st = wait_for("every client and snapshot released", released, timeout)
    except AssertionError:
        st = d.status()
        raise AssertionError(f"daemon still holds pages: {st['clients']} {st['store']} "
                             f"{st['audit']} {st['fork']}") from None
    assert st["audit"]["charged_ok"] and st["audit"]["slots_ok"], st["audit"]
    assert st["audit"]["slot_references"] == 0 and st["resident_bytes"] == 0, st["audit"]


def build_test_program(tmp_path, name: str, *flags: str) -> str:
    """tests/system/NAME.c compiled (warnings are errors) into tmp_path;
    the executable's path."""
    exe = os.path.join(str(tmp_path), name)
    out = subprocess.run(["gcc", "-O1", "-Wall", "-Werror", *flags, "-o", exe,
                          os.path.join(REPO, "tests", "system", f"{name}.c")], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    return exe

"""Helpers shared by the integration tests: a workload child whose output is
read with deadlines, control requests with deadlines, and polling."""
from __future__ import annotations

import json
import os
import queue
import socket
import subprocess
import sys
import threading
import time

from tests.daemon_proc import REPO
from uswap import protocol


class Workload:
    """A tests.workload process whose JSON output lines are read on a thread,
    so that every wait on it has a deadline (a client whose daemon died hangs
    in a page fault for ever)."""

    def __init__(self, socket: str, *args: str) -> None:
        self._spawn([sys.executable, "-m", "tests.workload", "--socket", socket, *args])

    def _spawn(self, argv: list[str]) -> None:
        """Start the client process and the thread that reads its output."""
        self.proc = subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                     text=True, cwd=REPO)
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

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()


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


def assert_audit(st: dict) -> None:
    """The engine's own recount of charged pages and used slots agrees (None
    while a region is closing)."""
    audit = st.get("audit")
    assert audit is None or (audit["charged_ok"] and audit["slots_ok"]), audit

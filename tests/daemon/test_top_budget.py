"""`uswap top --once/--iterations`, `uswap budget`, `max_resident: auto`,
client names and the daemon's own RSS and CPU in status, against a real
daemon with a real workload."""
from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
import time

import pytest

import uswap
from tests import nfs_fixture
from tests.daemon_proc import REPO
from tests.harness import Workload
from uswap import config, protocol
from uswap.daemon.autobudget import HostMemory, auto_target

M = 1 << 20


def uswap_cli(*args: str, timeout: float = 60) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "uswap.cli", *args], capture_output=True, text=True,
                          cwd=REPO, timeout=timeout)


def wait_for(pred, timeout: float, what: str):
    deadline = time.monotonic() + timeout
    while True:
        got = pred()
        if got:
            return got
        assert time.monotonic() < deadline, what
        time.sleep(0.05)  # polling a condition with a deadline


# ---------------------------------------------------------------- uswap top

def test_top_once_shows_a_running_workload(start_daemon, file_backing):
    d = start_daemon(file_backing, max_resident="16M")
    w = Workload(d.socket, "--size", "48M", "--passes", "6", "--order", "random", "--name", "top-watched")
    try:
        w.wait_line(lambda x: x.get("pass") == 1, timeout=120)
        r = uswap_cli("top", "--once", "--interval", "0.5", "--socket", d.socket)
        assert r.returncode == 0, r.stderr
        out = r.stdout
        assert int(re.search(r"faults/s (\d+)", out).group(1)) > 0, out
        assert int(re.search(r"swap-ins/s (\d+) pages", out).group(1)) > 0, out
        assert re.search(r"swap-outs/s \d+ pages", out), out
        assert re.search(r"resident \[[#.]+\] [\d.]+ MiB of 16.0 MiB budget \(fixed\)", out), out
        assert re.search(r"daemon rss [\d.]+ MiB\s+cpu \d+%", out), out
        # The latency histogram: one row per bucket of latency.BOUNDS and +Inf.
        assert "<= 10us" in out and "<= 1000ms" in out and "> 1000ms" in out, out
        client = [line for line in out.splitlines() if line.split()[:1] == ["top-watched"]]
        assert len(client) == 1 and str(w.pid) in client[0], out
        # --iterations N prints N views.
        r = uswap_cli("top", "--iterations", "2", "--interval", "0.3", "--socket", d.socket)
        assert r.returncode == 0, r.stderr
        assert len(re.findall(r"faults/s \d+", r.stdout)) == 2, r.stdout
        # Pass 2, which ran while top watched, verified pass 1: nothing was
        # lost meanwhile. (The passes after it are not needed: the workload
        # is killed instead of waited out, 20 s of CI.)
        line = w.wait_line(lambda x: x.get("pass") == 2, timeout=120)
        assert line["errors"] == 0, w.lines
    finally:
        w.kill()


def test_top_refuses_bad_arguments_and_a_missing_daemon(tmp_path):
    r = uswap_cli("top", "--iterations", "0", "--socket", str(tmp_path / "none.sock"))
    assert r.returncode == 2 and "--iterations 0 must be at least 1" in r.stderr
    r = uswap_cli("top", "--once", "--interval", "0", "--socket", str(tmp_path / "none.sock"))
    assert r.returncode == 2 and "--interval 0.0 must be above 0 seconds" in r.stderr
    r = uswap_cli("top", "--once", "--socket", str(tmp_path / "none.sock"))
    assert r.returncode == 1 and "cannot reach the uswap daemon" in r.stderr


# ---------------------------------------------------------------- uswap budget

def test_budget_cut_with_a_workload_running(start_daemon, file_backing):
    d = start_daemon(file_backing, store_size="256M", max_resident="64M")
    # Random writes over 32 MiB until told (at most 120 s); each thread
    # checks its last write to every page at the end (through the 16 MiB
    # budget: most of those seconds are that check's swap-ins).
    w = Workload(d.socket, "--size", "32M", "--shared", "--seconds", "120", "--until-told", "--threads", "2")
    try:
        w.wait_line(lambda x: "region" in x, timeout=60)
        wait_for(lambda: d.status()["resident_bytes"] > 24 * M, 30, "the workload never grew past 24M")
        assert d.status()["swapouts_total"] == 0  # it all fits in 64M
        r = uswap_cli("budget", "16M", "--socket", d.socket)
        assert r.returncode == 0, r.stderr
        assert r.stdout.strip() == "budget: 64.0 MiB -> 16.0 MiB (fixed)"
        st = d.status()
        assert st["max_resident_bytes"] == 16 * M and st["budget"]["mode"] == "fixed"
        # Reclaim brings residency under the new budget while the workload goes on.
        st = wait_for(lambda: (lambda s: s if s["resident_bytes"] <= 16 * M and s["swapins_total"] > 0 else None)(
            d.status()), 60, "resident never fell under the new budget with swap-ins following")
        assert st["swapouts_total"] > 0
        assert w.poll() is None, "the workload ended before the budget cut was seen: nothing was tested"
        assert "budget: max_resident 64.0 MiB -> 16.0 MiB (set by uswap budget)" in d.log_text()
        w.send("stop\n")
        lines = w.finish(120)
        assert w.proc.returncode == 0 and lines[-1] == {"done": True, "errors": 0}, lines
        assert any(x.get("writes", 0) > 0 and x.get("errors") == 0 for x in lines), lines
    finally:
        w.kill()


@pytest.mark.parametrize("size, error", [
    ("12Q", "budget: '12Q' is not a size; use a byte count"),
    ("1G", "budget: '1G' is above the store's size (256.0 MiB)"),
    ("4K", "budget: '4K' is too small; use at least 64K"),
    ("5000", "budget: '5000' is not a positive multiple of 4096 bytes"),
])
def test_budget_refuses_a_bad_size_naming_it(start_daemon, file_backing, size, error):
    d = start_daemon(file_backing, store_size="256M", max_resident="32M")
    r = uswap_cli("budget", size, "--socket", d.socket)
    assert r.returncode == 1 and error in r.stderr, r.stderr
    assert d.status()["max_resident_bytes"] == 32 * M  # unchanged
    # Refusal is an answer: the same connection serves the next request.
    with d.client() as c:
        with pytest.raises(uswap.UswapError, match="not a size"):
            c.set_budget(True)
        assert c.set_budget(48 * M)["max_resident_bytes"] == 48 * M


# ---------------------------------------------------------------- max_resident: auto

def test_auto_budget_follows_the_host_within_its_bounds(start_daemon, file_backing):
    # All of the host's available memory: more than auto_max, so auto_max it
    # is (auto_pressure 100: other work on this host cannot shrink it here).
    d = start_daemon(file_backing, store_size="256M", max_resident=None,
                     config={"max_resident": "auto", "auto_min": "8M", "auto_max": "48M", "auto_fraction": 1.0,
                             "auto_interval": "200ms", "auto_pressure": 100})
    st = d.status()
    assert st["max_resident_bytes"] == 48 * M, st["budget"]
    b = st["budget"]
    assert b["mode"] == "auto" and b["auto"] is True  # `auto`: the mode as a number for the metrics
    assert b["auto_min_bytes"] == 8 * M and b["auto_max_bytes"] == 48 * M
    assert b["host_available_bytes"] > 0 and b["host_total_bytes"] >= b["host_available_bytes"]
    assert "budget: auto: max_resident 48.0 MiB -> 48.0 MiB" not in d.log_text()  # no change, no line
    # A fixed budget stops the automatic one; the host's timer does not undo it.
    with d.client() as c:
        c.set_budget(16 * M)
        ticks = d.log_text().count("budget: auto:")
        wait_for(lambda: d.status()["uptime_s"] > st["uptime_s"] + 1.0, 10, "daemon clock")
        assert d.status()["max_resident_bytes"] == 16 * M
        # `uswap budget auto` follows the host again at once, and says so.
        reply = c.set_budget("auto")
        assert reply["mode"] == "auto" and reply["max_resident_bytes"] == 48 * M
    assert d.log_text().count("budget: auto: max_resident 16.0 MiB -> 48.0 MiB") == 1
    assert d.log_text().count("budget: auto:") == ticks + 1


def test_auto_budget_held_at_auto_min(start_daemon, file_backing):
    # A tiny share of the host's memory is below auto_min: auto_min it is.
    d = start_daemon(file_backing, store_size="256M", max_resident=None,
                     config={"max_resident": "auto", "auto_min": "8M", "auto_max": "48M",
                             "auto_fraction": 0.0001})
    assert d.status()["max_resident_bytes"] == 8 * M
    line = [x for x in d.log_text().splitlines() if "budget: auto: max_resident 48.0 MiB -> 8.0 MiB" in x]
    assert len(line) == 1 and "held within auto_min 8.0 MiB .. auto_max 48.0 MiB" in line[0]
    assert "host available" in line[0]


def test_sighup_switches_between_fixed_and_auto(start_daemon, file_backing):
    d = start_daemon(file_backing, store_size="256M", max_resident=None, config={"max_resident": "32M"})
    assert d.status()["budget"]["mode"] == "fixed"
    d.write_config({"max_resident": "auto", "auto_min": "8M", "auto_max": "40M", "auto_fraction": 1.0,
                    "auto_pressure": 100})
    d.proc.send_signal(signal.SIGHUP)
    wait_for(lambda: "SIGHUP: reloaded" in d.log_text(), 30, "no reload line")
    st = d.status()
    assert st["budget"]["mode"] == "auto" and st["max_resident_bytes"] == 40 * M
    assert "budget_auto False -> True" in d.log_text()
    d.write_config({"max_resident": "24M"})
    d.proc.send_signal(signal.SIGHUP)
    wait_for(lambda: d.log_text().count("SIGHUP: reloaded") == 2, 30, "no second reload line")
    st = d.status()
    assert st["budget"]["mode"] == "fixed" and st["max_resident_bytes"] == 24 * M


def _cfg(**kw) -> config.Config:
    return config.load(None, {"store_size": "1G", "max_resident": "auto", **kw})


def test_auto_target_shrinks_under_pressure_and_grows_back_by_steps():
    cfg = _cfg(auto_min="64M", auto_max="1G")
    cfg.auto_fraction, cfg.auto_pressure = 0.5, 10.0
    roomy = HostMemory(available=4 << 30, total=8 << 30, pressure=0.0)
    pressed = HostMemory(available=4 << 30, total=8 << 30, pressure=25.0)
    # Under pressure: 10% less each interval, even with memory available.
    new, why = auto_target(512 * M, 0, pressed, cfg)
    assert new == int(512 * M * 0.9) // 4096 * 4096 and "shrinking under memory pressure" in why
    # Without: back up by at most 10% per interval, towards the share.
    new, why = auto_target(400 * M, 0, roomy, cfg)
    assert new == int(400 * M * 1.1) // 4096 * 4096 and "growing back" in why
    # The first look takes the share at once, held within the bounds.
    assert auto_target(100 * M, 0, roomy, cfg, first=True)[0] == 1 << 30
    # The share counts what the daemon holds: it could give that back.
    small = HostMemory(available=200 * M, total=8 << 30, pressure=None)
    assert auto_target(300 * M, 200 * M, small, cfg)[0] == 200 * M
    # Never below auto_min, whatever the pressure.
    assert auto_target(65 * M, 0, pressed, cfg)[0] == 64 * M


# ---------------------------------------------------------------- names, RSS, CPU

def test_status_names_clients_and_shows_the_daemon_itself(start_daemon, file_backing):
    d = start_daemon(file_backing)
    with uswap.connect(d.socket, name="render node 7") as named, uswap.connect(d.socket) as plain:
        named.alloc(1 * M)
        plain.alloc(1 * M)
        st = named.status()
        r = uswap_cli("status", "--socket", d.socket)
    assert "render node 7 pid" in r.stdout and "daemon     rss" in r.stdout, r.stdout
    names = sorted(c["name"] for c in st["clients"])
    # Unnamed, a client is its process's comm (this test's python).
    with open("/proc/self/comm") as f:
        assert names == sorted(["render node 7", f.read().strip()])
    assert st["daemon"]["rss_bytes"] > 1 * M
    assert st["daemon"]["cpu_user_seconds_total"] + st["daemon"]["cpu_system_seconds_total"] > 0


@pytest.mark.parametrize("name", ["", "x" * 65, "tab\there", 7])
def test_hello_refuses_a_bad_name_naming_it(start_daemon, file_backing, name):
    d = start_daemon(file_backing)
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.settimeout(10)
        s.connect(d.socket)
        protocol.send(s, {"op": "hello", "version": 1, "name": name})
        reply, _ = protocol.recv(s)
    assert reply["ok"] is False
    assert reply["error"] == f"hello: name {name!r} is not accepted; use 1 to 64 printable characters"


# ---------------------------------------------------------------- real memory pressure

class PageCacheThrasher:
    """Real memory pressure, contained: a process in a memory cgroup of
    32 MiB reading a 48 MiB file of its own over and over. Its file pages
    refault on every pass (workingset thrashing), which the kernel counts
    as memory stall: /proc/pressure/memory "some" rises for the whole host
    while nothing outside the cgroup loses memory."""

    def __init__(self, workdir, name: str) -> None:
        v1 = "/sys/fs/cgroup/memory"
        if os.path.isdir(v1):
            self.cgroup, limit_file = os.path.join(v1, name), "memory.limit_in_bytes"
        else:
            self.cgroup, limit_file = os.path.join("/sys/fs/cgroup", name), "memory.max"
        os.makedirs(self.cgroup, exist_ok=True)
        with open(os.path.join(self.cgroup, limit_file), "w") as f:
            f.write(str(32 * M))
        data = os.path.join(workdir, "thrash.dat")
        procs = os.path.join(self.cgroup, "cgroup.procs")

        def enter() -> None:
            with open(procs, "w") as f:
                f.write(str(os.getpid()))

        # The file is written from inside the cgroup, so its pages are charged there.
        self.proc = subprocess.Popen(["bash", "-c", f"head -c {48 * M} /dev/urandom > {data};"
                                      f" while :; do cat {data} > /dev/null; done"], preexec_fn=enter)

    def stop(self) -> None:
        # Every task of the cgroup (bash and its cat) is ours: kill them by pid.
        with open(os.path.join(self.cgroup, "cgroup.procs")) as f:
            for pid in map(int, f.read().split()):
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
        self.proc.wait()
        deadline = time.monotonic() + 10
        while True:
            try:
                os.rmdir(self.cgroup)
                return
            except OSError:
                assert time.monotonic() < deadline, f"cannot remove {self.cgroup}"
                time.sleep(0.1)  # its last task is still exiting


def test_auto_budget_shrinks_under_real_pressure_and_grows_back(start_daemon, file_backing, tmp_path):
    from uswap.daemon.autobudget import psi_some_avg10
    assert psi_some_avg10() is not None, "this kernel has no /proc/pressure/memory (PSI)"
    d = start_daemon(file_backing, store_size="256M", max_resident=None,
                     config={"max_resident": "auto", "auto_min": "8M", "auto_max": "48M", "auto_fraction": 1.0,
                             "auto_interval": "500ms", "auto_pressure": 1.0})
    # At auto_max once the host is calm (other work may have left some pressure).
    wait_for(lambda: d.status()["max_resident_bytes"] == 48 * M, 120, "the budget never reached auto_max")
    name = f"{nfs_fixture.PREFIX}uswap-psi-{os.getpid()}"
    hog = PageCacheThrasher(str(tmp_path), name)
    try:
        st = wait_for(lambda: (lambda s: s if s["max_resident_bytes"] < 40 * M else None)(d.status()), 90,
                      "the budget never shrank under memory pressure")
        assert st["budget"]["memory_pressure"] >= 1.0, st["budget"]
        assert "shrinking under memory pressure" in d.log_text()
    finally:
        hog.stop()
    # The pressure decays (avg10); the budget grows back, 10% an interval, to auto_max.
    wait_for(lambda: d.status()["max_resident_bytes"] == 48 * M, 120, "the budget never grew back")
    assert "growing back, memory pressure below auto_pressure 1%" in d.log_text()


def test_only_root_or_the_daemons_user_may_change_the_budget(start_daemon, file_backing):
    """A real unprivileged user (nobody) on the socket may read status but
    not change the budget every client shares."""
    d = start_daemon(file_backing, store_size="256M", max_resident="32M")
    # Let nobody reach the socket: its directory (entered as root first, as
    # the test's temporary directories above it are root's only) and the socket.
    os.chmod(os.path.dirname(d.socket), 0o755)
    os.chmod(d.socket, 0o666)
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: become nobody, ask, report through the pipe, exit
        try:
            os.close(r)
            os.chdir(os.path.dirname(d.socket))
            os.setgroups([])
            os.setgid(65534)
            os.setuid(65534)
            with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
                s.settimeout(10)
                s.connect(os.path.basename(d.socket))
                protocol.send(s, {"op": "hello", "version": 1})
                protocol.recv(s)
                protocol.send(s, {"op": "budget", "max_resident": "16M"})
                reply, _ = protocol.recv(s)
                protocol.send(s, {"op": "status"})
                status, _ = protocol.recv(s)
            os.write(w, json.dumps({"budget": reply, "status_ok": status["ok"]}).encode())
        finally:
            os._exit(0)
    os.close(w)
    with os.fdopen(r) as f:
        got = json.loads(f.read() or "{}")
    os.waitpid(pid, 0)
    assert got["budget"] == {"ok": False, "error": "budget: uid 65534 may not change the daemon's budget;"
                                                  f" only root or the daemon's user (uid {os.getuid()}) may"}
    assert got["status_ok"] is True
    assert d.status()["max_resident_bytes"] == 32 * M

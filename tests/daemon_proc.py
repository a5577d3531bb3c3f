"""Start and stop a real `uswap run` process for integration tests."""
from __future__ import annotations

import json
import os
import resource
import signal
import subprocess
import sys
import time

import uswap
from tests import deadline

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# What the daemon logs for each illegal page transition (pagetable.TransitionCheck,
# fastpath.c fp_illegal_transition).
ILLEGAL_TRANSITION = "illegal page transition"


class DaemonProc:
    def __init__(self, workdir: str, backing: str, store_size: str = "512M",
                 max_resident: str | None = "32M", inject: dict | None = None,
                 extra: list[str] | None = None, config: dict | None = None,
                 nofile: tuple[int, int] | None = None, log_level: str | None = "info",
                 extra_env: dict[str, str] | None = None, cwd: str = REPO,
                 python: str = sys.executable, state_dir: str | None = None,
                 module: str = "uswap.cli") -> None:
        """`nofile`: (soft, hard) RLIMIT_NOFILE to start the daemon under;
        `extra_env`: variables added to the daemon's environment; `cwd` and
        `python`: where and with what it runs, so which uswap `python -m
        uswap.cli` finds (this checkout's, by default).
        `state_dir`: the daemon's --state-dir (default WORKDIR/state): a
        daemon restarted on it (restart()) adopts what the last one left.
        `module`: what `python -m` runs with `uswap.cli`'s arguments (a
        test's launcher that wraps daemon code first, e.g.
        tests.writeback_hooks)."""
        self.workdir = workdir
        self.socket = os.path.join(workdir, "uswap.sock")
        self.log_path = os.path.join(workdir, "daemon.log")
        self.log_paths = [self.log_path]  # one per start: restart() begins daemon-N.log
        self.backing = backing
        self.state_dir = state_dir or os.path.join(workdir, "state")
        args = [python, "-m", module, "run", "--backing", backing,
                "--store-size", store_size, "--socket", self.socket, "--state-dir", self.state_dir]
        # A flag wins over the config file, also on a reload (SIGHUP): None
        # leaves max_resident / log_level to the file.
        if max_resident is not None:
            args += ["--max-resident", max_resident]
        if log_level is not None:
            args += ["--log-level", log_level]
        self.config_path = os.path.join(workdir, "uswap.yaml")
        if config:
            self.write_config(config)
            args += ["--config", self.config_path]
        args += extra or []
        env = dict(os.environ)
        env.pop("USWAP_INJECT", None)
        env.update(extra_env or {})
        if inject is not None:
            env["USWAP_INJECT"] = json.dumps(inject)
        self.args, self.env, self.cwd = args, env, cwd
        self.limit = None if nofile is None else lambda: resource.setrlimit(resource.RLIMIT_NOFILE, nofile)
        self._spawn()
        self.wait_ready()

    def _spawn(self, extra: list[str] | None = None) -> None:
        self.log = open(self.log_path, "w")
        self.proc = subprocess.Popen(self.args + (extra or []), stdout=self.log, stderr=subprocess.STDOUT,
                                     env=self.env, cwd=self.cwd, preexec_fn=self.limit)
        deadline.register(self)  # killed, its log shown, if the test overruns its deadline

    def restart(self, wait: bool = True, inject: dict | None = None, extra: list[str] | None = None,
                module: str | None = None) -> None:
        """Start a new daemon with the same arguments, socket and state dir
        (it adopts what the last one left there) once the last one has
        exited (kill() or stop() it first). Its log is a new file,
        daemon-N.log (log_text() reads the newest; all_log_text() all).
        `inject`: USWAP_INJECT for the new one (None: none); `extra`: more
        arguments for this start only; `module`: what `python -m` runs from
        now on (None: as before)."""
        if self.proc.poll() is None:
            raise RuntimeError(f"restart: daemon pid {self.proc.pid} is still running; kill() or stop() it first")
        if module is not None:
            self.args = [self.args[0], "-m", module, *self.args[3:]]
        self.env = dict(self.env)
        self.env.pop("USWAP_INJECT", None)
        if inject is not None:
            self.env["USWAP_INJECT"] = json.dumps(inject)
        self.log_path = os.path.join(self.workdir, f"daemon-{len(self.log_paths)}.log")
        self.log_paths.append(self.log_path)
        self._spawn(extra)
        if wait:
            self.wait_ready()

    def handover(self, timeout: float = 120.0) -> int:
        """Upgrade in place: start a successor with `uswap run --handover`
        (it asks this daemon to hand over and takes its socket, store and
        state dir over once it exits), wait for it to be ready; the old
        daemon's exit status."""
        old, old_log = self.proc, self.log
        self.log_path = os.path.join(self.workdir, f"daemon-{len(self.log_paths)}.log")
        self.log_paths.append(self.log_path)
        self._spawn(["--handover"])
        try:
            rc = old.wait(timeout)
        finally:
            old_log.close()
        self.wait_ready(timeout)
        return rc

    def write_config(self, config: dict) -> None:
        """(Re)write the daemon's config file (it reads it again on SIGHUP)."""
        with open(self.config_path, "w") as f:
            json.dump(config, f)  # JSON is YAML

    def wait_ready(self, timeout: float = 30.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"daemon exited with {self.proc.returncode}:\n{self.log_text()}")
            if " ready:" in self.log_text():
                return
            time.sleep(0.02)  # polling a condition with a deadline, not synchronising by sleep
        raise RuntimeError(f"daemon not ready after {timeout}s:\n{self.log_text()}")

    def log_text(self) -> str:
        with open(self.log_path) as f:
            return f.read()

    def all_log_text(self) -> str:
        """The logs of every start of this daemon (restart()), oldest first."""
        out = []
        for path in self.log_paths:
            with open(path) as f:
                out.append(f.read())
        return "".join(out)

    def illegal_transitions(self) -> list[str]:
        """The daemon's log lines reporting an illegal page transition (the
        Python engine's and the fast path's both say ILLEGAL_TRANSITION), of
        every start."""
        return [line for line in self.all_log_text().splitlines() if ILLEGAL_TRANSITION in line]

    def client(self) -> uswap.Client:
        return uswap.connect(self.socket)

    def status(self) -> dict:
        with self.client() as c:
            return c.status()

    def inject(self, spec: dict) -> None:
        with self.client() as c:
            c.inject(spec)

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 120.0) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
                raise
        self.log.close()
        return self.proc.returncode

    def kill(self, sig: int = signal.SIGKILL) -> int:
        """Kill the daemon with `sig` (SIGKILL: nothing of it runs, as in a
        crash; its state dir stays for restart()) and reap it; its exit
        status (negative: the signal)."""
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
            self.proc.wait()
        self.log.close()
        return self.proc.returncode

    @property
    def pid(self) -> int:
        return self.proc.pid

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

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


class DaemonProc:
    def __init__(self, workdir: str, backing: str, store_size: str = "512M",
                 max_resident: str = "32M", inject: dict | None = None,
                 extra: list[str] | None = None, config: dict | None = None,
                 nofile: tuple[int, int] | None = None) -> None:
        """`nofile`: (soft, hard) RLIMIT_NOFILE to start the daemon under."""
        self.workdir = workdir
        self.socket = os.path.join(workdir, "uswap.sock")
        self.log_path = os.path.join(workdir, "daemon.log")
        self.backing = backing
        args = [sys.executable, "-m", "uswap.cli", "run", "--backing", backing,
                "--store-size", store_size, "--max-resident", max_resident,
                "--socket", self.socket, "--log-level", "info"]
        if config:
            cfg_path = os.path.join(workdir, "uswap.yaml")
            with open(cfg_path, "w") as f:
                json.dump(config, f)  # JSON is YAML
            args += ["--config", cfg_path]
        args += extra or []
        env = dict(os.environ)
        env.pop("USWAP_INJECT", None)
        if inject is not None:
            env["USWAP_INJECT"] = json.dumps(inject)
        self.log = open(self.log_path, "w")
        limit = None if nofile is None else lambda: resource.setrlimit(resource.RLIMIT_NOFILE, nofile)
        self.proc = subprocess.Popen(args, stdout=self.log, stderr=subprocess.STDOUT, env=env, cwd=REPO,
                                     preexec_fn=limit)
        self.wait_ready()

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

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()
        self.log.close()

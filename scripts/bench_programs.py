"""Program workloads of scripts/bench.py: real programs no one here wrote,
each reporting its own throughput, run with W bytes of data on one system:

  exec-stress  stress-ng --vm 1 --vm-bytes W --vm-keep, for --seconds:
               bogo ops/s (real time) from its --metrics-brief line, and
               how often its stressor was OOM-killed (stress-ng restarts
               it and counts the run successful; the table says so)
  exec-redis   redis-server holding W bytes of 1 KiB values (W/1 KiB keys
               written through redis-cli --pipe); redis-benchmark GETs of
               uniformly random keys, 4 connections: requests/s

The program is started through a prefix that puts it on the system:
  unlimited    nothing: ordinary memory, no limit (the baseline)
  kernel-swap  a shell that moves itself into the bench's memory cgroup
               (limited to the budget, swap file on) and execs the program
  uswap-file   `uswap exec --socket S --`: its anonymous memory in uswap
Only the program is on the system; redis-cli and redis-benchmark run outside.
Each repetition of exec-stress is a fresh stress-ng; exec-redis loads once,
runs a throwaway benchmark pass, then `repeat` measured passes.
"""
from __future__ import annotations

import csv
import io
import os
import re
import statistics
import subprocess
import sys
import time

PROGRAM_WORKLOADS = ("exec-stress", "exec-redis")
UNITS = {"exec-stress": "bogo ops/s", "exec-redis": "GET requests/s"}
VALUE_BYTES = 1024


def system_prefix(system: str, socket: str | None, cgroup: str) -> list[str]:
    """The argv prefix that runs a program on `system`."""
    if system == "unlimited":
        return []
    if system == "kernel-swap":
        return ["sh", "-c", 'echo $$ > "$0/cgroup.procs" && exec "$@"', cgroup]
    if system == "uswap-file":
        return [sys.executable, "-m", "uswap.cli", "exec", "--socket", socket, "--"]
    raise ValueError(f"program workloads do not run on {system!r}")


def measure(workload: str, prefix: list[str], size: int, workdir: str, params: dict, repeat: int,
            timeout: float) -> dict:
    """{"rates": [one per repetition]} or {"error": why}."""
    try:
        if workload == "exec-stress":
            reps = [stress_ng_rate(prefix, size, params["program_seconds"], timeout) for _ in range(repeat)]
            return {"rates": [rate for rate, _ in reps], "oom_kills": sum(kills for _, kills in reps)}
        return {"rates": redis_rates(prefix, size, workdir, params["redis_gets"], repeat, timeout)}
    except (RuntimeError, OSError, subprocess.SubprocessError) as e:
        return {"error": f"{workload}: {e}"}


def summarize(system: str, workload: str, result: dict) -> dict:
    run = {"workload": workload, "system": system, "rate_unit": UNITS[workload], "rate": None}
    if result.get("error"):
        run["error"] = result["error"].strip()
        return run
    run["rate"] = float(statistics.median(result["rates"]))
    if result.get("oom_kills"):
        run["oom_kills"] = result["oom_kills"]
    run["repeats"] = len(result["rates"])
    run["per_repeat"] = [{"rate": round(r, 2)} for r in result["rates"]]
    return run


# ------------------------------------------------------------------ stress-ng

METRIC = re.compile(r"metrc: \[\d+\] vm\s+\d+\s+[\d.]+\s+[\d.]+\s+[\d.]+\s+([\d.]+)")


def stress_ng_rate(prefix: list[str], size: int, seconds: int, timeout: float) -> tuple[float, int]:
    """(bogo ops/s, how many times the stressor was OOM-killed): -v makes
    stress-ng say so."""
    out = subprocess.run([*prefix, "stress-ng", "--vm", "1", "--vm-bytes", str(size), "--vm-keep",
                          "-t", f"{seconds}s", "--metrics-brief", "-v"], capture_output=True, text=True,
                         timeout=timeout)
    text = out.stdout + out.stderr
    m = METRIC.search(text)
    if out.returncode != 0 or not m or "successful run completed" not in text:
        raise RuntimeError(f"stress-ng exited with {out.returncode}:\n{text[-1500:]}")
    return float(m.group(1)), text.count("assuming killed by OOM killer")


# ---------------------------------------------------------------------- redis

def _cli(sock: str, *args: str, timeout: float = 120) -> str:
    out = subprocess.run(["redis-cli", "-s", sock, *args], capture_output=True, text=True, timeout=timeout)
    return out.stdout.strip()


def _wait_ping(server: subprocess.Popen, sock: str, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while not (os.path.exists(sock) and _cli(sock, "PING") == "PONG"):
        if server.poll() is not None:
            raise RuntimeError(f"redis-server exited with {server.returncode}:\n{server.stdout.read()[-1500:]}")
        if time.monotonic() > deadline:
            raise RuntimeError(f"redis-server did not answer within {timeout:.0f} s")
        time.sleep(0.1)  # polling a condition with a deadline


def _load_commands(keys: int) -> bytes:
    """RESP SET commands for key:000000000000 .. (redis-benchmark's
    __rand_int__ spelling), each value 1 KiB naming its key."""
    buf = io.BytesIO()
    for k in range(keys):
        key = f"key:{k:012d}".encode()
        value = (key + b" ") * (VALUE_BYTES // (len(key) + 1) + 1)
        value = value[:VALUE_BYTES]
        buf.write(b"*3\r\n$3\r\nSET\r\n$%d\r\n%s\r\n$%d\r\n%s\r\n" % (len(key), key, len(value), value))
    return buf.getvalue()


def redis_rates(prefix: list[str], size: int, workdir: str, gets: int, repeat: int, timeout: float) -> list[float]:
    keys = size // VALUE_BYTES
    sock = os.path.join(workdir, "redis.sock")
    server = subprocess.Popen([*prefix, "redis-server", "--port", "0", "--unixsocket", sock, "--save", "",
                               "--appendonly", "no", "--dir", workdir, "--daemonize", "no", "--logfile", ""],
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        _wait_ping(server, sock, 60)
        load = subprocess.run(["redis-cli", "-s", sock, "--pipe"], input=_load_commands(keys),
                              capture_output=True, timeout=timeout)
        if load.returncode != 0 or _cli(sock, "DBSIZE") != str(keys):
            raise RuntimeError(f"loading {keys} keys failed: {load.stdout[-500:]!r} {load.stderr[-500:]!r}")
        _benchmark(sock, keys, max(gets // 5, 1), timeout)  # the throwaway warm-up pass
        rates = [_benchmark(sock, keys, gets, timeout) for _ in range(repeat)]
        _cli(sock, "SHUTDOWN", "NOSAVE")
        server.wait(timeout=60)
        return rates
    finally:
        if server.poll() is None:
            server.kill()  # our own child, by its PID
            server.wait()


def _benchmark(sock: str, keys: int, gets: int, timeout: float) -> float:
    out = subprocess.run(["redis-benchmark", "-s", sock, "-c", "4", "-n", str(gets), "-r", str(keys), "--csv",
                          "GET", "key:__rand_int__"], capture_output=True, text=True, timeout=timeout)
    rows = list(csv.reader(io.StringIO(out.stdout)))
    if out.returncode != 0 or len(rows) < 2:
        raise RuntimeError(f"redis-benchmark exited with {out.returncode}:\n{(out.stdout + out.stderr)[-1500:]}")
    return float(rows[1][1])

"""The systems scripts/bench.py compares, seen from the parent process:
the kernel-swap baseline (swap file + cgroup v1 memory limit), the local NFS
server, child processes, and cleanup of what an interrupted run left behind.

Everything here undoes exactly what it did itself, by path or by PID; stop()
methods are idempotent and safe after a partial start().
"""
from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)
CGROUP_ROOT = "/sys/fs/cgroup/memory"
CGROUP = os.path.join(CGROUP_ROOT, "uswap-bench")
WORKDIR_PREFIX = "uswap-bench."


def log(msg: str) -> None:
    """Progress on stderr; a closed stderr (`| head`) must not stop the run."""
    try:
        print(msg, file=sys.stderr, flush=True)
    except (BrokenPipeError, OSError):
        pass


def _write(path: str, value: str) -> None:
    with open(path, "w") as f:
        f.write(value)


def _read(path: str) -> str:
    with open(path) as f:
        return f.read().strip()


def active_swaps() -> list[str]:
    with open("/proc/swaps") as f:
        lines = f.read().splitlines()[1:]
    # /proc/swaps escapes blanks in paths as \040
    return [line.split()[0].replace("\\040", " ") for line in lines if line.strip()]


def _pid_alive(pid: int) -> bool:
    return os.path.exists(f"/proc/{pid}")


def cleanup_stale(root: str) -> None:
    """Undo what an earlier bench run that died (SIGKILL, power) left behind:
    its swap file still active, its work directory, an empty bench cgroup.
    Only objects named after a bench run whose PID is gone are touched."""
    pat = re.compile(re.escape(os.path.join(root, WORKDIR_PREFIX)) + r"(\d+)(/|$)")
    for path in active_swaps():
        m = pat.match(path)
        if m and not _pid_alive(int(m.group(1))):
            log(f"bench: swapoff {path} left by dead run {m.group(1)}")
            subprocess.run(["swapoff", path], check=False)
    if os.path.isdir(root):
        for name in os.listdir(root):
            m = re.fullmatch(re.escape(WORKDIR_PREFIX) + r"(\d+)", name)
            if m and not _pid_alive(int(m.group(1))):
                path = os.path.join(root, name)
                if not any(p.startswith(path + "/") for p in active_swaps()):
                    log(f"bench: removing {path} left by dead run {m.group(1)}")
                    shutil.rmtree(path, ignore_errors=True)
    if os.path.isdir(CGROUP) and not _read(os.path.join(CGROUP, "cgroup.procs")):
        try:
            os.rmdir(CGROUP)
        except OSError:
            pass


class KernelSwap:
    """A swap file on the same filesystem as the uswap store, and the cgroup
    v1 memory cgroup CGROUP limited to `limit` bytes. Only active between
    start() and stop(): while any swap area is on, these VMs run a DAMON scheme
    that pages out idle memory of every process."""

    def __init__(self, swapfile: str, swap_size: int, limit: int) -> None:
        self.swapfile = swapfile
        self.swap_size = swap_size
        self.limit = limit
        self.file_made = self.swap_on = self.cg_made = False
        self.other_swaps: list[str] = []

    def start(self) -> None:
        if not os.path.isdir(CGROUP_ROOT):
            raise RuntimeError(f"no cgroup v1 memory hierarchy at {CGROUP_ROOT}")
        if os.path.isdir(CGROUP):
            if _read(os.path.join(CGROUP, "cgroup.procs")):
                raise RuntimeError(f"{CGROUP} has processes in it: is another benchmark running?")
            os.rmdir(CGROUP)
        os.mkdir(CGROUP)
        self.cg_made = True
        self.set_limit(self.limit)
        sw = os.path.join(CGROUP, "memory.swappiness")
        if os.path.exists(sw):
            _write(sw, "60")
            if int(_read(sw)) == 0:
                raise RuntimeError(f"{sw} stays 0: the cgroup would not swap")

        self.other_swaps = active_swaps()
        self.file_made = True
        r = subprocess.run(["fallocate", "-l", str(self.swap_size), self.swapfile],
                           capture_output=True, text=True)
        if r.returncode != 0:
            subprocess.run(["dd", "if=/dev/zero", f"of={self.swapfile}", "bs=1M",
                            f"count={self.swap_size >> 20}", "status=none"], check=True)
        os.chmod(self.swapfile, 0o600)
        subprocess.run(["mkswap", self.swapfile], check=True, capture_output=True)
        subprocess.run(["swapon", self.swapfile], check=True)
        self.swap_on = True
        if self.swapfile not in active_swaps():
            raise RuntimeError(f"swapon {self.swapfile}: not listed in /proc/swaps")

    def set_limit(self, limit: int) -> None:
        """The cgroup's memory limit (a run with its own budget sets it, and back)."""
        _write(os.path.join(CGROUP, "memory.limit_in_bytes"), str(limit))
        got = int(_read(os.path.join(CGROUP, "memory.limit_in_bytes")))
        if abs(got - limit) > 4096:
            raise RuntimeError(f"{CGROUP}: memory.limit_in_bytes is {got}, wanted {limit}")

    def stop(self) -> None:
        errors = []
        if self.swap_on:
            r = subprocess.run(["swapoff", self.swapfile], capture_output=True, text=True)
            if r.returncode == 0 or self.swapfile not in active_swaps():
                self.swap_on = False
            else:
                errors.append(f"swapoff {self.swapfile}: {r.stderr.strip()}")
        if self.file_made and not self.swap_on:
            try:
                os.unlink(self.swapfile)
            except FileNotFoundError:
                pass
            self.file_made = False
        if self.cg_made:
            for _ in range(50):  # a just-exited child may still be leaving the cgroup
                try:
                    os.rmdir(CGROUP)
                    self.cg_made = False
                    break
                except FileNotFoundError:
                    self.cg_made = False
                    break
                except OSError:
                    time.sleep(0.1)  # bounded retry while the kernel finishes the exit
            if self.cg_made:
                errors.append(f"rmdir {CGROUP}: still busy")
        if errors:
            raise RuntimeError("; ".join(errors))


class NfsServer:
    """The local NFS server (scripts/nfs-server, its own instance NAME), or an
    export given by URL. Stopped at the end only if this run started it."""

    def __init__(self, name: str = "uswap-bench", url: str | None = None) -> None:
        self.name = name
        self.url = url
        self.started = False
        self.export_dir: str | None = None
        self.script = os.path.join(HERE, "nfs-server")

    def status(self) -> tuple[bool, dict]:
        r = subprocess.run([self.script, "status", "--name", self.name], capture_output=True, text=True)
        try:
            info = json.loads(r.stdout.strip().splitlines()[-1])
        except (ValueError, IndexError):
            info = {}
        return r.returncode == 0, info

    def start(self) -> str:
        if self.url:
            return self.url
        running, _ = self.status()
        r = subprocess.run([self.script, "start", "--name", self.name], capture_output=True, text=True)
        if r.returncode != 0:
            raise RuntimeError(f"scripts/nfs-server start failed:\n{r.stderr}")
        self.started = not running
        self.url = r.stdout.strip().splitlines()[-1]
        _, info = self.status()
        self.export_dir = info.get("export_dir")
        return self.url

    def remove(self, filename: str) -> None:
        """Delete a file we made in the export (only possible for our local server)."""
        if self.export_dir:
            try:
                os.unlink(os.path.join(self.export_dir, filename))
            except FileNotFoundError:
                pass

    def stop(self) -> None:
        if self.started:
            subprocess.run([self.script, "stop", "--name", self.name], capture_output=True, text=True)
            self.started = False


def run_child(spec: dict, workdir: str, timeout: float) -> dict:
    """Run scripts/bench_child.py on `spec`; returns its result (or {"error": ...})."""
    tag = f"{spec['system']}.{spec['workload']}"
    spec = dict(spec, result=os.path.join(workdir, f"{tag}.result.json"))
    spec_path = os.path.join(workdir, f"{tag}.spec.json")
    with open(spec_path, "w") as f:
        json.dump(spec, f)
    out_path = os.path.join(workdir, f"{tag}.out")
    with open(out_path, "w") as out:
        proc = subprocess.Popen([sys.executable, os.path.join(HERE, "bench_child.py"), spec_path],
                                stdout=out, stderr=subprocess.STDOUT, cwd=REPO)
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            proc.kill()  # our own child, by its PID
            proc.wait()
            return {"error": f"timed out after {timeout:.0f} s (killed)"}
        except BaseException:  # the bench itself interrupted: end our own child first
            proc.kill()
            proc.wait()
            raise
    try:
        with open(spec["result"]) as f:
            result = json.load(f)
    except (OSError, ValueError):
        with open(out_path) as f:
            tail = f.read()[-2000:]
        result = {"error": f"child exited with {proc.returncode} and no result\n{tail}"}
    if proc.returncode and "error" not in result:
        result["error"] = f"child exited with {proc.returncode}"
    return result

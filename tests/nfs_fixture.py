"""Start, inspect, crash and stop a local NFS server (scripts/nfs-server) from tests.

Plain functions, so conftest fixtures and individual test modules can share
them.  Each named instance is an nfs-ganesha in its own network namespace;
its export URL is reachable from the calling namespace.  Needs root.
"""
from __future__ import annotations

import json
import os
import subprocess
import zlib

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NFS_SERVER = os.path.join(REPO, "scripts", "nfs-server")
# Each checkout's NFS instances are its own: a session's teardown stops the
# instances it started, and two checkouts testing at once on one machine
# (a CI rehearsal beside a worktree's tests) stopped each other's server
# when both were named "uswap-test". USWAP_TEST_NFS_PREFIX sets the prefix
# (two sessions of one checkout at once need one each).
PREFIX = os.environ.get("USWAP_TEST_NFS_PREFIX", f"t{zlib.crc32(REPO.encode()) & 0xffff:04x}-")


def instance(name: str) -> str:
    """The NFS instance name this test run uses for `name`."""
    return PREFIX + name


def _run(*args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    if not os.path.exists(NFS_SERVER):
        raise FileNotFoundError(f"{NFS_SERVER} is missing: cannot run a local NFS server")
    return subprocess.run([NFS_SERVER, *args], capture_output=True, text=True, timeout=timeout)


def nfs_server_status(name: str = instance("uswap-test")) -> dict:
    """The parsed `status` JSON (url, ganesha_pid, rpcbind_pid, export_dir, ...).
    `running` is false (and the pids null) when the instance is down."""
    out = _run("status", "--name", name)
    if out.returncode not in (0, 3):
        raise RuntimeError(f"nfs-server status --name {name} failed ({out.returncode}):\n{out.stderr}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def start_nfs_server(name: str = instance("uswap-test"), export_dir: str | None = None) -> dict:
    """Start (or find running) instance `name`; returns its status JSON, whose
    "url" is the export URL that `start` printed (nfs://ADDR/export)."""
    args = ["start", "--name", name] + (["--dir", export_dir] if export_dir else [])
    out = _run(*args)
    if out.returncode != 0:
        raise RuntimeError(f"nfs-server {' '.join(args)} failed ({out.returncode}):\n"
                           f"{out.stdout}\n{out.stderr}")
    url = out.stdout.strip().splitlines()[-1]
    status = nfs_server_status(name)
    status["url"] = url
    return status


def restart_ganesha(name: str = instance("uswap-test")) -> dict:
    """kill -9 the instance's ganesha and start it again (a server crash);
    returns the new status once it answers again."""
    out = _run("restart-ganesha", "--name", name)
    if out.returncode != 0:
        raise RuntimeError(f"nfs-server restart-ganesha --name {name} failed:\n{out.stderr}")
    return nfs_server_status(name)


def stop_nfs_server(name: str = instance("uswap-test")) -> None:
    """Stop instance `name` (idempotent; the export dir's contents are kept)."""
    out = _run("stop", "--name", name)
    if out.returncode != 0:
        raise RuntimeError(f"nfs-server stop --name {name} failed:\n{out.stderr}")

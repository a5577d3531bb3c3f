"""native/fastpath.c fp_new when pthread_create fails part way (a pids
cgroup limit lets only some threads start), and FastPath.top_up then.

fp_new starts `readers` + 1 threads; whatever it managed to start, one of
them must stay out of store reads (invariant 4): with fewer than two it
stops the ones it started (fp_stop on a partly built engine) and fails, with
two or more read_max is one less than it started. The fast path's lent
NFS contexts follow read_max, not what was asked for: contexts beyond it
would sit idle in the fast path and be missing from the C I/O pool.

Each case runs in a child process of its own, put in a fresh cgroup v1
pids group whose limit the child sets once its own threads (the NFS
store's helper) are running, so that only the fast path's threads are
limited. Real store: a file on the session's NFS server.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
import uuid

import pytest

from tests.harness import wait_cgroup_removed

PIDS_ROOT = "/sys/fs/cgroup/pids"
REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

CHILD = textwrap.dedent("""
    import errno, json, os, sys
    cg, url, spare = sys.argv[1], sys.argv[2], int(sys.argv[3])
    with open(os.path.join(cg, "cgroup.procs"), "w") as f:
        f.write(str(os.getpid()))
    from uswap.daemon.fastpath import FastPath
    from uswap.store import header
    from uswap.store.nfs import NfsStore
    from tests.harness import wait_for
    store = NfsStore.open(url, 1 << 20)
    header.claim(store)
    lender = store.native_io().lender
    lender.lend(8)   # as the engine: io_threads 4 + fault_threads 4; starts its helper thread
    efd = os.eventfd(0)

    def anon_fds():
        # fp_new's own kinds of fd (an epoll set, an eventfd): the helper
        # thread opens sockets meanwhile.
        n = 0
        for fd in os.listdir("/proc/self/fd"):
            try:
                n += os.readlink(f"/proc/self/fd/{fd}") in ("anon_inode:[eventpoll]", "anon_inode:[eventfd]")
            except OSError:
                pass
        return n
    fds = anon_fds()
    tasks = len(os.listdir("/proc/self/task"))
    with open(os.path.join(cg, "pids.max"), "w") as f:
        f.write(str(tasks + spare))   # room for `spare` more threads: the fast path's
    try:
        fp = FastPath(4, efd, store)
    except OSError as e:
        assert e.errno == errno.EAGAIN, e
        print(json.dumps({"failed": True, "tasks": len(os.listdir("/proc/self/task")) - tasks,
                          "fds": anon_fds() - fds}), flush=True)
        # Not sys.exit: the interpreter's exit waits on the lender's helper
        # thread, which may be connecting a context under the pids limit
        # (the test hung 120 s once on a loaded machine); what is measured
        # is printed already.
        os._exit(0)
    started, read_max = fp.e.nthreads, fp.e.read_max
    # Every context lent, connected (the helper connects them one by one):
    # checked out, then back, so that top_up below may take any of them.
    conns = []

    def all_taken():
        c = lender.checkout()
        if c is not None:
            conns.append(c)
        return len(conns) == 8
    wait_for("every lent context connected", all_taken, timeout=30)
    for c in conns:
        lender.checkin(c, None)
    fp.lock()
    fp.top_up()
    nidle = fp.e.nidle
    fp.unlock()
    fp.stop()
    print(json.dumps({"failed": False, "started": started, "read_max": read_max, "nidle": nidle,
                      "tasks": len(os.listdir("/proc/self/task")) - tasks}), flush=True)
    os._exit(0)   # as above
""")


@pytest.fixture
def pids_group():
    """A fresh cgroup v1 pids group, removed at teardown."""
    if not os.path.isdir(PIDS_ROOT):
        pytest.skip("no cgroup v1 pids controller")
    path = os.path.join(PIDS_ROOT, f"uswap-fp-{uuid.uuid4().hex[:8]}")
    os.mkdir(path)
    try:
        yield path
    finally:
        wait_cgroup_removed(path)


def run_child(pids_group: str, nfs_url: str, spare: int) -> dict:
    url = f"{nfs_url}/fp-threads-{uuid.uuid4().hex[:12]}"
    out = subprocess.run([sys.executable, "-c", CHILD, pids_group, url, str(spare)],
                         capture_output=True, text=True, timeout=120, cwd=REPO)
    assert out.returncode == 0, out.stderr[-3000:]
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_fewer_threads_keep_a_reserve_and_lend_only_read_max(pids_group, nfs_url):
    """fault_threads 4 (5 threads asked), 3 started: 2 readers and the
    reserve, and top_up lends 2 contexts, not 4."""
    got = run_child(pids_group, nfs_url, 3)
    assert got == {"failed": False, "started": 3, "read_max": 2, "nidle": 2, "tasks": 0}, got


def test_one_thread_started_is_stopped_and_fails(pids_group, nfs_url):
    """Only one thread started: no reserve, so fp_new stops it (fp_stop on
    the partly built engine) and fails; no thread or fd is left."""
    got = run_child(pids_group, nfs_url, 1)
    assert got == {"failed": True, "tasks": 0, "fds": 0}, got

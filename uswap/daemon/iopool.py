"""Python threads that run the engine's blocking jobs and hand the results back.

A job is a callable with a completion callback: a thread runs it, queues
(result, error) and pokes an eventfd that the engine's epoll watches, and the
engine applies the completion on its own thread, under the page lock. Jobs
change no page state; they move bytes (store reads and writes, checksums,
UFFDIO_COPY of verified swap-ins) or punch evicted pages out of memfds, all of
which release the GIL. So the engine thread never blocks on I/O (invariant 4).

Since the C I/O pool (cpool.py) took the data path of the stores that declare
native I/O, store jobs come here only from a store that declares none (the
fault injector), for an nfs:// job while no lent libnfs context is idle, and
for the write probe after failed writes. The engine's punches run on a second
pool of their own that pokes this pool's eventfd, and so do the C I/O pool's
threads (cpool.py).

Invariant (no lost wake-up): the shared eventfd is read once per turn, by the
pool that owns it, before any queue that pokes it is drained; a poke after
that read stays counted and wakes the loop again. So only the owner's
completions() reads it, and it drains the pools that share it (`followers`)
itself, after the read; the engine reaps the C pool after it. A second read
between two drains -- each pool once read it in its own completions() --
swallowed the poke of a job that finished in between, and its completion
waited in the deque, uncounted by epoll, until some other event: a stream
swap-in on the fault injector's Python pool hung for good that way.
"""
from __future__ import annotations

import collections
import os
import queue
import threading
from typing import Any, Callable


class IoPool:
    def __init__(self, nthreads: int, share: "IoPool | None" = None, name: str = "io") -> None:
        """`share`: poke that pool's eventfd (it owns and closes it, and
        drains this pool's completions with its own) instead of one of this
        pool's own."""
        self.jobs: queue.SimpleQueue = queue.SimpleQueue()
        self.done: collections.deque = collections.deque()
        self.owns_eventfd = share is None
        self.eventfd = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC) if share is None else share.eventfd
        self.followers: list[IoPool] = []  # pools poking our eventfd: drained by our completions()
        if share is not None:
            share.followers.append(self)
        self.threads = [threading.Thread(target=self._run, name=f"uswap-{name}-{i}", daemon=True)
                        for i in range(nthreads)]
        for t in self.threads:
            t.start()

    def submit(self, work: Callable[[], Any], on_done: Callable[[Any, OSError | None], None]) -> None:
        """Run `work()` on an I/O thread; the engine later calls on_done(result, error)."""
        self.jobs.put((work, on_done))

    def _run(self) -> None:
        while True:
            item = self.jobs.get()
            if item is None:
                return
            work, on_done = item
            try:
                result, error = work(), None
            except OSError as e:
                result, error = None, e
            except Exception as e:  # a bug in a store must not kill the thread silently
                result, error = None, OSError(5, f"{type(e).__name__}: {e}")
            self.done.append((on_done, result, error))
            os.eventfd_write(self.eventfd, 1)

    def completions(self) -> list:
        """Drain finished jobs (engine thread only): the owner of the eventfd
        reads it first, then drains itself and its followers (module
        docstring); a follower drains only itself and never reads it."""
        if self.owns_eventfd:
            try:
                os.eventfd_read(self.eventfd)
            except BlockingIOError:
                pass
        out = []
        for pool in [self] + (self.followers if self.owns_eventfd else []):
            while pool.done:
                out.append(pool.done.popleft())
        return out

    def stop(self) -> None:
        for _ in self.threads:
            self.jobs.put(None)
        for t in self.threads:
            t.join(timeout=5)
        if self.owns_eventfd:
            os.close(self.eventfd)

"""The Python I/O pools (uswap/daemon/iopool.py), in process with real
threads, a real eventfd and a real epoll, driven the way the engine drives
them (Engine.on_completions): two pools poke one eventfd -- the engine's I/O
pool and its punch pool -- and a loop that sleeps in epoll must be woken for
every finished job. A wake-up lost there leaves a completion waiting with
the eventfd quiet: the engine sleeps on, and the fault waiting for that
swap-in hangs (a stream over the fault injector's store hung for good in
1 run of 6 at load 10: reads_inflight 1, every I/O thread idle, the engine
in epoll_wait)."""
from __future__ import annotations

import select

from uswap.daemon.iopool import IoPool


def test_a_job_finishing_between_two_pools_drains_still_wakes_the_loop():
    """A job of the owner pool finishes after the owner's completions() and
    before the follower's (on a loaded machine the engine thread can be
    preempted right there). Its wake-up must survive the follower's
    completions(): each pool once read the shared eventfd in its own
    completions(), and the second read swallowed it."""
    owner = IoPool(1)
    punch = IoPool(1, owner, "punch")
    ep = select.epoll()
    ep.register(owner.eventfd, select.EPOLLIN)
    try:
        assert owner.completions() == []          # the engine's turn begins: the owner first
        owner.submit(lambda: 7, lambda res, err: None)
        assert ep.poll(10.0), "the job never woke the loop"   # it finished and poked the eventfd
        assert punch.completions() == []          # the follower's drain, same turn
        assert ep.poll(0), "the finished job's wake-up was swallowed: the loop would sleep on"
        done = owner.completions()
        assert [(result, error) for _, result, error in done] == [(7, None)]
        assert not ep.poll(0)                     # and the wake-up was taken with it
    finally:
        punch.stop()
        owner.stop()
        ep.close()


def test_the_owner_drains_its_followers():
    """Engine.on_completions calls only the owner's completions(): the
    punch pool's finished jobs come back with it, after its one read."""
    owner = IoPool(1)
    punch = IoPool(1, owner, "punch")
    ep = select.epoll()
    ep.register(owner.eventfd, select.EPOLLIN)
    try:
        punch.submit(lambda: "punched", lambda res, err: None)
        assert ep.poll(10.0)
        assert [result for _, result, _ in owner.completions()] == ["punched"]
        assert not ep.poll(0)
    finally:
        punch.stop()
        owner.stop()
        ep.close()

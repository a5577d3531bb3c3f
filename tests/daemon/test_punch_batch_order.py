"""Punch completions batched by Puncher.apply_done keep their place among the
other completions of the engine's turn (Engine.on_completions).

The engine reaps the Python pool (its own jobs, then the punch pool's, its
follower) and then the C pool. Applying the punches only after the C pool's
completions moved them after completions that returned later: a swap-in
whose UFFDIO_COPY finds the client gone closes the region, and the punches
of that region that had returned before it then took the closing path --
their pages were no longer counted as swap-outs (or zero drops), unlike the
same completions applied in the order they returned (before b20e760)."""
from __future__ import annotations

import types

from tests.daemon.test_punch_batch import outcome, scenario
from uswap.daemon.engine import Engine


class _Pool:
    def __init__(self, done: list) -> None:
        self.done = done

    def completions(self) -> list:
        out, self.done = self.done, []
        return out


def _turn(monkeypatch, batched: bool) -> dict:
    puncher, regions, region, slots, wakes = scenario(monkeypatch)

    def client_gone(result, err):
        # A C-pool load of the same region: its COPY says the client is gone.
        regions.close_region(region, "UFFDIO_COPY: the client's mapping is gone")

    punches = [(on_done, None, None) for on_done in puncher.io.jobs]
    if batched:
        engine = types.SimpleNamespace(io=_Pool(punches), cpool=_Pool([(client_gone, None, None)]),
                                       puncher=puncher, fp=None, discard=types.SimpleNamespace(check=lambda: None))
        Engine.on_completions(engine)
    else:
        # The turn as before the batch: each completion applied as it comes.
        for on_done, result, err in punches:
            on_done(result, err)
            entry, = puncher.done
            puncher.done.clear()
            puncher._punch_done(*entry)
        client_gone(None, None)
    assert not puncher.done
    return outcome(puncher, regions, region, slots, wakes)


def test_punches_are_applied_before_the_c_pool_completions_of_their_turn(monkeypatch):
    together = _turn(monkeypatch, batched=True)
    in_order = _turn(monkeypatch, batched=False)
    assert in_order["stats"]["swapouts"] > 0 and in_order["closing"]
    # The closed region's table itself is left to close_region (faked here):
    # what outlives it are the counters.
    for key in ("stats", "charged", "punching", "jobs", "inflight", "closing"):
        assert together[key] == in_order[key], key

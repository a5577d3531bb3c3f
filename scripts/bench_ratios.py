"""Ratios of scripts/bench.py with their spread over the repetitions.

Every figure of a run (p50, p99, MiB/s, faults, a program's rate) is measured
once per repetition and kept in the run's `per_repeat` list, in the order the
repetitions ran. A ratio "A / B" is computed per repetition: repetition i of
system A is paired with repetition i of system B (the same index; for the
sims and the random workloads the same trace seed, since every system draws
repetition i's trace from the same seed). The pairs come from the same bench
invocation, so the machine's load is alike for both; the pairs are not
simultaneous (each system runs in its own child process, one after the other).
The ratio reported is the median of those per-repetition ratios, and its
spread is their range (min to max) and the range relative to the median,
(max - min) / median. Only as many pairs as the shorter list holds are used;
a pair with a missing figure or a zero baseline is left out.

A difference "A - B" (uswap's extra µs over the raw store) is paired the same
way; its spread is its range in the same unit (a relative spread of a
difference that can be near zero would mean nothing).
"""
from __future__ import annotations

import statistics
from dataclasses import asdict, dataclass


@dataclass(frozen=True)
class PairedFigure:
    """One ratio (or difference) of two systems' figures, over paired repetitions."""

    label: str               # what is compared, e.g. "random-read p50, uswap-file / kernel-swap"
    kind: str                # "ratio" (A / B) or "difference" (A - B)
    unit: str                # the unit of the figures compared (µs, MiB/s, faults, ...)
    values: list[float]      # one per repetition pair, in repetition order
    median: float
    low: float
    high: float
    a_median: float | None   # the figures' own medians over their repetitions (for reading)
    b_median: float | None

    @property
    def rel_spread(self) -> float | None:
        """(max - min) / median of a ratio; None for a difference."""
        if self.kind != "ratio" or self.median == 0:
            return None
        return (self.high - self.low) / self.median

    def as_dict(self) -> dict:
        d = asdict(self)
        d["rel_spread"] = self.rel_spread
        d["pairs"] = len(self.values)
        return d


def per_repeat(run: dict | None, key: str) -> list[float | None]:
    """The figure `key` of each repetition of a run, in order ([] if none)."""
    if not run or run.get("error"):
        return []
    return [rep.get(key) for rep in run.get("per_repeat", [])]


def pair_values(a: list[float | None], b: list[float | None], kind: str) -> list[float]:
    """Repetition i of A with repetition i of B, combined by `kind`."""
    if kind not in ("ratio", "difference"):
        raise ValueError(f"kind must be 'ratio' or 'difference', not {kind!r}")
    out = []
    for x, y in zip(a, b):
        if x is None or y is None:
            continue
        if kind == "ratio":
            if y == 0:
                continue
            out.append(x / y)
        else:
            out.append(x - y)
    return out


def paired(label: str, a_run: dict | None, b_run: dict | None, key: str, unit: str,
           kind: str = "ratio", a_key: str | None = None, b_key: str | None = None) -> PairedFigure | None:
    """The paired ratio (or difference) of figure `key` of run A over run B;
    None when no repetition pair has both figures."""
    values = pair_values(per_repeat(a_run, key), per_repeat(b_run, key), kind)
    if not values:
        return None
    return PairedFigure(label=label, kind=kind, unit=unit, values=values,
                        median=float(statistics.median(values)), low=min(values), high=max(values),
                        a_median=(a_run or {}).get(a_key or key), b_median=(b_run or {}).get(b_key or key))


def describe(f: PairedFigure) -> str:
    """One line: the median, its range and relative spread, the figures' medians."""
    def num(v: float) -> str:
        return str(v) if isinstance(v, int) else f"{v:.{0 if f.unit == 'MiB/s' else 1}f}"

    figures = ""
    if f.a_median is not None and f.b_median is not None:
        figures = f"; figures {num(f.a_median)} vs {num(f.b_median)} {f.unit}"
    n = len(f.values)
    if f.kind == "difference":
        return (f"{f.label}: {f.median:+.1f} {f.unit} (range {f.low:+.1f} to {f.high:+.1f} over {n} "
                f"paired repetitions{figures})")
    spread = "n/a" if f.rel_spread is None else f"{100 * f.rel_spread:.0f}%"
    return (f"{f.label}: {f.median:.2f}x (range {f.low:.2f}-{f.high:.2f}x, spread {spread} "
            f"over {n} paired repetitions{figures})")

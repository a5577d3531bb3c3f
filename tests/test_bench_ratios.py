"""The bench's ratios over paired repetitions (scripts/bench_ratios.py and
their use in scripts/bench_report.py), over repetition records recorded by
`scripts/bench.py --quick` on 2026-11-26 (docs/bench/quick.json of that run,
copied here so that regenerating the table does not change these inputs)."""
from __future__ import annotations

import os
import sys

import pytest

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "scripts"))

import bench  # noqa: E402
import bench_ratios  # noqa: E402
import bench_report  # noqa: E402


def _run(system: str, workload: str, figures: dict, per_repeat: list[dict]) -> dict:
    return dict({"system": system, "workload": workload, "p50_us": None, "p99_us": None, "mib_s": None,
                 "faults": None, "cpu_us_per_page": None, "repeats": len(per_repeat),
                 "per_repeat": per_repeat}, **figures)


RECORDED = [
    _run("kernel-swap", "random-read", {"p50_us": 34.03, "p99_us": 138.35, "faults": 6004}, [
        {"p50_us": 37.58, "p99_us": 69.12, "faults": 6004, "pages": 13048, "cpu_s": 0.07},
        {"p50_us": 33.98, "p99_us": 138.47, "faults": 6106, "pages": 7087, "cpu_s": 0.05},
        {"p50_us": 34.03, "p99_us": 138.35, "faults": 5983, "pages": 6236, "cpu_s": 0.05}]),
    _run("uswap-file", "random-read", {"p50_us": 51.42, "p99_us": 102.87, "faults": 5984}, [
        {"p50_us": 51.77, "p99_us": 118.36, "faults": 5984, "pages": 11919, "cpu_s": 0.18},
        {"p50_us": 49.93, "p99_us": 102.87, "faults": 6086, "pages": 9953, "cpu_s": 0.18},
        {"p50_us": 51.42, "p99_us": 99.13, "faults": 5977, "pages": 5977, "cpu_s": 0.21}]),
    _run("raw-file", "random-read", {"p50_us": 29.03, "p99_us": 49.9}, [
        {"p50_us": 29.76, "p99_us": 48.11, "faults": 0, "pages": 0, "cpu_s": 0.0},
        {"p50_us": 28.49, "p99_us": 51.27, "faults": 0, "pages": 0, "cpu_s": 0.0},
        {"p50_us": 29.03, "p99_us": 49.9, "faults": 0, "pages": 0, "cpu_s": 0.0}]),
    _run("uswap-file", "zipf-read", {"faults": 3550}, [
        {"p50_us": 0.78, "p99_us": 54.62, "faults": 3547, "pages": 5679, "cpu_s": 0.1},
        {"p50_us": 0.85, "p99_us": 55.39, "faults": 4015, "pages": 4019, "cpu_s": 0.15},
        {"p50_us": 0.78, "p99_us": 50.71, "faults": 3550, "pages": 3550, "cpu_s": 0.1}]),
    _run("lru-sim", "zipf-read", {"faults": 3009}, [{"faults": 3009}, {"faults": 3027}, {"faults": 2993}]),
]


def _figure(label: str) -> bench_ratios.PairedFigure:
    found = [f for f in bench_report.paired_figures(RECORDED) if f.label == label]
    assert len(found) == 1, [f.label for f in bench_report.paired_figures(RECORDED)]
    return found[0]


def test_ratio_pairs_repetition_i_with_repetition_i():
    f = _figure("random-read p50, uswap-file / kernel-swap")
    assert f.values == pytest.approx([51.77 / 37.58, 49.93 / 33.98, 51.42 / 34.03])
    assert f.median == pytest.approx(49.93 / 33.98)  # 1.47: not the ratio of the medians, 1.51
    assert (f.low, f.high) == pytest.approx((51.77 / 37.58, 51.42 / 34.03))
    assert f.rel_spread == pytest.approx((51.42 / 34.03 - 51.77 / 37.58) / (49.93 / 33.98))
    assert (f.a_median, f.b_median) == (51.42, 34.03)


def test_zipf_faults_ratio_pairs_the_same_trace():
    f = _figure("zipf-read faults, uswap-file / lru-sim")
    assert f.values == pytest.approx([3547 / 3009, 4015 / 3027, 3550 / 2993])
    assert f.median == pytest.approx(3550 / 2993)
    assert f.high == pytest.approx(4015 / 3027)


def test_difference_to_raw_store_has_a_range_and_no_relative_spread():
    f = _figure("random-read p50, uswap-file - raw-file")
    assert f.kind == "difference"
    assert f.values == pytest.approx([51.77 - 29.76, 49.93 - 28.49, 51.42 - 29.03])
    assert f.median == pytest.approx(51.77 - 29.76)
    assert f.rel_spread is None
    assert "+22.0 µs (range +21.4 to +22.4 over 3 paired repetitions" in bench_ratios.describe(f)


def test_unmeasured_or_missing_pairs_are_left_out():
    short = dict(RECORDED[1], per_repeat=RECORDED[1]["per_repeat"][:2] + [{"faults": 1}])
    f = bench_ratios.paired("x", short, RECORDED[0], "p50_us", "µs")
    assert f.values == pytest.approx([51.77 / 37.58, 49.93 / 33.98])
    assert bench_ratios.paired("x", dict(short, error="boom"), RECORDED[0], "p50_us", "µs") is None
    assert bench_ratios.paired("x", RECORDED[3], RECORDED[4], "p50_us", "µs") is None  # sims have no p50
    with pytest.raises(ValueError, match="'quotient'"):
        bench_ratios.pair_values([1.0], [1.0], "quotient")


def test_report_prints_median_and_spread_of_every_ratio():
    md = bench_report.markdown(RECORDED, "header", [])
    assert "| random-read p50, uswap-file / kernel-swap | 1.47x | 1.38-1.51x | 9% | 3 |" in md
    assert "| zipf-read faults, uswap-file / lru-sim | 1.19x | 1.18-1.33x | 12% | 3 |" in md
    assert "| random-read p50, uswap-file - raw-file (µs) | +22.0 | +21.4 to +22.4 | — | 3 |" in md


def test_targets_are_judged_on_the_paired_median():
    lines = bench_report.target_lines(RECORDED)
    assert any(line.startswith("MISS random-read p50 <= 1.1x kernel swap: random-read p50, uswap-file / "
                               "kernel-swap: 1.47x") for line in lines), lines
    assert any(line.startswith("n/a  nfs seq >= 0.6x raw nfs seq") for line in lines), lines


def test_readme_needs_five_repetitions():
    with pytest.raises(SystemExit, match="--readme needs --repeat 5 or more \\(got 3\\)"):
        bench.make_plan(bench.parse_args(["--quick", "--readme", "README.md", "--repeat", "3"]))
    plan = bench.make_plan(bench.parse_args(["--quick", "--readme", "README.md", "--repeat", "5"]))
    assert plan.args.repeat == 5


def test_pin_needs_cpus_0_and_1():
    allowed = os.sched_getaffinity(0)
    if not {0, 1} <= allowed:
        pytest.fail(f"this test needs CPUs 0 and 1 (has {sorted(allowed)})")
    assert bench.make_plan(bench.parse_args(["--quick", "--pin", "split"])).args.pin == "split"
    os.sched_setaffinity(0, {0})
    try:
        with pytest.raises(SystemExit, match="--pin split places work on CPUs 0 and 1; this process may run "
                                             "on CPUs 0 only"):
            bench.make_plan(bench.parse_args(["--quick", "--pin", "split"]))
        assert bench.make_plan(bench.parse_args(["--quick"])).args.pin == "none"
    finally:
        os.sched_setaffinity(0, allowed)

"""Reporting for scripts/bench.py: the Markdown table, ratios, targets, the
README block and the PNG plots."""
from __future__ import annotations

import os

from bench_ratios import PairedFigure, describe, paired

README_BEGIN = "<!-- bench:begin -->"
README_END = "<!-- bench:end -->"

USWAP = "uswap-file"      # the uswap system compared with kernel swap (same filesystem)
KERNEL = "kernel-swap"


def find(runs: list[dict], workload: str, system: str, key: str):
    for r in runs:
        if r["workload"] == workload and r["system"] == system:
            return r.get(key)
    return None


def _num(v, digits: int = 1) -> str:
    if v is None:
        return "—"
    if isinstance(v, int):
        return str(v)
    return f"{v:.{digits}f}"


def error_row(run: dict, lead: list[str], cells: int) -> str:
    """A table row for a run that failed: its leading cells, then the last
    line of its error across `cells` cells."""
    return (f"| {' | '.join(lead)} | error: {run['error'].strip().splitlines()[-1][:80]} "
            + "|" * cells)


def is_program(run: dict) -> bool:
    """A program workload's run (scripts/bench_programs.py): one rate figure."""
    return "rate_unit" in run


def is_scale(run: dict) -> bool:
    """A scale row's run (scripts/bench_scale.py): its own region, budget and table."""
    return run["workload"] == "scale"


def table(runs: list[dict]) -> str:
    lines = ["| workload | system | p50 µs | p99 µs | MiB/s | faults | CPU µs/page |",
             "|---|---|---:|---:|---:|---:|---:|"]
    for r in runs:
        if is_program(r) or is_scale(r):
            continue
        if r.get("error"):
            lines.append(error_row(r, [r["workload"], r["system"]], 5))
            continue
        lines.append(f"| {r['workload']} | {r['system']} | {_num(r['p50_us'])} | {_num(r['p99_us'])} | "
                     f"{_num(r['mib_s'], 0)} | {_num(r['faults'])} | {_num(r['cpu_us_per_page'], 2)} |")
    return "\n".join(lines)


def run_of(runs: list[dict], workload: str, system: str) -> dict | None:
    for r in runs:
        if r["workload"] == workload and r["system"] == system:
            return r
    return None


def paired_figures(runs: list[dict]) -> list[PairedFigure]:
    """Every ratio (and uswap-minus-raw difference) the report prints, each
    over paired repetitions (scripts/bench_ratios.py says how they pair);
    only those whose inputs were measured."""
    out = []

    def add(label: str, workload: str, a: str, b: str, key: str, unit: str, kind: str = "ratio") -> None:
        f = paired(label, run_of(runs, workload, a), run_of(runs, workload, b), key, unit, kind)
        if f is not None:
            out.append(f)

    for sysname in (USWAP, "uswap-nfs"):
        add(f"random-read p50, {sysname} / kernel-swap", "random-read", sysname, KERNEL, "p50_us", "µs")
        add(f"random-read p99, {sysname} / kernel-swap", "random-read", sysname, KERNEL, "p99_us", "µs")
        add(f"seq-read MiB/s, {sysname} / kernel-swap", "seq-read", sysname, KERNEL, "mib_s", "MiB/s")
        add(f"first-touch MiB/s, {sysname} / kernel-swap", "first-touch", sysname, KERNEL, "mib_s", "MiB/s")
        add(f"random-write p50, {sysname} / kernel-swap", "random-write", sysname, KERNEL, "p50_us", "µs")
        add(f"mt-mix p99, {sysname} / kernel-swap", "mt-mix", sysname, KERNEL, "p99_us", "µs")
    for sysname in (USWAP, "uswap-nfs"):
        add(f"scale MiB/s, {sysname} / kernel-swap", "scale", sysname, KERNEL, "mib_s", "MiB/s")
        add(f"scale CPU µs/page, {sysname} / kernel-swap", "scale", sysname, KERNEL, "cpu_us_per_page", "µs/page")
    for sysname in (USWAP, "uswap-nfs", KERNEL, "fifo-sim"):
        add(f"zipf-read faults, {sysname} / lru-sim", "zipf-read", sysname, "lru-sim", "faults", "faults")
    for sysname, raw in ((USWAP, "raw-file"), ("uswap-nfs", "raw-nfs")):
        add(f"random-read p50, {sysname} - {raw}", "random-read", sysname, raw, "p50_us", "µs", "difference")
        add(f"seq-read MiB/s, {sysname} / {raw}", "seq-read", sysname, raw, "mib_s", "MiB/s")
    for r in runs:
        if is_program(r) and r["system"] != "unlimited":
            for base in ("unlimited", KERNEL):
                if base != r["system"]:
                    add(f"{r['workload']} {r['rate_unit']}, {r['system']} / {base}", r["workload"],
                        r["system"], base, "rate", r["rate_unit"])
    return out


def ratios(runs: list[dict]) -> list[str]:
    """Human-readable ratio lines: median of the paired ratios, range, spread."""
    return [describe(f) for f in paired_figures(runs)]


def ratio_table(figures: list[PairedFigure]) -> str:
    """The ratios as a Markdown table: median, range and relative spread."""
    lines = ["| ratio | median | min-max | spread | pairs |", "|---|---:|---:|---:|---:|"]
    for f in figures:
        if f.kind == "difference":
            lines.append(f"| {f.label} ({f.unit}) | {f.median:+.1f} | {f.low:+.1f} to {f.high:+.1f} | — | "
                         f"{len(f.values)} |")
        else:
            spread = "—" if f.rel_spread is None else f"{100 * f.rel_spread:.0f}%"
            lines.append(f"| {f.label} | {f.median:.2f}x | {f.low:.2f}-{f.high:.2f}x | {spread} | {len(f.values)} |")
    return "\n".join(lines)


# (name, label of the paired figure it judges, pass test on the figure's median)
TARGETS = [
    ("random-read p50 <= 1.1x kernel swap", f"random-read p50, {USWAP} / {KERNEL}", lambda m: m <= 1.1),
    ("random-read p99 <= kernel swap", f"random-read p99, {USWAP} / {KERNEL}", lambda m: m <= 1.0),
    ("seq-read >= 3x kernel swap", f"seq-read MiB/s, {USWAP} / {KERNEL}", lambda m: m >= 3.0),
    ("first-touch >= 1.5x kernel swap", f"first-touch MiB/s, {USWAP} / {KERNEL}", lambda m: m >= 1.5),
    ("zipf faults <= 1.1x LRU", f"zipf-read faults, {USWAP} / lru-sim", lambda m: m <= 1.1),
    ("nfs random p50 <= raw nfs p50 + 15 µs", "random-read p50, uswap-nfs - raw-nfs", lambda m: m <= 15.0),
    ("nfs seq >= 0.6x raw nfs seq", "seq-read MiB/s, uswap-nfs / raw-nfs", lambda m: m >= 0.6),
    ("scale daemon CPU per page <= 2x kernel swap's", f"scale CPU µs/page, {USWAP} / {KERNEL}", lambda m: m <= 2.0),
]
META_GOAL = 16  # bytes of daemon metadata per touched page, the scale row's goal


def targets(runs: list[dict]) -> list[tuple[str, bool | None, str]]:
    """(name, passed or None when not measured, detail) for each target,
    judged on the median of the paired per-repetition ratios."""
    by_label = {f.label: f for f in paired_figures(runs)}
    res = []
    for name, label, ok in TARGETS:
        f = by_label.get(label)
        if f is None:
            res.append((name, None, "not measured in this run"))
        else:
            res.append((name, bool(ok(f.median)), describe(f)))
    scale = run_of(runs, "scale", USWAP)
    name = f"scale metadata <= {META_GOAL} B per touched page"
    if scale is None or scale.get("meta_b_per_page") is None:
        res.append((name, None, "not measured in this run"))
    else:
        m = scale["meta_b_per_page"]
        res.append((name, m <= META_GOAL, f"{USWAP}: {m:.1f} B (daemon RssAnon + page-table files' RSS growth per touched page); "
                    f"counted: page table {scale['table_b_per_page']:.1f} + slot map "
                    f"{scale['slots_b_per_page']:.1f} B per page"))
    return res


def target_lines(runs: list[dict]) -> list[str]:
    out = []
    for name, ok, detail in targets(runs):
        word = "n/a " if ok is None else ("PASS" if ok else "MISS")
        out.append(f"{word} {name}: {detail}")
    return out


def program_table(runs: list[dict]) -> str:
    """The program workloads' own throughput, as ratios against unlimited
    memory and against kernel swap measured in the same run (median of the
    paired per-repetition ratios, and their range)."""
    lines = ["| program | system | throughput | / unlimited (min-max) | / kernel-swap (min-max) |",
             "|---|---|---:|---:|---:|"]
    for r in runs:
        if not is_program(r):
            continue
        if r.get("error"):
            lines.append(error_row(r, [r["workload"], r["system"]], 3))
            continue
        vs = [paired("", r, run_of(runs, r["workload"], base), "rate", r["rate_unit"]) for base in ("unlimited", KERNEL)]
        killed = f" (OOM-killed {r['oom_kills']} times)" if r.get("oom_kills") else ""
        lines.append(f"| {r['workload']} | {r['system']} | {r['rate']:.1f} {r['rate_unit']}{killed} | "
                     + " | ".join("—" if v is None else f"{v.median:.3f}x ({v.low:.3f}-{v.high:.3f})" for v in vs)
                     + " |")
    return "\n".join(lines)


def scale_table(runs: list[dict]) -> str:
    """The scale rows: throughput and CPU per page against kernel swap, the
    daemon's memory, and the 64 GiB sparse alloc's first fault."""
    lines = ["| system | MiB/s | CPU µs/page | daemon RSS anon+file MiB | metadata B/touched page (RSS anon + table files) | "
             "counted B/page (table + slots) | 64 GiB alloc ms | first fault ms | 64 GiB alloc metadata MiB |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in runs:
        if not is_scale(r):
            continue
        if r.get("error"):
            lines.append(error_row(r, [r["system"]], 8))
            continue
        rss = r.get("daemon_rss")
        rss_mib = _num((rss["rss_anon"] + rss["rss_file"]) / 2**20, 0) if rss else "—"
        counted = (f"{r['table_b_per_page']:.1f} + {r['slots_b_per_page']:.1f}" if "table_b_per_page" in r else "—")
        lines.append(f"| {r['system']} | {_num(r['mib_s'], 0)} | {_num(r['cpu_us_per_page'], 2)} | {rss_mib} | "
                     f"{_num(r.get('meta_b_per_page'))} | {counted} | {_num(r['sparse_alloc_ms'])} | "
                     f"{_num(r['sparse_first_fault_ms'], 2)} | "
                     f"{_num(r['sparse_meta_bytes'] / 2**20 if r.get('sparse_meta_bytes') is not None else None, 0)} |")
    return "\n".join(lines)


def markdown(runs: list[dict], header: str, notes: list[str]) -> str:
    parts = [header, ""]
    if any(not is_program(r) and not is_scale(r) for r in runs):
        parts += [table(runs), ""]
    scale = next((r for r in runs if is_scale(r)), None)
    if scale:
        parts += [f"Scale (region {scale['size'] >> 20} MiB, budget {scale['budget'] >> 20} MiB, 4 threads of "
                  f"mixed reads and writes, sequential runs and random pages):", "", scale_table(runs), ""]
    if any(is_program(r) for r in runs):
        parts += ["Programs (their own throughput figure, W of data, the budget W/4):", "", program_table(runs), ""]
    figures = paired_figures(runs)
    if figures:
        parts += ["Ratios (median over repetitions of the ratio of the same repetition's figures; "
                  "spread = (max - min) / median):", "", ratio_table(figures), ""]
    parts += ["Targets:", ""] + [f"- {line}" for line in target_lines(runs)] + [""]
    if notes:
        parts += ["Notes:", ""] + [f"- {n}" for n in notes] + [""]
    return "\n".join(parts).rstrip() + "\n"


def update_readme(path: str, block: str) -> None:
    """Put `block` between the bench markers; add them under a "## Performance"
    heading (created at the end if missing). Nothing else in the file changes."""
    with open(path) as f:
        text = f.read()
    body = f"{README_BEGIN}\n{block.rstrip()}\n{README_END}"
    b, e = text.find(README_BEGIN), text.find(README_END)
    if b >= 0 and e > b:
        text = text[:b] + body + text[e + len(README_END):]
    else:
        lines = text.split("\n")
        idx = next((i for i, line in enumerate(lines) if line.strip() == "## Performance"), None)
        if idx is not None:
            lines[idx + 1:idx + 1] = ["", body]
            text = "\n".join(lines)
        else:
            text = text.rstrip("\n") + "\n\n## Performance\n\n" + body + "\n"
    with open(path, "w") as f:
        f.write(text)


def plots(runs: list[dict], samples: dict, outdir: str, title: str) -> list[str]:
    """Latency CDF of random-read per system; throughput bars for first-touch
    and seq-read; zipf-read faults. Returns the files written."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    os.makedirs(outdir, exist_ok=True)
    written = []

    lat = {s: v for (s, w), v in samples.items() if w == "random-read" and v}
    if lat:
        fig, ax = plt.subplots(figsize=(7, 4.5))
        for sysname, vals in lat.items():
            x = np.sort(np.asarray(vals))
            y = np.arange(1, x.size + 1) / x.size
            ax.plot(x, y, label=f"{sysname} (p50 {np.percentile(x, 50):.0f} µs)")
        ax.set_xscale("log")
        ax.set_xlabel("latency per 4 KiB random read (µs, log)")
        ax.set_ylabel("fraction of accesses")
        ax.set_title(f"random-read latency CDF — {title}", fontsize=9)
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=8)
        fig.tight_layout()
        path = os.path.join(outdir, "random-read-cdf.png")
        fig.savefig(path, dpi=110)
        plt.close(fig)
        written.append(path)

    wls = ["first-touch", "seq-read"]
    systems = [s for s in ("uswap-file", "uswap-nfs", "kernel-swap", "raw-file", "raw-nfs")
               if any(find(runs, w, s, "mib_s") is not None for w in wls)]
    if systems:
        fig, ax = plt.subplots(figsize=(7, 4.5))
        width = 0.8 / len(systems)
        for k, sysname in enumerate(systems):
            vals = [find(runs, w, sysname, "mib_s") or 0 for w in wls]
            bars = ax.bar(np.arange(len(wls)) + k * width - 0.4 + width / 2, vals, width, label=sysname)
            ax.bar_label(bars, fmt="%.0f", fontsize=7)
        ax.set_xticks(np.arange(len(wls)), ["first-touch (write)", "seq-read"])
        ax.set_ylabel("MiB/s (median)")
        ax.set_title(f"throughput — {title}", fontsize=9)
        ax.legend(fontsize=8)
        fig.tight_layout()
        path = os.path.join(outdir, "throughput.png")
        fig.savefig(path, dpi=110)
        plt.close(fig)
        written.append(path)

    zs = [(s, find(runs, "zipf-read", s, "faults")) for s in ("uswap-file", "uswap-nfs", "kernel-swap", "lru-sim", "fifo-sim")]
    zs = [(s, v) for s, v in zs if v is not None]
    if zs:
        fig, ax = plt.subplots(figsize=(6, 4))
        bars = ax.bar([s for s, _ in zs], [v for _, v in zs], color="tab:purple")
        ax.bar_label(bars, fontsize=8)
        ax.set_ylabel("faults per pass (median)")
        ax.set_title(f"zipf-read faults — {title}", fontsize=9)
        fig.tight_layout()
        path = os.path.join(outdir, "zipf-faults.png")
        fig.savefig(path, dpi=110)
        plt.close(fig)
        written.append(path)
    return written

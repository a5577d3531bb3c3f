"""Reporting for scripts/bench.py: the Markdown table, ratios, targets, the
README block and the PNG plots."""
from __future__ import annotations

import os

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


def table(runs: list[dict]) -> str:
    lines = ["| workload | system | p50 µs | p99 µs | MiB/s | faults | CPU µs/page |",
             "|---|---|---:|---:|---:|---:|---:|"]
    for r in runs:
        if r.get("error"):
            lines.append(f"| {r['workload']} | {r['system']} | error: {r['error'].strip().splitlines()[-1][:80]} |||||")
            continue
        lines.append(f"| {r['workload']} | {r['system']} | {_num(r['p50_us'])} | {_num(r['p99_us'])} | "
                     f"{_num(r['mib_s'], 0)} | {_num(r['faults'])} | {_num(r['cpu_us_per_page'], 2)} |")
    return "\n".join(lines)


def _ratio(a, b):
    return a / b if a is not None and b not in (None, 0) else None


def ratios(runs: list[dict]) -> list[str]:
    """Human-readable ratio lines (only those whose inputs were measured)."""
    out = []

    def add(label: str, a, b, unit: str) -> None:
        r = _ratio(a, b)
        if r is not None:
            out.append(f"{label}: {r:.2f}x ({_num(a, 0 if unit == 'MiB/s' else 1)} vs "
                       f"{_num(b, 0 if unit == 'MiB/s' else 1)} {unit})")

    for sysname in (USWAP, "uswap-nfs"):
        add(f"random-read p50, {sysname} / kernel-swap", find(runs, "random-read", sysname, "p50_us"),
            find(runs, "random-read", KERNEL, "p50_us"), "µs")
        add(f"random-read p99, {sysname} / kernel-swap", find(runs, "random-read", sysname, "p99_us"),
            find(runs, "random-read", KERNEL, "p99_us"), "µs")
        add(f"seq-read MiB/s, {sysname} / kernel-swap", find(runs, "seq-read", sysname, "mib_s"),
            find(runs, "seq-read", KERNEL, "mib_s"), "MiB/s")
        add(f"first-touch MiB/s, {sysname} / kernel-swap", find(runs, "first-touch", sysname, "mib_s"),
            find(runs, "first-touch", KERNEL, "mib_s"), "MiB/s")
    lru = find(runs, "zipf-read", "lru-sim", "faults")
    for sysname in (USWAP, "uswap-nfs", KERNEL, "fifo-sim"):
        add(f"zipf-read faults, {sysname} / lru-sim", find(runs, "zipf-read", sysname, "faults"), lru, "faults")
    for sysname, raw in ((USWAP, "raw-file"), ("uswap-nfs", "raw-nfs")):
        a, b = find(runs, "random-read", sysname, "p50_us"), find(runs, "random-read", raw, "p50_us")
        if a is not None and b is not None:
            out.append(f"random-read p50, {sysname} - {raw}: {a - b:+.1f} µs ({a:.1f} vs {b:.1f} µs)")
        add(f"seq-read MiB/s, {sysname} / {raw}", find(runs, "seq-read", sysname, "mib_s"),
            find(runs, "seq-read", raw, "mib_s"), "MiB/s")
    return out


def targets(runs: list[dict]) -> list[tuple[str, bool | None, str]]:
    """(name, passed or None when not measured, detail) for each target."""
    res = []

    def check(name: str, a, b, ok_fn, detail_fn) -> None:
        if a is None or b is None:
            res.append((name, None, "not measured in this run"))
        else:
            res.append((name, bool(ok_fn(a, b)), detail_fn(a, b)))

    rr = lambda s, k: find(runs, "random-read", s, k)  # noqa: E731
    check("random-read p50 <= 1.1x kernel swap", rr(USWAP, "p50_us"), rr(KERNEL, "p50_us"),
          lambda a, b: a <= 1.1 * b, lambda a, b: f"{USWAP} {a:.1f} µs vs {KERNEL} {b:.1f} µs = {a / b:.2f}x")
    check("random-read p99 <= kernel swap", rr(USWAP, "p99_us"), rr(KERNEL, "p99_us"),
          lambda a, b: a <= b, lambda a, b: f"{USWAP} {a:.1f} µs vs {KERNEL} {b:.1f} µs = {a / b:.2f}x")
    check("seq-read >= 3x kernel swap", find(runs, "seq-read", USWAP, "mib_s"), find(runs, "seq-read", KERNEL, "mib_s"),
          lambda a, b: a >= 3 * b, lambda a, b: f"{USWAP} {a:.0f} MiB/s vs {KERNEL} {b:.0f} MiB/s = {a / b:.2f}x")
    check("first-touch >= 1.5x kernel swap", find(runs, "first-touch", USWAP, "mib_s"),
          find(runs, "first-touch", KERNEL, "mib_s"),
          lambda a, b: a >= 1.5 * b, lambda a, b: f"{USWAP} {a:.0f} MiB/s vs {KERNEL} {b:.0f} MiB/s = {a / b:.2f}x")
    check("zipf faults <= 1.1x LRU", find(runs, "zipf-read", USWAP, "faults"), find(runs, "zipf-read", "lru-sim", "faults"),
          lambda a, b: a <= 1.1 * b, lambda a, b: f"{USWAP} {a} vs lru-sim {b} = {a / b:.2f}x")
    check("nfs random p50 <= raw nfs p50 + 15 µs", rr("uswap-nfs", "p50_us"), rr("raw-nfs", "p50_us"),
          lambda a, b: a <= b + 15, lambda a, b: f"uswap-nfs {a:.1f} µs vs raw-nfs {b:.1f} µs ({a - b:+.1f} µs)")
    check("nfs seq >= 0.6x raw nfs seq", find(runs, "seq-read", "uswap-nfs", "mib_s"),
          find(runs, "seq-read", "raw-nfs", "mib_s"),
          lambda a, b: a >= 0.6 * b, lambda a, b: f"uswap-nfs {a:.0f} MiB/s vs raw-nfs {b:.0f} MiB/s = {a / b:.2f}x")
    return res


def target_lines(runs: list[dict]) -> list[str]:
    out = []
    for name, ok, detail in targets(runs):
        word = "n/a " if ok is None else ("PASS" if ok else "MISS")
        out.append(f"{word} {name}: {detail}")
    return out


def markdown(runs: list[dict], header: str, notes: list[str]) -> str:
    parts = [header, "", table(runs), ""]
    rl = ratios(runs)
    if rl:
        parts += ["Ratios:", ""] + [f"- {line}" for line in rl] + [""]
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

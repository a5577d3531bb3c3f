"""`uswap top`: a live terminal view of a running daemon, built on rich.

It reads the daemon's status op over the socket every `interval` seconds
and shows what changed between two readings: faults, swap-ins and
swap-outs per second, resident memory against the budget, the daemon's own
memory and CPU, the latency histograms (latency.py's buckets) and one line
per client. `--once` prints one view (two readings an interval apart) and
exits; `--iterations N` prints N views one after another: both are for
scripts and tests, and print plain text when stdout is not a terminal.
"""
from __future__ import annotations

import dataclasses
import time
from typing import Callable

from rich.console import Console, Group
from rich.live import Live
from rich.table import Table
from rich.text import Text

from uswap.sizes import format_size

BAR = 30  # characters of the widest bar


@dataclasses.dataclass
class Reading:
    at: float      # time.monotonic() when the status came back
    status: dict


def _rate(prev: Reading, cur: Reading, key: str) -> float:
    dt = cur.at - prev.at
    return (cur.status[key] - prev.status[key]) / dt if dt > 0 else 0.0


def _bar(value: float, full: float, width: int = BAR) -> str:
    n = 0 if full <= 0 else min(width, round(width * value / full))
    return "#" * n + "." * (width - n)


def _bound(seconds: float) -> str:
    return f"<= {seconds * 1e6:.0f}us" if seconds < 1e-3 else f"<= {seconds * 1e3:g}ms"


def _latency_table(prev: Reading, cur: Reading) -> Table:
    """Both histograms side by side: observations in the last interval, and
    since start; the bars show the interval's (since start's when the
    interval saw none)."""
    table = Table(title="latency", title_justify="left", box=None)
    table.add_column("bucket", justify="right")
    for kind in ("swap-ins", "faults"):
        table.add_column(kind, justify="right")
        table.add_column("total", justify="right")
        table.add_column("", no_wrap=True)
    lat_now, lat_then = cur.status["latency"], prev.status["latency"]
    bounds = lat_now["swapin"]["bounds_s"]
    labels = [_bound(b) for b in bounds] + ["> " + _bound(bounds[-1])[3:]]
    shown = {}
    for k in ("swapin", "fault"):
        delta = [a - b for a, b in zip(lat_now[k]["counts"], lat_then[k]["counts"])]
        shown[k] = (delta, delta if any(delta) else lat_now[k]["counts"])
    for i, label in enumerate(labels):
        row = [label]
        for k in ("swapin", "fault"):
            delta, bars = shown[k]
            row += [str(delta[i]), str(lat_now[k]["counts"][i]), _bar(bars[i], max(bars), 12)]
        table.add_row(*row)
    return table


def _clients_table(prev: Reading, cur: Reading) -> Table:
    table = Table(title="clients", title_justify="left", box=None)
    for name, justify in (("name", "left"), ("pid", "right"), ("uid", "right"), ("regions", "right"),
                          ("resident", "right"), ("swapped", "right"), ("faults/s", "right")):
        table.add_column(name, justify=justify)
    before = {(c["pid"], c["name"]): sum(r.get("faults", 0) for r in c["regions"])
              for c in prev.status["clients"]}
    dt = cur.at - prev.at
    for c in cur.status["clients"]:
        faults = sum(r.get("faults", 0) for r in c["regions"])
        rate = (faults - before.get((c["pid"], c["name"]), faults)) / dt if dt > 0 else 0.0
        table.add_row(c["name"] or "?", str(c["pid"]), str(c["uid"]), str(len(c["regions"])),
                      format_size(sum(r["resident_bytes"] for r in c["regions"])),
                      format_size(sum(r["swapped_bytes"] for r in c["regions"])), f"{rate:.0f}")
    if not cur.status["clients"]:
        table.add_row("(none)", "", "", "", "", "", "")
    return table


def view(prev: Reading, cur: Reading) -> Group:
    """One screen from two readings of status."""
    st, dt = cur.status, cur.at - prev.at
    budget = st.get("budget", {})
    store = st["store"]
    head = Text(f"uswap {st['version']}  pid {st['pid']}  up {st['uptime_s']:.0f}s  "
                f"store {store['url']}: {format_size(store['used_bytes'])} of {format_size(store['size_bytes'])}"
                + ("  FULL" if st["store_full"] else "") + ("  DRAINING" if st["draining"] else ""))
    rates = Text(f"faults/s {_rate(prev, cur, 'faults_total'):.0f}   "
                 f"swap-ins/s {_rate(prev, cur, 'swapins_total'):.0f} pages   "
                 f"swap-outs/s {_rate(prev, cur, 'swapouts_total'):.0f} pages   "
                 f"writeback {st['writeback_inflight']}  reads {st['reads_inflight']}")
    resident, limit = st["resident_bytes"], st["max_resident_bytes"]
    memory = Text(f"resident [{_bar(resident, limit)}] {format_size(resident)} of {format_size(limit)}"
                  f" budget ({budget.get('mode', 'fixed')})   swapped {format_size(st['swapped_bytes'])}")
    lines = [head, rates, memory]
    daemon = st.get("daemon")
    if daemon is not None and prev.status.get("daemon") is not None and dt > 0:
        before = prev.status["daemon"]
        cpu = (daemon["cpu_user_seconds_total"] + daemon["cpu_system_seconds_total"]
               - before["cpu_user_seconds_total"] - before["cpu_system_seconds_total"]) / dt
        lines.append(Text(f"daemon rss {format_size(daemon['rss_bytes'])}  cpu {cpu * 100:.0f}%"))
    return Group(*lines, Text(""), _latency_table(prev, cur), Text(""), _clients_table(prev, cur))


def run(read_status: Callable[[], dict], interval: float, iterations: int | None,
        console: Console | None = None) -> int:
    """Show the daemon: `iterations` views printed one after another (for
    scripts), or (None) a live view until interrupted. Each view compares
    two readings `interval` seconds apart."""
    if console is None:
        console = Console()
        if not console.is_terminal:
            console = Console(width=max(console.width, 110))  # a pipe or a file: no wrapped lines
    prev = Reading(time.monotonic(), read_status())
    if iterations is not None:
        for _ in range(iterations):
            time.sleep(interval)  # the view's period, not a synchronisation
            cur = Reading(time.monotonic(), read_status())
            console.print(view(prev, cur))
            prev = cur
        return 0
    with Live(console=console, auto_refresh=False, screen=False) as live:
        try:
            while True:
                time.sleep(interval)
                cur = Reading(time.monotonic(), read_status())
                live.update(view(prev, cur), refresh=True)
                prev = cur
        except KeyboardInterrupt:
            return 0

"""Protocol fuzz (issue 9): about 10^4 bad messages on the daemon's socket
while a well-behaved client keeps its data.

The fuzzer (tests/protocol_fuzzer.py) sends, from a seeded RNG, truncated and
oversized frames, bad and non-object JSON, fields missing or of the wrong
type, unknown ops, ops before hello, allocs with 0..8 fds of the wrong kinds
or wrongly registered userfaultfds or addresses that do not match, garbage,
connections that close mid-frame and connections that stay silent; first on
one connection at a time, then from four threads at once. The seed is
printed; USWAP_FUZZ_SEED=N replays it (USWAP_FUZZ_MESSAGES=N changes the
count).

Meanwhile a separate client process (tests/steady_client.py) rewrites and
verifies every byte of a region four times the daemon's budget, round after
round. Afterwards:
  - every message got the answer a correct daemon gives (see protocol_fuzzer);
  - the daemon is alive, its log has no traceback and stays short (client
    faults are rate-limited like store errors);
  - the connections left silent (nothing sent, or a frame cut short) were
    closed by the daemon within SILENT_LIMIT s;
  - its fd count returns to the baseline (startup + the good client) once the
    fuzz connections are closed; its RSS grew by less than RSS_GROWTH_LIMIT;
  - the good client saw 0 wrong bytes and no round took longer than STALL_LIMIT;
  - a fresh client connects, allocates, writes and reads back; the audit balances.
All of these are checked and reported together, so one run shows every
failing property.

File store only: the fuzz is aimed at the socket layer, which is the same
for every store, and the run is bounded in time (~60-90 s).
"""
from __future__ import annotations

import collections
import os
import random
import re
import sys
import time

from tests.harness import Workload, status, wait_clean, wait_for
from tests.protocol_fuzzer import FdPool, Fuzzer, closed_by_peer
from tests.steady_client import round_trip

MESSAGES = int(os.environ.get("USWAP_FUZZ_MESSAGES", "10000"))
FUZZ_SECONDS = 75           # the fuzz stops here even if messages remain
SILENT_LIMIT = 30.0         # s: a connection that sends nothing (or half a frame) is closed by then
FD_SETTLE = 15.0            # s: after the fuzz connections close, the daemon's fds are back by then
RSS_GROWTH_LIMIT = 16 << 20 # bytes the daemon's RSS may grow over the run
LOG_LINES_LIMIT = 300       # daemon log lines for the whole fuzz (10^4 bad messages)
STALL_LIMIT = 30.0          # s: longest gap between two rounds of the good client


class SteadyClient(Workload):
    """tests.steady_client in its own process, its output read with deadlines."""

    def __init__(self, socket: str, size: str) -> None:
        self._spawn([sys.executable, "-m", "tests.steady_client", "--socket", socket, "--size", size])


def fd_targets(pid: int) -> collections.Counter:
    """What the process's fds point at, by kind (pipe, socket, memfd name...)."""
    kinds = collections.Counter()
    for name in os.listdir(f"/proc/{pid}/fd"):
        try:
            target = os.readlink(f"/proc/{pid}/fd/{name}")
        except FileNotFoundError:
            continue  # closed meanwhile
        kinds[re.sub(r":\[\d+\]$", "", target).replace(" (deleted)", "")] += 1
    return kinds


def rss_bytes(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    raise AssertionError(f"no VmRSS in /proc/{pid}/status")


def check_silent_connections(fuzzer: Fuzzer) -> list[str]:
    """Each silent connection must have been closed by the daemon within
    SILENT_LIMIT s of its opening; waits (bounded) for the youngest ones."""
    problems = []
    for s, opened, what in fuzzer.silent:
        while not closed_by_peer(s) and time.monotonic() < opened + SILENT_LIMIT:
            time.sleep(0.1)  # polling the connection's state against its deadline
        if not closed_by_peer(s):
            problems.append(what)
    if problems:
        return [f"{len(problems)} of {len(fuzzer.silent)} silent connections were still open"
                f" {SILENT_LIMIT:.0f}s after they opened: {collections.Counter(problems)}"]
    return []


def check_good_client(good: SteadyClient) -> list[str]:
    """Stop the good client; it must have seen every byte right and never stalled."""
    good.send("stop\n")
    try:
        lines = good.finish(timeout=120)
    except AssertionError as e:
        return [f"the good client did not finish: {e}"]
    stderr = good.proc.stderr.read()[-2000:]
    if not lines or not lines[-1].get("done"):
        return [f"the good client exited {good.proc.returncode} without its summary: {lines[-5:]} {stderr}"]
    problems = []
    wrong = lines[-1]["wrong_bytes"]
    if wrong or good.proc.returncode != 0:
        bad_rounds = [x for x in lines if x.get("wrong_bytes")]
        problems.append(f"the good client read {wrong} wrong bytes (exit {good.proc.returncode}):"
                        f" {bad_rounds[:5]}")
    times = [x["t"] for x in lines]
    gaps = [b - a for a, b in zip(times, times[1:])]
    if max(gaps) > STALL_LIMIT:
        problems.append(f"the good client stalled: {max(gaps):.1f}s between two rounds"
                        f" (limit {STALL_LIMIT:.0f}s); {lines[-1]['rounds']} rounds")
    print(f"good client: {lines[-1]['rounds']} rounds, longest {max(gaps):.2f}s, wrong bytes {wrong}")
    return problems


def test_protocol_fuzz(file_backing, start_daemon, tmp_path):
    seed = int(os.environ.get("USWAP_FUZZ_SEED") or random.SystemRandom().randrange(1 << 32))
    print(f"protocol fuzz: seed {seed} (replay with USWAP_FUZZ_SEED={seed}), {MESSAGES} messages")
    d = start_daemon(file_backing, store_size="128M", max_resident="2M")
    pid = d.proc.pid
    good = SteadyClient(d.socket, "8M")
    pool = None
    fuzzer = None
    problems: list[str] = []
    try:
        good.wait_line(lambda x: x.get("round") == 2, timeout=120)  # verified once
        swapped = status(d)["swapped_bytes"]
        assert swapped >= 4 << 20, f"the good client's region is not swapping ({swapped} bytes out)"
        fds_before = fd_targets(pid)
        rss_before = rss_bytes(pid)
        log_lines_before = len(d.log_text().splitlines())
        print(f"baseline: {sum(fds_before.values())} fds, RSS {rss_before >> 20} MiB")

        pool = FdPool(str(tmp_path))
        fuzzer = Fuzzer(d.socket, seed, pool)
        started = time.monotonic()
        deadline = started + FUZZ_SECONDS
        sequential = MESSAGES * 2 // 5
        fuzzer.run(sequential, workers=1, deadline=deadline, stream=0)
        fuzzer.run(MESSAGES - sequential, workers=4, deadline=deadline, stream=1)
        report = fuzzer.report
        print(report.summary())
        print(f"fuzz took {time.monotonic() - started:.1f}s; outcomes:",
              dict(sorted(collections.Counter({f"{c}:{o}": n for (c, o), n in report.outcomes.items()}).items())))
        assert d.proc.poll() is None, f"seed {seed}: the daemon died:\n{d.log_text()[-5000:]}"
        if report.finding_counts:
            problems.append("answers that differ from a correct daemon's:\n" + report.summary())
        assert fuzzer.silent, "the run left no connection silent"
        problems += check_silent_connections(fuzzer)

        fuzzer.close_all()
        pool.close()
        pool = None
        baseline = sum(fds_before.values())
        try:
            wait_for("the daemon's fd count back to its baseline",
                     lambda: sum(fd_targets(pid).values()) <= baseline, timeout=FD_SETTLE)
        except AssertionError:
            now = fd_targets(pid)
            extra = {k: n for k, n in (now - fds_before).items()}
            problems.append(f"the daemon holds {sum(now.values())} fds, {sum(now.values()) - baseline}"
                            f" more than its baseline {baseline}, {FD_SETTLE:.0f}s after every fuzz"
                            f" connection closed; the extra ones: {extra}")
        grown = rss_bytes(pid) - rss_before
        print(f"RSS grew by {grown / 2**20:.1f} MiB")
        if grown >= RSS_GROWTH_LIMIT:
            problems.append(f"the daemon's RSS grew by {grown >> 20} MiB (limit {RSS_GROWTH_LIMIT >> 20} MiB)")

        problems += check_good_client(good)
    finally:
        good.kill()
        if fuzzer is not None:
            fuzzer.close_all()
        if pool is not None:
            pool.close()

    assert d.proc.poll() is None, f"seed {seed}: the daemon died:\n{d.log_text()[-5000:]}"
    trouble = round_trip(d.socket)
    if trouble:
        problems.append(trouble)
    try:
        wait_clean(d)  # nothing charged, no slot used, the audit balances
    except AssertionError as e:
        problems.append(f"after every client left: {e}")
    text = d.log_text()
    if "Traceback" in text:
        i = text.index("Traceback")
        problems.append(f"the daemon logged a traceback:\n{text[max(0, i - 500):i + 2500]}")
    fuzz_lines = text.splitlines()[log_lines_before:]
    print(f"daemon log: {len(fuzz_lines)} lines during and after the fuzz")
    if len(fuzz_lines) >= LOG_LINES_LIMIT:
        common = collections.Counter(re.sub(r"\d+", "N", line.split(": ", 1)[-1])[:100]
                                     for line in fuzz_lines).most_common(5)
        problems.append(f"the daemon logged {len(fuzz_lines)} lines for {fuzzer.report.messages} fuzz"
                        f" messages (limit {LOG_LINES_LIMIT}: client-caused lines must be rate-limited);"
                        f" most common: {common}")
    assert not problems, f"seed {seed}:\n" + "\n".join(f"- {p}" for p in problems)

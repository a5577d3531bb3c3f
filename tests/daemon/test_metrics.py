"""The Prometheus endpoint (uswap/daemon/metrics.py), scraped over HTTP from
a real daemon while a real workload runs, and parsed with
prometheus_client's own parser."""
from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
import urllib.request

from prometheus_client.parser import text_string_to_metric_families

import uswap
from tests.daemon_proc import REPO
from tests.harness import Workload
from uswap.daemon.metrics import status_numbers


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def scrape(address: str) -> dict[str, list]:
    """name -> samples of every family the endpoint serves."""
    with urllib.request.urlopen(f"http://{address}/metrics", timeout=10) as r:
        assert r.status == 200
        text = r.read().decode()
    out: dict[str, list] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            out.setdefault(sample.name, []).append(sample)
    return out


def value(metrics: dict, metric: str, **labels: str) -> float:
    found = [s.value for s in metrics[metric] if all(s.labels.get(k) == v for k, v in labels.items())]
    assert len(found) == 1, (metric, labels, metrics.get(metric))
    return found[0]


def test_metrics_move_during_a_workload(start_daemon, file_backing):
    address = f"127.0.0.1:{free_port()}"
    # 48 MiB of random passes under a 16 MiB budget: swap-outs, swap-ins
    # served by the C fast path (random) and by the engine.
    d = start_daemon(file_backing, max_resident="16M", config={"metrics_listen": address})
    assert f"Prometheus endpoint at http://{address}/metrics" in d.log_text()
    first = scrape(address)
    assert "uswap_swapins_total" in first, "ready, but the endpoint had no status yet"
    w = Workload(d.socket, "--size", "48M", "--passes", "4", "--order", "random", "--name", "scraped-client")
    idle = uswap.connect(d.socket, name="idle-conn")
    try:
        w.wait_line(lambda x: x.get("pass") == 2, timeout=120)
        deadline = time.monotonic() + 30
        while True:  # the endpoint's status is at most metrics.REFRESH_S old
            now = scrape(address)
            if ("uswap_client_faults_total" in now
                    and value(now, "uswap_swapins_total") > value(first, "uswap_swapins_total")):
                break
            assert time.monotonic() < deadline, "swap-ins never showed in the metrics"
            time.sleep(0.2)  # polling a condition with a deadline
        # Counters moved.
        for name in ("uswap_faults_total", "uswap_swapouts_total", "uswap_swapins_total",
                     "uswap_fast_path_faults_total", "uswap_fast_path_swapins_total"):
            assert value(now, name) > value(first, name), name
        # The client's own series, labelled with the name it gave in hello.
        labels = {"name": "scraped-client", "pid": str(w.pid), "uid": str(os.getuid())}
        assert value(now, "uswap_client_faults_total", **labels) > 0
        assert value(now, "uswap_client_regions", **labels) == 1
        assert value(now, "uswap_client_resident_bytes", **labels) > 0
        assert value(now, "uswap_client_swapped_bytes", **labels) > 0
        # A connection holding no memory (`uswap status`, `uswap top`) has no series.
        assert any(c["name"] == "idle-conn" for c in d.status()["clients"])
        assert {s.labels["name"] for s in now["uswap_client_regions"]} == {"scraped-client"}
        # Histograms have counts, with cumulative buckets ending in +Inf = _count.
        for hist in ("uswap_swapin_latency_seconds", "uswap_fault_latency_seconds", "uswap_lock_wait_latency_seconds"):
            buckets = now[f"{hist}_bucket"]
            counts = [b.value for b in buckets]
            assert counts == sorted(counts) and buckets[-1].labels["le"] == "+Inf"
            assert counts[-1] == value(now, f"{hist}_count") > 0
            assert value(now, f"{hist}_sum") > 0
        # Every swap-in the C fast path made is one observation there (fastpath.c
        # fp_finish): the histogram holds at least as many as it made.
        assert value(now, "uswap_swapin_latency_seconds_count") >= value(now, "uswap_fast_path_swapins_total") > 0
        # Each fault the fault threads served took the page lock to be
        # dispatched, and a swap-in took it again to finish: one wait each.
        assert (value(now, "uswap_lock_wait_latency_seconds_count")
                >= value(now, "uswap_fast_path_faults_total") + value(now, "uswap_fast_path_swapins_total"))
        w.finish_ok(120)
    finally:
        idle.close()
        w.kill()
    # Every number of status is a metric: the one rule, checked against status itself.
    final = scrape(address)
    wanted = {name for name, _ in status_numbers(d.status())}
    served = {name[:-len("_total")] if name.endswith("_total") else name for name in final} | set(final)
    assert wanted <= served, wanted - served
    assert value(final, "uswap_daemon_rss_bytes") > 0
    assert value(final, "uswap_info", version=d.status()["version"]) == 1


def test_metrics_are_off_by_default(start_daemon, file_backing):
    d = start_daemon(file_backing)
    assert "Prometheus endpoint" not in d.log_text()


def test_a_busy_metrics_address_is_refused_before_the_store_is_made(tmp_path):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        address = f"127.0.0.1:{taken.getsockname()[1]}"
        config = tmp_path / "uswap.yaml"
        config.write_text(f'metrics_listen: "{address}"\n')
        backing = tmp_path / "swapfile"
        r = subprocess.run([sys.executable, "-m", "uswap.cli", "run", "--config", str(config), "--backing",
                            str(backing), "--store-size", "64M", "--max-resident", "16M", "--socket", str(tmp_path / "s.sock")],
                           capture_output=True, text=True, cwd=REPO, timeout=60)
    assert r.returncode == 2, r.stderr
    assert f"metrics_listen: {address}: cannot listen: Address already in use" in r.stderr
    assert not backing.exists()
    assert not (tmp_path / "s.sock").exists()

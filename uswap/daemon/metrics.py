"""The Prometheus endpoint (`metrics_listen`, off by default), built on
prometheus_client.

What it exposes is generated from the status dict (Ops.status), one rule
for all of it, so a counter added to status is exported without a word here:
- every number (and boolean, as 0/1) of status, nested keys joined by "_",
  prefixed "uswap_": a key ending in "_total" is a counter, any other a
  gauge; strings are left out but for the version and the store's url,
  which label `uswap_info`;
- `clients`: per-client series labelled name, pid and uid, for clients
  holding regions
  (uswap_client_resident_bytes, uswap_client_swapped_bytes,
  uswap_client_regions, uswap_client_faults_total);
- `latency`: histograms uswap_swapin_latency_seconds and
  uswap_fault_latency_seconds (latency.py: the engine's and the fast path's
  observations together), and uswap_lock_wait_latency_seconds (the fault
  threads' waits for the page lock).

Thread and lock: the HTTP server runs on a thread of its own and never takes
the page lock. The engine thread publishes a fresh status dict (a new object
each time, never changed after) every REFRESH_S seconds, holding the lock as
it always does; a scrape reads the latest one through a single reference,
which is atomic under the GIL. A scrape is at most REFRESH_S old.
"""
from __future__ import annotations

import logging
from typing import Iterator

from prometheus_client import CollectorRegistry, start_http_server
from prometheus_client.core import (CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily,
                                    InfoMetricFamily, Metric)

from uswap.config import split_listen_address

log = logging.getLogger("uswap.metrics")

REFRESH_S = 1.0
PREFIX = "uswap"
#: Keys of status exposed by rules of their own (below), not as plain numbers.
OWN_RULES = ("clients", "latency")
HISTOGRAMS = {"swapin": "swap-in latency: a store read, from the fault that asked for it to its pages mapped",
              "fault": "fault-service latency: a page fault, from when the daemon took it to when it was resolved",
              "lock_wait": "the fault threads' waits for the page lock, which the engine holds while it runs"}


def status_numbers(status: dict) -> Iterator[tuple[str, float]]:
    """(metric name, value) of every number and boolean of `status`, nested
    keys joined by "_" (the one rule that turns status into metrics). A name
    met twice (status's `store_full` and `store` -> `full`, the same fact) is
    exported once, the first time."""
    seen: set[str] = set()
    for name, value in _numbers(status, ()):
        if name not in seen:
            seen.add(name)
            yield name, value


def _numbers(status: dict, path: tuple[str, ...]) -> Iterator[tuple[str, float]]:
    for key, value in status.items():
        if not path and key in OWN_RULES:
            continue
        here = path + (key,)
        if isinstance(value, dict):
            yield from _numbers(value, here)
        elif isinstance(value, (bool, int, float)):
            yield "_".join((PREFIX,) + here), float(value)


def status_metrics(status: dict) -> Iterator[Metric]:
    """Every metric of one status dict."""
    for name, value in status_numbers(status):
        what = f"uswap status: {name[len(PREFIX) + 1:]}"
        family = CounterMetricFamily(name, what) if name.endswith("_total") else GaugeMetricFamily(name, what)
        family.add_metric([], value)
        yield family
    yield InfoMetricFamily(f"{PREFIX}", "the daemon's version and store",
                           value={"version": str(status.get("version", "")),
                                  "store": str(status.get("store", {}).get("url", ""))})
    yield from _client_metrics(status.get("clients", []))
    for key, doc in HISTOGRAMS.items():
        hist = status.get("latency", {}).get(key)
        if hist is None:
            continue
        buckets, seen = [], 0
        for bound, count in zip(hist["bounds_s"] + ["+Inf"], hist["counts"]):
            seen += count  # status counts per bucket; Prometheus buckets are cumulative
            buckets.append((str(bound) if bound == "+Inf" else repr(float(bound)), seen))
        yield HistogramMetricFamily(f"{PREFIX}_{key}_latency_seconds", doc, buckets=buckets,
                                    sum_value=hist["sum_s"])


def _client_metrics(clients: list[dict]) -> Iterator[Metric]:
    labels = ["name", "pid", "uid"]
    resident = GaugeMetricFamily(f"{PREFIX}_client_resident_bytes", "a client's resident bytes", labels=labels)
    swapped = GaugeMetricFamily(f"{PREFIX}_client_swapped_bytes", "a client's bytes on the store", labels=labels)
    regions = GaugeMetricFamily(f"{PREFIX}_client_regions", "a client's live regions", labels=labels)
    faults = CounterMetricFamily(f"{PREFIX}_client_faults", "page faults of a client's regions served",
                                 labels=labels)
    for c in clients:
        if not c["regions"]:
            # A connection holding no memory (`uswap status`, `uswap top`, a
            # client between regions): a series per such pid would only add
            # label sets that come and go.
            continue
        values = [str(c.get("name", "")), str(c["pid"]), str(c["uid"])]
        resident.add_metric(values, sum(r["resident_bytes"] for r in c["regions"]))
        swapped.add_metric(values, sum(r["swapped_bytes"] for r in c["regions"]))
        regions.add_metric(values, len(c["regions"]))
        faults.add_metric(values, sum(r.get("faults", 0) for r in c["regions"]))
    yield from (resident, swapped, regions, faults)


class _Snapshot:
    """The registry's one collector: the latest published status."""

    def __init__(self) -> None:
        self.status: dict | None = None

    def collect(self) -> Iterator[Metric]:
        status = self.status  # one read of the reference: the dict is never changed after publish
        if status is not None:
            yield from status_metrics(status)


class MetricsServer:
    def __init__(self, address: str) -> None:
        """Listen on `address` (config metrics_listen, HOST:PORT). Raises
        ValueError naming the address and the cause when it cannot."""
        host, port = split_listen_address(address)
        self.snapshot = _Snapshot()
        registry = CollectorRegistry(auto_describe=False)
        registry.register(self.snapshot)
        try:
            self.httpd, self.thread = start_http_server(port, host, registry=registry)
        except OSError as e:
            raise ValueError(f"metrics_listen: {address}: cannot listen: {e.strerror or e}") from None
        self.address = address
        log.info("metrics: Prometheus endpoint at http://%s/metrics", address)

    def publish(self, status: dict) -> None:
        """Engine thread: the status the next scrapes read."""
        self.snapshot.status = status

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()

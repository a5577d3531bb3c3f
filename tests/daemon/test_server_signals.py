"""Every signal a service receives has a defined meaning (server.py):
SIGHUP reloads the config file's runtime settings (the budget, its
watermarks, the log level, the per-uid limits) and says so; SIGTERM,
SIGINT and SIGQUIT drain; SIGUSR1 logs a status line; the others a service
may be sent are logged and ignored. No signal makes the daemon exit with
pages still on the store, except SIGUSR2, the handover to a new daemon that
adopts them (tests/system/test_adoption.py)."""
from __future__ import annotations

import os
import re
import signal

import pytest

import uswap
from tests.harness import wait_for

MIB = 1 << 20
PAGE = 4096


def stamp(buf: memoryview, seed: int) -> None:
    for off in range(0, len(buf), PAGE):
        buf[off:off + 8] = (seed * 1_000_003 + off).to_bytes(8, "little")


def bad_pages(buf: memoryview, seed: int) -> int:
    return sum(bytes(buf[off:off + 8]) != (seed * 1_000_003 + off).to_bytes(8, "little")
               for off in range(0, len(buf), PAGE))


def logged(d, text: str):
    return lambda: text in d.log_text()


def test_sighup_lowers_the_budget_and_the_pages_stay_right(engine_backing, start_daemon):
    d = start_daemon(engine_backing, store_size="128M", max_resident=None,
                     config={"max_resident": "32M"})
    with uswap.connect(d.socket) as c:
        region = c.alloc(24 * MIB)
        stamp(region.buf, 7)
        assert d.status()["resident_bytes"] >= 24 * MIB
        d.write_config({"max_resident": "8M", "low_watermark": 0.5, "high_watermark": 0.75})
        d.proc.send_signal(signal.SIGHUP)
        wait_for("reload logged", logged(d, "reloaded " + d.config_path), 10)
        log = d.log_text()
        assert "max_resident 32.0 MiB -> 8.0 MiB" in log and "low_watermark 0.96 -> 0.5" in log, log
        st = d.status()
        assert st["max_resident_bytes"] == 8 * MIB
        # Victims are chosen in scans sized for the new budget (an eighth of
        # it, at least 256 pages), not the old one's 1024.
        assert st["victim_scan_pages"] == 256, st
        # The lower budget is reached by reclaim, with no fault to prompt it.
        wait_for("resident under the new budget",
                 lambda: d.status()["resident_bytes"] <= 8 * MIB, 30)
        assert d.status()["swapouts_total"] > 0
        assert bad_pages(region.buf, 7) == 0
        assert d.status()["resident_bytes"] <= 8 * MIB + 8 * PAGE  # faulting them back kept to it
        # Raised again: every page fits, nothing is evicted any more.
        d.write_config({"max_resident": "64M"})
        d.proc.send_signal(signal.SIGHUP)
        wait_for("second reload", lambda: d.log_text().count("reloaded ") == 2, 10)
        assert d.status()["max_resident_bytes"] == 64 * MIB
        assert bad_pages(region.buf, 7) == 0
        before = d.status()["swapouts_total"]
        stamp(region.buf, 8)
        assert bad_pages(region.buf, 8) == 0 and d.status()["swapouts_total"] == before
        region.close()
    assert d.stop() == 0


def test_sighup_with_a_bad_config_keeps_the_running_one(file_backing, start_daemon):
    d = start_daemon(file_backing, store_size="64M", max_resident=None,
                     config={"max_resident": "16M"})
    d.write_config({"max_resident": "12345"})
    d.proc.send_signal(signal.SIGHUP)
    wait_for("refusal logged", logged(d, "reload refused"), 10)
    log = d.log_text()
    assert "max_resident: '12345' is not a positive multiple of 4096 bytes" in log, log
    assert "keeping the running configuration" in log
    assert d.status()["max_resident_bytes"] == 16 * MIB
    assert d.proc.poll() is None
    assert d.stop() == 0


def test_sighup_names_settings_that_need_a_restart(file_backing, start_daemon):
    d = start_daemon(file_backing, store_size="64M", max_resident=None, log_level=None,
                     config={"max_resident": "16M", "io_threads": 4})
    d.write_config({"max_resident": "16M", "io_threads": 2, "log_level": "debug"})
    d.proc.send_signal(signal.SIGHUP)
    wait_for("reload logged", logged(d, "reloaded "), 10)
    log = d.log_text()
    assert "log_level info -> debug" in log, log
    assert "io_threads changed in the file; it takes effect at the next restart" in log, log
    assert d.status()["max_resident_bytes"] == 16 * MIB


def test_sighup_without_a_config_file_changes_nothing(file_backing, start_daemon):
    d = start_daemon(file_backing, store_size="64M", max_resident="16M")
    d.proc.send_signal(signal.SIGHUP)
    wait_for("reload logged", logged(d, "SIGHUP: no config file"), 10)
    assert d.status()["max_resident_bytes"] == 16 * MIB


def test_sighup_applies_lowered_per_uid_limits(file_backing, start_daemon):
    """Per-uid limits are reloaded on SIGHUP as the budget is. A uid already
    past a lowered limit keeps what it holds (its regions and their pages,
    its connection); what it asks for next is refused naming the limit, and
    its resident pages go down to a lowered share with no fault to prompt
    it. Before, the reload only said they took effect at the next restart,
    and the daemon went on allowing what the file no longer did."""
    base = {"max_resident": "32M"}
    d = start_daemon(file_backing, store_size="64M", max_resident=None, config=base)
    uid = os.getuid()
    with uswap.connect(d.socket) as c:
        regions = [c.alloc(2 * MIB) for _ in range(3)]
        for seed, region in enumerate(regions):
            stamp(region.buf, seed)
        assert d.status()["resident_bytes"] >= 6 * MIB
        d.write_config({**base, "max_regions_per_uid": 2, "max_region_bytes_per_uid": "4M",
                        "max_resident_per_uid": "1M"})
        d.proc.send_signal(signal.SIGHUP)
        wait_for("reload logged", logged(d, "reloaded " + d.config_path), 10)
        # Past the region limit: no more regions, for an alloc nor a fork's child.
        with pytest.raises(uswap.UswapError, match=re.escape(
                f"alloc: uid {uid} holds 3 regions, the most max_regions_per_uid (2) allows; free one first")):
            c.alloc(4096)
        with c._lock, pytest.raises(uswap.UswapError, match=re.escape(
                f"fork_begin: uid {uid} holds 3 regions; 1 more would exceed max_regions_per_uid (2)")):
            c._exchange({"op": "fork_begin", "regions": [regions[0].id]})
        # Past its new resident share: evicted down to it, with no fault to prompt it.
        wait_for("resident under the uid's new share", lambda: d.status()["resident_bytes"] <= 1 * MIB, 30)
        assert d.status()["swapouts_total"] > 0
        log = d.log_text()
        assert ("max_regions_per_uid no limit -> 2" in log and "max_region_bytes_per_uid no limit -> 4.0 MiB" in log
                and "max_resident_per_uid no limit -> 1.0 MiB" in log), log
        assert "per_uid changed in the file; it takes effect at the next restart" not in log, log
        # What it held is kept, every page of it.
        assert [bad_pages(region.buf, seed) for seed, region in enumerate(regions)] == [0, 0, 0]
        regions.pop().close()
        regions.pop().close()  # 1 region of 2 MiB: room for one more region, not for 4 MiB more
        with pytest.raises(uswap.UswapError, match=re.escape(
                f"alloc: uid {uid} holds {2 * MIB} bytes of regions; {4 * MIB} bytes more would exceed"
                f" max_region_bytes_per_uid ({4 * MIB} bytes)")):
            c.alloc(4 * MIB)
        c.alloc(2 * MIB).close()  # within both limits: served
        # The connection limit lowered under what the uid has open: its
        # connection lives on, a new one is refused.
        d.write_config({**base, "max_clients_per_uid": 1})
        d.proc.send_signal(signal.SIGHUP)
        wait_for("second reload", lambda: d.log_text().count("reloaded ") == 2, 10)
        assert "max_clients_per_uid no limit -> 1" in d.log_text(), d.log_text()
        with pytest.raises(uswap.UswapError, match=re.escape(
                f"uid {uid} has 1 connections open, the most max_clients_per_uid (1)")):
            uswap.connect(d.socket)
        c.alloc(8 * MIB).close()  # the region limits are gone again
        assert bad_pages(regions[0].buf, 0) == 0
        regions[0].close()
    assert d.stop() == 0


@pytest.mark.parametrize("sig", [signal.SIGUSR1, signal.SIGALRM, signal.SIGPIPE])
def test_signals_that_do_not_stop_the_daemon(file_backing, start_daemon, sig):
    d = start_daemon(file_backing, store_size="64M", max_resident="4M")
    with uswap.connect(d.socket) as c:
        region = c.alloc(8 * MIB)
        stamp(region.buf, 3)
        d.proc.send_signal(sig)
        name = signal.Signals(sig).name
        if sig == signal.SIGPIPE:
            d.status()  # ignored (SIG_IGN): discarded as it is sent, and nothing to log
        else:
            wait_for(f"{name} logged", logged(d, f"{name}:"), 10)
        assert d.proc.poll() is None
        assert bad_pages(region.buf, 3) == 0
        if sig == signal.SIGUSR1:
            assert "SIGUSR1: status: resident" in d.log_text()
        region.close()
    assert d.stop() == 0


def test_sigquit_drains_like_sigterm(file_backing, start_daemon):
    d = start_daemon(file_backing, store_size="64M", max_resident="4M")
    with uswap.connect(d.socket) as c:
        region = c.alloc(8 * MIB)
        stamp(region.buf, 5)
        assert d.status()["swapped_bytes"] > 0
        assert d.stop(signal.SIGQUIT) == 0
        # Handed back whole: every page readable with the daemon gone.
        assert bad_pages(region.buf, 5) == 0
    assert "SIGQUIT: draining" in d.log_text()
    assert "drained: every page is home" in d.log_text()
    assert not os.path.exists(d.socket)

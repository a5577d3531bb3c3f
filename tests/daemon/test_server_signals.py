"""Every signal a service receives has a defined meaning (server.py):
SIGHUP reloads the config file's runtime settings and says so; SIGTERM,
SIGINT and SIGQUIT drain; SIGUSR1 logs a status line; the others a service
may be sent are logged and ignored. No signal makes the daemon exit with
pages still on the store, except SIGUSR2, the handover to a new daemon that
adopts them (tests/system/test_adoption.py)."""
from __future__ import annotations

import os
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

"""Settings: defaults, YAML, overrides, and clear refusals."""
from __future__ import annotations

import pytest

from uswap import config
from uswap.sizes import parse_size


@pytest.mark.parametrize("text,value", [("4096", 4096), ("64M", 64 << 20), ("1G", 1 << 30),
                                        ("512MiB", 512 << 20), ("2k", 2048), (8192, 8192), ("1.5G", 3 << 29)])
def test_sizes(text, value):
    assert parse_size(text) == value


@pytest.mark.parametrize("bad", ["12X", "", "-5", "1.3", True, None, [1], "G"])
def test_bad_sizes_name_value_and_form(bad):
    with pytest.raises(ValueError) as e:
        parse_size(bad, "max_resident")
    assert "max_resident" in str(e.value) and repr(bad) in str(e.value) and "e.g. 4096, 64M" in str(e.value)


def test_shipped_yaml_is_the_defaults():
    import os
    here = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    assert config.load(os.path.join(here, "config", "uswap.yaml")) == config.load(None)


def test_flags_override_file(tmp_path):
    p = tmp_path / "c.yaml"
    p.write_text("max_resident: 2G\nio_threads: 2\n")
    cfg = config.load(str(p), {"max_resident": "64M", "backing": None})
    assert cfg.max_resident == 64 << 20 and cfg.io_threads == 2


@pytest.mark.parametrize("text,needle", [
    ("max_resident: lots\n", "max_resident: 'lots' is not a size"),
    ("bogus: 1\n", "unknown key 'bogus'"),
    ("io_threads: 0\n", "io_threads: 0 is not accepted; use a whole number from 1 to 64"),
    ("read_failure: zeros\n", "read_failure: 'zeros' is not accepted; use one of hard, sigbus"),
    ("high_watermark: 2\n", "high_watermark: 2 is not a fraction"),
    ("low_watermark: 0.99\n", "must be below high_watermark"),
    ("write_retry_min: soon\n", "write_retry_min: 'soon' is not a duration"),
    ("store_size: 5000\n", "store_size: 5000 is not a positive multiple of 4096"),
    ("socket_mode: '0999'\n", "socket_mode: '0999' is not accepted; use octal permission bits"),
    ("socket_mode: 660\n", "socket_mode: 660 is not accepted"),
    ("socket_group: no-such-group-here\n", "socket_group: 'no-such-group-here' is not a group on this host"),
    ("socket_group: [1]\n", "socket_group: [1] is not accepted; use a group name"),
    ("max_clients_per_uid: -1\n", "max_clients_per_uid: -1 is not accepted; use a whole number from 1 to"),
    ("max_regions_per_uid: many\n", "max_regions_per_uid: 'many' is not accepted"),
    ("max_region_bytes_per_uid: 5000\n", "max_region_bytes_per_uid: 5000 is not a positive multiple of 4096"),
    ("- a\n- b\n", "expected a mapping"),
    ("a: [\n", "not valid YAML"),
    ("max_resident: automatic\n", "max_resident: 'automatic' is not a size; use a byte count"),
    ("metrics_listen: 9464\n", "metrics_listen: 9464 is not accepted; use \"\" (off) or HOST:PORT"),
    ("metrics_listen: 'localhost:0'\n", "metrics_listen: 'localhost:0' is not accepted"),
    ("metrics_listen: 'http://h:80'\n", "metrics_listen: 'http://h:80' is not accepted"),
    ("metrics_listen: '::1:9464'\n", "metrics_listen: '::1:9464' is not accepted; use \"\" (off) or HOST:PORT,"
                                     " e.g. 127.0.0.1:9464 or [::1]:9464"),
    ("auto_fraction: 0\n", "auto_fraction: 0 is not a fraction"),
    ("auto_pressure: 101\n", "auto_pressure: 101 is not accepted; use a percentage"),
    ("auto_max: all\n", "auto_max: 'all' is not a size; use a byte count or a number with K, M, G or T"),
    ("max_resident: auto\nauto_min: 8K\n", "auto_min: '8K' is too small; use at least 64K"),
])
def test_bad_config_is_refused_clearly(tmp_path, text, needle):
    p = tmp_path / "c.yaml"
    p.write_text(text)
    with pytest.raises(ValueError) as e:
        config.load(str(p))
    assert needle in str(e.value)
    assert f"config file {p}" in str(e.value), "the message must name the file"


@pytest.mark.parametrize("text,overrides,needles", [
    ("max_resident: 8G\n", {}, ("max_resident 8G (config file", "exceeds store_size 4G (default)")),
    ("", {"max_resident": "2G", "store_size": "1G"},
     ("max_resident 2G (command line)", "store_size 1G (command line)")),
    ("store_size: 512K\nmax_resident: 256K\n", {}, ("write_batch 1M (default)", "store_size 512K (config file")),
    ("readahead: 1M\n", {}, ("readahead 1M (config file", "readahead_max 512K (default)")),
    ("readahead_max: 8G\n", {}, ("readahead_max 8G (config file", "store_size 4G (default)")),
    ("read_retry_min: 3s\n", {}, ("read_retry_min 3s (config file", "read_retry_max 2s (default)")),
    ("write_retry_min: 10s\n", {}, ("write_retry_min 10s (config file", "write_retry_max 5s (default)")),
    ("socket_group: users\nsocket_mode: '0604'\n", {},
     ("socket_group users (config file", "socket_mode 0604 (config file", "gives the group no write permission")),
    ("max_resident: auto\nauto_min: 2G\nauto_max: 1G\n", {},
     ("max_resident auto: auto_min 2G (config file", "exceeds auto_max 1G (config file")),
    ("max_resident: auto\nauto_max: 8G\n", {}, ("max_resident auto: auto_max 8G (config file",
                                                 "exceeds store_size 4G (default)")),
    ("auto_min: 128M\n", {"max_resident": "auto", "store_size": "64M"},
     ("auto_min 128M (config file", "exceeds auto_max store_size (default)")),
])
def test_impossible_combinations_name_both_values(tmp_path, text, overrides, needles):
    p = tmp_path / "c.yaml"
    p.write_text(text)
    with pytest.raises(ValueError) as e:
        config.load(str(p), overrides)
    for needle in needles:
        assert needle in str(e.value), str(e.value)
    # Equal is possible: a budget the size of the store, a window at its maximum.
    config.load(None, {"max_resident": "1G", "store_size": "1G"})
    p.write_text("readahead: 512K\nwrite_batch: 64K\nstore_size: 64K\nmax_resident: 64K\nreadahead_max: 64K\n")
    with pytest.raises(ValueError, match="readahead 512K"):
        config.load(str(p))


def test_socket_resolution(monkeypatch):
    monkeypatch.delenv("USWAP_SOCKET", raising=False)
    assert config.socket_path(None) == "/run/uswap/uswap.sock"
    monkeypatch.setenv("USWAP_SOCKET", "/tmp/x.sock")
    assert config.socket_path(None) == "/tmp/x.sock"
    assert config.socket_path("/y.sock") == "/y.sock"


def test_socket_access_settings(tmp_path):
    p = tmp_path / "c.yaml"
    p.write_text("socket_group: users\nsocket_mode: '0620'\nmax_region_bytes_per_uid: 8G\n")
    cfg = config.load(str(p))
    assert (cfg.socket_group, cfg.socket_mode, cfg.max_region_bytes_per_uid) == (100, 0o620, 8 << 30)
    p.write_text("socket_group: 100\nsocket_mode: 0670\n")  # unquoted: YAML's octal
    cfg = config.load(str(p))
    assert (cfg.socket_group, cfg.socket_mode) == (100, 0o670)
    p.write_text("socket_mode: '0600'\n")  # no group given: the daemon's own group and root only
    assert config.load(str(p)).socket_mode == 0o600
    # Unset: the daemon's own group, 0660, no per-uid limits.
    cfg = config.load(None)
    assert (cfg.socket_group, cfg.socket_mode, cfg.max_clients_per_uid, cfg.max_regions_per_uid,
            cfg.max_region_bytes_per_uid) == (None, 0o660, 0, 0, 0)
def test_auto_budget_and_metrics_settings():
    cfg = config.load(None)
    assert not cfg.budget_auto and cfg.metrics_listen == "" and cfg.auto_max == cfg.store_size
    cfg = config.load(None, {"max_resident": "auto", "store_size": "2G"})
    # Until the daemon first looks at the host, the budget is auto_max (the store's size by default).
    assert cfg.budget_auto and cfg.max_resident == cfg.auto_max == 2 << 30
    # The auto bounds are checked only when the budget is automatic.
    assert config.load(None, {"store_size": "32M", "max_resident": "16M"}).auto_min == 64 << 20
    assert config.split_listen_address("[::1]:9464") == ("::1", 9464)
    assert config.split_listen_address("127.0.0.1:80") == ("127.0.0.1", 80)


def test_reload_keeps_the_automatic_budget_in_force(tmp_path):
    p = tmp_path / "c.yaml"
    p.write_text("max_resident: auto\nauto_max: 1G\n")
    running = config.load(str(p))
    running.max_resident = 300 << 20   # where the host has taken it
    new, changed, needs_restart = config.reload(str(p), {}, running)
    assert changed == {} and needs_restart == [] and new.max_resident == 300 << 20
    p.write_text("max_resident: 256M\nmetrics_listen: '127.0.0.1:9464'\n")
    new, changed, needs_restart = config.reload(str(p), {}, running)
    assert changed["max_resident"] == (300 << 20, 256 << 20) and changed["budget_auto"] == (True, False)
    assert needs_restart == ["metrics_listen"] and new.metrics_listen == ""


@pytest.mark.parametrize("value, needle", [
    ("1G", "budget: '1G' is above the store's size (512.0 MiB)"),
    ("32K", "budget: '32K' is too small; use at least 64K"),
    ("lots", "budget: 'lots' is not a size"),
    (12345, "budget: 12345 is not a positive multiple of 4096 bytes"),
])
def test_parse_budget_names_the_bad_value(value, needle):
    with pytest.raises(ValueError) as e:
        config.parse_budget(value, 512 << 20)
    assert needle in str(e.value)
    assert config.parse_budget("512M", 512 << 20) == 512 << 20

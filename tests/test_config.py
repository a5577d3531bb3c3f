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
    ("- a\n- b\n", "expected a mapping"),
    ("a: [\n", "not valid YAML"),
])
def test_bad_config_is_refused_clearly(tmp_path, text, needle):
    p = tmp_path / "c.yaml"
    p.write_text(text)
    with pytest.raises(ValueError) as e:
        config.load(str(p))
    assert needle in str(e.value)


def test_socket_resolution(monkeypatch):
    monkeypatch.delenv("USWAP_SOCKET", raising=False)
    assert config.socket_path(None) == "/run/uswap/uswap.sock"
    monkeypatch.setenv("USWAP_SOCKET", "/tmp/x.sock")
    assert config.socket_path(None) == "/tmp/x.sock"
    assert config.socket_path("/y.sock") == "/y.sock"

"""Daemon settings: defaults, the YAML file, command-line overrides, validation.

config/uswap.yaml documents every key; DEFAULTS below is the single source of
the defaults and of each key's parser.
"""
from __future__ import annotations

import dataclasses
import os
import re
from typing import Any, Callable

import yaml

from uswap.sizes import parse_size

DEFAULT_SOCKET = "/run/uswap/uswap.sock"
PAGE = 4096


def socket_path(explicit: str | None = None) -> str:
    """--socket, else $USWAP_SOCKET, else the system default."""
    return explicit or os.environ.get("USWAP_SOCKET") or DEFAULT_SOCKET


def _duration(value: object, what: str) -> float:
    accepted = "seconds as a number or with a unit: 250ms, 5s, 2m"
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        if value < 0:
            raise ValueError(f"{what}: {value!r} is negative; use {accepted}")
        return float(value)
    if isinstance(value, str):
        m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*(ms|s|m)?\s*", value)
        if m:
            scale = {"ms": 0.001, "s": 1.0, "m": 60.0, None: 1.0}[m.group(2)]
            return float(m.group(1)) * scale
    raise ValueError(f"{what}: {value!r} is not a duration; use {accepted}")


def _fraction(value: object, what: str) -> float:
    if isinstance(value, (int, float)) and not isinstance(value, bool) and 0 < value <= 1:
        return float(value)
    raise ValueError(f"{what}: {value!r} is not a fraction; use a number in (0, 1], e.g. 0.9")


def _count(lo: int, hi: int) -> Callable[[object, str], int]:
    def parse(value: object, what: str) -> int:
        if isinstance(value, int) and not isinstance(value, bool) and lo <= value <= hi:
            return value
        raise ValueError(f"{what}: {value!r} is not accepted; use a whole number from {lo} to {hi}")
    return parse


def _choice(*options: str) -> Callable[[object, str], str]:
    def parse(value: object, what: str) -> str:
        if value in options:
            return value  # type: ignore[return-value]
        raise ValueError(f"{what}: {value!r} is not accepted; use one of {', '.join(options)}")
    return parse


def _string(value: object, what: str) -> str:
    if isinstance(value, str) and value:
        return value
    raise ValueError(f"{what}: {value!r} is not accepted; use a non-empty string")


def _bool(value: object, what: str) -> bool:
    if isinstance(value, bool):
        return value
    raise ValueError(f"{what}: {value!r} is not accepted; use true or false")


def _pages(value: object, what: str) -> int:
    n = parse_size(value, what)
    if n == 0 or n % PAGE:
        raise ValueError(f"{what}: {value!r} is not a positive multiple of 4096 bytes")
    return n


# key -> (default, parser). Keep in step with config/uswap.yaml.
DEFAULTS: dict[str, tuple[Any, Callable[[object, str], Any]]] = {
    "backing": ("/var/lib/uswap/swapfile", _string),
    "store_size": ("4G", _pages),
    "max_resident": ("1G", _pages),
    "socket": (DEFAULT_SOCKET, _string),
    "log_level": ("info", _choice("debug", "info", "warning", "error")),
    "high_watermark": (0.99, _fraction),
    "low_watermark": (0.96, _fraction),
    "io_threads": (4, _count(1, 64)),
    "fault_threads": (4, _count(0, 16)),
    "max_inflight_writes": (32, _count(1, 4096)),
    "write_batch": ("1M", _pages),
    "readahead": ("32K", _pages),
    "readahead_max": ("512K", _pages),
    "max_region_size": ("64G", _pages),
    "max_clients": (256, _count(1, 100000)),
    "control_connections": (4, _count(0, 1000)),
    "max_regions_per_client": (1024, _count(1, 1 << 20)),
    "handshake_timeout": ("5s", _duration),
    "write_retry_min": ("50ms", _duration),
    "write_retry_max": ("5s", _duration),
    "slot_quarantine": ("30s", _duration),
    "read_retry_min": ("20ms", _duration),
    "read_retry_max": ("2s", _duration),
    "read_failure": ("hard", _choice("hard", "sigbus")),
    "read_deadline": ("60s", _duration),
    "error_log_interval": ("5s", _duration),
    "error_log_burst": (5, _count(1, 1000)),
    "nfs_timeout": ("10s", _duration),
    "mlock": (True, _bool),
}


@dataclasses.dataclass
class Config:
    backing: str
    store_size: int
    max_resident: int
    socket: str
    log_level: str
    high_watermark: float
    low_watermark: float
    io_threads: int
    fault_threads: int
    max_inflight_writes: int
    write_batch: int
    readahead: int
    readahead_max: int
    max_region_size: int
    max_clients: int
    control_connections: int
    max_regions_per_client: int
    handshake_timeout: float
    write_retry_min: float
    write_retry_max: float
    slot_quarantine: float
    read_retry_min: float
    read_retry_max: float
    read_failure: str
    read_deadline: float
    error_log_interval: float
    error_log_burst: int
    nfs_timeout: float
    mlock: bool

    @property
    def max_resident_pages(self) -> int:
        return self.max_resident // PAGE


def load(path: str | None = None, overrides: dict[str, object] | None = None) -> Config:
    """Defaults, then the YAML file at `path`, then non-None `overrides`.

    Raises ValueError naming the key, the bad value and the accepted form.
    """
    raw: dict[str, object] = {k: d for k, (d, _) in DEFAULTS.items()}
    if path is not None:
        try:
            with open(path) as f:
                data = yaml.safe_load(f)
        except OSError as e:
            raise ValueError(f"config file {path}: {e.strerror}") from None
        except yaml.YAMLError as e:
            raise ValueError(f"config file {path}: not valid YAML: {e}") from None
        if data is None:
            data = {}
        if not isinstance(data, dict):
            raise ValueError(f"config file {path}: expected a mapping of settings, got {type(data).__name__}")
        for key, value in data.items():
            if key not in DEFAULTS:
                raise ValueError(f"config file {path}: unknown key {key!r}; known keys: {', '.join(DEFAULTS)}")
            raw[key] = value
    for key, value in (overrides or {}).items():
        if value is not None:
            raw[key] = value
    parsed = {key: parser(raw[key], key) for key, (_, parser) in DEFAULTS.items()}
    cfg = Config(**parsed)
    if cfg.low_watermark >= cfg.high_watermark:
        raise ValueError(f"low_watermark: {cfg.low_watermark} must be below high_watermark {cfg.high_watermark}")
    if cfg.max_resident < 16 * PAGE:
        raise ValueError(f"max_resident: {cfg.max_resident} bytes is too small; use at least 64K")
    if cfg.write_retry_min > cfg.write_retry_max:
        raise ValueError(f"write_retry_min: {cfg.write_retry_min}s exceeds write_retry_max {cfg.write_retry_max}s")
    if cfg.handshake_timeout <= 0:
        raise ValueError(f"handshake_timeout: {cfg.handshake_timeout}s must be above 0, e.g. 5s")
    if cfg.read_retry_min > cfg.read_retry_max:
        raise ValueError(f"read_retry_min: {cfg.read_retry_min}s exceeds read_retry_max {cfg.read_retry_max}s")
    return cfg

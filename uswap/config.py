"""Daemon settings: defaults, the YAML file, command-line overrides, validation.

config/uswap.yaml documents every key; DEFAULTS below is the single source of
the defaults and of each key's parser.
"""
from __future__ import annotations

import dataclasses
import grp
import os
import re
from typing import Any, Callable

import yaml

from uswap.sizes import format_size, parse_size

DEFAULT_SOCKET = "/run/uswap/uswap.sock"
DEFAULT_STATE_DIR = "/run/uswap/state"
PAGE = 4096


def socket_path(explicit: str | None = None) -> str:
    """--socket, else $USWAP_SOCKET, else the system default."""
    return explicit or os.environ.get("USWAP_SOCKET") or DEFAULT_SOCKET


def default_state_dir() -> str:
    """Where the daemon keeps what a successor adopts (uswap/daemon/statedir.py):
    `$RUNTIME_DIRECTORY/state` under systemd (RuntimeDirectory=, tmpfs, kept
    across restarts by RuntimeDirectoryPreserve=restart), else /run/uswap/state."""
    runtime = os.environ.get("RUNTIME_DIRECTORY", "").split(":")[0]
    return os.path.join(runtime, "state") if runtime else DEFAULT_STATE_DIR


def _state_dir(value: object, what: str) -> str:
    if value is None:
        return default_state_dir()
    if isinstance(value, str) and os.path.isabs(value):
        return value
    raise ValueError(f"{what}: {value!r} is not accepted; use an absolute directory path (on tmpfs, e.g. /run/uswap/state)")


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


def _group(value: object, what: str) -> int | None:
    """A group name or numeric gid, checked against this host's groups; None
    (unset): the daemon's own group."""
    if value is None or value == "":
        return None
    accepted = "use a group name of this host (getent group) or a numeric gid"
    try:
        if isinstance(value, int) and not isinstance(value, bool) and value >= 0:
            return grp.getgrgid(value).gr_gid
        if isinstance(value, str) and value.isdigit():
            return grp.getgrgid(int(value)).gr_gid
        if isinstance(value, str):
            return grp.getgrnam(value).gr_gid
    except KeyError:
        raise ValueError(f"{what}: {value!r} is not a group on this host; {accepted}") from None
    raise ValueError(f"{what}: {value!r} is not accepted; {accepted}")


def _mode(value: object, what: str) -> int:
    """Permission bits in octal: "0660" or "660" (a YAML 0660 unquoted is the
    same number already)."""
    accepted = 'use octal permission bits from "0000" to "0777" in quotes, e.g. "0660"'
    if isinstance(value, str) and re.fullmatch(r"0?[0-7]{3}", value.strip()):
        return int(value, 8)
    if isinstance(value, int) and not isinstance(value, bool) and 0 <= value <= 0o777:
        return value
    raise ValueError(f"{what}: {value!r} is not accepted; {accepted}")


def _limit(hi: int) -> Callable[[object, str], int]:
    """A per-uid limit: a whole number, 0 for none."""
    def parse(value: object, what: str) -> int:
        if isinstance(value, int) and not isinstance(value, bool) and 0 <= value <= hi:
            return value
        raise ValueError(f"{what}: {value!r} is not accepted; use a whole number from 1 to {hi}, or 0 for no limit")
    return parse


def _size_limit(value: object, what: str) -> int:
    """A per-uid size limit: a size, 0 for none."""
    if value == 0 or value == "0":
        return 0
    return _pages(value, what)
def _percent(value: object, what: str) -> float:
    if isinstance(value, (int, float)) and not isinstance(value, bool) and 0 < value <= 100:
        return float(value)
    raise ValueError(f"{what}: {value!r} is not accepted; use a percentage above 0 and at most 100, e.g. 10")


def _pages(value: object, what: str) -> int:
    n = parse_size(value, what)
    if n == 0 or n % PAGE:
        raise ValueError(f"{what}: {value!r} is not a positive multiple of 4096 bytes")
    return n


#: The smallest budget accepted (max_resident, auto_min, `uswap budget`).
MIN_BUDGET = 16 * PAGE
#: max_resident's value that makes the budget follow the host (autobudget.py).
AUTO = "auto"
#: auto_max's value meaning the store's size.
STORE_SIZE = "store_size"


def _pages_or(word: str, meaning: str) -> Callable[[object, str], int | str]:
    """A size (as _pages), or the string `word`, which means `meaning`."""
    def parse(value: object, what: str) -> int | str:
        if value == word:
            return word
        try:
            return _pages(value, what)
        except ValueError as e:
            raise ValueError(f"{e}; or {word} ({meaning})") from None
    return parse


def _listen_address(value: object, what: str) -> str:
    """metrics_listen: "" (off), or HOST:PORT with a port from 1 to 65535
    (an IPv6 host in brackets: [::1]:9464)."""
    accepted = 'use "" (off) or HOST:PORT, e.g. 127.0.0.1:9464 or [::1]:9464'
    if value == "" or value is None:
        return ""
    if isinstance(value, str):
        m = re.fullmatch(r"(\[[0-9A-Fa-f:.]+\]|[A-Za-z0-9_.-]+):(\d{1,5})", value)
        if m and 1 <= int(m.group(2)) <= 65535:
            return value
    raise ValueError(f"{what}: {value!r} is not accepted; {accepted}")


def split_listen_address(value: str) -> tuple[str, int]:
    """("127.0.0.1", 9464) from "127.0.0.1:9464"; ("::1", 9464) from "[::1]:9464"."""
    host, _, port = value.rpartition(":")
    return host.strip("[]"), int(port)


# key -> (default, parser). Keep in step with config/uswap.yaml.
DEFAULTS: dict[str, tuple[Any, Callable[[object, str], Any]]] = {
    "backing": ("/var/lib/uswap/swapfile", _string),
    "store_size": ("4G", _pages),
    "max_resident": ("1G", _pages_or(AUTO, "the budget follows the host's available memory")),
    "socket": (DEFAULT_SOCKET, _string),
    "socket_group": (None, _group),
    "socket_mode": ("0660", _mode),
    "log_level": ("info", _choice("debug", "info", "warning", "error")),
    "high_watermark": (0.99, _fraction),
    "low_watermark": (0.96, _fraction),
    "clean_watermark": (0.9, _fraction),
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
    "max_clients_per_uid": (0, _limit(100000)),
    "max_regions_per_uid": (0, _limit(1 << 30)),
    "max_region_bytes_per_uid": (0, _size_limit),
    "max_resident_per_uid": (0, _size_limit),
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
    "auto_min": ("64M", _pages),
    "auto_max": (STORE_SIZE, _pages_or(STORE_SIZE, "the store's size")),
    "auto_fraction": (0.5, _fraction),
    "auto_pressure": (10.0, _percent),
    "auto_interval": ("5s", _duration),
    "metrics_listen": ("", _listen_address),
    # Adoption (uswap/daemon/adoption.py): where the page tables live, and
    # how long regions of a dead daemon wait for their clients.
    "state_dir": (None, _state_dir),
    "adopt_timeout": ("120s", _duration),
}


@dataclasses.dataclass
class Config:
    backing: str
    store_size: int
    max_resident: int
    socket: str
    socket_group: int | None  # gid; None: the daemon's own group
    socket_mode: int
    log_level: str
    high_watermark: float
    low_watermark: float
    clean_watermark: float
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
    max_clients_per_uid: int       # 0: no limit (so the three below)
    max_regions_per_uid: int
    max_region_bytes_per_uid: int
    max_resident_per_uid: int
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
    state_dir: str
    adopt_timeout: float
    auto_min: int
    auto_max: int
    auto_fraction: float
    auto_pressure: float
    auto_interval: float
    metrics_listen: str
    # max_resident: auto (not a key of its own): the budget follows the host
    # (autobudget.py) within [auto_min, auto_max]; max_resident is then the
    # budget in force, auto_max until the daemon's first look at the host.
    budget_auto: bool = False

    @property
    def max_resident_pages(self) -> int:
        return self.max_resident // PAGE


class _Origins:
    """Where each setting's value came from, so a refusal can name it: the
    config file (by path), the command line, or the default."""

    def __init__(self, path: str | None) -> None:
        self.path = path
        self.of: dict[str, str] = {}

    def prefix(self, key: str) -> str:
        """'config file PATH: ' for a value from the file, else ''."""
        return f"config file {self.path}: " if self.of.get(key) == "file" else ""

    def describe(self, key: str, raw: object) -> str:
        """`key` = the value as given, and where it came from."""
        where = {"file": f"config file {self.path}", "override": "command line"}.get(self.of.get(key, ""), "default")
        return f"{key} {raw} ({where})"


#: Pairs of settings that cannot hold together: (smaller, larger, why).
#: `smaller` must not exceed `larger`, else the start (or a SIGHUP) is refused.
_ORDERED: tuple[tuple[str, str, str], ...] = (
    ("max_resident", "store_size", "the budget would keep more pages resident than the store can take back"),
    ("write_batch", "store_size", "one store write would be larger than the store"),
    ("readahead", "readahead_max", "the read-ahead window starts above its own maximum"),
    ("readahead_max", "store_size", "the read-ahead window would be larger than the store"),
    ("write_retry_min", "write_retry_max", "the write backoff would start above its maximum"),
    ("read_retry_min", "read_retry_max", "the read backoff would start above its maximum"),
)


def load(path: str | None = None, overrides: dict[str, object] | None = None) -> Config:
    """Defaults, then the YAML file at `path`, then non-None `overrides`.

    Raises ValueError naming the key, the bad value, the accepted form and,
    for a value from the file, the file; a refused combination names both
    values and where each came from.
    """
    raw: dict[str, object] = {k: d for k, (d, _) in DEFAULTS.items()}
    origins = _Origins(path)
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
            origins.of[key] = "file"
    for key, value in (overrides or {}).items():
        if value is not None:
            raw[key] = value
            origins.of[key] = "override"
    parsed = {}
    for key, (_, parser) in DEFAULTS.items():
        try:
            parsed[key] = parser(raw[key], key)
        except ValueError as e:
            raise ValueError(f"{origins.prefix(key)}{e}") from None
    budget_auto = parsed["max_resident"] == AUTO
    if parsed["auto_max"] == STORE_SIZE:
        parsed["auto_max"] = parsed["store_size"]
    if budget_auto:
        parsed["max_resident"] = parsed["auto_max"]
    cfg = Config(**parsed, budget_auto=budget_auto)
    if budget_auto:
        _check_auto(cfg, raw, origins)
    if cfg.low_watermark >= cfg.high_watermark:
        raise ValueError(f"{origins.prefix('low_watermark')}low_watermark: {cfg.low_watermark} must be below"
                         f" high_watermark {cfg.high_watermark}")
    if cfg.max_resident < MIN_BUDGET:
        raise ValueError(f"{origins.prefix('max_resident')}max_resident: {cfg.max_resident} bytes is too small;"
                         " use at least 64K")
    if cfg.handshake_timeout <= 0:
        raise ValueError(f"{origins.prefix('handshake_timeout')}handshake_timeout: {cfg.handshake_timeout}s"
                         " must be above 0, e.g. 5s")
    if cfg.socket_group is not None and not cfg.socket_mode & 0o020:
        raise ValueError(f"{origins.describe('socket_group', raw['socket_group'])} is set but"
                         f" {origins.describe('socket_mode', raw['socket_mode'])} gives the group no write"
                         " permission, so its members could not connect; use e.g. socket_mode \"0660\"")
    for smaller, larger, why in _ORDERED:
        if getattr(cfg, smaller) > getattr(cfg, larger):
            raise ValueError(f"{origins.describe(smaller, raw[smaller])} exceeds"
                             f" {origins.describe(larger, raw[larger])}: {why}; lower {smaller} or raise {larger}")
    return cfg


def _check_auto(cfg: Config, raw: dict[str, object], origins: _Origins) -> None:
    """max_resident: auto needs bounds that hold together."""
    if cfg.auto_min < MIN_BUDGET:
        raise ValueError(f"{origins.prefix('auto_min')}auto_min: {raw['auto_min']!r} is too small; use at least 64K")
    for smaller, larger in (("auto_min", "auto_max"), ("auto_max", "store_size")):
        if getattr(cfg, smaller) > getattr(cfg, larger):
            raise ValueError(f"max_resident auto: {origins.describe(smaller, raw[smaller])} exceeds"
                             f" {origins.describe(larger, raw[larger])}; lower {smaller} or raise {larger}")


def parse_budget(value: object, store_size: int, what: str = "budget") -> int:
    """A budget for a running daemon (`uswap budget SIZE`): a size from
    MIN_BUDGET to the store's size, a multiple of 4096. Raises ValueError
    naming the value and what is accepted."""
    n = _pages(value, what)
    if n < MIN_BUDGET:
        raise ValueError(f"{what}: {value!r} is too small; use at least 64K")
    if n > store_size:
        raise ValueError(f"{what}: {value!r} is above the store's size ({format_size(store_size)}): the budget would"
                         " keep more pages resident than the store can take back; use at most that")
    return n


#: The per-uid limits (0: none).
PER_UID_LIMITS = ("max_clients_per_uid", "max_regions_per_uid", "max_region_bytes_per_uid", "max_resident_per_uid")

#: Settings that SIGHUP applies to a running daemon (server.py). The others
#: size threads, buffers, the store or the socket, and need a restart. A
#: per-uid limit lowered under what a uid holds keeps what it holds, as a
#: lower budget does (its regions, pages and connections); it is applied to
#: what the uid asks for next, and a resident share is reached by evicting.
RELOADABLE = ("max_resident", "budget_auto", "auto_min", "auto_max", "auto_fraction", "auto_pressure",
              "auto_interval", "high_watermark", "low_watermark", "clean_watermark", "log_level",
              *PER_UID_LIMITS)


def reload(path: str | None, overrides: dict[str, object] | None,
           running: Config) -> tuple[Config, dict[str, tuple[object, object]], list[str]]:
    """Read the configuration again as the daemon started (`path` with the
    same command-line `overrides`, which still win over the file).

    Returns (the configuration to run with now, the reloadable keys that
    changed as {key: (old, new)}, the other keys that changed and are left
    as they are until a restart). Raises ValueError as load() does; the
    running configuration is then kept whole.
    """
    fresh = load(path, overrides)
    if fresh.budget_auto and running.budget_auto:
        # The budget in force is the automatic one's, not the file's auto_max.
        fresh = dataclasses.replace(fresh, max_resident=running.max_resident)
    changed = {key: (getattr(running, key), getattr(fresh, key)) for key in RELOADABLE
               if getattr(running, key) != getattr(fresh, key)}
    needs_restart = [key for key in DEFAULTS
                     if key not in RELOADABLE and getattr(running, key) != getattr(fresh, key)]
    applied = dataclasses.replace(running, **{key: new for key, (_, new) in changed.items()})
    return applied, changed, needs_restart


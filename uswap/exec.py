"""`uswap exec`: run an unmodified, dynamically linked program with its
private anonymous memory in uswap regions.

The program is exec'd with LD_PRELOAD set to the preload library
(native/preload.c, built on libuswap), which interposes mmap, munmap, mremap
and madvise for private anonymous mappings of at least --min-size, and to
an allocator from the distribution (jemalloc by default) that replaces
glibc malloc: glibc's own mmap and brk calls are internal and cannot be
interposed, so a malloc that maps its heap through mmap is how heap memory
reaches uswap. The settings travel in the environment, so children and
programs exec'd from it are clients of their own.
"""
from __future__ import annotations

import ctypes.util
import os
import sys

from uswap import config
from uswap.sizes import parse_size

PRELOAD_NAME = "libuswap-preload.so"
# Where the preload library is: a checkout's build (scripts/setup), then the
# installed one (scripts/install).
PRELOAD_DIRS = (os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "build", "lib"),
                "/usr/local/lib/uswap")
# The allocator each --allocator name loads (Debian: libjemalloc2, libmimalloc2.0).
ALLOCATORS = {"jemalloc": "jemalloc", "mimalloc": "mimalloc", "glibc": None}
DEFAULT_MIN_SIZE = 1 << 20


def preload_library() -> str:
    """The path of the preload library; ValueError naming where it was looked for."""
    for d in PRELOAD_DIRS:
        path = os.path.join(d, PRELOAD_NAME)
        if os.path.isfile(path):
            return path
    raise ValueError(f"{PRELOAD_NAME} not found in {', '.join(PRELOAD_DIRS)}: build it with"
                     " scripts/setup (or install with scripts/install)")


def allocator_library(name: str) -> str | None:
    """The soname of allocator `name` (None for glibc's own); ValueError if unknown or missing."""
    if name not in ALLOCATORS:
        raise ValueError(f"--allocator {name!r} is not known; use one of {', '.join(ALLOCATORS)}")
    if ALLOCATORS[name] is None:
        return None
    found = ctypes.util.find_library(ALLOCATORS[name])
    if found is None:
        raise ValueError(f"--allocator {name}: lib{ALLOCATORS[name]} is not installed (Debian: "
                         f"{'libjemalloc2' if name == 'jemalloc' else 'libmimalloc2.0'}); or use --allocator glibc")
    return found


def exec_environment(socket: str | None, min_size: str | None, allocator: str,
                     base: dict[str, str]) -> dict[str, str]:
    """The environment the program runs in: LD_PRELOAD (the preload library,
    then the allocator, then what was there), the socket and the threshold."""
    threshold = DEFAULT_MIN_SIZE if min_size is None else parse_size(min_size, "--min-size")
    if threshold < 4096:
        raise ValueError(f"--min-size {min_size!r} is less than one page; use 4096 or more, e.g. 1M")
    libs = [preload_library()]
    alloc = allocator_library(allocator)
    if alloc is not None:
        libs.append(alloc)
    env = dict(base)
    if base.get("LD_PRELOAD"):
        libs.append(base["LD_PRELOAD"])
    env["LD_PRELOAD"] = " ".join(libs)
    env["USWAP_SOCKET"] = config.socket_path(socket)
    env["USWAP_EXEC_MIN_SIZE"] = str(threshold)
    return env


def run(socket: str | None, min_size: str | None, allocator: str, argv: list[str]) -> int:
    """Exec the program (returns only on a refusal: 2, or 127 when it cannot be run)."""
    if argv and argv[0] == "--":
        argv = argv[1:]
    if not argv:
        print("uswap: error: exec needs a program to run: uswap exec [options] -- CMD ARGS...", file=sys.stderr)
        return 2
    try:
        env = exec_environment(socket, min_size, allocator, dict(os.environ))
    except ValueError as e:
        print(f"uswap: error: {e}", file=sys.stderr)
        return 2
    try:
        os.execvpe(argv[0], argv, env)
    except OSError as e:
        print(f"uswap: error: cannot run {argv[0]!r}: {e.strerror}", file=sys.stderr)
        return 127

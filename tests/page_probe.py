"""Build and load tests/page_probe.c (read a page, report SIGBUS instead of
dying of it) with the system's C compiler."""
from __future__ import annotations

import ctypes
import hashlib
import os
import subprocess
import tempfile

SOURCE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "page_probe.c")


def build() -> str:
    """Path of the shared library, compiled once per version of the source."""
    with open(SOURCE, "rb") as f:
        digest = hashlib.sha256(f.read()).hexdigest()[:16]
    lib = os.path.join(tempfile.gettempdir(), f"uswap-page-probe-{digest}.so")
    if not os.path.exists(lib):
        tmp = f"{lib}.{os.getpid()}"
        subprocess.run(["cc", "-O2", "-shared", "-fPIC", "-o", tmp, SOURCE], check=True,
                       capture_output=True, timeout=120)
        os.replace(tmp, lib)
    return lib


class PageProbe:
    """probe_read_page() of a built library; installs its SIGBUS handler."""

    def __init__(self, lib_path: str) -> None:
        self.lib = ctypes.CDLL(lib_path)
        self.lib.probe_read_page.argtypes = [ctypes.c_void_p, ctypes.c_void_p]
        self.lib.probe_read_page.restype = ctypes.c_int
        if self.lib.probe_install() != 0:
            raise OSError(ctypes.get_errno(), "sigaction(SIGBUS)")

    def read(self, addr: int, dst: int) -> bool:
        """Copy the page at addr to dst; False if it raised SIGBUS."""
        return self.lib.probe_read_page(addr, dst) == 0

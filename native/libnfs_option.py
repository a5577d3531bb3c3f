"""Whether the native build includes libnfs (the nfs:// store), decided in
this one place for setup.py and every cffi build script.

USWAP_BUILD_NFS in the build's environment: "auto" (unset: with libnfs when
its headers are found), "1" (with it; the build fails without the headers),
"0" (without it). Without libnfs the modules compile with
USWAP_WITHOUT_LIBNFS defined (native/nfs_io.h then declares no libnfs call),
link no libnfs, and uswap._nfs_cffi is not built: the file store works and an
nfs:// backing is refused naming the Debian package to install.
"""
import os
import shutil
import subprocess

ENV = "USWAP_BUILD_NFS"
#: What a build without libnfs tells the user to install (Debian 12).
DEBIAN_PACKAGE = "libnfs-dev"
HEADER = "/usr/include/nfsc/libnfs.h"


def _headers_found() -> bool:
    if shutil.which("pkg-config"):
        return subprocess.run(["pkg-config", "--exists", "libnfs"]).returncode == 0
    return os.path.exists(HEADER)


def with_libnfs() -> bool:
    """True when this build includes libnfs (see the module docstring)."""
    wanted = os.environ.get(ENV, "auto")
    if wanted not in ("auto", "0", "1"):
        raise SystemExit(f"{ENV}={wanted!r} is not accepted; use 1 (with libnfs), 0 (without) or auto")
    if wanted == "0":
        return False
    found = _headers_found()
    if wanted == "1" and not found:
        raise SystemExit(f"{ENV}=1 but the libnfs headers are not installed: apt-get install {DEBIAN_PACKAGE}")
    return found


def build_args() -> dict:
    """The set_source() arguments that link libnfs, or compile without it."""
    if with_libnfs():
        return {"libraries": ["nfs"]}
    return {"define_macros": [("USWAP_WITHOUT_LIBNFS", "1")]}


def cffi_modules() -> list[str]:
    """setup.py's cffi_modules: every native module, uswap._nfs_cffi only with libnfs."""
    modules = ["native/uffd_build.py:ffi", "native/dio_build.py:ffi"]
    if with_libnfs():
        modules.append("native/nfs_build.py:ffi")
    return modules + ["native/iopool_build.py:ffi", "native/fastpath_build.py:ffi"]

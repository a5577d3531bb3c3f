"""cffi build script for uswap._uffd_cffi: the userfaultfd ioctls (native/uffd.c),
the verify-and-map routine of every swap-in (native/readmap.h), the access
sampler's page hold (native/pagehold.h) and the client's reconnect thread
(native/keeper.c).

The declarations are read from uffd.h, readmap.h, pagehold.h and keeper.h
(cdef_reader.py), not typed here.
"""
import os
import sys

from cffi import FFI

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
sys.dont_write_bytecode = True  # no __pycache__ in native/ (scripts/setup hashes its files)
import cdef_reader  # noqa: E402

ffi = FFI()
ffi.cdef(cdef_reader.cdef(HERE, "uffd.h", "readmap.h", "pagehold.h", "keeper.h"))
with open(os.path.join(HERE, "uffd.c")) as f:
    # keeper.c (the client's reconnect thread) is compiled into the same
    # module by inclusion: a second source file would be named by a path that
    # setuptools wants relative to setup.py and cffi's compile() relative to
    # its temporary directory.
    ffi.set_source("uswap._uffd_cffi", f.read() + '\n#include "keeper.c"\n', include_dirs=[HERE],
                   extra_compile_args=["-O2", "-Wall"], libraries=["pthread"])

if __name__ == "__main__":
    ffi.compile(tmpdir=os.path.join(HERE, "..", "build"), verbose=True)

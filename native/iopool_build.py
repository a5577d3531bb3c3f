"""cffi build script for uswap._iopool_cffi: the C I/O pool (native/iopool.c).

The declarations are read from iopool.h (cdef_reader.py), not typed here.
Links libnfs (libnfs-dev, pkg-config libnfs) for the nfs:// store's jobs,
when the build includes it (libnfs_option.py).
"""
import os
import sys

from cffi import FFI

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
sys.dont_write_bytecode = True  # no __pycache__ in native/ (scripts/setup hashes its files)
import cdef_reader  # noqa: E402
import libnfs_option  # noqa: E402

ffi = FFI()
ffi.cdef(cdef_reader.cdef(HERE, "iopool.h"))
with open(os.path.join(HERE, "iopool.c")) as f:
    ffi.set_source("uswap._iopool_cffi", f.read(), include_dirs=[HERE], **libnfs_option.build_args(),
                   extra_compile_args=["-O2", "-Wall", "-pthread"], extra_link_args=["-pthread"])

if __name__ == "__main__":
    ffi.compile(tmpdir=os.path.join(HERE, "..", "build"), verbose=True)

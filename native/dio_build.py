"""cffi build script for uswap._dio_cffi: direct I/O, mmap, checksums (native/dio.c;
the checksums are native/pagesum.h's CRC32C and all-zero flag).

The declarations are read from dio.h and pagesum.h (cdef_reader.py), not
typed here.
"""
import os
import sys

from cffi import FFI

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
sys.dont_write_bytecode = True  # no __pycache__ in native/ (scripts/setup hashes its files)
import cdef_reader  # noqa: E402

ffi = FFI()
ffi.cdef(cdef_reader.cdef(HERE, "dio.h", "pagesum.h"))
with open(os.path.join(HERE, "dio.c")) as f:
    ffi.set_source("uswap._dio_cffi", f.read(), include_dirs=[HERE], extra_compile_args=["-O2", "-Wall"])

if __name__ == "__main__":
    ffi.compile(tmpdir=os.path.join(HERE, "..", "build"), verbose=True)

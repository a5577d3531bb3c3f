"""cffi build script for uswap._fastpath_cffi: the fault fast path
(native/fastpath.c), with the page states and transition table
(pagestate.h) and the policy rules (policy.h) that the engine shares with it,
and the victim choice (victims.h) and the stream window computation
(window.h), which only the engine calls: built into this module so that they
read the page states as the fast path does.
Links libnfs for swap-ins from an nfs:// store, when the build includes it
(libnfs_option.py).

The declarations are read from the headers (cdef_reader.py): nothing is
typed here a second time. cffi checks each struct's layout against the
compiler's.
"""
import os
import sys

from cffi import FFI

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
sys.dont_write_bytecode = True  # no __pycache__ in native/ (scripts/setup hashes its files)
import cdef_reader  # noqa: E402
import libnfs_option  # noqa: E402

# System types the structs hold by value, opaque to Python.
SYSTEM_TYPES = """
typedef struct { ...; } pthread_mutex_t;
typedef int... pthread_t;
"""

ffi = FFI()
ffi.cdef(SYSTEM_TYPES + cdef_reader.cdef(HERE, "pagestate.h", "policy.h", "fastpath.h", "victims.h", "window.h"))
with open(os.path.join(HERE, "fastpath.c")) as f:
    source = f.read() + '\n#include "victims.h"\n#include "window.h"\n'
    ffi.set_source("uswap._fastpath_cffi", source, include_dirs=[HERE], **libnfs_option.build_args(),
                   extra_compile_args=["-O2", "-Wall", "-pthread"], extra_link_args=["-pthread"])

if __name__ == "__main__":
    ffi.compile(tmpdir=os.path.join(HERE, "..", "build"), verbose=True)

"""cffi build script for uswap._nfs_cffi: NFSv3 over libnfs (native/nfs.c).

Needs libnfs-dev (pkg-config libnfs, 4.0.0 on Debian 12).  The declarations
below are the whole C surface the store sees; nfs.c and nfs_io.h hold the
bodies.
"""
import os

from cffi import FFI

HERE = os.path.dirname(os.path.abspath(__file__))

INCLUDES = """
#include <sys/time.h>
#include <nfsc/libnfs.h>
"""

TYPES = """
struct nfs_context;
struct nfsfh;
struct nfs_stat_64 {
    uint64_t nfs_ino;
    uint64_t nfs_mode;
    uint64_t nfs_size;
    ...;
};
"""

FUNCTIONS = """
struct nfs_context *us_nfs_new(int timeout_ms);
void us_nfs_destroy(struct nfs_context *nfs);
const char *us_nfs_error(struct nfs_context *nfs);
int us_nfs_mount(struct nfs_context *nfs, const char *server, const char *export);
uint64_t us_nfs_writemax(struct nfs_context *nfs);
uint64_t us_nfs_readmax(struct nfs_context *nfs);
int us_nfs_open(struct nfs_context *nfs, const char *path, int flags, int mode,
                struct nfsfh **fh);
int us_nfs_close(struct nfs_context *nfs, struct nfsfh *fh);
int us_nfs_unlink(struct nfs_context *nfs, const char *path);
int us_nfs_fstat(struct nfs_context *nfs, struct nfsfh *fh, struct nfs_stat_64 *st);
int us_nfs_ftruncate(struct nfs_context *nfs, struct nfsfh *fh, uint64_t length);
int us_nfs_fsync(struct nfs_context *nfs, struct nfsfh *fh);
int64_t us_nfs_pwrite_full(struct nfs_context *nfs, struct nfsfh *fh,
                           uint64_t addr, uint64_t len, uint64_t off);
int64_t us_nfs_pread_full(struct nfs_context *nfs, struct nfsfh *fh,
                          uint64_t addr, uint64_t len, uint64_t off);
"""

ffi = FFI()
ffi.cdef(TYPES + FUNCTIONS)
with open(os.path.join(HERE, "nfs.c")) as f:
    ffi.set_source(
        "uswap._nfs_cffi",
        INCLUDES + f.read(),
        include_dirs=[HERE],  # nfs_io.h, shared with iopool.c
        libraries=["nfs"],
        extra_compile_args=["-O2", "-Wall"],
    )

if __name__ == "__main__":
    # tmpdir is the repo root so the module lands in uswap/ beside its package.
    ffi.compile(tmpdir=os.path.join(HERE, ".."), verbose=True)

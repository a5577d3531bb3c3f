"""cffi build script for uswap._iopool_cffi: the C I/O pool (native/iopool.c).

Links libnfs (libnfs-dev, pkg-config libnfs) for the nfs:// store's jobs.
"""
import os

from cffi import FFI

HERE = os.path.dirname(os.path.abspath(__file__))

CDEF = """
struct nfs_context;
struct nfsfh;
struct us_job {
    int32_t op;
    int32_t fd;
    int32_t uffd;
    int32_t present;
    uint64_t buf;
    uint64_t len;
    int64_t off;
    uint64_t dst;
    uint64_t mode;
    uint32_t *expected;
    uint32_t *sums;
    uint8_t *zero;
    uint64_t *gather;
    struct nfs_context *nfs;
    struct nfsfh *nfsfh;
    int64_t result;
    int64_t copied;
    uint64_t token;
    struct us_job *next;
};
struct us_pool;
struct us_pool *us_pool_new(int nthreads, int eventfd);
void us_pool_submit(struct us_pool *p, struct us_job *j);
int us_pool_reap(struct us_pool *p, uint64_t *out, int max);
void us_pool_stop(struct us_pool *p);
#define US_JOB_READ_COPY 1
#define US_JOB_SUM_WRITE 2
#define US_JOB_READ_COPY_NFS 3
#define US_JOB_SUM_WRITE_NFS 4
"""

ffi = FFI()
ffi.cdef(CDEF)
with open(os.path.join(HERE, "iopool.c")) as f:
    ffi.set_source("uswap._iopool_cffi", f.read(), include_dirs=[HERE], libraries=["nfs"],
                   extra_compile_args=["-O2", "-Wall", "-pthread"], extra_link_args=["-pthread"])

if __name__ == "__main__":
    ffi.compile(tmpdir=os.path.join(HERE, "..", "build"), verbose=True)

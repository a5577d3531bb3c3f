"""cffi build script for uswap._fastpath_cffi: the fault fast path
(native/fastpath.c). Links libnfs for swap-ins from an nfs:// store.

The structs are declared partially (`...;`): cffi takes their layout from
fastpath.c, so only the fields the engine reads or writes are named here.
"""
import os

from cffi import FFI

HERE = os.path.dirname(os.path.abspath(__file__))

CDEF = """
struct nfs_context;
struct nfsfh;
struct fp_region {
    uint32_t gen;
    int32_t live;
    int32_t closing;
    int32_t uffd;
    int32_t id;
    int32_t inflight;
    int32_t readers;
    uint64_t addr;
    uint64_t npages;
    uint8_t *state;
    uint8_t *flags;
    int32_t *slot;
    uint32_t *stamp;
    uint32_t *sum;
    int64_t last_fault;
    int64_t ra_expect;
    int64_t ra_window;
    int64_t fill_expect;
    int64_t fill_window;
    int32_t unmaps_pending;
    ...;
};
struct fp_record {
    int32_t type;
    int32_t region;
    int32_t conn;
    uint64_t kind, flags, addr, end;
    int64_t page, slot, result, copied;
    uint32_t sum;
    double started;
    ...;
};
struct fp_conn {
    struct nfs_context *nfs;
    struct nfsfh *fh;
    int32_t id;
};
struct fp_engine {
    int64_t charged;
    int64_t max_pages;
    int64_t high_pages;
    int64_t ra_pages;
    uint32_t tick;
    int32_t enabled;
    int32_t inflight;
    uint64_t faults, swapins, activations;
    int32_t nidle;
    struct fp_conn idle[64];
    struct fp_region regions[4096];
    ...;
};
#define FP_MAX_REGIONS 4096
#define FP_MAX_CONNS 64
#define FP_EVENT 1
#define FP_LOAD_FAILED 2
#define FP_WAITERS 3
#define FP_RELEASABLE 4
#define FP_READ_ERROR 5
#define FP_DIRTIED 6
#define FP_FORGET 7
struct fp_engine *fp_new(int nthreads, int notify_fd, int store_fd);
int fp_set_fill_max(struct fp_engine *e, int64_t pages);
void fp_lock(struct fp_engine *e);
void fp_unlock(struct fp_engine *e);
int fp_region_open(struct fp_engine *e, int idx);
void fp_region_close(struct fp_engine *e, int idx);
void fp_region_free(struct fp_engine *e, int idx);
int fp_region_busy(struct fp_engine *e, int idx);
int fp_take_records(struct fp_engine *e, struct fp_record *out, int max);
void fp_stop(struct fp_engine *e);
"""

ffi = FFI()
ffi.cdef(CDEF)
with open(os.path.join(HERE, "fastpath.c")) as f:
    ffi.set_source("uswap._fastpath_cffi", f.read(), include_dirs=[HERE], libraries=["nfs"],
                   extra_compile_args=["-O2", "-Wall", "-pthread"], extra_link_args=["-pthread"])

if __name__ == "__main__":
    ffi.compile(tmpdir=os.path.join(HERE, "..", "build"), verbose=True)

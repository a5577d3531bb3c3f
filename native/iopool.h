/* The C I/O pool's job and entry points (native/iopool.c): declared here
 * once, read by the compiler and, through cdef_reader.py, by the cffi build
 * (iopool_build.py) that gives the engine (uswap/daemon/cpool.py) its view.
 * iopool.c says what each job does.
 */
#ifndef USWAP_IOPOOL_H
#define USWAP_IOPOOL_H

#include <stdint.h>

/* cdef: begin */
struct nfs_context;
struct nfsfh;

#define US_JOB_READ_COPY 1
#define US_JOB_SUM_WRITE 2
#define US_JOB_READ_COPY_NFS 3
#define US_JOB_SUM_WRITE_NFS 4

struct us_job {
    int32_t op;
    int32_t fd;
    int32_t uffd;
    int32_t present;      /* READ_COPY: pages found present in the memfd and replaced by their store copies */
    int64_t write_page;   /* READ_COPY: index of the page to map writable (a write fault's), or US_NO_WRITE_PAGE */
    uint64_t buf;
    uint64_t len;
    int64_t off;
    uint64_t dst;
    uint64_t view;        /* READ_COPY: the daemon's mapping of the pages at dst (region.daddr + offset):
                           * a page found present gets its verified copy written there (readmap.h) */
    uint64_t mode;
    uint32_t *expected;
    uint32_t *sums;
    uint8_t *skip;        /* READ_COPY: 1 for each page that is not the load's, never mapped (readmap.h); NULL: none */
    uint8_t *mapped;      /* READ_COPY: set to 1 for each page mapped, 0 for the others (readmap.h) */
    int64_t *runs;        /* READ_COPY: NULL: one read of len bytes at off; else nruns runs of adjacent slots,
                           * each (page index in buf, slot, pages), read into their places in buf (iopool.c) */
    int64_t nruns;
    uint8_t *zero;        /* SUM_WRITE: 1 for each page that is all zeros */
    uint64_t *gather;     /* SUM_WRITE: if set, copy page i from gather[i] into buf first */
    struct nfs_context *nfs;  /* *_NFS jobs: a context lent to this job alone */
    struct nfsfh *nfsfh;      /* *_NFS jobs: the store file's handle on it */
    int64_t result;       /* bytes read or written, or -errno of the store call */
    int64_t copied;       /* READ_COPY: bytes mapped (pages that passed their check), or -errno of a COPY */
    uint64_t token;
    struct us_job *next;
};

struct us_pool;
static struct us_pool *us_pool_new(int nthreads, int eventfd);
static void us_pool_submit(struct us_pool *p, struct us_job *j);
static int us_pool_reap(struct us_pool *p, uint64_t *out, int max);
static void us_pool_stop(struct us_pool *p);
/* cdef: end */

#endif

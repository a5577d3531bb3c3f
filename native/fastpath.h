/* The fault fast path's shared structures, constants and entry points
 * (native/fastpath.c): declared here once, read by the compiler and, through
 * cdef_reader.py, by the cffi build (fastpath_build.py) that gives the
 * engine (uswap/daemon/fastpath.py) its view of them.
 */
#ifndef USWAP_FASTPATH_H
#define USWAP_FASTPATH_H

#include <pthread.h>
#include <stdint.h>

/* cdef: begin */
struct nfs_context;
struct nfsfh;

#define FP_MAX_REGIONS 4096
#define FP_MAX_READERS 16
/* The readers, and one thread that never enters a store read (invariant 4). */
#define FP_MAX_THREADS (FP_MAX_READERS + 1)
#define FP_MAX_CONNS 64

/* Records passed to the engine. */
#define FP_EVENT 1        /* a uffd message the engine serves (kind, flags, addr, end) */
#define FP_LOAD_FAILED 2  /* a load here failed: the page is LOADING, the engine takes it over */
#define FP_WAITERS 3      /* page mapped here had a write parked on it (F_WAITERS) */
#define FP_RELEASABLE 4   /* a load of a closing region ended: it may be releasable */
#define FP_READ_ERROR 5   /* reading the region's uffd failed with -result */
#define FP_DIRTIED 6      /* page mapped writable for a write fault: its slot copy is stale */
#define FP_FORGET 7       /* page mapped here was unmapped by the client meanwhile: the engine forgets it */

/* FP_DIRTIED records wake the engine only as the FP_DIRTIED_BATCH-th one
 * since it last took records (fp_push): at most this many stale slots wait
 * for its next turn. */
#define FP_DIRTIED_BATCH 64

/* Why a fault went to the engine as an FP_EVENT record (fp_engine.handed,
 * status fast_path_passed_faults): one count per fault passed on. */
#define FP_HAND_OFF 0       /* not served here at all: draining, an UNMAP pending, outside the region */
#define FP_HAND_STATE 1     /* MISSING on a page neither EMPTY nor SWAPPED (LOADING, PUNCHING, AT_PARENT...) */
#define FP_HAND_LOCALITY 2  /* MISSING on a SWAPPED page near the last swap-in or a stream's: read-ahead */
#define FP_HAND_BUDGET 3    /* MISSING the budget had no room for (us_admit) */
#define FP_HAND_READERS 4   /* every reader thread inside a store read (invariant 4) */
#define FP_HAND_CONTEXT 5   /* nfs://: no lent context idle */
#define FP_HAND_WP 6        /* write-protect fault not on a clean RESIDENT page, or its un-protect failed */
#define FP_HAND_MINOR 7     /* MINOR fault not on a RESIDENT page, or its CONTINUE failed */
#define FP_HAND_N 8

/* Latency histograms (swap-in and fault service), kept here by the C
 * threads and, through the same fp_hist_observe, by the Python engine
 * (uswap/daemon/latency.py): the bucket bounds are fp_lat_bounds below,
 * declared once, read by Python through fp_lat_bound. */
#define FP_LAT_BUCKETS 15               /* finite upper bounds */
#define FP_LAT_SLOTS 16                 /* FP_LAT_BUCKETS + the +Inf bucket */

struct fp_hist {
    uint64_t count[FP_LAT_SLOTS];     /* per bucket, not cumulative: count[i] holds
                                         bound[i-1] < seconds <= bound[i] */
    double sum;                       /* seconds, all observations */
};

struct fp_region {
    uint32_t gen;
    int32_t live;         /* an engine region occupies this slot */
    int32_t closing;      /* set by the engine: start nothing new here */
    int32_t uffd;
    int32_t id;           /* the engine's region id */
    int32_t inflight;     /* loads started here and not yet finished */
    int32_t readers;      /* threads reading its uffd right now, without the lock */
    uint64_t addr;
    uint64_t daddr;       /* the daemon's own mapping of the memfd (region.daddr): a page found present
                           * during a swap-in gets its store copy written there (readmap.h) */
    uint64_t npages;
    uint8_t *state;
    uint8_t *flags;
    int32_t *slot;
    uint32_t *stamp;
    uint32_t *sum;
    /* Forked children AT_PARENT at each page (cow.py's Share.counts, set and
     * cleared by the engine under the lock), or NULL while no child reads
     * from this region: a dirty page's MINOR fault maps it writable only
     * where this is 0 (us_minor_writable, policy.h). */
    uint16_t *shares;
    int64_t *ra;          /* read-ahead streams shared with the engine (region.ra_streams: US_RA_STREAMS
                           * rows of US_RA_COLS, policy.h us_ra_find), latest used first */
    int64_t fill_expect;  /* zero-fill stream state shared with the engine (Faults._fill_zero) */
    int64_t fill_window;
    /* UNMAP/REMOVE records passed to the engine and not yet applied by it
     * (FastPath.unmap_applied): until then no fault of the region is served
     * here, since the page states do not yet say which pages were forgotten
     * -- a range regrown in place at once would be served its old slots. */
    int32_t unmaps_pending;
    uint64_t faults;      /* faults of this region served here (status: per client) */
};

struct fp_record {
    int32_t type;
    int32_t region;       /* engine region id */
    int32_t conn;         /* FP_LOAD_FAILED on nfs://: the context's id (it stays out) */
    int32_t pad;
    uint64_t kind, flags, addr, end;
    int64_t page, slot, result, copied;
    uint32_t sum;
    uint32_t pad2;
    double started;       /* CLOCK_MONOTONIC seconds when the fault was taken */
};

struct fp_conn {
    struct nfs_context *nfs;
    struct nfsfh *fh;
    int32_t id;
};

struct fp_engine {
    pthread_mutex_t lock;
    /* Shared with the engine, under the lock. */
    int64_t charged;
    int64_t max_pages;
    int64_t high_pages;
    int64_t clean_pages;  /* background writeback's start (us_kick_due, cleaner.py) */
    int64_t ra_pages;
    uint32_t tick;
    int32_t enabled;      /* 0: pass every event to the engine (draining) */
    int32_t inflight;     /* loads started here and not yet finished, all regions */
    int32_t kicked;       /* eventfd poked since the engine last took records */
    uint64_t wakeups;     /* times these threads poked the eventfd (fp_kick): each starts a turn of the
                           * engine under the page lock (status fast_path_wakeups_total) */
    int32_t dirtied_waiting;  /* FP_DIRTIED records pushed since the engine last took them all */
    int32_t reading;      /* jobs taken by fp_take_fault and not yet finished (nfs://: each holds a
                           * lent context, FastPath.top_up) */
    int32_t in_read;      /* threads inside a store read right now (invariant 4): raised under the
                           * lock by fp_take_fault, lowered atomically without it as soon as the read
                           * returns (fp_run), so a thread waiting for the lock to finish its job
                           * does not count */
    int32_t read_max;     /* most threads inside a store read at once: nthreads - 1 */
    uint64_t faults, swapins, activations;
    uint64_t minor_faults;  /* MINOR faults served here (fp_take_minor) */
    uint64_t handed[FP_HAND_N];  /* faults passed to the engine, by reason (FP_HAND_*) */
    uint64_t present_replaced;  /* pages found present and replaced by their store copies (us_verify_map,
                                 * in fp_run: no lock, so added atomically) */
    int64_t fill_max;     /* largest zero-fill window, pages */
    uint64_t zero;        /* fill_max zeroed pages, the source of every zero fill */
    int32_t fd;           /* the file store's O_DIRECT fd, or -1 (nfs://) */
    int32_t nidle;
    /* State changes here that pagestate.h's table forbids (us_set_state):
     * counted, logged, and fatal (abort) when strict_transitions is set. */
    uint64_t illegal_transitions;
    int32_t strict_transitions;
    /* Under the lock, filled by fp_finish, fp_take_wp and fp_take_minor: a swap-in from
     * fault to mapped; a fault served here from taken to resolved. */
    struct fp_hist swapin_latency;
    struct fp_hist fault_latency;
    /* Each time a fault thread takes the lock (to dispatch an event it has
     * read, or to finish a job): how long it waited. The engine holds the
     * lock whenever it runs, so this is what its steps cost the faults; a
     * fault waits for its dispatch before fault_latency starts. */
    struct fp_hist lock_wait;
    struct fp_conn idle[FP_MAX_CONNS];
    struct fp_record *recs;
    int64_t nrecs, caprecs;
    struct fp_region regions[FP_MAX_REGIONS];
    /* Threads. */
    int epfd, eventfd, stopfd, nthreads;
    pthread_t threads[FP_MAX_THREADS];
};

static struct fp_engine *fp_new(int readers, int notify_fd, int store_fd);
static int fp_set_fill_max(struct fp_engine *e, int64_t pages);
static void fp_lock(struct fp_engine *e);
static void fp_unlock(struct fp_engine *e);
static int fp_region_open(struct fp_engine *e, int idx);
static void fp_region_close(struct fp_engine *e, int idx);
static void fp_region_free(struct fp_engine *e, int idx);
static int fp_region_busy(struct fp_engine *e, int idx);
static int fp_take_records(struct fp_engine *e, struct fp_record *out, int max);
static void fp_stop(struct fp_engine *e);
/* Count one observation of `seconds` in its bucket (the caller
 * serialises: the C threads hold the lock, the engine holds it too). */
static void fp_hist_observe(struct fp_hist *h, double seconds);
/* The upper bound of bucket i (0 <= i < FP_LAT_BUCKETS), in seconds. */
static double fp_lat_bound(int i);
/* Tests only: move page `page` of the region in slot idx to state `to`
 * through the fast path's checked transition, taking the lock. */
static void fp_test_set_state(struct fp_engine *e, int idx, int64_t page, int to);
/* cdef: end */

/* The buckets' upper bounds, seconds: from a page-cache-speed swap-in
 * (~10 us) to a stalled NFS server (1 s and more lands in +Inf). */
static const double fp_lat_bounds[FP_LAT_BUCKETS] = {
    10e-6, 25e-6, 50e-6, 100e-6, 250e-6, 500e-6,
    1e-3, 2.5e-3, 5e-3, 10e-3, 25e-3, 50e-3, 100e-3, 250e-3, 1.0,
};

#endif

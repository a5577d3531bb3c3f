/* The fault fast path: C threads that read the regions' userfaultfds and
 * serve random swap-ins, zero fills, first writes and clean pages' MINOR
 * faults entirely themselves.
 *
 * Why it exists: with the engine's Python thread reading the events, a
 * random 4 KiB swap-in cost ~80 us against ~30 us for the O_DIRECT read
 * itself (scripts/bench_fault.py): a wake-up of the engine, ~10 us of Python
 * per fault, then a second wake-up of an I/O thread. Here the thread that
 * wakes for the fault reads the slot, checks it and maps it: one wake-up.
 *
 * Lock (fp_engine.lock) -- the "page lock" of invariant 2 for every page:
 *   The Python engine holds it whenever it runs (it lets go only while it
 *   sleeps in epoll_wait, see server.py), so every Python page transition
 *   happens under it. These threads take it to decide what to do with an
 *   event, and again to finish; never across the read of the uffd (see
 *   fp_thread), the store read or the COPY. The page table arrays,
 *   `charged`, `tick` and the counters of fastpath.h are shared with Python
 *   and only touched under the lock. Every state change here is checked
 *   against pagestate.h's table (us_set_state), and every policy decision
 *   is a function of policy.h, the same the engine calls.
 *
 * What is served here, and only this:
 * - a MISSING fault (read or write) on an EMPTY page, while the budget has
 *   room: a zero fill, in a window that grows on a first-touch stream
 *   (fp_take_fill, us_fill_window in policy.h); the pages go LOADING until
 *   the COPY has mapped them, then RESIDENT (or back to EMPTY, unmapped);
 * - a MISSING fault (read or write) on a SWAPPED page that is random to
 *   every read-ahead stream of the region (us_ra_find in policy.h: no
 *   read-ahead decision is due), while the budget has room and, for nfs://, a lent context is
 *   idle. The page goes LOADING (as in the engine's swap-in), is read,
 *   checked (invariant 6: a page whose checksum fails is never mapped) and
 *   mapped, then made RESIDENT. A read fault maps it write-protected (a
 *   clean swap-cache copy, as the engine does); a write fault maps it
 *   writable and dirty at once, saving the write-protect fault that would
 *   follow, and the engine frees the stale slot (FP_DIRTIED) at its next
 *   turn, which that record alone starts only once per FP_DIRTIED_BATCH
 *   (fp_push);
 * - a MINOR fault on a RESIDENT page (mapped again after the access
 *   sampler or the client's MADV_DONTNEED took it out of the page tables):
 *   it is mapped again -- writable if dirty and no forked child reads it
 *   (the region's share counts, kept by cow.py), else write-protected, by
 *   the engine's rule us_minor_writable -- stamped and made active
 *   (fp_take_minor, us_minor_use in policy.h);
 * - a write-protect fault on a clean RESIDENT page (its first write since
 *   its slot copy was taken): it is un-protected (fp_take_wp). A dirty page is never
 * un-protected here: a dirty page is write-protected only by a fork
 * (daemon/fork.py), and its first write after the fork must reach the
 * engine, which copies it for the children first; a forked child's
 * AT_PARENT pages are neither EMPTY nor SWAPPED, so their faults reach the
 * engine too. Everything else -- every other fault,
 * every non-fault event, and every failure -- is passed to the Python
 * engine in order as a record, and the page's state tells the engine where
 * things stand (a failed load stays LOADING and the engine takes it over).
 *
 * Region slots: a region's slot is reused only after the Python engine
 * released the region, which it does only once `inflight` (loads started
 * here and not yet finished) is 0; `gen` changes at each reuse, so an
 * epoll event read for a previous occupant is recognised and ignored.
 */
#ifndef _GNU_SOURCE
#define _GNU_SOURCE
#endif
#include <errno.h>
#include <pthread.h>
#include <signal.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/epoll.h>
#include <sys/eventfd.h>
#include <time.h>
#include <unistd.h>
#include "store_io.h"
#include "pagesum.h"
#include "readmap.h"
#include "fastpath.h"
#include "pagestate.h"
#include "policy.h"

#define FP_STOP_KEY UINT64_MAX

struct fp_job {
    struct fp_region *r;
    int64_t page, slot;
    uint32_t expected;
    int write;            /* a write fault: map writable and dirty */
    int fill;             /* a zero fill of n EMPTY pages (no store I/O) */
    int64_t n;
    uint64_t fault_flags; /* the fault, passed on if the fill fails */
    uint64_t fault_addr;
    struct fp_conn conn;  /* nfs:// only */
    double started;
};

static double fp_now(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + ts.tv_nsec * 1e-9;
}

static double fp_lat_bound(int i)
{
    return i >= 0 && i < FP_LAT_BUCKETS ? fp_lat_bounds[i] : -1.0;
}

static void fp_hist_observe(struct fp_hist *h, double seconds)
{
    int i = 0;
    while (i < FP_LAT_BUCKETS && seconds > fp_lat_bounds[i])
        i++;
    h->count[i]++;
    h->sum += seconds;
}

/* A fault thread takes the lock, its wait counted (lock_wait). */
static void fp_thread_lock(struct fp_engine *e)
{
    double asked = fp_now();
    pthread_mutex_lock(&e->lock);
    fp_hist_observe(&e->lock_wait, fp_now() - asked);
}

/* Lock held. Wake the engine: once per batch of records it has not taken. */
static void fp_kick(struct fp_engine *e)
{
    if (e->kicked)
        return;
    e->kicked = 1;
    e->wakeups++;
    uint64_t one = 1;
    ssize_t w = write(e->eventfd, &one, sizeof(one));
    (void)w;
}

/* Lock held. A new record for the engine (zeroed but for type and region),
 * which wakes it (fp_kick) -- but for FP_DIRTIED, which wakes it only as the
 * FP_DIRTIED_BATCH-th one since it last took its records.
 *
 * Why: an FP_DIRTIED record only frees the stale slot of a page mapped
 * writable here. Waking the engine for each one gave it a turn under the
 * page lock after every write fault, and the client's next fault waited
 * for that turn before a thread could take it (random writes: one turn per
 * fault, the lock held 36-52% of the time, fault to dispatch 9.5-16.5 us
 * at p50 against 5-6 us for random reads; status fast_path_wakeups_total).
 *
 * Invariant (why the record may wait): the engine takes every record in
 * its turn's completions step (Engine.on_completions, under the lock),
 * before settle -- reclaim and background writeback, the only steps that
 * write a page to the store or hand out a slot. A record pushed while the
 * engine sleeps in epoll_wait (lock released) is taken in its next turn; one
 * pushed while it let go of the lock inside a turn (reading a uffd or a
 * client's smaps, server.py, golive.py) in that same turn. Either way the
 * turn's events (client requests, its own uffd reads) may run before the
 * record is taken, with or without a kick: a kick decides only when the
 * next turn starts, never what runs before the record is taken. So no step
 * sees a state it could not see before. Until then the stale slot stays in
 * the page's table (audit counts it used), as it did between the kick and
 * the engine's turn; FP_DIRTIED_BATCH bounds how many wait. Every other
 * record still wakes the engine at once. */
static struct fp_record *fp_push(struct fp_engine *e, int type, struct fp_region *r)
{
    if (e->nrecs == e->caprecs) {
        int64_t cap = e->caprecs ? e->caprecs * 2 : 256;
        struct fp_record *grown = realloc(e->recs, (size_t)cap * sizeof(*grown));
        if (!grown)
            abort();   /* the daemon cannot lose an event */
        e->recs = grown;
        e->caprecs = cap;
    }
    struct fp_record *rec = &e->recs[e->nrecs++];
    memset(rec, 0, sizeof(*rec));
    rec->type = type;
    rec->region = r->id;
    rec->conn = -1;
    if (type != FP_DIRTIED || ++e->dirtied_waiting >= FP_DIRTIED_BATCH)
        fp_kick(e);
    return rec;
}

/* Lock held. An illegal state change (us_set_state): a bug. Counted (the
 * daemon's status shows it), logged, and fatal when strict_transitions is
 * set (USWAP_STRICT_TRANSITIONS=1, the tests). */
__attribute__((cold, noinline))
static void fp_illegal_transition(struct fp_engine *e, struct fp_region *r, int64_t page, unsigned from,
                                  unsigned to)
{
    e->illegal_transitions++;
    if (e->strict_transitions || e->illegal_transitions <= 100)
        fprintf(stderr, "uswap fast path: illegal page transition: region %d page %lld state %u -> %u "
                "(native/pagestate.h)%s\n", r->id, (long long)page, from, to,
                e->illegal_transitions == 100 ? "; further ones are only counted" : "");
    if (e->strict_transitions)
        abort();
}

/* Lock held. Every state change on these threads is made here, checked
 * against pagestate.h's table of legal predecessors: one table lookup and a
 * branch never taken. An illegal change is still made (behaviour does not
 * depend on the check) once it has been counted and logged. A plain load
 * and a plain store, as every page-table access here: the lock orders them. */
static inline void us_set_state(struct fp_engine *e, struct fp_region *r, int64_t page, uint8_t to)
{
    uint8_t from = r->state[page];
    if (__builtin_expect(!us_transition_legal(from, to), 0))
        fp_illegal_transition(e, r, page, from, to);
    r->state[page] = to;
}

/* Lock held. First touch of an EMPTY page: zeros, in a window that doubles
 * while the faults follow each other (us_fill_window, policy.h: the rule the
 * engine's zero fill follows too). The pages go LOADING until the COPY has
 * mapped them. The budget's admission (us_admit) is made without the
 * draining case: these threads serve nothing while the engine drains
 * (`enabled` is 0 then). */
static int fp_take_fill(struct fp_engine *e, struct fp_region *r, int64_t page, const struct uffd_msg *m,
                        struct fp_job *job, int *why)
{
    if (!e->zero)
        return 0;
    if (us_admit(e->charged, e->max_pages, 1, 0) < 1) {
        *why = FP_HAND_BUDGET;
        return 0;
    }
    r->fill_window = us_fill_window(page, r->fill_expect, r->fill_window, e->fill_max);
    int64_t limit = page + r->fill_window < (int64_t)r->npages ? page + r->fill_window : (int64_t)r->npages;
    int64_t room = us_admit(e->charged, e->max_pages, limit - page, 0);
    int64_t n = 1;
    while (n < room && r->state[page + n] == US_EMPTY)
        n++;
    e->faults++;
    r->faults++;
    e->charged += n;
    for (int64_t i = 0; i < n; i++)
        us_set_state(e, r, page + i, US_LOADING);
    r->fill_expect = page + n;
    r->inflight++;
    e->inflight++;
    if (us_kick_due(e->charged - n, e->charged, e->high_pages, e->clean_pages))
        fp_kick(e);
    memset(job, 0, sizeof(*job));
    job->r = r;
    job->page = page;
    job->n = n;
    job->fill = 1;
    job->write = (m->arg.pagefault.flags & UFFD_PAGEFAULT_FLAG_WRITE) != 0;
    job->fault_flags = m->arg.pagefault.flags;
    job->fault_addr = m->arg.pagefault.address;
    job->started = fp_now();
    return 1;
}

/* Lock held. The page of a fault of kind `kind` (0: MISSING, or
 * UFFD_PAGEFAULT_FLAG_WP or _MINOR) that these threads may consider, or -1:
 * nothing is served here while the engine drains (`enabled` 0) or has an
 * UNMAP/REMOVE of the region yet to apply (`unmaps_pending`), and a fault
 * outside the region is the engine's to wake. */
static int64_t fp_fault_page(struct fp_engine *e, struct fp_region *r, const struct uffd_msg *m, uint64_t kind)
{
    uint64_t flags = m->arg.pagefault.flags & (UFFD_PAGEFAULT_FLAG_WP | UFFD_PAGEFAULT_FLAG_MINOR);
    if (!e->enabled || r->unmaps_pending || flags != kind)
        return -1;
    uint64_t addr = m->arg.pagefault.address;
    if (addr < r->addr || addr >= r->addr + r->npages * 4096)
        return -1;
    return (int64_t)((addr - r->addr) >> 12);
}

/* Lock held. Start serving this fault here if it is ours (see the top of
 * the file); returns 1 and fills job when it is, else 0 with *why set to
 * the reason it goes to the engine (FP_HAND_*, fastpath.h). */
static int fp_take_fault(struct fp_engine *e, struct fp_region *r, const struct uffd_msg *m,
                         struct fp_job *job, int *why)
{
    *why = FP_HAND_OFF;
    int64_t page = fp_fault_page(e, r, m, 0);
    if (page < 0)
        return 0;
    if (r->state[page] == US_EMPTY)
        return fp_take_fill(e, r, page, m, job, why);
    *why = FP_HAND_STATE;
    if (r->state[page] != US_SWAPPED)
        return 0;
    /* Locality with the last swap-in or a stream's next window: the engine
     * decides read-ahead; only a random swap-in is served here. */
    *why = FP_HAND_LOCALITY;
    int locality;
    if (us_ra_find(page, r->ra, e->ra_pages, &locality) >= 0)
        return 0;
    *why = FP_HAND_BUDGET;
    if (us_admit(e->charged, e->max_pages, 1, 0) < 1)
        return 0;   /* the engine parks it until reclaim makes room */
    *why = FP_HAND_READERS;
    /* Invariant 4 (the thread that reads fault events never blocks on
     * I/O): at most read_max = nthreads - 1 threads are inside store reads
     * (fp_new starts one thread beyond the readers), so one always stays
     * out of them and a stalled store (a frozen NFS server) never stops the
     * reading of events; past that the engine reads this page on its I/O
     * pool instead. The reserve is a thread of its own, not one of the
     * readers: `readers` concurrent swap-ins (a client's threads faulting
     * at once) are all served here. */
    if (__atomic_load_n(&e->in_read, __ATOMIC_SEQ_CST) >= e->read_max)
        return 0;
    memset(&job->conn, 0, sizeof(job->conn));   /* the file store's load passes it unused */
    if (e->fd < 0) {
        *why = FP_HAND_CONTEXT;
        if (e->nidle == 0)
            return 0;
        job->conn = e->idle[--e->nidle];
    }
    e->faults++;
    r->faults++;
    e->charged++;
    job->fill = 0;
    job->n = 1;
    /* Refault distance: back within a budget's worth of faults after
     * eviction = working set, returns active. */
    if (us_refault_active(e->tick, r->stamp[page], e->max_pages)) {
        r->flags[page] |= US_F_ACTIVE;
        e->activations++;
    }
    /* Invariant 2: LOADING is set here, under the page lock, before the read. */
    us_set_state(e, r, page, US_LOADING);
    /* A new stream of one page, the others kept (us_ra_use: the least
     * recently used dropped). */
    us_ra_use(r->ra, -1);
    r->ra[US_RA_LAST] = page;
    r->ra[US_RA_EXPECT] = page + 1;
    r->ra[US_RA_WINDOW] = 1;
    r->ra[US_RA_FLAGS] = 0;
    r->inflight++;
    e->inflight++;
    e->reading++;
    /* Raised only here, under the lock, after the check above: never past read_max. */
    __atomic_add_fetch(&e->in_read, 1, __ATOMIC_SEQ_CST);
    if (us_kick_due(e->charged - 1, e->charged, e->high_pages, e->clean_pages))
        fp_kick(e);   /* reclaim, or background writeback, is due */
    job->r = r;
    job->page = page;
    job->slot = r->slot[page];
    job->expected = r->sum[page];
    job->write = (m->arg.pagefault.flags & UFFD_PAGEFAULT_FLAG_WRITE) != 0;
    job->started = fp_now();
    return 1;
}

/* Lock held. A write-protect fault on a clean RESIDENT page is its first
 * write since its slot copy was taken (Dirtying.make_dirty, dirtying.py): un-protect it
 * (which wakes the writer) and mark it dirty; the engine frees the stale
 * slot on the FP_DIRTIED record. Returns 1 when served here; anything else
 * (WRITEBACK and LOADING pages park in the engine, invariant 4) is passed on. */
static int fp_take_wp(struct fp_engine *e, struct fp_region *r, const struct uffd_msg *m)
{
    int64_t page = fp_fault_page(e, r, m, UFFD_PAGEFAULT_FLAG_WP);
    if (page < 0)
        return 0;
    uint8_t fl = r->flags[page];
    if (r->state[page] != US_RESIDENT || (fl & US_F_DIRTY))
        return 0;
    struct uffdio_writeprotect wp = { .range = { .start = r->addr + ((uint64_t)page << 12), .len = 4096 },
                                      .mode = 0 };
    /* Dirty is recorded before the write is let through, as make_dirty
     * (dirtying.py) does: the page table outlives a daemon killed in
     * between (the state directory), and a successor must never adopt as
     * clean a page the client may already have written. Adoption checks only
     * the clean pages that have a slot (Adoption._verify_clean): a clean
     * zero page has none, and written unrecorded it would later be dropped
     * as zeros. Undone if the un-protect fails: the page stays protected. */
    r->flags[page] = (fl & US_F_ACTIVE) | US_F_DIRTY;
    double started = fp_now();
    if (ioctl(r->uffd, UFFDIO_WRITEPROTECT, &wp) < 0) {
        r->flags[page] = fl;
        return 0;   /* the engine retries or closes the region (RegionSet.ioctl_result) */
    }
    fp_hist_observe(&e->fault_latency, fp_now() - started);
    e->faults++;
    r->faults++;
    e->tick++;
    r->stamp[page] = e->tick;
    if (r->slot[page] >= 0) {
        struct fp_record *rec = fp_push(e, FP_DIRTIED, r);
        rec->page = page;
        rec->slot = r->slot[page];
    }
    return 1;
}

/* Lock held. A MINOR fault on a RESIDENT page: the page is in the memfd
 * (RESIDENT says so, and only a transition under this lock -- to PUNCHING:
 * reclaim's, a discard's or a stray page's punch -- starts taking it out),
 * so it is mapped again with a CONTINUE, writable or write-protected as
 * us_minor_writable (policy.h) says -- the rule Faults.fault_minor follows:
 * writable only when dirty and no forked child reads the page (r->shares);
 * a clean page's first write must reach fp_take_wp or the engine, which
 * free its slot, and a shared dirty page's must reach the engine, which
 * copies it into the children first (cow.py). It is stamped with the fault
 * clock and made active (us_minor_use), as the engine does. Returns 1 when
 * served here. Anything else -- any other state (a WRITEBACK page's MINOR
 * fault too: the engine serves it), or a CONTINUE that failed (EEXIST:
 * mapped already; EFAULT: the page left the memfd behind the daemon's back)
 * -- is passed to the engine untouched, which serves it as before: it makes
 * the CONTINUE again and acts on its result (EEXIST: wake; EFAULT: the page
 * vanished, Faults._vanished), counting the fault once. */
static int fp_take_minor(struct fp_engine *e, struct fp_region *r, const struct uffd_msg *m)
{
    int64_t page = fp_fault_page(e, r, m, UFFD_PAGEFAULT_FLAG_MINOR);
    if (page < 0)
        return 0;
    uint8_t st = r->state[page], fl = r->flags[page];
    if (st != US_RESIDENT)
        return 0;
    int writable = us_minor_writable(st, fl, r->shares ? r->shares[page] : 0);
    struct uffdio_continue c = { .range = { .start = r->addr + ((uint64_t)page << 12), .len = 4096 },
                                 .mode = writable ? 0 : UFFDIO_CONTINUE_MODE_WP };
    double started = fp_now();
    if (ioctl(r->uffd, UFFDIO_CONTINUE, &c) < 0)
        return 0;
    fp_hist_observe(&e->fault_latency, fp_now() - started);
    e->faults++;   /* counted as the engine counts its own (Faults.on_events) */
    r->faults++;
    e->minor_faults++;
    /* The clock moves on, as in fp_take_wp: a stamp with an unchanged clock
     * would not show the use to the sampler (victims.py _on_probation). */
    e->tick++;
    r->stamp[page] = e->tick;
    r->flags[page] = us_minor_use(fl);
    return 1;
}

/* No lock. Read, check and map the job's page; the read's result and the
 * bytes mapped (0 for a page that failed its check, or -errno of the COPY). */
static void fp_run(struct fp_engine *e, struct fp_job *j, uint64_t buf, int64_t *result, int64_t *copied,
                   uint32_t *sum)
{
    *copied = 0;
    *sum = 0;
    if (j->fill) {
        /* Zeros: bytes mapped from the front of the window, even when the
         * COPY then stopped (*result: 0, or the -errno it stopped with). A
         * window across a VMA boundary is mapped page by page (us_uffd_zero_fill). */
        uint64_t dst = j->r->addr + ((uint64_t)j->page << 12), len = (uint64_t)j->n << 12;
        int64_t r = us_uffd_zero_fill(j->r->uffd, dst, len, e->zero, !j->write);
        *copied = r > 0 ? r & ~(int64_t)4095 : 0;
        *result = 0;
        if (r < 0)
            *result = r;
        else if ((uint64_t)r < len)
            *result = -EAGAIN;   /* stopped part way; the engine learns why on the rest */
        return;
    }
    *result = us_store_io(0, e->fd, j->conn.nfs, j->conn.fh, buf, 4096, j->slot * 4096);
    /* Out of the store read (invariant 4 counts only those inside one): at
     * once, without the lock. Lowered only when fp_finish took the lock, a
     * thread that woke its client with the COPY below and then waited for
     * the lock still counted, and the client's next fault, read by another
     * thread meanwhile, found every reader "in a read" and went to the
     * engine: under mt-mix (4 threads, 4 readers) 20% of the swap-ins,
     * status fast_path_passed_faults "readers". */
    __atomic_sub_fetch(&e->in_read, 1, __ATOMIC_SEQ_CST);
    if (*result < 0)
        return;
    /* Verified and mapped by the routine of every swap-in (readmap.h): a
     * page that fails its check is not mapped (invariant 6: *copied 0, the
     * engine takes the load over); a write fault's page is mapped writable;
     * a page present already in the memfd (written or read through it, not
     * by the client's mapping) gets the verified store copy over it and is
     * mapped as the COPY would have: the store copy wins. */
    int32_t present;
    uint64_t off = (uint64_t)j->page << 12;
    *copied = us_verify_map(j->r->uffd, j->r->addr + off, j->r->daddr + off, buf, 1, UFFDIO_COPY_MODE_WP,
                            j->write ? 0 : US_NO_WRITE_PAGE, &j->expected, sum, NULL, NULL, &present);
    if (present)   /* no lock held here: threads add at once */
        __atomic_fetch_add(&e->present_replaced, (uint64_t)present, __ATOMIC_RELAXED);
}

/* Lock held. Apply a zero fill: the pages the COPY mapped are RESIDENT
 * (dirty and writable for a write fault, clean zeros otherwise, as in
 * Faults._fill_zero); the rest go back to EMPTY, uncharged. If not even the
 * faulting page was mapped, the fault is passed to the engine, which maps
 * it page by page and adopts a page found present (or retries, or closes
 * the region) -- its own _fill_zero path. */
static void fp_finish_fill(struct fp_engine *e, struct fp_job *j, int64_t result, int64_t copied)
{
    struct fp_region *r = j->r;
    int64_t mapped = copied >> 12;
    r->inflight--;
    if (r->closing) {
        e->charged -= j->n;   /* close_region leaves LOADING pages charged until their load ends */
        fp_push(e, FP_RELEASABLE, r);
        return;
    }
    e->tick += (uint32_t)mapped;
    if (mapped > 0)
        fp_hist_observe(&e->fault_latency, fp_now() - j->started);
    for (int64_t i = 0; i < j->n; i++) {
        int64_t p = j->page + i;
        int discard = (r->flags[p] & US_F_DISCARD) != 0;
        if (i < mapped) {
            /* A write that hit a page mapped write-protected before this ran
             * was parked by the engine (F_WAITERS): it is the page's first
             * write -- or, on a page mapped writable that a fork then
             * write-protected (daemon/fork.py), a write to let through. */
            if ((r->flags[p] & US_F_WAITERS) && !discard)
                fp_push(e, FP_WAITERS, r)->page = p;
            us_set_state(e, r, p, US_RESIDENT);
            r->flags[p] = j->write ? US_F_DIRTY : 0;
            r->stamp[p] = e->tick;
            if (discard)
                fp_push(e, FP_FORGET, r)->page = p;   /* punched and uncharged by the engine */
        } else {
            us_set_state(e, r, p, US_EMPTY);
            r->flags[p] = 0;
            e->charged--;
        }
    }
    if (mapped < j->n) {
        /* Faults on the pages not mapped were set aside by the engine while
         * they were LOADING: wake them to fault again (the first page's
         * fault, if not mapped, is passed on below instead). */
        int64_t from = mapped > 0 ? mapped : 1;
        if (from < j->n) {
            struct uffdio_range range = { .start = r->addr + ((uint64_t)(j->page + from) << 12),
                                          .len = (uint64_t)(j->n - from) << 12 };
            ioctl(r->uffd, UFFDIO_WAKE, &range);
        }
        r->fill_expect = -1;
    }
    if (mapped == 0) {
        struct fp_record *rec = fp_push(e, FP_EVENT, r);
        rec->kind = UFFD_EVENT_PAGEFAULT;
        rec->flags = j->fault_flags;
        rec->addr = j->fault_addr;
        rec->result = result;
    }
}

/* Lock held. Apply the outcome of a job. */
static void fp_finish(struct fp_engine *e, struct fp_job *j, int64_t result, int64_t copied, uint32_t sum)
{
    struct fp_region *r = j->r;
    e->inflight--;
    /* The engine waits for e->inflight to drop in drain (drain_done) and,
     * with faults waiting for budget, before it may overcommit
     * (_must_overcommit). A load that ends here without a record must still
     * wake it then: nothing else would (it sleeps in epoll_wait). */
    if (!e->enabled || e->charged >= e->max_pages)
        fp_kick(e);
    if (j->fill) {
        fp_finish_fill(e, j, result, copied);
        return;
    }
    e->reading--;
    int ok = result >= 0 && copied == 4096;
    if (e->fd < 0 && result >= 0)
        e->idle[e->nidle++] = j->conn;   /* the server answered: the context is sound */
    if (r->closing) {
        /* RegionSet.close_region leaves LOADING pages charged until their load ends. */
        r->inflight--;
        e->charged--;
        fp_push(e, FP_RELEASABLE, r);
        if (e->fd < 0 && result < 0) {
            struct fp_record *rec = fp_push(e, FP_LOAD_FAILED, r);
            rec->conn = j->conn.id;   /* the engine checks it back in; the page is not looked at */
            rec->result = result;
            rec->page = -1;
        }
        return;
    }
    if (!ok) {
        /* The engine takes the load over (SwapIn.take_over_fast_load); the page
         * stays LOADING and charged, and r->inflight counts it until then. */
        struct fp_record *rec = fp_push(e, FP_LOAD_FAILED, r);
        rec->page = j->page;
        rec->slot = j->slot;
        rec->result = result;
        rec->copied = copied;
        rec->sum = sum;
        rec->started = j->started;
        if (e->fd < 0 && result < 0)
            rec->conn = j->conn.id;
        return;
    }
    r->inflight--;
    uint8_t fl = r->flags[j->page];
    if (j->write) {
        /* Dirty from the start. The slot stays in the table until the engine
         * frees it on the record, which it takes before any reclaim can look
         * at the page (it drains records first, all under the lock). */
        struct fp_record *rec = fp_push(e, FP_DIRTIED, r);
        rec->page = j->page;
        rec->slot = j->slot;
        /* Mapped writable, then write-protected by a fork before this ran
         * (daemon/fork.py): a write parked meanwhile is let through by the
         * engine (after FP_DIRTIED, which frees the slot). */
        if (fl & US_F_WAITERS)
            fp_push(e, FP_WAITERS, r)->page = j->page;
        r->flags[j->page] = (fl & US_F_ACTIVE) | US_F_DIRTY;
    } else {
        if (fl & US_F_WAITERS)
            fp_push(e, FP_WAITERS, r)->page = j->page;   /* a write parked meanwhile: its first write */
        r->flags[j->page] = fl & US_F_ACTIVE;
    }
    us_set_state(e, r, j->page, US_RESIDENT);
    e->tick++;
    r->stamp[j->page] = e->tick;
    e->swapins++;
    double took = fp_now() - j->started;
    fp_hist_observe(&e->swapin_latency, took);
    fp_hist_observe(&e->fault_latency, took);
    if (fl & US_F_DISCARD)
        fp_push(e, FP_FORGET, r)->page = j->page;   /* unmapped during the load: the engine forgets it */
}

/* Lock held. Let epoll hand the region's uffd to a thread again (it is
 * registered EPOLLONESHOT: delivered to one thread, then disarmed until
 * this). Pending messages make it ready at once. Not for a closing region:
 * fp_region_close took its fd out of the epoll set. */
static void fp_rearm(struct fp_engine *e, struct fp_region *r, uint32_t idx)
{
    if (r->closing)
        return;
    struct epoll_event ev = { .events = EPOLLIN | EPOLLONESHOT,
                              .data.u64 = ((uint64_t)r->gen << 32) | idx };
    epoll_ctl(e->epfd, EPOLL_CTL_MOD, r->uffd, &ev);
}

/* Lock held. Decide what to do with one message: served here (0), a job
 * for this thread (1, job filled), or a record for the engine (0). */
static int fp_dispatch(struct fp_engine *e, struct fp_region *r, const struct uffd_msg *m, struct fp_job *job)
{
    if (m->event == UFFD_EVENT_PAGEFAULT && (fp_take_wp(e, r, m) || fp_take_minor(e, r, m)))
        return 0;
    int why = FP_HAND_OFF;
    if (m->event == UFFD_EVENT_PAGEFAULT && fp_take_fault(e, r, m, job, &why))
        return 1;
    struct fp_record *rec = fp_push(e, FP_EVENT, r);
    rec->kind = m->event;
    if (m->event == UFFD_EVENT_PAGEFAULT) {
        uint64_t kind = m->arg.pagefault.flags & (UFFD_PAGEFAULT_FLAG_WP | UFFD_PAGEFAULT_FLAG_MINOR);
        if (why == FP_HAND_OFF && e->enabled && !r->unmaps_pending)
            why = kind & UFFD_PAGEFAULT_FLAG_WP ? FP_HAND_WP : kind & UFFD_PAGEFAULT_FLAG_MINOR ? FP_HAND_MINOR
                                                                                              : FP_HAND_OFF;
        e->handed[why]++;
        rec->flags = m->arg.pagefault.flags;
        rec->addr = m->arg.pagefault.address;
    } else if (m->event == UFFD_EVENT_UNMAP || m->event == UFFD_EVENT_REMOVE) {
        rec->addr = m->arg.remove.start;
        rec->end = m->arg.remove.end;
        r->unmaps_pending++;
    }
    return 0;
}

/* No lock. Become a reader of region r (delivered for generation gen):
 * 1 when it is live, of that generation and not closing -- its fd then stays
 * open until fp_reader_leave -- else 0. Lock-free, so that serving a fault
 * takes the lock once to decide, as it did when the read was made under it.
 *
 * Why the fd stays open (a Dekker pair, all sequentially consistent): a
 * reader increments `readers` and then loads `closing`; the engine stores
 * `closing` (fp_region_close) and only later loads `readers`
 * (fp_region_busy), releasing the region (closing its fds) only if that is
 * 0. Either the engine sees the increment and waits, or the reader sees
 * `closing` and backs out. */
static int fp_reader_enter(struct fp_engine *e, struct fp_region *r, uint32_t gen)
{
    __atomic_add_fetch(&r->readers, 1, __ATOMIC_SEQ_CST);
    /* `closing` is loaded first and `gen` last. The other way round, a
     * reader that loaded gen (still its own) and was then preempted while
     * the engine closed, released and reopened the slot for a new region
     * would load the new region's `closing` = 0 and read the new region's
     * uffd alongside the thread epoll handed it to: two readers, events
     * decided out of order. In this order a 0 from a reopened slot is
     * followed by a load of the incremented gen. */
    if (!__atomic_load_n(&r->closing, __ATOMIC_SEQ_CST) && __atomic_load_n(&r->live, __ATOMIC_SEQ_CST)
            && __atomic_load_n(&r->gen, __ATOMIC_SEQ_CST) == gen)
        return 1;
    if (__atomic_sub_fetch(&r->readers, 1, __ATOMIC_SEQ_CST) == 0 && __atomic_load_n(&r->closing, __ATOMIC_SEQ_CST)) {
        /* The engine may have seen this reader and put off releasing it. */
        pthread_mutex_lock(&e->lock);
        if (r->live && r->closing && __atomic_load_n(&r->readers, __ATOMIC_SEQ_CST) == 0)
            fp_push(e, FP_RELEASABLE, r);
        pthread_mutex_unlock(&e->lock);
    }
    return 0;
}

/* Lock held. Stop being a reader of r; a closing region is offered to the
 * engine for release once its last reader left. */
static void fp_reader_leave(struct fp_engine *e, struct fp_region *r)
{
    if (__atomic_sub_fetch(&r->readers, 1, __ATOMIC_SEQ_CST) == 0 && r->closing)
        fp_push(e, FP_RELEASABLE, r);
}

/* Reading a region's uffd -- never under the page lock:
 *   The uffd's open file is shared with the client, which can clear its
 *   O_NONBLOCK. A read() made holding the lock could then sleep until that
 *   client's next fault while every other thread and the engine wait for
 *   the lock: every client would hang. So a message is read with the lock
 *   released, and with RWF_NOWAIT (us_uffd_read_nowait), which never
 *   sleeps whatever the file's flags say; then the lock is taken to decide.
 * Invariants that make the unlocked read safe:
 *   - One reader per region at a time: the fd is in the epoll set with
 *     EPOLLONESHOT, so one wake-up hands it to one thread, and only that
 *     thread re-arms it (fp_rearm, under the lock) once it has read the
 *     queue dry or taken a job. Messages are therefore decided in the order
 *     the kernel queued them (an UNMAP before the faults that follow it),
 *     as when they were read under the lock.
 *   - The fd stays open while it is read: `readers` counts the reader
 *     (fp_reader_enter, without the lock), and the engine releases a region
 *     (closing its fds) only once readers and inflight are both 0
 *     (fp_region_busy); the last reader to leave a closing region pushes
 *     FP_RELEASABLE so the engine looks again.
 * Calls still made here under the lock: UFFDIO_WRITEPROTECT (fp_take_wp),
 * UFFDIO_CONTINUE (fp_take_minor) and UFFDIO_WAKE (fp_finish_fill), as the
 * engine makes COPY, CONTINUE,
 * WRITEPROTECT, WAKE and POISON under it. These never wait for the client:
 * they do not read or wait on the fault queue, they take the client's mm
 * lock only for reading, and no client holds that lock while it waits for
 * a fault to be served (handle_userfault drops it before sleeping, and
 * munmap/mremap/madvise wait for their uffd events after dropping it). What
 * they can cost is bounded kernel work: a COPY charges the client's memory
 * cgroup and may reclaim in it, then fails ENOMEM rather than wait. */
static void *fp_thread(void *arg)
{
    struct fp_engine *e = arg;
    pthread_setname_np(pthread_self(), "uswap-fault");   /* as top -H and /proc show it */
    uint64_t buf = 0;
    if (posix_memalign((void **)&buf, 4096, 4096) != 0)
        abort();
    memset((void *)buf, 0, 4096);   /* touched now: no allocation on the fault path */
    for (;;) {
        struct epoll_event ev;
        int n = epoll_wait(e->epfd, &ev, 1, -1);
        if (n < 0 && errno == EINTR)
            continue;
        if (n < 0 || ev.data.u64 == FP_STOP_KEY)
            break;
        uint32_t idx = (uint32_t)ev.data.u64, gen = (uint32_t)(ev.data.u64 >> 32);
        struct fp_job job;
        int have_job = 0;
        struct fp_region *r = idx < FP_MAX_REGIONS ? &e->regions[idx] : NULL;
        if (!r || !fp_reader_enter(e, r, gen))
            continue;   /* an event for a previous occupant, or a region closed since */
        int fd = r->uffd;
        /* Read one message at a time: a fault taken here leaves the rest of
         * the region's queue to another thread while this one reads the store. */
        for (;;) {
            struct uffd_msg m;
            int got = us_uffd_read_nowait(fd, &m, 1);
            fp_thread_lock(e);
            if (r->closing) {
                /* The engine closed it meanwhile: it woke the whole range
                 * (RegionSet.close_region); wake a fault read since as well.
                 * Any other event read (an UNMAP: the kernel gives it once)
                 * still goes to the engine: a region closed here by a
                 * handover lives on in the successor, whose table must not
                 * keep pages the client no longer maps; a region really
                 * closing ignores it (Forget.forget_range). */
                if (got == 1 && m.event == UFFD_EVENT_PAGEFAULT) {
                    struct uffdio_range range = { .start = m.arg.pagefault.address & ~4095ull, .len = 4096 };
                    ioctl(fd, UFFDIO_WAKE, &range);
                } else if (got == 1) {
                    fp_dispatch(e, r, &m, &job);   /* not a fault: a record for the engine */
                }
                fp_reader_leave(e, r);
                break;
            }
            if (got < 0) {
                /* The uffd cannot be read (-EPROTO: the client cleared
                 * O_NONBLOCK where the kernel cannot read without it): stop
                 * watching it; the engine closes the region on the record.
                 * Loads in flight end as for a closing region. */
                fp_push(e, FP_READ_ERROR, r)->result = got;
                __atomic_store_n(&r->closing, 1, __ATOMIC_SEQ_CST);
                epoll_ctl(e->epfd, EPOLL_CTL_DEL, fd, NULL);
                fp_reader_leave(e, r);
                break;
            }
            if (got == 0) {
                fp_rearm(e, r, idx);
                fp_reader_leave(e, r);
                break;
            }
            if (fp_dispatch(e, r, &m, &job)) {
                have_job = 1;
                fp_rearm(e, r, idx);   /* other threads read on while this one runs the job */
                fp_reader_leave(e, r);
                break;
            }
            /* Still a reader (`readers` counts this thread), the region
             * not closing: the next read may go ahead without the lock. */
            pthread_mutex_unlock(&e->lock);
        }
        pthread_mutex_unlock(&e->lock);   /* every way out of the loop above holds it */
        if (!have_job)
            continue;
        int64_t result, copied;
        uint32_t sum;
        fp_run(e, &job, buf, &result, &copied, &sum);
        fp_thread_lock(e);
        fp_finish(e, &job, result, copied, sum);
        pthread_mutex_unlock(&e->lock);
    }
    free((void *)buf);
    return NULL;
}

/* ---- the engine's side (Python, through cffi) ---- */

/* `readers` threads that may each be inside a store read, plus one more
 * that never is (fp_take_fault, invariant 4). */
static struct fp_engine *fp_new(int readers, int notify_fd, int store_fd)
{
    if (readers < 1 || readers > FP_MAX_READERS)
        return NULL;
    int nthreads = readers + 1;
    struct fp_engine *e = calloc(1, sizeof(*e));
    if (!e)
        return NULL;
    pthread_mutex_init(&e->lock, NULL);
    e->eventfd = notify_fd;
    e->fd = store_fd;
    e->enabled = 1;
    e->epfd = epoll_create1(EPOLL_CLOEXEC);
    e->stopfd = eventfd(0, EFD_CLOEXEC | EFD_NONBLOCK);
    struct epoll_event ev = { .events = EPOLLIN, .data.u64 = FP_STOP_KEY };
    if (e->epfd < 0 || e->stopfd < 0 || epoll_ctl(e->epfd, EPOLL_CTL_ADD, e->stopfd, &ev) < 0)
        goto fail;
    /* Threads run with every signal blocked: signals go to the daemon's
     * Python thread, and libnfs's sync calls fail when interrupted. */
    sigset_t all, old;
    sigfillset(&all);
    pthread_sigmask(SIG_BLOCK, &all, &old);
    for (int i = 0; i < nthreads; i++) {
        if (pthread_create(&e->threads[i], NULL, fp_thread, e) != 0)
            break;
        e->nthreads++;
    }
    pthread_sigmask(SIG_SETMASK, &old, NULL);
    if (e->nthreads < 2)
        goto fail_threads;   /* no reserve thread: invariant 4 could not hold */
    e->read_max = e->nthreads - 1;
    return e;
fail_threads:
    fp_stop(e);
    return NULL;
fail:
    if (e->epfd >= 0)
        close(e->epfd);
    if (e->stopfd >= 0)
        close(e->stopfd);
    free(e);
    return NULL;
}

/* The zero-fill window's largest size; 0 on success, -ENOMEM. */
static int fp_set_fill_max(struct fp_engine *e, int64_t pages)
{
    void *z = NULL;
    if (pages < 1 || posix_memalign(&z, 4096, (size_t)pages * 4096) != 0)
        return -ENOMEM;
    memset(z, 0, (size_t)pages * 4096);
    e->zero = (uint64_t)(uintptr_t)z;
    e->fill_max = pages;
    return 0;
}

static void fp_lock(struct fp_engine *e) { pthread_mutex_lock(&e->lock); }
static void fp_unlock(struct fp_engine *e) { pthread_mutex_unlock(&e->lock); }

/* Lock held. Start watching a region in slot idx; -errno on failure. */
static int fp_region_open(struct fp_engine *e, int idx)
{
    struct fp_region *r = &e->regions[idx];
    struct epoll_event ev = { .events = EPOLLIN | EPOLLONESHOT,
                              .data.u64 = ((uint64_t)r->gen << 32) | (uint32_t)idx };
    /* `readers` is not reset: a thread with a stale delivery may be between
     * its increment and its decrement (fp_reader_enter). */
    r->inflight = 0;
    r->unmaps_pending = 0;
    r->faults = 0;
    __atomic_store_n(&r->closing, 0, __ATOMIC_SEQ_CST);
    __atomic_store_n(&r->live, 1, __ATOMIC_SEQ_CST);
    if (epoll_ctl(e->epfd, EPOLL_CTL_ADD, r->uffd, &ev) < 0) {
        __atomic_store_n(&r->live, 0, __ATOMIC_SEQ_CST);
        return -errno;
    }
    return 0;
}

/* Lock held. Stop taking events of the region (its uffd stays open). */
static void fp_region_close(struct fp_engine *e, int idx)
{
    struct fp_region *r = &e->regions[idx];
    if (!r->closing) {
        __atomic_store_n(&r->closing, 1, __ATOMIC_SEQ_CST);   /* before fp_region_busy: fp_reader_enter */
        epoll_ctl(e->epfd, EPOLL_CTL_DEL, r->uffd, NULL);
    }
}

/* Lock held. Loads started here and not finished, plus threads reading the
 * region's uffd: its fds may be closed only when this is 0 (the engine
 * calls it after fp_region_close; see fp_reader_enter). */
static int fp_region_busy(struct fp_engine *e, int idx)
{
    struct fp_region *r = &e->regions[idx];
    return r->inflight + __atomic_load_n(&r->readers, __ATOMIC_SEQ_CST);
}

/* Lock held, r->inflight == 0 and r->readers == 0. The slot may be reused. */
static void fp_region_free(struct fp_engine *e, int idx)
{
    struct fp_region *r = &e->regions[idx];
    __atomic_store_n(&r->live, 0, __ATOMIC_SEQ_CST);
    __atomic_add_fetch(&r->gen, 1, __ATOMIC_SEQ_CST);
}

/* Lock held. Move up to max records into out; returns how many. */
static int fp_take_records(struct fp_engine *e, struct fp_record *out, int max)
{
    e->kicked = 0;
    int n = (int)(e->nrecs < max ? e->nrecs : max);
    memcpy(out, e->recs, (size_t)n * sizeof(*out));
    memmove(e->recs, e->recs + n, (size_t)(e->nrecs - n) * sizeof(*out));
    e->nrecs -= n;
    if (e->nrecs == 0)
        e->dirtied_waiting = 0;   /* fp_push: counted again from here */
    return n;
}

/* Lock NOT held. Stop and join the threads; loads in flight finish first. */
static void fp_stop(struct fp_engine *e)
{
    uint64_t one = 1;
    for (int i = 0; i < e->nthreads; i++) {
        ssize_t w = write(e->stopfd, &one, sizeof(one));
        (void)w;
    }
    for (int i = 0; i < e->nthreads; i++)
        pthread_join(e->threads[i], NULL);
    close(e->epfd);
    close(e->stopfd);
    free(e->recs);
    free((void *)(uintptr_t)e->zero);
    free(e);
}

/* Tests only (tests/test_transitions.py): one checked state change, as the
 * threads make them, so a test can show the check firing. */
static void fp_test_set_state(struct fp_engine *e, int idx, int64_t page, int to)
{
    pthread_mutex_lock(&e->lock);
    us_set_state(e, &e->regions[idx], page, (uint8_t)to);
    pthread_mutex_unlock(&e->lock);
}

/* The paging policy rules, each once, as pure functions: arguments in,
 * result out -- no I/O, no lock, no globals. The fast path's threads
 * (fastpath.c) call them directly; the Python engine calls the same
 * functions through the cffi module (uswap/daemon/policy.py), so the two
 * cannot drift apart. (us_ra_use reorders the stream rows it is given, and
 * us_ra_find writes its answer's kind through a pointer: no other state.)
 */
#ifndef USWAP_POLICY_H
#define USWAP_POLICY_H

#include <stdint.h>
#include "pagestate.h"

/* cdef: begin */
/* What a swap-in fault at a page is to the region's read-ahead. */
enum us_locality {
    US_RA_RANDOM = 0,  /* no locality with the last swap-in: read the page alone */
    US_RA_NEAR = 1,    /* within ra_pages of the last swap-in fault: read its aligned window */
    US_RA_STREAM = 2   /* past the stream's latest fault and not past where its windows
                        * end (or inside its last window): a sequential stream, whose
                        * window doubles */
};

static inline int us_ra_locality(int64_t page, int64_t last_fault, int64_t ra_expect, int64_t ra_window,
                                 int64_t ra_pages);
/* A region's read-ahead streams: US_RA_STREAMS rows of US_RA_COLS int64,
 * the latest used first (row 0: the stream of the region's last swap-in). */
#define US_RA_STREAMS 8
#define US_RA_COLS 4
#define US_RA_LAST 0      /* the stream's latest fault */
#define US_RA_EXPECT 1    /* where its windows end: its next fault */
#define US_RA_WINDOW 2    /* its window, pages */
#define US_RA_FLAGS 3     /* US_RA_F_* */
#define US_RA_F_STREAMING 1  /* its last fault continued a sequential stream */
#define US_RA_F_WRITING 2    /* and a write continued it: its windows are mapped writable */
static inline int us_ra_find(int64_t page, const int64_t *streams, int64_t ra_pages, int *locality);
static inline void us_ra_use(int64_t *streams, int which);
static inline int us_refault_active(uint32_t tick, uint32_t stamp, int64_t max_pages);
static inline int64_t us_fill_window(int64_t page, int64_t fill_expect, int64_t window, int64_t fill_max);
static inline int64_t us_admit(int64_t charged, int64_t max_pages, int64_t n, int draining);
static inline int us_must_overcommit(int64_t writes_inflight, int64_t loads_inflight, int64_t loads_queued,
                                     int64_t fast_loads_inflight, int64_t young_punches);
static inline int us_kick_due(int64_t before, int64_t after, int64_t high_pages, int64_t clean_pages);
static inline uint8_t us_minor_use(uint8_t flags);
static inline int us_minor_writable(uint8_t state, uint8_t flags, uint32_t children);
/* cdef: end */

/* Read-ahead locality. A stream's next fault lands where its windows ended
 * (a little past their end when the pages there were resident), or inside
 * them: past the stream's latest fault (last_fault), on a page its windows
 * did not load -- one cut short by the budget, or one they read through
 * because it was resident then and that reclaim evicted before the stream
 * got there (a random pass's leftovers are old). All of these are the
 * stream's: taken for random, such a fault read its page alone and reset
 * the stream to a one-page window, and the next such page, past that
 * window's end, was random again. A fault at most ra_window behind where
 * the windows end is the stream's too (the last window's own pages; another
 * thread's fault behind the latest). Otherwise a fault within ra_pages of
 * the last one is near; anything else is random (it gains nothing from
 * neighbours and would pay for their transfer). ra_expect <= 0: no stream
 * yet. */
static inline int us_ra_locality(int64_t page, int64_t last_fault, int64_t ra_expect, int64_t ra_window,
                                 int64_t ra_pages)
{
    if (ra_expect > 0 && page <= ra_expect + ra_pages && (page > last_fault || ra_expect - ra_window <= page))
        return US_RA_STREAM;
    int64_t dist = page - last_fault;
    if (dist >= -ra_pages && dist <= ra_pages)
        return US_RA_NEAR;
    return US_RA_RANDOM;
}

/* Several threads (or one program's several sequential passes) stream
 * through a region at once, each fault of one between two of another's:
 * with one stream per region each took the others' faults for its own
 * break and read page by page (the scale bench: 4 threads with 64-page
 * runs, 58k faults, 52k of them one-page loads, for 71k pages). So a
 * region keeps US_RA_STREAMS streams, latest used first, and a fault is
 * judged against each in that order; the first it belongs to is the
 * fault's, its kind in *locality; -1 (and US_RA_RANDOM) when none.
 * Row 0, the latest used, by the one-stream rule (us_ra_locality: stream
 * or near). The older rows only as streams: one whose last fault
 * continued a stream (US_RA_F_STREAMING) by us_ra_locality's stream rule,
 * and one that is not a stream yet (a random fault's one page) only where
 * it ended (ra_expect: that thread's next page). Judged as row 0 is, the
 * older rows took a random pass's faults for near or for streams (eight
 * last faults instead of one, each with a window of ra_pages around it):
 * test_readahead.py's pass over every 8th page loaded windows around
 * most of them. */
static inline int us_ra_find(int64_t page, const int64_t *streams, int64_t ra_pages, int *locality)
{
    for (int i = 0; i < US_RA_STREAMS; i++) {
        const int64_t *s = streams + i * US_RA_COLS;
        int kind = us_ra_locality(page, s[US_RA_LAST], s[US_RA_EXPECT], s[US_RA_WINDOW], ra_pages);
        if (i > 0 && kind != US_RA_STREAM)
            continue;
        if (i > 0 && !(s[US_RA_FLAGS] & US_RA_F_STREAMING) && page != s[US_RA_EXPECT])
            continue;
        if (kind != US_RA_RANDOM) {
            *locality = kind;
            return i;
        }
    }
    *locality = US_RA_RANDOM;
    return -1;
}

/* A swap-in starts on stream `which` (us_ra_find's answer): it moves to
 * row 0, the rows before it one down. which = -1, a new stream (a random
 * fault): every row moves down, the least recently used one is dropped,
 * and row 0 (still the previous stream's copy) is the caller's to set. */
static inline void us_ra_use(int64_t *streams, int which)
{
    int last = which < 0 ? US_RA_STREAMS - 1 : which;
    int64_t keep[US_RA_COLS];
    for (int c = 0; c < US_RA_COLS; c++)
        keep[c] = streams[last * US_RA_COLS + c];
    for (int i = last; i > 0; i--)
        for (int c = 0; c < US_RA_COLS; c++)
            streams[i * US_RA_COLS + c] = streams[(i - 1) * US_RA_COLS + c];
    if (which >= 0)
        for (int c = 0; c < US_RA_COLS; c++)
            streams[c] = keep[c];
}

/* Refault distance (as Linux's workingset detection): a page swapped in
 * within a budget's worth of faults after its eviction belongs to the
 * working set and returns active (F_ACTIVE). `tick` is the fault clock now,
 * `stamp` the page's eviction tick; the clock wraps at 2^32. */
static inline int us_refault_active(uint32_t tick, uint32_t stamp, int64_t max_pages)
{
    return (uint64_t)(uint32_t)(tick - stamp) <= (uint64_t)max_pages;
}

/* The zero-fill window of a first touch at `page`: a fault where the
 * region's last fill ended (fill_expect) continues a first-touch stream and
 * doubles the window up to fill_max; any other starts again at 1. The fill
 * then covers the window's EMPTY pages from `page` on, within the region
 * and as far as the budget admits (us_admit). */
static inline int64_t us_fill_window(int64_t page, int64_t fill_expect, int64_t window, int64_t fill_max)
{
    if (page != fill_expect)
        return 1;
    return window * 2 < fill_max ? window * 2 : fill_max;
}

/* Admission to the budget: how many of n pages may be charged now, charged
 * pages of max_pages being in use. While draining every page is admitted
 * (drain brings every page home whatever the budget). A fault is admitted
 * when this is n; a window takes the pages admitted. */
static inline int64_t us_admit(int64_t charged, int64_t max_pages, int64_t n, int draining)
{
    if (draining)
        return n;
    int64_t room = max_pages - charged;
    return room <= 0 ? 0 : room < n ? room : n;
}

/* A fault the budget does not admit waits for reclaim -- unless reclaim
 * cannot make room: nothing is being written or read that would free or
 * settle memory, and no punch young enough to be counted on is in flight.
 * That is the store-unavailable case (full, or failing writes in backoff):
 * the page is charged over budget rather than stall the client for ever. */
static inline int us_must_overcommit(int64_t writes_inflight, int64_t loads_inflight, int64_t loads_queued,
                                     int64_t fast_loads_inflight, int64_t young_punches)
{
    return writes_inflight == 0 && loads_inflight == 0 && loads_queued == 0 && fast_loads_inflight == 0
           && young_punches == 0;
}

/* A fault thread that charged pages (from `before` to `after` charged)
 * wakes the engine when reclaim is due (past the high watermark), and when
 * the charge first passes clean_pages: background writeback (cleaner.py)
 * must start writing ahead then, not at the high watermark, or the first
 * victims reclaim meets are still dirty. Above clean_pages the engine runs
 * it whenever it runs anyway (reclaim, records), so one wake at the
 * crossing is enough and a read-only load costs no wake per fault. */
static inline int us_kick_due(int64_t before, int64_t after, int64_t high_pages, int64_t clean_pages)
{
    return after > high_pages || (before <= clean_pages && after > clean_pages);
}

/* A MINOR fault on a page in memory (mapped again after the access
 * sampler, or the client's MADV_DONTNEED, took it out of the page tables)
 * is its first use since: its flags afterwards. It is made active, as the
 * kernel activates a page found referenced at the tail of its inactive
 * list, so it stays out of the sampler's way until the active share
 * demotes it (fewer minor faults). The caller advances the fault clock and
 * stamps it, as for a first write (victims.py reads a changed stamp as a
 * use). */
static inline uint8_t us_minor_use(uint8_t flags)
{
    return (uint8_t)(flags | US_F_ACTIVE);
}

/* A MINOR fault's page is mapped again (UFFDIO_CONTINUE) writable only when
 * it is RESIDENT and dirty and no forked child still reads it from this
 * region (`children`: the children AT_PARENT at that page, cow.py's share
 * counts); otherwise write-protected. A clean page's first write must fault
 * (its slot copy goes stale and is freed); a WRITEBACK page is being
 * copied to the store (invariant 1); a page a child reads must be copied
 * into the child before the parent's next write (cow.py's AT_PARENT
 * invariant: dirtying.py's make_dirty copies it on that write-protect
 * fault). A dirty page is write-protected otherwise only while a fork
 * builds its snapshot (fork.py _protect), which ends under the same page
 * lock with the children's share counts set (cow.link). Faults.fault_minor
 * and the fault threads' fp_take_minor both ask this. */
static inline int us_minor_writable(uint8_t state, uint8_t flags, uint32_t children)
{
    return state == US_RESIDENT && (flags & US_F_DIRTY) && children == 0;
}

#endif

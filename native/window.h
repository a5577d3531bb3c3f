/* A sequential stream's read-ahead window: which pages one load owns, and
 * the runs of adjacent slots it reads (uswap/daemon/readahead.py
 * ReadAhead._window states the rule and calls this). In C because the
 * same computation as a dozen numpy calls cost 40-120 us a window, a fifth
 * of the engine thread's time on the scale bench row (4 threads' streams:
 * py-spy), for windows of 8-128 pages. No lock, no I/O, no globals: the
 * engine calls it with the page lock held and the arrays it passes.
 */
#ifndef USWAP_WINDOW_H
#define USWAP_WINDOW_H

#include <stdint.h>
#include "pagestate.h"

/* cdef: begin */
int64_t us_ra_window(const uint8_t *state, const int32_t *slot, int64_t page, int64_t end,
                     const int64_t *wfirst, const int64_t *wend, int64_t nwrites, int64_t room,
                     uint8_t *skip, int64_t *runs, int64_t *out);
/* cdef: end */

/* Whether a store write to `s` is in flight: the writes are the runs
 * [wfirst[i], wend[i]), sorted by first and disjoint (SlotAllocator). */
static int us_ra_writing(const int64_t *wfirst, const int64_t *wend, int64_t nwrites, int64_t s)
{
    int64_t lo = 0, hi = nwrites;   /* the last run with first <= s: binary search */
    while (lo < hi) {
        int64_t mid = (lo + hi) / 2;
        if (wfirst[mid] <= s)
            lo = mid + 1;
        else
            hi = mid;
    }
    return lo > 0 && s < wend[lo - 1];
}

/* The window from `page` (SWAPPED, charged by the caller) to below `end`
 * (at most the region's end; end > page + 1): every SWAPPED page of it is
 * the load's ("own"), up to the first own page whose slot has a write in
 * flight (invariant 3), and up to `room` own pages past `page` (the
 * budget's admission, in order). Runs: consecutive own pages whose slots
 * differ by their distance, reading through the pages between them unless
 * a slot read through has a write in flight (the run splits there).
 *
 * Writes skip[i] (1: page + i is not the load's) and runs (rows of page
 * index, slot, pages) for the window's n pages, the caller's arrays of
 * end - page entries (runs: rows). out[0] = n (0: the window is `page`
 * alone), out[1] = own pages past `page` (the caller charges them),
 * out[2] = runs, out[3] = whether any page of the window is not the
 * load's. Returns n. */
int64_t us_ra_window(const uint8_t *state, const int32_t *slot, int64_t page, int64_t end,
                     const int64_t *wfirst, const int64_t *wend, int64_t nwrites, int64_t room,
                     uint8_t *skip, int64_t *runs, int64_t *out)
{
    int64_t m = end - page;
    /* How far the window goes: own pages in order, stopping before an own
     * page being written and after the room-th own page past `page`. */
    int64_t n = 1, admitted = 0;
    out[0] = out[1] = out[2] = out[3] = 0;
    if (us_ra_writing(wfirst, wend, nwrites, slot[page]))
        return 0;   /* never expected (a SWAPPED page's slot holds its copy): `page` alone */
    for (int64_t i = 1; i < m && admitted < room; i++) {
        if (state[page + i] != US_SWAPPED)
            continue;
        if (us_ra_writing(wfirst, wend, nwrites, slot[page + i]))
            break;
        admitted++;
        n = i + 1;
    }
    if (admitted == 0)
        return 0;
    int64_t nruns = 0, last_own = 0, any_skip = 0, blocked = 0;
    for (int64_t i = 0; i < n; i++) {
        int own = i == 0 || state[page + i] == US_SWAPPED;
        skip[i] = (uint8_t)!own;
        if (!own) {
            any_skip = 1;
            /* A page read through by the run from the last own page: the
             * slot it would read must have no write in flight. */
            if (us_ra_writing(wfirst, wend, nwrites, (int64_t)slot[page + last_own] + (i - last_own)))
                blocked = 1;
            continue;
        }
        int64_t s = slot[page + i];
        if (nruns > 0 && !blocked && s - i == (int64_t)slot[page + last_own] - last_own) {
            runs[(nruns - 1) * 3 + 2] = i - runs[(nruns - 1) * 3] + 1;
        } else {
            runs[nruns * 3] = i;
            runs[nruns * 3 + 1] = s;
            runs[nruns * 3 + 2] = 1;
            nruns++;
        }
        last_own = i;
        blocked = 0;
    }
    out[0] = n;
    out[1] = admitted;
    out[2] = nruns;
    out[3] = any_skip;
    return n;
}

#endif

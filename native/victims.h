/* Victim choice for reclaim, as pure functions: arguments in, results out
 * -- no I/O, no lock, no globals. The Python engine calls them through the
 * fast path's cffi module (uswap/daemon/victims.py), which keeps the rest
 * of the victim policy (the queue, sampling, probation).
 *
 * Why this is in C (the project's rule is policy in Python unless a
 * measurement shows otherwise, and then the rule moves whole): the victim
 * scan is the engine thread's longest hold of the page lock. With the
 * choice in numpy, one scan held it ~1.25 ms without its sampling
 * (choose_victims alone 630-1080 us: a pass per condition over every
 * resident page, concatenations, two argpartitions), ~42 scans per
 * `scripts/bench.py --quick` run, and the fast path's fault threads waited
 * behind it (mt-mix p99 3.0x kernel swap; py-spy on a first-touch stream:
 * VictimQueue._scan ~43% of the engine thread, 3/4 of it numpy
 * bookkeeping). Here it is one pass over each region's state bytes and a
 * selection (quickselect) over a scratch buffer of the candidates, and the
 * queue's bookkeeping is one pass over sorted lists. Measured after, same
 * machine, alternating with main (bench.py --quick, a temporary per-scan
 * timer): a scan's hold less its sampling, median per run, 1.0-1.5 ms on
 * main, 0.4-0.8 ms with these; with the sampling out of the lock as well
 * (branch lock), the whole hold 0.9-1.5 ms -> 0.35-0.57 ms. The
 * benchmark's end-to-end figures (mt-mix p99, lock waits over 500 us)
 * did not move beyond the noise: other holds dominate (the cleaner's
 * write-ahead, completions).
 */
#ifndef USWAP_VICTIMS_H
#define USWAP_VICTIMS_H

#include <stdint.h>
#include <string.h>
#include "pagestate.h"

/* cdef: begin */
/* The share of resident (candidate) pages active pages may hold, as a
 * fraction: past it the oldest active pages are demoted (us_choose_victims). */
#define US_ACTIVE_SHARE_NUM 3
#define US_ACTIVE_SHARE_DEN 4
/* The selection's partition rounds before it heapsorts what is left (its
 * worst case bounded at n log n; us_select_largest). */
#define US_SELECT_ROUNDS 64

/* One region's page table as us_choose_victims reads it (the arrays of
 * uswap/daemon/pagetable.py, npages entries each). */
struct us_vregion {
    const uint8_t *state;
    uint8_t *flags;          /* in/out: F_ACTIVE cleared on the pages demoted */
    const uint32_t *stamp;
    const uint8_t *never;    /* nonzero: a page never to take (mlocked); NULL: none */
    int64_t npages;
    int64_t candidates;      /* out: its RESIDENT pages not in `never` */
    int64_t chosen;          /* out: how many of the victims are its pages */
};

static inline int64_t us_choose_victims(struct us_vregion *regions, int64_t nregions, int64_t want,
                                        uint32_t tick, int clean_only, uint64_t *keys, int64_t *cands,
                                        int64_t cap, int64_t *out);
static inline int us_oldest(const uint32_t *stamps, int64_t n, uint32_t tick, int64_t k, uint8_t *mask,
                            uint64_t *keys);
static inline void us_usable(const struct us_vregion *reg, const int64_t *pages, const uint32_t *stamps, int64_t n,
                             int clean_only, uint8_t *mask);
static inline int64_t us_known(const struct us_vregion *reg, const int64_t *pa, const uint32_t *sa, int64_t na,
                               const int64_t *pb, const uint32_t *sb, int64_t nb, int64_t *out_pages,
                               uint32_t *out_stamps);
static inline void us_untouched(const struct us_vregion *reg, const int64_t *held, const uint32_t *held_stamps,
                                int64_t nheld, const int64_t *pages, int64_t n, uint8_t *mask);
static inline int64_t us_sorted_minus(const int64_t *a, int64_t na, const int64_t *b, int64_t nb, int64_t *out);
static inline int64_t us_sorted_merge(const int64_t *a, int64_t na, const int64_t *b, int64_t nb, int64_t *out);
/* cdef: end */

/* Bits a candidate's entry of `cands` carries above its page number. */
#define US_VC_PAGE ((1LL << 60) - 1)
#define US_VC_DIRTY (1LL << 60)
#define US_VC_DEMOTE (1LL << 61)
#define US_VC_CHOSEN (1LL << 62)
#define US_VC_ONES 0x0101010101010101ULL

static inline void us_swap_u64(uint64_t *a, uint64_t *b)
{
    uint64_t t = *a;
    *a = *b;
    *b = t;
}

/* Sift a[root] down the min-heap a[0..n). */
static void us_sift_min(uint64_t *a, int64_t root, int64_t n)
{
    for (;;) {
        int64_t child = 2 * root + 1;
        if (child >= n)
            return;
        if (child + 1 < n && a[child + 1] < a[child])
            child++;
        if (a[root] <= a[child])
            return;
        us_swap_u64(&a[root], &a[child]);
        root = child;
    }
}

/* a[0..n) sorted descending (heapsort: the worst-case bound of
 * us_select_largest): a min-heap, its minimum swapped to the end each round. */
static void us_sort_desc(uint64_t *a, int64_t n)
{
    for (int64_t root = n / 2 - 1; root >= 0; root--)
        us_sift_min(a, root, n);
    for (int64_t end = n - 1; end > 0; end--) {
        us_swap_u64(&a[0], &a[end]);
        us_sift_min(a, 0, end);
    }
}

/* The next of a xorshift64 sequence (the selection's pivot places). */
static inline uint64_t us_xorshift(uint64_t *s)
{
    *s ^= *s << 13;
    *s ^= *s >> 7;
    *s ^= *s << 17;
    return *s;
}

/* Rearrange a[0..n) (distinct values) so that a[0..k) holds its k largest,
 * in no particular order: quickselect, partitioned without a branch on the
 * comparison (Lomuto with an unconditional swap: the ages of random pages
 * are random, and a branch on each comparison was mispredicted half the
 * time -- a Hoare partition took ~530 us to select 4096 of 65536 here,
 * numpy's argpartition 84 us). The pivot is the median of three keys at
 * pseudo-random places, one in each third of the range: a median of the
 * first, middle and last keys (as before) is the second largest of the
 * range whenever the candidates' ages form a sawtooth -- two or more
 * regions (or parts) written in page order at the same time, the
 * candidates being in page order -- and every round then set one key
 * aside: 63 rounds and a heapsort, 400-600 ms for 2^20 candidates against
 * 4-10 ms for random ages, and choose_victims over two such regions of
 * 2^16 pages took 24.6 ms against numpy's 3.5 (tests/daemon/
 * test_review_victims_native.py). Three distinct places keep the median
 * neither the largest nor the smallest, so each round shrinks the range. A
 * range of 16 or fewer is sorted; after US_SELECT_ROUNDS rounds, what is
 * left is heapsorted (the worst case stays n log n). Returns the
 * partition rounds taken, US_SELECT_ROUNDS when it fell back to the
 * heapsort: what a test checks, by count rather than by time, to see an
 * input shape handled in the expected O(n). */
static int us_select_largest(uint64_t *a, int64_t n, int64_t k)
{
    int64_t lo = 0, hi = n - 1;
    int rounds = 0;
    uint64_t seed = 0x9E3779B97F4A7C15ULL ^ (uint64_t)n;  /* fixed: the same steps for the same input */
    if (k <= 0 || k >= n)
        return 0;
    while (hi - lo >= 16) {
        if (++rounds == US_SELECT_ROUNDS) {
            us_sort_desc(a + lo, hi - lo + 1);
            return rounds;
        }
        int64_t third = (hi - lo + 1) / 3;
        uint64_t x = a[lo + (int64_t)(us_xorshift(&seed) % (uint64_t)third)];
        uint64_t y = a[lo + third + (int64_t)(us_xorshift(&seed) % (uint64_t)third)];
        uint64_t z = a[lo + 2 * third + (int64_t)(us_xorshift(&seed) % (uint64_t)(hi - lo + 1 - 2 * third))];
        uint64_t pivot = x < y ? (y < z ? y : (x < z ? z : x)) : (x < z ? x : (y < z ? z : y));
        /* a[lo..store) > pivot >= a[store..i): swapping a[i] with a[store]
         * when a[i] <= pivot exchanges two elements <= pivot, so the swap
         * need not depend on the comparison. */
        int64_t store = lo;
        for (int64_t i = lo; i <= hi; i++) {
            uint64_t v = a[i];
            a[i] = a[store];
            a[store] = v;
            store += v > pivot;
        }
        /* Distinct values at three distinct places: the pivot (their
         * median) is neither the largest nor the smallest, so both sides
         * are smaller than the range. */
        if (k == store)
            return rounds;
        if (k < store)
            hi = store - 1;
        else
            lo = store;
    }
    us_sort_desc(a + lo, hi - lo + 1);
    return rounds;
}

/* A candidate's sort key: its age (the fault clock since its stamp, modulo
 * the 32-bit wrap) above, and below, its index among the candidates
 * inverted, so that of two pages of the same age the one met first (lower
 * region, lower page) is the older. Distinct for distinct indices. */
static inline uint64_t us_vkey(uint32_t tick, uint32_t stamp, int64_t index)
{
    return ((uint64_t)(uint32_t)(tick - stamp) << 32) | (uint64_t)(0xFFFFFFFFu - (uint32_t)index);
}

static inline int64_t us_vkey_index(uint64_t key)
{
    return (int64_t)(0xFFFFFFFFu - (uint32_t)key);
}

/* Victims for reclaim: up to `want` RESIDENT pages of the regions, by the
 * rules of the two lists (docs/design.md, victims.py):
 * - candidates are the RESIDENT pages not marked in the region's `never`
 *   mask (the client's mlocked ranges: pinned I/O may use them unseen);
 * - a page's age is the fault clock `tick` less its stamp, modulo 2^32;
 * - active pages (F_ACTIVE) may be US_ACTIVE_SHARE of the candidates: the
 *   oldest beyond that are demoted (F_ACTIVE cleared in `flags`, dirty or
 *   not, whatever `clean_only`) -- only when want > 0;
 * - the victims are the oldest inactive pages, then, when too few, the
 *   oldest active ones; with `clean_only` (the store cannot take writes)
 *   dirty pages are no victims.
 * Output: out[0..returned) the victims' page numbers, by region in order
 * and ascending within one; each region's `chosen` says how many are its
 * (and `candidates` how many it had). `out` holds min(want, candidates).
 * Scratch: keys[cap] and cands[cap], cap at least the number of
 * candidates; when it is less, nothing is changed and -(candidates) is
 * returned (call again with that much scratch). Ties in age go to the
 * page met first. */
static inline int64_t us_choose_victims(struct us_vregion *regions, int64_t nregions, int64_t want,
                                        uint32_t tick, int clean_only, uint64_t *keys, int64_t *cands,
                                        int64_t cap, int64_t *out)
{
    int64_t n = 0, nin = 0, nact = 0;
    if (cap > 0xFFFFFFFFLL)
        cap = 0xFFFFFFFFLL;  /* the key holds a candidate's index in 32 bits */
    /* One pass: the candidates, inactive keys from the start of `keys`,
     * active keys from its end. */
    for (int64_t r = 0; r < nregions; r++) {
        struct us_vregion *reg = &regions[r];
        const uint8_t *state = reg->state, *never = reg->never, *flags = reg->flags;
        const uint32_t *stamp = reg->stamp;
        int64_t first = n;
        int64_t p = 0, npages = reg->npages;
        for (; p + 8 <= npages; p += 8) {
            /* Eight state bytes at a time: a bit per RESIDENT byte (the top
             * bit of each byte of w ^ RESIDENT x 8 that is zero, exactly),
             * less those `never` marks; then one step per candidate, not a
             * (mispredicted) branch per page. A word with none, most of a
             * sparse or swapped-out region, costs a few operations. */
            uint64_t w, m;
            memcpy(&w, state + p, 8);
            w ^= US_VC_ONES * US_RESIDENT;
            m = ~(((w & (US_VC_ONES * 0x7f)) + US_VC_ONES * 0x7f) | w | (US_VC_ONES * 0x7f));
            if (m && never) {
                uint64_t v;
                memcpy(&v, never + p, 8);
                /* top bit of each nonzero byte of v */
                m &= ~((((v & (US_VC_ONES * 0x7f)) + US_VC_ONES * 0x7f) | v) & (US_VC_ONES << 7));
            }
            while (m) {
                int64_t q = p + (__builtin_ctzll(m) >> 3);
                m &= m - 1;
                if (n < cap) {
                    uint8_t f = flags[q];
                    int active = (f & US_F_ACTIVE) != 0;
                    uint64_t key = us_vkey(tick, stamp[q], n);
                    cands[n] = q | ((f & US_F_DIRTY) ? US_VC_DIRTY : 0);
                    /* Both ends written, one kept: no branch on the flag
                     * (nin + nact < cap, so the two slots are distinct or
                     * the same one, never a kept key). */
                    keys[nin] = key;
                    keys[cap - 1 - nact] = key;
                    nin += !active;
                    nact += active;
                }
                n++;
            }
        }
        for (; p < npages; p++) {  /* the last few pages */
            if (state[p] != US_RESIDENT || (never && never[p]))
                continue;
            if (n < cap) {
                uint8_t f = flags[p];
                cands[n] = p | ((f & US_F_DIRTY) ? US_VC_DIRTY : 0);
                if (f & US_F_ACTIVE)
                    keys[cap - 1 - nact++] = us_vkey(tick, stamp[p], n);
                else
                    keys[nin++] = us_vkey(tick, stamp[p], n);
            }
            n++;
        }
        reg->candidates = n - first;
        reg->chosen = 0;
    }
    if (n > cap)
        return -n;
    if (n == 0 || want <= 0)
        return 0;
    uint64_t *act = keys + cap - nact;
    /* Demote the oldest active pages beyond their share; they join the
     * inactive ones (the gap between the two ends holds them). */
    int64_t excess = nact - n * US_ACTIVE_SHARE_NUM / US_ACTIVE_SHARE_DEN;
    if (excess > 0) {
        us_select_largest(act, nact, excess);
        for (int64_t i = 0; i < excess; i++)
            cands[us_vkey_index(act[i])] |= US_VC_DEMOTE;
        memmove(keys + nin, act, (size_t)excess * sizeof(*keys));
        nin += excess;
        act += excess;
        nact -= excess;
    }
    if (clean_only) {
        int64_t m = 0;
        for (int64_t i = 0; i < nin; i++)
            if (!(cands[us_vkey_index(keys[i])] & US_VC_DIRTY))
                keys[m++] = keys[i];
        nin = m;
        m = 0;
        for (int64_t i = 0; i < nact; i++)
            if (!(cands[us_vkey_index(act[i])] & US_VC_DIRTY))
                act[m++] = act[i];
        nact = m;
    }
    int64_t take_in = nin < want ? nin : want;
    us_select_largest(keys, nin, take_in);
    for (int64_t i = 0; i < take_in; i++)
        cands[us_vkey_index(keys[i])] |= US_VC_CHOSEN;
    int64_t short_ = want - take_in;
    int64_t take_act = nact < short_ ? nact : short_;
    if (take_act > 0) {
        us_select_largest(act, nact, take_act);
        for (int64_t i = 0; i < take_act; i++)
            cands[us_vkey_index(act[i])] |= US_VC_CHOSEN;
    }
    /* One sweep over the candidates, in order: the demotions applied, the
     * victims written out by region, ascending. */
    int64_t got = 0, i = 0, total = take_in + (take_act > 0 ? take_act : 0);
    for (int64_t r = 0; r < nregions; r++) {
        if (got == total && excess <= 0) {
            regions[r].chosen = 0;  /* all found, nothing to demote: the rest is not read */
            continue;
        }
        struct us_vregion *reg = &regions[r];
        int64_t before = got;
        for (int64_t end = i + reg->candidates; i < end; i++) {
            int64_t c = cands[i];
            if (c & US_VC_DEMOTE)  /* rare: no mispredictions, and a flags byte is written only if it changes */
                reg->flags[c & US_VC_PAGE] &= (uint8_t)~US_F_ACTIVE;
            if (got < total) {  /* out[got] is in bounds: written always, kept if chosen */
                out[got] = c & US_VC_PAGE;
                got += (c & US_VC_CHOSEN) != 0;
            }
        }
        reg->chosen = got - before;
    }
    return got;
}

/* The k oldest of n pages by their stamps (age: tick less stamp, modulo
 * 2^32; ties to the lower index): mask[i] = 1 for those, 0 for the rest.
 * keys: scratch of n. Returns the selection's partition rounds
 * (us_select_largest). */
static inline int us_oldest(const uint32_t *stamps, int64_t n, uint32_t tick, int64_t k, uint8_t *mask,
                            uint64_t *keys)
{
    if (k >= n) {
        memset(mask, 1, (size_t)(n > 0 ? n : 0));
        return 0;
    }
    memset(mask, 0, (size_t)(n > 0 ? n : 0));
    if (k <= 0)
        return 0;
    for (int64_t i = 0; i < n; i++)
        keys[i] = us_vkey(tick, stamps[i], i);
    int rounds = us_select_largest(keys, n, k);
    for (int64_t i = 0; i < k; i++)
        mask[us_vkey_index(keys[i])] = 1;
    return rounds;
}

/* The victim queue's bookkeeping (victims.py VictimQueue: the queue, the
 * pages on probation and the ones judged, each a sorted page list with the
 * stamps the pages had then), in C for the same reason as the choice: in
 * numpy, the checks, searchsorted, unique, setdiff1d and sorts of each scan
 * cost the engine more page-lock time than the choice itself once the
 * choice was in C (a stream, 16384 pages resident: ~500 of ~780 us per
 * scan, cProfile). Each is one pass over sorted lists. */

/* A page queued (or judged) with stamp `then` is still a victim now:
 * RESIDENT, or being written ahead (WRITEBACK without F_EVICT: cleaner.py);
 * not faulted since (the stamp unchanged: a fault, a sampled page's minor
 * fault included, stamps it -- it was used or changed hands); not in a
 * range its client mlocked; and clean when only clean pages may go. The
 * one statement of the rule the queue hands pages out by. */
static inline int us_still_victim(uint8_t state, uint8_t flags, uint32_t now, uint32_t then, int locked,
                                  int clean_only)
{
    return (state == US_RESIDENT || (state == US_WRITEBACK && !(flags & US_F_EVICT))) && now == then && !locked
           && !(clean_only && (flags & US_F_DIRTY));
}

/* us_still_victim for page p of `reg`, queued with stamp `then`; a page
 * number outside the region (a bug upstream) is none. */
static inline int us_page_still_victim(const struct us_vregion *reg, int64_t p, uint32_t then, int clean_only)
{
    if (p < 0 || p >= reg->npages)
        return 0;
    return us_still_victim(reg->state[p], reg->flags[p], reg->stamp[p], then, reg->never && reg->never[p],
                           clean_only);
}

/* mask[i] = pages[i], queued with stamps[i], is still a victim of `reg`
 * (us_still_victim). */
static inline void us_usable(const struct us_vregion *reg, const int64_t *pages, const uint32_t *stamps, int64_t n,
                             int clean_only, uint8_t *mask)
{
    for (int64_t i = 0; i < n; i++) {
        mask[i] = (uint8_t)us_page_still_victim(reg, pages[i], stamps[i], clean_only);
    }
}

/* The pages known untouched: the union of two sorted page lists (the
 * pages on probation and the ones judged, each with its stamps then), of
 * those still victims (us_still_victim, whatever their dirtiness). A page
 * in both is kept once, with the stamp of the first list's entry when that
 * one is kept, else the second's. Out: sorted pages and their stamps;
 * returns how many (at most na + nb). */
static inline int64_t us_known(const struct us_vregion *reg, const int64_t *pa, const uint32_t *sa, int64_t na,
                               const int64_t *pb, const uint32_t *sb, int64_t nb, int64_t *out_pages,
                               uint32_t *out_stamps)
{
    int64_t i = 0, j = 0, n = 0;
    while (i < na || j < nb) {
        int64_t p;
        int have = 0;
        uint32_t st = 0;
        if (j >= nb || (i < na && pa[i] <= pb[j])) {
            p = pa[i];
            if (us_page_still_victim(reg, p, sa[i], 0)) {
                have = 1;
                st = sa[i];
            }
            i++;
            if (j < nb && pb[j] == p) {
                if (!have && us_page_still_victim(reg, p, sb[j], 0)) {
                    have = 1;
                    st = sb[j];
                }
                j++;
            }
        } else {
            p = pb[j];
            if (us_page_still_victim(reg, p, sb[j], 0)) {
                have = 1;
                st = sb[j];
            }
            j++;
        }
        out_pages[n] = p;
        out_stamps[n] = st;
        n += have;
    }
    return n;
}

/* mask[i] = pages[i] (sorted) is among `held` (sorted, with their stamps
 * then) and not faulted since: its stamp in `reg` unchanged. */
static inline void us_untouched(const struct us_vregion *reg, const int64_t *held, const uint32_t *held_stamps,
                                int64_t nheld, const int64_t *pages, int64_t n, uint8_t *mask)
{
    int64_t j = 0;
    for (int64_t i = 0; i < n; i++) {
        int64_t p = pages[i];
        while (j < nheld && held[j] < p)
            j++;
        mask[i] = (uint8_t)(j < nheld && held[j] == p && p >= 0 && p < reg->npages && held_stamps[j] == reg->stamp[p]);
    }
}

/* out = the pages of sorted a not in sorted b, in order; returns how many. */
static inline int64_t us_sorted_minus(const int64_t *a, int64_t na, const int64_t *b, int64_t nb, int64_t *out)
{
    int64_t j = 0, n = 0;
    for (int64_t i = 0; i < na; i++) {
        while (j < nb && b[j] < a[i])
            j++;
        out[n] = a[i];
        n += !(j < nb && b[j] == a[i]);
    }
    return n;
}

/* out = sorted a and sorted b merged, in order (a page in both once);
 * returns how many. */
static inline int64_t us_sorted_merge(const int64_t *a, int64_t na, const int64_t *b, int64_t nb, int64_t *out)
{
    int64_t i = 0, j = 0, n = 0;
    while (i < na && j < nb) {
        int64_t x = a[i], y = b[j];
        out[n++] = x <= y ? x : y;
        i += x <= y;
        j += y <= x;
    }
    while (i < na)
        out[n++] = a[i++];
    while (j < nb)
        out[n++] = b[j++];
    return n;
}

#endif

/* The second half of every swap-in, written once: verify the pages a store
 * read put in a buffer and map the ones that pass into the client.
 *
 * Callers, one per data path, each after its own store read into `buf`:
 *   - the C I/O pool's READ_COPY jobs (iopool.c run_job),
 *   - the fault threads' one-page loads (fastpath.c fp_run),
 *   - the Python pool's loads, through the uffd cffi module
 *     (uswap/daemon/readmap.py read_verify_map: the store's read is Python
 *     there, the fault injector's or an nfs:// store's own context).
 *
 * Invariant 6, page by page: a page whose checksum does not match
 * `expected` is never mapped, and does not hold back its neighbours: every
 * run of passing pages is mapped with one UFFDIO_COPY. The caller sees
 * which pages failed (sums != expected) and reads only those again.
 *
 * Modes: the run is mapped with `mode` (UFFDIO_COPY_MODE_WP: clean
 * write-protected copies of their slots; 0: writable, for drain and a
 * stream being rewritten), except the page at index `write_page` (when
 * 0 <= write_page < npages), which is mapped writable: the page of a write
 * fault, so its write takes no second fault while its read-ahead
 * neighbours, read with it in the same store read, stay write-protected.
 * The page goes in a COPY of its own (a COPY has one mode).
 *
 * Read-through: a read-ahead window covers pages that are not its own --
 * resident pages (clean swap-cache copies, or dirty and newer than their
 * slot), pages another load has in flight -- read through by a run of
 * adjacent slots, or (between a stream window's runs) not read at all,
 * which the engine marks in `skip` (NULL: every page is the load's).
 * Invariant: a skipped page is never mapped, whatever the bytes in the
 * buffer for it; it only splits the runs around it (the engine keeps its
 * state, swapin.py).
 *
 * A page found already present (EEXIST: written through the memfd while it
 * loaded, so it can only hold newer data) is kept, its waiters woken, and
 * counted in *present. A run whose COPY stops part way is finished page by
 * page. No lock, no page state: the caller applies the outcome. */
#ifndef USWAP_READMAP_H
#define USWAP_READMAP_H
#include <errno.h>
#include <stdint.h>
#include <sys/ioctl.h>
#include <linux/userfaultfd.h>
#include "pagesum.h"
#include "uffd_copy.h"

#ifndef UFFDIO_COPY_MODE_WP
#define UFFDIO_COPY_MODE_WP ((__u64)1 << 1)
#endif

/* cdef: begin */
/* write_page for a load with no write fault in it. */
#define US_NO_WRITE_PAGE -1

static int64_t us_verify_map(int uffd, uint64_t dst, uint64_t buf, uint64_t npages, uint64_t mode,
                             int64_t write_page, const uint32_t *expected, uint32_t *sums,
                             const uint8_t *skip, int32_t *present);
/* cdef: end */

/* Map the verified run [from, from + len) of buf at dst + from with one COPY;
 * if a page of it is present already or the COPY stopped part way, the rest
 * goes page by page, keeping and waking the present pages. len, or the
 * -errno of the page that could not be mapped (the caller maps the run again
 * later: the pages mapped so far are then present and kept). */
static int64_t us_map_run(int uffd, uint64_t dst, uint64_t buf, uint64_t len, uint64_t mode, int32_t *present)
{
    int64_t r = us_uffd_copy(uffd, dst, buf, len, mode);
    if (r != -EEXIST && !(r >= 0 && (uint64_t)r < len))
        return r;
    for (uint64_t p = r >= 0 ? (uint64_t)r & ~4095ull : 0; p < len; p += 4096) {
        r = us_uffd_copy(uffd, dst + p, buf + p, 4096, mode);
        if (r == -EEXIST) {
            struct uffdio_range range = { .start = dst + p, .len = 4096 };
            ioctl(uffd, UFFDIO_WAKE, &range);
            (*present)++;
        } else if (r < 0) {
            return r;
        }
    }
    return (int64_t)len;
}

/* Checksum the npages pages read into buf (every sum left in sums), then map
 * at dst each run of pages that passed and share a mode (see the top of this
 * file). Returns the bytes mapped -- the passing pages', present ones
 * included: npages * 4096 when every page passed and none was skipped --
 * or the -errno of a COPY that failed; *present counts the pages found present and kept. */
static int64_t us_verify_map(int uffd, uint64_t dst, uint64_t buf, uint64_t npages, uint64_t mode,
                             int64_t write_page, const uint32_t *expected, uint32_t *sums,
                             const uint8_t *skip, int32_t *present)
{
    *present = 0;
    us_page_sums(buf, npages, sums, NULL);
    /* A run mapped writable anyway needs no COPY of its own for the page. */
    int64_t wp = (mode & UFFDIO_COPY_MODE_WP) ? write_page : US_NO_WRITE_PAGE;
    int64_t mapped = 0;
    for (uint64_t i = 0; i < npages;) {
        /* Never mapped: a page read through (not the load's, see the top),
         * or one that failed its check (invariant 6). */
        if ((skip && skip[i]) || sums[i] != expected[i]) {
            i++;
            continue;
        }
        int writable = (int64_t)i == wp;
        uint64_t end = i + 1;
        while (!writable && end < npages && !(skip && skip[end]) && sums[end] == expected[end]
               && (int64_t)end != wp)
            end++;
        uint64_t run_mode = writable ? mode & ~(uint64_t)UFFDIO_COPY_MODE_WP : mode;
        int64_t r = us_map_run(uffd, dst + i * 4096, buf + i * 4096, (end - i) * 4096, run_mode, present);
        if (r < 0)
            return r;
        mapped += r;
        i = end;
    }
    return mapped;
}

#endif

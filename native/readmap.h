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
 * A page found already present (EEXIST) was not put there by the client
 * through its own mapping (a LOADING page is a hole there, and a fault on it
 * waits for this load): something wrote or read the memfd directly -- a
 * write(2) to it, or a reader of the daemon's own mapping (/proc/PID/mem, a
 * debugger), whose read of the hole planted a page of zeros. The store copy
 * wins, as for a page that appears while SWAPPED (faults.py _stray_page;
 * README "Known limits"): the verified bytes are copied over it through the
 * daemon's mapping of the same pages (`view`: present, so the copy allocates
 * nothing -- invariant 8 -- unless the client punches the page between the
 * EEXIST and the copy: the page then holds the verified store copy again,
 * charged as a LOADING page is; never pwrite(2), which takes the memfd's inode
 * lock that a client's write(2) holds while its fault waits for this very
 * load, section 3 of docs/design.md) and then mapped with UFFDIO_CONTINUE in
 * the mode the COPY had (write-protected, or writable for the write page).
 * Counted in *present. A page the client already has mapped (CONTINUE says
 * EEXIST) is left as it is: only this load maps a LOADING page, and a load
 * retried after a COPY stopped part way maps again only the pages the first
 * attempt had not (`mapped`, swapin.py _load_done), so that cannot happen.
 *
 * `mapped` (NULL: not wanted) gets 1 for each page mapped by this call and 0
 * for the others, so that a caller whose COPY failed part way knows which
 * pages are in the client already. A run whose COPY stops part way is
 * finished page by page. No lock, no page state: the caller applies the
 * outcome. */
#ifndef USWAP_READMAP_H
#define USWAP_READMAP_H
#include <errno.h>
#include <stdint.h>
#include <string.h>
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

static int64_t us_verify_map(int uffd, uint64_t dst, uint64_t view, uint64_t buf, uint64_t npages,
                             uint64_t mode, int64_t write_page, const uint32_t *expected, uint32_t *sums,
                             const uint8_t *skip, uint8_t *mapped, int32_t *present);
/* cdef: end */

/* The store copy wins over a page found present (see the top of this file):
 * the verified page at src copied over it through the daemon's mapping
 * (`view`), then mapped at dst by CONTINUE in the COPY's mode. 4096, or the
 * -errno of the CONTINUE (EAGAIN: the client's mappings are changing; EFAULT:
 * the page left the memfd between the two, which only the client's own punch
 * does; the caller maps it again later). */
static int64_t us_replace_present(int uffd, uint64_t dst, uint64_t view, uint64_t src, uint64_t mode)
{
    memcpy((void *)(uintptr_t)view, (const void *)(uintptr_t)src, 4096);
    struct uffdio_continue c = { .range = { dst, 4096 },
                                 .mode = (mode & UFFDIO_COPY_MODE_WP) ? UFFDIO_CONTINUE_MODE_WP : 0 };
    if (ioctl(uffd, UFFDIO_CONTINUE, &c) == 0)
        return 4096;
    if (errno != EEXIST)
        return -errno;
    /* Mapped in the client already (cannot be, see the top): its faults woken. */
    ioctl(uffd, UFFDIO_WAKE, &c.range);
    return 4096;
}

/* Map the verified run [from, from + len) of buf at dst + from with one COPY;
 * if a page of it is present already or the COPY stopped part way, the rest
 * goes page by page, the present pages replaced by their verified copies
 * (us_replace_present). Each page mapped is marked in `mapped` (if not
 * NULL). len, or the -errno of the page that could not be mapped (the caller
 * maps the pages not marked again later). */
static int64_t us_map_run(int uffd, uint64_t dst, uint64_t view, uint64_t buf, uint64_t len, uint64_t mode,
                          uint8_t *mapped, int32_t *present)
{
    int64_t r = us_uffd_copy(uffd, dst, buf, len, mode);
    if (r != -EEXIST && !(r >= 0 && (uint64_t)r < len)) {
        if (r >= 0 && mapped)
            memset(mapped, 1, len / 4096);
        return r;
    }
    uint64_t p = r >= 0 ? (uint64_t)r & ~4095ull : 0;
    if (mapped)
        memset(mapped, 1, p / 4096);
    for (; p < len; p += 4096) {
        r = us_uffd_copy(uffd, dst + p, buf + p, 4096, mode);
        if (r == -EEXIST) {
            r = us_replace_present(uffd, dst + p, view + p, buf + p, mode);
            if (r >= 0)
                (*present)++;
        }
        if (r < 0)
            return r;
        if (mapped)
            mapped[p / 4096] = 1;
    }
    return (int64_t)len;
}

/* Checksum the npages pages read into buf (every sum left in sums), then map
 * at dst (the daemon's mapping of the same pages at view) each run of pages
 * that passed and share a mode (see the top of this file). Returns the bytes
 * mapped -- the passing pages', present ones included: npages * 4096 when
 * every page passed and none was skipped -- or the -errno of a COPY that
 * failed; *present counts the pages found present and replaced by their
 * store copies; mapped[i] (if not NULL) says whether page i was mapped. */
static int64_t us_verify_map(int uffd, uint64_t dst, uint64_t view, uint64_t buf, uint64_t npages,
                             uint64_t mode, int64_t write_page, const uint32_t *expected, uint32_t *sums,
                             const uint8_t *skip, uint8_t *mapped, int32_t *present)
{
    *present = 0;
    if (mapped)
        memset(mapped, 0, npages);
    us_page_sums(buf, npages, sums, NULL);
    /* A run mapped writable anyway needs no COPY of its own for the page. */
    int64_t wp = (mode & UFFDIO_COPY_MODE_WP) ? write_page : US_NO_WRITE_PAGE;
    int64_t bytes = 0;
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
        int64_t r = us_map_run(uffd, dst + i * 4096, view + i * 4096, buf + i * 4096, (end - i) * 4096, run_mode,
                               mapped ? mapped + i : NULL, present);
        if (r < 0)
            return r;
        bytes += r;
        i = end;
    }
    return bytes;
}

#endif

/* Holding a memfd's pages in a pipe while the access sampler takes them out
 * of a client's page tables (uswap/daemon/sampling.py, through the uffd cffi
 * module): with kernel swap on, MADV_PAGEOUT would write a shmem page out to
 * it unless something else holds a reference on the page.
 *
 * How: splice(2) from the memfd, one call per run of pages. shmem's
 * splice_read hands the pipe the page cache pages themselves (a reference
 * each, no copy; a hole is the zero page, which nothing evicts), and maps
 * them nowhere. Not from the memfd fd the daemon was given, though: that
 * open file is the client's too (sent over the socket), and the client can
 * set O_DIRECT on it (a memfd reopened through /proc/self/fd may have it,
 * and F_SETFL can set it there at any time), with which a splice copies the
 * pages into new ones (vfs_splice_read: copy_splice_read) and holds nothing.
 * So each call splices from an open file of its own, opened from the memfd
 * through /proc/self/fd with flags only the daemon sets (the open and close:
 * about 1.5 us of CPU a call, for up to a pipe's worth of pages).
 *
 * The hold was a vmsplice of the daemon's own mapping of the pages before:
 * that faults every page into the daemon's page tables
 * (get_user_pages) only for the next step, MADV_DONTNEED of that mapping, to
 * unmap them again with a TLB flush: the vmsplice and that MADV_DONTNEED were
 * 17% of the engine thread's samples on a 1 GiB first-touch stream, the
 * splice and the MADV_DONTNEED are about 11% (py-spy,
 * scripts/profile_daemon.py touch --size 1G; issue 14). The loop is here, not in
 * Python: scattered pages are a run each (issue 14, mt-mix: ~2.5 us of
 * Python per scattered sampled page when it was a Python loop per run).
 *
 * The caller sizes the pipe for the pages (the pipe is non-blocking: a full
 * pipe stops the hold short, never blocks the engine) and empties it once
 * the pages are out of the client's page tables. */
#ifndef USWAP_PAGEHOLD_H
#define USWAP_PAGEHOLD_H
#ifndef _GNU_SOURCE
#define _GNU_SOURCE
#endif
#include <errno.h>
#include <fcntl.h>
#include <stdint.h>
#include <stdio.h>
#include <unistd.h>

/* cdef: begin */
static int64_t us_hold_runs(int memfd, int pipe_w, const int64_t *firsts, const int64_t *counts, int64_t nruns,
                            int64_t page_size);
/* cdef: end */

/* Splice runs [firsts[i], firsts[i] + counts[i]) of pages of `memfd` into
 * `pipe_w`, in order. Returns the bytes now in the pipe from this call (all
 * of the runs' bytes when every page is held; fewer when it stopped: the
 * caller must still empty what was spliced), or -errno when the memfd could
 * not be opened again or the first splice failed, with nothing held. */
static int64_t us_hold_runs(int memfd, int pipe_w, const int64_t *firsts, const int64_t *counts, int64_t nruns,
                            int64_t page_size)
{
    char path[32];
    snprintf(path, sizeof path, "/proc/self/fd/%d", memfd);
    int src = open(path, O_RDONLY | O_CLOEXEC); /* never O_DIRECT: see the top */
    if (src < 0)
        return -errno;
    int64_t held = 0;
    int err = 0;
    for (int64_t i = 0; i < nruns && !err; i++) {
        loff_t off = (loff_t)(firsts[i] * page_size);
        int64_t left = counts[i] * page_size;
        while (left > 0) {
            ssize_t n = splice(src, &off, pipe_w, NULL, (size_t)left, SPLICE_F_NONBLOCK);
            if (n <= 0) {
                err = n < 0 ? errno : -1;
                break;
            }
            held += n;
            left -= n;
        }
    }
    close(src);
    return held || err <= 0 ? held : -err;
}

#endif

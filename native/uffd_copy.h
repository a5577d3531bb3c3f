/* userfaultfd helpers shared by the uffd shim (uffd.c), the C I/O pool
 * (iopool.c) and the fault fast path (fastpath.c): UFFDIO_COPY that copes
 * with a range split into several VMAs, and reading messages without ever
 * blocking. */
#ifndef USWAP_UFFD_COPY_H
#define USWAP_UFFD_COPY_H
#include <errno.h>
#include <fcntl.h>
#include <stdint.h>
#include <sys/ioctl.h>
#include <sys/uio.h>
#include <unistd.h>
#include <linux/userfaultfd.h>

#ifndef RWF_NOWAIT
#define RWF_NOWAIT 0x00000008
#endif
#ifndef UFFDIO_CONTINUE_MODE_WP
#define UFFDIO_CONTINUE_MODE_WP ((__u64)1 << 1)
#endif

/* The `src` that makes us_uffd_copy map zeros with UFFDIO_ZEROPAGE
 * instead of copying (us_uffd_zero_fill says when). */
#define US_UFFD_ZEROS ((uint64_t)0)

/* One COPY of len bytes, retrying EAGAIN (a racing mapping change) for the
 * part not yet copied while it makes progress. Returns bytes copied (len, or
 * fewer when it stopped part way) or -errno when nothing was copied. */
static int64_t us_uffd_copy_range(int fd, uint64_t dst, uint64_t src, uint64_t len, uint64_t mode)
{
    uint64_t done = 0;
    for (int tries = 0; done < len && tries < 1000; tries++) {
        int64_t progress;
        int ok;
        if (src == US_UFFD_ZEROS) {
            struct uffdio_zeropage z = { .range = { dst + done, len - done }, .mode = mode };
            ok = ioctl(fd, UFFDIO_ZEROPAGE, &z) == 0;
            progress = z.zeropage;
        } else {
            struct uffdio_copy c = { .dst = dst + done, .src = src + done, .len = len - done, .mode = mode };
            ok = ioctl(fd, UFFDIO_COPY, &c) == 0;
            progress = c.copy;
        }
        if (ok)
            return (int64_t)len;
        int err = errno;
        if (progress > 0)
            done += (uint64_t)progress;
        /* EAGAIN with no progress: the address space is changing and an
         * event waits in the uffd; only the caller can read it, so give up
         * now. Any other error ends the COPY where it stopped. */
        if (err != EAGAIN || progress <= 0)
            return done ? (int64_t)done : -err;
    }
    return (int64_t)done;
}

/* COPY len bytes from src to dst. Returns bytes copied from the front: len,
 * fewer when it stopped part way (the pages before dst + result are mapped;
 * the caller learns why the next one was not by copying it alone), or -errno
 * when not even the first page was mapped. EEXIST (a page already present)
 * is returned as -EEXIST, or as a short count after earlier pages, so the
 * caller decides.
 *
 * A multi-page COPY whose range crosses a VMA boundary fails with ENOENT
 * and maps nothing, although every page of it is registered: the client's
 * mprotect, mlock or madvise on part of a region splits its VMA. Page by
 * page it works, so that is the fallback. (A single page that fails ENOENT
 * really is not registered with this uffd: its caller checks whether the
 * client is gone.) */
static int64_t us_uffd_copy(int fd, uint64_t dst, uint64_t src, uint64_t len, uint64_t mode)
{
    int64_t r = us_uffd_copy_range(fd, dst, src, len, mode);
    if (r != -ENOENT || len <= 4096)
        return r;
    uint64_t done = 0;
    while (done < len) {
        r = us_uffd_copy_range(fd, dst + done, src == US_UFFD_ZEROS ? src : src + done, 4096, mode);
        if (r < 4096)
            return done ? (int64_t)done : r;
        done += 4096;
    }
    return (int64_t)done;
}

/* Map len bytes of zeros at dst: writable (a write fault's first touch),
 * or write-protected (a read fault's clean zeros). The rule of every zero
 * fill, the fault threads' (fastpath.c) and the engine's (faults.py).
 *
 * Writable: UFFDIO_ZEROPAGE, which on shmem (every region is a memfd)
 * allocates the page and clears it; a COPY from a page of zeros reads the
 * source too, and copy_from_user was the fault threads' largest cost on a
 * first-touch stream (perf record -a: 16% of all samples; the stream's
 * MiB/s rose by a third without it). ZEROPAGE has no write-protect mode,
 * so a write-protected fill still copies from `zeros`, a buffer of zeros at
 * least len bytes long. Returns as us_uffd_copy. */
static int64_t us_uffd_zero_fill(int fd, uint64_t dst, uint64_t len, uint64_t zeros, int write_protect)
{
    if (!write_protect)
        return us_uffd_copy(fd, dst, US_UFFD_ZEROS, len, 0);
    return us_uffd_copy(fd, dst, zeros, len, UFFDIO_COPY_MODE_WP);
}

/* Read up to max whole messages from a uffd, never blocking: returns the
 * count, 0 when none is pending, or -errno.
 *
 * Why not a plain read(): O_NONBLOCK is a flag of the open file, which the
 * client shares (it passed us its uffd) and can clear with fcntl(). A
 * blocking read() on the fault path would then sleep until that client's
 * next event -- in the engine or holding the page lock, every client would
 * hang. RWF_NOWAIT makes this one read non-blocking whatever the file's
 * flags say (the uffd has honoured it since it got ->read_iter, 6.10).
 * Kernels without it refuse RWF_NOWAIT (EOPNOTSUPP); there the file's flag
 * is checked just before a plain read(), and a cleared flag is refused as
 * -EPROTO, a protocol violation of that region (which leaves a narrow race:
 * a flag cleared between the check and the read blocks that reader until
 * the region's next event). */
static int us_uffd_read_nowait(int fd, struct uffd_msg *msgs, int max)
{
    struct iovec iov = { .iov_base = msgs, .iov_len = sizeof(*msgs) * (size_t)max };
    for (;;) {
        ssize_t r = preadv2(fd, &iov, 1, -1, RWF_NOWAIT);
        if (r < 0 && errno == EOPNOTSUPP) {
            int fl = fcntl(fd, F_GETFL);
            if (fl < 0)
                return -errno;
            if (!(fl & O_NONBLOCK))
                return -EPROTO;
            r = read(fd, msgs, sizeof(*msgs) * (size_t)max);
        }
        if (r >= 0)
            return (int)(r / (ssize_t)sizeof(*msgs));
        if (errno == EAGAIN || errno == EWOULDBLOCK)
            return 0;
        if (errno != EINTR)
            return -errno;
    }
}

#endif

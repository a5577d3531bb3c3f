/* UFFDIO_COPY with EAGAIN retry, shared by the uffd shim and the C I/O pool. */
#ifndef USWAP_UFFD_COPY_H
#define USWAP_UFFD_COPY_H
#include <errno.h>
#include <stdint.h>
#include <sys/ioctl.h>
#include <linux/userfaultfd.h>

/* COPY len bytes from src to dst, retrying EAGAIN (a racing mapping change)
 * for the part not yet copied. Returns bytes copied, or -errno. EEXIST is
 * returned as -EEXIST so the caller can decide (usually: success). */
static int64_t us_uffd_copy(int fd, uint64_t dst, uint64_t src, uint64_t len, uint64_t mode)
{
    uint64_t done = 0;
    for (int tries = 0; done < len && tries < 1000; tries++) {
        struct uffdio_copy c = { .dst = dst + done, .src = src + done, .len = len - done, .mode = mode };
        if (ioctl(fd, UFFDIO_COPY, &c) == 0)
            return (int64_t)len;
        int err = errno;
        if (c.copy > 0)
            done += (uint64_t)c.copy;
        if (err != EAGAIN)
            return -err;
        /* EAGAIN with no progress: the address space is changing and an event
         * waits in the uffd; only the caller can read it, so give up now. */
        if (c.copy <= 0)
            return done ? (int64_t)done : -EAGAIN;
    }
    return (int64_t)done;
}

#endif

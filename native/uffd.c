/* userfaultfd syscalls for uswap: one function per ioctl, and the rules that
 * wrap one (a range split into VMAs done page by page; a page list's runs,
 * us_uffd_writeprotect_pages).
 *
 * Every function returns >= 0 on success and -errno on failure; results that
 * can be negative (uffdio_copy.copy and friends) are passed through signed.
 * Debian 12 ships 6.1-era headers, so newer constants are defined here. */
#ifndef _GNU_SOURCE
#define _GNU_SOURCE
#endif
#include <errno.h>
#include <fcntl.h>
#include <stdint.h>
#include <string.h>
#include <sys/ioctl.h>
#include <sys/syscall.h>
#include <unistd.h>
#include <linux/userfaultfd.h>
#include "uffd_copy.h"
#include "uffd.h"
#include "readmap.h" /* us_verify_map, for the Python pool's swap-ins (uswap/daemon/readmap.py) */
#include "pagehold.h" /* us_hold_runs, for the access sampler (uswap/daemon/sampling.py) */

#ifndef UFFD_USER_MODE_ONLY
#define UFFD_USER_MODE_ONLY 1
#endif
#ifndef USERFAULTFD_IOC_NEW
#define USERFAULTFD_IOC_NEW _IO(0xAA, 0x00)
#endif
#ifndef _UFFDIO_POISON
#define _UFFDIO_POISON (0x08)
struct uffdio_poison {
    struct uffdio_range range;
    __u64 mode;
    __s64 updated;
};
#define UFFDIO_POISON _IOWR(UFFDIO, _UFFDIO_POISON, struct uffdio_poison)
#endif

/* Open a userfaultfd: the syscall first, then /dev/userfaultfd (which lets a
 * non-root user with access to the device handle kernel-mode faults). */
static int us_uffd_open(int user_mode_only)
{
    int flags = O_CLOEXEC | O_NONBLOCK | (user_mode_only ? UFFD_USER_MODE_ONLY : 0);
    int fd = (int)syscall(SYS_userfaultfd, flags);
    if (fd >= 0)
        return fd;
    int err = errno;
    int dev = open("/dev/userfaultfd", O_RDWR | O_CLOEXEC);
    if (dev < 0)
        return -err;
    fd = ioctl(dev, USERFAULTFD_IOC_NEW, O_CLOEXEC | O_NONBLOCK);
    err = errno;
    close(dev);
    return fd >= 0 ? fd : -err;
}

static int us_uffd_api(int fd, uint64_t features, uint64_t *out_features, uint64_t *out_ioctls)
{
    struct uffdio_api api = { .api = UFFD_API, .features = features };
    if (ioctl(fd, UFFDIO_API, &api) < 0)
        return -errno;
    *out_features = api.features;
    *out_ioctls = api.ioctls;
    return 0;
}

static int us_uffd_register(int fd, uint64_t start, uint64_t len, uint64_t mode, uint64_t *out_ioctls)
{
    struct uffdio_register reg = { .range = { start, len }, .mode = mode };
    if (ioctl(fd, UFFDIO_REGISTER, &reg) < 0)
        return -errno;
    *out_ioctls = reg.ioctls;
    return 0;
}

static int us_uffd_unregister(int fd, uint64_t start, uint64_t len)
{
    struct uffdio_range r = { start, len };
    return ioctl(fd, UFFDIO_UNREGISTER, &r) < 0 ? -errno : 0;
}

static int64_t us_uffd_continue_range(int fd, uint64_t start, uint64_t len, uint64_t mode)
{
    uint64_t done = 0;
    for (int tries = 0; done < len && tries < 1000; tries++) {
        struct uffdio_continue c = { .range = { start + done, len - done }, .mode = mode };
        if (ioctl(fd, UFFDIO_CONTINUE, &c) == 0)
            return (int64_t)len;
        int err = errno;
        if (c.mapped > 0)
            done += (uint64_t)c.mapped;
        if (err != EAGAIN || c.mapped <= 0)
            return done ? (int64_t)done : -err;
    }
    return (int64_t)done;
}

/* CONTINUE: bytes mapped from the front, or -errno when none was. Like
 * us_uffd_copy (uffd_copy.h), a range across a VMA boundary fails ENOENT
 * as a whole and is done page by page instead. */
static int64_t us_uffd_continue(int fd, uint64_t start, uint64_t len, uint64_t mode)
{
    int64_t r = us_uffd_continue_range(fd, start, len, mode);
    if (r != -ENOENT || len <= 4096)
        return r;
    uint64_t done = 0;
    while (done < len) {
        r = us_uffd_continue_range(fd, start + done, 4096, mode);
        if (r < 4096)
            return done ? (int64_t)done : r;
        done += 4096;
    }
    return (int64_t)done;
}

/* One UFFDIO_WRITEPROTECT of [start, start + len): 0 or -errno. EAGAIN (the
 * address space is changing, an event is pending) is returned to the caller,
 * who must read that event before trying again. */
static int us_uffd_wp_ioctl(int fd, uint64_t start, uint64_t len, uint64_t mode)
{
    struct uffdio_writeprotect w = { .range = { start, len }, .mode = mode };
    return ioctl(fd, UFFDIO_WRITEPROTECT, &w) < 0 ? -errno : 0;
}

/* Write-protect (mode UFFDIO_WRITEPROTECT_MODE_WP) or un-protect len bytes
 * at start: 0, or the -errno of the first page that failed, *done the bytes
 * from the front done before it. The one place of the ENOENT rule: a
 * multi-page range that fails ENOENT is done again page by page (a range the
 * client split into several VMAs, or part of which it unregistered or
 * remapped, fails as a whole on some kernels; page by page, the registered
 * pages before the one that fails are done and that page's error is
 * returned). A single page that fails ENOENT really is not registered with
 * this uffd; its caller checks whether the client is gone. */
static int us_uffd_wp_range(int fd, uint64_t start, uint64_t len, uint64_t mode, uint64_t *done)
{
    *done = 0;
    int r = us_uffd_wp_ioctl(fd, start, len, mode);
    if (r == 0)
        *done = len;
    if (r != -ENOENT || len <= 4096)
        return r;
    for (uint64_t off = 0; off < len; off += 4096) {
        r = us_uffd_wp_ioctl(fd, start + off, 4096, mode);
        if (r < 0)
            return r;
        *done = off + 4096;
    }
    return 0;
}

/* One range, as us_uffd_wp_range: 0 or the -errno of the first page that failed. */
static int us_uffd_writeprotect(int fd, uint64_t start, uint64_t len, uint64_t mode)
{
    uint64_t done;
    return us_uffd_wp_range(fd, start, len, mode, &done);
}

/* Write-protect (or un-protect, as mode says) the pages of a region at
 * `base` whose indices are pages[0..n) (sorted ascending, distinct): each
 * run of consecutive indices is one range, us_uffd_wp_range's (one ioctl,
 * or page by page after ENOENT). Stops at the first page that fails.
 * Returns how many of pages[] were done, from the front (n: all), and sets
 * *err to 0, or to the errno of pages[returned value] when it stopped.
 *
 * Only the given pages: a gap between two runs is never covered, although
 * one ioctl over the span would be cheaper. It would write-protect dirty
 * pages the daemon holds writable, and put uffd-wp markers on the none
 * ptes of pages not in the client's page tables (page tables allocated
 * for a sparse range, a bit pagemap readers see) -- docs/design.md 6.3.
 *
 * Why in C: start_writeback protects a gathered write's scattered pages
 * one run each, and with random writes the runs are single pages; a
 * Python call per run cost the engine thread, which holds the page lock,
 * most of a batch's time (docs/design.md 6.3 has the numbers). */
static int64_t us_uffd_writeprotect_pages(int fd, uint64_t base, const int64_t *pages, int64_t n,
                                          uint64_t mode, int *err)
{
    *err = 0;
    int64_t i = 0;
    while (i < n) {
        int64_t j = i + 1;
        while (j < n && pages[j] == pages[j - 1] + 1)
            j++;
        uint64_t done;
        int r = us_uffd_wp_range(fd, base + ((uint64_t)pages[i] << 12), (uint64_t)(j - i) << 12, mode, &done);
        if (r < 0) {
            *err = -r;
            return i + (int64_t)(done >> 12);
        }
        i = j;
    }
    return n;
}

static int us_uffd_wake(int fd, uint64_t start, uint64_t len)
{
    struct uffdio_range r = { start, len };
    return ioctl(fd, UFFDIO_WAKE, &r) < 0 ? -errno : 0;
}

static int64_t us_uffd_poison(int fd, uint64_t start, uint64_t len, uint64_t mode)
{
    struct uffdio_poison p = { .range = { start, len }, .mode = mode };
    if (ioctl(fd, UFFDIO_POISON, &p) < 0)
        return -errno;
    return p.updated;
}

/* Read up to max events without blocking, whatever the uffd's O_NONBLOCK
 * flag says (the client can clear it: us_uffd_read_nowait). Returns the
 * count (0 when none are pending) or -errno (-EPROTO: the client cleared
 * O_NONBLOCK on a kernel that cannot read without it). */
static int us_uffd_read_events(int fd, struct us_event *out, int max)
{
    struct uffd_msg msgs[64];
    int n = 0;
    while (n < max) {
        int want = max - n < 64 ? max - n : 64;
        int got = us_uffd_read_nowait(fd, msgs, want);
        if (got < 0)
            return n > 0 ? n : got;
        for (int i = 0; i < got; i++) {
            struct us_event *e = &out[n++];
            memset(e, 0, sizeof(*e));
            e->kind = msgs[i].event;
            switch (msgs[i].event) {
            case UFFD_EVENT_PAGEFAULT:
                e->flags = msgs[i].arg.pagefault.flags;
                e->addr = msgs[i].arg.pagefault.address;
                e->tid = msgs[i].arg.pagefault.feat.ptid;
                break;
            case UFFD_EVENT_REMOVE:
            case UFFD_EVENT_UNMAP:
                e->addr = msgs[i].arg.remove.start;
                e->end = msgs[i].arg.remove.end;
                break;
            case UFFD_EVENT_REMAP:
                e->addr = msgs[i].arg.remap.from;
                e->end = msgs[i].arg.remap.to;
                break;
            default:
                break;
            }
        }
        if (got < want)
            break;
    }
    return n;
}

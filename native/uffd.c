/* userfaultfd syscalls for uswap: one function per ioctl, nothing more.
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

static int us_uffd_writeprotect(int fd, uint64_t start, uint64_t len, uint64_t mode)
{
    /* EAGAIN (the address space is changing, an event is pending) is returned
     * to the caller, who must read that event before trying again. */
    struct uffdio_writeprotect w = { .range = { start, len }, .mode = mode };
    return ioctl(fd, UFFDIO_WRITEPROTECT, &w) < 0 ? -errno : 0;
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

/* libuswap-preload.so: `uswap exec` loads it (LD_PRELOAD) into an unmodified
 * program so that the program's private anonymous mappings of at least
 * USWAP_EXEC_MIN_SIZE bytes are uswap regions (libuswap), with the
 * semantics of anonymous memory kept:
 *
 *   mmap      MAP_PRIVATE|MAP_ANONYMOUS, not PROT_NONE, not a stack or huge
 *             pages: a new region (zero on first touch). MAP_FIXED anonymous
 *             over part of a region: that part is discarded (zeros again)
 *             and given the asked protection. Any other MAP_FIXED over a
 *             region takes that part from it for real, once the kernel
 *             made it (one it refuses leaves the region as it was).
 *   munmap    part of a region: its pages are discarded and the range kept
 *             reserved (PROT_NONE) until the whole region is unmapped, so a
 *             region is one range for the daemon, which a fork needs; the
 *             whole region: freed. A part a foreign mapping took is
 *             unmapped for real, as the kernel would.
 *   mremap    shrink: the tail unmapped as above; grow in place over the
 *             region's own unmapped tail; move: a new region, the contents
 *             copied, the old one unmapped.
 *   madvise   MADV_DONTNEED, MADV_FREE, MADV_REMOVE: the `discard` op
 *             (zeros on the next touch, memory and slots freed); the fork
 *             advice (DOFORK, WIPEONFORK) is ignored on regions (a region is
 *             DONTFORK and its child gets it through the fork requests);
 *             the rest is passed on.
 *   mprotect, mlock: not interposed; they work on any part of a region.
 *   fork      (pthread_atfork) the fork requests of docs/protocol.md: the
 *             child gets its own copy of every region at the same address
 *             (of a region split by foreign mappings, the parts they did
 *             not take; the child inherits those mappings from the kernel).
 *   exec, exit: the connection's close releases every region.
 *
 * Never recursing: every mapping call made here is a raw system call, as
 * libuswap's are, and a thread already inside passes straight through.
 * Thread safety: one mutex over the table of regions; libuswap's connection
 * has its own. When the daemon is unreachable or refuses, memory is
 * ordinary memory and one warning line is printed.
 */
#define _GNU_SOURCE
#include <dlfcn.h>
#include <errno.h>
#include <fcntl.h>
#include <linux/userfaultfd.h>
#include <pthread.h>
#include <stdarg.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/ioctl.h>
#include <sys/mman.h>
#include <sys/syscall.h>
#include <unistd.h>

#include "libuswap_internal.h"
#include "uswap.h"

#define EXPORT __attribute__((visibility("default")))
#define PAGE 4096UL
#define MAX_REGIONS 1024           /* the daemon's default max_regions_per_client */
#define MAX_PROTS 4096
#ifndef MAP_FIXED_NOREPLACE
#define MAP_FIXED_NOREPLACE 0x100000
#endif
#ifndef MADV_DONTNEED_LOCKED
#define MADV_DONTNEED_LOCKED 24
#endif

struct xregion {
    uswap_region r;
    uint64_t *live;   /* one bit a page: mapped as far as the program knows */
    uint64_t *taken;  /* one bit a page: a foreign MAP_FIXED mapping replaced it */
    size_t nlive;
    int split;        /* some page is taken: the region is not one range any more */
};

static struct xregion regions[MAX_REGIONS];
static int nregions;
static pthread_mutex_t table_lock = PTHREAD_MUTEX_INITIALIZER;
static uswap_conn *conn;
static int active;                /* 1: regions are made; 0: ordinary memory */
static size_t min_size = 1 << 20;
static int warned;
/* The socket, read at start: a forked child reconnects before the regions
 * are mapped again, when the environment (malloc'ed, so maybe in a region)
 * may not be readable. */
static char socket_path[256];
static __thread int inside __attribute__((tls_model("initial-exec")));

/* ------------------------------------------------------------------ raw calls */

static void *sys_mmap(void *a, size_t l, int p, int f, int fd, off_t o)
{
    return (void *)syscall(SYS_mmap, a, l, p, f, fd, o);
}
static int sys_munmap(void *a, size_t l) { return (int)syscall(SYS_munmap, a, l); }
static int sys_madvise(void *a, size_t l, int adv) { return (int)syscall(SYS_madvise, a, l, adv); }
static int sys_mprotect(void *a, size_t l, int p) { return (int)syscall(SYS_mprotect, a, l, p); }
static void *sys_mremap(void *o, size_t os, size_t ns, int f, void *n)
{
    return (void *)syscall(SYS_mremap, o, os, ns, f, n);
}

/* One line on stderr, made without malloc. */
static void say(const char *fmt, ...)
{
    char buf[600];
    va_list ap;
    va_start(ap, fmt);
    int n = uswap__vformat(buf, sizeof buf - 1, fmt, ap);
    va_end(ap);
    if (n < 0)
        return;
    if (n > (int)sizeof buf - 2)
        n = (int)sizeof buf - 2;
    buf[n++] = '\n';
    int saved = errno;
    ssize_t w = write(2, buf, (size_t)n);
    (void)w;
    errno = saved;
}

/* The one warning of a program that runs on ordinary memory (all or part). */
static void fall_back(const char *why)
{
    if (!__atomic_exchange_n(&warned, 1, __ATOMIC_RELAXED))
        say("uswap exec: %s; running on ordinary memory", why);
}

/* ------------------------------------------------------------------ the table (table_lock held) */

static size_t pages_of(size_t len) { return (len + PAGE - 1) / PAGE; }

static struct xregion *find(uintptr_t addr)
{
    for (int i = 0; i < nregions; i++) {
        uintptr_t a = (uintptr_t)regions[i].r.addr;
        if (addr >= a && addr < a + regions[i].r.size)
            return &regions[i];
    }
    return NULL;
}

/* The region with the lowest start in [lo, hi), or NULL. */
static struct xregion *first_from(uintptr_t lo, uintptr_t hi)
{
    struct xregion *best = NULL;
    for (int i = 0; i < nregions; i++) {
        uintptr_t a = (uintptr_t)regions[i].r.addr;
        if (a >= lo && a < hi && (!best || a < (uintptr_t)best->r.addr))
            best = &regions[i];
    }
    return best;
}

static void set_live(struct xregion *x, size_t first, size_t n, int live)
{
    for (size_t p = first; p < first + n; p++) {
        uint64_t bit = 1ULL << (p & 63);
        int was = (x->live[p >> 6] & bit) != 0;
        if (was == live)
            continue;
        x->live[p >> 6] ^= bit;
        x->nlive += live ? 1 : (size_t)-1;
    }
}

static int all_dead(struct xregion *x, size_t first, size_t n)
{
    for (size_t p = first; p < first + n; p++)
        if (x->live[p >> 6] & (1ULL << (p & 63)))
            return 0;
    return 1;
}

static size_t bitmap_bytes(size_t size) { return (pages_of(size) + 63) / 64 * 8; }

static int is_set(const uint64_t *bits, size_t p) { return (bits[p >> 6] >> (p & 63)) & 1; }

/* The end of the run of pages from p that are all taken or all not. */
static size_t run_end(const struct xregion *x, size_t p)
{
    size_t q = p, n = pages_of(x->r.size);
    while (q < n && is_set(x->taken, q) == is_set(x->taken, p))
        q++;
    return q;
}

static void drop(struct xregion *x)
{
    sys_munmap(x->live, 2 * bitmap_bytes(x->r.size));
    *x = regions[--nregions];
}

/* The whole region is unmapped by the program: give it back. A split one
 * is unmapped run by run around the pages foreign mappings took. */
static void release(struct xregion *x)
{
    if (!x->split) {
        uswap_free(conn, &x->r);
        drop(x);
        return;
    }
    /* As uswap_free does for a whole region: each part ours is kept
     * reserved (PROT_NONE) until the daemon has dropped the region, and
     * unmapped after. */
    char *base = x->r.addr;
    size_t size = x->r.size;
    for (size_t p = 0, q; p < pages_of(size); p = q) {
        q = run_end(x, p);
        if (!is_set(x->taken, p)) {
            struct uffdio_range range = { (uintptr_t)base + p * PAGE, (q - p) * PAGE };
            ioctl(x->r.uffd, UFFDIO_UNREGISTER, &range);
            sys_mmap((void *)range.start, range.len, PROT_NONE,
                     MAP_FIXED | MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
        }
    }
    x->r.addr = NULL;   /* uswap_free: the parts are ours to unmap (below); tell the daemon, close the fds */
    x->r.size = 0;
    uswap_free(conn, &x->r);
    x->r.size = size;   /* run_end reads it */
    for (size_t p = 0, q; p < pages_of(size); p = q) {
        q = run_end(x, p);
        if (!is_set(x->taken, p))
            sys_munmap(base + p * PAGE, (q - p) * PAGE);
    }
    drop(x);
}

/* A new region over [addr, +len) (the caller reserved the range or maps
 * MAP_FIXED), or MAP_FAILED with the reason said once. */
static void *make_region(void *addr, size_t len, int prot)
{
    if (nregions >= MAX_REGIONS) {
        fall_back("more mappings than the regions a client may hold");
        return MAP_FAILED;
    }
    uint64_t *live = sys_mmap(NULL, 2 * bitmap_bytes(len), PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    if (live == MAP_FAILED)
        return MAP_FAILED;
    struct xregion *x = &regions[nregions];
    int r = uswap_alloc_at(conn, addr, len, &x->r);
    if (r != 0) {
        sys_munmap(live, 2 * bitmap_bytes(len));
        char why[560];
        uswap__format(why, sizeof why, "the uswap daemon did not take a mapping of %zu bytes: %s", len,
                 uswap_conn_error(conn));
        fall_back(why);
        return MAP_FAILED;
    }
    nregions++;
    x->live = live;
    x->taken = live + bitmap_bytes(len) / 8;
    x->nlive = 0;
    x->split = 0;
    set_live(x, 0, pages_of(len), 1);
    if (prot != (PROT_READ | PROT_WRITE))
        sys_mprotect(addr, len, prot);
    return addr;
}

/* The program unmapped [a, b) of region x (page aligned). Its pages are
 * discarded and the range kept reserved (PROT_NONE), unless `foreign`: a
 * mapping the program makes over it takes it for real. Nothing of the
 * region left mapped for the program: released. */
static void unmap_part(struct xregion *x, uintptr_t a, uintptr_t b, int foreign)
{
    uintptr_t base = (uintptr_t)x->r.addr;
    size_t first = (a - base) / PAGE, n = (b - a) / PAGE, q;
    /* Invariant: munmap removes every mapping in the range, as it does
     * without uswap. A taken page holds a foreign mapping, never the
     * region's: the program's munmap unmaps it for real there (neither
     * reserved nor left behind when the region is released). */
    for (size_t p = first; !foreign && p < first + n; p = q) {
        q = run_end(x, p) < first + n ? run_end(x, p) : first + n;
        if (is_set(x->taken, p))
            sys_munmap((void *)(base + p * PAGE), (q - p) * PAGE);
    }
    set_live(x, first, n, 0);
    if (x->nlive == 0) {   /* nothing of it is mapped for the program any more */
        release(x);
        return;
    }
    if (foreign) {
        /* The kernel unmaps these pages when the new mapping replaces them;
         * the daemon forgets them on the UNMAP event. */
        for (size_t p = first; p < first + n; p++)
            x->taken[p >> 6] |= 1ULL << (p & 63);
        x->split = 1;
        return;
    }
    for (size_t p = first; p < first + n; p = q) {
        q = run_end(x, p) < first + n ? run_end(x, p) : first + n;
        if (!is_set(x->taken, p)) {
            uswap_discard(conn, &x->r, p * PAGE, (q - p) * PAGE);
            sys_mprotect((void *)(base + p * PAGE), (q - p) * PAGE, PROT_NONE);
        }
    }
}

/* munmap semantics over [addr, +len): region parts via unmap_part, the
 * rest really unmapped (unless `foreign`: the caller maps over it next). */
static int unmap_range(uintptr_t addr, size_t len, int foreign)
{
    uintptr_t end = addr + ((len + PAGE - 1) & ~(PAGE - 1));
    uintptr_t cur = addr;
    while (cur < end) {
        struct xregion *x = find(cur);
        if (x) {
            uintptr_t stop = (uintptr_t)x->r.addr + x->r.size;
            if (stop > end)
                stop = end;
            unmap_part(x, cur, stop, foreign);
            cur = stop;
            continue;
        }
        struct xregion *next = first_from(cur, end);
        uintptr_t stop = next ? (uintptr_t)next->r.addr : end;
        if (!foreign && sys_munmap((void *)cur, stop - cur) != 0)
            return -1;
        cur = stop;
    }
    return 0;
}

static int overlaps(uintptr_t addr, size_t len)
{
    return find(addr) || first_from(addr, addr + len);
}

/* ------------------------------------------------------------------ start */

__attribute__((constructor)) static void preload_start(void)
{
    inside = 1;
    const char *min = getenv("USWAP_EXEC_MIN_SIZE");
    if (min && *min)
        min_size = strtoull(min, NULL, 10);
    if (min_size < PAGE)
        min_size = PAGE;
    const char *sock = getenv("USWAP_SOCKET");
    uswap__format(socket_path, sizeof socket_path, "%s", sock && *sock ? sock : "/run/uswap/uswap.sock");
    if (uswap_connect(socket_path, &conn) == 0) {
        active = 1;
    } else {
        fall_back(uswap_conn_error(conn));
        uswap_disconnect(conn);
        conn = NULL;
    }
    inside = 0;
}

/* ------------------------------------------------------------------ interposed calls */

static int takes(int prot, int flags, size_t len)
{
    return (flags & MAP_TYPE) == MAP_PRIVATE && (flags & MAP_ANONYMOUS) && len >= min_size && prot != PROT_NONE
           && !(flags & (MAP_STACK | MAP_GROWSDOWN | MAP_HUGETLB));
}

EXPORT void *mmap(void *addr, size_t len, int prot, int flags, int fd, off_t off)
{
    if (inside || !active || len == 0)
        return sys_mmap(addr, len, prot, flags, fd, off);
    int fixed = (flags & MAP_FIXED) != 0;
    if (!fixed && !takes(prot, flags, len))
        return sys_mmap(addr, len, prot, flags, fd, off);   /* the kernel never places it over a region */
    inside = 1;
    pthread_mutex_lock(&table_lock);
    void *ret = MAP_FAILED;
    int done = 0;
    uintptr_t a = (uintptr_t)addr;
    if (fixed && !(a & (PAGE - 1)) && overlaps(a, len)) {
        struct xregion *x = find(a);
        if (x && (flags & MAP_ANONYMOUS) && (flags & MAP_TYPE) == MAP_PRIVATE
                && a + len <= (uintptr_t)x->r.addr + x->r.size) {
            /* Fresh anonymous memory over part of a region: zeros, the asked protection. */
            uintptr_t b = a + ((len + PAGE - 1) & ~(PAGE - 1));
            uswap_discard(conn, &x->r, a - (uintptr_t)x->r.addr, b - a);
            set_live(x, (a - (uintptr_t)x->r.addr) / PAGE, (b - a) / PAGE, 1);
            sys_mprotect(addr, b - a, prot);
            ret = addr;
            done = 1;
        } else if (takes(prot, flags, len)) {
            unmap_range(a, len, 1);   /* the new region takes those parts */
        } else {
            /* A foreign mapping takes those parts only once the kernel has
             * made it. Invariant: a page is marked taken (or its region
             * released) only when the kernel really replaced it; a MAP_FIXED
             * the kernel refuses (EBADF, EACCES, ENODEV, EINVAL: checked
             * before it unmaps anything) leaves the region's pages mapped and
             * the program's data in them, and a fork snapshots them. */
            ret = sys_mmap(addr, len, prot, flags, fd, off);
            if (ret != MAP_FAILED)
                unmap_range(a, len, 1);
            done = 1;
        }
    }
    if (!done && takes(prot, flags, len)) {
        void *at = addr;
        if (!fixed) {
            /* Reserve the range where the kernel would put the mapping, then map the region over it. */
            at = sys_mmap(addr, len, PROT_NONE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE
                          | (flags & MAP_FIXED_NOREPLACE), -1, 0);
            if (at == MAP_FAILED)
                done = 1;   /* the kernel's own answer (EEXIST, ENOMEM) */
        }
        if (!done) {
            ret = make_region(at, len, prot);
            done = ret != MAP_FAILED;
            if (!done && !fixed) {
                /* Ordinary memory where the region would have been: the
                 * range is still reserved (uswap_alloc_at leaves it so). */
                ret = sys_mmap(at, len, prot, (flags & ~MAP_FIXED_NOREPLACE) | MAP_FIXED, fd, off);
                done = 1;
            }
        }
    }
    if (!done)
        ret = sys_mmap(addr, len, prot, flags, fd, off);
    pthread_mutex_unlock(&table_lock);
    inside = 0;
    return ret;
}

EXPORT void *mmap64(void *addr, size_t len, int prot, int flags, int fd, off_t off) __attribute__((alias("mmap")));

EXPORT int munmap(void *addr, size_t len)
{
    if (inside || !active || ((uintptr_t)addr & (PAGE - 1)) || len == 0)
        return sys_munmap(addr, len);
    inside = 1;
    pthread_mutex_lock(&table_lock);
    int r = overlaps((uintptr_t)addr, len) ? unmap_range((uintptr_t)addr, len, 0) : sys_munmap(addr, len);
    pthread_mutex_unlock(&table_lock);
    inside = 0;
    return r;
}

static int discard_advice(int advice)
{
    return advice == MADV_DONTNEED || advice == MADV_FREE || advice == MADV_REMOVE || advice == MADV_DONTNEED_LOCKED;
}

EXPORT int madvise(void *addr, size_t len, int advice)
{
    if (inside || !active || ((uintptr_t)addr & (PAGE - 1)) || len == 0)
        return sys_madvise(addr, len, advice);
    inside = 1;
    pthread_mutex_lock(&table_lock);
    int ret = 0;
    uintptr_t cur = (uintptr_t)addr, end = cur + ((len + PAGE - 1) & ~(PAGE - 1));
    if (!overlaps(cur, len)) {
        ret = sys_madvise(addr, len, advice);
    } else {
        while (cur < end && ret == 0) {
            struct xregion *x = find(cur);
            uintptr_t stop;
            if (x) {
                uintptr_t base = (uintptr_t)x->r.addr;
                stop = base + x->r.size < end ? base + x->r.size : end;
                if (discard_advice(advice)) {
                    if (uswap_discard(conn, &x->r, cur - base, stop - cur) != 0) {
                        errno = EINVAL;
                        ret = -1;
                    }
                } else if (advice != MADV_DOFORK && advice != MADV_WIPEONFORK && advice != MADV_KEEPONFORK) {
                    ret = sys_madvise((void *)cur, stop - cur, advice);
                }
            } else {
                struct xregion *next = first_from(cur, end);
                stop = next ? (uintptr_t)next->r.addr : end;
                ret = sys_madvise((void *)cur, stop - cur, advice);
            }
            cur = stop;
        }
    }
    pthread_mutex_unlock(&table_lock);
    inside = 0;
    return ret;
}

EXPORT void *mremap(void *old, size_t old_size, size_t new_size, int flags, ...)
{
    void *want = NULL;
    if (flags & MREMAP_FIXED) {
        va_list ap;
        va_start(ap, flags);
        want = va_arg(ap, void *);
        va_end(ap);
    }
    if (inside || !active)
        return sys_mremap(old, old_size, new_size, flags, want);
    inside = 1;
    pthread_mutex_lock(&table_lock);
    uintptr_t o = (uintptr_t)old;
    struct xregion *x = (o & (PAGE - 1)) ? NULL : find(o);
    void *ret = MAP_FAILED;
    old_size = (old_size + PAGE - 1) & ~(PAGE - 1);
    new_size = (new_size + PAGE - 1) & ~(PAGE - 1);
    if (!x) {
        pthread_mutex_unlock(&table_lock);
        inside = 0;
        return sys_mremap(old, old_size, new_size, flags, want);
    }
    uintptr_t base = (uintptr_t)x->r.addr, rend = base + x->r.size;
    if (o + old_size > rend || new_size == 0 || (flags & MREMAP_DONTUNMAP)) {
        errno = (flags & MREMAP_DONTUNMAP) ? EINVAL : EFAULT;
    } else if (new_size <= old_size && !(flags & MREMAP_FIXED)) {
        if (new_size < old_size)
            unmap_part(x, o + new_size, o + old_size, 0);
        ret = old;
    } else if (!(flags & MREMAP_FIXED) && o + new_size <= rend
               && all_dead(x, (o + old_size - base) / PAGE, (new_size - old_size) / PAGE)) {
        /* Grown in place over the region's own unmapped tail (discarded: zeros). */
        set_live(x, (o + old_size - base) / PAGE, (new_size - old_size) / PAGE, 1);
        sys_mprotect((void *)(o + old_size), new_size - old_size, PROT_READ | PROT_WRITE);
        ret = old;
    } else if (!(flags & MREMAP_MAYMOVE)) {
        errno = ENOMEM;
    } else {
        /* Moved: a new mapping (a region when large enough), the contents copied, the old one unmapped. */
        void *to;
        pthread_mutex_unlock(&table_lock);
        inside = 0;
        to = mmap(want, new_size, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS | (want ? MAP_FIXED : 0), -1, 0);
        if (to != MAP_FAILED) {
            memcpy(to, old, old_size < new_size ? old_size : new_size);
            munmap(old, old_size);
        }
        return to;
    }
    pthread_mutex_unlock(&table_lock);
    inside = 0;
    return ret;
}

/* ------------------------------------------------------------------ fork */

static char fork_json[MAX_REGIONS * 24 + 128];
static char fork_token[128];
static int fork_keep = -1;
static int fork_ids[MAX_REGIONS];
static int fork_nids;
static struct { uintptr_t lo, hi; int prot; } prots[MAX_PROTS];
static int nprots;
static char maps_buf[1 << 16];

/* The protections of every part of a region that is not read-write
 * (/proc/self/maps, read without malloc): a child's new mapping keeps them. */
static void read_protections(void)
{
    nprots = 0;
    int fd = open("/proc/self/maps", O_RDONLY | O_CLOEXEC);
    if (fd < 0)
        return;
    size_t have = 0;
    for (;;) {
        ssize_t n = read(fd, maps_buf + have, sizeof maps_buf - 1 - have);
        if (n <= 0)
            break;
        have += (size_t)n;
        maps_buf[have] = 0;
        char *line = maps_buf, *nl;
        while ((nl = strchr(line, '\n'))) {
            *nl = 0;
            char *dash, *perms;
            unsigned long lo = strtoul(line, &dash, 16), hi = strtoul(dash + 1, &perms, 16);
            perms++;
            if (*dash == '-' && find(lo) && nprots < MAX_PROTS && strlen(perms) >= 4
                    && !(perms[0] == 'r' && perms[1] == 'w')) {
                prots[nprots].lo = lo;
                prots[nprots].hi = hi;
                prots[nprots].prot = (perms[0] == 'r' ? PROT_READ : 0) | (perms[1] == 'w' ? PROT_WRITE : 0)
                                     | (perms[2] == 'x' ? PROT_EXEC : 0);
                nprots++;
            }
            line = nl + 1;
        }
        have = strlen(line);
        memmove(maps_buf, line, have);
    }
    close(fd);
}

static void fork_prepare(void)
{
    inside = 1;
    pthread_mutex_lock(&table_lock);
    fork_nids = 0;
    fork_keep = -1;
    if (!active || nregions == 0)
        return;
    size_t n = (size_t)uswap__format(fork_json, sizeof fork_json, "{\"op\":\"fork_begin\",\"regions\":[");
    for (int i = 0; i < nregions; i++) {
        n += (size_t)uswap__format(fork_json + n, sizeof fork_json - n, "%s%ld", fork_nids ? "," : "", regions[i].r.id);
        fork_ids[fork_nids++] = (int)regions[i].r.id;
    }
    uswap__format(fork_json + n, sizeof fork_json - n, "]}");
    read_protections();
    uswap__lock(conn);
    int r = uswap__exchange_fds(conn, "fork_begin", fork_json, NULL, 0);
    int fds[1], got = uswap__received(conn, fds, 1);
    if (r == 0 && got == 1 && uswap__json_string(uswap__reply(conn), "token", fork_token, sizeof fork_token)) {
        fork_keep = fds[0];
    } else {
        if (got == 1)
            close(fds[0]);
        say("uswap exec: fork_begin failed (%s): a forked child will not have the program's memory",
            r ? uswap_conn_error(conn) : "no token");
        fork_nids = 0;
    }
    uswap__unlock(conn);
}

static void fork_parent(void)
{
    if (fork_keep >= 0)
        close(fork_keep);
    fork_keep = -1;
    pthread_mutex_unlock(&table_lock);
    inside = 0;
}

/* Unmap the parts of region x that are not taken below page `upto` (those
 * attach_child mapped before it failed). */
static void unmap_untaken(struct xregion *x, size_t upto)
{
    for (size_t p = 0, q; p < upto; p = q) {
        q = run_end(x, p);
        if (q > upto)
            q = upto;
        if (!is_set(x->taken, p))
            sys_munmap((char *)x->r.addr + p * PAGE, (q - p) * PAGE);
    }
}

/* The child's copy of region x: the snapshot's memfd mapped where the
 * parent's was, registered in a new uffd, attached. A split region is
 * mapped and registered only in its parts no foreign mapping took (the
 * parts the daemon snapshotted: those the parent mapped at fork); the
 * taken parts hold the foreign mappings the child inherited from the
 * kernel. 0 or -1 (said why). */
static int attach_child(struct xregion *x)
{
    char msg[256];
    uswap__format(msg, sizeof msg, "{\"op\":\"fork_child\",\"token\":\"%s\",\"region\":%ld}", fork_token, x->r.id);
    int memfd = -1, uffd = -1, fds[1];
    size_t npages = pages_of(x->r.size), mapped = 0;   /* pages [0, mapped) are set up */
    uswap__lock(conn);
    int r = uswap__exchange_fds(conn, "fork_child", msg, NULL, 0);
    if (uswap__received(conn, fds, 1) == 1)
        memfd = fds[0];
    uswap__unlock(conn);
    if (r != 0 || memfd < 0)
        goto fail;
    for (size_t p = 0, q; p < npages; p = q) {
        q = run_end(x, p);
        if (is_set(x->taken, p))
            continue;
        void *want = (char *)x->r.addr + p * PAGE;
        void *at = sys_mmap(want, (q - p) * PAGE, PROT_READ | PROT_WRITE, MAP_SHARED | MAP_FIXED_NOREPLACE,
                            memfd, (off_t)(p * PAGE));
        if (at != want) {
            if (at != MAP_FAILED)   /* a kernel that took MAP_FIXED_NOREPLACE as a hint */
                sys_munmap(at, (q - p) * PAGE);
            goto fail;
        }
        mapped = q;
        sys_madvise(want, (q - p) * PAGE, MADV_DONTFORK);
    }
    mapped = npages;
    uffd = uswap__open_uffd(conn);
    if (uffd < 0)
        goto fail;
    for (size_t p = 0, q; p < npages; p = q) {
        q = run_end(x, p);
        struct uffdio_register reg = { .range = { (uintptr_t)x->r.addr + p * PAGE, (q - p) * PAGE },
                                       .mode = UFFDIO_REGISTER_MODE_MISSING | UFFDIO_REGISTER_MODE_WP
                                               | UFFDIO_REGISTER_MODE_MINOR };
        if (!is_set(x->taken, p) && ioctl(uffd, UFFDIO_REGISTER, &reg) < 0)
            goto fail;
    }
    uintptr_t lo = (uintptr_t)x->r.addr, hi = lo + x->r.size;
    for (int i = 0; i < nprots; i++)
        if (prots[i].lo >= lo && prots[i].hi <= hi && !is_set(x->taken, (prots[i].lo - lo) / PAGE))
            sys_mprotect((void *)prots[i].lo, prots[i].hi - prots[i].lo, prots[i].prot);
    uswap__format(msg, sizeof msg, "{\"op\":\"fork_attach\",\"token\":\"%s\",\"region\":%ld}", fork_token, x->r.id);
    long id = -1;
    uswap__lock(conn);
    r = uswap__exchange_fds(conn, "fork_attach", msg, &uffd, 1);
    if (r == 0 && !uswap__json_long(uswap__reply(conn), "region", &id))
        r = -1;
    uswap__unlock(conn);
    if (r != 0)
        goto fail;
    x->r.id = id;
    x->r.uffd = uffd;
    x->r.memfd = memfd;
    return 0;
fail:
    say("uswap exec: forked child %d: the region at %p (%zu bytes) could not be set up: %s", (int)getpid(),
        x->r.addr, x->r.size, uswap_conn_error(conn));
    /* The new uffd is closed before anything is unmapped. Invariant: a
     * child never munmaps a range registered in a uffd of its own that
     * nobody reads -- it asked for UNMAP events, and munmap would wait for
     * ever for this one to be read. Closing it unregisters every run. */
    if (uffd >= 0)
        close(uffd);
    unmap_untaken(x, mapped);
    if (memfd >= 0)
        close(memfd);
    return -1;
}

static void fork_child(void)
{
    if (!active || nregions == 0)
        goto out;
    for (int i = 0; i < nregions; i++) {
        close(regions[i].r.uffd);   /* the parent's: our copies only */
        close(regions[i].r.memfd);
    }
    uswap__abandon(conn);
    conn = NULL;
    if (uswap_connect(socket_path, &conn) != 0) {
        say("uswap exec: forked child %d cannot reach the uswap daemon (%s): the program's memory is not"
            " mapped here", (int)getpid(), uswap_conn_error(conn));
        uswap_disconnect(conn);
        conn = NULL;
        active = 0;
        nregions = 0;
        goto out;
    }
    for (int i = 0; i < nregions;) {
        int snap = 0;
        for (int k = 0; k < fork_nids; k++)
            snap |= fork_ids[k] == regions[i].r.id;
        if (snap && fork_keep >= 0 && attach_child(&regions[i]) == 0) {
            i++;
            continue;
        }
        if (!snap)
            say("uswap exec: forked child %d: the region at %p was not in the fork's snapshot and is not"
                " mapped here", (int)getpid(), regions[i].r.addr);
        drop(&regions[i]);
    }
out:
    if (fork_keep >= 0)
        close(fork_keep);
    fork_keep = -1;
    pthread_mutex_unlock(&table_lock);
    inside = 0;
}

/* The fork handlers of every library (pthread_atfork is a static stub that
 * calls libc's __register_atfork). They are kept here and run around ours,
 * because ours must run first in the child: until it has mapped the
 * regions again, a handler that touches heap memory (the allocator's own,
 * whose metadata lives in regions) would fault on an unmapped range; and
 * ours must run last before the fork, after the allocator's prepare handler
 * has taken its locks (a thread inside our mmap may hold one of them while
 * it waits for the table lock). */
#define MAX_HANDLERS 64
static struct { void (*prepare)(void), (*parent)(void), (*child)(void); } handlers[MAX_HANDLERS];
static int nhandlers;
static pthread_mutex_t handlers_lock = PTHREAD_MUTEX_INITIALIZER;

EXPORT int __register_atfork(void (*prepare)(void), void (*parent)(void), void (*child)(void), void *dso)
{
    (void)dso;
    pthread_mutex_lock(&handlers_lock);
    int ok = nhandlers < MAX_HANDLERS;
    if (ok)
        handlers[nhandlers++] = (typeof(handlers[0])){ prepare, parent, child };
    pthread_mutex_unlock(&handlers_lock);
    return ok ? 0 : ENOMEM;
}

static void all_prepare(void)
{
    for (int i = nhandlers - 1; i >= 0; i--)   /* reverse order of registration, as libc does */
        if (handlers[i].prepare)
            handlers[i].prepare();
    fork_prepare();
}

static void all_parent(void)
{
    fork_parent();
    for (int i = 0; i < nhandlers; i++)
        if (handlers[i].parent)
            handlers[i].parent();
}

static void all_child(void)
{
    fork_child();
    pthread_mutex_init(&handlers_lock, NULL);
    for (int i = 0; i < nhandlers; i++)
        if (handlers[i].child)
            handlers[i].child();
}

extern void *__dso_handle;

__attribute__((constructor)) static void preload_fork_hooks(void)
{
    int (*real)(void (*)(void), void (*)(void), void (*)(void), void *) = dlsym(RTLD_NEXT, "__register_atfork");
    if (real)
        real(all_prepare, all_parent, all_child, __dso_handle);
    else
        say("uswap exec: __register_atfork not found: forked children will not get the program's memory");
}

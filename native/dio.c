/* Direct I/O, memory mapping and page checksums for uswap.
 *
 * The daemon's I/O threads call these with the GIL released (cffi API mode),
 * so each loops to completion in C. All return >= 0 or -errno. */
#ifndef _GNU_SOURCE
#define _GNU_SOURCE
#endif
#include <errno.h>
#include <fcntl.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/uio.h>
#include <sys/vfs.h>
#include "fd_io.h"
#include "pagesum.h"
#include "dio.h"
#include <unistd.h>

static int us_open_direct(const char *path, int flags, int mode)
{
    int fd = open(path, flags | O_DIRECT | O_CLOEXEC | O_NOFOLLOW, mode);
    return fd >= 0 ? fd : -errno;
}

static int64_t us_pread_full(int fd, uint64_t addr, uint64_t len, int64_t off)
{
    return us_fd_full(0, fd, addr, len, off);
}

static int64_t us_pwrite_full(int fd, uint64_t addr, uint64_t len, int64_t off)
{
    return us_fd_full(1, fd, addr, len, off);
}

static int us_fallocate(int fd, int mode, int64_t off, int64_t len)
{
    return fallocate(fd, mode, off, len) < 0 ? -errno : 0;
}

/* Drop [off, off+len) of a memfd from every mapping of it. */
static int us_punch_hole(int fd, int64_t off, int64_t len)
{
    return us_fallocate(fd, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE, off, len);
}

static int64_t us_mmap(uint64_t len, int prot, int flags, int fd, int64_t off)
{
    void *p = mmap(NULL, len, prot, flags, fd, off);
    return p == MAP_FAILED ? -errno : (int64_t)(uintptr_t)p;
}

static int us_munmap(uint64_t addr, uint64_t len)
{
    return munmap((void *)addr, len) < 0 ? -errno : 0;
}

/* Replace whatever is mapped at addr..addr+len with an inaccessible,
 * never-populated reservation (one mmap: no moment where the range is free
 * for another mapping to take). */
static int us_reserve(uint64_t addr, uint64_t len)
{
    void *p = mmap((void *)addr, len, PROT_NONE, MAP_FIXED | MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
    return p == MAP_FAILED ? -errno : 0;
}

static int us_mlockall(int flags)
{
    return mlockall(flags) < 0 ? -errno : 0;
}

static int64_t us_aligned_alloc(uint64_t align, uint64_t size)
{
    void *p = NULL;
    int r = posix_memalign(&p, align, size);
    if (r != 0)
        return -r;
    memset(p, 0, size);   /* touch now: the daemon must never fault on its own buffers */
    return (int64_t)(uintptr_t)p;
}

static void us_free(uint64_t addr)
{
    free((void *)addr);
}

/* Filesystem magic of an open file (statfs f_type), or -errno. */
static int64_t us_fs_type(int fd)
{
    struct statfs st;
    if (fstatfs(fd, &st) < 0)
        return -errno;
    return (int64_t)(uint64_t)(uint32_t)st.f_type;
}

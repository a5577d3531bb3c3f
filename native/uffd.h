/* The uffd shim's event record and entry points (native/uffd.c; the COPY and the
 * zero fill are uffd_copy.h's): declared here once, read by the compiler and, through
 * cdef_reader.py, by the cffi build (uffd_build.py) that gives Python its
 * view (uswap/uffd.py). uffd.c says what each does. */
#ifndef USWAP_UFFD_H
#define USWAP_UFFD_H

#include <stdint.h>

/* cdef: begin */
/* One event, flattened so Python reads plain fields instead of a union. */
struct us_event {
    uint8_t kind;        /* UFFD_EVENT_* */
    uint64_t flags;      /* pagefault flags (WRITE, WP, MINOR) */
    uint64_t addr;       /* fault address, or start of an UNMAP/REMOVE range */
    uint64_t end;        /* end of an UNMAP/REMOVE range */
    uint32_t tid;        /* faulting thread, when the kernel reports it */
};

static int us_uffd_open(int user_mode_only);
static int us_uffd_api(int fd, uint64_t features, uint64_t *out_features, uint64_t *out_ioctls);
static int us_uffd_register(int fd, uint64_t start, uint64_t len, uint64_t mode, uint64_t *out_ioctls);
static int us_uffd_unregister(int fd, uint64_t start, uint64_t len);
static int64_t us_uffd_copy(int fd, uint64_t dst, uint64_t src, uint64_t len, uint64_t mode);
static int64_t us_uffd_zero_fill(int fd, uint64_t dst, uint64_t len, uint64_t zeros, int write_protect);
static int64_t us_uffd_continue(int fd, uint64_t start, uint64_t len, uint64_t mode);
static int us_uffd_writeprotect(int fd, uint64_t start, uint64_t len, uint64_t mode);
static int64_t us_uffd_writeprotect_pages(int fd, uint64_t base, const int64_t *pages, int64_t n,
                                          uint64_t mode, int *err);
static int us_uffd_wake(int fd, uint64_t start, uint64_t len);
static int64_t us_uffd_poison(int fd, uint64_t start, uint64_t len, uint64_t mode);
static int us_uffd_read_events(int fd, struct us_event *out, int max);
/* cdef: end */

#endif

/* libuswap: the C client of the uswap daemon (docs/protocol.md).
 *
 *     uswap_conn *c;
 *     uswap_region r;
 *     if (uswap_connect(NULL, &c) != 0) { fprintf(stderr, "%s\n", uswap_conn_error(c)); ... }
 *     if (uswap_alloc(c, 1 << 30, &r) == 0) { memset(r.addr, 1, r.size); uswap_free(c, &r); }
 *     uswap_disconnect(c);
 *
 * A region is memory the daemon swaps: a sealed memfd mapped MAP_SHARED
 * here, registered MISSING|WP|MINOR in a userfaultfd of its own, both fds
 * sent to the daemon once and kept open here for the region's life.
 * A connection may be used by several threads (each call holds its lock).
 * Every function returns 0 or a negative USWAP_E_* code; the connection
 * keeps the last failure's message (uswap_conn_error). The library calls
 * malloc only for uswap_status's answer, formats its messages itself, and
 * makes its own mmap, munmap and madvise calls as raw system calls, so a
 * program that interposes those functions is not re-entered through it.
 */
#ifndef USWAP_H
#define USWAP_H

#include <stddef.h>

#ifdef __cplusplus
extern "C" {
#endif

/* The library's exported symbols (it is built with hidden visibility). */
#define USWAP_API __attribute__((visibility("default")))

enum {
    USWAP_OK = 0,
    USWAP_E_UNREACHABLE = -1, /* no daemon at the socket, or it closed the connection */
    USWAP_E_REFUSED = -2,     /* the daemon refused the request (its reason: uswap_conn_error) */
    USWAP_E_SYSTEM = -3,      /* a system call failed (memfd, mmap, userfaultfd, ...) */
    USWAP_E_PROTOCOL = -4,    /* the daemon's reply could not be understood */
    USWAP_E_INVALID = -5,     /* a bad argument (the message names it) */
};

typedef struct uswap_conn uswap_conn;

typedef struct uswap_region {
    void *addr;    /* where the region is mapped */
    size_t size;   /* its length, a multiple of the page size (4096) */
    long id;       /* the daemon's region id */
    int uffd;      /* this process's userfaultfd for the range */
    int memfd;     /* the region's memfd */
} uswap_region;

/* Connect to the daemon at `socket_path` (NULL: $USWAP_SOCKET, else
 * /run/uswap/uswap.sock) and greet it. *out is set even on failure (then
 * only uswap_conn_error and uswap_disconnect may be called on it), unless
 * memory for it could not be had (*out NULL). */
USWAP_API int uswap_connect(const char *socket_path, uswap_conn **out);

/* A new region of `size` bytes (rounded up to whole pages), placed by the
 * kernel. */
USWAP_API int uswap_alloc(uswap_conn *c, size_t size, uswap_region *out);

/* A new region mapped at exactly `addr` (page aligned), replacing whatever
 * was mapped there (MAP_FIXED): for a caller that reserved the range. On
 * a failure after the range was mapped, it is left reserved (an anonymous
 * PROT_NONE mapping), never free for another thread's mapping to take. */
USWAP_API int uswap_alloc_at(uswap_conn *c, void *addr, size_t size, uswap_region *out);

/* Drop [offset, offset+length) of the region as MADV_DONTNEED drops private
 * memory: it reads as zeros on its next touch; its memory and store slots
 * are freed. Page aligned, inside the region. Returns once the pages have
 * left memory. */
USWAP_API int uswap_discard(uswap_conn *c, const uswap_region *r, size_t offset, size_t length);

/* Give the region back: unregistered, kept reserved (PROT_NONE) while the
 * daemon frees it, then unmapped; its fds closed. */
USWAP_API int uswap_free(uswap_conn *c, uswap_region *r);

/* The daemon's status (the `uswap status --json` object) as a JSON text in
 * *json, which the caller frees with free(). */
USWAP_API int uswap_status(uswap_conn *c, char **json);

/* The message of the connection's last failure ("" if none). */
USWAP_API const char *uswap_conn_error(const uswap_conn *c);

/* A fixed text for a USWAP_E_* code. */
USWAP_API const char *uswap_strerror(int code);

/* Close the connection. The daemon closes every region still allocated on
 * it: free them first (uswap_free); a region left mapped is no longer
 * served, and its swapped-out contents are gone. */
USWAP_API void uswap_disconnect(uswap_conn *c);

#ifdef __cplusplus
}
#endif
#endif

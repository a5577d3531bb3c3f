/* libuswap: the C client of the uswap daemon (include/uswap.h), speaking the
 * protocol of docs/protocol.md exactly as uswap/client.py does: 4-byte
 * big-endian framed JSON over a UNIX stream socket, fds as SCM_RIGHTS on a
 * message's first byte; a region is a sealed memfd mapped MAP_SHARED here,
 * registered MISSING|WP|MINOR in its own userfaultfd, MADV_DONTFORK.
 *
 * Re-entrancy: LD_PRELOAD interposers (uswap exec) call this library from
 * inside mmap/munmap/madvise, so its own calls of those are raw system
 * calls, and nothing between the request and the reply allocates memory. */
#define _GNU_SOURCE
#include "uswap.h"
#include "libuswap_internal.h"

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
#include <sys/socket.h>
#include <sys/syscall.h>
#include <sys/un.h>
#include <unistd.h>

#ifndef USERFAULTFD_IOC_NEW
#define USERFAULTFD_IOC_NEW _IO(0xAA, 0x00)
#endif
#ifndef UFFD_FEATURE_WP_HUGETLBFS_SHMEM
#define UFFD_FEATURE_WP_HUGETLBFS_SHMEM (1 << 12)
#endif
#ifndef MFD_ALLOW_SEALING
#define MFD_ALLOW_SEALING 2U
#endif

#define PAGE 4096UL
#define MAX_MESSAGE (1 << 20)   /* protocol.MAX_MESSAGE */
#define MAX_FDS 4               /* protocol.MAX_FDS */
#define PROTOCOL_VERSION 1
#define DEFAULT_SOCKET "/run/uswap/uswap.sock"
/* What uswap/uffd.py asks of UFFDIO_API: the daemon serves shmem MISSING,
 * MINOR and WP faults, reads UNMAP events, and logs fault thread ids. */
#define UFFD_FEATURES (UFFD_FEATURE_MISSING_SHMEM | UFFD_FEATURE_EVENT_UNMAP | UFFD_FEATURE_MINOR_SHMEM \
                       | UFFD_FEATURE_WP_HUGETLBFS_SHMEM | UFFD_FEATURE_THREAD_ID)
#define REGISTER_ALL (UFFDIO_REGISTER_MODE_MISSING | UFFDIO_REGISTER_MODE_WP | UFFDIO_REGISTER_MODE_MINOR)

struct uswap_conn {
    int sock;
    int rfds[MAX_FDS];      /* fds received with the last reply (ops that return some) */
    int nrfds;
    pthread_mutex_t lock;   /* one request and its reply at a time */
    char error[512];
    char reply[8192];       /* the last reply's JSON (status replies are read into the heap) */
};

/* ------------------------------------------------------------------ raw calls */

static void *raw_mmap(void *addr, size_t len, int prot, int flags, int fd)
{
    long r = syscall(SYS_mmap, addr, len, prot, flags, fd, 0L);
    if (r < 0 && r > -4096) {   /* syscall() already returned -1/errno on error */
        return MAP_FAILED;
    }
    return (void *)r;
}

static int raw_munmap(void *addr, size_t len) { return (int)syscall(SYS_munmap, addr, len); }
static void raw_reserve(void *addr, size_t len)
{
    raw_mmap(addr, len, PROT_NONE, MAP_FIXED | MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1);
}
static int raw_madvise(void *addr, size_t len, int advice) { return (int)syscall(SYS_madvise, addr, len, advice); }

/* ------------------------------------------------------------------ formatting

 * Our own small printf (%s %.Ns %d %ld %lu %zu %x %lx %p %%): the C
 * library's reads tables that register_printf_function allocates on the
 * heap, which a forked child of `uswap exec` has not mapped yet when it
 * reconnects (its heap is in regions). */

static size_t put_char(char *buf, size_t cap, size_t at, char ch)
{
    if (at + 1 < cap)
        buf[at] = ch;
    return at + 1;
}

static size_t put_unsigned(char *buf, size_t cap, size_t at, unsigned long v, unsigned base)
{
    char digits[24];
    int n = 0;
    do {
        digits[n++] = "0123456789abcdef"[v % base];
        v /= base;
    } while (v);
    while (n)
        at = put_char(buf, cap, at, digits[--n]);
    return at;
}

int uswap__vformat(char *buf, size_t cap, const char *fmt, va_list ap)
{
    size_t at = 0;
    for (const char *f = fmt; *f; f++) {
        if (*f != '%') {
            at = put_char(buf, cap, at, *f);
            continue;
        }
        f++;
        long precision = -1;
        if (*f == '.') {
            precision = 0;
            for (f++; *f >= '0' && *f <= '9'; f++)
                precision = precision * 10 + (*f - '0');
        }
        int is_long = 0;
        if (*f == 'l' || *f == 'z') {
            is_long = 1;
            f++;
        }
        switch (*f) {
        case 's': {
            const char *str = va_arg(ap, const char *);
            if (!str)
                str = "(null)";
            for (long i = 0; str[i] && (precision < 0 || i < precision); i++)
                at = put_char(buf, cap, at, str[i]);
            break;
        }
        case 'd': {
            long v = is_long ? va_arg(ap, long) : va_arg(ap, int);
            if (v < 0) {
                at = put_char(buf, cap, at, '-');
                at = put_unsigned(buf, cap, at, 0UL - (unsigned long)v, 10);
            } else {
                at = put_unsigned(buf, cap, at, (unsigned long)v, 10);
            }
            break;
        }
        case 'u':
            at = put_unsigned(buf, cap, at, is_long ? va_arg(ap, unsigned long) : va_arg(ap, unsigned), 10);
            break;
        case 'x':
            at = put_unsigned(buf, cap, at, is_long ? va_arg(ap, unsigned long) : va_arg(ap, unsigned), 16);
            break;
        case 'p':
            at = put_char(buf, cap, at, '0');
            at = put_char(buf, cap, at, 'x');
            at = put_unsigned(buf, cap, at, (unsigned long)(uintptr_t)va_arg(ap, void *), 16);
            break;
        case '%':
            at = put_char(buf, cap, at, '%');
            break;
        default:   /* not used in this library */
            at = put_char(buf, cap, at, '?');
            if (!*f)
                f--;
        }
    }
    if (cap)
        buf[at < cap ? at : cap - 1] = 0;
    return (int)at;
}

int uswap__format(char *buf, size_t cap, const char *fmt, ...)
{
    va_list ap;
    va_start(ap, fmt);
    int n = uswap__vformat(buf, cap, fmt, ap);
    va_end(ap);
    return n;
}

/* ------------------------------------------------------------------ errors */

/* An errno's text without strerror: strerror reads the locale's message
 * catalogue, heap memory that a forked child of `uswap exec` may not have
 * mapped yet when it reconnects. */
static const char *errtext(int err)
{
    const char *d = strerrordesc_np(err);
    return d ? d : "unknown error";
}

static int fail(uswap_conn *c, int code, const char *fmt, ...)
{
    va_list ap;
    va_start(ap, fmt);
    uswap__vformat(c->error, sizeof c->error, fmt, ap);
    va_end(ap);
    return code;
}

const char *uswap_conn_error(const uswap_conn *c) { return c ? c->error : "out of memory"; }

const char *uswap_strerror(int code)
{
    switch (code) {
    case USWAP_OK: return "success";
    case USWAP_E_UNREACHABLE: return "the uswap daemon is unreachable";
    case USWAP_E_REFUSED: return "the uswap daemon refused the request";
    case USWAP_E_SYSTEM: return "a system call failed";
    case USWAP_E_PROTOCOL: return "the uswap daemon's reply could not be understood";
    case USWAP_E_INVALID: return "invalid argument";
    default: return "unknown uswap error code";
    }
}

/* ------------------------------------------------------------------ framing */

/* Send one message with `nfds` fds on its first byte. */
static int send_msg(uswap_conn *c, const char *json, const int *fds, int nfds)
{
    size_t len = strlen(json);
    char head[4] = { (char)(len >> 24), (char)(len >> 16), (char)(len >> 8), (char)len };
    struct iovec iov[2] = { { head, 4 }, { (void *)json, len } };
    union { struct cmsghdr h; char buf[CMSG_SPACE(sizeof(int) * MAX_FDS)]; } ctl;
    struct msghdr mh = { .msg_iov = iov, .msg_iovlen = 2 };
    if (nfds > 0) {
        memset(&ctl, 0, sizeof ctl);
        mh.msg_control = ctl.buf;
        mh.msg_controllen = CMSG_SPACE(sizeof(int) * nfds);
        struct cmsghdr *cm = CMSG_FIRSTHDR(&mh);
        cm->cmsg_level = SOL_SOCKET;
        cm->cmsg_type = SCM_RIGHTS;
        cm->cmsg_len = CMSG_LEN(sizeof(int) * nfds);
        memcpy(CMSG_DATA(cm), fds, sizeof(int) * nfds);
    }
    size_t total = len + 4, sent = 0;
    while (sent < total) {
        ssize_t n = sendmsg(c->sock, &mh, MSG_NOSIGNAL);
        if (n < 0) {
            if (errno == EINTR)
                continue;
            return -errno;
        }
        sent += (size_t)n;
        mh.msg_control = NULL;   /* the fds rode on the first byte */
        mh.msg_controllen = 0;
        while (mh.msg_iovlen && (size_t)n >= mh.msg_iov->iov_len) {
            n -= (ssize_t)mh.msg_iov->iov_len;
            mh.msg_iov++;
            mh.msg_iovlen--;
        }
        if (mh.msg_iovlen) {
            mh.msg_iov->iov_base = (char *)mh.msg_iov->iov_base + n;
            mh.msg_iov->iov_len -= (size_t)n;
        }
    }
    return 0;
}

/* Read exactly len bytes; fds that ride along are kept in c->rfds (what
 * room there is; the rest closed). 0, -EPIPE at end of stream, or -errno. */
static int recv_exact(uswap_conn *c, char *buf, size_t len)
{
    size_t got = 0;
    while (got < len) {
        union { struct cmsghdr h; char b[CMSG_SPACE(sizeof(int) * MAX_FDS)]; } ctl;
        struct iovec iov = { buf + got, len - got };
        struct msghdr mh = { .msg_iov = &iov, .msg_iovlen = 1, .msg_control = ctl.b, .msg_controllen = sizeof ctl.b };
        ssize_t n = recvmsg(c->sock, &mh, MSG_CMSG_CLOEXEC);
        if (n < 0) {
            if (errno == EINTR)
                continue;
            return -errno;
        }
        for (struct cmsghdr *cm = CMSG_FIRSTHDR(&mh); cm; cm = CMSG_NXTHDR(&mh, cm))
            if (cm->cmsg_level == SOL_SOCKET && cm->cmsg_type == SCM_RIGHTS) {
                int nfd = (int)((cm->cmsg_len - CMSG_LEN(0)) / sizeof(int));
                for (int i = 0; i < nfd; i++) {
                    int fd;
                    memcpy(&fd, CMSG_DATA(cm) + i * sizeof(int), sizeof fd);
                    if (c->nrfds < MAX_FDS)
                        c->rfds[c->nrfds++] = fd;
                    else
                        close(fd);
                }
            }
        if (n == 0)
            return -EPIPE;
        got += (size_t)n;
    }
    return 0;
}

/* Read one reply into `buf` (NUL-terminated), or into a heap buffer when
 * *heap is non-NULL on entry (set to it; the caller frees). */
static int recv_reply(uswap_conn *c, char *buf, size_t cap, char **heap)
{
    unsigned char head[4];
    int r = recv_exact(c, (char *)head, 4);
    if (r < 0)
        return r == -EPIPE ? fail(c, USWAP_E_UNREACHABLE, "the uswap daemon closed the connection")
                           : fail(c, USWAP_E_UNREACHABLE, "reading from the uswap daemon: %s", errtext(-r));
    size_t len = ((size_t)head[0] << 24) | ((size_t)head[1] << 16) | ((size_t)head[2] << 8) | head[3];
    if (len > MAX_MESSAGE)
        return fail(c, USWAP_E_PROTOCOL, "a reply of %zu bytes, more than the protocol's %d", len, MAX_MESSAGE);
    if (heap) {
        buf = malloc(len + 1);
        if (!buf)
            return fail(c, USWAP_E_SYSTEM, "no memory for a reply of %zu bytes", len);
        cap = len + 1;
    }
    if (len + 1 > cap) {
        return fail(c, USWAP_E_PROTOCOL, "a reply of %zu bytes, more than the %zu expected", len, cap - 1);
    }
    r = recv_exact(c, buf, len);
    if (r < 0) {
        if (heap)
            free(buf);
        return fail(c, USWAP_E_UNREACHABLE, "reading from the uswap daemon: %s", errtext(-r));
    }
    buf[len] = 0;
    if (heap)
        *heap = buf;
    return 0;
}

/* ------------------------------------------------------------------ JSON (replies only) */

static const char *skip_ws(const char *p)
{
    while (*p == ' ' || *p == '\n' || *p == '\t' || *p == '\r')
        p++;
    return p;
}

/* The end of the JSON value at p (one past it), or NULL if malformed. */
static const char *skip_value(const char *p)
{
    p = skip_ws(p);
    if (*p == '"') {
        for (p++; *p && *p != '"'; p++)
            if (*p == '\\' && p[1])
                p++;
        return *p == '"' ? p + 1 : NULL;
    }
    if (*p == '{' || *p == '[') {
        int depth = 0;
        while (*p) {
            if (*p == '"') {
                p = skip_value(p);
                if (!p)
                    return NULL;
                continue;
            }
            if (*p == '{' || *p == '[')
                depth++;
            else if (*p == '}' || *p == ']') {
                if (--depth == 0)
                    return p + 1;
            }
            p++;
        }
        return NULL;
    }
    while (*p && *p != ',' && *p != '}' && *p != ']' && *p != ' ')
        p++;
    return p;
}

/* The value of `key` in the top-level object `json`: [*start, *end). */
static int json_get(const char *json, const char *key, const char **start, const char **end)
{
    const char *p = skip_ws(json);
    if (*p != '{')
        return 0;
    p++;
    size_t klen = strlen(key);
    for (;;) {
        p = skip_ws(p);
        if (*p != '"')
            return 0;
        const char *k = p + 1;
        const char *kend = skip_value(p);
        if (!kend)
            return 0;
        p = skip_ws(kend);
        if (*p != ':')
            return 0;
        const char *v = skip_ws(p + 1);
        const char *vend = skip_value(v);
        if (!vend)
            return 0;
        if ((size_t)(kend - 1 - k) == klen && memcmp(k, key, klen) == 0) {
            *start = v;
            *end = vend;
            return 1;
        }
        p = skip_ws(vend);
        if (*p != ',')
            return 0;
        p++;
    }
}

/* Copy the JSON string value of `key` into out (escapes decoded, non-ASCII
 * \u escapes as '?'). */
int uswap__json_string(const char *json, const char *key, char *out, size_t cap)
{
    const char *s, *e;
    if (!json_get(json, key, &s, &e) || *s != '"')
        return 0;
    size_t n = 0;
    for (const char *p = s + 1; p < e - 1 && n + 1 < cap; p++) {
        char ch = *p;
        if (ch == '\\') {
            p++;
            switch (*p) {
            case 'n': ch = '\n'; break;
            case 't': ch = '\t'; break;
            case 'r': ch = '\r'; break;
            case 'b': ch = '\b'; break;
            case 'f': ch = '\f'; break;
            case 'u': {
                unsigned v = 0;
                for (int k = 1; k <= 4 && p[k]; k++) {
                    char h = p[k];
                    v = v * 16 + (unsigned)(h <= '9' ? h - '0' : (h | 32) - 'a' + 10);
                }
                ch = v < 128 ? (char)v : '?';
                p += 4;
                break;
            }
            default: ch = *p;
            }
        }
        out[n++] = ch;
    }
    out[n] = 0;
    return 1;
}

int uswap__json_long(const char *json, const char *key, long *out)
{
    const char *s, *e;
    if (!json_get(json, key, &s, &e))
        return 0;
    char *end;
    errno = 0;
    long v = strtol(s, &end, 10);
    if (end != e || errno)
        return 0;
    *out = v;
    return 1;
}

/* A reply's verdict: 0 for {"ok": true}, USWAP_E_REFUSED with its error. */
static int verdict(uswap_conn *c, const char *reply, const char *what)
{
    const char *s, *e;
    if (!json_get(reply, "ok", &s, &e))
        return fail(c, USWAP_E_PROTOCOL, "%s: a reply with no \"ok\": %.200s", what, reply);
    if (e - s == 4 && memcmp(s, "true", 4) == 0)
        return 0;
    char err[400];
    if (!uswap__json_string(reply, "error", err, sizeof err))
        uswap__format(err, sizeof err, "request refused");
    return fail(c, USWAP_E_REFUSED, "%s", err);
}

static void close_received(uswap_conn *c)
{
    for (int i = 0; i < c->nrfds; i++)
        close(c->rfds[i]);
    c->nrfds = 0;
}

/* One request and its reply into c->reply, under the connection's lock;
 * fds received with it are closed. */
static int exchange(uswap_conn *c, const char *what, const char *json, const int *fds, int nfds)
{
    int r = uswap__exchange_fds(c, what, json, fds, nfds);
    close_received(c);
    return r;
}

int uswap__exchange_fds(uswap_conn *c, const char *what, const char *json, const int *fds, int nfds)
{
    close_received(c);
    int r = send_msg(c, json, fds, nfds);
    if (r < 0) {
        /* A busy daemon answers and closes before reading: its reason may wait in the socket. */
        if (recv_reply(c, c->reply, sizeof c->reply, NULL) == 0 && verdict(c, c->reply, what) != 0)
            return USWAP_E_UNREACHABLE;
        return fail(c, USWAP_E_UNREACHABLE, "%s: sending to the uswap daemon: %s", what, errtext(-r));
    }
    r = recv_reply(c, c->reply, sizeof c->reply, NULL);
    return r ? r : verdict(c, c->reply, what);
}

/* ------------------------------------------------------------------ connection */

int uswap_connect(const char *socket_path, uswap_conn **out)
{
    /* Not malloc: a preloaded interposer connects from inside mmap, where
     * the program's allocator may hold its own locks. */
    uswap_conn *c = raw_mmap(NULL, sizeof *c, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1);
    if (c == MAP_FAILED)
        c = NULL;
    *out = c;
    if (!c)
        return USWAP_E_SYSTEM;
    c->sock = -1;
    pthread_mutex_init(&c->lock, NULL);
    const char *path = socket_path ? socket_path : getenv("USWAP_SOCKET");
    if (!path || !*path)
        path = DEFAULT_SOCKET;
    struct sockaddr_un sa = { .sun_family = AF_UNIX };
    if (strlen(path) >= sizeof sa.sun_path)
        return fail(c, USWAP_E_INVALID, "socket path %s is longer than %zu bytes", path, sizeof sa.sun_path - 1);
    strcpy(sa.sun_path, path);
    c->sock = socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0);
    if (c->sock < 0)
        return fail(c, USWAP_E_SYSTEM, "socket: %s", errtext(errno));
    if (connect(c->sock, (struct sockaddr *)&sa, sizeof sa) < 0)
        return fail(c, USWAP_E_UNREACHABLE, "cannot reach the uswap daemon at %s: %s (is `uswap run` running?"
                    " set USWAP_SOCKET)", path, errtext(errno));
    char hello[64];
    uswap__format(hello, sizeof hello, "{\"op\":\"hello\",\"version\":%d}", PROTOCOL_VERSION);
    int r = exchange(c, "hello", hello, NULL, 0);
    if (r == USWAP_E_REFUSED)
        r = USWAP_E_UNREACHABLE;   /* a busy daemon: it closes the connection */
    return r;
}

void uswap_disconnect(uswap_conn *c)
{
    if (!c)
        return;
    close_received(c);
    if (c->sock >= 0)
        close(c->sock);
    pthread_mutex_destroy(&c->lock);
    raw_munmap(c, sizeof *c);
}

/* ------------------------------------------------------------------ regions */

int uswap__open_uffd(uswap_conn *c)
{
    int fd = (int)syscall(SYS_userfaultfd, O_CLOEXEC | O_NONBLOCK);
    if (fd < 0) {
        int err = errno;
        int dev = open("/dev/userfaultfd", O_RDWR | O_CLOEXEC);
        if (dev >= 0) {
            fd = ioctl(dev, USERFAULTFD_IOC_NEW, O_CLOEXEC | O_NONBLOCK);
            err = errno;
            close(dev);
        }
        if (fd < 0)
            return fail(c, USWAP_E_SYSTEM, "userfaultfd: %s (needs root, CAP_SYS_PTRACE or access to"
                        " /dev/userfaultfd)", errtext(err));
    }
    struct uffdio_api api = { .api = UFFD_API, .features = UFFD_FEATURES };
    if (ioctl(fd, UFFDIO_API, &api) < 0) {
        int err = errno;
        close(fd);
        return fail(c, USWAP_E_SYSTEM, "UFFDIO_API: %s (uswap needs Linux 6.0 or newer)", errtext(err));
    }
    return fd;
}

static int set_up(uswap_conn *c, void *want, size_t size, uswap_region *out)
{
    int memfd = -1, uffd = -1;
    void *addr = MAP_FAILED;
    int code = USWAP_E_SYSTEM;
    char msg[128];
    memfd = (int)syscall(SYS_memfd_create, "uswap-region", MFD_CLOEXEC | MFD_ALLOW_SEALING);
    if (memfd < 0) {
        fail(c, code, "memfd_create: %s", errtext(errno));
        goto out;
    }
    if (ftruncate(memfd, (off_t)size) < 0) {
        fail(c, code, "ftruncate(memfd, %zu): %s", size, errtext(errno));
        goto out;
    }
    if (fcntl(memfd, F_ADD_SEALS, F_SEAL_GROW | F_SEAL_SHRINK | F_SEAL_SEAL) < 0) {
        fail(c, code, "sealing the memfd: %s", errtext(errno));
        goto out;
    }
    addr = raw_mmap(want, size, PROT_READ | PROT_WRITE, MAP_SHARED | (want ? MAP_FIXED : 0), memfd);
    if (addr == MAP_FAILED) {
        fail(c, code, "mmap of %zu bytes: %s", size, errtext(errno));
        goto out;
    }
    uffd = uswap__open_uffd(c);
    if (uffd < 0) {
        code = uffd;
        uffd = -1;
        goto out;
    }
    struct uffdio_register reg = { .range = { (uintptr_t)addr, size }, .mode = REGISTER_ALL };
    if (ioctl(uffd, UFFDIO_REGISTER, &reg) < 0) {
        fail(c, code, "UFFDIO_REGISTER MISSING|WP|MINOR at %p (+%zu): %s", addr, size, errtext(errno));
        goto out;
    }
    if (raw_madvise(addr, size, MADV_DONTFORK) < 0) {
        fail(c, code, "madvise(MADV_DONTFORK): %s", errtext(errno));
        goto out;
    }
    uswap__format(msg, sizeof msg, "{\"op\":\"alloc\",\"size\":%zu,\"addr\":%lu}", size, (unsigned long)addr);
    int fds[2] = { uffd, memfd };
    pthread_mutex_lock(&c->lock);
    code = exchange(c, "alloc", msg, fds, 2);
    long id = -1;
    if (code == 0 && !uswap__json_long(c->reply, "region", &id))
        code = fail(c, USWAP_E_PROTOCOL, "alloc: a reply with no region id: %.200s", c->reply);
    pthread_mutex_unlock(&c->lock);
    if (code != 0)
        goto out;
    *out = (uswap_region){ .addr = addr, .size = size, .id = id, .uffd = uffd, .memfd = memfd };
    return 0;
out:
    if (addr != MAP_FAILED && want)   /* the caller's range stays the caller's: reserved, not freed */
        raw_mmap(want, size, PROT_NONE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE | MAP_FIXED, -1);
    else if (addr != MAP_FAILED)
        raw_munmap(addr, size);   /* unregisters the range too */
    if (uffd >= 0)
        close(uffd);
    if (memfd >= 0)
        close(memfd);
    return code;
}

static int check_size(uswap_conn *c, size_t size, size_t *rounded)
{
    if (size == 0 || size > (SIZE_MAX >> 1))
        return fail(c, USWAP_E_INVALID, "alloc: size %zu is not accepted; use a positive number of bytes", size);
    *rounded = (size + PAGE - 1) & ~(PAGE - 1);
    return 0;
}

int uswap_alloc(uswap_conn *c, size_t size, uswap_region *out)
{
    size_t n = 0;
    int r = check_size(c, size, &n);
    return r ? r : set_up(c, NULL, n, out);
}

int uswap_alloc_at(uswap_conn *c, void *addr, size_t size, uswap_region *out)
{
    size_t n = 0;
    int r = check_size(c, size, &n);
    if (r)
        return r;
    if (!addr || ((uintptr_t)addr & (PAGE - 1)))
        return fail(c, USWAP_E_INVALID, "alloc: address %p is not accepted; use a page-aligned, non-NULL address",
                    addr);
    return set_up(c, addr, n, out);
}

int uswap_discard(uswap_conn *c, const uswap_region *r, size_t offset, size_t length)
{
    char msg[160];
    uswap__format(msg, sizeof msg, "{\"op\":\"discard\",\"region\":%ld,\"offset\":%zu,\"length\":%zu}",
             r->id, offset, length);
    pthread_mutex_lock(&c->lock);
    int code = exchange(c, "discard", msg, NULL, 0);
    pthread_mutex_unlock(&c->lock);
    return code;
}

int uswap_free(uswap_conn *c, uswap_region *r)
{
    /* The order of uswap/client.py's Region.close: unregister (no unmap
     * event nobody reads), replace the mapping with a PROT_NONE
     * reservation, tell the daemon, unmap, close the fds. Until the daemon
     * has dropped the region its access sampler may still advise the
     * range (MADV_PAGEOUT): reserved, it cannot meanwhile hold new memory
     * of the program's that the advice would push to kernel swap. */
    struct uffdio_range range = { (uintptr_t)r->addr, r->size };
    if (r->addr) {
        ioctl(r->uffd, UFFDIO_UNREGISTER, &range);
        raw_reserve(r->addr, r->size);
    }
    char msg[64];
    uswap__format(msg, sizeof msg, "{\"op\":\"free\",\"region\":%ld}", r->id);
    pthread_mutex_lock(&c->lock);
    int code = c->sock >= 0 ? exchange(c, "free", msg, NULL, 0) : 0;
    pthread_mutex_unlock(&c->lock);
    if (r->addr)
        raw_munmap(r->addr, r->size);
    close(r->uffd);
    close(r->memfd);
    r->uffd = r->memfd = -1;
    r->addr = NULL;
    return code == USWAP_E_UNREACHABLE ? 0 : code;   /* a gone daemon frees it when it sees us go */
}

int uswap_status(uswap_conn *c, char **json)
{
    *json = NULL;
    pthread_mutex_lock(&c->lock);
    int code = send_msg(c, "{\"op\":\"status\"}", NULL, 0);
    char *reply = NULL;
    if (code < 0)
        code = fail(c, USWAP_E_UNREACHABLE, "status: sending to the uswap daemon: %s", errtext(-code));
    else
        code = recv_reply(c, NULL, 0, &reply);
    pthread_mutex_unlock(&c->lock);
    if (code)
        return code;
    code = verdict(c, reply, "status");
    const char *s, *e;
    if (code == 0 && !json_get(reply, "status", &s, &e))
        code = fail(c, USWAP_E_PROTOCOL, "status: a reply with no status object");
    if (code == 0) {
        memmove(reply, s, (size_t)(e - s));
        reply[e - s] = 0;
        *json = reply;
        return 0;
    }
    free(reply);
    return code;
}

/* ------------------------------------------------------------------ for the preload library */

const char *uswap__reply(const uswap_conn *c) { return c->reply; }

int uswap__received(uswap_conn *c, int *fds, int max)
{
    int n = c->nrfds < max ? c->nrfds : max;
    memcpy(fds, c->rfds, sizeof(int) * (size_t)n);
    for (int i = n; i < c->nrfds; i++)
        close(c->rfds[i]);
    c->nrfds = 0;
    return n;
}

void uswap__lock(uswap_conn *c) { pthread_mutex_lock(&c->lock); }
void uswap__unlock(uswap_conn *c) { pthread_mutex_unlock(&c->lock); }

void uswap__abandon(uswap_conn *c)
{
    /* A forked child's copy of its parent's connection: closed, nothing sent. */
    close_received(c);
    if (c->sock >= 0)
        close(c->sock);
    raw_munmap(c, sizeof *c);
}

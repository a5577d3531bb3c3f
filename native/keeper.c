/* The client's keeper (uswap/client.py): a C thread that notices when the
 * daemon's end of the connection goes away and, if the client's regions
 * are still registered (the daemon died or handed over; a drained daemon
 * unregistered them first), connects again with backoff and sends each
 * region's uffd and memfd in `adopt` messages (docs/protocol.md), so a new
 * daemon adopts them (uswap/daemon/adoption.py).
 *
 * Why C: a client thread that faults on a swapped page while the daemon is
 * dead blocks in the kernel until a daemon serves the fault -- holding
 * whatever it held, the GIL included when it is Python code. A Python
 * thread could then never run to reconnect; this one never takes the GIL.
 *
 * Invariant (fds): a region's fds are used here only under `mu`, and the
 * client removes a region (us_keeper_remove) before it closes its fds; the
 * watched connection is closed only by the client, after it took the new
 * one (us_keeper_take_sock).
 */
#ifndef _GNU_SOURCE
#define _GNU_SOURCE
#endif
#include "keeper.h"

#include <errno.h>
#include <fcntl.h>
#include <poll.h>
#include <pthread.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/un.h>
#include <time.h>
#include <unistd.h>

#define KEEPER_FIRST_DELAY 0.02   /* seconds; doubles to KEEPER_MAX_DELAY */
#define KEEPER_MAX_DELAY 1.0
#define KEEPER_IO_TIMEOUT 30      /* seconds for one reply of the new daemon */
#define KEEPER_BATCH 2            /* regions per adopt: two fds each, MAX_FDS is 4 */

struct us_keeper_region { int64_t id; uint64_t addr, size; int uffd, memfd; };

struct us_keeper {
    pthread_mutex_t mu;
    pthread_cond_t cv;
    pthread_t th;
    char path[108];
    double timeout;           /* give up reconnecting after this many seconds */
    int sock;                 /* the connection watched */
    int new_sock;             /* a new connection the client has not taken yet, or -1 */
    int stop_r, stop_w;
    int reconnecting;
    int reconnects;
    int gave_up;
    struct us_keeper_region *regions;
    int nregions, cap;
};

static double now_s(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return ts.tv_sec + ts.tv_nsec / 1e9;
}

/* 1 when [addr, +size) is still registered with a userfaultfd in this
 * process (VmFlags "um" in /proc/self/smaps at addr): a region a drained
 * daemon handed back is not, and needs no daemon. */
static int still_registered(uint64_t addr)
{
    FILE *f = fopen("/proc/self/smaps", "re");
    if (!f)
        return 1;   /* cannot tell: assume it needs a daemon */
    char line[512];
    int inside = 0, found = 0;
    while (fgets(line, sizeof line, f)) {
        unsigned long long lo, hi;
        if (sscanf(line, "%llx-%llx ", &lo, &hi) == 2 && strchr(line, '-') < strchr(line, ' ')) {
            inside = addr >= lo && addr < hi;
            continue;
        }
        if (inside && strncmp(line, "VmFlags:", 8) == 0) {
            found = strstr(line, " um") != NULL;
            break;
        }
    }
    fclose(f);
    return found;
}

static int write_all(int fd, const void *buf, size_t n)
{
    const char *p = buf;
    while (n) {
        ssize_t w = send(fd, p, n, MSG_NOSIGNAL);
        if (w < 0) {
            if (errno == EINTR)
                continue;
            return -1;
        }
        p += w;
        n -= (size_t)w;
    }
    return 0;
}

static int read_all(int fd, void *buf, size_t n)
{
    char *p = buf;
    while (n) {
        ssize_t r = recv(fd, p, n, 0);
        if (r < 0 && errno == EINTR)
            continue;
        if (r <= 0)
            return -1;
        p += r;
        n -= (size_t)r;
    }
    return 0;
}

/* One framed message (docs/protocol.md), fds on its first byte. */
static int send_msg(int fd, const char *json, const int *fds, int nfds)
{
    size_t len = strlen(json);
    unsigned char hdr[4] = { len >> 24, len >> 16, len >> 8, len };
    struct iovec iov = { hdr, 1 };
    char ctl[CMSG_SPACE(sizeof(int) * 4)];
    struct msghdr mh = { .msg_iov = &iov, .msg_iovlen = 1 };
    if (nfds) {
        memset(ctl, 0, sizeof ctl);
        mh.msg_control = ctl;
        mh.msg_controllen = CMSG_SPACE(sizeof(int) * nfds);
        struct cmsghdr *c = CMSG_FIRSTHDR(&mh);
        c->cmsg_level = SOL_SOCKET;
        c->cmsg_type = SCM_RIGHTS;
        c->cmsg_len = CMSG_LEN(sizeof(int) * nfds);
        memcpy(CMSG_DATA(c), fds, sizeof(int) * nfds);
    }
    ssize_t w;
    do
        w = sendmsg(fd, &mh, MSG_NOSIGNAL);
    while (w < 0 && errno == EINTR);
    if (w != 1)
        return -1;
    return write_all(fd, hdr + 1, 3) || write_all(fd, json, len) ? -1 : 0;
}

/* The reply's JSON text (malloc'ed, NUL-terminated), or NULL. */
static char *recv_msg(int fd)
{
    unsigned char hdr[4];
    if (read_all(fd, hdr, 4))
        return NULL;
    size_t len = (size_t)hdr[0] << 24 | hdr[1] << 16 | hdr[2] << 8 | hdr[3];
    if (len > (1 << 20))
        return NULL;
    char *body = malloc(len + 1);
    if (!body || read_all(fd, body, len)) {
        free(body);
        return NULL;
    }
    body[len] = 0;
    return body;
}

/* 1 when the reply has "ok" set to `value` ("true"/"false") anywhere, with
 * or without a space after the colon (protocol.py sends compact JSON). */
static int has_ok(const char *reply, const char *value)
{
    char a[32], b[32];
    snprintf(a, sizeof a, "\"ok\":%s", value);
    snprintf(b, sizeof b, "\"ok\": %s", value);
    return strstr(reply, a) != NULL || strstr(reply, b) != NULL;
}

static int dial(const char *path)
{
    int fd = socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0);
    if (fd < 0)
        return -1;
    struct sockaddr_un sa = { .sun_family = AF_UNIX };
    snprintf(sa.sun_path, sizeof sa.sun_path, "%s", path);
    struct timeval tv = { KEEPER_IO_TIMEOUT, 0 };
    setsockopt(fd, SOL_SOCKET, SO_RCVTIMEO, &tv, sizeof tv);
    if (connect(fd, (struct sockaddr *)&sa, sizeof sa) < 0)
        goto fail;
    if (send_msg(fd, "{\"op\": \"hello\", \"version\": 1}", NULL, 0))
        goto fail;
    char *reply = recv_msg(fd);
    int ok = reply && has_ok(reply, "true");
    free(reply);
    if (ok)
        return fd;
fail:
    close(fd);
    return -1;
}

static int count_ok_true(const char *reply)
{
    int n = 0;
    for (const char *p = reply; (p = strstr(p, "\"ok\":")); p += 5) {
        const char *v = p + 5;
        while (*v == ' ')
            v++;
        n += strncmp(v, "true", 4) == 0;
    }
    return n;
}

/* Under mu: send every region still registered to the daemon on fd; the
 * number it adopted, or -1 when the connection failed. */
static int adopt_all(struct us_keeper *k, int fd)
{
    int adopted = 0;
    for (int i = 0; i < k->nregions; i += KEEPER_BATCH) {
        char json[512];
        int fds[2 * KEEPER_BATCH], nfds = 0, pos;
        pos = snprintf(json, sizeof json, "{\"op\": \"adopt\", \"regions\": [");
        for (int j = i; j < k->nregions && j < i + KEEPER_BATCH; j++) {
            struct us_keeper_region *r = &k->regions[j];
            if (!still_registered(r->addr))
                continue;
            pos += snprintf(json + pos, sizeof json - pos, "%s{\"id\": %lld, \"addr\": %llu, \"size\": %llu}",
                            nfds ? ", " : "", (long long)r->id, (unsigned long long)r->addr,
                            (unsigned long long)r->size);
            fds[nfds++] = r->uffd;
            fds[nfds++] = r->memfd;
        }
        snprintf(json + pos, sizeof json - pos, "]}");
        if (!nfds)
            continue;
        if (send_msg(fd, json, fds, nfds))
            return -1;
        char *reply = recv_msg(fd);
        if (!reply)
            return -1;
        if (has_ok(reply, "false"))
            fprintf(stderr, "uswap: pid %d: the new daemon did not adopt every region: %s\n", getpid(), reply);
        adopted += count_ok_true(reply) - 1;   /* one "ok": true is the reply's own */
        free(reply);
    }
    return adopted;
}

static int any_registered(struct us_keeper *k)
{
    for (int i = 0; i < k->nregions; i++)
        if (still_registered(k->regions[i].addr))
            return 1;
    return 0;
}

/* 1: a new connection with every region adopted; 0: stop asked, nothing to do, or gave up. */
static int reconnect(struct us_keeper *k)
{
    double deadline = now_s() + k->timeout, delay = KEEPER_FIRST_DELAY;
    for (;;) {
        pthread_mutex_lock(&k->mu);
        int need = any_registered(k);
        pthread_mutex_unlock(&k->mu);
        if (!need)
            return 0;
        int fd = dial(k->path);
        if (fd >= 0) {
            pthread_mutex_lock(&k->mu);
            int adopted = adopt_all(k, fd);
            if (adopted > 0) {
                /* The timeout bounded the keeper's own exchange (dial): the
                 * connection is the client's now, whose replies may take
                 * as long as the daemon needs (a free behind a slow store),
                 * as on the connection it made itself. */
                struct timeval none = { 0, 0 };
                setsockopt(fd, SOL_SOCKET, SO_RCVTIMEO, &none, sizeof none);
                k->sock = fd;
                k->new_sock = fd;
                k->reconnects++;
            }
            pthread_mutex_unlock(&k->mu);
            if (adopted > 0)
                return 1;
            close(fd);
            if (adopted == 0)
                return 0;   /* a daemon answered and adopted none: nobody will (it says why on stderr) */
        }
        if (now_s() > deadline) {
            fprintf(stderr, "uswap: pid %d: no uswap daemon took the regions back at %s within %.0fs;"
                    " threads touching their swapped pages stay blocked\n", getpid(), k->path, k->timeout);
            return 0;
        }
        struct pollfd p = { k->stop_r, POLLIN, 0 };
        if (poll(&p, 1, (int)(delay * 1000)) > 0)
            return 0;
        delay = delay * 2 > KEEPER_MAX_DELAY ? KEEPER_MAX_DELAY : delay * 2;
    }
}

static void *keeper_main(void *arg)
{
    struct us_keeper *k = arg;
    pthread_setname_np(pthread_self(), "uswap-keeper");   /* in the client: as top -H shows it */
    for (;;) {
        struct pollfd p[2] = { { k->stop_r, POLLIN, 0 }, { k->sock, POLLRDHUP, 0 } };
        if (poll(p, 2, -1) < 0) {
            if (errno == EINTR)
                continue;
            break;
        }
        if (p[0].revents)
            break;
        if (!(p[1].revents & (POLLRDHUP | POLLHUP | POLLERR | POLLNVAL)))
            continue;
        pthread_mutex_lock(&k->mu);
        k->reconnecting = 1;
        pthread_mutex_unlock(&k->mu);
        int ok = reconnect(k);
        pthread_mutex_lock(&k->mu);
        k->reconnecting = 0;
        k->gave_up = !ok;
        pthread_cond_broadcast(&k->cv);
        pthread_mutex_unlock(&k->mu);
        if (!ok)
            break;
    }
    return NULL;
}

struct us_keeper *us_keeper_new(const char *path, int sock, double timeout)
{
    struct us_keeper *k = calloc(1, sizeof *k);
    int pfd[2];
    if (!k || pipe2(pfd, O_CLOEXEC) < 0) {
        free(k);
        return NULL;
    }
    pthread_mutex_init(&k->mu, NULL);
    pthread_cond_init(&k->cv, NULL);
    snprintf(k->path, sizeof k->path, "%s", path);
    k->timeout = timeout;
    k->sock = sock;
    k->new_sock = -1;
    k->stop_r = pfd[0];
    k->stop_w = pfd[1];
    if (pthread_create(&k->th, NULL, keeper_main, k)) {
        close(pfd[0]);
        close(pfd[1]);
        free(k);
        return NULL;
    }
    return k;
}

int us_keeper_add(struct us_keeper *k, int64_t id, uint64_t addr, uint64_t size, int uffd, int memfd)
{
    pthread_mutex_lock(&k->mu);
    if (k->nregions == k->cap) {
        int cap = k->cap ? 2 * k->cap : 8;
        void *grown = realloc(k->regions, cap * sizeof *k->regions);
        if (!grown) {
            pthread_mutex_unlock(&k->mu);
            return -ENOMEM;
        }
        k->regions = grown;
        k->cap = cap;
    }
    k->regions[k->nregions++] = (struct us_keeper_region){ id, addr, size, uffd, memfd };
    pthread_mutex_unlock(&k->mu);
    return 0;
}

void us_keeper_remove(struct us_keeper *k, uint64_t addr)
{
    pthread_mutex_lock(&k->mu);
    for (int i = 0; i < k->nregions; i++)
        if (k->regions[i].addr == addr) {
            k->regions[i] = k->regions[--k->nregions];
            break;
        }
    pthread_mutex_unlock(&k->mu);
}

/* After a fork_attach in a child: a region's new id and fds. */
void us_keeper_update(struct us_keeper *k, uint64_t addr, int64_t id, int uffd, int memfd)
{
    pthread_mutex_lock(&k->mu);
    for (int i = 0; i < k->nregions; i++)
        if (k->regions[i].addr == addr) {
            k->regions[i].id = id;
            k->regions[i].uffd = uffd;
            k->regions[i].memfd = memfd;
        }
    pthread_mutex_unlock(&k->mu);
}

/* Under mu: sleep on cv until signalled or 50 ms have passed (the callers
 * check their deadline between two waits). */
static void wait_on_cv(struct us_keeper *k)
{
    struct timespec ts;
    clock_gettime(CLOCK_REALTIME, &ts);
    ts.tv_nsec += 50 * 1000 * 1000;
    if (ts.tv_nsec >= 1000000000) {
        ts.tv_sec++;
        ts.tv_nsec -= 1000000000;
    }
    pthread_cond_timedwait(&k->cv, &k->mu, &ts);
}

/* Called with mu held; releases it. The new connection's fd, now the
 * client's, or -1 when there is none. */
static int take_new_sock_locked(struct us_keeper *k)
{
    int fd = k->new_sock;
    k->new_sock = -1;
    pthread_mutex_unlock(&k->mu);
    return fd;
}

/* Wait (up to timeout seconds) while a reconnect is under way; then the new
 * connection's fd if there is one the client has not taken, else -1. */
int us_keeper_take_sock(struct us_keeper *k, double timeout)
{
    pthread_mutex_lock(&k->mu);
    double deadline = now_s() + timeout;
    while (k->reconnecting && now_s() < deadline) {
        wait_on_cv(k);
    }
    return take_new_sock_locked(k);
}

/* A request of the client failed because the daemon went away, perhaps
 * before this thread noticed: wait (up to timeout seconds) for the next
 * connection, whether or not the reconnect has begun yet. Its fd, or -1 when
 * the keeper gave up (or stopped) or the time ran out. */
int us_keeper_await_sock(struct us_keeper *k, double timeout)
{
    pthread_mutex_lock(&k->mu);
    double deadline = now_s() + timeout;
    while (k->new_sock < 0 && !k->gave_up && now_s() < deadline) {
        wait_on_cv(k);
    }
    return take_new_sock_locked(k);
}

int us_keeper_reconnects(struct us_keeper *k)
{
    pthread_mutex_lock(&k->mu);
    int n = k->reconnects;
    pthread_mutex_unlock(&k->mu);
    return n;
}

/* A deliberate close: the thread ends (joined), nothing is reconnected. */
void us_keeper_stop(struct us_keeper *k)
{
    if (write(k->stop_w, "x", 1) < 0) {
        /* the pipe is ours and empty: cannot fail */
    }
    pthread_join(k->th, NULL);
    close(k->stop_r);
    close(k->stop_w);
    free(k->regions);
    free(k);
}

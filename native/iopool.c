/* A pool of plain C threads for the data path of the file and nfs:// stores.
 *
 * Why it exists: the daemon's Python I/O threads need the GIL between system
 * calls, and the engine thread holds it while it works, so a swap-in spent
 * ~30 us waiting to be picked up and ~15 us more between the read and the
 * map (measured with per-fault timestamps). These threads never touch
 * Python: the engine queues a job (plain memory it keeps alive), a worker
 * does the system calls, pushes the job's token on a completion list and
 * pokes an eventfd that the engine's epoll watches. These threads change no
 * page state: the engine applies a job's outcome, under the page lock, when
 * it reaps the token.
 *
 * Jobs:
 *   READ_COPY  pread len bytes at off into buf, then readmap.h's
 *              us_verify_map, the one verify-and-map routine of every
 *              swap-in: checksum each page into sums and map at dst in uffd
 *              the pages whose sum matches `expected`, with `mode`, the page
 *              at index write_page (a write fault's; US_NO_WRITE_PAGE for
 *              none) writable. A page that fails its check is never mapped
 *              (invariant 6), and its neighbours are not held back by it:
 *              the engine sees which pages failed (sums != expected) and
 *              retries only those.
 *              result = the pread's bytes or -errno; copied = bytes mapped
 *              (the passing pages; all of len when every page passed), or
 *              -errno of a COPY; present = pages found present (EEXIST) and
 *              kept, their waiters woken (they can only hold newer data).
 *   SUM_WRITE  checksum the pages at buf into sums and flag the all-zero
 *              ones in `zero` (pagesum.h, one pass), then pwrite them at
 *              off; with `gather`, the pages are first copied into buf from
 *              there. result = bytes written or -errno.
 *   READ_COPY_NFS, SUM_WRITE_NFS
 *              the same on the nfs:// store: the store call is libnfs's
 *              nfs_pread/nfs_pwrite on the job's context and file handle
 *              (nfs_io.h), -ETIMEDOUT once the context's timeout expires, and
 *              a read that comes back short (end of file) is -EIO. A libnfs
 *              4.0 context is not thread-safe: the engine lends each context
 *              to one job at a time (NfsStore.checkout/checkin), so a worker
 *              owns the context it is handed for the length of the job. A
 *              stalled server blocks only the worker holding that context.
 *
 * Workers run with every signal blocked, so signals go to the daemon's
 * Python threads and never interrupt a worker's call (libnfs's sync loop
 * fails a call whose poll() is interrupted).
 */
#ifndef _GNU_SOURCE
#define _GNU_SOURCE
#endif
#include <errno.h>
#include <pthread.h>
#include <signal.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>
#include "store_io.h"
#include "pagesum.h"
#include "readmap.h"
#include "iopool.h"

struct us_pool {
    pthread_mutex_t lock;
    pthread_cond_t more;
    struct us_job *head, *tail;      /* queued */
    uint64_t *done;                  /* completed tokens, a growable array */
    size_t ndone, capdone;
    int eventfd;
    int stopping;
    int nthreads;
    pthread_t threads[64];
};

/* The job's store call (store_io.h): the whole range read or written, or
 * -errno. An nfs:// job's fd is not set: its op says which store it is. */
static int64_t store_io(struct us_job *j, int write)
{
    int nfs = j->op == US_JOB_READ_COPY_NFS || j->op == US_JOB_SUM_WRITE_NFS;
    return us_store_io(write, nfs ? -1 : j->fd, j->nfs, j->nfsfh, j->buf, j->len, j->off);
}

static void run_job(struct us_job *j)
{
    uint64_t npages = j->len / 4096;
    if (j->op == US_JOB_READ_COPY || j->op == US_JOB_READ_COPY_NFS) {
        j->copied = 0;
        j->result = store_io(j, 0);
        if (j->result < 0)
            return;
        j->copied = us_verify_map(j->uffd, j->dst, j->buf, npages, j->mode, j->write_page, j->expected,
                                  j->sums, j->skip, &j->present);
    } else {
        /* Scattered pages bound for adjacent slots: gathered into the job's
         * buffer (they are write-protected in the client: stable bytes). */
        for (uint64_t i = 0; j->gather && i < npages; i++)
            memcpy((void *)(uintptr_t)(j->buf + i * 4096), (const void *)(uintptr_t)j->gather[i], 4096);
        us_page_sums(j->buf, npages, j->sums, j->zero);
        j->result = store_io(j, 1);
    }
}

static void *worker(void *arg)
{
    struct us_pool *p = arg;
    pthread_setname_np(pthread_self(), "uswap-io");   /* as top -H and /proc show it */
    for (;;) {
        pthread_mutex_lock(&p->lock);
        while (!p->head && !p->stopping)
            pthread_cond_wait(&p->more, &p->lock);
        if (!p->head) {
            pthread_mutex_unlock(&p->lock);
            return NULL;
        }
        struct us_job *j = p->head;
        p->head = j->next;
        if (!p->head)
            p->tail = NULL;
        pthread_mutex_unlock(&p->lock);

        run_job(j);

        pthread_mutex_lock(&p->lock);
        if (p->ndone == p->capdone) {
            size_t cap = p->capdone ? p->capdone * 2 : 256;
            uint64_t *grown = realloc(p->done, cap * sizeof(uint64_t));
            if (!grown)
                abort();   /* the daemon cannot lose a completion */
            p->done = grown;
            p->capdone = cap;
        }
        p->done[p->ndone++] = j->token;
        pthread_mutex_unlock(&p->lock);
        uint64_t one = 1;
        ssize_t w = write(p->eventfd, &one, sizeof(one));
        (void)w;
    }
}

static struct us_pool *us_pool_new(int nthreads, int eventfd)
{
    if (nthreads < 1 || nthreads > 64)
        return NULL;
    struct us_pool *p = calloc(1, sizeof(*p));
    if (!p)
        return NULL;
    pthread_mutex_init(&p->lock, NULL);
    pthread_cond_init(&p->more, NULL);
    p->eventfd = eventfd;
    /* Workers inherit the creating thread's signal mask: block everything
     * while they start (see the top of this file), then restore. */
    sigset_t all, old;
    sigfillset(&all);
    pthread_sigmask(SIG_BLOCK, &all, &old);
    for (int i = 0; i < nthreads; i++) {
        if (pthread_create(&p->threads[i], NULL, worker, p) != 0)
            break;
        p->nthreads++;
    }
    pthread_sigmask(SIG_SETMASK, &old, NULL);
    return p;
}

static void us_pool_submit(struct us_pool *p, struct us_job *j)
{
    j->next = NULL;
    pthread_mutex_lock(&p->lock);
    if (p->tail)
        p->tail->next = j;
    else
        p->head = j;
    p->tail = j;
    pthread_cond_signal(&p->more);
    pthread_mutex_unlock(&p->lock);
}

/* Move up to max completed tokens into out; returns how many. */
static int us_pool_reap(struct us_pool *p, uint64_t *out, int max)
{
    pthread_mutex_lock(&p->lock);
    int n = (int)(p->ndone < (size_t)max ? p->ndone : (size_t)max);
    memcpy(out, p->done, (size_t)n * sizeof(uint64_t));
    memmove(p->done, p->done + n, (p->ndone - (size_t)n) * sizeof(uint64_t));
    p->ndone -= (size_t)n;
    pthread_mutex_unlock(&p->lock);
    return n;
}

/* Finish queued jobs, join the threads, free the pool. */
static void us_pool_stop(struct us_pool *p)
{
    pthread_mutex_lock(&p->lock);
    p->stopping = 1;
    pthread_cond_broadcast(&p->more);
    pthread_mutex_unlock(&p->lock);
    for (int i = 0; i < p->nthreads; i++)
        pthread_join(p->threads[i], NULL);
    free(p->done);
    free(p);
}

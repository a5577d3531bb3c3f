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
 *   READ_COPY  pread len bytes at off into buf -- or, for a stream's window
 *              over scattered slots (`runs` set), each of its nruns runs of
 *              adjacent slots into its place in buf, one read per run, the
 *              pages between runs left unread (they are the window's `skip`
 *              pages, never mapped) -- then readmap.h's us_verify_map, the one verify-and-map routine of every
 *              swap-in: checksum each page into sums and map at dst in uffd
 *              the pages whose sum matches `expected`, with `mode`, the page
 *              at index write_page (a write fault's; US_NO_WRITE_PAGE for
 *              none) writable. A page that fails its check is never mapped
 *              (invariant 6), and its neighbours are not held back by it:
 *              the engine sees which pages failed (sums != expected) and
 *              retries only those.
 *              result = the bytes read or -errno (a failed run's: off and len
 *              are then set to that run's, for the error's message, and
 *              nothing is mapped); copied = bytes mapped
 *              (the passing pages; all of len when every page passed), or
 *              -errno of a COPY, and `mapped` says which pages were mapped
 *              before it stopped; present = pages found present in the
 *              memfd (EEXIST: not the client's, which has the page as a
 *              hole) and replaced by their verified store copies, written
 *              through `view` and mapped by CONTINUE (the store copy wins).
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
#include <sys/syscall.h>
#include <linux/aio_abi.h>
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

/* The file store's reads of runs [from, to) of a job, in flight together
 * (Linux AIO on the O_DIRECT fd: a window's scattered runs are read at the
 * device's queue depth, not one after another), each on the worker's own
 * AIO context. A run that came back short is finished with us_fd_full. 0,
 * or -errno of the first run that failed, its index in *failed; -ENOSYS
 * when AIO is not there (the caller reads one run at a time). */
#define AIO_BATCH 64
static __thread aio_context_t worker_aio;
static __thread int worker_aio_state;   /* 0: not tried, 1: ready, -1: unavailable */

static int64_t aio_read_runs(struct us_job *j, int64_t from, int64_t to, int64_t *failed)
{
    if (worker_aio_state == 0)
        worker_aio_state = syscall(SYS_io_setup, AIO_BATCH, &worker_aio) == 0 ? 1 : -1;
    if (worker_aio_state < 0)
        return -ENOSYS;
    struct iocb cbs[AIO_BATCH], *list[AIO_BATCH];
    struct io_event events[AIO_BATCH];
    int n = (int)(to - from);
    for (int i = 0; i < n; i++) {
        const int64_t *run = j->runs + 3 * (from + i);
        memset(&cbs[i], 0, sizeof(cbs[i]));
        cbs[i].aio_lio_opcode = IOCB_CMD_PREAD;
        cbs[i].aio_fildes = (uint32_t)j->fd;
        cbs[i].aio_buf = j->buf + (uint64_t)run[0] * 4096;
        cbs[i].aio_nbytes = (uint64_t)run[2] * 4096;
        cbs[i].aio_offset = run[1] * 4096;
        cbs[i].aio_data = (uint64_t)i;
        list[i] = &cbs[i];
    }
    int submitted = 0;
    while (submitted < n) {
        long r = syscall(SYS_io_submit, worker_aio, (long)(n - submitted), list + submitted);
        if (r < 0 && errno == EINTR)
            continue;
        if (r <= 0)
            break;
        submitted += (int)r;
    }
    int64_t res[AIO_BATCH];
    for (int i = 0; i < n; i++)
        res[i] = i < submitted ? 1 : -EAGAIN;   /* 1: in flight; not submitted: read below */
    for (int got = 0; got < submitted;) {
        long r = syscall(SYS_io_getevents, worker_aio, 1L, (long)(submitted - got), events + got, NULL);
        if (r < 0 && errno == EINTR)
            continue;
        if (r < 0)
            abort();   /* reads in flight into the job's buffer cannot be abandoned */
        got += (int)r;
    }
    for (int i = 0; i < submitted; i++)
        res[events[i].data] = events[i].res;
    for (int i = 0; i < n; i++) {
        const int64_t *run = j->runs + 3 * (from + i);
        uint64_t len = (uint64_t)run[2] * 4096;
        int64_t got = res[i];
        if (got >= 0 && (uint64_t)got < len) {   /* short, or never submitted: the rest synchronously */
            int64_t rest = us_fd_full(0, j->fd, j->buf + (uint64_t)run[0] * 4096 + (uint64_t)got,
                                      len - (uint64_t)got, run[1] * 4096 + got);
            got = rest < 0 ? rest : (int64_t)len;
        } else if (got == -EAGAIN) {
            got = us_fd_full(0, j->fd, j->buf + (uint64_t)run[0] * 4096, len, run[1] * 4096);
        }
        if (got < 0) {
            *failed = from + i;
            return got;
        }
    }
    return 0;
}

/* A READ_COPY job's reads: the whole range, or each run of `runs` into its
 * place in the buffer (see the top of this file): on the file store in
 * flight together (aio_read_runs), on nfs:// one after another on the
 * job's context. Bytes read, or -errno of a run that failed (off and len
 * then name that run). */
static int64_t read_runs(struct us_job *j)
{
    if (!j->runs)
        return store_io(j, 0);
    int nfs = j->op == US_JOB_READ_COPY_NFS;
    int64_t total = 0, failed = -1, err = 0;
    for (int64_t r = 0; r < j->nruns && !err; r++)
        total += j->runs[3 * r + 2] * 4096;
    for (int64_t from = 0; !nfs && from < j->nruns && !err; from += AIO_BATCH) {
        int64_t to = from + AIO_BATCH < j->nruns ? from + AIO_BATCH : j->nruns;
        err = aio_read_runs(j, from, to, &failed);
        if (err == -ENOSYS) {
            err = 0;
            break;
        }
        if (to == j->nruns && !err)
            return total;
    }
    for (int64_t r = 0; r < j->nruns && !err; r++) {
        const int64_t *run = j->runs + 3 * r;
        int64_t got = us_store_io(0, nfs ? -1 : j->fd, j->nfs, j->nfsfh, j->buf + (uint64_t)run[0] * 4096,
                                  (uint64_t)run[2] * 4096, run[1] * 4096);
        if (got < 0) {
            err = got;
            failed = r;
        }
    }
    if (!err)
        return total;
    j->off = j->runs[3 * failed + 1] * 4096;
    j->len = (uint64_t)j->runs[3 * failed + 2] * 4096;
    return err;
}

static void run_job(struct us_job *j)
{
    uint64_t npages = j->len / 4096;
    if (j->op == US_JOB_READ_COPY || j->op == US_JOB_READ_COPY_NFS) {
        j->copied = 0;
        j->result = read_runs(j);
        if (j->result < 0)
            return;
        j->copied = us_verify_map(j->uffd, j->dst, j->view, j->buf, npages, j->mode, j->write_page, j->expected,
                                  j->sums, j->skip, j->mapped, &j->present);
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
            if (worker_aio_state > 0)
                syscall(SYS_io_destroy, worker_aio);
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

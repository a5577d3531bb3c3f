/* Whole-range NFS reads and writes and libnfs's error mapping (header-only),
 * shared by the nfs:// store's binding (nfs.c) and the C I/O pool (iopool.c).
 * The caller owns the context: a libnfs 4.0 context is not thread-safe, so it
 * is used by one thread (one job) at a time. */
#ifndef USWAP_NFS_IO_H
#define USWAP_NFS_IO_H
#include <errno.h>
#include <stdint.h>

#ifdef USWAP_WITHOUT_LIBNFS
/* Built without libnfs (native/libnfs_option.py): no nfs:// store can be
 * opened, so no job ever names a context; the call exists for the callers'
 * sake and fails as unsupported. */
struct nfs_context;
struct nfsfh;

static int64_t us_nfs_full(int write, struct nfs_context *nfs, struct nfsfh *fh,
                           uint64_t addr, uint64_t len, uint64_t off)
{
    (void)write; (void)nfs; (void)fh; (void)addr; (void)len; (void)off;
    return -ENOSYS;
}
#else
#include <sys/time.h> /* libnfs.h uses struct timeval without including it */
#include <nfsc/libnfs.h>

/* Largest byte count handed to one nfs_pread/nfs_pwrite call (they return
 * int).  libnfs itself splits a call into READ3/WRITE3 RPCs of at most the
 * server's nfs_get_readmax/writemax (1 MiB for ganesha). */
#define US_NFS_MAX_CALL (64u << 20)

/* libnfs 4.0 completes an RPC cancelled at the nfs_set_timeout() deadline
 * with -EINTR (error text "Command was cancelled" / "command timed out"; a
 * failed poll() in its sync loop is -EIO instead), so report it as the
 * timeout it is. */
static int us_nfs_err(int r)
{
    if (r == -EINTR)
        return -ETIMEDOUT;
    return r < 0 ? r : -EIO;
}

/* Read or write the whole range [off, off + len) through addr, looping over
 * partial transfers.  A write returns len or -errno (a call that makes no
 * progress is -EIO: the server accepted nothing); a read returns the byte
 * count, which is short only at end of file, or -errno. */
static int64_t us_nfs_full(int write, struct nfs_context *nfs, struct nfsfh *fh,
                           uint64_t addr, uint64_t len, uint64_t off)
{
    uint64_t done = 0;
    while (done < len) {
        uint64_t n = len - done;
        if (n > US_NFS_MAX_CALL)
            n = US_NFS_MAX_CALL;
        void *p = (void *)(uintptr_t)(addr + done);
        int r = write ? nfs_pwrite(nfs, fh, off + done, n, p) : nfs_pread(nfs, fh, off + done, n, p);
        if (r < 0 || (r == 0 && write))
            return us_nfs_err(r);
        if (r == 0)
            break; /* read: end of file */
        done += (uint64_t)r;
    }
    return (int64_t)done;
}
#endif /* USWAP_WITHOUT_LIBNFS */

#endif

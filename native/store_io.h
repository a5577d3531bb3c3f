/* One whole-range store call of the C data path, shared by the C I/O pool's
 * jobs (iopool.c) and the fault threads' loads (fastpath.c): the file
 * store's O_DIRECT fd when fd >= 0, else libnfs on the context lent to the
 * caller alone (nfs_io.h: a libnfs 4.0 context is not thread-safe). The
 * store is fixed-size, so a transfer that comes back short (past the end
 * of the store file) is -EIO. Returns len or -errno. */
#ifndef USWAP_STORE_IO_H
#define USWAP_STORE_IO_H
#include <errno.h>
#include <stdint.h>
#include "nfs_io.h" /* includes <sys/time.h> before <nfsc/libnfs.h> */
#include "fd_io.h"

static int64_t us_store_io(int write, int fd, struct nfs_context *nfs, struct nfsfh *fh, uint64_t buf,
                           uint64_t len, int64_t off)
{
    if (fd >= 0)
        return us_fd_full(write, fd, buf, len, off);
    int64_t r = us_nfs_full(write, nfs, fh, buf, len, (uint64_t)off);
    return (r >= 0 && (uint64_t)r < len) ? -EIO : r;
}

#endif

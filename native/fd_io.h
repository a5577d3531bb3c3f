/* Whole-range pread/pwrite on a file descriptor, shared by the dio shim and
 * the C I/O pool. A short transfer at end of file is -EIO: the store is
 * fixed-size, so missing bytes mean the data is not there. */
#ifndef USWAP_FD_IO_H
#define USWAP_FD_IO_H
#include <errno.h>
#include <stdint.h>
#include <unistd.h>

static int64_t us_fd_full(int write, int fd, uint64_t addr, uint64_t len, int64_t off)
{
    uint64_t done = 0;
    while (done < len) {
        ssize_t r = write ? pwrite(fd, (const char *)addr + done, len - done, off + (off_t)done)
                          : pread(fd, (char *)addr + done, len - done, off + (off_t)done);
        if (r < 0) {
            if (errno == EINTR)
                continue;
            return -errno;
        }
        if (r == 0)
            return -EIO;
        done += (uint64_t)r;
    }
    return (int64_t)done;
}

#endif

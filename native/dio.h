/* The dio shim's entry points (native/dio.c): declared here once, read by
 * the compiler and, through cdef_reader.py, by the cffi build (dio_build.py)
 * that gives Python its view (uswap/native.py). dio.c says what each does;
 * the page checksums it also exports are declared in pagesum.h. */
#ifndef USWAP_DIO_H
#define USWAP_DIO_H

#include <stdint.h>

/* cdef: begin */
static int us_open_direct(const char *path, int flags, int mode);
static int64_t us_pread_full(int fd, uint64_t addr, uint64_t len, int64_t off);
static int64_t us_pwrite_full(int fd, uint64_t addr, uint64_t len, int64_t off);
static int us_fallocate(int fd, int mode, int64_t off, int64_t len);
static int us_punch_hole(int fd, int64_t off, int64_t len);
static int64_t us_mmap(uint64_t len, int prot, int flags, int fd, int64_t off);
static int us_munmap(uint64_t addr, uint64_t len);
static int us_reserve(uint64_t addr, uint64_t len);
static int us_mlockall(int flags);
static int64_t us_aligned_alloc(uint64_t align, uint64_t size);
static void us_free(uint64_t addr);
static int64_t us_fs_type(int fd);
/* cdef: end */

#endif

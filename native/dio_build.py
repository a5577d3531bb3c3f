"""cffi build script for uswap._dio_cffi: direct I/O, mmap, checksums (native/dio.c;
the checksums are native/pagesum.h's CRC32C and all-zero flag)."""
import os

from cffi import FFI

HERE = os.path.dirname(os.path.abspath(__file__))

CDEF = """
int us_open_direct(const char *path, int flags, int mode);
int64_t us_pread_full(int fd, uint64_t addr, uint64_t len, int64_t off);
int64_t us_pwrite_full(int fd, uint64_t addr, uint64_t len, int64_t off);
int us_fallocate(int fd, int mode, int64_t off, int64_t len);
int us_punch_hole(int fd, int64_t off, int64_t len);
int64_t us_mmap(uint64_t len, int prot, int flags, int fd, int64_t off);
int us_munmap(uint64_t addr, uint64_t len);
int us_mlockall(int flags);
int64_t us_aligned_alloc(uint64_t align, uint64_t size);
void us_free(uint64_t addr);
void us_page_sums(uint64_t addr, uint64_t npages, uint32_t *sums, uint8_t *zero);
uint32_t us_crc32c(const void *data, uint64_t len, int hw);
int us_crc32c_hw_available(void);
int64_t us_fs_type(int fd);
"""

ffi = FFI()
ffi.cdef(CDEF)
with open(os.path.join(HERE, "dio.c")) as f:
    ffi.set_source("uswap._dio_cffi", f.read(), include_dirs=[HERE], extra_compile_args=["-O2", "-Wall"])

if __name__ == "__main__":
    ffi.compile(tmpdir=os.path.join(HERE, "..", "build"), verbose=True)

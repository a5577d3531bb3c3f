"""cffi build script for uswap._uffd_cffi: the userfaultfd ioctls (native/uffd.c)."""
import os

from cffi import FFI

HERE = os.path.dirname(os.path.abspath(__file__))

CDEF = """
struct us_event {
    uint8_t kind;
    uint64_t flags;
    uint64_t addr;
    uint64_t end;
    uint32_t tid;
};
int us_uffd_open(int user_mode_only);
int us_uffd_api(int fd, uint64_t features, uint64_t *out_features, uint64_t *out_ioctls);
int us_uffd_register(int fd, uint64_t start, uint64_t len, uint64_t mode, uint64_t *out_ioctls);
int us_uffd_unregister(int fd, uint64_t start, uint64_t len);
int64_t us_uffd_copy(int fd, uint64_t dst, uint64_t src, uint64_t len, uint64_t mode);
int64_t us_uffd_zeropage(int fd, uint64_t start, uint64_t len, uint64_t mode);
int64_t us_uffd_continue(int fd, uint64_t start, uint64_t len, uint64_t mode);
int us_uffd_writeprotect(int fd, uint64_t start, uint64_t len, uint64_t mode);
int us_uffd_wake(int fd, uint64_t start, uint64_t len);
int64_t us_uffd_poison(int fd, uint64_t start, uint64_t len, uint64_t mode);
int us_uffd_read_events(int fd, struct us_event *out, int max);
int64_t us_verify_and_copy(uint64_t buf, uint64_t n, const uint32_t *expected,
                           uint32_t *found, int fd, uint64_t dst, uint64_t mode);
"""

ffi = FFI()
ffi.cdef(CDEF)
with open(os.path.join(HERE, "uffd.c")) as f:
    ffi.set_source("uswap._uffd_cffi", f.read(), include_dirs=[HERE], extra_compile_args=["-O2", "-Wall"])

if __name__ == "__main__":
    ffi.compile(tmpdir=os.path.join(HERE, "..", "build"), verbose=True)

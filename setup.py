# setuptools needs setup() to carry cffi_modules; all metadata lives in pyproject.toml.
from setuptools import setup

setup(
    cffi_modules=[
        "native/uffd_build.py:ffi",
        "native/dio_build.py:ffi",
        "native/nfs_build.py:ffi",
        "native/iopool_build.py:ffi",
        "native/fastpath_build.py:ffi",
    ],
)

# setuptools needs setup() to carry cffi_modules; all metadata lives in pyproject.toml.
# Which modules are built (libnfs is optional) is decided in native/libnfs_option.py.
import os
import sys

from setuptools import setup

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "native"))
sys.dont_write_bytecode = True  # no __pycache__ in native/ (scripts/setup hashes its files)
import libnfs_option  # noqa: E402

setup(cffi_modules=libnfs_option.cffi_modules())

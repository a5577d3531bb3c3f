"""uswap: a userspace swap daemon over userfaultfd, with an NFS-friendly direct-I/O store."""
from uswap.client import Client, Region, UswapError, connect

__all__ = ["Client", "Region", "UswapError", "connect"]
__version__ = "0.1.0"

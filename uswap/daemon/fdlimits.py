"""The daemon's open-file limit: how many fds its settings can need, raising
the soft limit toward that at start, and the answer a client gets when the
fd table is full (EMFILE). Used by connections.py and ops.py; lines are
logged as `uswap.server`, as the rest of the socket side's."""
from __future__ import annotations

import logging
import resource

from uswap.config import Config

log = logging.getLogger("uswap.server")

# File descriptors the daemon itself needs besides its clients' (store, epoll,
# eventfds, NFS sockets of the I/O threads, the fast path's, logging, slack).
NOFILE_OWN = 512
# A region's uffd and memfd.
FDS_PER_REGION = 2


def nofile_needed(cfg: Config) -> int:
    """Open files the daemon can need at its configured limits: one socket per
    connection, a client's /proc/PID/status (clientmaps.StatusFile, kept
    open by its session) and its pidfd (connections.peer_pidfd, for the
    sampler), and a uffd and a memfd per region of every client (a page
    table's file in the state directory is mapped with no fd kept open)."""
    connections = cfg.max_clients + cfg.control_connections
    return (NOFILE_OWN + connections + 2 * cfg.max_clients
            + FDS_PER_REGION * cfg.max_clients * cfg.max_regions_per_client)


def raise_nofile_limit(cfg: Config) -> int:
    """Raise the soft RLIMIT_NOFILE toward the hard limit, as far as the
    configured limits need (the default soft limit of a service, 1024, holds
    only ~500 regions). Logs what it set; returns the soft limit in force."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    needed = nofile_needed(cfg)
    ceiling = hard if hard != resource.RLIM_INFINITY else max(soft, needed)
    target = min(ceiling, max(soft, needed))
    if target > soft:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
            soft = target
        except (ValueError, OSError) as e:
            log.warning("cannot raise the open-file limit from %d to %d: %s", soft, target, e)
    log.info("open-file limit %d (hard %d); %d wanted for max_clients %d x max_regions_per_client %d",
             soft, hard, needed, cfg.max_clients, cfg.max_regions_per_client)
    if soft < needed:
        log.warning("open-file limit %d is below the %d the settings can need: about %d regions fit in"
                    " all; past that allocs are refused with EMFILE (raise LimitNOFILE)",
                    soft, needed, max(0, (soft - NOFILE_OWN) // 2))
    return soft


def out_of_fds_error(what: str) -> str:
    """The refusal a client reads when the daemon's fd table is full."""
    soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
    return (f"daemon out of file descriptors (EMFILE): {what}; its open-file limit is {soft}."
            " Nothing was lost and the connection stays; free regions or try again later"
            " (the administrator can raise LimitNOFILE)")

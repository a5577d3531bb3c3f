"""Per-uid limits on regions (max_regions_per_uid, max_region_bytes_per_uid):
whose regions count against a uid, and the refusal that names the uid, the
limit and what it holds. The uid is the connection's SO_PEERCRED uid; the
connection limit (max_clients_per_uid) is connections.py's, the resident
share (max_resident_per_uid) shares.py's.

Engine thread, page lock held (ops.py's alloc, forkops.py's fork_begin)."""
from __future__ import annotations

from uswap.config import Config
from uswap.daemon.connections import Connections
from uswap.daemon.engine import Engine


def uid_refusal(cfg: Config, engine: Engine, conns: Connections, op: str, uid: int,
                sizes: list[int]) -> str | None:
    """Why user `uid` may not have more regions of `sizes` bytes, or None:
    one size for an alloc, a fork's for its child (the child's regions are
    its uid's too)."""
    regions = [engine.regions[rid] for s in conns.of_uid(uid) for rid in s.regions if rid in engine.regions]
    # A fork's snapshot not attached yet is the uid's already: its child
    # attaches it unchecked, so several forks in a row, each checked
    # before the last child attached, took the uid past its limits.
    regions += engine.fork.pending_regions(uid)
    limit = cfg.max_regions_per_uid
    if limit and len(regions) + len(sizes) > limit:
        if op == "alloc":
            return (f"alloc: uid {uid} holds {len(regions)} regions, the most max_regions_per_uid"
                    f" ({limit}) allows; free one first")
        return (f"{op}: uid {uid} holds {len(regions)} regions; {len(sizes)} more would exceed"
                f" max_regions_per_uid ({limit}); free some first")
    limit = cfg.max_region_bytes_per_uid
    held, wanted = sum(r.size for r in regions), sum(sizes)
    if limit and held + wanted > limit:
        return (f"{op}: uid {uid} holds {held} bytes of regions; {wanted} bytes more would exceed"
                f" max_region_bytes_per_uid ({limit} bytes)")
    return None

"""Store corruption (issue 9): bit flips, zeroed blocks, torn sectors and
valid-but-wrong pages in the store file; the pages lost are exactly the
pages damaged, and no page is ever read wrong.

A client (tests/page_reader.py) fills a region eight times the daemon's
budget; every page says which page it is (word 0 a tag, word 1 its index,
the rest a pattern of it). Once the writes are done, the test finds each
page's slot by scanning the store file for those patterns (slot 0, the
header, is skipped) and damages chosen slots under the running daemon:

  bit_flip         one bit of the page flipped
  zeroed_block     the whole 4 KiB zeroed
  torn_sector      one 512-byte sector replaced by the same sector of another page
  valid_but_wrong  the slot overwritten with another page of the region, whole

It damages only pages swapped out long ago (the oldest of a sequential fill,
far from the resident ones) and only slots that hold their page's one copy.
The daemon runs with read_failure: sigbus and a short read_deadline, so a
damaged page becomes SIGBUS rather than a hang. The client then reads every
page, in order in one test and in a seeded random order in the other, each
page through tests/page_probe.c, which counts a SIGBUS per page and goes on.

Asserted: no page reads wrong; the set of pages lost (SIGBUS) is exactly the
set damaged, in both orders and on both stores (the nfs:// store's file is
damaged in the NFS server's export directory, on this host); the daemon
stays up, serves a fresh client, and its audit balances.

The seed of the damage plan is printed; USWAP_CORRUPTION_SEED=N replays it.
"""
from __future__ import annotations

import os
import random
import sys
from dataclasses import dataclass

import numpy as np
import pytest

from tests.harness import Workload, assert_audit, status, wait_clean, wait_for
from tests.page_probe import build as build_probe
from tests.page_reader import PAGE, TAG, WORDS, page_words
from tests.steady_client import round_trip

NPAGES = 1024                   # the region: 4 MiB
BUDGET_PAGES = 128              # max_resident 512 KiB
PER_KIND = 4                    # damaged pages of each kind
KINDS = ("bit_flip", "zeroed_block", "torn_sector", "valid_but_wrong")
SECTOR = 512
READ_STEP_LIMIT = 60.0          # s: the reader reports progress every 128 pages within this
DAEMON_CONFIG = {"read_failure": "sigbus", "read_deadline": "500ms",
                 "read_retry_min": "10ms", "read_retry_max": "50ms"}


class PageReader(Workload):
    """tests.page_reader in its own process, its output read with deadlines."""

    def __init__(self, socket: str, npages: int, probe: str) -> None:
        self._spawn([sys.executable, "-m", "tests.page_reader", "--socket", socket,
                     "--pages", str(npages), "--probe", probe])

    def cmd(self, text: str, key: str, timeout: float = 60.0) -> dict:
        self.send(text + "\n")
        return self.wait_line(lambda x: key in x, timeout)


@dataclass
class Damage:
    kind: str
    page: int     # the page whose only slot copy is damaged
    slot: int
    source: int   # the other page whose data was written over it (-1: none)
    where: int    # bit_flip: the bit of the page flipped; torn_sector: the sector replaced
    detail: str


@pytest.fixture(scope="module")
def probe_lib() -> str:
    return build_probe()


def store_file(backing: str) -> str:
    """Where the store's bytes live on this host (for nfs://, in the NFS
    server's export directory)."""
    if not backing.startswith("nfs://"):
        return backing
    from tests import conftest
    from tests.nfs_fixture import nfs_server_status
    export_dir = nfs_server_status(conftest.NFS_NAME)["export_dir"]
    return os.path.join(export_dir, backing.rsplit("/", 1)[1])


def scan_store(path: str, npages: int) -> dict[int, list[int]]:
    """page -> the slots holding an exact copy of it (slot 0, the header, skipped)."""
    found: dict[int, list[int]] = {}
    chunk_slots = 256
    with open(path, "rb") as f:
        f.seek(PAGE)
        slot = 1
        while True:
            data = f.read(chunk_slots * PAGE)
            if len(data) < PAGE:
                break
            rows = np.frombuffer(data[:len(data) // PAGE * PAGE], dtype=np.uint64).reshape(-1, WORDS)
            hits = np.flatnonzero((rows[:, 0] == TAG) & (rows[:, 1] < np.uint64(npages)))
            for i in hits:
                page = int(rows[i, 1])
                if np.array_equal(rows[i], page_words(np.array([page]))[0]):
                    found.setdefault(page, []).append(slot + int(i))
            slot += rows.shape[0]
    return found


def plan_damage(rng: random.Random, slots_of: dict[int, list[int]]) -> list[Damage]:
    """PER_KIND pages of each kind among the pages evicted long ago that have
    exactly one copy in the store, and a distinct undamaged source page for
    the kinds that write another page's data."""
    old = [p for p, slots in slots_of.items() if len(slots) == 1 and p < NPAGES - 2 * BUDGET_PAGES]
    assert len(old) >= NPAGES // 2, f"only {len(old)} old pages found in the store: {len(slots_of)} pages in all"
    chosen = rng.sample(old, len(KINDS) * PER_KIND)
    damaged = set(chosen)
    sources = [p for p in old if p not in damaged]
    plan = []
    for i, page in enumerate(chosen):
        kind = KINDS[i // PER_KIND]
        slot = slots_of[page][0]
        source = rng.choice(sources) if kind in ("torn_sector", "valid_but_wrong") else -1
        where = 0
        if kind == "bit_flip":
            where = rng.randrange(PAGE * 8)
            detail = f"bit {where % 8} of byte {where // 8} flipped"
        elif kind == "torn_sector":
            where = rng.randrange(PAGE // SECTOR)
            detail = f"sector {where} from page {source}"
        elif kind == "valid_but_wrong":
            detail = f"page {source} copied over it"
        else:
            detail = "4 KiB of zeros"
        plan.append(Damage(kind, page, slot, source, where, detail))
    return plan


def apply_damage(path: str, plan: list[Damage], slots_of: dict[int, list[int]]) -> None:
    """Write the damage into the store file (through this host's page cache:
    a direct read of the file writes dirty cached pages back first; the NFS
    server reads the file through the same cache) and check it is there."""
    fd = os.open(path, os.O_RDWR)
    try:
        def slot_bytes(slot: int) -> bytes:
            data = os.pread(fd, PAGE, slot * PAGE)
            assert len(data) == PAGE, (slot, len(data))
            return data

        wanted = {}
        for dmg in plan:
            page = bytearray(slot_bytes(dmg.slot))
            if dmg.kind == "bit_flip":
                page[dmg.where // 8] ^= 1 << (dmg.where % 8)
            elif dmg.kind == "zeroed_block":
                page[:] = bytes(PAGE)
            elif dmg.kind == "torn_sector":
                sector = dmg.where
                other = slot_bytes(slots_of[dmg.source][0])
                page[sector * SECTOR:(sector + 1) * SECTOR] = other[sector * SECTOR:(sector + 1) * SECTOR]
            else:
                page[:] = slot_bytes(slots_of[dmg.source][0])
            assert bytes(page) != slot_bytes(dmg.slot), dmg
            wanted[dmg.slot] = bytes(page)
        for slot, data in wanted.items():
            assert os.pwrite(fd, data, slot * PAGE) == PAGE
        os.fsync(fd)
        for slot, data in wanted.items():
            assert slot_bytes(slot) == data, f"slot {slot} does not hold the damage written"
    finally:
        os.close(fd)


def region_of(st: dict, pid: int) -> dict | None:
    for c in st["clients"]:
        if c["pid"] == pid and c["regions"]:
            return c["regions"][0]
    return None


def settled_after_fill(d, pid: int) -> dict | None:
    """A status once the fill's writes have all returned and most of the region is out."""
    st = status(d)
    r = region_of(st, pid)
    if (r and st["writeback_inflight"] == 0
            and r["swapped_bytes"] >= (NPAGES - 2 * BUDGET_PAGES) * PAGE):
        return st
    return None


def read_everything(reader: PageReader, order: str, seed: int) -> dict:
    """Ask the reader to read every page; each progress line must come within
    READ_STEP_LIMIT (a page that is neither served nor poisoned hangs it)."""
    reader.send(f"read {order}{f' {seed}' if order == 'random' else ''}\n")
    while True:
        line = reader.next(READ_STEP_LIMIT)
        if "read" in line:
            return line


@pytest.mark.parametrize("order", ["seq", "random"])
def test_pages_lost_equal_pages_damaged(backing, start_daemon, probe_lib, order):
    seed = int(os.environ.get("USWAP_CORRUPTION_SEED") or random.SystemRandom().randrange(1 << 32))
    print(f"store corruption: seed {seed} (replay with USWAP_CORRUPTION_SEED={seed}), {order} reads")
    d = start_daemon(backing, store_size="32M", max_resident=f"{BUDGET_PAGES * PAGE}", config=DAEMON_CONFIG)
    reader = PageReader(d.socket, NPAGES, probe_lib)
    try:
        reader.wait_line(lambda x: "region" in x, timeout=30)
        reader.cmd("fill", "filled")
        wait_for("the fill's writes done", lambda: settled_after_fill(d, reader.pid), timeout=60)
        path = store_file(backing)
        slots_of = scan_store(path, NPAGES)
        plan = plan_damage(random.Random(seed), slots_of)
        apply_damage(path, plan, slots_of)
        damaged = {dmg.page: f"{dmg.kind} in slot {dmg.slot} ({dmg.detail})" for dmg in plan}
        st0 = status(d)

        result = read_everything(reader, order, seed)
        assert d.proc.poll() is None, f"seed {seed}: the daemon died:\n{d.log_text()[-5000:]}"
        st = status(d)
        lost = set(result["lost"])
        assert result["read"] == NPAGES, result
        assert not result["wrong"], (f"seed {seed}: pages read with wrong content: {result['wrong'][:20]};"
                                     f" damage: {damaged}")
        collateral = sorted(lost - damaged.keys())
        missed = {p: why for p, why in damaged.items() if p not in lost}
        assert not collateral and not missed, (
            f"seed {seed}, {order} reads: {len(lost)} pages lost for {len(damaged)} damaged."
            f" Lost though undamaged ({len(collateral)}): {collateral[:64]}"
            f"{' ...' if len(collateral) > 64 else ''}. Damaged but read correctly: {missed}."
            f" Damage: {damaged}. Daemon: poisoned {st['poisoned_pages_total'] - st0['poisoned_pages_total']}"
            f" pages, {st['read_errors_total'] - st0['read_errors_total']} read errors")
        reader.cmd("exit", "done")
        reader.finish(30)
    finally:
        reader.kill()
    assert d.proc.poll() is None, d.log_text()[-5000:]
    trouble = round_trip(d.socket)
    assert trouble is None, trouble
    wait_clean(d)
    assert_audit(status(d))
    text = d.log_text()
    assert "Traceback" not in text, text[-5000:]

"""The state directory: what a successor daemon needs to adopt the regions of
one that died or handed over (docs/design.md section 9), kept where it
outlives the daemon process -- on tmpfs (`state_dir`, default
`$RUNTIME_DIRECTORY/state` or /run/uswap/state), which lives as long as the
clients can.

    DIR/store.json        the store this state belongs to: url, size, the
                          store header's id (header.claim)
    DIR/region-ID.table   a region's page table: PageTable's arrays,
                          memory-mapped, so every transition made in memory
                          (Python or the fast path's C threads) is in the file
    DIR/region-ID.json    the region's metadata: id, addr, size, pages, the
                          owner's pid and uid, the memfd's (dev, inode); an
                          orphan's also when it became one (orphaned_at)
    DIR/quarantine.json   the slot runs held in quarantine (a write that
                          failed, or that a dead daemon left in flight, may
                          still land in them: nfs://), per store (url and
                          header id); this store's entry rewritten whenever
                          its quarantine changes
    DIR/quarantine-ID.unsaved  per store (ID: its header id), one page,
                          allocated and opened at start: "1" and the store
                          while this store's entry in quarantine.json lacks
                          runs it holds (a rewrite failed), "0" once one is
                          made (see quarantine_incomplete)

Order (invariant 9, docs/design.md): a region's table file is made before its
metadata, and its metadata removed before its table file, so a metadata file
always names a complete table; a table file without metadata is a leftover
and is removed. Slot ownership is not stored: it is derived from the tables
(the slots every table names), so it cannot disagree with them -- except the
quarantined slots, which no table names: they are kept in their own file, or
a successor (or the successor's successor, after two deaths in a row) would
hand out a slot that a late write of a dead daemon can still overwrite.
"""
from __future__ import annotations

import fcntl
import json
import logging
import os
import re
import time

log = logging.getLogger("uswap.engine")

STORE_FILE = "store.json"
QUARANTINE_FILE = "quarantine.json"
UNSAVED_FILE = "quarantine-{}.unsaved"
UNSAVED_BYTES = 4096
LOCK_FILE = "lock"
META = re.compile(r"region-(\d+)\.json$")


def _disjoint(runs: list[tuple[int, int]]) -> list[tuple[int, int]]:
    """(first, count) runs merged where they overlap, sorted by first;
    runs of no slot (count < 1) dropped."""
    out: list[tuple[int, int]] = []
    for first, n in sorted(r for r in runs if r[1] > 0):
        if out and first <= out[-1][0] + out[-1][1]:
            last_first, last_n = out[-1]
            out[-1] = (last_first, max(last_n, first + n - last_first))
        else:
            out.append((first, n))
    return out


class StateRefused(ValueError):
    """The state directory cannot be used for this store."""


class StateBusy(StateRefused):
    """Another running daemon holds the state directory."""


def _write_atomic(path: str, data: dict) -> None:
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(data, f)
    os.replace(tmp, path)


class StateDir:
    def __init__(self, path: str, store: dict) -> None:
        """Open (or make) the state directory for `store` ({url, size_bytes,
        id}). Raises StateRefused when it holds the state of another store:
        adopting it would hand out that store's slots."""
        self.path = path
        try:
            os.makedirs(path, mode=0o700, exist_ok=True)
        except OSError as e:
            raise StateRefused(f"state_dir: {path}: cannot create it: {e.strerror}") from None
        # One daemon per state directory, for its whole life (the store lock
        # keeps one per store; this keeps two daemons of two stores from
        # writing their regions into one directory).
        self.lock_fd = os.open(os.path.join(path, LOCK_FILE), os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        try:
            fcntl.flock(self.lock_fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(self.lock_fd, 64, 0).decode(errors="replace").strip()
            os.close(self.lock_fd)
            raise StateBusy(f"state_dir: {path} is in use by another running daemon (pid {holder or '?'});"
                               " give each daemon its own --state-dir") from None
        os.ftruncate(self.lock_fd, 0)
        os.pwrite(self.lock_fd, f"{os.getpid()}\n".encode(), 0)
        store_file = os.path.join(path, STORE_FILE)
        try:
            with open(store_file) as f:
                held = json.load(f)
        except FileNotFoundError:
            held = None
        except (OSError, ValueError) as e:
            os.close(self.lock_fd)
            raise StateRefused(f"state_dir: {store_file} cannot be read ({e}); remove the directory"
                               " if no client of a dead daemon needs it") from None
        if held is not None and self.orphan_ids() and held != store:
            os.close(self.lock_fd)
            raise StateRefused(
                f"state_dir: {path} holds the regions of a daemon of another store"
                f" ({held.get('url')}, {held.get('size_bytes')} bytes, id {held.get('id')}), not of"
                f" {store['url']} ({store['size_bytes']} bytes, id {store['id']}); start that store's"
                " daemon on it, or use another --state-dir (removing it strands those clients)")
        _write_atomic(store_file, store)
        self.store = store
        self.other_quarantines: list[dict] | None = None  # other stores' entries (save_quarantine)
        self._open_unsaved_marker()

    def _open_unsaved_marker(self) -> None:
        """Invariant 9 when quarantine.json cannot be rewritten (tmpfs full,
        no fd left): the engine goes on and forgets a failed run's slots
        from its tables (writeback.py _write_done), so something that cannot
        fail then must say the file is behind. That is this marker: its page
        is allocated and its fd opened now, at start, where a failure is a
        refusal to start; from then on it is written in place (one page
        already there, an fd already held: neither ENOSPC nor EMFILE). What
        the previous daemon left in it is read first (quarantine_incomplete)."""
        path = self.unsaved_path = os.path.join(self.path, UNSAVED_FILE.format(
            re.sub(r"[^0-9A-Za-z_-]", "_", str(self.store.get("id")))))
        try:
            fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        except OSError as e:
            os.close(self.lock_fd)
            raise StateRefused(f"state_dir: {path}: cannot open it: {e.strerror}") from None
        try:
            self.previous_unsaved = os.pread(fd, UNSAVED_BYTES, 0)
            os.posix_fallocate(fd, 0, UNSAVED_BYTES)
        except OSError as e:
            os.close(fd)
            os.close(self.lock_fd)
            raise StateRefused(f"state_dir: {path}: cannot allocate its {UNSAVED_BYTES} bytes: {e.strerror}") from None
        self.unsaved_fd = fd
        self.unsaved_marked: bool | None = None  # what this daemon last wrote in it (None: nothing yet)
        self.unsaved_kept = False  # keep_unsaved_mark

    def keep_unsaved_mark(self, keep: bool) -> None:
        """While set, a successful rewrite leaves the marker as it is
        (Adoption.load: the file lacks what the previous daemon did not
        save until every slot no table names is held)."""
        self.unsaved_kept = keep

    def _mark_unsaved(self, unsaved: bool) -> None:
        """Write the marker in place: "1" with this store's key while this
        store's entry in quarantine.json lacks runs held, "0" after a
        rewrite. A torn write (a kill within it) reads as unparseable,
        which quarantine_incomplete takes as "1" (the safe side)."""
        if self.unsaved_marked == unsaved or (self.unsaved_kept and not unsaved):
            return
        key = json.dumps({k: self.store.get(k) for k in ("url", "id")}).encode()
        data = (b"1" + key) if unsaved else b"0"
        try:
            os.pwrite(self.unsaved_fd, data.ljust(UNSAVED_BYTES, b" ")[:UNSAVED_BYTES], 0)
            self.unsaved_marked = unsaved
        except OSError as e:  # EIO on tmpfs: nothing safer is left than saying so
            log.error("state_dir: cannot write %s: %s", self.unsaved_path, e.strerror)

    def quarantine_incomplete(self) -> bool:
        """Whether the previous daemon of this store left quarantine.json
        behind its quarantine (a rewrite failed and it died before one
        succeeded): then slots it held may be named nowhere, and its
        successor must hold every slot (Adoption.load: the whole store). A
        marker naming another store is that store's; one that cannot be
        read is taken as this store's."""
        prev = self.previous_unsaved.rstrip(b" \0")
        if not prev.startswith(b"1"):
            return False
        try:
            key = json.loads(prev[1:])
        except ValueError:
            return True
        return not isinstance(key, dict) or self._mine(key)

    def meta_path(self, rid: int) -> str:
        return os.path.join(self.path, f"region-{rid}.json")

    def table_path(self, rid: int) -> str:
        return os.path.join(self.path, f"region-{rid}.table")

    def orphan_ids(self) -> list[int]:
        """Ids of the regions whose metadata is here, in order."""
        return sorted(int(m.group(1)) for m in map(META.match, os.listdir(self.path)) if m)

    def orphans(self) -> list[dict]:
        """The metadata of every region a previous daemon left; table files
        with no metadata (a region made or removed half-way) are removed."""
        out = []
        for rid in self.orphan_ids():
            try:
                with open(self.meta_path(rid)) as f:
                    meta = json.load(f)
            except (OSError, ValueError) as e:
                log.error("adoption: %s cannot be read (%s); region %d is not adopted", self.meta_path(rid), e, rid)
                continue
            out.append(meta)
        named = {f"region-{m['id']}.table" for m in out}
        for name in os.listdir(self.path):
            if name.endswith(".table") and name not in named:
                os.unlink(os.path.join(self.path, name))
        return out

    def record(self, region, pid: int, uid: int) -> None:
        """Keep `region` here: its table in a file (made first, unless it is
        one already), then its metadata. Invariant 9, first half: a metadata
        file is written (atomically, by rename) only once its table is
        complete, and removed (forget) before the table, so the metadata a
        successor finds always names a whole table."""
        if region.table.path is None:
            try:
                region.table.persist(self.table_path(region.id))
            except OSError:
                # EMFILE from the mapping: no half-made table is left behind.
                try:
                    os.unlink(self.table_path(region.id))
                except FileNotFoundError:
                    pass
                raise
        st = os.fstat(region.memfd)
        _write_atomic(self.meta_path(region.id), {
            "id": region.id, "addr": region.addr, "size": region.size, "npages": region.npages,
            "pid": pid, "uid": uid, "memfd": [st.st_dev, st.st_ino]})

    def closing(self, region) -> None:
        """The region is closing (freed, its client gone): no successor may
        adopt it, even if this daemon dies before its I/O in flight ends and
        `forget` runs. Its metadata is marked closing now (atomically); its
        table stays mapped (and on disk) until `forget`. A free the client
        saw answered must never come back as a region waiting for adoption;
        but a write the dead daemon left in flight for it may still land, so
        the successor quarantines those slots (Adoption.load)."""
        path = self.meta_path(region.id)
        try:
            with open(path) as f:
                meta = json.load(f)
        except FileNotFoundError:
            return  # never recorded, or already forgotten
        if not meta.get("closing"):
            _write_atomic(path, dict(meta, closing=True))

    def forget(self, region) -> None:
        """The region is gone for good: metadata first, then its table (invariant 9)."""
        try:
            os.unlink(self.meta_path(region.id))
        except FileNotFoundError:
            pass
        region.table.unlink()

    def mark_orphaned(self, meta: dict) -> float:
        """When the region became an orphan, on CLOCK_BOOTTIME (the clock every
        process of this boot shares; the directory does not outlive the
        boot): the first successor to find it notes the time in its
        metadata, and later ones keep it, so adopt_timeout runs from then
        and not anew at each start of a daemon that crash-loops."""
        since = meta.get("orphaned_at")
        now = time.clock_gettime(time.CLOCK_BOOTTIME)
        # A time ahead of now is from another boot (a state_dir kept on
        # disk against the advice): the clock starts now.
        if not isinstance(since, (int, float)) or since > now:
            since = meta["orphaned_at"] = now
            self._rewrite(self.meta_path(meta["id"]), meta, "the time the region was orphaned")
        return float(since)

    def adopted(self, meta: dict) -> None:
        """The orphan's client is back: it is an orphan no more (a later death
        starts its clock anew). Written before the region goes live, so a
        death in between leaves at worst a fresh clock, never a stale one."""
        if meta.pop("orphaned_at", None) is not None:
            self._rewrite(self.meta_path(meta["id"]), meta, "that the region is adopted")

    def save_quarantine(self, runs: list[tuple[int, int]]) -> bool:
        """The slot runs ((first slot, count)) this store holds in quarantine
        now; the other stores' entries in the file are kept (a drained
        directory may serve another store, then this one again). False: the
        file could not be written (logged; it keeps what it held)."""
        if self.other_quarantines is None:
            # Read once: while this daemon holds the directory's lock no one
            # else writes the file, so the other stores' entries stay as read.
            self.other_quarantines = [e for e in self._quarantine_entries() if not self._mine(e.get("store"))]
        entries = self.other_quarantines + [{"store": self.store, "runs": [[int(s), int(n)] for s, n in runs]}]
        saved = self._rewrite(os.path.join(self.path, QUARANTINE_FILE), {"stores": entries},
                              "the quarantined slots (a successor holds the whole store)")
        # After the rename when saved, before the caller goes on when not:
        # a kill at any point leaves the marker "1" or the file complete.
        self._mark_unsaved(not saved)
        return saved

    @staticmethod
    def _rewrite(path: str, data: dict, what: str) -> bool:
        """_write_atomic for state that the daemon's own work does not wait
        on: a failure (tmpfs full, no fd left) is logged, the file keeps what
        it held, and the caller may try again later (False)."""
        try:
            _write_atomic(path, data)
            return True
        except OSError as e:
            log.error("state_dir: cannot record %s in %s: %s", what, path, e.strerror)
            return False

    def _mine(self, store: object) -> bool:
        """Whether a recorded store is this one (url and header id: this path
        made anew is another store; a size changed since is the same)."""
        return isinstance(store, dict) and all(store.get(k) == self.store.get(k) for k in ("url", "id"))

    def _quarantine_entries(self) -> list[dict]:
        """Every store's entry in the quarantine file ({store, runs})."""
        path = os.path.join(self.path, QUARANTINE_FILE)
        try:
            with open(path) as f:
                held = json.load(f)
            # One store's entry alone: the file as the first daemons wrote it.
            entries = held["stores"] if "stores" in held else [held]
            return [e for e in entries if isinstance(e, dict)]
        except FileNotFoundError:
            return []
        except (OSError, ValueError, KeyError, TypeError) as e:
            # Written atomically, so this is damage from outside: say so loudly.
            log.error("adoption: %s cannot be read (%s): slots a late write of a previous daemon may still"
                      " reach are not known to be held back", path, e)
            return []

    def quarantine(self) -> list[tuple[int, int]]:
        """The slot runs a previous daemon of this store held in quarantine
        ([] if none; another store's entries are not this one's slots),
        sorted and disjoint: a slot is held by the quarantine once, however
        often a damaged file names it (each repeat claimed a reference, and
        a slot named MAX_REFS times made the claim of a table naming it too
        fail, which stopped the daemon at start)."""
        out: list[tuple[int, int]] = []
        for entry in self._quarantine_entries():
            if self._mine(entry.get("store")):
                try:
                    out.extend((int(s), int(n)) for s, n in entry["runs"])
                except (KeyError, TypeError, ValueError) as e:
                    log.error("adoption: the quarantine of %s cannot be read (%s)", self.store.get("url"), e)
        return _disjoint(out)

    def clear(self) -> None:
        """After a drain: nothing is left to adopt; the directory may serve any
        store next. The quarantine stays (this store's next daemon honours it;
        another store's ignores it, see quarantine), and so does this store's
        marker if it says the file is behind; else it goes (the daemon's
        last act: nothing is marked after it)."""
        if self.unsaved_marked is False or (self.unsaved_marked is None and not self.quarantine_incomplete()):
            try:
                os.unlink(self.unsaved_path)
            except FileNotFoundError:
                pass
        for name in os.listdir(self.path):
            if META.match(name) or name.endswith(".table") or name == STORE_FILE:
                try:
                    os.unlink(os.path.join(self.path, name))
                except FileNotFoundError:
                    pass

"""A client whose every page says which page it is, run as its own process:

    python -m tests.page_reader --socket S --pages N --probe LIB.so

Page p holds page_words(p): word 0 is TAG, word 1 is p, the other words a
pattern of p, so a copy of the page found in the store file tells which
page it is (tests/daemon/test_swapin_store_corruption.py scans the store with it).

Commands on stdin, one JSON line out for each:
  fill              write every page                -> {"filled": N}
  fill random SEED  write every page, in a random order (seeded): the
                    pages evicted meanwhile go to the store in that order,
                    so neighbouring pages sit in scattered slots
  read seq          read every page in order        -> {"progress": i} ... {"read": N, "lost": [...], "wrong": [...]}
  read random SEED  read every page in a random order (seeded)
  exit              close the region and exit       -> {"done": true}
Reads go through tests/page_probe.c, so a page that raises SIGBUS is counted
as lost (and the reader goes on); a page read with any byte different from
page_words(p) is listed as wrong, with the page it looks like.
"""
from __future__ import annotations

import argparse
import json
import random
import resource
import sys

import numpy as np

import uswap
from tests.page_probe import PageProbe

PAGE = 4096
WORDS = 512
TAG = np.uint64(0x7573_7761_7070_6167)  # "uswappag"
_WORD_IDS = np.arange(WORDS, dtype=np.uint64)


def page_words(pages: np.ndarray) -> np.ndarray:
    """The (len(pages), 512) uint64 contents of pages `pages`."""
    pages = np.asarray(pages, dtype=np.uint64)
    words = (pages[:, None] * np.uint64(0x9E37_79B9_7F4A_7C15)) ^ (_WORD_IDS * np.uint64(0xC2B2_AE3D_27D4_EB4F))
    words[:, 0] = TAG
    words[:, 1] = pages
    return words


def out(**kw: object) -> None:
    print(json.dumps(kw), flush=True)


def read_all(region: uswap.Region, probe: PageProbe, order: list[int]) -> None:
    page = np.zeros(WORDS, np.uint64)
    dst = page.ctypes.data
    lost: list[int] = []
    wrong: list[dict] = []
    for i, p in enumerate(order):
        if i % 128 == 0:
            out(progress=i)
        if not probe.read(region.addr + p * PAGE, dst):
            lost.append(p)
            continue
        want = page_words(np.array([p]))[0]
        if not np.array_equal(page, want):
            differ = int(np.count_nonzero(page.view(np.uint8) != want.view(np.uint8)))
            looks_like = int(page[1]) if page[0] == TAG else None
            wrong.append({"page": p, "bytes_differing": differ, "word1": looks_like})
    out(read=len(order), lost=sorted(lost), wrong=wrong)


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--socket", required=True)
    ap.add_argument("--pages", type=int, required=True)
    ap.add_argument("--probe", required=True, help="the built tests/page_probe.c")
    args = ap.parse_args()
    resource.setrlimit(resource.RLIMIT_CORE, (0, 0))  # a stray SIGBUS leaves no core file
    probe = PageProbe(args.probe)
    client = uswap.connect(args.socket)
    region = client.alloc(args.pages * PAGE)
    a = np.frombuffer(region.buf, dtype=np.uint64).reshape(-1, WORDS)
    out(region=region.id, pages=args.pages)
    for line in sys.stdin:
        cmd = line.split()
        if cmd == ["fill"]:
            for first in range(0, args.pages, 256):
                pages = np.arange(first, min(first + 256, args.pages))
                a[first:first + len(pages)] = page_words(pages)
            out(filled=args.pages)
        elif cmd[:2] == ["fill", "random"]:
            order = list(range(args.pages))
            random.Random(int(cmd[2])).shuffle(order)
            for p in order:
                a[p] = page_words(np.array([p]))[0]
            out(filled=args.pages)
        elif cmd[:1] == ["read"]:
            order = list(range(args.pages))
            if cmd[1] == "random":
                random.Random(int(cmd[2])).shuffle(order)
            read_all(region, probe, order)
        elif cmd == ["exit"]:
            break
    del a
    region.close()
    client.close()
    out(done=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())

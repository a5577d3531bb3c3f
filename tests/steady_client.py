"""A well-behaved client that keeps rewriting and verifying its whole region
until told to stop, run as its own process:

    python -m tests.steady_client --socket S --size 8M

Every byte of the region is checked: in round v, page p holds the words
pattern(p, v) (a different value in each 64-bit word). Each round first
verifies the whole region against round v-1 (a fresh region must read zeros),
then writes round v. One JSON line per round, with the round's end on
CLOCK_MONOTONIC (shared by every process on the host), so the test can see
that no round stalled. A line "stop" on stdin ends the run after the current
round; a final verification follows and then {"done": true, "wrong_bytes": N}.
"""
from __future__ import annotations

import argparse
import json
import os
import select
import subprocess
import sys
import time

import numpy as np

import uswap
from uswap.sizes import parse_size

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

WORDS = 512  # 64-bit words per page
_WORD_IDS = np.arange(WORDS, dtype=np.uint64)


def pattern(pages: np.ndarray, version: int) -> np.ndarray:
    """The (len(pages), 512) uint64 words pages `pages` hold after round `version`."""
    base = (pages.astype(np.uint64) * np.uint64(0x9E37_79B9_7F4A_7C15)) ^ np.uint64(version << 40)
    return base[:, None] ^ (_WORD_IDS * np.uint64(0xC2B2_AE3D_27D4_EB4F))[None, :]


def wrong_bytes(a: np.ndarray, version: int, chunk: int = 256) -> int:
    """Bytes of the region that differ from round `version` (0: zeros)."""
    wrong = 0
    for first in range(0, a.shape[0], chunk):
        pages = np.arange(first, min(first + chunk, a.shape[0]))
        want = pattern(pages, version) if version else np.zeros((len(pages), WORDS), np.uint64)
        got = a[first:first + len(pages)]
        wrong += int(np.count_nonzero(got.view(np.uint8) != want.view(np.uint8)))
    return wrong


def write_round(a: np.ndarray, version: int, chunk: int = 256) -> None:
    for first in range(0, a.shape[0], chunk):
        pages = np.arange(first, min(first + chunk, a.shape[0]))
        a[first:first + len(pages)] = pattern(pages, version)


def stop_requested() -> bool:
    ready, _, _ = select.select([sys.stdin], [], [], 0)
    return bool(ready) and sys.stdin.readline().strip() in ("stop", "")


def out(**kw: object) -> None:
    print(json.dumps(kw), flush=True)


def round_trip(socket_path: str) -> str | None:
    """A new client allocates, writes and reads back its region; None if
    that worked, else what went wrong."""
    try:
        res = subprocess.run([sys.executable, "-m", "tests.steady_client", "--socket", socket_path,
                              "--size", "4M"], input="stop\n", capture_output=True, text=True,
                             timeout=60, cwd=REPO)
    except subprocess.TimeoutExpired:
        return "a fresh client did not finish one round (connect, alloc, write, read back) in 60 s"
    lines = [json.loads(x) for x in res.stdout.splitlines() if x.startswith("{")]
    if res.returncode != 0 or not lines or lines[-1].get("done") is not True or lines[-1]["wrong_bytes"]:
        return f"a fresh client failed ({res.returncode}): {res.stdout[-500:]} {res.stderr[-1500:]}"
    return None


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--socket", required=True)
    ap.add_argument("--size", default="8M")
    args = ap.parse_args()
    total_wrong = 0
    with uswap.connect(args.socket) as client:
        region = client.alloc(parse_size(args.size))
        a = np.frombuffer(region.buf, dtype=np.uint64).reshape(-1, WORDS)
        out(region=region.id, pages=a.shape[0], t=time.monotonic())
        version = 0
        while True:
            wrong = wrong_bytes(a, version)
            total_wrong += wrong
            version += 1
            write_round(a, version)
            out(round=version, wrong_bytes=wrong, t=time.monotonic())
            if stop_requested():
                break
        total_wrong += wrong_bytes(a, version)
        del a
        region.close()
    out(done=True, wrong_bytes=total_wrong, rounds=version, t=time.monotonic())
    return 0 if total_wrong == 0 else 1


if __name__ == "__main__":
    sys.exit(main())

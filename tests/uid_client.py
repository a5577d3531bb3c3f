"""A client program run as another user (tests/daemon/test_connections_socket_access.py
starts it under setpriv): it takes one JSON command a line on stdin and
answers one JSON line on stdout, so a test can drive several connections of
one uid and see each answer.

Commands: {"connect": NAME}, {"alloc": NAME, "size": BYTES} (the region is
written and read back, page by page), {"free": NAME, "region": INDEX},
{"status": NAME}. An answer is {"ok": true, ...} or {"ok": false, "error": TEXT}."""
from __future__ import annotations

import json
import os
import sys

import uswap

PAGE = 4096


def serve(socket_path: str) -> None:
    clients: dict[str, uswap.Client] = {}
    regions: dict[str, list[uswap.Region]] = {}
    for line in sys.stdin:
        cmd = json.loads(line)
        try:
            if "connect" in cmd:
                clients[cmd["connect"]] = uswap.connect(socket_path)
                answer: dict = {"uid": os.getuid()}
            elif "alloc" in cmd:
                region = clients[cmd["alloc"]].alloc(cmd["size"])
                for off in range(0, region.size, PAGE):
                    region.buf[off:off + 8] = off.to_bytes(8, "little")
                bad = sum(bytes(region.buf[off:off + 8]) != off.to_bytes(8, "little")
                          for off in range(0, region.size, PAGE))
                regions.setdefault(cmd["alloc"], []).append(region)
                answer = {"bad_pages": bad}
            elif "free" in cmd:
                regions[cmd["free"]].pop(cmd["region"]).close()
                answer = {}
            else:
                answer = {"status": clients[cmd["status"]].status()}
        except (uswap.UswapError, OSError) as e:
            print(json.dumps({"ok": False, "error": str(e)}), flush=True)
            continue
        print(json.dumps({"ok": True, **answer}), flush=True)
    for rs in regions.values():
        for r in rs:
            r.close()
    for c in clients.values():
        c.close()


if __name__ == "__main__":
    serve(sys.argv[1])

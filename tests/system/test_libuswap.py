"""libuswap, the C client (include/uswap.h): the README's example compiled
and run against a real daemon with pages swapped and verified, beside a
Python client of the same daemon; errors reported with the daemon's reason."""
from __future__ import annotations

import json
import os
import re
import subprocess
import textwrap

import numpy as np

from tests.daemon_proc import REPO
from tests.harness import assert_audit, finish_clean, status

INCLUDE = os.path.join(REPO, "include")
LIBDIR = os.path.join(REPO, "build", "lib")


def _compile(tmp_path, name: str, source: str) -> str:
    src = tmp_path / f"{name}.c"
    src.write_text(source)
    exe = str(tmp_path / name)
    out = subprocess.run(["gcc", "-Wall", "-Werror", "-O1", f"-I{INCLUDE}", str(src), f"-L{LIBDIR}",
                          f"-Wl,-rpath,{LIBDIR}", "-luswap", "-o", exe], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    return exe


def readme_example() -> str:
    with open(os.path.join(REPO, "README.md")) as f:
        text = f.read()
    m = re.search(r"<!-- c-example: begin.*?-->\s*```c\n(.*?)```\s*<!-- c-example: end -->", text, re.S)
    assert m, "README.md has no C example between the c-example markers"
    return m.group(1)


def test_readme_c_example_swaps_and_verifies(tmp_path, start_daemon):
    d = start_daemon(str(tmp_path / "swapfile"), store_size="256M", max_resident="16M")
    exe = _compile(tmp_path, "example", readme_example())
    with d.client() as py:
        # A Python client of the same daemon, its data checked after the C one ran.
        r = py.alloc(8 << 20)
        a = np.frombuffer(r.buf, dtype=np.uint64)
        a[::512] = np.arange(len(a) // 512, dtype=np.uint64) + 5
        out = subprocess.run([exe, "64"], capture_output=True, text=True, timeout=300,
                             env=dict(os.environ, USWAP_SOCKET=d.socket))
        assert out.returncode == 0, (out.stdout[-2000:], out.stderr, d.log_text()[-3000:])
        lines = out.stdout.strip().splitlines()
        assert lines[-1] == "ok: 16384 pages, 0 bad", lines[-1]
        st = json.loads(lines[-2])
        # 64 MiB through a 16 MiB budget: swapped out and read back.
        assert st["swapouts_total"] >= 16384 - 4096, st
        assert st["swapins_total"] > 0 and st["discarded_pages_total"] == 8192, st
        assert int(np.count_nonzero(a[::512] != np.arange(len(a) // 512, dtype=np.uint64) + 5)) == 0
        del a
        r.close()
    assert_audit(status(d))
    finish_clean(d)


ERRORS = textwrap.dedent("""
    #include <stdio.h>
    #include <uswap.h>

    int main(int argc, char **argv)
    {
        uswap_conn *c;
        int r = uswap_connect(argv[2], &c);
        printf("missing %d %s\\n", r, uswap_conn_error(c));
        uswap_disconnect(c);
        if (uswap_connect(argv[1], &c) != 0)
            return 2;
        uswap_region reg;
        r = uswap_alloc(c, 0, &reg);
        printf("zero %d %s\\n", r, uswap_conn_error(c));
        if (uswap_alloc(c, 5 * 4096 + 1, &reg) != 0)
            return 3;
        printf("size %zu\\n", reg.size);
        r = uswap_discard(c, &reg, 100, 4096);
        printf("unaligned %d %s\\n", r, uswap_conn_error(c));
        r = uswap_discard(c, &reg, 4096, 8 * 4096);
        printf("past %d %s\\n", r, uswap_conn_error(c));
        printf("still %d\\n", uswap_discard(c, &reg, 4096, 4096));
        printf("free %d\\n", uswap_free(c, &reg));
        printf("text %s\\n", uswap_strerror(USWAP_E_REFUSED));
        uswap_disconnect(c);
        return 0;
    }
""")


def test_c_errors_name_the_cause(tmp_path, start_daemon):
    d = start_daemon(str(tmp_path / "swapfile"), store_size="64M")
    exe = _compile(tmp_path, "errors", ERRORS)
    missing = str(tmp_path / "no-such.sock")
    out = subprocess.run([exe, d.socket, missing], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, (out.stdout, out.stderr)
    got = {line.split(" ", 1)[0]: line.split(" ", 1)[1] for line in out.stdout.splitlines()}
    assert got["missing"].startswith("-1 cannot reach the uswap daemon at " + missing), got
    assert got["zero"].startswith("-5 alloc: size 0 is not accepted"), got
    assert got["size"] == str(6 * 4096)
    assert got["unaligned"].startswith("-2 discard: offset 100 and length 4096 must be multiples"), got
    assert got["past"].startswith("-2 discard: offset 4096 + length 32768 passes the end of region"), got
    assert got["still"] == "0" and got["free"] == "0", got
    assert got["text"] == "the uswap daemon refused the request"
    finish_clean(d)

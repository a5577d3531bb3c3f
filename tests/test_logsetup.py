"""Log lines under journald and elsewhere (uswap/logsetup.py): when stderr is
the stream JOURNAL_STREAM names, each line starts with its syslog priority
and carries no timestamp of its own; otherwise (a file, or JOURNAL_STREAM
naming another stream) the plain form with time and level name."""
from __future__ import annotations

import os
import re
import signal
import subprocess
import sys

from tests.daemon_proc import REPO, DaemonProc
from tests.harness import wait_for

PLAIN_LINE = re.compile(r"^\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3} uswap\[\d+\] (DEBUG|INFO|WARNING|ERROR|CRITICAL) ")


def journal_stream_of(path: str) -> str:
    st = os.stat(path)
    return f"{st.st_dev}:{st.st_ino}"


def bad_reload(d: DaemonProc) -> None:
    """A warning: a reload refused for a bad value."""
    d.write_config({"io_threads": 0})
    d.proc.send_signal(signal.SIGHUP)
    wait_for("the refused reload", lambda: "reload refused" in d.log_text(), 10)


def test_under_journald_lines_carry_a_priority_and_no_timestamp(file_backing, start_daemon, tmp_path):
    log_path = tmp_path / "daemon.log"
    log_path.touch()  # DaemonProc reopens it in place: same inode, the daemon's stderr
    d = start_daemon(file_backing, config={"io_threads": 2},
                     extra_env={"JOURNAL_STREAM": journal_stream_of(str(log_path))})
    assert journal_stream_of(d.log_path) == journal_stream_of(str(log_path))
    bad_reload(d)
    assert d.stop() == 0
    lines = d.log_text().splitlines()
    assert lines, lines
    for line in lines:
        assert re.match(r"^<[2-7]>uswap[.\w]*: ", line), line
        assert not PLAIN_LINE.match(line), line
    assert any(line.startswith("<6>uswap.server: ready: ") for line in lines), lines
    assert any(line.startswith("<4>uswap") and "reload refused" in line for line in lines), lines


def test_elsewhere_lines_carry_time_and_level(file_backing, start_daemon, tmp_path):
    # JOURNAL_STREAM inherited from a service but stderr sent elsewhere: the
    # variable names another stream, so lines stay plain.
    other = tmp_path / "other"
    other.touch()
    d = start_daemon(file_backing, config={"io_threads": 2},
                     extra_env={"JOURNAL_STREAM": journal_stream_of(str(other))})
    bad_reload(d)
    assert d.stop() == 0
    lines = d.log_text().splitlines()
    for line in lines:
        assert PLAIN_LINE.match(line), line
    assert any(" INFO uswap.server: ready: " in line for line in lines), lines
    assert any(" WARNING uswap" in line and "reload refused" in line for line in lines), lines


def test_a_refused_start_is_an_error_under_journald(tmp_path):
    """The one line of a refused start is filed at error priority there; a
    terminal or file gets it as before."""
    err = tmp_path / "stderr"
    err.touch()
    cmd = [sys.executable, "-m", "uswap.cli", "run", "--backing", str(tmp_path / "swapfile"),
           "--max-resident", "lots", "--socket", str(tmp_path / "s.sock")]
    for stream, head in ((journal_stream_of(str(err)), "<3>uswap: error: "), ("", "uswap: error: ")):
        with open(err, "w") as f:
            res = subprocess.run(cmd, stderr=f, cwd=REPO, timeout=60,
                                 env=dict(os.environ, JOURNAL_STREAM=stream))
        assert res.returncode == 2
        assert err.read_text().startswith(head + "max_resident: 'lots'"), err.read_text()

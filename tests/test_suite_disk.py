"""The suite's own disk use stays bounded: every daemon allocates its whole
store (posix_fallocate), so stores kept for the session filled a CI disk
(ENOSPC after about 400 tests, stop 19's CI run)."""
from __future__ import annotations

import os

from tests import conftest


def test_a_passing_tests_tmp_path_is_removed(request) -> None:
    assert request.config.getini("tmp_path_retention_policy") == "failed"


def test_a_file_store_is_removed_after_its_test_whatever_the_outcome(tmp_path) -> None:
    gen = conftest._store_location(None, tmp_path, "file")
    path = next(gen)
    with open(path, "wb") as f:
        os.posix_fallocate(f.fileno(), 0, 1 << 20)
    # The fixture's teardown: the test body has ended (passed or failed).
    for _ in gen:
        pass
    assert not os.path.exists(path)

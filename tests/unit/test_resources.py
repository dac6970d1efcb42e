from __future__ import annotations

import resource
from collections.abc import Iterator

import pytest

from makima.resources import raise_open_files_limit


@pytest.fixture
def low_soft_limit() -> Iterator[int]:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (256, hard))
    try:
        yield hard
    finally:
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))


def test_the_soft_limit_is_raised_to_the_hard_one(low_soft_limit: int) -> None:
    limit = raise_open_files_limit()
    assert limit.before == 256
    assert resource.getrlimit(resource.RLIMIT_NOFILE)[0] == limit.after
    if low_soft_limit != resource.RLIM_INFINITY:
        assert limit.after == low_soft_limit
    assert raise_open_files_limit().before == limit.after  # a second call changes nothing

"""Fixtures of the fuzz suite: a real daemon process on the test database, and
a fuzzer bound to it (makima.fuzz)."""

from __future__ import annotations

import dataclasses
import os
import uuid
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from makima.embedded import ConnectParams
from makima.fuzz import FuzzSettings
from tests.process import DaemonProcess, daemon_process


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line(
        "markers",
        "fuzz: hostile input against a real daemon process (a bounded count here;"
        " MAKIMA_FUZZ_FRAMES=N for more, or `makima drill --fuzz N`)",
    )


def fuzz_settings(**overrides: Any) -> FuzzSettings:
    """Settings for the suite: MAKIMA_FUZZ_SEED repeats a run (each failure prints its seed)."""
    seed = os.environ.get("MAKIMA_FUZZ_SEED")
    suite = FuzzSettings(seed=int(seed) if seed else None, deadline=30.0, restart=False)
    return dataclasses.replace(suite, **overrides)


@pytest.fixture
async def daemon_proc(db_params: ConnectParams, short_tmp: Path) -> AsyncIterator[DaemonProcess]:
    async with daemon_process(short_tmp, db_params) as proc:
        await proc.start()
        yield proc


@pytest.fixture
def scratch(short_tmp: Path) -> Path:
    path = short_tmp / f"fz-{uuid.uuid4().hex[:6]}"
    path.mkdir()
    return path

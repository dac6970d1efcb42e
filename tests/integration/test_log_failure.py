"""With every log write failing (a full disk), the daemon still starts, answers
its clients and talks with its agents; the lost lines are reported once the
log can be written again."""

from __future__ import annotations

import errno
import io
import json
import os
from collections.abc import Iterator
from pathlib import Path

import pytest
import structlog

from makima import logs
from makima.embedded import ConnectParams
from tests.harness import Relay, client_for, daemon_config, running_daemon

pytestmark = pytest.mark.anyio


class FullDisk(io.StringIO):
    """Every write fails with ENOSPC until ``failing`` is cleared."""

    def __init__(self) -> None:
        super().__init__()
        self.failing = True
        self.failed = 0

    def write(self, text: str) -> int:
        if self.failing:
            self.failed += 1
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return super().write(text)

    def isatty(self) -> bool:
        return False


@pytest.fixture
def full_disk() -> Iterator[FullDisk]:
    """The daemon's log goes to a stream that always fails; structlog's global
    configuration is put back afterwards."""
    saved = structlog.get_config()
    stream = FullDisk()
    logs.configure(stream=stream, json=True, level="debug")
    try:
        yield stream
    finally:
        structlog.configure(**saved)


@pytest.mark.parametrize("full_at_start", [True, False], ids=["full_at_start", "fills_up_later"])
async def test_requests_and_agents_are_served_while_no_log_line_can_be_written(
    full_disk: FullDisk,
    db_params: ConnectParams,
    short_tmp: Path,
    relay: Relay,
    full_at_start: bool,
) -> None:
    full_disk.failing = full_at_start
    config = daemon_config(db_params, short_tmp)
    async with running_daemon(config) as daemon, client_for(daemon) as client:
        full_disk.failing = True
        # supervisor.create logs (supervisor.created), so do the agent's start and I/O
        created = await client.call(
            "supervisor.create", {"name": "disk-full", "command": relay.command, "goal": "g"}
        )
        sid = created["supervisor_id"]
        agent = await relay.accept()
        await agent.expect("start")
        # a malformed line is logged and answered; the agent carries on
        await agent.send_raw(b"{not json\n")
        error = await agent.expect("error")
        assert error["code"]
        ack = await agent.request({"type": "activity", "text": "still here", "progress": 5})
        assert ack["type"] == "ack"
        shown = await client.call("supervisor.get", {"supervisor_id": sid})
        assert shown["current_activity"] == "still here"
        status = await client.call("daemon.status")
        assert status["supervisors"]["working"] == 1
    assert full_disk.failed > 0  # the daemon did log, and every line failed

    full_disk.failing = False
    structlog.get_logger("test").info("test.disk_freed")
    *_, freed, report = (json.loads(line) for line in full_disk.getvalue().splitlines())
    assert freed["event"] == "test.disk_freed"
    assert report["event"] == "log.lines_dropped"
    assert report["lines"] == full_disk.failed

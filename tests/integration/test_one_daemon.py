"""One daemon per state directory and per socket: a second one is refused with
one clear error before it restores, starts or removes anything."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest

from makima.control.client import ControlClient
from makima.daemon import LOCK_NAME, Daemon
from makima.errors import MakimaError

pytestmark = pytest.mark.anyio


async def test_a_second_daemon_on_the_same_state_dir_is_refused(
    daemon: Daemon, client: ControlClient, short_tmp: Path
) -> None:
    elsewhere = dataclasses.replace(daemon.config, socket_path=short_tmp / "second.sock")
    second = Daemon(elsewhere, handle_signals=False)
    with pytest.raises(MakimaError, match=r"another makima daemon .* state directory"):
        await second.run()
    lock = daemon.config.state_dir / LOCK_NAME
    assert lock.read_text().strip().isdigit()
    assert not elsewhere.socket_path.exists()
    # the first one is untouched
    assert daemon.config.socket_path.exists()
    assert (await client.call("daemon.status"))["daemon_id"] == str(daemon.daemon_id)


async def test_a_second_daemon_on_the_same_socket_is_refused(
    daemon: Daemon, client: ControlClient, short_tmp: Path
) -> None:
    own_dir = short_tmp / "other-state"
    other = dataclasses.replace(daemon.config, state_dir=own_dir)
    second = Daemon(other, handle_signals=False)
    with pytest.raises(MakimaError, match="already listening"):
        await second.run()
    assert daemon.config.socket_path.exists()
    assert (await client.call("daemon.status"))["daemon_id"] == str(daemon.daemon_id)

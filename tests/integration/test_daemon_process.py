"""The daemon as a real process: systemd notifications, SIGTERM."""

from __future__ import annotations

import uuid
from pathlib import Path

import anyio
import pytest

from makima import repository as repo
from makima.control.client import ControlClient
from makima.database import create_pool
from makima.embedded import ConnectParams
from makima.model import SupervisorStateEnum as S
from tests.harness import DEADLINE, Relay
from tests.process import daemon_process

pytestmark = pytest.mark.anyio


async def test_sigterm_saves_interrupted_stops_agents_and_exits_zero(
    db_params: ConnectParams, short_tmp: Path, relay: Relay
) -> None:
    async with daemon_process(short_tmp, db_params) as proc:
        await proc.start()
        assert proc.notify is not None
        assert any(m.startswith("STATUS=") for m in "\n".join(proc.notify.messages).split("\n"))
        async with ControlClient.connect(proc.socket_path, timeout=DEADLINE) as client:
            created = await client.call(
                "supervisor.create", {"name": "term", "command": relay.command}
            )
            agent = await relay.accept()
            await agent.expect("start")
            task = await agent.request(
                {"type": "spawn", "name": "sleeper", "command": ["sleep", "300"]}
            )
            await agent.request({"type": "phase", "phase": "building"})
        codes: list[int] = []

        async def terminate() -> None:
            codes.append(await proc.terminate())

        with anyio.fail_after(DEADLINE):
            async with anyio.create_task_group() as tg:
                tg.start_soon(terminate)
                # the agent is told, then its stdin closes
                assert (await agent.expect("cancel"))["reason"] == "the daemon is shutting down"
                assert await agent.receive() is None
        assert codes == [0], proc.log_text()[-3000:]
        assert "STOPPING=1" in "\n".join(proc.notify.messages)

    pool = await create_pool(db_params, min_size=1, max_size=2)
    try:
        sid = uuid.UUID(created["supervisor_id"])
        state = await repo.get_supervisor_state_for_restoration(pool, sid)
        assert state is not None
        assert state.state is S.INTERRUPTED and state.phase == "building"
        record = await repo.get_task(pool, uuid.UUID(task["task_id"]))
        assert record is not None and record.status.value == "interrupted"
    finally:
        await pool.close()

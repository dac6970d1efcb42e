"""After a SIGKILL the daemon cannot stop its tasks; the next one finds them
(by MAKIMA_TASK_ID), stops them, then re-runs them or marks them interrupted.
After a SIGTERM the daemon stops them itself; the next one decides the same way."""

from __future__ import annotations

import uuid
from pathlib import Path

import anyio
import asyncpg
import pytest

from makima import repository as repo
from makima.control.client import ControlClient
from makima.database import create_pool
from makima.embedded import ConnectParams
from makima.model import SupervisorState
from makima.tasks import find_task_processes, task_id_of
from tests.harness import DEADLINE, AgentChannel, Relay
from tests.process import DaemonProcess, daemon_process

pytestmark = [pytest.mark.anyio, pytest.mark.drill]


def test_task_id_of() -> None:
    assert task_id_of(b"A=1\0MAKIMA_TASK_ID=abc\0B=2\0") == "abc"
    assert task_id_of(b"A=1\0") is None


async def waiting_on_a_long_task(
    proc: DaemonProcess, policy: str, relay: Relay
) -> tuple[str, AgentChannel, str]:
    """A daemon with ``policy`` running one supervisor that waits on a long task
    (running): the supervisor id, its agent and the task id."""
    await proc.start(args=["--task-restart-policy", policy])
    async with ControlClient.connect(proc.socket_path, timeout=DEADLINE) as client:
        created = await client.call("supervisor.create", {"name": policy, "command": relay.command})
        agent = await relay.accept()
        await agent.expect("start")
        task_id = (
            await agent.request({"type": "spawn", "name": "long", "command": ["sleep", "300"]})
        )["task_id"]
        await agent.request({"type": "wait_tasks"})
    with anyio.fail_after(DEADLINE):
        while not find_task_processes({task_id}):
            await anyio.wait_all_tasks_blocked()
    return str(created["supervisor_id"]), agent, str(task_id)


async def ended_as_the_policy_says(
    pool: asyncpg.Pool, policy: str, sid: str, task_id: str
) -> SupervisorState:
    """The task ran twice (rerun, then cancelled at done) or once (interrupted), and the
    supervisor completed. Returns its state."""
    task = await repo.get_task(pool, uuid.UUID(task_id))
    assert task is not None
    assert task.attempts == (2 if policy == "rerun" else 1)
    assert task.status.value == ("cancelled" if policy == "rerun" else "interrupted")
    state = await repo.get_supervisor_state_for_restoration(pool, uuid.UUID(sid))
    assert state is not None and state.state.value == "completed"
    return state


@pytest.mark.parametrize("policy", ["interrupt", "rerun"])
async def test_running_task_after_sigkill(
    policy: str, db_params: ConnectParams, short_tmp: Path, relay: Relay
) -> None:
    async with daemon_process(short_tmp, db_params) as proc:
        sid, agent, task_id = await waiting_on_a_long_task(proc, policy, relay)
        (orphan,) = find_task_processes({task_id})[task_id]
        assert await proc.kill() == -9
        assert await agent.receive() is None
        assert find_task_processes({task_id}) == {task_id: [orphan]}  # it outlived the daemon

        await proc.start(args=["--task-restart-policy", policy])
        agent = await relay.accept()
        restoration = (await agent.expect("start"))["restoration"]
        assert orphan not in find_task_processes({task_id}).get(task_id, [])  # stopped
        (listed,) = restoration["tasks"]
        if policy == "rerun":
            assert restoration["state"] == "waiting_for_tasks"
            with anyio.fail_after(DEADLINE):
                while not find_task_processes({task_id}):
                    await anyio.wait_all_tasks_blocked()
            assert listed["status"] == "running"
        else:
            assert listed["status"] == "interrupted"
            assert restoration["state"] == "working"
            assert "Interrupted tasks did not finish" in restoration["context_message"]
        await agent.request({"type": "done"})
        assert await agent.receive() is None
        await proc.terminate()
    assert find_task_processes({task_id}) == {}
    pool = await create_pool(db_params, min_size=1, max_size=1)
    try:
        await ended_as_the_policy_says(pool, policy, sid, task_id)
    finally:
        await pool.close()


@pytest.mark.parametrize("policy", ["interrupt", "rerun"])
async def test_running_task_after_a_clean_stop(
    policy: str, db_params: ConnectParams, short_tmp: Path, relay: Relay
) -> None:
    """SIGTERM: the daemon stops the task itself (interrupted); the policy then decides
    as after a crash. (The supervisor resumes working: a clean stop recorded it as
    interrupted, not as waiting; the agent waits again if it wants to.)"""
    async with daemon_process(short_tmp, db_params) as proc:
        sid, agent, task_id = await waiting_on_a_long_task(proc, policy, relay)
        assert await proc.terminate() == 0
        with anyio.fail_after(DEADLINE):
            while await agent.receive() is not None:
                pass
        assert find_task_processes({task_id}) == {}  # stopped with the daemon

        await proc.start(args=["--task-restart-policy", policy])
        agent = await relay.accept()
        restoration = (await agent.expect("start"))["restoration"]
        (listed,) = restoration["tasks"]
        if policy == "rerun":
            assert listed["status"] == "pending" and restoration["state"] == "working"
            with anyio.fail_after(DEADLINE):
                while not find_task_processes({task_id}):
                    await anyio.wait_all_tasks_blocked()
        else:
            assert listed["status"] == "interrupted" and restoration["state"] == "working"
        await agent.request({"type": "done"})
        assert await agent.receive() is None
        await proc.terminate()
    pool = await create_pool(db_params, min_size=1, max_size=1)
    try:
        state = await ended_as_the_policy_says(pool, policy, sid, task_id)
        assert state.restoration_count == 1
    finally:
        await pool.close()

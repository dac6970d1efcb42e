"""The daemon with real agent processes: every message type, every save point
read back right after its acknowledgement."""

from __future__ import annotations

import uuid

import anyio
import asyncpg
import pytest

from makima import repository as repo
from makima.control.client import ControlClient
from makima.daemon import Daemon
from makima.model import SupervisorStateEnum as S
from makima.model import TaskStatus
from tests.harness import Relay, next_event

pytestmark = pytest.mark.anyio


async def create(client: ControlClient, relay: Relay, name: str = "t") -> str:
    result = await client.call(
        "supervisor.create", {"name": name, "command": relay.command, "goal": "g"}
    )
    return str(result["supervisor_id"])


async def state_of(daemon: Daemon, sid: str) -> object:
    state = await repo.get_supervisor_state_for_restoration(daemon.db.pool, uuid.UUID(sid))
    assert state is not None
    return state


async def test_every_message_type_is_saved_before_its_ack(
    daemon: Daemon, client: ControlClient, relay: Relay
) -> None:
    pool: asyncpg.Pool = daemon.db.pool
    async with client.events() as events:
        sid = await create(client, relay)
        agent = await relay.accept()
        start = await agent.expect("start")
        assert start["supervisor_id"] == sid and start["restoration"] is None
        assert start["protocol"] == 1 and start["goal"] == "g"
        sup = uuid.UUID(sid)

        assert (await agent.request({"type": "activity", "text": "reading", "progress": 10}))[
            "type"
        ] == "ack"
        state = await repo.get_supervisor_state_for_restoration(pool, sup)
        assert state is not None
        assert (state.state, state.current_activity, state.progress) == (S.WORKING, "reading", 10)

        await agent.request({"type": "phase", "phase": "checks"})
        state = await repo.get_supervisor_state_for_restoration(pool, sup)
        assert state is not None and state.phase == "checks"
        checkpoint = await repo.get_latest_supervisor_checkpoint(pool, sup)
        assert checkpoint is not None and checkpoint.reason == "phase_change"

        reply = await agent.request(
            {"type": "message", "role": "assistant", "content": {"t": "hi"}}
        )
        assert reply["seq"] == 1
        assert [m.content for m in await repo.get_supervisor_messages(pool, sup)] == [{"t": "hi"}]

        await agent.request({"type": "checkpoint", "data": {"step": 2}})
        state = await repo.get_supervisor_state_for_restoration(pool, sup)
        assert state is not None and state.checkpoint_data == {"step": 2}

        # a task: its row exists when the agent learns its id
        reply = await agent.request({"type": "spawn", "name": "echo", "command": ["echo", "hello"]})
        task_id = uuid.UUID(reply["task_id"])
        assert await repo.get_task(pool, task_id) is not None
        finished = await agent.expect("task_finished")
        assert finished["task_id"] == str(task_id) and finished["status"] == "succeeded"
        assert finished["exit_code"] == 0 and "hello" in finished["output_tail"]
        task = await repo.get_task(pool, task_id)
        assert task is not None and task.status is TaskStatus.SUCCEEDED and task.attempts == 1

        # wait_tasks with nothing running: tasks_done at once
        await agent.request({"type": "wait_tasks"})
        await agent.expect("tasks_done")

        # a slow task, then wait_tasks: waiting_for_tasks until it ends
        reply = await agent.request(
            {
                "type": "spawn",
                "name": "slow",
                "command": ["python3", "-c", "import sys; sys.stdin.read()"],
            }
        )
        await agent.request({"type": "wait_tasks"})
        state = await repo.get_supervisor_state_for_restoration(pool, sup)
        assert state is not None and state.state is S.WAITING_FOR_TASKS
        # the task reads stdin, which is /dev/null: it ends at once
        await agent.expect("task_finished")
        await agent.expect("tasks_done")

        # a question: persisted, acked with its id, announced
        reply = await agent.request(
            {
                "type": "ask",
                "question": "Ship it?",
                "choices": ["ship", "hold"],
                "context": "all green",
            }
        )
        qid = reply["question_id"]
        state = await repo.get_supervisor_state_for_restoration(pool, sup)
        assert state is not None and state.state is S.WAITING_FOR_USER
        assert [str(q.id) for q in state.pending_questions] == [qid]
        asked = await next_event(events, "question.asked", question_id=qid)
        assert asked["supervisor_id"] == sid and asked["choices"] == ["ship", "hold"]

        answered = await client.call("question.answer", {"question_id": qid, "answer": "ship"})
        assert answered["supervisor_id"] == sid
        record = await repo.get_question(pool, uuid.UUID(qid))
        assert record is not None and record.answer == "ship"
        message = await agent.expect("answer")
        assert message == {"type": "answer", "question_id": qid, "answer": "ship"}
        state = await repo.get_supervisor_state_for_restoration(pool, sup)
        assert state is not None and state.state is S.WORKING and state.pending_questions == ()

        await agent.request({"type": "blocked", "reason": "need a token"})
        state = await repo.get_supervisor_state_for_restoration(pool, sup)
        assert (
            state is not None and state.state is S.BLOCKED and state.error_message == "need a token"
        )

        await agent.request({"type": "done", "result": {"ok": True}})
        state = await repo.get_supervisor_state_for_restoration(pool, sup)
        assert state is not None and state.state is S.COMPLETED and state.progress == 100
        assert state.result == {"ok": True}
        assert (await client.call("supervisor.get", {"supervisor_id": sid}))["result"] == {
            "ok": True
        }
        assert await agent.receive() is None  # the daemon closed the agent's stdin
        await next_event(events, "supervisor.state_changed", supervisor_id=sid, state="completed")
        record = await repo.get_question(pool, uuid.UUID(qid))
        assert record is not None and record.delivered_at is not None


async def test_fail_records_the_error(daemon: Daemon, client: ControlClient, relay: Relay) -> None:
    sid = await create(client, relay)
    agent = await relay.accept()
    await agent.expect("start")
    await agent.request({"type": "fail", "error": "tests are red"})
    body = await client.call("supervisor.get", {"supervisor_id": sid})
    assert body["state"] == "failed" and body["error_message"] == "tests are red"
    assert await agent.receive() is None


@pytest.mark.parametrize(
    ("line", "code"),
    [
        (b"this is not json\n", "malformed"),
        (b"[1, 2]\n", "malformed"),
        (b"\xff\xfe\n", "malformed"),
        (b'{"type": "dance", "ref": "r1"}\n', "unknown_type"),
        (b'{"type": "ask", "ref": "r1"}\n', "invalid"),
        (b'{"type": "activity", "text": "x", "progress": 101, "ref": "r1"}\n', "invalid"),
        (b'{"type": "spawn", "name": "x", "command": [], "ref": "r1"}\n', "invalid"),
        (b'{"ref": "r1"}\n', "invalid"),
        (b'{"type": "tasks_done", "ref": "r1"}\n', "unknown_type"),
        (b"x" * (1024 * 1024 + 10) + b"\n", "too_long"),
        # JSON that PostgreSQL cannot store: refused before any save point
        (b'{"type": "activity", "text": "a\\u0000b", "ref": "r1"}\n', "invalid"),
        (b'{"type": "activity", "text": "a\\u0000b"}\n', "invalid"),
        (
            b'{"type": "message", "role": "assistant", "content": "\\udc00", "ref": "r1"}\n',
            "invalid",
        ),
        (b'{"type": "checkpoint", "data": {"x": NaN}, "ref": "r1"}\n', "malformed"),
        (b'{"type": "checkpoint", "data": [1e999], "ref": "r1"}\n', "malformed"),
    ],
)
async def test_bad_agent_lines_get_an_error_and_nothing_breaks(
    daemon: Daemon, client: ControlClient, relay: Relay, line: bytes, code: str
) -> None:
    sid = await create(client, relay)
    agent = await relay.accept()
    await agent.expect("start")
    await agent.send_raw(line)
    reply = await agent.expect("error")
    assert reply["code"] == code and reply["message"]
    if b'"ref": "r1"' in line and reply["code"] != "malformed":
        assert reply["ref"] == "r1"
    # the supervisor and the daemon carry on
    assert (await agent.request({"type": "activity", "text": "still here"}))["type"] == "ack"
    assert (await client.call("daemon.hello"))["protocol"] == "makima-control/1"
    body = await client.call("supervisor.get", {"supervisor_id": sid})
    assert body["current_activity"] == "still here"


async def test_cancel_stops_agent_and_tasks(
    daemon: Daemon, client: ControlClient, relay: Relay
) -> None:
    sid = await create(client, relay)
    agent = await relay.accept()
    await agent.expect("start")
    reply = await agent.request({"type": "spawn", "name": "sleeper", "command": ["sleep", "60"]})
    result = await client.call("supervisor.cancel", {"supervisor_id": sid})
    assert result["state"] == "failed"
    assert (await agent.expect("cancel"))["reason"].startswith("cancelled by uid")
    with anyio.fail_after(30):
        while await agent.receive() is not None:
            pass
    body = await client.call("supervisor.get", {"supervisor_id": sid})
    assert body["state"] == "failed" and body["error_message"].startswith("cancelled")
    task = await repo.get_task(daemon.db.pool, uuid.UUID(reply["task_id"]))
    assert task is not None

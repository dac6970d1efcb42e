"""Restoration end to end: a real daemon killed (SIGKILL) or stopped (SIGTERM)
while an agent waits for an answer, agent restarts, manual resume, and the
startup report for states that need recovery."""

from __future__ import annotations

import json
import uuid
from pathlib import Path
from typing import Any

import anyio
import asyncpg
import pytest

from makima import repository as repo
from makima.control.client import ConnectionClosedError, ControlClient, RemoteError
from makima.database import create_pool
from makima.embedded import ConnectParams
from makima.model import (
    PendingQuestion,
    SupervisorSpec,
    SupervisorState,
)
from makima.model import SupervisorStateEnum as S
from tests.harness import DEADLINE, Relay, client_for, daemon_config, next_event, running_daemon
from tests.process import DaemonProcess, daemon_process

pytestmark = pytest.mark.anyio


async def read_state(params: ConnectParams, sid: str) -> SupervisorState:
    pool = await create_pool(params, min_size=1, max_size=1)
    try:
        state = await repo.get_supervisor_state_for_restoration(pool, uuid.UUID(sid))
    finally:
        await pool.close()
    assert state is not None
    return state


async def ask_and_stop(proc: DaemonProcess, relay: Relay, *, how: str) -> tuple[str, str]:
    """Start a supervisor, let its agent ask, then stop the daemon (kill or term)."""
    async with ControlClient.connect(proc.socket_path, timeout=DEADLINE) as client:
        created = await client.call(
            "supervisor.create", {"name": "asker", "command": relay.command}
        )
        agent = await relay.accept()
        assert (await agent.expect("start"))["restoration"] is None
        await agent.request({"type": "phase", "phase": "decision"})
        reply = await agent.request(
            {
                "type": "ask",
                "question": "Ship 2.0?",
                "choices": ["ship", "hold"],
                "context": "green",
            }
        )
    codes: list[int] = []

    async def stop() -> None:
        codes.append(await (proc.kill() if how == "kill" else proc.terminate()))

    with anyio.fail_after(DEADLINE):
        async with anyio.create_task_group() as tg:
            tg.start_soon(stop)
            # with the daemon gone, the agent's stdin closes: it never outlives the daemon
            while (message := await agent.receive()) is not None:
                assert message["type"] == "cancel"
    assert codes == ([-9] if how == "kill" else [0])
    return str(created["supervisor_id"]), str(reply["question_id"])


@pytest.mark.parametrize("how", ["kill", "term"])
async def test_open_question_survives_daemon_stop(
    db_params: ConnectParams, short_tmp: Path, relay: Relay, how: str
) -> None:
    async with daemon_process(short_tmp, db_params) as proc:
        await proc.start()
        sid, qid = await ask_and_stop(proc, relay, how=how)
        state = await read_state(db_params, sid)
        expected = S.WAITING_FOR_USER if how == "kill" else S.INTERRUPTED
        assert state.state is expected  # after a crash the row keeps its last state
        assert [str(q.id) for q in state.pending_questions] == [qid]

        await proc.start()
        async with (
            ControlClient.connect(proc.socket_path, timeout=DEADLINE) as client,
            client.events() as events,
        ):
            agent = await relay.accept()
            start = await agent.expect("start")
            seen = await next_event_of(events, {"question.pending", "question.redelivered"}, qid)
            assert seen["question"] == "Ship 2.0?" and seen["choices"] == ["ship", "hold"]
            restoration = start["restoration"]
            assert restoration["source"] == "daemon_restart"
            assert restoration["restoration_count"] == 1
            assert restoration["phase"] == "decision"
            assert restoration["state"] == "waiting_for_user"
            assert [q["id"] for q in restoration["pending_questions"]] == [qid]
            assert qid in restoration["context_message"]
            assert "daemon restarted" in restoration["context_message"]
            listed = (await client.call("question.list"))["questions"]
            assert [q["question_id"] for q in listed] == [qid]

            await client.call("question.answer", {"question_id": qid, "answer": "ship"})
            assert await agent.expect("answer") == {
                "type": "answer",
                "question_id": qid,
                "answer": "ship",
            }
            # exactly once: the next thing the agent sees is the ack of its done
            done = await agent.request({"type": "done"})
            assert done["type"] == "ack"
            await next_event(
                events, "supervisor.state_changed", supervisor_id=sid, state="completed"
            )
        await proc.terminate()
    state = await read_state(db_params, sid)
    assert state.state is S.COMPLETED
    assert state.restoration_count == 1
    assert (
        state.restoration_source is not None and state.restoration_source.value == "daemon_restart"
    )
    pool = await create_pool(db_params, min_size=1, max_size=1)
    try:
        record = await repo.get_question(pool, uuid.UUID(qid))
    finally:
        await pool.close()
    assert record is not None and record.answer == "ship" and record.delivered_at is not None
    assert record.redelivery_count == 1


async def next_event_of(events: Any, kinds: set[str], question_id: str) -> dict[str, Any]:
    with anyio.fail_after(DEADLINE):
        async for event in events:
            if event["kind"] in kinds and event.get("question_id") == question_id:
                return dict(event)
    raise AssertionError("no event")


async def test_answer_committed_but_not_delivered_is_delivered_once_after_restart(
    db_params: ConnectParams, short_tmp: Path, relay: Relay
) -> None:
    async with daemon_process(short_tmp, db_params) as proc:
        await proc.start(fault="answer:after_commit")
        async with ControlClient.connect(proc.socket_path, timeout=DEADLINE) as client:
            created = await client.call(
                "supervisor.create", {"name": "a", "command": relay.command}
            )
            agent = await relay.accept()
            await agent.expect("start")
            qid = (
                await agent.request({"type": "ask", "question": "Go?", "choices": ["go", "stop"]})
            )["question_id"]
            with pytest.raises((ConnectionClosedError, RemoteError)):
                await client.call("question.answer", {"question_id": qid, "answer": "go"})
        assert await proc.wait() == -9  # the fault hook killed it right after the commit
        assert await agent.receive() is None  # the answer never reached the old agent

        await proc.start()
        agent = await relay.accept()
        restoration = (await agent.expect("start"))["restoration"]
        assert restoration["pending_questions"] == []
        assert restoration["undelivered_answers"] == [
            {"question_id": qid, "question": "Go?", "choices": ["go", "stop"], "answer": "go"}
        ]
        assert "Go? -> go" in restoration["context_message"]
        assert (await agent.request({"type": "done"}))["type"] == "ack"  # no second delivery first
        await proc.terminate()
    state = await read_state(db_params, str(created["supervisor_id"]))
    assert state.state is S.COMPLETED and state.restoration_count == 1


async def test_agent_that_dies_is_restarted_then_given_up(
    db_params: ConnectParams, short_tmp: Path, relay: Relay
) -> None:
    config = daemon_config(
        db_params,
        short_tmp,
        agent_restart_limit=2,
        agent_restart_window=60.0,
        agent_restart_backoff=0.01,
    )
    async with running_daemon(config) as daemon, client_for(daemon) as client:
        async with client.events(["supervisor.restored", "supervisor.state_changed"]) as events:
            created = await client.call(
                "supervisor.create", {"name": "flaky", "command": relay.command}
            )
            sid = created["supervisor_id"]
            agent = await relay.accept()
            await agent.expect("start")
            await agent.request({"type": "phase", "phase": "one"})
            await agent.close()  # the agent exits without done or fail
            for attempt in (1, 2):
                agent = await relay.accept()
                restoration = (await agent.expect("start"))["restoration"]
                assert restoration["source"] == "agent_restart"
                assert restoration["restoration_count"] == attempt
                assert restoration["phase"] == "one"
                assert "exited without reporting done or fail" in restoration["context_message"]
                restored = await next_event(events, "supervisor.restored", supervisor_id=sid)
                assert restored["source"] == "agent_restart"
                await agent.close()
            failed = await next_event(
                events, "supervisor.state_changed", supervisor_id=sid, state="failed"
            )
            assert "3 times within 60s" in failed["error_message"]
        body = await client.call("supervisor.get", {"supervisor_id": sid})
        assert body["state"] == "failed" and body["restoration_count"] == 2


async def test_manual_resume(db_params: ConnectParams, short_tmp: Path, relay: Relay) -> None:
    async with (
        running_daemon(daemon_config(db_params, short_tmp)) as daemon,
        client_for(daemon) as client,
    ):
        created = await client.call("supervisor.create", {"name": "r", "command": relay.command})
        sid = created["supervisor_id"]
        agent = await relay.accept()
        await agent.expect("start")
        qid = (await agent.request({"type": "ask", "question": "Which?", "choices": []}))[
            "question_id"
        ]
        info: dict[str, Any] = {}

        async def resume() -> None:
            info.update(await client.call("supervisor.resume", {"supervisor_id": sid}))

        async with anyio.create_task_group() as tg:
            tg.start_soon(resume)
            assert (await agent.expect("cancel"))["reason"] == "resumed by a person"
            assert await agent.receive() is None
        assert info["source"] == "manual" and info["restoration_count"] == 1
        assert info["validation"] == {"valid": True, "issues": [], "action": None}
        assert info["redelivered_question_ids"] == [qid]
        agent = await relay.accept()
        restoration = (await agent.expect("start"))["restoration"]
        assert (
            restoration["source"] == "manual"
            and restoration["context_message"] == info["context_message"]
        )
        await client.call("question.answer", {"question_id": qid, "answer": "the blue one"})
        assert (await agent.expect("answer"))["answer"] == "the blue one"
        await agent.request({"type": "done"})


async def test_startup_repairs_reverts_starts_fresh_and_fails(
    db_params: ConnectParams, short_tmp: Path, relay: Relay
) -> None:
    pool: asyncpg.Pool = await create_pool(db_params, min_size=1, max_size=2)
    try:
        # (a) waiting_for_user without any pending question: repaired
        a = SupervisorSpec.new("repair-me", relay.command)
        await repo.create_supervisor(pool, a)
        await repo.update_supervisor_detailed_state(
            pool, a.supervisor_id, S.WAITING_FOR_USER, None, 5
        )
        # (b) an unreadable pending_questions value, with a checkpoint to go back to
        b = SupervisorSpec.new("revert-me", relay.command)
        await repo.create_supervisor(pool, b)
        snapshot = SupervisorState(
            supervisor_id=b.supervisor_id, state=S.WORKING, phase="p1", progress=30
        )
        await repo.save_supervisor_checkpoint(pool, b.supervisor_id, snapshot, "phase_change")
        # asked after the checkpoint, still open: going back must not drop it
        later = PendingQuestion(id=uuid.uuid4(), question="Which region?")
        await repo.record_question_asked(pool, b.supervisor_id, later, S.WAITING_FOR_USER)
        await pool.execute(
            'UPDATE supervisor_states SET pending_questions = \'[{"id": "garbage"}]\', '
            "restoration_count = 5 WHERE supervisor_id = $1",
            b.supervisor_id,
        )
        # (c) a spec whose state row is gone: starts fresh with a warning
        c = SupervisorSpec.new("fresh-me", relay.command)
        await repo.create_supervisor(pool, c)
        fresh_question = PendingQuestion(id=uuid.uuid4(), question="Name it?")
        await repo.record_question_asked(pool, c.supervisor_id, fresh_question, S.WAITING_FOR_USER)
        await pool.execute(
            "DELETE FROM supervisor_states WHERE supervisor_id = $1", c.supervisor_id
        )
        # (d) no agent command at all: marked failed
        d = SupervisorSpec.new("fail-me", ["placeholder"])
        await repo.create_supervisor(pool, d)
        await pool.execute(
            "UPDATE supervisors SET agent_command = '{}' WHERE supervisor_id = $1", d.supervisor_id
        )
        # (e) a healthy one with a pending question and a question row: restored as is
        e = SupervisorSpec.new("restore-me", relay.command)
        await repo.create_supervisor(pool, e)
        question = PendingQuestion(id=uuid.uuid4(), question="Still there?")
        await repo.record_question_asked(pool, e.supervisor_id, question, S.WAITING_FOR_USER)
    finally:
        await pool.close()

    async with (
        running_daemon(daemon_config(db_params, short_tmp)) as daemon,
        client_for(daemon) as client,
    ):
        report = daemon.startup_report
        assert report is not None
        assert report["counts"] == {
            "restored": 1,
            "repaired": 1,
            "reverted": 1,
            "fresh": 1,
            "failed": 1,
        }
        names = {
            o: [x["name"] for x in report[o]]
            for o in ("restored", "repaired", "reverted", "fresh", "failed")
        }
        assert names == {
            "restored": ["restore-me"],
            "repaired": ["repair-me"],
            "reverted": ["revert-me"],
            "fresh": ["fresh-me"],
            "failed": ["fail-me"],
        }
        assert any("waiting_for_user" in issue for issue in report["repaired"][0]["issues"])
        status = await client.call("daemon.status")
        assert status["last_startup_report"]["counts"] == report["counts"]
        starts = {}
        for _ in range(4):
            agent = await relay.accept()
            start = await agent.expect("start")
            starts[start["name"]] = start
        # a fresh start begins again, but open questions stay open and are handed back
        fresh = starts["fresh-me"]["restoration"]
        assert fresh["phase"] is None and fresh["progress"] == 0
        assert [q["id"] for q in fresh["pending_questions"]] == [str(fresh_question.id)]
        assert fresh["state"] == "waiting_for_user"
        reverted = starts["revert-me"]["restoration"]
        assert reverted["phase"] == "p1" and reverted["progress"] == 30
        assert [q["id"] for q in reverted["pending_questions"]] == [str(later.id)]
        assert reverted["state"] == "waiting_for_user"
        listed = await client.call("question.list")
        assert {q["question_id"] for q in listed["questions"]} == {
            str(question.id),
            str(later.id),
            str(fresh_question.id),
        }
        assert starts["repair-me"]["restoration"]["state"] == "working"
        assert starts["restore-me"]["restoration"]["pending_questions"][0]["id"] == str(question.id)
        failed = await client.call("supervisor.get", {"supervisor_id": str(d.supervisor_id)})
        assert failed["state"] == "failed" and "no agent command" in failed["error_message"]
        for name in ("repair-me", "revert-me", "fresh-me", "restore-me"):
            body = await client.call(
                "supervisor.get", {"supervisor_id": starts[name]["supervisor_id"]}
            )
            # one more than before, even when reverted to an older checkpoint
            assert body["restoration_count"] == (6 if name == "revert-me" else 1), name
        json.dumps(report)  # the report is plain JSON

"""Interleavings that once lost an answer, a cancel or a resume: each is forced
with events around the real code, never with sleeps."""

from __future__ import annotations

import functools
import json
import socket
import uuid
from collections.abc import Awaitable, Callable
from typing import Any

import anyio
import asyncpg
import pytest

from makima import repository as repo
from makima.agent import AgentProcess
from makima.control.client import ControlClient, RemoteError
from makima.daemon import Daemon
from makima.model import SupervisorStateEnum as S
from makima.supervisor import Supervisor
from tests.harness import DEADLINE, AgentChannel, Relay, client_for

pytestmark = pytest.mark.anyio


async def started(client: ControlClient, relay: Relay) -> tuple[str, AgentChannel]:
    sid = (await client.call("supervisor.create", {"name": "r", "command": relay.command}))[
        "supervisor_id"
    ]
    agent = await relay.accept()
    await agent.expect("start")
    return str(sid), agent


def hold(
    monkeypatch: pytest.MonkeyPatch, owner: object, name: str
) -> tuple[anyio.Event, anyio.Event]:
    """Make ``owner.name`` (an async callable) stop on entry until released."""
    entered, release = anyio.Event(), anyio.Event()
    real: Callable[..., Awaitable[Any]] = getattr(owner, name)

    @functools.wraps(real)
    async def held(*args: Any, **kwargs: Any) -> Any:
        entered.set()
        await release.wait()
        return await real(*args, **kwargs)

    monkeypatch.setattr(owner, name, held)
    return entered, release


def on_entry(monkeypatch: pytest.MonkeyPatch, owner: type, name: str) -> anyio.Event:
    """An event set each time the method ``owner.name`` is entered."""
    entered = anyio.Event()
    real = getattr(owner, name)

    @functools.wraps(real)
    async def noted(self: Any, *args: Any, **kwargs: Any) -> Any:
        entered.set()
        return await real(self, *args, **kwargs)

    monkeypatch.setattr(owner, name, noted)
    return entered


def commit_then_lose_the_reply_once(
    monkeypatch: pytest.MonkeyPatch, name: str
) -> list[dict[str, Any]]:
    """Make ``repo.name`` commit, then fail the first time as if the connection dropped
    before COMMIT's reply came back. Returns each call's keyword arguments."""
    real: Callable[..., Awaitable[Any]] = getattr(repo, name)
    calls: list[dict[str, Any]] = []

    async def reply_lost_once(*args: Any, **kwargs: Any) -> Any:
        calls.append(kwargs)
        result = await real(*args, **kwargs)  # committed
        if len(calls) == 1:
            raise asyncpg.ConnectionDoesNotExistError("connection was closed in the middle")
        return result

    monkeypatch.setattr(repo, name, reply_lost_once)
    return calls


async def call_elsewhere(
    daemon: Daemon, method: str, params: dict[str, Any], result: dict[str, Any]
) -> None:
    """``method`` from a client of its own (it may wait while the test goes on)."""
    async with client_for(daemon) as other:
        result.update(await other.call(method, params))


def answer_and_half_close(path: str, question_id: str) -> bytes:
    """A client that sends its request, shuts its sending side and reads the reply."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.settimeout(DEADLINE)
        s.connect(path)
        request = {
            "jsonrpc": "2.0",
            "id": 1,
            "method": "question.answer",
            "params": {"question_id": question_id, "answer": "ship"},
        }
        s.sendall(json.dumps(request).encode() + b"\n")
        s.shutdown(socket.SHUT_WR)
        data = b""
        while chunk := s.recv(65536):
            data += chunk
        return data


async def test_an_answer_reaches_the_agent_after_its_client_has_gone(
    daemon: Daemon, client: ControlClient, relay: Relay
) -> None:
    _, agent = await started(client, relay)
    qid = (await agent.request({"type": "ask", "question": "Ship?", "choices": ["ship"]}))[
        "question_id"
    ]
    reply = await anyio.to_thread.run_sync(
        answer_and_half_close, str(daemon.config.socket_path), qid
    )
    assert json.loads(reply)["result"]["question_id"] == qid
    assert await agent.expect("answer") == {"type": "answer", "question_id": qid, "answer": "ship"}


async def test_an_answer_given_while_the_agent_restarts_reaches_the_new_agent_once(
    daemon: Daemon, client: ControlClient, relay: Relay, monkeypatch: pytest.MonkeyPatch
) -> None:
    _, agent = await started(client, relay)
    qid = (await agent.request({"type": "ask", "question": "Ship?"}))["question_id"]
    # hold the restoration between reading the state and writing it back
    restoring, release = hold(monkeypatch, repo, "get_supervisor_messages")
    answering = on_entry(monkeypatch, Supervisor, "answer")
    await agent.close()  # the agent dies with its question open
    result: dict[str, Any] = {}
    async with anyio.create_task_group() as tg:
        with anyio.fail_after(DEADLINE):
            await restoring.wait()
            params = {"question_id": qid, "answer": "y"}
            tg.start_soon(call_elsewhere, daemon, "question.answer", params, result)
            await answering.wait()
        release.set()
        new_agent = await relay.accept()
        start = await new_agent.expect("start")
    assert result["answer"] == "y"
    in_start = [a["question_id"] for a in start["restoration"]["undelivered_answers"]]
    pending = [q["id"] for q in start["restoration"]["pending_questions"]]
    if in_start:  # the answer landed first: the restoration carries it
        assert in_start == [qid] and pending == []
    else:  # the answer waited for the restoration: it follows the start message
        assert pending == [qid]
        assert await new_agent.expect("answer") == {
            "type": "answer",
            "question_id": qid,
            "answer": "y",
        }
    # exactly once: the next thing the agent hears is the ack of its own request
    assert (await new_agent.request({"type": "activity", "text": "after"}))["type"] == "ack"


async def test_a_cancel_while_the_agent_restarts_is_not_undone(
    daemon: Daemon, client: ControlClient, relay: Relay, monkeypatch: pytest.MonkeyPatch
) -> None:
    sid, agent = await started(client, relay)
    restoring, release = hold(monkeypatch, repo, "get_supervisor_messages")
    stopping = on_entry(monkeypatch, Supervisor, "stop")
    launched: list[object] = []
    real_start = AgentProcess.start

    async def counted(*args: Any, **kwargs: Any) -> AgentProcess:
        launched.append(args)
        return await real_start(*args, **kwargs)

    monkeypatch.setattr(AgentProcess, "start", counted)
    await agent.close()
    supervisor = daemon.supervisors[uuid.UUID(sid)]
    async with anyio.create_task_group() as tg:
        with anyio.fail_after(DEADLINE):
            await restoring.wait()
            params = {"supervisor_id": sid}
            tg.start_soon(call_elsewhere, daemon, "supervisor.cancel", params, {})
            await stopping.wait()
        release.set()
    with anyio.fail_after(DEADLINE):
        await supervisor.stopped.wait()
    state = await repo.get_supervisor_state_for_restoration(daemon.db.pool, uuid.UUID(sid))
    assert state is not None and state.state is S.FAILED
    assert launched == []  # no agent was started for the cancelled supervisor
    assert (await client.call("supervisor.get", {"supervisor_id": sid}))["state"] == "failed"


async def test_a_resume_while_the_agent_starts_does_not_hang(
    daemon: Daemon, client: ControlClient, relay: Relay, monkeypatch: pytest.MonkeyPatch
) -> None:
    sid, agent = await started(client, relay)
    starting, release = hold(monkeypatch, AgentProcess, "start")
    stopping = on_entry(monkeypatch, Supervisor, "stop")
    await agent.close()  # the agent dies; its restart stops inside AgentProcess.start
    result: dict[str, Any] = {}
    async with anyio.create_task_group() as tg:
        with anyio.fail_after(DEADLINE):
            await starting.wait()
            params = {"supervisor_id": sid}
            tg.start_soon(call_elsewhere, daemon, "supervisor.resume", params, result)
            await stopping.wait()
        release.set()
        # the agent that was starting is stopped at once; the resumed one starts
        first = await relay.accept()
        assert await first.receive() is None  # closed without a start message
        resumed = await relay.accept()
        start = await resumed.expect("start")
    assert start["restoration"]["source"] == "manual"
    assert result["source"] == "manual"


async def test_an_answer_whose_commit_reply_was_lost_is_not_refused_as_a_second_answer(
    daemon: Daemon, client: ControlClient, relay: Relay, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The connection drops after COMMIT went through but before its reply came back:
    the save point is retried, finds its own answer, and carries on as committed."""
    sid, agent = await started(client, relay)
    qid = (await agent.request({"type": "ask", "question": "Ship?", "choices": ["ship"]}))[
        "question_id"
    ]
    calls = commit_then_lose_the_reply_once(monkeypatch, "answer_question")
    with anyio.fail_after(DEADLINE):
        result = await client.call("question.answer", {"question_id": qid, "answer": "ship"})
        assert result["answer"] == "ship"
        assert [c.get("retry", False) for c in calls] == [False, True]
        assert await agent.expect("answer") == {
            "type": "answer",
            "question_id": qid,
            "answer": "ship",
        }
        body = await client.call("supervisor.get", {"supervisor_id": sid})
        assert body["state"] == "working" and body["pending_questions"] == []
        # a second answer, from anyone, is still refused
        with pytest.raises(RemoteError, match="already answered"):
            await client.call("question.answer", {"question_id": qid, "answer": "ship"})
        # and the agent heard the answer once
        assert (await agent.request({"type": "activity", "text": "after"}))["type"] == "ack"


class Beats:
    """The daemon's heartbeat statement, held on demand, and counted when done."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.real = repo.update_supervisors_heartbeat_bulk
        self.done = 0
        self.changed = anyio.Event()
        self.hold: anyio.Event | None = None
        self.holding = anyio.Event()
        monkeypatch.setattr(repo, "update_supervisors_heartbeat_bulk", self.beat)

    async def beat(self, *args: Any, **kwargs: Any) -> Any:
        if self.hold is not None:  # the beats were taken; the write waits
            self.holding.set()
            await self.hold.wait()
        result = await self.real(*args, **kwargs)
        self.done += 1
        self.changed.set()
        self.changed = anyio.Event()
        return result

    async def wait(self, n: int) -> None:
        """Until ``n`` more heartbeat statements have completed."""
        target = self.done + n
        while self.done < target:
            await self.changed.wait()


async def test_a_heartbeat_taken_before_an_acknowledged_activity_does_not_undo_it(
    daemon: Daemon, client: ControlClient, relay: Relay, monkeypatch: pytest.MonkeyPatch
) -> None:
    sid, agent = await started(client, relay)
    beats = Beats(monkeypatch)
    pool = daemon.db.pool

    async def row() -> tuple[str | None, int]:
        state = await repo.get_supervisor_state_for_restoration(pool, uuid.UUID(sid))
        assert state is not None
        return state.current_activity, state.progress

    with anyio.fail_after(DEADLINE):
        beats.hold = anyio.Event()
        await agent.send({"type": "activity", "text": "old", "progress": 20})  # no ack asked
        await beats.holding.wait()  # a beat is taken (with "old" or before it) and waits
        ack = await agent.request({"type": "activity", "text": "acked", "progress": 30})
        assert ack["type"] == "ack"
        assert await row() == ("acked", 30)
        beats.hold.set()
        beats.hold = None
        await beats.wait(1)
        assert await row() == ("acked", 30)  # not undone by the beat taken before it
        # later beats still carry what the agent says without asking for an ack
        await agent.send({"type": "activity", "text": "newest", "progress": 40})
        await agent.request({"type": "message", "role": "assistant", "content": "sync"})
        await beats.wait(2)  # the second was taken after "newest" was applied
        assert await row() == ("newest", 40)
        # a save point that does not tell the supervisor the row's new version (a
        # spawn): one beat learns it, the next writes again
        await agent.request({"type": "spawn", "name": "t", "command": ["true"]})
        await agent.expect("task_finished")  # its save point is over too
        await agent.send({"type": "activity", "text": "after spawn", "progress": 50})
        await agent.request({"type": "message", "role": "assistant", "content": "sync"})
        await beats.wait(3)
        assert await row() == ("after spawn", 50)


async def test_a_restoration_counted_once_when_its_commit_reply_was_lost(
    daemon: Daemon, client: ControlClient, relay: Relay, monkeypatch: pytest.MonkeyPatch
) -> None:
    sid, agent = await started(client, relay)
    calls = commit_then_lose_the_reply_once(monkeypatch, "mark_supervisors_restored")
    with anyio.fail_after(DEADLINE):
        await agent.close()  # the agent dies: restored with source agent_restart
        new_agent = await relay.accept()
        restoration = (await new_agent.expect("start"))["restoration"]
    assert restoration["restoration_count"] == 1
    body = await client.call("supervisor.get", {"supervisor_id": sid})
    assert body["restoration_count"] == 1
    assert [c.get("unless_past") is not None for c in calls] == [False, True]  # a known retry

"""Careless and hostile agents and clients: each finding of the robustness review
has a test that fails on the code before it was fixed."""

from __future__ import annotations

import json
import sys
import uuid
from pathlib import Path

import anyio
import pytest

from makima.control.client import ControlClient, RemoteError
from makima.daemon import Daemon
from makima.embedded import ConnectParams
from makima.limits import CHECKPOINT_LIMIT, MESSAGE_LIMIT
from makima.lines import MAX_LINE
from tests.harness import (
    AGENTS,
    DEADLINE,
    AgentChannel,
    Relay,
    client_for,
    daemon_config,
    running_daemon,
    until,
)

pytestmark = pytest.mark.anyio


async def start_agent(
    client: ControlClient, relay: Relay, name: str = "a"
) -> tuple[str, AgentChannel]:
    created = await client.call("supervisor.create", {"name": name, "command": relay.command})
    agent = await relay.accept()
    await agent.expect("start")
    return str(created["supervisor_id"]), agent


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_bytes().rsplit(b")", 1)[1].split()[0]
    except (OSError, IndexError):
        return False
    return state != b"Z"


async def test_cancel_answers_and_kills_an_agent_that_never_reads(
    db_params: ConnectParams, short_tmp: Path
) -> None:
    """Its stdin pipe is full of acks: before, cancel waited forever to send it
    ``cancel`` and never answered; the agent kept running."""
    config = daemon_config(db_params, short_tmp, shutdown_grace=0.5)
    pid_file = short_tmp / f"deaf-{uuid.uuid4().hex[:6]}"
    command = [sys.executable, str(AGENTS / "deaf_agent.py"), str(pid_file)]
    async with running_daemon(config) as daemon, client_for(daemon) as client:
        created = await client.call("supervisor.create", {"name": "deaf", "command": command})
        sid = created["supervisor_id"]
        await until(lambda: "full" in (pid_file.read_text() if pid_file.exists() else ""))
        pid = int(pid_file.read_text().split()[0])
        # Another supervisor is not held up meanwhile.
        other = await client.call("supervisor.create", {"name": "other", "command": ["true"]})
        with anyio.fail_after(DEADLINE):  # about twice the grace period, not forever
            reply = await client.call("supervisor.cancel", {"supervisor_id": sid})
        assert reply["state"] == "failed"
        await until(lambda: not _alive(pid))
        assert await client.call("supervisor.get", {"supervisor_id": other["supervisor_id"]})


async def test_an_agent_that_reads_nothing_is_stopped_at_the_write_deadline(
    db_params: ConnectParams, short_tmp: Path
) -> None:
    config = daemon_config(
        db_params, short_tmp, shutdown_grace=0.5, agent_write_timeout=0.5, agent_restart_limit=0
    )
    pid_file = short_tmp / f"deaf-{uuid.uuid4().hex[:6]}"
    command = [sys.executable, str(AGENTS / "deaf_agent.py"), str(pid_file)]
    async with running_daemon(config) as daemon, client_for(daemon) as client:
        async with client.events(["supervisor.state_changed"]) as events:
            created = await client.call("supervisor.create", {"name": "deaf", "command": command})
            sid = created["supervisor_id"]
            with anyio.fail_after(DEADLINE):
                async for event in events:
                    if event["supervisor_id"] == sid and event["state"] == "failed":
                        break
        body = await client.call("supervisor.get", {"supervisor_id": sid})
        assert "took nothing from its stdin" in body["error_message"]
        pid = int(pid_file.read_text().split()[0])
        await until(lambda: not _alive(pid))


async def test_the_restoration_start_line_fits_and_older_history_pages_back(
    db_params: ConnectParams, short_tmp: Path, relay: Relay
) -> None:
    """Before, a big checkpoint plus history made a multi-megabyte start line that
    the agent dropped, and the supervisor stayed working with no error anywhere."""
    config = daemon_config(db_params, short_tmp, agent_restart_backoff=0.01)
    big = "x" * (MESSAGE_LIMIT - 1000)
    async with running_daemon(config) as daemon, client_for(daemon) as client:
        _, agent = await start_agent(client, relay)
        assert (
            await agent.request({"type": "checkpoint", "data": "c" * (CHECKPOINT_LIMIT - 100)})
        )["type"] == "ack"
        for n in range(6):
            reply = await agent.request({"type": "message", "role": "tool", "content": f"{n}{big}"})
            assert reply["seq"] == n + 1
        await agent.close()  # exits without done: restarted through restoration
        agent = await relay.accept()  # its LineBuffer refuses any line over the limit
        start = await agent.expect("start")
        assert len(json.dumps(start, ensure_ascii=False).encode()) <= MAX_LINE
        restoration = start["restoration"]
        assert restoration["checkpoint"] == "c" * (CHECKPOINT_LIMIT - 100)
        seqs = [m["seq"] for m in restoration["history"]]
        assert seqs and seqs[-1] == 6 and seqs == list(range(seqs[0], 7))
        assert restoration["history_before"] == seqs[0] and restoration["history_more"]
        page = await agent.request({"type": "history", "before": seqs[0], "limit": 50})
        older = [m["seq"] for m in page["messages"]]
        assert older and older[-1] == seqs[0] - 1
        while page["more"]:
            page = await agent.request({"type": "history", "before": older[0], "limit": 50})
            older = [m["seq"] for m in page["messages"]] + older
        assert older + seqs == list(range(1, 7))


@pytest.mark.parametrize(
    ("message", "what"),
    [
        ({"type": "checkpoint", "data": "c" * (CHECKPOINT_LIMIT + 10)}, "a checkpoint's data"),
        ({"type": "message", "role": "r", "content": "m" * (MESSAGE_LIMIT + 10)}, "a message"),
        ({"type": "ask", "question": "q", "context": "c" * 70_000}, "a question"),
    ],
)
async def test_what_could_never_be_sent_back_is_refused_when_saved(
    daemon: Daemon, client: ControlClient, relay: Relay, message: dict[str, object], what: str
) -> None:
    _, agent = await start_agent(client, relay)
    reply = await agent.request(message)
    assert reply["type"] == "error" and reply["code"] == "too_large"
    assert reply["message"].startswith(what) and "the limit is" in reply["message"]
    assert (await agent.request({"type": "phase", "phase": "after"}))["type"] == "ack"


async def test_open_questions_together_are_bounded(
    daemon: Daemon, client: ControlClient, relay: Relay
) -> None:
    _, agent = await start_agent(client, relay)
    codes = []
    for n in range(6):
        reply = await agent.request({"type": "ask", "question": f"q{n}", "context": "c" * 60_000})
        codes.append(reply.get("code", reply["type"]))
    assert codes[:4] == ["ack"] * 4 and codes[-1] == "too_large"


async def test_a_second_done_is_answered(
    daemon: Daemon, client: ControlClient, relay: Relay
) -> None:
    _, agent = await start_agent(client, relay)
    assert (await agent.request({"type": "done", "result": 1}))["type"] == "ack"
    again = await agent.request({"type": "done", "result": 2})
    assert again["type"] == "error" and again["code"] == "illegal_state"
    assert await agent.receive() is None  # then its stdin closes


async def test_a_line_nested_too_deeply_is_answered_with_its_ref(
    daemon: Daemon, client: ControlClient, relay: Relay
) -> None:
    _, agent = await start_agent(client, relay)
    deep = "[" * 100_000 + "]" * 100_000
    await agent.send_raw(
        f'{{"type":"message","ref":"deep-1","role":"r","content":{deep}}}\n'.encode()
    )
    reply = await agent.receive()
    assert reply is not None and reply["ref"] == "deep-1" and reply["type"] == "error"
    assert reply["code"] == "malformed" and "nested too deeply" in reply["message"]


async def test_a_cancel_that_loses_the_race_to_done_says_so(
    daemon: Daemon, client: ControlClient, relay: Relay
) -> None:
    """Before, the reply said success (state completed) though nothing was cancelled."""
    sid, agent = await start_agent(client, relay)
    supervisor = daemon.supervisors[uuid.UUID(sid)]
    outcome: dict[str, object] = {}

    async def cancel() -> None:
        try:
            await client.call("supervisor.cancel", {"supervisor_id": sid})
            outcome["reply"] = "ok"
        except RemoteError as exc:
            outcome["error"] = exc

    waiting = supervisor._lock.statistics
    async with anyio.create_task_group() as tg, supervisor.exclusive():
        # Both queue on the lock, the agent's done first.
        await agent.send({"type": "done", "ref": "d"})
        await until(lambda: waiting().tasks_waiting == 1)
        tg.start_soon(cancel)
        await until(lambda: waiting().tasks_waiting == 2)
    error = outcome.get("error")
    assert isinstance(error, RemoteError), outcome
    assert error.code == -32002 and "already completed" in error.message
    assert (await client.call("supervisor.get", {"supervisor_id": sid}))["state"] == "completed"


@pytest.mark.parametrize("limit", [10**30, 0, -1, 100_001, True, "5"])
async def test_history_limit_out_of_range_is_invalid_params(
    daemon: Daemon, client: ControlClient, relay: Relay, limit: object
) -> None:
    sid, _ = await start_agent(client, relay)
    with pytest.raises(RemoteError) as refused:
        await client.call("supervisor.history", {"supervisor_id": sid, "limit": limit})
    assert refused.value.code == -32602 and "from 1 to 100000" in refused.value.message


@pytest.mark.parametrize("method", ["daemon.hello", "daemon.status"])
async def test_hello_and_status_refuse_unknown_params(
    daemon: Daemon, client: ControlClient, method: str
) -> None:
    with pytest.raises(RemoteError) as refused:
        await client.call(method, {"verbose": True})
    assert refused.value.code == -32602 and "verbose" in refused.value.message


@pytest.mark.parametrize(
    ("message", "what"),
    [
        ({"type": "phase", "phase": "p" * 20_000}, "a phase"),
        ({"type": "activity", "text": "a" * 20_000}, "an activity's text"),
        ({"type": "blocked", "reason": "b" * 70_000}, "a blocked reason"),
        ({"type": "fail", "error": "f" * 70_000}, "a fail error"),
    ],
)
async def test_texts_sent_back_whole_are_bounded(
    daemon: Daemon, client: ControlClient, relay: Relay, message: dict[str, object], what: str
) -> None:
    """Phase and activity go back whole in the start line, reasons in every event."""
    _, agent = await start_agent(client, relay)
    reply = await agent.request(message)
    assert reply["type"] == "error" and reply["code"] == "too_large"
    assert reply["message"].startswith(what)


async def test_an_answer_over_the_limit_is_invalid_params(
    daemon: Daemon, client: ControlClient, relay: Relay
) -> None:
    _, agent = await start_agent(client, relay)
    asked = await agent.request({"type": "ask", "question": "q?"})
    with pytest.raises(RemoteError) as refused:
        await client.call(
            "question.answer", {"question_id": asked["question_id"], "answer": "x" * 70_000}
        )
    assert refused.value.code == -32602 and "the limit is 65536" in refused.value.message


async def test_history_pages_back_through_the_socket(
    daemon: Daemon, client: ControlClient, relay: Relay
) -> None:
    sid, agent = await start_agent(client, relay)
    for n in range(12):
        await agent.request({"type": "message", "role": "r", "content": n})
    page = await client.call("supervisor.history", {"supervisor_id": sid, "limit": 10})
    assert [m["seq"] for m in page["messages"]] == list(range(3, 13)) and page["more"]
    older = await client.call("supervisor.history", {"supervisor_id": sid, "before": 3})
    assert [m["seq"] for m in older["messages"]] == [1, 2] and not older["more"]

"""``makima top`` as a real process against a real daemon (and PostgreSQL): on a
pseudo-terminal of 80x24 with keys, and with stdout a pipe (the plain fallback);
and the ``supervisor.updated`` events it is built on."""

from __future__ import annotations

import signal
import termios
import uuid
from pathlib import Path
from typing import Any

import anyio
import anyio.abc
import pytest

from makima.control.client import ControlClient
from makima.daemon import Daemon
from makima.embedded import ConnectParams
from tests.harness import (
    DEADLINE,
    AgentChannel,
    Relay,
    client_for,
    daemon_config,
    next_event,
    running_daemon,
)
from tests.top.terminal import ALT_SCREEN_OFF, CURSOR_ON, plain, top_on_pipe, top_on_terminal

pytestmark = pytest.mark.anyio


async def start_agent(client: ControlClient, relay: Relay, name: str) -> tuple[str, AgentChannel]:
    created = await client.call("supervisor.create", {"name": name, "command": relay.command})
    agent = await relay.accept()
    await expect(agent, "start")
    return created["supervisor_id"], agent


async def expect(agent: AgentChannel, kind: str) -> dict[str, Any]:
    """The next message of ``kind`` the daemon sends the agent (lease pings aside)."""
    while True:
        message = await agent.receive()
        assert message is not None, f"expected {kind!r}; the daemon closed the agent's stdin"
        if message["type"] != "ping":
            assert message["type"] == kind, message
            return message


async def request(agent: AgentChannel, message: dict[str, Any]) -> dict[str, Any]:
    """Send with a fresh ref; the daemon's ack or error for it (lease pings aside)."""
    ref = uuid.uuid4().hex[:8]
    await agent.send({**message, "ref": ref})
    while True:
        reply = await agent.receive()
        assert reply is not None, f"no reply to {message}"
        if reply["type"] != "ping":
            assert reply.get("ref") == ref, reply
            return reply


def modes(fd: int) -> tuple[int, int]:
    """The settings a screen program changes: local flags and the suspend key."""
    attrs = termios.tcgetattr(fd)
    return attrs[3], attrs[6][termios.VSUSP]


async def test_top_shows_a_question_and_answers_it(
    daemon: Daemon, client: ControlClient, relay: Relay
) -> None:
    sid, agent = await start_agent(client, relay, "release")
    await request(agent, {"type": "phase", "phase": "decision"})
    await request(agent, {"type": "activity", "text": "asking to ship", "progress": 75})
    asked = await request(
        agent, {"type": "ask", "question": "Ship release 2.1?", "choices": ["ship", "hold"]}
    )
    qid = asked["question_id"]
    _, idle = await start_agent(client, relay, "indexer")
    await request(idle, {"type": "activity", "text": "indexing page 7", "progress": 30})

    async with top_on_terminal(daemon.config.socket_path) as term:
        before = modes(term.slave)
        screen = await term.until("Ship release 2.1?", "ship / hold", "indexing page 7")
        for text in ("release", "waiting_for_user", "decision", "75%", "asking to ship"):
            assert text in screen, (text, screen)
        assert modes(term.slave) != before  # cbreak: no echo, keys one by one

        term.type("j")  # the indexer: it has no question to answer
        term.type("a")
        await term.until("indexer has no open question")
        term.type("k")
        term.type("a")  # the release supervisor's oldest question
        await term.until("1) ship", "2) hold", "choice 1-2")
        term.type("\x1b")  # Esc: aborted, nothing sent
        await term.until("a answer")
        term.type("a")
        await term.until("1) ship")
        term.type("1")
        term.type("\r")
        delivered = await expect(agent, "answer")
        assert delivered == {"type": "answer", "question_id": qid, "answer": "ship"}
        await term.until("answered release: ship", "0 open questions")
        got = await client.call("supervisor.get", {"supervisor_id": sid})
        assert got["pending_questions"] == [] and got["state"] == "working"

        term.type("q")
        assert await term.exit_code() == 0
        tail = term.output[-200:]
        assert CURSOR_ON in tail and ALT_SCREEN_OFF in tail, tail  # cursor back, screen left
        assert modes(term.slave) == before  # the terminal is as it was
        assert "Traceback" not in term.text(since=0)


async def test_top_cancels_a_supervisor_after_yes(
    daemon: Daemon, client: ControlClient, relay: Relay
) -> None:
    sid, agent = await start_agent(client, relay, "doomed")
    await request(agent, {"type": "phase", "phase": "work"})

    async with top_on_terminal(daemon.config.socket_path) as term:
        before = modes(term.slave)
        await term.until("doomed", "work")
        term.type("c")
        await term.until("Cancel doomed")
        term.type("n")  # anything but y: not cancelled
        await term.until("doomed not cancelled")
        assert (await client.call("supervisor.get", {"supervisor_id": sid}))["state"] == "working"

        term.type("c")
        await term.until("Cancel doomed")
        term.type("y")
        assert (await expect(agent, "cancel"))["type"] == "cancel"
        await term.until("cancelled doomed", "failed")
        assert (await client.call("supervisor.get", {"supervisor_id": sid}))["state"] == "failed"

        # SIGTERM ends it too, and the terminal is put back
        term.process.send_signal(signal.SIGTERM)
        assert await term.exit_code() == 128 + signal.SIGTERM
        assert ALT_SCREEN_OFF in term.output[-100:]
        assert modes(term.slave) == before


async def read_until(stdout: Any, *texts: str, since: int = 0, seen: list[bytes]) -> str:
    """Read the pipe until every one of ``texts`` shows after byte ``since``."""
    with anyio.fail_after(DEADLINE):
        while not all(t in plain(b"".join(seen)[since:]) for t in texts):
            seen.append(await stdout.receive())
    return plain(b"".join(seen)[since:])


async def test_plain_table_when_stdout_is_not_a_terminal_and_reconnects(
    db_params: ConnectParams, short_tmp: Path, relay: Relay
) -> None:
    config = daemon_config(db_params, short_tmp)
    seen: list[bytes] = []
    process: anyio.abc.Process | None = None
    try:
        async with running_daemon(config):
            async with ControlClient.connect(config.socket_path, timeout=DEADLINE) as client:
                _, agent = await start_agent(client, relay, "piped")
                await request(agent, {"type": "phase", "phase": "checks"})
                await request(agent, {"type": "ask", "question": "Merge it?"})
            process = await top_on_pipe(config.socket_path)
            assert process.stdout is not None
            table = await read_until(process.stdout, "piped", "Merge it?", seen=seen)
            assert "\x1b" not in b"".join(seen).decode()  # no colour, no cursor control
            header, columns, row = table.splitlines()[:3]
            assert "makima top" in header and "1 supervisor" in header, table
            assert columns.split()[:3] == ["supervisor", "state", "phase"], table
            assert row.split()[:3] == ["piped", "waiting_for_user", "checks"], table
            assert "(free text)" in table
            assert all(len(line) <= 80 for line in table.splitlines()), table
            mark = len(b"".join(seen))
        # The daemon stopped: top says so, and waits for the next one
        await read_until(process.stdout, "daemon gone, reconnecting", since=mark, seen=seen)
        mark = len(b"".join(seen))
        async with running_daemon(config):
            restarted = await relay.accept()  # the supervisor is restored
            await expect(restarted, "start")
            again = await read_until(process.stdout, "piped", "Merge it?", since=mark, seen=seen)
            headers = [line for line in again.splitlines() if "makima top" in line]
            assert "daemon gone" not in headers[-1], again
            process.send_signal(signal.SIGINT)  # Ctrl-C ends it cleanly
            with anyio.fail_after(DEADLINE):
                assert await process.wait() == 0
    finally:
        if process is not None:
            if process.returncode is None:
                process.kill()
            with anyio.CancelScope(shield=True):
                await process.aclose()


async def test_daemon_publishes_supervisor_updated(
    daemon: Daemon, client: ControlClient, relay: Relay
) -> None:
    async with client.events(["supervisor.updated"]) as events:
        sid, agent = await start_agent(client, relay, "phased")
        await request(agent, {"type": "phase", "phase": "checks"})
        event = await next_event(events, "supervisor.updated", supervisor_id=sid, phase="checks")
        assert set(event) == {
            "kind",
            "supervisor_id",
            "phase",
            "progress",
            "current_activity",
            "last_heartbeat",
        }
        # an acknowledged activity with progress
        await request(agent, {"type": "activity", "text": "linting", "progress": 40})
        event = await next_event(
            events, "supervisor.updated", supervisor_id=sid, current_activity="linting"
        )
        assert (event["phase"], event["progress"]) == ("checks", 40)
        # an activity sent without a ref is written by the next heartbeat, and announced then
        await agent.send({"type": "activity", "text": "testing", "progress": 60})
        event = await next_event(
            events, "supervisor.updated", supervisor_id=sid, current_activity="testing"
        )
        assert event["progress"] == 60 and event["last_heartbeat"] is not None
        got = await client.call("supervisor.get", {"supervisor_id": sid})
        assert got["current_activity"] == "testing" and got["last_heartbeat"] is not None
    # not only for those who ask: an unfiltered subscription gets it too
    async with client_for(daemon) as other, other.events() as everything:
        await request(agent, {"type": "phase", "phase": "release"})
        await next_event(everything, "supervisor.updated", supervisor_id=sid, phase="release")

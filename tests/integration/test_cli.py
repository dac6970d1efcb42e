"""The ``makima`` command, run as a real process against an in-process daemon:
output on the right stream, exit codes, prompting on a terminal, NDJSON."""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import anyio
import anyio.abc
import pytest

from makima.control.client import ControlClient
from makima.daemon import Daemon
from tests.harness import DEADLINE, AgentChannel, Relay

pytestmark = pytest.mark.anyio

ANSI = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]|\x1b\][^\x07]*\x07")


@dataclass(frozen=True)
class Run:
    code: int
    out: str
    err: str

    def one_error_line(self) -> str:
        """The failure message: one line on stderr, no traceback, nothing on stdout."""
        assert self.code != 0, self
        assert self.out == "", self
        lines = self.err.splitlines()
        assert len(lines) == 1 and lines[0].startswith("makima: "), self
        return lines[0]


def cli_env(socket_path: Path | str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in {"FORCE_COLOR", "NO_COLOR"}}
    env.update(MAKIMA_SOCKET=str(socket_path), COLUMNS="200", PYTHONUNBUFFERED="1")
    return env


def cli_command(*args: str) -> list[str]:
    return [sys.executable, "-m", "makima", *args]


async def makima(socket_path: Path | str, *args: str) -> Run:
    """Run ``makima ARGS`` to its end, stdin not a terminal."""
    with anyio.fail_after(DEADLINE):
        result = await anyio.run_process(
            cli_command(*args),
            stdin=subprocess.DEVNULL,
            env=cli_env(socket_path),
            check=False,
        )
    return Run(result.returncode, result.stdout.decode(), result.stderr.decode())


async def until_closed(agent: AgentChannel) -> list[dict[str, Any]]:
    """Everything the daemon still sends the agent, until it closes its stdin."""
    seen: list[dict[str, Any]] = []
    while (message := await agent.receive()) is not None:
        seen.append(message)
    return seen


async def read_all(stream: anyio.abc.ByteReceiveStream) -> bytes:
    data = b""
    with anyio.fail_after(DEADLINE):
        async for chunk in stream:
            data += chunk
    return data


async def read_terminal(master: int) -> str:
    """The next output on a pseudo-terminal's master side; "" once the slave is closed."""
    while True:
        await anyio.wait_readable(master)
        try:
            data = os.read(master, 4096)
        except BlockingIOError:
            continue
        except OSError:  # EIO: every slave fd is closed
            return ""
        return data.decode(errors="replace")


async def on_terminal(
    socket_path: Path, args: list[str], dialogue: list[tuple[str, str]]
) -> tuple[int, str]:
    """Run ``makima ARGS`` on a pseudo-terminal: for each (prompt, reply), wait until
    ``prompt`` shows, then type ``reply``. Returns the exit code and all output."""
    master, slave = os.openpty()
    os.set_blocking(master, False)
    try:
        try:
            process = await anyio.open_process(
                cli_command(*args),
                stdin=slave,
                stdout=slave,
                stderr=slave,
                env=cli_env(socket_path),
                start_new_session=True,
            )
        finally:
            os.close(slave)
        shown = ""
        async with process:
            with anyio.fail_after(DEADLINE):
                for prompt, reply in dialogue:
                    while prompt not in ANSI.sub("", shown):
                        chunk = await read_terminal(master)
                        assert chunk, f"the terminal closed before {prompt!r}: {shown!r}"
                        shown += chunk
                    os.write(master, reply.encode())
                while chunk := await read_terminal(master):
                    shown += chunk
                code = await process.wait()
        return code, ANSI.sub("", shown).replace("\r\n", "\n")
    finally:
        os.close(master)


# --------------------------------------------------------------------------- no daemon


async def test_no_daemon_and_usage_errors(short_tmp: Path) -> None:
    missing = short_tmp / f"none-{uuid.uuid4().hex[:8]}.sock"
    run = await makima(missing, "status")
    assert run.code == 3
    assert str(missing) in run.one_error_line()

    # a socket file left behind by a dead daemon: nobody accepts
    stale = short_tmp / f"stale-{uuid.uuid4().hex[:8]}.sock"
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as leftover:
        leftover.bind(str(stale))
        run = await makima(stale, "status", "--json")
    assert run.code == 3 and str(stale) in run.one_error_line()

    # only status says "no daemon" with 3; the rest fail with 1
    run = await makima(missing, "ls")
    assert run.code == 1 and str(missing) in run.one_error_line()

    for args in (["bogus"], ["start", "x"], ["start", "x", "--"], ["ls", "--nope"], ["show"]):
        run = await makima(missing, *args)
        assert run.code == 2, (args, run)
        assert run.out == "" and "Usage:" in run.err and "Traceback" not in run.err, (args, run)

    run = await makima(missing, "--version")
    assert run.code == 0 and "makima" in run.out


# --------------------------------------------------------------------------- status


async def test_status(daemon: Daemon) -> None:
    socket_path = daemon.config.socket_path
    run = await makima(socket_path, "status")
    assert run.code == 0 and run.err == "", run
    assert str(daemon.daemon_id) in run.out and f"pid {os.getpid()}" in run.out
    assert "open questions" in run.out and "last startup" in run.out

    run = await makima(socket_path, "status", "--json")
    assert run.code == 0 and run.err == "", run
    status = json.loads(run.out)
    assert status["daemon_id"] == str(daemon.daemon_id) and status["pid"] == os.getpid()
    assert status["pending_questions"] == 0


# --------------------------------------------------------------------------- supervisors


async def test_supervisor_commands(daemon: Daemon, client: ControlClient, relay: Relay) -> None:
    socket_path = daemon.config.socket_path

    run = await makima(
        socket_path, "start", "alpha", "--goal", "ship [v1]", "--", *relay.command
    )
    assert run.code == 0, run
    sid = run.out.strip()
    assert run.out == f"{uuid.UUID(sid)}\n"
    agent = await relay.accept()
    start = await agent.expect("start")
    assert (start["supervisor_id"], start["name"], start["goal"]) == (sid, "alpha", "ship [v1]")
    assert start["restoration"] is None
    await agent.request({"type": "activity", "text": "reading [docs]", "progress": 40})
    await agent.request({"type": "phase", "phase": "checks"})
    await agent.request({"type": "message", "role": "assistant", "content": "ok [/bold] go"})

    # a second supervisor that completes at once
    run = await makima(socket_path, "start", "beta", "--", *relay.command)
    assert run.code == 0, run
    done_id = run.out.strip()
    finished = await relay.accept()
    await finished.expect("start")
    await finished.request({"type": "done"})
    assert await until_closed(finished) == []

    # ls: unfinished only; --all: both; --json: the rows
    run = await makima(socket_path, "ls")
    assert run.code == 0 and run.err == "", run
    row = next(line for line in run.out.splitlines() if sid[:8] in line)
    for cell in ("alpha", "working", "checks", "40%", "reading [docs]"):
        assert cell in row, (cell, row)
    assert done_id[:8] not in run.out

    run = await makima(socket_path, "ls", "--all")
    assert run.code == 0 and sid[:8] in run.out, run
    assert "completed" in next(line for line in run.out.splitlines() if done_id[:8] in line)

    run = await makima(socket_path, "ls", "--json")
    assert run.code == 0, run
    rows = json.loads(run.out)
    assert [(r["supervisor_id"], r["state"], r["progress"]) for r in rows] == [
        (sid, "working", 40)
    ]
    run = await makima(socket_path, "ls", "--all", "--json")
    assert {r["supervisor_id"] for r in json.loads(run.out)} == {sid, done_id}

    # show: full id, unique prefix, --json
    for ref in (sid, sid[:8], sid[:8].upper()):
        run = await makima(socket_path, "show", ref)
        assert run.code == 0 and run.err == "", (ref, run)
        for text in (sid, "alpha", "ship [v1]", "checks", "reading [docs]", "working"):
            assert text in run.out, (text, run.out)
    run = await makima(socket_path, "show", "--json", sid[:6])
    assert run.code == 0, run
    body = json.loads(run.out)
    assert (body["supervisor_id"], body["name"], body["state"]) == (sid, "alpha", "working")
    assert body["phase"] == "checks" and body["tasks"] == []

    # history
    run = await makima(socket_path, "history", sid)
    assert run.code == 0 and run.err == "", run
    assert re.search(r"^\s*1 assistant\s+ok \[/bold\] go$", run.out, re.M), run.out
    run = await makima(socket_path, "history", "--json", sid[:8])
    assert run.code == 0, run
    messages = json.loads(run.out)
    assert [(m["seq"], m["role"], m["content"]) for m in messages] == [
        (1, "assistant", "ok [/bold] go")
    ]

    # errors from the daemon, and from resolving ids: one line, exit 1
    missing = str(uuid.uuid4())
    run = await makima(socket_path, "show", missing)
    assert run.code == 1 and missing in run.one_error_line()
    run = await makima(socket_path, "history", "zzzz")
    assert run.code == 1 and "zzzz" in run.one_error_line()
    run = await makima(socket_path, "show", "")
    assert run.code == 1 and "matches 2 supervisors" in run.one_error_line()

    # resume a running supervisor: its agent is replaced, restored with source manual
    replaced: list[dict[str, Any]] = []
    restored: list[AgentChannel] = []

    async def drain_old() -> None:
        replaced.extend(await until_closed(agent))

    async def accept_new() -> None:
        restored.append(await relay.accept())

    async with anyio.create_task_group() as tg:
        tg.start_soon(drain_old)
        tg.start_soon(accept_new)
        run = await makima(socket_path, "resume", sid[:8])
    assert run.code == 0, run
    assert f"resumed {sid} (restoration 1, valid)" in run.out
    assert "checks" in run.out  # the restoration context names the phase
    assert all(m["type"] != "answer" for m in replaced)
    new_agent = restored[0]
    start = await new_agent.expect("start")
    assert start["restoration"]["source"] == "manual"
    assert start["restoration"]["restoration_count"] == 1
    assert start["restoration"]["phase"] == "checks"

    run = await makima(socket_path, "resume", "--json", done_id)
    assert run.code == 1 and "completed" in run.one_error_line()

    # cancel: the agent is told, the state is failed
    cancelled: list[dict[str, Any]] = []
    async with anyio.create_task_group() as tg:

        async def drain_new() -> None:
            cancelled.extend(await until_closed(new_agent))

        tg.start_soon(drain_new)
        run = await makima(socket_path, "cancel", sid)
    assert run.code == 0 and run.out == "", run
    assert f"cancelled {sid}: failed" in run.err
    assert [m["type"] for m in cancelled] == ["cancel"]
    body = await client.call("supervisor.get", {"supervisor_id": sid})
    assert body["state"] == "failed" and body["error_message"].startswith("cancelled")

    run = await makima(socket_path, "cancel", sid)
    assert run.code == 1 and "failed" in run.one_error_line()
    run = await makima(socket_path, "ls")
    assert run.code == 0 and run.out == "" and "no supervisors" in run.err, run


# --------------------------------------------------------------------------- questions


async def test_questions_answers_and_watch(
    daemon: Daemon, client: ControlClient, relay: Relay
) -> None:
    socket_path = daemon.config.socket_path
    run = await makima(socket_path, "questions")
    assert run.code == 0 and run.out == "" and "no open questions" in run.err, run

    sid = (await client.call("supervisor.create", {"name": "q", "command": relay.command}))[
        "supervisor_id"
    ]
    agent = await relay.accept()
    await agent.expect("start")

    # watch, started before the question is asked, shows it (live or in its snapshot)
    async with await anyio.open_process(
        cli_command("watch"), stdin=subprocess.DEVNULL, env=cli_env(socket_path)
    ) as watcher:
        assert watcher.stdout is not None
        qid = (
            await agent.request(
                {
                    "type": "ask",
                    "question": "Ship [v1]?",
                    "choices": ["ship", "hold"],
                    "context": "all green",
                }
            )
        )["question_id"]
        buffer = b""
        seen: dict[str, Any] | None = None
        with anyio.fail_after(DEADLINE):
            while seen is None:
                buffer += await watcher.stdout.receive()
                *lines, buffer = buffer.split(b"\n")
                for line in lines:
                    event = json.loads(line)  # every line is one JSON object
                    assert event["kind"] and "supervisor_id" in event, event
                    if event.get("question_id") == qid:
                        seen = event
        assert seen["kind"] in {"question.asked", "question.pending"}
        assert seen["question"] == "Ship [v1]?" and seen["choices"] == ["ship", "hold"]
        watcher.send_signal(signal.SIGINT)  # Ctrl-C ends it cleanly
        with anyio.fail_after(DEADLINE):
            assert await watcher.wait() == 0
        assert watcher.stderr is not None
        assert await read_all(watcher.stderr) == b""

    # questions, as a table and as JSON
    run = await makima(socket_path, "questions")
    assert run.code == 0 and run.err == "", run
    row = next(line for line in run.out.splitlines() if qid[:8] in line)
    for cell in (sid[:8], "Ship [v1]?", "ship / hold"):
        assert cell in row, (cell, row)
    run = await makima(socket_path, "questions", "--json")
    assert run.code == 0, run
    (listed,) = json.loads(run.out)
    assert (listed["question_id"], listed["supervisor_id"]) == (qid, sid)
    assert listed["choices"] == ["ship", "hold"] and listed["context"] == "all green"
    run = await makima(socket_path, "questions", "--json", "--supervisor", sid[:8])
    assert [q["question_id"] for q in json.loads(run.out)] == [qid]

    # no TEXT, and stdin is no terminal to prompt on: a usage error, nothing answered
    run = await makima(socket_path, "answer", qid)
    assert run.code == 2 and run.out == "" and "terminal" in run.err, run
    # not one of the choices: refused, naming them
    run = await makima(socket_path, "answer", qid, "maybe")
    line = run.one_error_line()
    assert run.code == 1 and "ship" in line and "hold" in line and "maybe" in line
    # by prefix; the agent gets the answer
    run = await makima(socket_path, "answer", qid[:8], "hold")
    assert run.code == 0 and run.out == "" and f"answered {qid}: hold" in run.err, run
    assert await agent.expect("answer") == {"type": "answer", "question_id": qid, "answer": "hold"}
    # exactly once
    run = await makima(socket_path, "answer", qid, "ship")
    assert run.code == 1 and "already answered" in run.one_error_line()

    # on a terminal: the choices are shown, a bad pick asks again, "2" picks the second
    qid = (
        await agent.request(
            {"type": "ask", "question": "Release [now]?", "choices": ["ship", "hold"]}
        )
    )["question_id"]
    code, shown = await on_terminal(
        socket_path,
        ["answer", qid[:8]],
        [("2) hold", "7\n"), ("please type a number", "2\n")],
    )
    assert code == 0, shown
    assert "Release [now]?" in shown and "1) ship" in shown
    assert f"answered {qid}: hold" in shown
    assert (await agent.expect("answer"))["answer"] == "hold"

    # a free-text question on a terminal; the answer is printed as typed
    qid = (await agent.request({"type": "ask", "question": "Tag name?"}))["question_id"]
    code, shown = await on_terminal(socket_path, ["answer", qid], [("answer", "v2 [/b] rc\n")])
    assert code == 0, shown
    assert f"answered {qid}: v2 [/b] rc" in shown
    assert (await agent.expect("answer"))["answer"] == "v2 [/b] rc"

    # answered by TEXT with markup-like characters: printed as given
    qid = (await agent.request({"type": "ask", "question": "Why?"}))["question_id"]
    run = await makima(socket_path, "answer", qid, "[/red] because")
    assert run.code == 0 and f"answered {qid}: [/red] because" in run.err, run
    assert (await agent.expect("answer"))["answer"] == "[/red] because"

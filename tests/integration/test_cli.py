"""The ``makima`` command, run as a real process against an in-process daemon:
output on the right stream, exit codes, prompting on a terminal, NDJSON."""

from __future__ import annotations

import json
import os
import re
import select
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


async def makima_all(socket_path: Path | str, *commands: list[str]) -> list[Run]:
    """Run several ``makima`` commands at once; their results in order."""
    runs: dict[int, Run] = {}

    async def one(n: int, args: list[str]) -> None:
        runs[n] = await makima(socket_path, *args)

    async with anyio.create_task_group() as tg:
        for n, args in enumerate(commands):
            tg.start_soon(one, n, args)
    return [runs[n] for n in range(len(commands))]


async def until_closed(agent: AgentChannel) -> list[dict[str, Any]]:
    """Everything the daemon still sends the agent, until it closes its stdin."""
    seen: list[dict[str, Any]] = []
    while (message := await agent.receive()) is not None:
        seen.append(message)
    return seen


async def delivered(agent: AgentChannel) -> dict[str, Any]:
    """The answer the daemon relays to the agent after ``makima answer`` exited."""
    try:
        with anyio.fail_after(10):
            return await agent.expect("answer")
    except TimeoutError:
        raise AssertionError(
            "the agent never got the answer: was its delivery cancelled when the"
            " answering CLI closed its connection?"
        ) from None


async def read_all(stream: anyio.abc.ByteReceiveStream) -> bytes:
    data = b""
    with anyio.fail_after(DEADLINE):
        async for chunk in stream:
            data += chunk
    return data


def read_terminal_blocking(master: int) -> str:
    """The next output on a pseudo-terminal's master side; "" once the slave is closed
    (or the master itself, when an abandoned reader outlives its test)."""
    while True:
        try:
            ready, _, _ = select.select([master], [], [], 0.5)
            if not ready:
                continue
            data = os.read(master, 4096)
        except BlockingIOError:
            continue
        except (OSError, ValueError):  # EIO: every slave fd is closed; EBADF: master closed
            return ""
        return data.decode(errors="replace")


async def read_terminal(master: int) -> str:
    # A worker thread, not the event loop's reader callbacks: a pty master is
    # level-triggered and the callbacks can fire twice for one readiness.
    return await anyio.to_thread.run_sync(read_terminal_blocking, master, abandon_on_cancel=True)


async def on_terminal(
    socket_path: Path, args: list[str], dialogue: list[tuple[str, str | signal.Signals]]
) -> tuple[int, str]:
    """Run ``makima ARGS`` on a pseudo-terminal: for each (prompt, reply), wait until
    ``prompt`` shows, then type ``reply`` (or send it, a signal). Returns the exit
    code and all output."""
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
                    if isinstance(reply, signal.Signals):
                        process.send_signal(reply)
                        # A signal that lands after the prompt is written but before
                        # the read starts is only acted on once the read returns
                        # (CPython checks signals then): a key press settles it.
                        os.write(master, b"\n")
                    else:
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
    stale = short_tmp / f"stale-{uuid.uuid4().hex[:8]}.sock"
    usage = [
        ["bogus"],
        ["start", "x"],
        ["start", "x", "--"],
        ["start", "x", "--env", "NOEQUALS", "--", "true"],
        ["ls", "--nope"],
        ["show"],
        ["history", "x", "--limit", "0"],
    ]
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as leftover:
        leftover.bind(str(stale))  # a socket file left behind by a dead daemon: nobody accepts
        stale_status = await makima(stale, "status", "--json")
        status, ls, version, *usage_runs = await makima_all(
            missing, ["status"], ["ls"], ["--version"], *usage
        )

    assert status.code == 3 and str(missing) in status.one_error_line()
    assert stale_status.code == 3 and str(stale) in stale_status.one_error_line()
    # only status says "no daemon" with 3; the rest fail with 1
    assert ls.code == 1 and str(missing) in ls.one_error_line()
    assert version.code == 0 and "makima" in version.out
    for args, run in zip(usage, usage_runs, strict=True):
        assert run.code == 2, (args, run)
        assert run.out == "" and "Usage:" in run.err and "Traceback" not in run.err, (args, run)


# --------------------------------------------------------------------------- status


async def test_status(daemon: Daemon) -> None:
    socket_path = daemon.config.socket_path
    run, as_json = await makima_all(socket_path, ["status"], ["status", "--json"])
    assert run.code == 0 and run.err == "", run
    assert str(daemon.daemon_id) in run.out and f"pid {os.getpid()}" in run.out
    assert "open questions" in run.out and "last startup" in run.out

    run = as_json
    assert run.code == 0 and run.err == "", run
    status = json.loads(run.out)
    assert status["daemon_id"] == str(daemon.daemon_id) and status["pid"] == os.getpid()
    assert status["pending_questions"] == 0


# --------------------------------------------------------------------------- supervisors


async def test_supervisor_commands(daemon: Daemon, client: ControlClient, relay: Relay) -> None:
    socket_path = daemon.config.socket_path

    run = await makima(socket_path, "start", "alpha", "--goal", "ship [v1]", "--", *relay.command)
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

    missing = str(uuid.uuid4())
    (
        ls,
        ls_all,
        ls_json,
        ls_all_json,
        *shows,
        show_json,
        hist,
        hist_json,
        show_missing,
        hist_unknown,
        show_ambiguous,
    ) = await makima_all(
        socket_path,
        ["ls"],
        ["ls", "--all"],
        ["ls", "--json"],
        ["ls", "--all", "--json"],
        ["show", sid],
        ["show", sid[:8]],
        ["show", sid[:8].upper()],
        ["show", "--json", sid[:6]],
        ["history", sid],
        ["history", "--json", sid[:8]],
        ["show", missing],
        ["history", "zzzz"],
        ["show", ""],
    )

    # ls: unfinished only; --all: both; --json: the rows
    assert ls.code == 0 and ls.err == "", ls
    row = next(line for line in ls.out.splitlines() if sid[:8] in line)
    for cell in ("alpha", "working", "checks", "40%", "reading [docs]"):
        assert cell in row, (cell, row)
    assert done_id[:8] not in ls.out

    # on a narrow terminal: one line per supervisor, id and state whole, text cut,
    # phase and restoration count left to show and --json
    with anyio.fail_after(DEADLINE):
        narrow = await anyio.run_process(
            cli_command("ls", "--all"),
            stdin=subprocess.DEVNULL,
            env={**cli_env(socket_path), "COLUMNS": "60", "FORCE_COLOR": "1"},  # a terminal
        )
    lines = ANSI.sub("", narrow.stdout.decode()).splitlines()
    assert len(lines) == 3 and all(len(line) <= 60 for line in lines), lines
    assert "restored" not in lines[0] and "phase" not in lines[0], lines
    assert sid[:8] in lines[1] + lines[2] and done_id[:8] in lines[1] + lines[2], lines
    assert any("working" in line and sid[:8] in line for line in lines), lines
    assert any("completed" in line and done_id[:8] in line for line in lines), lines

    assert ls_all.code == 0 and sid[:8] in ls_all.out, ls_all
    assert "completed" in next(line for line in ls_all.out.splitlines() if done_id[:8] in line)

    assert ls_json.code == 0, ls_json
    rows = json.loads(ls_json.out)
    assert [(r["supervisor_id"], r["state"], r["progress"]) for r in rows] == [(sid, "working", 40)]
    assert {r["supervisor_id"] for r in json.loads(ls_all_json.out)} == {sid, done_id}

    # show: full id, unique prefix (any case), --json
    for run in shows:
        assert run.code == 0 and run.err == "", run
        for text in (sid, "alpha", "ship [v1]", "checks", "reading [docs]", "working"):
            assert text in run.out, (text, run.out)
    assert show_json.code == 0, show_json
    body = json.loads(show_json.out)
    assert (body["supervisor_id"], body["name"], body["state"]) == (sid, "alpha", "working")
    assert body["phase"] == "checks" and body["tasks"] == []

    # history
    assert hist.code == 0 and hist.err == "", hist
    assert re.search(r"^\s*1 assistant\s+ok \[/bold\] go$", hist.out, re.M), hist.out
    assert hist_json.code == 0, hist_json
    messages = json.loads(hist_json.out)
    assert [(m["seq"], m["role"], m["content"]) for m in messages] == [
        (1, "assistant", "ok [/bold] go")
    ]

    # errors from the daemon, and from resolving ids: one line, exit 1
    assert show_missing.code == 1 and missing in show_missing.one_error_line()
    assert hist_unknown.code == 1 and "zzzz" in hist_unknown.one_error_line()
    assert show_ambiguous.code == 1
    assert "matches 2 supervisors" in show_ambiguous.one_error_line()

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

    again, ls = await makima_all(socket_path, ["cancel", sid], ["ls"])
    assert again.code == 1 and "failed" in again.one_error_line()
    assert ls.code == 0 and ls.out == "" and "no supervisors" in ls.err, ls


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

    table, as_json, of_one, no_text, wrong = await makima_all(
        socket_path,
        ["questions"],
        ["questions", "--json"],
        ["questions", "--json", "--supervisor", sid[:8]],
        ["answer", qid],
        ["answer", qid, "maybe"],
    )
    # questions, as a table and as JSON
    assert table.code == 0 and table.err == "", table
    row = next(line for line in table.out.splitlines() if qid[:8] in line)
    for cell in (sid[:8], "Ship [v1]?", "ship / hold"):
        assert cell in row, (cell, row)
    assert as_json.code == 0, as_json
    (listed,) = json.loads(as_json.out)
    assert (listed["question_id"], listed["supervisor_id"]) == (qid, sid)
    assert listed["choices"] == ["ship", "hold"] and listed["context"] == "all green"
    assert [q["question_id"] for q in json.loads(of_one.out)] == [qid]
    # no TEXT, and stdin is no terminal to prompt on: a usage error, nothing answered
    assert no_text.code == 2 and no_text.out == "" and "terminal" in no_text.err, no_text
    # not one of the choices: refused, naming them
    refused = wrong.one_error_line()
    assert wrong.code == 1 and all(w in refused for w in ("ship", "hold", "maybe"))

    # by prefix; the agent gets the answer
    run = await makima(socket_path, "answer", qid[:8], "hold")
    assert run.code == 0 and run.out == "" and f"answered {qid}: hold" in run.err, run
    assert await delivered(agent) == {"type": "answer", "question_id": qid, "answer": "hold"}
    # exactly once
    run = await makima(socket_path, "answer", qid, "ship")
    assert run.code == 1 and "already answered: 'hold'" in run.one_error_line()
    # an answered question is no longer open: its prefix says so
    run = await makima(socket_path, "answer", qid[:8], "ship")
    assert run.code == 1 and "no open question id starts with" in run.one_error_line(), run

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
    assert (await delivered(agent))["answer"] == "hold"

    # Ctrl-C or Ctrl-D at the prompt: aborted at once (exit 1), nothing answered
    qid = (await agent.request({"type": "ask", "question": "Go?", "choices": ["go"]}))[
        "question_id"
    ]
    for reply in (signal.SIGINT, "\x04"):
        code, shown = await on_terminal(socket_path, ["answer", qid], [("choice: ", reply)])
        assert code == 1 and "Aborted!" in shown and "Traceback" not in shown, shown
    run = await makima(socket_path, "questions", "--json")
    assert [q["question_id"] for q in json.loads(run.out)] == [qid]
    run = await makima(socket_path, "answer", qid, "go")
    assert run.code == 0, run
    assert (await delivered(agent))["answer"] == "go"

    # a free-text question on a terminal; the answer is printed as typed
    qid = (await agent.request({"type": "ask", "question": "Tag name?"}))["question_id"]
    code, shown = await on_terminal(socket_path, ["answer", qid], [("answer: ", "v2 [/b] rc\n")])
    assert code == 0, shown
    assert f"answered {qid}: v2 [/b] rc" in shown
    assert (await delivered(agent))["answer"] == "v2 [/b] rc"

    # answered by TEXT with markup-like characters: printed as given
    qid = (await agent.request({"type": "ask", "question": "Why?"}))["question_id"]
    run = await makima(socket_path, "answer", qid, "[/red] because")
    assert run.code == 0 and f"answered {qid}: [/red] because" in run.err, run
    assert (await delivered(agent))["answer"] == "[/red] because"


def test_client_commands_log_to_stderr_never_stdout(short_tmp: Path) -> None:
    """stdout carries a command's output (tables, JSON, NDJSON): an event-loop report
    during a client command must go to stderr as a log event."""
    path = short_tmp / f"l-{uuid.uuid4().hex[:8]}.sock"
    script = (
        "import asyncio, sys\n"
        "from pathlib import Path\n"
        "from makima import cli\n"
        "async def action(client):\n"
        "    asyncio.get_running_loop().call_exception_handler({'message': 'boom'})\n"
        "    return 'result'\n"
        "print(cli.run_client(Path(sys.argv[1]), action))\n"
    )
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as listener:
        listener.bind(str(path))
        listener.listen(1)  # connections wait in the backlog; nothing is asked
        run = subprocess.run(
            [sys.executable, "-c", script, str(path)],
            capture_output=True,
            text=True,
            timeout=DEADLINE,
            env=cli_env(path),
            check=False,
        )
    assert run.returncode == 0, run
    assert run.stdout == "result\n"
    assert "loop.callback_failed" in run.stderr and "boom" in run.stderr

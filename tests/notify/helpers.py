"""Helpers for the ``makima notify`` tests: the command as a real process, a local
HTTP receiver, and agents that ask one question each."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import uuid
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import anyio
import anyio.abc
from anyio.abc import SocketAttribute

from makima.control.client import ControlClient
from tests.harness import DEADLINE, RAW

HERE = Path(__file__).parent
RECORD_EXEC = HERE / "record_exec.py"
HANG_EXEC = HERE / "hang_exec.py"


def ask_plan(question: str, choices: list[str]) -> dict[str, Any]:
    """A raw agent that asks one question, waits for its answer (after a restart too)
    and finishes."""
    return {
        "steps": [
            {
                "send": {"type": "ask", "question": question, "choices": choices, "ref": "q"},
                "await": "ack",
            },
            {"await": "answer"},
            {"send": {"type": "done", "ref": "d"}, "await": "ack"},
        ],
        "resume": "auto",
    }


async def ask(
    client: ControlClient, directory: Path, name: str, question: str, choices: list[str]
) -> tuple[str, str]:
    """Start a supervisor that asks ``question``; its id and the question's id."""
    log = directory / f"agent-{uuid.uuid4().hex[:6]}.jsonl"
    command = [sys.executable, str(RAW), json.dumps(ask_plan(question, choices)), str(log)]
    with anyio.fail_after(DEADLINE):
        async with client.events(["question.asked"]) as events:
            created = await client.call("supervisor.create", {"name": name, "command": command})
            sid = created["supervisor_id"]
            async for event in events:
                if event["supervisor_id"] == sid:
                    return sid, event["question_id"]
    raise AssertionError("the event stream ended before the question was asked")


# --------------------------------------------------------------------------- the receiver


@dataclass
class Request:
    number: int
    method: str
    path: str
    headers: dict[str, str]
    body: bytes
    status: int

    def json(self) -> dict[str, Any]:
        result: dict[str, Any] = json.loads(self.body)
        return result


@dataclass
class Receiver:
    """An HTTP/1.1 server on 127.0.0.1 that records every request.

    ``statuses`` are answered in turn (then 200); ``hold`` maps a request number
    (1-based) to an event the answer waits for."""

    statuses: list[int] = field(default_factory=list)
    hold: dict[int, anyio.Event] = field(default_factory=dict)
    requests: list[Request] = field(default_factory=list)
    port: int = 0
    _changed: anyio.Event = field(default_factory=anyio.Event)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/hook/secret-topic"

    def ok(self) -> list[Request]:
        return [r for r in self.requests if r.status == 200]

    def for_question(self, question_id: str) -> list[Request]:
        return [r for r in self.requests if r.json().get("question_id") == question_id]

    async def wait_for(self, predicate: Callable[[], bool], what: str) -> None:
        try:
            with anyio.fail_after(DEADLINE):
                while not predicate():
                    await self._changed.wait()
        except TimeoutError:
            raise AssertionError(f"the receiver never saw {what}: {self.requests}") from None

    async def _handle(self, stream: anyio.abc.SocketStream) -> None:
        async with stream:
            data = b""
            with anyio.fail_after(DEADLINE):
                while b"\r\n\r\n" not in data:
                    chunk = await stream.receive()
                    data += chunk
                head, _, body = data.partition(b"\r\n\r\n")
                lines = head.decode("latin-1").split("\r\n")
                method, path, _ = lines[0].split(" ", 2)
                headers = {}
                for line in lines[1:]:
                    key, _, value = line.partition(":")
                    headers[key.strip().lower()] = value.strip()
                length = int(headers.get("content-length", "0"))
                while len(body) < length:
                    body += await stream.receive()
            number = len(self.requests) + 1
            status = self.statuses[number - 1] if number <= len(self.statuses) else 200
            gate = self.hold.get(number)
            if gate is not None:
                with anyio.fail_after(DEADLINE):
                    await gate.wait()
            self.requests.append(Request(number, method, path, headers, body, status))
            reason = "OK" if status == 200 else "Nope"
            top = f"HTTP/1.1 {status} {reason}\r\nContent-Length: 0\r\nConnection: close"
            await stream.send(f"{top}\r\n\r\n".encode())
            changed, self._changed = self._changed, anyio.Event()
            changed.set()


@asynccontextmanager
async def receiver(**settings: Any) -> AsyncIterator[Receiver]:
    rx = Receiver(**settings)
    listener = await anyio.create_tcp_listener(local_host="127.0.0.1", local_port=0)
    rx.port = listener.extra(SocketAttribute.local_port)
    async with listener, anyio.create_task_group() as tg:
        tg.start_soon(listener.serve, rx._handle)
        try:
            yield rx
        finally:
            tg.cancel_scope.cancel()


# --------------------------------------------------------------------------- the command


class NotifyProcess:
    """``python -m makima notify ARGS`` with its stderr in a file."""

    def __init__(self, directory: Path, socket_path: Path, args: list[str], **env: str) -> None:
        self.directory = directory
        self.socket_path = socket_path
        self.args = args
        self.env = env
        self.log_path = directory / f"notify-{uuid.uuid4().hex[:6]}.log"
        self.process: anyio.abc.Process | None = None

    def environment(self) -> dict[str, str]:
        env = {
            k: v
            for k, v in os.environ.items()
            if k not in {"DBUS_SESSION_BUS_ADDRESS", "MAKIMA_WEBHOOK_SECRET"}
        }
        env.update(
            MAKIMA_SOCKET=str(self.socket_path),
            XDG_STATE_HOME=str(self.directory / "xdg-state"),
            MAKIMA_LOG_LEVEL="info",
            PYTHONUNBUFFERED="1",
        )
        env.update(self.env)
        return env

    async def start(self) -> None:
        with self.log_path.open("ab") as log:
            self.process = await anyio.open_process(
                [sys.executable, "-m", "makima", "notify", "--reconnect-max", "0.5", *self.args],
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=log,
                env=self.environment(),
            )

    async def stop(self) -> int:
        """SIGTERM, and its exit status."""
        assert self.process is not None
        if self.process.returncode is None:
            self.process.send_signal(signal.SIGTERM)
        with anyio.fail_after(DEADLINE):
            code = await self.process.wait()
        await self.process.aclose()
        return code

    async def wait(self) -> int:
        assert self.process is not None
        with anyio.fail_after(DEADLINE):
            code = await self.process.wait()
        await self.process.aclose()
        return code

    def text(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def events(self) -> list[dict[str, Any]]:
        """The structlog events it logged (JSON lines)."""
        found = []
        for line in self.text().splitlines():
            if line.startswith("{"):
                try:
                    found.append(json.loads(line))
                except ValueError:
                    continue
        return found

    def plain_lines(self) -> list[str]:
        """What it said that is not a log event."""
        return [line for line in self.text().splitlines() if not line.startswith("{")]


@asynccontextmanager
async def notify_process(
    directory: Path, socket_path: Path, args: list[str], **env: str
) -> AsyncIterator[NotifyProcess]:
    proc = NotifyProcess(directory, socket_path, args, **env)
    await proc.start()
    try:
        yield proc
    finally:
        if proc.process is not None and proc.process.returncode is None:
            proc.process.kill()
            with anyio.CancelScope(shield=True):
                await proc.process.wait()

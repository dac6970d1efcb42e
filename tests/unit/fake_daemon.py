"""The daemon's side of makima-agent/1, played by hand for SDK tests.

:func:`fake_daemon` starts an agent as a real subprocess on pipes; the test
sends ``start``, reads each line, acknowledges it and answers, exactly as the
daemon would. :meth:`FakeDaemon.drive` does the routine part (ack everything,
run spawned commands for real, answer questions) until ``done`` or ``fail``.
"""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import sys
from collections.abc import AsyncIterator, Callable, Mapping, Sequence
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any, Literal

import anyio
import anyio.abc

REPO = Path(__file__).resolve().parents[2]
RELEASE_MANAGER = REPO / "examples" / "agents" / "release_manager.py"
SUPERVISOR_ID = "5b0d6a52-3f1e-4a44-9d3c-2f4f1f4c2a01"
STEP = 10.0  # seconds any single exchange may take

Message = dict[str, Any]
Hook = Callable[[Message], Sequence[Message]]


class FakeDaemon:
    """One agent subprocess and the hand-played daemon talking to it."""

    def __init__(self, process: anyio.abc.Process, stderr_path: Path) -> None:
        self.process = process
        self.stderr_path = stderr_path
        self.received: list[Message] = []
        self._buffer = bytearray()
        self._ids = 0
        self.running: dict[str, Message] = {}  # task_id -> its spawn message, not yet reported
        self.results: dict[str, Message] = {}  # task_id -> task_finished not yet sent

    # ---------------------------------------------------------------- raw lines

    @property
    def stderr(self) -> str:
        return self.stderr_path.read_text(encoding="utf-8", errors="replace")

    async def send(self, message: Mapping[str, Any]) -> None:
        assert self.process.stdin is not None
        await self.process.stdin.send((json.dumps(message) + "\n").encode())

    async def send_raw(self, data: bytes) -> None:
        assert self.process.stdin is not None
        await self.process.stdin.send(data)

    async def receive(self) -> Message:
        """The next line from the agent; it must be one JSON object with a ``type``."""
        assert self.process.stdout is not None
        with anyio.fail_after(STEP):
            while b"\n" not in self._buffer:
                try:
                    self._buffer += await self.process.stdout.receive()
                except anyio.EndOfStream:
                    raise AssertionError(
                        f"the agent closed its stdout; stderr:\n{self.stderr}"
                    ) from None
        line, _, rest = bytes(self._buffer).partition(b"\n")
        self._buffer = bytearray(rest)
        message = json.loads(line)
        assert isinstance(message, dict), line
        assert isinstance(message.get("type"), str), line
        self.received.append(message)
        return message

    async def expect(self, kind: str) -> Message:
        message = await self.receive()
        assert message["type"] == kind, (message, self.stderr)
        return message

    async def ack(self, message: Message, **results: Any) -> None:
        await self.send({"type": "ack", "ref": message["ref"], **results})

    async def error(self, message: Message, code: str, text: str) -> None:
        await self.send({"type": "error", "ref": message["ref"], "code": code, "message": text})

    async def close_stdin(self) -> None:
        assert self.process.stdin is not None
        await self.process.stdin.aclose()

    async def wait_exit(self, within: float = STEP) -> int:
        """The agent's exit status; it must exit within ``within`` seconds."""
        with anyio.fail_after(within):
            return await self.process.wait()

    async def ack_until_exit(self, within: float) -> int:
        """Acknowledge everything the agent sends until it exits; its exit status."""
        stdout = self.process.stdout
        assert stdout is not None
        with anyio.fail_after(within):
            while True:
                try:
                    self._buffer += await stdout.receive()
                except (anyio.EndOfStream, anyio.ClosedResourceError):
                    break
                while b"\n" in self._buffer:
                    line, _, self._buffer = self._buffer.partition(b"\n")
                    message = json.loads(line)
                    self.received.append(message)
                    if "ref" in message:
                        with contextlib.suppress(
                            anyio.BrokenResourceError, anyio.ClosedResourceError
                        ):
                            await self.ack(message)  # unless it exited in between
            return await self.process.wait()

    async def stdout_closed(self) -> bool:
        """True if the agent's stdout ends without another line."""
        assert self.process.stdout is not None
        with anyio.fail_after(STEP):
            try:
                self._buffer += await self.process.stdout.receive()
            except anyio.EndOfStream:
                return not self._buffer
        return False

    # ---------------------------------------------------------------- the daemon's part

    def new_id(self, prefix: str) -> str:
        self._ids += 1
        return f"{prefix}-{self._ids}"

    async def start(
        self,
        restoration: Mapping[str, Any] | None = None,
        *,
        name: str = "release",
        goal: str = "ship it",
    ) -> None:
        await self.send(
            {
                "type": "start",
                "protocol": 1,
                "supervisor_id": SUPERVISOR_ID,
                "name": name,
                "goal": goal,
                "restoration": restoration,
            }
        )

    async def run_task(self, task_id: str) -> Message:
        """Run a spawned command for real; its ``task_finished`` message."""
        command = self.running.pop(task_id)["command"]
        result = await anyio.run_process(command, check=False, stderr=subprocess.STDOUT)
        return {
            "type": "task_finished",
            "task_id": task_id,
            "status": "succeeded" if result.returncode == 0 else "failed",
            "exit_code": result.returncode,
            "output_tail": result.stdout.decode()[-2000:],
        }

    async def drive(
        self,
        *,
        answers: Mapping[str, str] | None = None,
        finish_tasks: Literal["at_spawn", "at_wait"] = "at_wait",
        forbid: Sequence[str] = (),
        hook: Hook | None = None,
    ) -> Message:
        """Play the daemon until the agent sends ``done`` or ``fail``; return that message.

        Every message is acknowledged; ``ask`` gets a question id and, if its
        text is in ``answers``, the answer; ``spawn`` gets a task id and its
        command really runs (reported at once, or when the agent waits);
        ``wait_tasks`` gets every outstanding ``task_finished`` then
        ``tasks_done``. ``hook`` may return extra messages to send after the ack.
        """
        answers = dict(answers or {})
        while True:
            message = await self.receive()
            kind = message["type"]
            assert kind not in forbid, (f"the agent sent a forbidden {kind!r}", message)
            assert "ref" in message, message
            if kind == "ask":
                question_id = self.new_id("q")
                await self.ack(message, question_id=question_id)
                if message["question"] in answers:
                    answer = answers.pop(message["question"])
                    await self.send(
                        {"type": "answer", "question_id": question_id, "answer": answer}
                    )
            elif kind == "spawn":
                task_id = self.new_id("t")
                self.running[task_id] = message
                await self.ack(message, task_id=task_id)
                if finish_tasks == "at_spawn":
                    await self.send(await self.run_task(task_id))
            elif kind == "wait_tasks":
                await self.ack(message)
                for task_id in list(self.running):
                    await self.send(await self.run_task(task_id))
                for task_id in list(self.results):
                    await self.send(self.results.pop(task_id))
                await self.send({"type": "tasks_done"})
            else:
                await self.ack(message)
            for extra in hook(message) if hook is not None else ():
                await self.send(extra)
            if kind in ("done", "fail"):
                return message

    def of_type(self, kind: str) -> list[Message]:
        return [m for m in self.received if m["type"] == kind]


@asynccontextmanager
async def fake_daemon(
    script: Path, *args: str, tmp_path: Path, env: Mapping[str, str] | None = None
) -> AsyncIterator[FakeDaemon]:
    """Start ``python script args…`` as an agent on pipes; kill it on the way out."""
    full_env = dict(os.environ)
    full_env.update({"MAKIMA_SUPERVISOR_ID": SUPERVISOR_ID, "MAKIMA_PROTOCOL": "1"})
    full_env.update(env or {})
    stderr_path = tmp_path / f"{script.stem}.stderr"
    with stderr_path.open("wb") as stderr:
        process = await anyio.open_process(
            [sys.executable, str(script), *args],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=stderr,
            env=full_env,
        )
        async with process:
            try:
                yield FakeDaemon(process, stderr_path)
            finally:
                if process.returncode is None:
                    process.kill()
                with anyio.CancelScope(shield=True):
                    await process.wait()


def write_agent(tmp_path: Path, body: str, *, run: str = "sdk.run(main)") -> Path:
    """A tiny agent: ``body`` must define ``async def main(agent)``."""
    path = tmp_path / "tiny_agent.py"
    path.write_text(
        "import asyncio, os, subprocess, sys, time\n"
        "import makima.sdk as sdk\n\n" + body + "\n\n" + run + "\n",
        encoding="utf-8",
    )
    return path

"""Spawned task processes: run a command in its own process group, keep the
tail of its output, report how it ended.

A task's row exists before its process starts (the supervisor writes it);
this module only runs the process.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
from collections import deque
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import anyio
import anyio.abc
import structlog

from makima.model import TaskStatus

log = structlog.get_logger("makima.tasks")

TAIL_LINES = 40
TAIL_BYTES = 8 * 1024


@dataclass(frozen=True, slots=True)
class TaskOutcome:
    status: TaskStatus
    exit_code: int | None
    output_tail: str


class OutputTail:
    """The last lines of a stream (pure)."""

    def __init__(self, lines: int = TAIL_LINES, max_bytes: int = TAIL_BYTES) -> None:
        self._lines: deque[str] = deque(maxlen=lines)
        self._partial = b""
        self.max_bytes = max_bytes

    def feed(self, data: bytes) -> None:
        data = self._partial + data
        *complete, self._partial = data.split(b"\n")
        for line in complete:
            self._lines.append(line.decode("utf-8", errors="replace"))
        if len(self._partial) > self.max_bytes:
            self._lines.append(self._partial[-self.max_bytes :].decode("utf-8", errors="replace"))
            self._partial = b""

    def text(self) -> str:
        lines = list(self._lines)
        if self._partial:
            lines.append(self._partial.decode("utf-8", errors="replace"))
        joined = "\n".join(lines)
        return joined[-self.max_bytes :]


def outcome_for(exit_code: int) -> TaskStatus:
    return TaskStatus.SUCCEEDED if exit_code == 0 else TaskStatus.FAILED


async def run_task(
    command: Sequence[str],
    *,
    cwd: str | None,
    env: Mapping[str, str],
    task_id: str,
    grace: float = 3.0,
) -> TaskOutcome:
    """Run to completion. On cancellation the process group is stopped and the
    cancellation propagates (the caller records ``cancelled``/``interrupted``)."""
    full_env = dict(os.environ)
    full_env.update(env)
    for inherited in (
        "LISTEN_FDS",
        "LISTEN_PID",
        "LISTEN_FDNAMES",
        "NOTIFY_SOCKET",
        "WATCHDOG_USEC",
        "WATCHDOG_PID",
        "MAKIMA_FAULT",
    ):
        full_env.pop(inherited, None)
    tail = OutputTail()
    try:
        process = await anyio.open_process(
            list(command),
            stdin=subprocess.DEVNULL,
            stdout=-1,
            stderr=-2,  # merged into stdout
            cwd=cwd,
            env=full_env,
            start_new_session=True,
        )
    except OSError as exc:
        log.warning("task.start_failed", task_id=task_id, error=str(exc))
        return TaskOutcome(TaskStatus.FAILED, None, f"could not start {command[0]!r}: {exc}")
    log.info("task.started", task_id=task_id, pid=process.pid)
    try:
        assert process.stdout is not None
        async for chunk in process.stdout:
            tail.feed(chunk)
        code = await process.wait()
    except BaseException:
        with anyio.CancelScope(shield=True):
            await _stop_group(process, grace)
        raise
    finally:
        with anyio.CancelScope(shield=True):
            await process.aclose()
    log.info("task.exited", task_id=task_id, exit_code=code)
    return TaskOutcome(outcome_for(code), code, tail.text())


async def _stop_group(process: anyio.abc.Process, grace: float) -> None:
    for signum in (signal.SIGTERM, signal.SIGKILL):
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(process.pid, signum)
        with anyio.move_on_after(grace):
            await process.wait()
            return

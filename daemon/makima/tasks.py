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
import time
from collections import deque
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import anyio
import anyio.abc
import structlog

from makima.childenv import child_environment
from makima.model import TaskStatus

log = structlog.get_logger("makima.tasks")

TASK_ID_ENV = "MAKIMA_TASK_ID"
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
    # MAKIMA_TASK_ID lets a later daemon find the process after a crash.
    full_env = child_environment(env, {TASK_ID_ENV: task_id})
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


def task_id_of(environ: bytes) -> str | None:
    """The MAKIMA_TASK_ID in a /proc/PID/environ blob (pure)."""
    prefix = TASK_ID_ENV.encode() + b"="
    for entry in environ.split(b"\0"):
        if entry.startswith(prefix):
            return entry[len(prefix) :].decode(errors="replace")
    return None


def find_task_processes(task_ids: set[str], proc: str = "/proc") -> dict[str, list[int]]:
    """Live processes started for these tasks (by an earlier daemon that crashed)."""
    found: dict[str, list[int]] = {}
    if not task_ids:
        return found
    for entry in os.scandir(proc):
        if not entry.name.isdigit():
            continue
        try:
            with open(f"{entry.path}/environ", "rb") as handle:
                task_id = task_id_of(handle.read())
        except OSError:
            continue
        if task_id in task_ids:
            found.setdefault(task_id, []).append(int(entry.name))
    return found


def stop_orphaned_tasks(task_ids: set[str], grace: float = 3.0) -> dict[str, list[int]]:
    """Stop what is left of these tasks' processes (blocking; run in a thread).

    A daemon killed with SIGKILL cannot stop its tasks, which run in process
    groups of their own; the next daemon does it before it marks them
    interrupted or runs them again.
    """
    found = find_task_processes(task_ids)
    pids = [pid for group in found.values() for pid in group]
    for signum in (signal.SIGTERM, signal.SIGKILL):
        alive = [pid for pid in pids if _alive(pid)]
        if not alive:
            break
        for pid in alive:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                if os.getpgid(pid) == pid:  # a task leads its own process group
                    os.killpg(pid, signum)
                else:
                    os.kill(pid, signum)
        deadline = time.monotonic() + grace
        while time.monotonic() < deadline and any(_alive(pid) for pid in alive):
            time.sleep(0.02)
    if found:
        log.warning("task.orphans_stopped", tasks=sorted(found), pids=sorted(pids))
    return found


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat", "rb") as handle:
            state = handle.read().rsplit(b")", 1)[1].split()[0]
    except (OSError, IndexError):
        return False
    return state != b"Z"

"""Spawned task processes: run a command in its own process group, keep the
tail of its output, report how it ended.

A task's row exists before its process starts (the supervisor writes it);
this module only runs the process.

A task is its process and every descendant. Each of them carries
``MAKIMA_TASK_ID`` in its environment (inherited), which is how makima finds
the ones that left the task's process group (``setsid``, a double fork): when
a task is stopped, and when its process exits, whatever still carries its id
is stopped as well (SIGTERM, then SIGKILL). A descendant that starts afresh
with an environment of its own *and* leaves the group is out of reach here;
under systemd the service's control group still holds it.
"""

from __future__ import annotations

import contextlib
import functools
import os
import signal
import subprocess
import time
from collections import deque
from collections.abc import Callable, Iterable, Mapping, Sequence
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
KILL_WAIT = 5.0
"""Seconds to wait for SIGKILLed processes to go (scanning again for new ones)."""
POLL = 0.02


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
    grace: float | Callable[[], float] = 3.0,
) -> TaskOutcome:
    """Run to completion. On cancellation the task's processes are stopped (its
    process group, and its descendants outside it) and the cancellation
    propagates (the caller records ``cancelled``/``interrupted``). When the
    task's process exits, descendants it left running are stopped too. ``grace``
    (or what it returns at the stop: a fenced supervisor's tasks are killed at
    once) is the time between SIGTERM and SIGKILL."""
    # MAKIMA_TASK_ID lets a later daemon find the process after a crash, and this
    # one find the descendants that leave the process group.
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
    except (OSError, ValueError) as exc:  # ValueError: an env a newer makima refuses
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
            await _stop_task(process, task_id, grace() if callable(grace) else grace)
        raise
    finally:
        with anyio.CancelScope(shield=True):
            await process.aclose()
    log.info("task.exited", task_id=task_id, exit_code=code)
    # The task is over: what it left running (a daemonised grandchild) goes with it,
    # as a service's leftover processes do when its main process exits.
    with anyio.CancelScope(shield=True):
        await _stop_descendants(task_id, grace() if callable(grace) else grace, reason="exited")
    return TaskOutcome(outcome_for(code), code, tail.text())


async def _stop_task(process: anyio.abc.Process, task_id: str, grace: float) -> None:
    """The process group, and at the same time the task's processes outside it;
    then a last sweep for whatever was forked meanwhile."""
    async with anyio.create_task_group() as tg:
        tg.start_soon(_stop_group, process, grace)
        tg.start_soon(
            functools.partial(
                _stop_descendants, task_id, grace, reason="stopped", spare_group=process.pid
            )
        )
    await _stop_descendants(task_id, 0.0, reason="stopped")


async def _stop_group(process: anyio.abc.Process, grace: float) -> None:
    for signum in (signal.SIGTERM, signal.SIGKILL):
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(process.pid, signum)
        with anyio.move_on_after(grace):
            await process.wait()
            return


async def _stop_descendants(
    task_id: str, grace: float, *, reason: str, spare_group: int | None = None
) -> None:
    """Stop what carries the task's id (in a worker thread: /proc is read blocking).
    Never raises for a failed scan: it runs while a cancellation is on its way."""
    try:
        stopped = await anyio.to_thread.run_sync(
            functools.partial(stop_task_processes, {task_id}, grace, spare_group=spare_group)
        )
    except OSError as exc:
        log.warning("task.descendants_unknown", task_id=task_id, error=str(exc))
        return
    pids = stopped.get(task_id)
    if pids:
        log.warning("task.descendants_stopped", task_id=task_id, reason=reason, pids=pids)


def task_id_of(environ: bytes) -> str | None:
    """The MAKIMA_TASK_ID in a /proc/PID/environ blob (pure)."""
    prefix = TASK_ID_ENV.encode() + b"="
    for entry in environ.split(b"\0"):
        if entry.startswith(prefix):
            return entry[len(prefix) :].decode(errors="replace")
    return None


def find_task_processes(task_ids: set[str], proc: str = "/proc") -> dict[str, list[int]]:
    """Live processes carrying these task ids: a task's own process and its
    descendants, started by this daemon or by an earlier one that crashed."""
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


def stop_task_processes(
    task_ids: set[str], grace: float = 3.0, *, spare_group: int | None = None
) -> dict[str, list[int]]:
    """Stop every live process carrying one of these task ids (blocking; run in a
    thread). Returns the pids signalled, by task id.

    SIGTERM, up to ``grace`` seconds to exit, then SIGKILL; /proc is scanned again
    before each SIGKILL round, so a process forked in the meantime is caught too,
    until a scan finds none (or :data:`KILL_WAIT` has passed). A process that leads
    its own group (``setsid``) takes its group with it. Members of ``spare_group``,
    a process group that someone else is stopping, are left alone.
    """
    signalled: dict[str, set[int]] = {}

    def scan() -> list[int]:
        pids: list[int] = []
        for task_id, group in find_task_processes(task_ids).items():
            for pid in group:
                if pid == os.getpid() or _in_group(pid, spare_group):
                    continue
                pids.append(pid)
                signalled.setdefault(task_id, set()).add(pid)
        return pids

    pids = scan()
    if pids:
        _signal(pids, signal.SIGTERM)
        _wait_gone(pids, time.monotonic() + grace)
    deadline = time.monotonic() + KILL_WAIT
    while pids := scan():
        _signal(pids, signal.SIGKILL)
        if not _wait_gone(pids, deadline) or time.monotonic() >= deadline:
            log.warning(
                "task.processes_survived",
                tasks=sorted(task_ids),
                pids=sorted(pid for pid in pids if _alive(pid)),
            )
            break
    return {task_id: sorted(pids) for task_id, pids in signalled.items()}


def stop_orphaned_tasks(task_ids: set[str], grace: float = 3.0) -> dict[str, list[int]]:
    """Stop what is left of these tasks' processes (blocking; run in a thread).

    A daemon killed with SIGKILL cannot stop its tasks, which run in process
    groups of their own; the next daemon does it before it marks them
    interrupted or runs them again.
    """
    found = stop_task_processes(task_ids, grace)
    if found:
        log.warning(
            "task.orphans_stopped",
            tasks=sorted(found),
            pids=sorted(pid for group in found.values() for pid in group),
        )
    return found


def _in_group(pid: int, group: int | None) -> bool:
    if group is None:
        return False
    try:
        return os.getpgid(pid) == group
    except ProcessLookupError:
        return False


def _signal(pids: Iterable[int], signum: signal.Signals) -> None:
    for pid in pids:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            if os.getpgid(pid) == pid:  # it leads a process group: its own task, or a setsid
                os.killpg(pid, signum)
            else:
                os.kill(pid, signum)


def _wait_gone(pids: Sequence[int], deadline: float) -> bool:
    """Whether every one of ``pids`` has exited by ``deadline`` (a zombie has)."""
    while any(_alive(pid) for pid in pids):
        if time.monotonic() >= deadline:
            return False
        time.sleep(POLL)
    return True


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat", "rb") as handle:
            state = handle.read().rsplit(b")", 1)[1].split()[0]
    except (OSError, IndexError):
        return False
    return state != b"Z"

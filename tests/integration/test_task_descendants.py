"""A task's descendants that leave its process group (setsid, a double fork)
are stopped with it: when the task is cancelled, when its process exits, and
after a crash (stop_orphaned_tasks)."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import uuid
from collections.abc import Iterator
from pathlib import Path

import anyio
import pytest
from structlog.testing import capture_logs

from makima.model import TaskStatus
from makima.tasks import TASK_ID_ENV, run_task, stop_orphaned_tasks, task_id_of
from tests.harness import until

pytestmark = pytest.mark.anyio

DEADLINE = 20.0

# argv: PIDFILE MODE TASK. MODE "setsid": a child calls setsid() and sleeps;
# "daemonize": fork, setsid, fork again, the middle process exits (the grandchild
# is reparented). TASK "wait": the task's own process then sleeps; "exit": it exits.
SCRIPT = """
import os, sys, time
pidfile, mode, task = sys.argv[1:4]
if os.fork() == 0:
    os.setsid()
    if mode == "daemonize" and os.fork() != 0:
        os._exit(0)
    null = os.open(os.devnull, os.O_RDWR)
    for fd in (0, 1, 2):
        os.dup2(null, fd)
    with open(pidfile + ".tmp", "w") as out:
        out.write(str(os.getpid()))
    os.rename(pidfile + ".tmp", pidfile)
    time.sleep(600)
    os._exit(0)
if task == "wait":
    time.sleep(600)
"""


def command(pidfile: Path, mode: str, task: str) -> list[str]:
    return [sys.executable, "-c", SCRIPT, str(pidfile), mode, task]


def running(pid: int) -> bool:
    """Whether ``pid`` exists and is not a zombie (which has exited)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_bytes()
    except OSError:
        return False
    return stat.rsplit(b")", 1)[1].split()[0] != b"Z"


def carries(pid: int, task_id: str) -> bool:
    try:
        return task_id_of(Path(f"/proc/{pid}/environ").read_bytes()) == task_id
    except OSError:
        return False


@contextlib.contextmanager
def cleanup(task_id: str, pidfile: Path) -> Iterator[None]:
    """Whatever happens in the test, leave no descendant of this task behind."""
    try:
        yield
    finally:
        if pidfile.exists():
            pid = int(pidfile.read_text())
            if carries(pid, task_id):
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)


def pid_in(pidfile: Path) -> int | None:
    return int(pidfile.read_text()) if pidfile.exists() else None


async def pid_from(pidfile: Path) -> int:
    await until(lambda: pid_in(pidfile) is not None, "started")
    pid = pid_in(pidfile)
    assert pid is not None
    return pid


async def gone(pid: int) -> None:
    await until(lambda: not running(pid), f"gone: process {pid}")


@pytest.mark.parametrize("mode", ["setsid", "daemonize"])
async def test_a_cancelled_task_takes_its_setsid_descendants_with_it(
    tmp_path: Path, mode: str
) -> None:
    task_id = str(uuid.uuid4())
    pidfile = tmp_path / "grandchild.pid"
    with cleanup(task_id, pidfile):
        outcome = None
        with capture_logs() as logged, anyio.CancelScope() as scope:
            async with anyio.create_task_group() as tg:

                async def run() -> None:
                    nonlocal outcome
                    outcome = await run_task(
                        command(pidfile, mode, "wait"), cwd=None, env={}, task_id=task_id, grace=1.0
                    )

                tg.start_soon(run)
                grandchild = await pid_from(pidfile)
                assert carries(grandchild, task_id)
                (started,) = [e for e in logged if e["event"] == "task.started"]
                assert os.getpgid(started["pid"]) == started["pid"]  # the task's own group
                assert os.getpgid(grandchild) != started["pid"]  # the grandchild left it
                scope.cancel()
        assert scope.cancelled_caught and outcome is None  # the cancellation went through
        await gone(grandchild)
        stopped = [e for e in logged if e["event"] == "task.descendants_stopped"]
        assert stopped and grandchild in stopped[0]["pids"]


async def test_a_task_that_exits_leaves_no_daemonised_descendant(tmp_path: Path) -> None:
    task_id = str(uuid.uuid4())
    pidfile = tmp_path / "grandchild.pid"
    with cleanup(task_id, pidfile), capture_logs() as logged:
        with anyio.fail_after(DEADLINE):
            outcome = await run_task(
                command(pidfile, "daemonize", "exit"), cwd=None, env={}, task_id=task_id, grace=1.0
            )
        assert outcome.status is TaskStatus.SUCCEEDED and outcome.exit_code == 0
        grandchild = await pid_from(pidfile)
        await gone(grandchild)
        (stopped,) = [e for e in logged if e["event"] == "task.descendants_stopped"]
        assert stopped["reason"] == "exited" and stopped["pids"] == [grandchild]


async def test_a_task_without_descendants_logs_nothing_more(tmp_path: Path) -> None:
    with capture_logs() as logged, anyio.fail_after(DEADLINE):
        outcome = await run_task(["true"], cwd=None, env={}, task_id=str(uuid.uuid4()))
    assert outcome.status is TaskStatus.SUCCEEDED
    assert [e["event"] for e in logged] == ["task.started", "task.exited"]


async def test_orphans_of_a_crashed_daemon_are_stopped_with_their_descendants(
    tmp_path: Path,
) -> None:
    """After a crash the task's process is no child of this daemon; its setsid
    descendant is found all the same."""
    task_id = str(uuid.uuid4())
    pidfile = tmp_path / "grandchild.pid"
    env = {**os.environ, TASK_ID_ENV: task_id}
    with cleanup(task_id, pidfile):
        leader = await anyio.open_process(
            command(pidfile, "setsid", "wait"),
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=None,
            stderr=None,
            start_new_session=True,
        )
        async with leader:
            try:
                grandchild = await pid_from(pidfile)
                with anyio.fail_after(DEADLINE):
                    found = await anyio.to_thread.run_sync(stop_orphaned_tasks, {task_id}, 1.0)
                assert found == {task_id: sorted([leader.pid, grandchild])}
                await gone(grandchild)
                with anyio.fail_after(DEADLINE):
                    assert await leader.wait() == -signal.SIGTERM
            finally:
                with contextlib.suppress(ProcessLookupError):
                    leader.kill()

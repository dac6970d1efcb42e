"""``--exec CMD ARGS…``: a command run for each notice, never through a shell.

The command gets the notice's JSON on stdin and in ``MAKIMA_*`` variables
(see :func:`makima.notify.message.exec_environment`), on top of this process's
environment less the webhook secret. It runs in a process group of its own;
at the timeout (or when ``makima notify`` stops) the whole group is killed.
Exit status 0 means told; anything else is a failure, tried again later.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
from collections.abc import Mapping, Sequence

import anyio
import anyio.abc
import structlog

from makima.notify.base import DeliveryError, fingerprint
from makima.notify.message import Notice, clean, encode_payload, exec_environment

log = structlog.get_logger("makima.notify")

STDERR_TAIL = 2048
"""Bytes of a failed command's stderr kept for the log."""
HIDDEN = ("MAKIMA_WEBHOOK_SECRET",)
"""Variables of this process a command does not get."""


def kill_group(pgid: int) -> None:
    # Gone already (or, for EPERM, no longer ours): nothing to kill.
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pgid, signal.SIGKILL)


class ExecNotifier:
    def __init__(
        self,
        argv: Sequence[str],
        *,
        timeout: float = 30.0,
        concurrency: int = 4,
        environment: Mapping[str, str] | None = None,
    ) -> None:
        if not argv:
            raise ValueError("--exec needs a command")
        self.argv = list(argv)
        self.name = f"exec:{fingerprint(*self.argv)}"
        self.label = f"exec {os.path.basename(self.argv[0])}"
        self.concurrency = concurrency
        self.timeout = timeout
        base = os.environ if environment is None else environment
        self._environment = {k: v for k, v in base.items() if k not in HIDDEN}

    async def retract(self, question_id: str) -> None:
        pass  # --on answered runs the command again, with MAKIMA_EVENT=question.answered

    async def deliver(self, notice: Notice) -> None:
        body = encode_payload(notice)
        env = {**self._environment, **exec_environment(notice)}
        where = {"notifier": self.label, "question_id": notice.question_id}
        try:
            process = await anyio.open_process(
                self.argv,
                stdin=subprocess.PIPE,
                stdout=subprocess.DEVNULL,
                stderr=subprocess.PIPE,
                env=env,
                start_new_session=True,
            )
        except OSError as exc:
            raise DeliveryError(f"{self.label}: cannot run {self.argv[0]!r}: {exc}") from exc
        log.debug("notify.exec_started", **where, pid=process.pid)
        tail = bytearray()
        finished = False
        try:
            with anyio.move_on_after(self.timeout):
                async with anyio.create_task_group() as tg:
                    tg.start_soon(_feed, process, body)
                    tg.start_soon(_drain, process, tail)
                    await process.wait()
                    finished = True
                    tg.cancel_scope.cancel()  # a leftover child may hold stderr open
        finally:
            with anyio.CancelScope(shield=True):
                if not finished:
                    kill_group(process.pid)  # the group's id is the leader's pid
                await process.wait()
                await process.aclose()
        if not finished:
            log.warning("notify.exec_timeout", **where, timeout=self.timeout, pid=process.pid)
            raise DeliveryError(f"{self.label} did not finish within {self.timeout} s; killed")
        if process.returncode != 0:
            stderr = clean(tail.decode(errors="replace"), single_line=True)
            log.warning("notify.exec_failed", **where, status=process.returncode, stderr=stderr)
            raise DeliveryError(f"{self.label} exited with status {process.returncode}")
        log.info("notify.exec_done", **where, notice=notice.kind.value)


async def _feed(process: anyio.abc.Process, body: bytes) -> None:
    assert process.stdin is not None
    try:
        await process.stdin.send(body)
        await process.stdin.aclose()
    except (anyio.BrokenResourceError, anyio.ClosedResourceError, OSError):
        pass  # the command does not read its stdin: its business


async def _drain(process: anyio.abc.Process, tail: bytearray) -> None:
    assert process.stderr is not None
    try:
        async for chunk in process.stderr:
            tail += chunk
            del tail[:-STDERR_TAIL]
    except (anyio.BrokenResourceError, anyio.ClosedResourceError, OSError):
        pass

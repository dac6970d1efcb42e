"""The daemon: one anyio task group owning the database, the supervisors and
their agents, the heartbeat, the control socket, signals and systemd.

Start: database → schema → restoration → socket → READY=1 → heartbeats.
SIGTERM: STOPPING=1, stop accepting, save every supervisor ``interrupted``,
stop agents and tasks, close the pool, stop the embedded database.
"""

from __future__ import annotations

import contextlib
import fcntl
import functools
import os
import signal
import socket
import uuid
from collections import deque
from collections.abc import Awaitable, Callable, Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import anyio
import anyio.abc
import structlog

from makima import repository as repo
from makima.api import ControlApi
from makima.config import DaemonConfig
from makima.control.server import ControlServer, prepare_socket_path
from makima.database import Database, DatabaseConfig
from makima.errors import ConflictError, MakimaError, NotFoundError
from makima.events import EventBus
from makima.faults import FaultHook, Moment, SavePoint
from makima.model import QuestionRecord, RestorationInfo, RestorationSource, SupervisorSpec
from makima.supervisor import StopReason, Supervisor
from makima.systemd import Notifier, watchdog_interval

log = structlog.get_logger("makima.daemon")


LOCK_NAME = "daemon.lock"


@contextlib.contextmanager
def hold_state_dir(state_dir: Path) -> Iterator[None]:
    """One daemon per state directory: an exclusive lock on ``daemon.lock`` in it,
    held for the daemon's life (the kernel lets go of it when the process dies)."""
    state_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
    path = state_dir / LOCK_NAME
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 32, 0).decode(errors="replace").strip() or "unknown"
            raise MakimaError(
                f"another makima daemon (pid {holder}) is running on state directory {state_dir}"
            ) from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        yield
    finally:
        os.close(fd)


class Daemon:
    def __init__(
        self,
        config: DaemonConfig,
        *,
        notifier: Notifier | None = None,
        listen_socket: socket.socket | None = None,
        handle_signals: bool = True,
        faults: FaultHook | None = None,
    ) -> None:
        self.config = config
        self.notifier = notifier or Notifier(None)
        self.listen_socket = listen_socket
        self.handle_signals = handle_signals
        self.faults = faults or FaultHook(None)
        self.daemon_id = uuid.uuid4()
        self.started_at = datetime.now(UTC)
        self.bus = EventBus()
        self.supervisors: dict[uuid.UUID, Supervisor] = {}
        self.startup_report: dict[str, Any] | None = None
        self._db: Database | None = None
        self._task_group: anyio.abc.TaskGroup | None = None
        self._shutdown = anyio.Event()
        self._wake: dict[uuid.UUID, anyio.Event] = {}
        self._resume_waiters: dict[uuid.UUID, _Waiter] = {}
        self._server = ControlServer(ControlApi(self), max_connections=config.max_connections)

    @property
    def db(self) -> Database:
        if self._db is None:
            raise RuntimeError("the daemon has no database yet")
        return self._db

    # ----------------------------------------------------------------- lifecycle

    async def run(
        self, *, task_status: anyio.abc.TaskStatus[Daemon] = anyio.TASK_STATUS_IGNORED
    ) -> None:
        log.info(
            "daemon.starting",
            daemon_id=str(self.daemon_id),
            pid=os.getpid(),
            state_dir=str(self.config.state_dir),
            embedded=self.config.database_url is None,
        )
        with hold_state_dir(self.config.state_dir):
            if self.listen_socket is None:
                # Refuse before restoring anything when another daemon has the socket.
                await prepare_socket_path(self.config.socket_path)
            await self._run(task_status)

    async def _run(self, task_status: anyio.abc.TaskStatus[Daemon]) -> None:
        self.notifier.status("starting the database")
        self._db = await Database.open(
            DatabaseConfig(state_dir=self.config.state_dir, url=self.config.database_url)
        )
        try:
            await self.db.save(
                lambda pool: repo.register_daemon(
                    pool, self.daemon_id, socket.gethostname(), os.getpid()
                ),
                "register_daemon",
            )
            async with anyio.create_task_group() as tg:
                self._task_group = tg
                self.notifier.status("restoring supervisors")
                await self.restore_on_startup()
                listener = (
                    await self._server.adopt(self.listen_socket)
                    if self.listen_socket is not None
                    else await self._server.listen(self.config.socket_path)
                )
                server_scope = anyio.CancelScope()
                tg.start_soon(self._serve, listener, server_scope)
                tg.start_soon(self._heartbeat_loop)
                if self.db.is_embedded:
                    tg.start_soon(self.db.supervise)
                interval = watchdog_interval()
                if interval is not None:
                    tg.start_soon(self._watchdog_loop, interval)
                if self.handle_signals:
                    tg.start_soon(self._signal_loop)
                self.notifier.ready(self.status_text())
                log.info(
                    "daemon.ready",
                    socket=str(self.config.socket_path),
                    daemon_id=str(self.daemon_id),
                )
                task_status.started(self)
                await self._shutdown.wait()
                self.notifier.stopping()
                log.info("daemon.stopping", supervisors=len(self.supervisors))
                server_scope.cancel()
                await self._stop_supervisors()
                tg.cancel_scope.cancel()
        finally:
            self._task_group = None
            with anyio.CancelScope(shield=True):
                if self.listen_socket is None:
                    with contextlib.suppress(OSError):
                        os.unlink(self.config.socket_path)
                await self.db.close()
            log.info("daemon.stopped", daemon_id=str(self.daemon_id))

    def request_shutdown(self) -> None:
        self._shutdown.set()

    async def _serve(self, listener: anyio.abc.SocketListener, scope: anyio.CancelScope) -> None:
        with scope:
            await self._server.serve(listener)

    async def _stop_supervisors(self) -> None:
        """Save every supervisor as interrupted and stop its agent, within a bound."""
        bound = self.config.shutdown_grace * 3
        with anyio.move_on_after(bound) as scope:
            async with anyio.create_task_group() as tg:
                for supervisor in list(self.supervisors.values()):
                    tg.start_soon(
                        supervisor.stop, StopReason.SHUTDOWN, "the daemon is shutting down"
                    )
            for supervisor in list(self.supervisors.values()):
                if supervisor.agent is not None:
                    await supervisor.stopped.wait()
        if scope.cancelled_caught:
            log.warning("daemon.stop_timeout", bound_s=bound)

    def status_text(self) -> str:
        running = sum(1 for s in self.supervisors.values() if s.agent is not None)
        waiting = sum(len(s.state.pending_questions) for s in self.supervisors.values())
        unfinished = len(self.supervisors)
        return f"{running} agents running, {unfinished} unfinished, {waiting} open questions"

    # ----------------------------------------------------------------- loops

    async def _heartbeat_loop(self) -> None:
        while True:
            await anyio.sleep(self.config.heartbeat_interval)
            live = [s for s in self.supervisors.values() if s.agent is not None]
            beats = [s.heartbeat() for s in live]
            self.faults.reached(SavePoint.HEARTBEAT, Moment.BEFORE_COMMIT)
            outcomes = await self.db.save(
                functools.partial(
                    repo.update_supervisors_heartbeat_bulk, beats=[beat for beat, _ in beats]
                ),
                "heartbeat",
            )
            self.faults.reached(SavePoint.HEARTBEAT, Moment.AFTER_COMMIT)
            for supervisor, (_, mark) in zip(live, beats, strict=True):
                supervisor.after_heartbeat(mark, outcomes.get(supervisor.id))
            await self.db.save(
                lambda pool: repo.touch_daemon(pool, self.daemon_id), "daemon_heartbeat"
            )
            self.notifier.status(self.status_text())

    async def _watchdog_loop(self, interval: float) -> None:
        while True:
            self.notifier.watchdog()
            await anyio.sleep(interval)

    async def _signal_loop(self) -> None:
        with anyio.open_signal_receiver(signal.SIGTERM, signal.SIGINT, signal.SIGHUP) as signals:
            async for signum in signals:
                if signum == signal.SIGHUP:
                    self.notifier.reloading()
                    log.info("daemon.reload", note="no reloadable settings changed")
                    self.notifier.ready(self.status_text())
                    continue
                log.info("daemon.signal", signal=signal.Signals(signum).name)
                self.request_shutdown()

    # ----------------------------------------------------------------- supervisors

    def launch(
        self,
        supervisor: Supervisor,
        restoration: dict[str, Any] | None = None,
        after_start: Callable[[], Awaitable[None]] | None = None,
    ) -> None:
        if self._task_group is None:
            raise RuntimeError("the daemon is not running")
        self.supervisors[supervisor.id] = supervisor
        self._task_group.start_soon(self._run_supervisor, supervisor, restoration, after_start)

    async def _run_supervisor(
        self,
        supervisor: Supervisor,
        restoration: dict[str, Any] | None,
        after_start: Callable[[], Awaitable[None]] | None,
    ) -> None:
        """Run the agent; restart it through restoration when it dies (with backoff,
        at most ``agent_restart_limit`` times within ``agent_restart_window``)."""
        from makima.restoration import after_start as make_after_start
        from makima.restoration import info, restore_one, start_payload

        restarts: deque[float] = deque()
        try:
            while True:
                ended = await supervisor.run(restoration, after_start)
                if ended.finished or ended.stopped in (StopReason.SHUTDOWN, StopReason.CANCEL):
                    return
                if ended.stopped is StopReason.RESTART:
                    source = RestorationSource.MANUAL
                else:
                    now = anyio.current_time()
                    restarts.append(now)
                    while restarts and now - restarts[0] > self.config.agent_restart_window:
                        restarts.popleft()
                    if len(restarts) > self.config.agent_restart_limit:
                        reason = (
                            f"the agent exited without done or fail {len(restarts)} times within "
                            f"{self.config.agent_restart_window:.0f}s (last exit status "
                            f"{ended.exit_code}); not restarting it again"
                        )
                        log.warning("supervisor.restart_limit", supervisor_id=str(supervisor.id))
                        await supervisor.give_up(reason)
                        return
                    delay = min(self.config.agent_restart_backoff * 2 ** (len(restarts) - 1), 30.0)
                    log.info(
                        "supervisor.agent_restart_scheduled",
                        supervisor_id=str(supervisor.id),
                        delay_s=delay,
                        restarts_in_window=len(restarts),
                    )
                    wake = self._wake.setdefault(supervisor.id, anyio.Event())
                    with anyio.move_on_after(delay):
                        await wake.wait()
                    self._wake.pop(supervisor.id, None)
                    source = (
                        RestorationSource.MANUAL
                        if supervisor.id in self._resume_waiters
                        else RestorationSource.AGENT_RESTART
                    )
                # Answers and cancels wait while the state is read and rewritten.
                async with supervisor.exclusive():
                    plan = await restore_one(self, supervisor.id, source)
                    supervisor.reset(plan.state)
                waiter = self._resume_waiters.pop(supervisor.id, None)
                if waiter is not None:
                    waiter.result = info(plan)
                    waiter.done.set()
                if not plan.launches:
                    return
                restoration = start_payload(plan)
                after_start = make_after_start(self, supervisor, plan)
        finally:
            if supervisor.state.state.is_terminal or self._shutdown.is_set():
                self.supervisors.pop(supervisor.id, None)
            waiter = self._resume_waiters.pop(supervisor.id, None)
            if waiter is not None:
                waiter.done.set()

    async def restart_supervisor(
        self, supervisor_id: uuid.UUID, source: RestorationSource
    ) -> RestorationInfo:
        """Restore a supervisor now (manual resume): restart its agent if it runs."""
        from makima.restoration import after_start, info, restore_one, start_payload

        supervisor = self.supervisors.get(supervisor_id)
        if supervisor is None:
            plan = await restore_one(self, supervisor_id, source)
            if plan.launches:
                supervisor = self.new_supervisor(plan.loaded.spec, plan.state)
                self.launch(supervisor, start_payload(plan), after_start(self, supervisor, plan))
            return info(plan)
        if supervisor_id in self._resume_waiters:
            raise ConflictError(f"supervisor {supervisor_id} is being resumed already")
        waiter = _Waiter()
        self._resume_waiters[supervisor_id] = waiter
        wake = self._wake.get(supervisor_id)
        if wake is not None:
            wake.set()  # it was waiting to restart its agent: go now
        else:
            await supervisor.stop(StopReason.RESTART, "resumed by a person")
        await waiter.done.wait()
        if waiter.result is None:
            raise ConflictError(f"supervisor {supervisor_id} finished before it could be resumed")
        return waiter.result

    def new_supervisor(self, spec: SupervisorSpec, state: Any) -> Supervisor:
        return Supervisor(
            spec,
            state,
            db=self.db,
            bus=self.bus,
            faults=self.faults,
            grace=self.config.shutdown_grace,
        )

    async def create_supervisor(self, spec: SupervisorSpec) -> Supervisor:
        state = await self.db.query(lambda pool: repo.create_supervisor(pool, spec))
        supervisor = self.new_supervisor(spec, state)
        log.info("supervisor.created", supervisor_id=str(spec.supervisor_id), name=spec.name)
        self.launch(supervisor)
        return supervisor

    async def answer_question(
        self, question_id: uuid.UUID, answer: str, uid: int | None
    ) -> tuple[QuestionRecord, Callable[[], Awaitable[None]] | None]:
        """Persist an answer; return it and the delivery to run once the client has it."""
        record = await self.db.query(lambda pool: repo.get_question(pool, question_id))
        if record is None:
            raise NotFoundError(f"no question {question_id}")
        supervisor = self.supervisors.get(record.supervisor_id)
        if supervisor is None:
            if record.answer is None:
                found = await self.db.query(
                    lambda pool: repo.get_supervisor(pool, record.supervisor_id)
                )
                state = (
                    found[1].state.value if found is not None and found[1] is not None else "gone"
                )
                raise ConflictError(
                    f"question {question_id} belongs to supervisor {record.supervisor_id}, "
                    f"which is {state}; its questions can no longer be answered",
                    {"state": state},
                )
            answered = await self.db.query(
                lambda pool: repo.answer_question(pool, question_id, answer, uid)
            )
            return answered, None  # unreachable in practice: answer_question raises a conflict
        answered = await supervisor.answer(question_id, answer, uid)

        async def deliver() -> None:
            await supervisor.deliver_answer(answered)

        return answered, deliver

    # ----------------------------------------------------------------- restoration

    async def restore_on_startup(self) -> None:
        """Bring back every unfinished supervisor (see makima.restoration)."""
        from makima.restoration import restore_all

        self.startup_report = await restore_all(self)

    async def resume_supervisor(self, supervisor_id: uuid.UUID) -> RestorationInfo:
        from makima.restoration import resume

        return await resume(self, supervisor_id)


class _Waiter:
    """A manual resume waiting for the supervisor's loop to restore it."""

    def __init__(self) -> None:
        self.done = anyio.Event()
        self.result: RestorationInfo | None = None

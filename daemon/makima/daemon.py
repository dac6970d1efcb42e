"""The daemon: one anyio task group owning the database, the supervisors and
their agents, the heartbeat, the control socket, signals and systemd.

Start: database → schema → restoration → socket → READY=1 → heartbeats.
SIGTERM: STOPPING=1, stop accepting, save every supervisor ``interrupted``,
stop agents and tasks, close the pool, stop the embedded database.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import signal
import socket
import uuid
from collections.abc import Awaitable, Callable, Iterator, Mapping, Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import anyio
import anyio.abc
import structlog

from makima.api import ControlApi
from makima.config import DaemonConfig
from makima.control.server import ControlServer, prepare_socket_path
from makima.database import Database, DatabaseConfig
from makima.errors import ConflictError, MakimaError, NotFoundError, leaf_exceptions
from makima.events import EventBus
from makima.faults import FaultHook, Moment, SavePoint
from makima.model import (
    QuestionRecord,
    RestorationInfo,
    RestorationSource,
    SupervisorSpec,
    SupervisorStateEnum,
)
from makima.restoration import (
    Plan,
    Restorer,
    after_start,
    info,
    restore_all,
    restore_one,
    start_payload,
)
from makima.runner import RestartPolicy, Runner
from makima.store import (
    DaemonRegistered,
    DaemonSeen,
    Heartbeats,
    QuestionAnswered,
    Store,
    SupervisorCreated,
)
from makima.supervisor import StopReason, Supervisor
from makima.systemd import Notifier, watchdog_interval

log = structlog.get_logger("makima.daemon")

LAUNCH_WINDOW = 64  # restored agents being started at once


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


def first_error(group: BaseExceptionGroup[BaseException]) -> MakimaError | None:
    """The MakimaError inside ``group``, when every exception there is one."""
    leaves = leaf_exceptions(group)
    errors = [leaf for leaf in leaves if isinstance(leaf, MakimaError)]
    return errors[0] if errors and len(errors) == len(leaves) else None


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
        self.runners: dict[uuid.UUID, Runner] = {}
        self._starting: set[uuid.UUID] = set()  # restored, their agents not yet started
        self._in_flight: set[uuid.UUID] = set()  # of those, being started
        self._launch_window = anyio.Semaphore(LAUNCH_WINDOW)
        self.startup_report: dict[str, Any] | None = None
        self.restart_policy = RestartPolicy(
            limit=config.agent_restart_limit,
            window=config.agent_restart_window,
            backoff=config.agent_restart_backoff,
        )
        self._db: Database | None = None
        self._store: Store | None = None
        self._restorer: Restorer | None = None
        self._task_group: anyio.abc.TaskGroup | None = None
        self._shutdown = anyio.Event()
        self._resuming: set[uuid.UUID] = set()  # resumes of supervisors with no runner
        self._server = ControlServer(ControlApi(self), max_connections=config.max_connections)

    @property
    def db(self) -> Database:
        if self._db is None:
            raise RuntimeError("the daemon has no database yet")
        return self._db

    @property
    def store(self) -> Store:
        if self._store is None:
            self._store = Store(self.db)
        return self._store

    @property
    def restorer(self) -> Restorer:
        if self._restorer is None:
            self._restorer = Restorer(
                self.store, self.bus, self.config.task_restart_policy, self.faults
            )
        return self._restorer

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
            try:
                await self._run(task_status)
            except BaseExceptionGroup as group:
                # A MakimaError that ends the daemon (the embedded server past its
                # restart limit, say) surfaces as itself, for a one-line message.
                reason = first_error(group)
                if reason is None:
                    raise
                raise reason from group

    async def _run(self, task_status: anyio.abc.TaskStatus[Daemon]) -> None:
        self.notifier.status("starting the database")
        self._db = await Database.open(
            DatabaseConfig(state_dir=self.config.state_dir, url=self.config.database_url)
        )
        try:
            await self.store.register_daemon(
                DaemonRegistered(self.daemon_id, socket.gethostname(), os.getpid())
            )
            async with anyio.create_task_group() as tg:
                self._task_group = tg
                if self.db.is_embedded:  # a server dying while restoring is restarted too
                    tg.start_soon(self.db.supervise)
                self.notifier.status("restoring supervisors")
                plans = await self.restore_on_startup()
                listener = (
                    await self._server.adopt(self.listen_socket)
                    if self.listen_socket is not None
                    else await self._server.listen(self.config.socket_path)
                )
                server_scope = anyio.CancelScope()
                tg.start_soon(self._serve, listener, server_scope)
                tg.start_soon(self._heartbeat_loop)
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
                # Every question is listed and re-delivered and the socket is served:
                # the agents are spawned now, without holding READY back.
                self.launch_plans(plans)
                del plans  # each runner keeps what its own agent needs
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
                for runner in list(self.runners.values()):
                    tg.start_soon(self._stop_one, runner)
            for supervisor in self.supervisors.values():
                if supervisor.agent is not None:
                    await supervisor.stopped.wait()
        if scope.cancelled_caught:
            log.warning("daemon.stop_timeout", bound_s=bound)

    @staticmethod
    async def _stop_one(runner: Runner) -> None:
        supervisor = runner.supervisor
        try:
            await runner.call(
                "stopping it",
                lambda: supervisor.stop(StopReason.SHUTDOWN, "the daemon is shutting down"),
            )
        except MakimaError as exc:  # refused, or crashed (then failed): the others go on
            log.warning("supervisor.stop_failed", supervisor_id=str(runner.id), error=str(exc))

    def status_text(self) -> str:
        running = sum(1 for s in self.supervisors.values() if s.agent is not None)
        waiting = sum(len(s.state.pending_questions) for s in self.supervisors.values())
        unfinished = len(self.supervisors)
        return f"{running} agents running, {unfinished} unfinished, {waiting} open questions"

    # ----------------------------------------------------------------- loops

    async def _heartbeat_loop(self) -> None:
        while True:
            await anyio.sleep(self.config.heartbeat_interval)
            try:
                await self._heartbeat()
            except Exception as exc:  # a missed beat is logged; the next one tries again
                log.exception("daemon.heartbeat_failed", error=f"{type(exc).__name__}: {exc}")
            self.notifier.status(self.status_text())

    async def _heartbeat(self) -> None:
        live = [s for s in self.supervisors.values() if s.agent is not None]
        beats = [s.heartbeat() for s in live]
        self.faults.reached(SavePoint.HEARTBEAT, Moment.BEFORE_COMMIT)
        outcomes = await self.store.beat(Heartbeats(tuple(beat for beat, _ in beats)))
        self.faults.reached(SavePoint.HEARTBEAT, Moment.AFTER_COMMIT)
        for supervisor, (_, mark) in zip(live, beats, strict=True):
            supervisor.after_heartbeat(mark, outcomes.get(supervisor.id))
        await self.store.touch_daemon(DaemonSeen(self.daemon_id))

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

    @property
    def supervisors(self) -> dict[uuid.UUID, Supervisor]:
        return {sid: runner.supervisor for sid, runner in self.runners.items()}

    def launch(
        self,
        supervisor: Supervisor,
        restoration: Mapping[str, Any] | None = None,
        after_start: Callable[[], Awaitable[None]] | None = None,
        gate: Callable[[], Awaitable[None]] | None = None,
    ) -> Runner:
        if self._task_group is None:
            raise RuntimeError("the daemon is not running")
        runner = Runner(supervisor, self.restorer, self.restart_policy, self._runner_ended)
        self.runners[supervisor.id] = runner
        self._task_group.start_soon(runner.run, restoration, after_start, gate)
        return runner

    def launch_plan(self, plan: Plan, gate: Callable[[], Awaitable[None]] | None = None) -> Runner:
        supervisor = self.new_supervisor(plan.loaded.spec, plan.state)
        payload = start_payload(plan)
        supervisor.reset(plan.state, payload.given)
        then = after_start(self.restorer, supervisor, plan, payload)

        async def started() -> None:
            self._agent_started(supervisor.id)
            await then()

        return self.launch(supervisor, payload.restoration, started, gate)

    def _runner_ended(self, runner: Runner) -> None:
        self._agent_started(runner.id)
        if self.runners.get(runner.id) is runner:  # its loop is over, whatever the state
            del self.runners[runner.id]

    def new_supervisor(self, spec: SupervisorSpec, state: Any) -> Supervisor:
        return Supervisor(
            spec,
            state,
            store=self.store,
            bus=self.bus,
            faults=self.faults,
            grace=self.config.shutdown_grace,
            write_timeout=self.config.agent_write_timeout,
        )

    async def create_supervisor(self, spec: SupervisorSpec) -> Supervisor:
        state = await self.store.create_supervisor(SupervisorCreated(spec))
        supervisor = self.new_supervisor(spec, state)
        log.info("supervisor.created", supervisor_id=str(spec.supervisor_id), name=spec.name)
        self.launch(supervisor)
        return supervisor

    async def answer_question(
        self, question_id: uuid.UUID, answer: str, uid: int | None
    ) -> tuple[QuestionRecord, Callable[[], Awaitable[None]] | None]:
        """Persist an answer; return it and the delivery to run once the client has it.

        An open question of a running supervisor (the usual case) is answered in
        one statement, found in memory; anything else is looked up first, and so
        is everything while the database was away when last tried (the lookup
        then fails fast with DatabaseUnavailableError, instead of the answer
        waiting behind the supervisor's save points for the database to return).
        """
        runner = self._runner_asking(question_id) if self.db.available else None
        if runner is None:
            record = await self.store.get_question(question_id)
            if record is None:
                raise NotFoundError(f"no question {question_id}")
            runner = self.runners.get(record.supervisor_id)
            if runner is None:
                if record.answer is None:
                    found = await self.store.get_supervisor(record.supervisor_id)
                    state = (
                        found[1].state.value
                        if found is not None and found[1] is not None
                        else "gone"
                    )
                    raise ConflictError(
                        f"question {question_id} belongs to supervisor {record.supervisor_id}, "
                        f"which is {state}; its questions can no longer be answered",
                        {"state": state},
                    )
                answered = await self.store.answer_question(
                    QuestionAnswered(question_id, answer, uid)
                )
                return answered, None  # unreachable in practice: a conflict is raised
        supervisor = runner.supervisor
        answered = await runner.call(
            "saving an answer", lambda: supervisor.answer(question_id, answer, uid)
        )
        return answered, runner.guarded(
            "delivering an answer", lambda: supervisor.deliver_answer(answered)
        )

    def _runner_asking(self, question_id: uuid.UUID) -> Runner | None:
        """The runner whose supervisor has ``question_id`` open, as it knows."""
        for runner in self.runners.values():
            if any(q.id == question_id for q in runner.supervisor.state.pending_questions):
                return runner
        return None

    async def cancel_supervisor(self, supervisor_id: uuid.UUID, uid: int) -> SupervisorStateEnum:
        """Cancel a running supervisor; ConflictError when it is (or just became) finished."""
        runner = self.runners.get(supervisor_id)
        if runner is None or runner.supervisor.state.state.is_terminal:
            raise await self._not_unfinished(supervisor_id, runner)
        supervisor = runner.supervisor
        cancelled = await runner.call(
            "cancelling it", lambda: supervisor.stop(StopReason.CANCEL, f"cancelled by uid {uid}")
        )
        if not cancelled:  # its agent finished first (done or fail won the race)
            raise await self._not_unfinished(supervisor_id, runner)
        return supervisor.state.state

    async def _not_unfinished(
        self, supervisor_id: uuid.UUID, runner: Runner | None
    ) -> ConflictError:
        if runner is not None:
            current = runner.supervisor.state.state.value
        else:
            found = await self.store.get_supervisor(supervisor_id)
            state = found[1] if found is not None else None
            current = state.state.value if state is not None else "unknown"
        return ConflictError(
            f"supervisor {supervisor_id} is already {current}; only unfinished supervisors "
            "can be cancelled",
            {"state": current},
        )

    # ----------------------------------------------------------------- restoration

    async def restore_on_startup(self) -> list[Plan]:
        """Bring back every unfinished supervisor (see makima.restoration): everything
        but spawning their agents, which :meth:`launch_plans` does."""
        self.startup_report, plans = await restore_all(self.restorer)
        return plans

    def launch_plans(self, plans: Sequence[Plan]) -> None:
        """Run the restored supervisors: each is live at once (answers, cancels and
        resumes reach it), but their agents start at most :data:`LAUNCH_WINDOW` at a
        time, each until it has its ``start`` line, so that thousands of agents
        starting never starve the control socket. :attr:`agents_starting` counts
        those not yet started."""
        for plan in plans:
            self._starting.add(plan.supervisor_id)
            self.launch_plan(plan, gate=self._launch_turn(plan.supervisor_id))

    def _launch_turn(self, supervisor_id: uuid.UUID) -> Callable[[], Awaitable[None]]:
        async def turn() -> None:
            await self._launch_window.acquire()  # FIFO: in restoration order
            self._in_flight.add(supervisor_id)

        return turn

    def _agent_started(self, supervisor_id: uuid.UUID) -> None:
        self._starting.discard(supervisor_id)
        if supervisor_id in self._in_flight:
            self._in_flight.discard(supervisor_id)
            self._launch_window.release()

    @property
    def agents_starting(self) -> int:
        return len(self._starting)

    async def resume_supervisor(self, supervisor_id: uuid.UUID) -> RestorationInfo:
        """Manual resume: restart its agent through restoration (source ``manual``)."""
        found = await self.store.get_supervisor(supervisor_id)
        if found is None:
            raise NotFoundError(f"no supervisor {supervisor_id}")
        _, state = found
        if state is not None and state.state.is_terminal:
            raise ConflictError(
                f"supervisor {supervisor_id} is {state.state.value}; only unfinished "
                "supervisors can be resumed",
                {"state": state.state.value},
            )
        runner = self.runners.get(supervisor_id)
        if runner is not None:
            return await runner.resume()
        if supervisor_id in self._resuming:  # two resumes must not start two agents
            raise ConflictError(f"supervisor {supervisor_id} is being resumed already")
        self._resuming.add(supervisor_id)
        try:
            plan = await restore_one(self.restorer, supervisor_id, RestorationSource.MANUAL)
            if plan.launches:
                self.launch_plan(plan)
        finally:
            self._resuming.discard(supervisor_id)
        return info(plan)

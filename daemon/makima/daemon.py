"""The daemon: one anyio task group owning the database, the supervisors and
their agents, the heartbeat, the control socket, signals and systemd.

Start: database → schema → lease → claim → restoration → socket → READY=1 →
heartbeats. SIGTERM: STOPPING=1, stop accepting, save every supervisor
``interrupted``, stop agents and tasks, (with live peers and handover on)
release the lease, close the pool, stop the embedded database.

Several daemons may share one PostgreSQL (DESIGN §13): each runs the
supervisors it owns (``owner_daemon_id``, ``lease_epoch``), claims those whose
owner's lease expired (:mod:`makima.member`, :mod:`makima.cluster`), and lets a
person's answer, cancel or resume given on it reach the daemon that runs the
supervisor.
"""

from __future__ import annotations

import contextlib
import fcntl
import math
import os
import signal
import socket
import uuid
from collections.abc import Awaitable, Callable, Iterable, Iterator, Mapping, Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import anyio
import anyio.abc
import structlog

from makima.api import ControlApi
from makima.cluster import LeaseTimer, answer_notice
from makima.config import DaemonConfig
from makima.control.server import ControlServer, prepare_socket_path
from makima.database import Database, DatabaseConfig
from makima.errors import (
    ConflictError,
    DatabaseUnavailableError,
    FencedError,
    MakimaError,
    NotFoundError,
    leaf_exceptions,
)
from makima.events import EventBus, EventKind
from makima.faults import FaultHook, Moment, SavePoint
from makima.member import Member
from makima.model import (
    Fence,
    QuestionRecord,
    RestorationSource,
    SupervisorSpec,
)
from makima.repository import AnsweredElsewhereError
from makima.restoration import (
    Claimed,
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
    CancelUnheld,
    Claim,
    Heartbeats,
    QuestionAnswered,
    RequestAdded,
    RequestFinished,
    Store,
    SupervisorCreated,
    SupervisorsClaimed,
)
from makima.supervisor import StopReason, Supervisor, question_event_fields
from makima.systemd import Notifier, watchdog_interval

log = structlog.get_logger("makima.daemon")

LAUNCH_WINDOW = 64  # restored agents being started at once


LOCK_NAME = "daemon.lock"
ID_NAME = "daemon.id"
REQUEST_WAIT = 10.0  # seconds a cancel or resume for another daemon's supervisor waits for it


def daemon_identity(state_dir: Path) -> uuid.UUID:
    """This state directory's daemon id, made on its first start (under the state
    directory's lock, so one process at a time is that daemon). A daemon started
    again on its state directory is the same daemon: it takes its own supervisors
    back at once, without waiting for its former lease to expire."""
    path = state_dir / ID_NAME
    try:
        return uuid.UUID(path.read_text().strip())
    except (OSError, ValueError):
        pass
    value = uuid.uuid4()
    tmp = path.with_suffix(".tmp")
    tmp.write_text(f"{value}\n")
    os.replace(tmp, path)
    return value


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
        self.daemon_id = uuid.uuid4()  # the state directory's, once it is held (run)
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
        self.member: Member | None = None
        self.timer = LeaseTimer(
            config.lease_ttl, config.lease_renew, enforced=config.database_url is not None
        )
        self._claiming = anyio.Lock()  # one claim round at a time
        self._claims_open = False  # claim rounds wait for the startup's restoration
        self._handling: set[uuid.UUID] = set()  # requests being carried out
        self._absorbing: set[uuid.UUID] = set()  # answers given elsewhere being taken

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
        with hold_state_dir(self.config.state_dir):
            self.daemon_id = daemon_identity(self.config.state_dir)
            log.info(
                "daemon.starting",
                daemon_id=str(self.daemon_id),
                pid=os.getpid(),
                state_dir=str(self.config.state_dir),
                embedded=self.config.database_url is None,
                lease_ttl_s=self.config.lease_ttl,
                lease_renew_s=self.config.lease_renew,
            )
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
            async with anyio.create_task_group() as tg:
                self._task_group = tg
                if self.db.is_embedded:  # a server dying while restoring is restarted too
                    tg.start_soon(self.db.supervise)
                self.notifier.status("taking the lease")
                self.member = Member(
                    self, self.store, self.bus, self.timer, cluster=not self.db.is_embedded
                )
                await tg.start(self.member.run)
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
                self._claims_open = True
                await self._shutdown.wait()
                self.notifier.stopping()
                log.info("daemon.stopping", supervisors=len(self.supervisors))
                server_scope.cancel()
                stopped = await self._stop_supervisors()
                if self.config.handover and stopped:  # peers claim at once; ours come back
                    self.timer.valid_until = -math.inf  # nothing more to any agent from here
                    await self.member.release()
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

    async def _stop_supervisors(self) -> bool:
        """Save every supervisor as interrupted and stop its agent, within a bound;
        False when the bound passed with some agent not stopped."""
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
        return not scope.cancelled_caught

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
        former = self.runners.get(supervisor.id)
        if former is not None:  # a copy under an older fence (claimed again here): stop it
            former.supervisor.fence_broken("claimed again by this daemon")
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
        if self.runners.get(runner.id) is runner:  # its loop is over, whatever the state
            self._agent_started(runner.id)
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
            lease_valid=self.lease_valid,
        )

    def lease_valid(self) -> bool:
        return self.member is None or self.member.lease_valid()

    async def create_supervisor(self, spec: SupervisorSpec) -> Supervisor:
        if not self.lease_valid():
            raise DatabaseUnavailableError(
                "this daemon has lost its lease (the database did not answer in time); it "
                "takes new supervisors again once it has renewed it: try another daemon"
            )
        state = await self.store.create_supervisor(SupervisorCreated(spec, self.daemon_id))
        supervisor = self.new_supervisor(spec, state)
        log.info("supervisor.created", supervisor_id=str(spec.supervisor_id), name=spec.name)
        self.launch(supervisor)
        return supervisor

    async def answer_question(
        self, question_id: uuid.UUID, answer: str, uid: int | None
    ) -> tuple[QuestionRecord, Callable[[], Awaitable[None]] | None]:
        """Persist an answer; return it and the delivery to run once the client has it.

        An open question of a supervisor running here (the usual case) is answered
        in one statement, found in memory; anything else is looked up first, and so
        is everything while the database was away when last tried (the lookup
        then fails fast with DatabaseUnavailableError, instead of the answer
        waiting behind the supervisor's save points for the database to return).
        A question of a supervisor another daemon runs is answered here all the
        same (once, cluster-wide: the row decides) and its owner is told.
        """
        runner = self._runner_asking(question_id) if self.db.available else None
        if runner is None:
            record = await self.store.get_question(question_id)
            if record is None:
                raise NotFoundError(f"no question {question_id}")
            runner = self.runners.get(record.supervisor_id)
            if runner is None or runner.supervisor.is_fenced:
                return await self._answer_elsewhere(record, answer, uid), None
        supervisor = runner.supervisor
        try:
            answered = await runner.call(
                "saving an answer", lambda: supervisor.answer(question_id, answer, uid)
            )
        except AnsweredElsewhereError as exc:  # recorded; the new owner delivers it
            self._announce_answer(exc.record)
            return exc.record, None
        except FencedError:  # this copy was fenced before: answer it as anyone would
            record = await self.store.get_question(question_id)
            if record is None:
                raise NotFoundError(f"no question {question_id}") from None
            return await self._answer_elsewhere(record, answer, uid), None
        return answered, runner.guarded(
            "delivering an answer", lambda: supervisor.deliver_answer(answered)
        )

    async def _answer_elsewhere(
        self, record: QuestionRecord, answer: str, uid: int | None
    ) -> QuestionRecord:
        """Answer a question of a supervisor that does not run here: recorded (or
        refused as already answered), announced, and its owner told."""
        question_id = record.question_id
        if record.answer is None:
            found = await self.store.get_supervisor(record.supervisor_id)
            state = found[1] if found is not None else None
            if state is None or not state.state.is_unfinished:
                shown = state.state.value if state is not None else "gone"
                raise ConflictError(
                    f"question {question_id} belongs to supervisor {record.supervisor_id}, "
                    f"which is {shown}; its questions can no longer be answered",
                    {"state": shown},
                )
        answered = await self.store.answer_question(QuestionAnswered(question_id, answer, uid))
        self._announce_answer(answered)
        return answered

    def _announce_answer(self, record: QuestionRecord) -> None:
        """An answer this daemon recorded for a supervisor running elsewhere."""
        log.info(
            "question.answered",
            supervisor_id=str(record.supervisor_id),
            question_id=str(record.question_id),
            for_another_daemon=True,
        )
        self.bus.publish(
            EventKind.QUESTION_ANSWERED,
            **question_event_fields(record, record.supervisor_id),
            answer=record.answer,
            answered_at=record.answered_at.isoformat() if record.answered_at else None,
        )
        if self.member is not None and self._task_group is not None:
            notice = answer_notice(self.daemon_id, record.supervisor_id, record.question_id)
            self._task_group.start_soon(self.member.tell, [notice])

    def _runner_asking(self, question_id: uuid.UUID) -> Runner | None:
        """The runner whose supervisor has ``question_id`` open, as it knows."""
        for runner in self.runners.values():
            if any(q.id == question_id for q in runner.supervisor.state.pending_questions):
                return runner
        return None

    async def cancel_supervisor(self, supervisor_id: uuid.UUID, uid: int) -> dict[str, Any]:
        """Cancel a supervisor (``{"state": …}``); ConflictError when it is (or just
        became) finished. One that runs on another daemon is cancelled by that daemon:
        the request is recorded, its owner told, and its outcome awaited a while."""
        runner = self.runners.get(supervisor_id)
        if runner is None or runner.supervisor.is_fenced:
            return await self._for_owner(supervisor_id, "cancel", uid)
        if runner.supervisor.state.state.is_terminal:
            raise await self._not_unfinished(supervisor_id, runner)
        supervisor = runner.supervisor
        cancelled = await runner.call(
            "cancelling it", lambda: supervisor.stop(StopReason.CANCEL, f"cancelled by uid {uid}")
        )
        if not cancelled:  # its agent finished first (done or fail won the race)
            raise await self._not_unfinished(supervisor_id, runner)
        return {"state": supervisor.state.state.value}

    async def _for_owner(self, supervisor_id: uuid.UUID, kind: str, uid: int) -> dict[str, Any]:
        """A cancel or resume for a supervisor this daemon does not run: recorded for its
        owner (whoever runs it, now or after a takeover), whose outcome is awaited for
        REQUEST_WAIT seconds; past that the reply says it is pending."""
        found = await self.store.get_supervisor(supervisor_id)
        state = found[1] if found is not None else None
        if state is None or state.state.is_terminal:
            if kind == "cancel":
                raise await self._not_unfinished(supervisor_id, None)
            shown = state.state.value if state is not None else "unknown"
            raise ConflictError(
                f"supervisor {supervisor_id} is {shown}; only unfinished supervisors can be "
                "resumed",
                {"state": shown},
            )
        if kind == "cancel" and await self._cancel_unheld(supervisor_id, uid):
            return {"state": "failed"}
        request_id = uuid.uuid4()
        await self.store.add_request(
            RequestAdded(request_id, supervisor_id, kind, uid, self.daemon_id)
        )
        log.info(
            "request.sent",
            supervisor_id=str(supervisor_id),
            request_id=str(request_id),
            kind=kind,
            owner=None if state.owner_daemon_id is None else str(state.owner_daemon_id),
        )
        with anyio.move_on_after(REQUEST_WAIT):
            while True:
                requests = await self.store.get_requests([request_id])
                if requests and requests[0].handled_at is not None:
                    return outcome_of(requests[0].outcome)
                await anyio.sleep(0.1)
        return {
            "state": state.state.value,
            "pending": True,
            "request_id": str(request_id),
            "owner_daemon_id": None
            if state.owner_daemon_id is None
            else str(state.owner_daemon_id),
            "note": f"the daemon that runs it has not carried out the {kind} within "
            f"{REQUEST_WAIT:g}s; it is recorded and will be",
        }

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
        """Bring back what this daemon owns or may claim (see makima.restoration):
        everything but spawning their agents, which :meth:`launch_plans` does."""
        claimed = await self.store.claim(SupervisorsClaimed(self.daemon_id, own=True))
        self.startup_report, plans = await restore_all(
            self.restorer,
            self._claimed(claimed.claims),
            stateless_owner=self.daemon_id,
            refused=claimed.refused,
        )
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

    async def _cancel_unheld(self, supervisor_id: uuid.UUID, uid: int) -> bool:
        """Cancel here a supervisor no live daemon runs (its owner's lease is gone, or it
        is this daemon's and does not run): claimed as failed, its unfinished tasks
        cancelled, in one statement. False when a live daemon holds it."""
        cancelled = await self.store.cancel_unheld(
            CancelUnheld(self.daemon_id, supervisor_id, f"cancelled by uid {uid}")
        )
        if cancelled:
            log.info("supervisor.cancelled_unheld", supervisor_id=str(supervisor_id), uid=uid)
            self.bus.publish(
                EventKind.SUPERVISOR_STATE_CHANGED,
                supervisor_id=str(supervisor_id),
                state="failed",
                error_message=f"cancelled by uid {uid}",
            )
        return cancelled

    async def resume_supervisor(self, supervisor_id: uuid.UUID) -> dict[str, Any]:
        """Manual resume: restart its agent through restoration (source ``manual``).
        One that runs on another daemon is resumed there (a request, as for a cancel);
        one that runs nowhere (its owner's lease is gone) is claimed and run here."""
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
        if runner is not None and not runner.supervisor.is_fenced:
            return (await runner.resume()).to_json()
        if supervisor_id in self._resuming:  # two resumes must not start two agents
            raise ConflictError(f"supervisor {supervisor_id} is being resumed already")
        self._resuming.add(supervisor_id)
        try:
            claimed = await self.store.claim(
                SupervisorsClaimed(self.daemon_id, own=True, only=supervisor_id)
            )
            claims = claimed.claims
            if claimed.refused:
                raise ConflictError(f"supervisor {supervisor_id} {claimed.refused[0][1]}")
            if not claims:  # another daemon holds a lease on it: that one resumes it
                return await self._for_owner(supervisor_id, "resume", os.getuid())
            plan = await restore_one(
                self.restorer, supervisor_id, RestorationSource.MANUAL, claims[0].fence
            )
            if plan.launches:
                self.launch_plan(plan)
        finally:
            self._resuming.discard(supervisor_id)
        return info(plan).to_json()

    # ----------------------------------------------------------------- the cluster (member.Host)

    @property
    def stopping(self) -> bool:
        return self._shutdown.is_set()

    def running_fences(self) -> dict[uuid.UUID, Fence]:
        return {
            sid: runner.supervisor.fence
            for sid, runner in self.runners.items()
            if not runner.supervisor.is_fenced
        }

    def fenced(
        self,
        supervisor_ids: Iterable[uuid.UUID],
        why: str,
        as_of: Mapping[uuid.UUID, Fence] | None = None,
    ) -> None:
        """Stop the copies of these supervisors that were taken over. ``as_of``: the
        fences they were found stale under; a copy running under another fence by now
        (claimed again here meanwhile) is not that copy, and runs on."""
        for sid in supervisor_ids:
            runner = self.runners.get(sid)
            if runner is None:
                continue
            if as_of is not None and as_of.get(sid) != runner.supervisor.fence:
                continue
            runner.supervisor.fence_broken(why)

    def lapsed(self) -> None:
        """The lease's local deadline passed without a renewal: stop every agent now.
        Once it is renewed, the next claim round takes back what is still ours."""
        for runner in list(self.runners.values()):
            runner.supervisor.fence_broken("this daemon lost its lease")

    async def claim_round(self, *, own: bool) -> None:
        """Claim what nobody holds a lease on (``own``: and what this daemon owns but
        does not run, after it lost its lease), restore and run it."""
        if not self._claims_open:  # the startup's own claim and restoration come first
            return
        async with self._claiming:
            while not self.stopping and self._task_group is not None and self.lease_valid():
                # A fair share at a time (peers claim theirs meanwhile), again at once
                # until nothing is left: a takeover does not wait for the next renewal.
                claimed = await self.store.claim(
                    SupervisorsClaimed(
                        self.daemon_id,
                        own=own,
                        running=(*self.runners, *self._resuming),
                    )
                )
                claims = claimed.claims
                if not claims:
                    return
                own = False
                log.info(
                    "cluster.claimed",
                    daemon_id=str(self.daemon_id),
                    supervisors=len(claims),
                    previous_owners=sorted({str(c.previous) for c in claims}),
                )
                report, plans = await restore_all(
                    self.restorer, self._claimed(claims), refused=claimed.refused
                )
                log.info("cluster.restored", **report["counts"])
                if not self.lease_valid():  # lost meanwhile: taken back after the renewal
                    log.warning("cluster.not_launched", supervisors=len(plans))
                    return
                self.launch_plans(plans)

    def _claimed(self, claims: Sequence[Claim]) -> dict[uuid.UUID, Claimed]:
        """Each claim with what brought it here: this daemon's own come back after a
        restart; anyone else's are reassigned."""
        mine = (None, self.daemon_id)
        return {
            c.supervisor_id: Claimed(
                RestorationSource.DAEMON_RESTART
                if c.previous in mine
                else RestorationSource.TASK_REASSIGNMENT,
                c.fence,
            )
            for c in claims
        }

    async def handle_requests(self, request_ids: Sequence[uuid.UUID]) -> None:
        """Carry out the cancels and resumes asked on other daemons for supervisors
        that run here; each once (the row says whether it was)."""
        await _once_at_a_time(
            request_ids, self._handling, self._handle_requests, "request.handling_failed"
        )

    async def _handle_requests(self, fresh: Sequence[uuid.UUID]) -> None:
        for request in await self.store.get_requests(fresh):
            runner = self.runners.get(request.supervisor_id)
            if request.handled_at is not None or runner is None or runner.supervisor.is_fenced:
                continue
            outcome: dict[str, Any]
            try:
                if request.kind == "cancel":
                    uid = request.requested_by_uid if request.requested_by_uid is not None else -1
                    outcome = await self.cancel_supervisor(request.supervisor_id, uid)
                else:
                    outcome = await self.resume_supervisor(request.supervisor_id)
            except MakimaError as exc:
                outcome = error_outcome(exc)
            await self.store.finish_request(
                RequestFinished(request.request_id, self.daemon_id, outcome)
            )
            log.info(
                "request.handled",
                request_id=str(request.request_id),
                supervisor_id=str(request.supervisor_id),
                kind=request.kind,
            )

    async def absorb_answers(self, question_ids: Sequence[uuid.UUID]) -> None:
        """Answers recorded by other daemons for questions of supervisors running here:
        each is taken (out of the open questions, the state moved on) and delivered.
        Only those still open here are looked up (an answer given here, or held for
        an agent about to start, is not), each once at a time."""
        open_here = {
            q.id for r in self.runners.values() for q in r.supervisor.state.pending_questions
        }
        await _once_at_a_time(
            [q for q in question_ids if q in open_here],
            self._absorbing,
            self._absorb,
            "question.absorb_failed",
        )

    async def _absorb(self, question_ids: Sequence[uuid.UUID]) -> None:
        for question_id in question_ids:
            record = await self.store.get_question(question_id)
            if record is None or record.answer is None or record.delivered_at is not None:
                continue
            runner = self.runners.get(record.supervisor_id)
            if runner is None or runner.supervisor.is_fenced:
                continue
            supervisor = runner.supervisor
            await runner.guarded(
                "taking an answer given on another daemon",
                lambda s=supervisor, r=record: s.absorb_answer(r),  # type: ignore[misc]
            )()

    async def ping_agents(self, valid_for: float) -> None:
        """Tell every started agent how long this daemon's lease certainly lasts."""
        supervisors = [r.supervisor for r in self.runners.values() if r.supervisor.agent]
        if not supervisors:
            return
        async with anyio.create_task_group() as tg:
            for supervisor in supervisors:
                tg.start_soon(supervisor.ping, valid_for)


async def _once_at_a_time(
    ids: Sequence[uuid.UUID],
    in_flight: set[uuid.UUID],
    work: Callable[[Sequence[uuid.UUID]], Awaitable[None]],
    failed: str,
) -> None:
    """``work`` on the ids not already being worked on (a NOTIFY and a renewal's poll
    may bring the same ones); a failure is logged as ``failed`` and never ends the
    daemon: the next renewal's poll brings them again."""
    fresh = [i for i in ids if i not in in_flight]
    if not fresh:
        return
    in_flight.update(fresh)
    try:
        await work(fresh)
    except Exception as exc:  # noqa: BLE001 - the next renewal's poll tries again
        log.warning(failed, error=f"{type(exc).__name__}: {exc}")
    finally:
        in_flight.difference_update(fresh)


def outcome_of(outcome: Any) -> dict[str, Any]:
    """A request's recorded outcome as the control method's result, or its error."""
    if not isinstance(outcome, dict):
        return {"outcome": outcome}
    if "error" in outcome:
        message = str(outcome["error"])
        if outcome.get("code") == "conflict":
            raise ConflictError(message, outcome.get("data") or {})
        if outcome.get("code") == "not_found":
            raise NotFoundError(message)
        raise MakimaError(message)
    return outcome


def error_outcome(exc: MakimaError) -> dict[str, Any]:
    code = (
        "conflict"
        if isinstance(exc, ConflictError)
        else "not_found"
        if isinstance(exc, NotFoundError)
        else "error"
    )
    return {"error": str(exc), "code": code, "data": getattr(exc, "data", None)}

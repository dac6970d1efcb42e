"""The in-memory Supervisor: runs one agent, applies its events through the
transition table, and runs the matching save point before anything else may
see the effect (DESIGN §4).

Ordering rule for every agent message: decide (pure) → save point (commit)
→ update memory → ack the agent → announce to subscribers.
"""

from __future__ import annotations

import contextlib
import dataclasses
import enum
import signal
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Mapping
from datetime import UTC, datetime
from typing import Any, TypeVar

import anyio
import anyio.abc
import structlog

from makima.agent import (
    Activity,
    AgentMessage,
    AgentProcess,
    AgentProtocolError,
    Ask,
    Blocked,
    Checkpoint,
    Done,
    Envelope,
    ErrorCode,
    Fail,
    History,
    LineTooLongError,
    Message,
    Phase,
    Spawn,
    WaitTasks,
    ack,
    answer_message,
    cancel_message,
    error_reply,
    ping_message,
    start_message,
    task_finished_message,
    tasks_done_message,
)
from makima.errors import (
    FencedError,
    IllegalTransitionError,
    InvalidValueError,
    MakimaError,
    TooLargeError,
)
from makima.eventloop import IdleLock
from makima.events import EventBus, EventKind
from makima.faults import FaultHook, Moment, SavePoint
from makima.limits import (
    CHECKPOINT_LIMIT,
    MESSAGE_LIMIT,
    OPEN_QUESTIONS_LIMIT,
    QUESTION_LIMIT,
    REASON_LIMIT,
    RESULT_LIMIT,
    TEXT_LIMIT,
    encoded_size,
    fit_newest,
    too_large,
)
from makima.model import (
    Fence,
    Heartbeat,
    PendingQuestion,
    QuestionRecord,
    SupervisorSpec,
    SupervisorState,
    SupervisorStateEnum,
    TaskRecord,
    TaskStatus,
)
from makima.store import (
    AnswersDelivered,
    CheckpointSaved,
    MessageAdded,
    PhaseChange,
    QuestionAnswered,
    QuestionAsked,
    StateChange,
    Store,
    TaskFinished,
    TasksEnded,
    TaskSpawned,
    TaskStarted,
)
from makima.tasks import TaskOutcome, run_task
from makima.transitions import Event, is_allowed, transition

log = structlog.get_logger("makima.supervisor")

TASK_GRACE = 3.0  # seconds between SIGTERM and SIGKILL when a task is stopped

# Save points that leave the supervisor_states row (and so its version) alone.
_OTHER_TABLES = frozenset({SavePoint.MESSAGE, SavePoint.TASK_FINISHED})
T = TypeVar("T")
AfterAck = Callable[[], Awaitable[None]] | None


class StopReason(enum.StrEnum):
    """Why the daemon stops a supervisor's agent."""

    SHUTDOWN = "shutdown"  # the daemon is stopping: state interrupted
    CANCEL = "cancel"  # a person cancelled it: state failed
    RESTART = "restart"  # a manual resume: the agent is started again at once
    CRASH = "crash"  # its crash boundary caught an unexpected error: state failed
    FENCED = "fenced"  # another daemon owns it now: stopped at once, nothing written


@dataclasses.dataclass(frozen=True, slots=True)
class AgentExit:
    """How a run of the agent ended."""

    exit_code: int | None
    finished: bool  # the supervisor reached a terminal state
    stopped: StopReason | None  # the daemon stopped it on purpose


def question_event_fields(
    record: QuestionRecord | PendingQuestion, supervisor_id: uuid.UUID
) -> dict[str, Any]:
    """The flattened question fields every question event carries."""
    if isinstance(record, PendingQuestion):
        return {
            "supervisor_id": str(supervisor_id),
            "question_id": str(record.id),
            "question": record.question,
            "choices": list(record.choices),
            "context": record.context,
            "asked_at": record.asked_at.isoformat(),
        }
    return {
        "supervisor_id": str(supervisor_id),
        "question_id": str(record.question_id),
        "question": record.question,
        "choices": list(record.choices),
        "context": record.context,
        "asked_at": record.asked_at.isoformat(),
    }


def _fits(what: str, value: Any, limit: int, *, measured: bool = False) -> None:
    """Refuse ``value`` (or, ``measured``, a size) that could never be sent back."""
    problem = too_large(what, value if measured else encoded_size(value), limit)
    if problem is not None:
        raise TooLargeError(problem)


class Supervisor:
    """One supervisor: its spec, its current state, its agent and its tasks."""

    def __init__(
        self,
        spec: SupervisorSpec,
        state: SupervisorState,
        *,
        store: Store,
        bus: EventBus,
        faults: FaultHook,
        grace: float = 5.0,
        write_timeout: float = 30.0,
        finish_linger: float = 0.25,
        lease_valid: Callable[[], bool] = lambda: True,
    ) -> None:
        self.spec = spec
        self.state = state
        self.store = store
        self.bus = bus
        self.faults = faults
        self.grace = grace
        self.write_timeout = write_timeout
        self.finish_linger = finish_linger
        self.lease_valid = lease_valid  # the daemon's: False past its lease's local deadline
        self.agent: AgentProcess | None = None
        self._lock = IdleLock()  # an idle supervisor holds no lock object
        self._running_tasks: dict[uuid.UUID, anyio.CancelScope] = {}
        self._waiting_for_tasks = state.state is SupervisorStateEnum.WAITING_FOR_TASKS
        self._stop_reason: StopReason | None = None
        self._task_group: anyio.abc.TaskGroup | None = None
        # Save points started, and in flight: a heartbeat learns the row's version
        # only when none ran while it was written (see after_heartbeat).
        self._saves = 0
        self._saving = 0
        # Answers given while no started agent could take them (between a
        # restoration and the agent's start message): sent right after it.
        self._held_answers: dict[uuid.UUID, QuestionRecord] = {}
        # Answers this run's agent has (in its start line, or sent): each goes once.
        self._given: set[uuid.UUID] = set()
        self._started = False
        self._finished_at: float | None = None  # when done or fail was acknowledged
        self._last_line_at = 0.0
        self._handling = False
        self._stopped: anyio.Event | None = None  # made when someone waits
        self._has_stopped = False
        self._fenced = False  # taken over: this copy writes and acknowledges nothing more
        self._beat_at = state.last_heartbeat  # the last heartbeat written, for supervisor.updated

    @property
    def stopped(self) -> anyio.Event:
        """Set when the current run of the agent is over (made only when asked for:
        an idle supervisor keeps no event)."""
        if self._stopped is None:
            self._stopped = anyio.Event()
            if self._has_stopped:
                self._stopped.set()
        return self._stopped

    def _set_stopped(self) -> None:
        self._has_stopped = True
        if self._stopped is not None:
            self._stopped.set()

    @property
    def id(self) -> uuid.UUID:
        return self.spec.supervisor_id

    @property
    def fence(self) -> Fence:
        """The owner and lease epoch this copy runs under: every write carries it."""
        return Fence.of(self.state)

    @property
    def is_fenced(self) -> bool:
        return self._fenced

    async def ping(self, valid_for: float) -> None:
        """Tell the started agent how long its daemon's lease certainly lasts (an SDK
        agent stops itself when that passes without another ping)."""
        agent = self.agent
        if agent is None or not self._started or not self._may_speak():
            return
        with anyio.move_on_after(1.0):
            await agent.send(ping_message(valid_for))

    async def absorb_answer(self, record: QuestionRecord) -> bool:
        """An answer another daemon recorded for one of this supervisor's open
        questions: taken out of them (the state moves on when it was the last), then
        delivered. False when it was not open here (answered here, or restored)."""
        async with self._lock:
            old = self.state
            if not any(q.id == record.question_id for q in old.pending_questions):
                return False
            remaining = tuple(q for q in old.pending_questions if q.id != record.question_id)
            self.state = dataclasses.replace(old, pending_questions=remaining)
            if (
                not remaining
                and is_allowed(old.state, Event.ANSWERED)
                and transition(old.state, Event.ANSWERED) is not old.state
            ):
                await self._change(Event.ANSWERED)
        log.info(
            "question.answer_taken",
            supervisor_id=str(self.id),
            question_id=str(record.question_id),
            note="answered on another daemon",
        )
        await self.deliver_answer(record)
        return True

    def _may_speak(self) -> bool:
        """Whether this copy may still tell its agent anything: not once fenced, and not
        past its daemon's lease (then another daemon may own it already)."""
        if self._fenced:
            return False
        if not self.lease_valid():
            self.fence_broken("the daemon's lease is no longer certainly valid")
            return False
        return True

    def fence_broken(self, why: str) -> bool:
        """A write found the supervisor taken over (or a lease lost): stop this copy at
        once, writing nothing more and acknowledging nothing more. Its agent's process
        group and its tasks are killed now; the run then ends (StopReason.FENCED).
        False when it was fenced already."""
        if self._fenced:
            return False
        self._fenced = True
        self._stop_reason = StopReason.FENCED
        log.warning(
            "supervisor.fenced",
            supervisor_id=str(self.id),
            name=self.spec.name,
            lease_epoch=self.state.lease_epoch,
            why=why,
        )
        for scope in self._running_tasks.values():
            scope.cancel()
        agent = self.agent
        if agent is not None:
            agent.signal_group(signal.SIGKILL)
        return True

    @property
    def running_task_ids(self) -> tuple[uuid.UUID, ...]:
        return tuple(self._running_tasks)

    # ----------------------------------------------------------------- save points

    async def _save(self, point: SavePoint, operation: Callable[[], Awaitable[T]]) -> T:
        """Run one store call as the save point ``point``: the fault hook's moments
        around it, and the count for heartbeats."""
        if self._fenced:
            raise FencedError(self.id)
        counted = point not in _OTHER_TABLES  # for after_heartbeat
        if counted:
            self._saves += 1
            self._saving += 1
        try:
            self.faults.reached(point, Moment.BEFORE_COMMIT, self.spec.name)
            result = await operation()
            self.faults.reached(point, Moment.AFTER_COMMIT, self.spec.name)
        finally:
            if counted:
                self._saving -= 1
        return result

    async def _change(
        self,
        event: Event,
        *,
        point: SavePoint = SavePoint.STATE_CHANGE,
        **fields: Any,
    ) -> SupervisorState:
        """Apply ``event`` (and field updates), save it, then announce a state change."""
        old = self.state
        new = dataclasses.replace(old, state=transition(old.state, event), **fields)
        version = await self._save(point, lambda: self.store.change_state(StateChange.of(new)))
        if version is not None:
            new = dataclasses.replace(new, version=version)
        self.state = new
        self._announce_state(old.state)
        return new

    def _announce_state(self, old: SupervisorStateEnum) -> None:
        if old is not self.state.state:
            log.info(
                "supervisor.state_changed",
                supervisor_id=str(self.id),
                old=old.value,
                new=self.state.state.value,
            )
            self.bus.publish(
                EventKind.SUPERVISOR_STATE_CHANGED,
                supervisor_id=str(self.id),
                name=self.spec.name,
                old_state=old.value,
                state=self.state.state.value,
                phase=self.state.phase,
                progress=self.state.progress,
                error_message=self.state.error_message,
            )

    def _announce_update(self) -> None:
        """Announce phase, progress, activity and heartbeat once they are saved."""
        state = self.state
        self.bus.publish(
            EventKind.SUPERVISOR_UPDATED,
            supervisor_id=str(self.id),
            phase=state.phase,
            progress=state.progress,
            current_activity=state.current_activity,
            last_heartbeat=None if self._beat_at is None else self._beat_at.isoformat(),
        )

    def heartbeat(self) -> tuple[Heartbeat, int | None]:
        """This supervisor's beat, and a mark for :meth:`after_heartbeat` (None while a
        save point is in flight)."""
        state = self.state
        beat = Heartbeat(
            self.id,
            state.state,
            state.current_activity,
            state.progress,
            state.version,
            Fence.of(state),
        )
        return beat, (self._saves if self._saving == 0 else None)

    def after_heartbeat(self, mark: int | None, outcome: tuple[int, bool] | None) -> None:
        """Learn the row's version from a heartbeat that could not write activity over it.

        Only when no save point was in flight at the beat and none started since:
        then the row's version is that of the last save point this supervisor made,
        and adopting it lets the next beat write (a save point that does not
        report its version is caught up with this way).
        """
        if outcome is not None:  # the beat was written: announce it (supervisor.updated)
            self._beat_at = datetime.now(UTC)
            self._announce_update()
        if outcome is None or mark is None or mark != self._saves:
            return
        version, written = outcome
        if not written and version != self.state.version:
            self.state = dataclasses.replace(self.state, version=version)

    # ----------------------------------------------------------------- running

    @contextlib.asynccontextmanager
    async def exclusive(self) -> AsyncIterator[None]:
        """Hold off every other change (answers, cancels) while restoring."""
        async with self._lock:
            yield

    def reset(self, state: SupervisorState, given: Iterable[uuid.UUID] = ()) -> None:
        """Take a restored state before the next run (inside :meth:`exclusive`).

        The restoration read every answer committed so far, so none is held back;
        ``given``: the answers its ``start`` line carries, never to be sent again.
        """
        self.state = state
        self._saves += 1  # a beat taken before this must not teach an older version
        self._held_answers.clear()
        self._given = set(given)

    async def run(
        self,
        restoration: Mapping[str, Any] | None = None,
        after_start: Callable[[], Awaitable[None]] | None = None,
    ) -> AgentExit:
        """Start the agent, feed it, apply what it says until it exits."""
        self._stopped = None
        self._has_stopped = False
        if self._stop_reason is not None or self.state.state.is_terminal:
            # Cancelled, resumed or shut down while the agent was about to start.
            return self._ended(None, self.state.state.is_terminal)
        self._waiting_for_tasks = self.state.state is SupervisorStateEnum.WAITING_FOR_TASKS
        self._finished_at = None
        try:
            agent = await AgentProcess.start(
                self.spec.agent_command,
                supervisor_id=str(self.id),
                cwd=self.spec.cwd,
                env=self.spec.env,
                write_timeout=self.write_timeout,
            )
        except OSError as exc:
            async with self._lock:
                await self._change(
                    Event.FAIL,
                    error_message=f"could not start agent {self.spec.agent_command[0]!r}: {exc}",
                )
            self._set_stopped()
            return AgentExit(None, True, None)
        self.agent = agent
        exit_code: int | None = None
        try:
            async with anyio.create_task_group() as tg:
                self._task_group = tg
                async with self._lock:
                    if is_allowed(self.state.state, Event.AGENT_STARTED) and (
                        transition(self.state.state, Event.AGENT_STARTED) is not self.state.state
                    ):
                        await self._change(Event.AGENT_STARTED)
                # A stop that came while the agent was starting found no agent to stop.
                # The restoration and its follow-up are dropped once used: a waiting
                # supervisor keeps no copy of what its agent was started with.
                start = start_message(str(self.id), self.spec.name, self.spec.goal, restoration)
                restoration = None
                sent = self._stop_reason is None and self._may_speak() and await agent.send(start)
                del start
                if sent:
                    if after_start is not None:
                        await after_start()
                        after_start = None
                    self._started = True
                    await self._send_held_answers()
                    async for item in agent.lines():
                        self._handling = True  # a finished agent's stdin stays open meanwhile
                        try:
                            await self._handle(item)
                        finally:
                            self._handling = False
                            self._last_line_at = anyio.current_time()
                    exit_code = await self._await_exit(agent)
                # The agent is gone: what it left running is stopped.
                tg.cancel_scope.cancel()
        finally:
            self._task_group = None
            self._started = False
            with anyio.CancelScope(shield=True):
                if exit_code is None:
                    exit_code = await agent.stop(self.grace)
                await agent.aclose()
            self.agent = None
        finished = self.state.state.is_terminal
        if not finished and self._stop_reason is None:
            why = agent.stuck or f"agent exited with status {exit_code} without done or fail"
            async with self._lock:
                await self._change(Event.AGENT_EXITED, error_message=why)
        log.info(
            "supervisor.agent_exited",
            supervisor_id=str(self.id),
            exit_code=exit_code,
            state=self.state.state.value,
        )
        return self._ended(exit_code, finished)

    def _ended(self, exit_code: int | None, finished: bool) -> AgentExit:
        """The run is over: the stop that ended it is consumed."""
        reason, self._stop_reason = self._stop_reason, None
        self._set_stopped()
        return AgentExit(exit_code, finished, reason)

    async def _await_exit(self, agent: AgentProcess) -> int:
        """The agent closed its stdout; give it ``grace`` to exit, then stop it."""
        with anyio.move_on_after(self.grace):
            return await agent.wait()
        code = await agent.stop(self.grace)
        return code if code is not None else -9

    async def stop(self, reason: StopReason, detail: str) -> bool:
        """Stop on purpose: save the state first, then tell and stop the agent (killed
        after the grace period, whatever its pipe does). False when the supervisor
        had already finished (its agent's done or fail came first)."""
        self._stop_reason = reason  # before the lock: a starting agent sees it at once
        async with self._lock:
            unfinished = self.state.state.is_unfinished
            if not unfinished and reason is not StopReason.SHUTDOWN:
                # It finished first: its agent keeps its last moments to hear replies.
                if self._stop_reason is reason:
                    self._stop_reason = None
                return False
            if unfinished and reason is not StopReason.RESTART:
                event = Event.INTERRUPT if reason is StopReason.SHUTDOWN else Event.CANCEL
                try:
                    await self._change(event, error_message=detail)
                except BaseException:
                    if self._stop_reason is reason:  # not stopped: its agent runs on
                        self._stop_reason = None
                    raise
        agent = self.agent
        if agent is not None:
            await agent.stop(self.grace, farewell=cancel_message(detail))
        return unfinished

    async def fail_unexpectedly(self, reason: str) -> None:
        """The crash boundary's last step: save ``failed`` with ``reason``, stop the
        agent and its tasks. Any state may fail this way (no transition check)."""
        self._stop_reason = StopReason.CRASH
        with anyio.CancelScope(shield=True):
            # Saved if the database lets it within the bound, else the next
            # restoration finds the row as it was; the agent is stopped either way.
            with anyio.move_on_after(self.grace * 2 + 10.0):
                await self._save_crash(reason)
            agent = self.agent
            if agent is not None:
                await agent.stop(self.grace, farewell=cancel_message(reason))

    async def _save_crash(self, reason: str) -> None:
        if self._fenced:  # another daemon owns it now: nothing of this copy is written
            return
        async with self._lock:
            old = self.state
            if old.state.is_unfinished:
                new = dataclasses.replace(
                    old, state=SupervisorStateEnum.FAILED, error_message=reason
                )
                self.state = new  # in memory first: whatever the database says next
                version = await self.store.change_state(StateChange.of(new))
                if version is not None:
                    self.state = dataclasses.replace(new, version=version)
                self._announce_state(old.state)
            for scope in self._running_tasks.values():
                scope.cancel()
            await self.store.end_tasks(TasksEnded(self.id, TaskStatus.CANCELLED, self.fence))

    async def _send_held_answers(self) -> None:
        held = list(self._held_answers.values())
        self._held_answers.clear()
        for record in held:
            await self.deliver_answer(record)

    async def give_up(self, reason: str) -> None:
        """Past the restart limit: the supervisor fails with ``reason``."""
        if self._fenced:
            return
        async with self._lock:
            if self.state.state.is_unfinished:
                await self._change(Event.RESTORE_FAILED, error_message=reason)
            # Tasks put back to pending for a re-run that will not come.
            await self.store.end_tasks(TasksEnded(self.id, TaskStatus.CANCELLED, self.fence))

    async def rerun_task(self, task: TaskRecord) -> None:
        """Start again a task that was running when the agent or daemon stopped."""
        if self._task_group is None:
            raise MakimaError("the supervisor is not running")
        scope = anyio.CancelScope()
        self._running_tasks[task.task_id] = scope
        self._task_group.start_soon(self._run_task, task, scope)

    # ----------------------------------------------------------------- agent messages

    async def _reply(self, message: Mapping[str, Any]) -> None:
        agent = self.agent
        if agent is None or not self._may_speak():
            return
        try:
            await agent.send(message)
        except LineTooLongError as exc:  # a reply never costs the agent its supervisor
            log.warning("agent.reply_too_long", supervisor_id=str(self.id), error=str(exc))
            if message.get("type") in ("ack", "error"):
                await agent.send(error_reply(message.get("ref"), ErrorCode.TOO_LARGE, str(exc)))

    async def _handle(self, item: Envelope | AgentProtocolError) -> None:
        if isinstance(item, AgentProtocolError):
            log.warning(
                "agent.bad_line", supervisor_id=str(self.id), code=item.code.value, error=str(item)
            )
            await self._reply(error_reply(item.ref, item.code, str(item)))
            return
        after: AfterAck = None
        try:
            async with self._lock:
                results, after = await self._apply(item.message, durable=item.ref is not None)
        except IllegalTransitionError as exc:
            log.warning("agent.illegal", supervisor_id=str(self.id), error=str(exc))
            await self._reply(error_reply(item.ref, ErrorCode.ILLEGAL_STATE, str(exc)))
            return
        except TooLargeError as exc:
            log.warning("agent.too_large", supervisor_id=str(self.id), error=str(exc))
            await self._reply(error_reply(item.ref, ErrorCode.TOO_LARGE, str(exc)))
            return
        except InvalidValueError as exc:
            log.warning("agent.invalid", supervisor_id=str(self.id), error=str(exc))
            await self._reply(error_reply(item.ref, ErrorCode.INVALID, str(exc)))
            return
        except FencedError as exc:  # taken over: acknowledge nothing more
            self.fence_broken(str(exc))
            return
        except MakimaError as exc:
            log.exception("agent.failed_to_apply", supervisor_id=str(self.id))
            await self._reply(error_reply(item.ref, ErrorCode.INTERNAL, str(exc)))
            return
        if item.ref is not None:
            await self._reply(ack(item.ref, **results))
        if after is not None:
            await after()

    async def _apply(
        self, message: AgentMessage, *, durable: bool
    ) -> tuple[dict[str, Any], AfterAck]:
        """Apply one message; ``durable``: the agent awaits an ack, so even a
        light change (activity) is saved before it."""
        match message:
            case Activity(text=text, progress=progress):
                _fits("an activity's text", text, TEXT_LIMIT)
                return await self._on_activity(text, progress, durable=durable), None
            case Phase(phase=phase):
                _fits("a phase", phase, TEXT_LIMIT)
                return await self._on_phase(phase), None
            case Message(role=role, content=content):
                _fits("a message", {"role": role, "content": content}, MESSAGE_LIMIT)
                seq = await self._save(
                    SavePoint.MESSAGE,
                    lambda: self.store.add_message(
                        MessageAdded(self.id, role, content, self.fence)
                    ),
                )
                return {"seq": seq}, None
            case Checkpoint(data=data):
                return await self._on_checkpoint(data), None
            case Ask():
                return await self._on_ask(message)
            case Spawn():
                return await self._on_spawn(message)
            case WaitTasks():
                return await self._on_wait_tasks()
            case Blocked(reason=reason):
                _fits("a blocked reason", reason, REASON_LIMIT)
                await self._change(Event.BLOCKED, error_message=reason)
                return {}, None
            case Done(result=result):
                _fits("a done result", result, RESULT_LIMIT)
                await self._change(
                    Event.DONE,
                    progress=100,
                    error_message=None,
                    current_activity="done",
                    result=result,
                )
                log.info("supervisor.completed", supervisor_id=str(self.id), result=result)
                return {}, self._finish
            case Fail(error=error):
                _fits("a fail error", error, REASON_LIMIT)
                await self._change(Event.FAIL, error_message=error)
                return {}, self._finish
            case History(before=before, limit=limit):
                return await self._history_page(before, limit), None

    async def _on_activity(
        self, text: str, progress: int | None, *, durable: bool
    ) -> dict[str, Any]:
        fields: dict[str, Any] = {"current_activity": text}
        if progress is not None:
            fields["progress"] = progress
        target = transition(self.state.state, Event.ACTIVITY)
        if durable or target is not self.state.state:
            await self._change(Event.ACTIVITY, **fields)
            self._announce_update()
        else:
            # Same state: the batched heartbeat writes activity and progress.
            self.state = dataclasses.replace(self.state, **fields)
        return {}

    async def _on_phase(self, phase: str) -> dict[str, Any]:
        old = self.state
        new = dataclasses.replace(old, phase=phase, state=transition(old.state, Event.ACTIVITY))
        version = await self._save(
            SavePoint.PHASE, lambda: self.store.change_phase(PhaseChange(new))
        )
        self.state = dataclasses.replace(new, version=version)
        self._announce_state(old.state)
        self._announce_update()
        return {}

    async def _on_checkpoint(self, data: Any) -> dict[str, Any]:
        _fits("a checkpoint's data", data, CHECKPOINT_LIMIT)
        old = self.state
        new = dataclasses.replace(
            old, checkpoint_data=data, state=transition(old.state, Event.ACTIVITY)
        )
        version = await self._save(
            SavePoint.CHECKPOINT, lambda: self.store.save_checkpoint(CheckpointSaved(new))
        )
        self.state = dataclasses.replace(new, version=version)
        self._announce_state(old.state)
        return {}

    async def _history_page(self, before: int | None, limit: int) -> dict[str, Any]:
        """Older history for an agent paging back (newest first, to fit one line)."""
        records = await self.store.get_messages(self.id, limit + 1, before=before)
        kept, cut = fit_newest([m.to_json() for m in records[-limit:]])
        more = cut or len(records) > limit
        return {"messages": kept, "more": more}

    async def _on_ask(self, message: Ask) -> tuple[dict[str, Any], AfterAck]:
        asked = {
            "question": message.question,
            "choices": list(message.choices),
            "context": message.context,
        }
        _fits("a question", asked, QUESTION_LIMIT)
        open_size = sum(encoded_size(q.to_json()) for q in self.state.pending_questions)
        _fits(
            "the open questions with this one",
            open_size + encoded_size(asked),
            OPEN_QUESTIONS_LIMIT,
            measured=True,
        )
        old = self.state
        question = PendingQuestion(
            id=uuid.uuid4(),
            question=message.question,
            choices=message.choices,
            context=message.context,
            asked_at=datetime.now(UTC),
        )
        target = transition(old.state, Event.ASK)
        version = await self._save(
            SavePoint.ASK,
            lambda: self.store.ask_question(QuestionAsked(self.id, question, target, self.fence)),
        )
        self.state = dataclasses.replace(
            self.state,
            state=target,
            pending_questions=(*self.state.pending_questions, question),
            version=version,
        )
        log.info("question.asked", supervisor_id=str(self.id), question_id=str(question.id))

        async def announce() -> None:
            self.bus.publish(EventKind.QUESTION_ASKED, **question_event_fields(question, self.id))
            self._announce_state(old.state)

        return {"question_id": str(question.id)}, announce

    async def _on_spawn(self, message: Spawn) -> tuple[dict[str, Any], AfterAck]:
        if self._task_group is None:
            raise MakimaError("the supervisor is not running")
        task = TaskRecord(
            task_id=uuid.uuid4(),
            supervisor_id=self.id,
            name=message.name,
            command=message.command,
            cwd=message.cwd or self.spec.cwd,
            env=dict(message.env),
        )
        old = self.state
        target = transition(old.state, Event.SPAWN)
        # One save point: the task's row, the supervisor's list and, if it moves, its state.
        created, version = await self._save(
            SavePoint.SPAWN,
            lambda: self.store.spawn_task(
                TaskSpawned(task, None if target is old.state else target, self.fence)
            ),
        )
        self.state = dataclasses.replace(
            old,
            state=target,
            spawned_task_ids=(*old.spawned_task_ids, task.task_id),
            version=version,
        )
        self._announce_state(old.state)
        scope = anyio.CancelScope()
        self._running_tasks[task.task_id] = scope
        task_group = self._task_group

        async def launch() -> None:
            self.bus.publish(
                EventKind.TASK_SPAWNED,
                supervisor_id=str(self.id),
                task_id=str(task.task_id),
                name=task.name,
                command=list(task.command),
            )
            task_group.start_soon(self._run_task, created, scope)

        return {"task_id": str(task.task_id)}, launch

    async def _on_wait_tasks(self) -> tuple[dict[str, Any], AfterAck]:
        if not self._running_tasks:
            return {}, self._send_tasks_done
        self._waiting_for_tasks = True
        if self.state.state is not SupervisorStateEnum.WAITING_FOR_TASKS:
            await self._change(Event.WAIT_TASKS)
        return {"running": [str(t) for t in self._running_tasks]}, None

    async def _send_tasks_done(self) -> None:
        await self._notify(tasks_done_message())

    async def _notify(self, message: Mapping[str, Any]) -> None:
        """Tell the agent something unasked; once it has finished it hears only replies."""
        if self._finished_at is None:
            await self._reply(message)

    async def _finish(self) -> None:
        """After done/fail: stop leftover tasks; the agent's stdin closes once it has
        been quiet for ``finish_linger`` (so that what it still sends is answered)."""
        for scope in self._running_tasks.values():
            scope.cancel()
        self._finished_at = self._last_line_at = anyio.current_time()
        if self._task_group is not None and self.agent is not None:
            self._task_group.start_soon(self._close_when_quiet, self.agent)

    async def _close_when_quiet(self, agent: AgentProcess) -> None:
        """Close a finished agent's stdin once it sent nothing for ``finish_linger``
        (at most ``grace`` after it finished): lines it still sends get their reply."""
        assert self._finished_at is not None
        last_call = self._finished_at + self.grace
        while (now := anyio.current_time()) < (  # noqa: ASYNC110 - the deadline moves
            until := min(self._last_line_at + self.finish_linger, last_call)
        ) or (self._handling and now < last_call):
            await anyio.sleep(max(until - now, self.finish_linger / 4))
        await agent.close_stdin()

    # ----------------------------------------------------------------- tasks

    async def _run_task(self, task: TaskRecord, scope: anyio.CancelScope) -> None:
        outcome: TaskOutcome | None = None
        try:
            await self.store.start_task(TaskStarted(task.task_id, self.id, self.fence))
            with scope:
                outcome = await run_task(
                    task.command,
                    cwd=task.cwd,
                    env=task.env,
                    task_id=str(task.task_id),
                    # Fenced: killed at once, before the lease's guard runs out.
                    grace=lambda: 0.0 if self._fenced else TASK_GRACE,
                )
        finally:
            if outcome is None:
                # Cancelled: by the person (cancelled) or because the agent or daemon stopped.
                status = (
                    TaskStatus.CANCELLED
                    if self._stop_reason is StopReason.CANCEL or self.state.state.is_terminal
                    else TaskStatus.INTERRUPTED
                )
                outcome = TaskOutcome(status, None, "")
            with anyio.CancelScope(shield=True):
                await self._task_finished(task, outcome)

    async def _task_finished(self, task: TaskRecord, outcome: TaskOutcome) -> None:
        if self._fenced:  # its new owner reports or re-runs it
            self._running_tasks.pop(task.task_id, None)
            return
        finished = await self._save(
            SavePoint.TASK_FINISHED,
            lambda: self.store.finish_task(
                TaskFinished(
                    task.task_id,
                    outcome.status,
                    outcome.exit_code,
                    outcome.output_tail,
                    self.id,
                    self.fence,
                )
            ),
        )
        log.info(
            "task.finished",
            supervisor_id=str(self.id),
            task_id=str(task.task_id),
            status=outcome.status.value,
            exit_code=outcome.exit_code,
        )
        if finished is not None:
            await self._notify(
                task_finished_message(
                    str(task.task_id), outcome.status.value, outcome.exit_code, outcome.output_tail
                )
            )
            self.bus.publish(
                EventKind.TASK_FINISHED,
                supervisor_id=str(self.id),
                task_id=str(task.task_id),
                name=task.name,
                status=outcome.status.value,
                exit_code=outcome.exit_code,
            )
        # Under the lock, so a concurrent wait_tasks either sees this task
        # running (and is answered here) or sees it gone (and answers itself).
        async with self._lock:
            self._running_tasks.pop(task.task_id, None)
            # An interrupted task did not finish: its agent is going away, and the
            # restoration that follows re-runs it or reports it (no tasks_done here).
            all_done = (
                self._waiting_for_tasks
                and not self._running_tasks
                and outcome.status is not TaskStatus.INTERRUPTED
            )
            if all_done:
                self._waiting_for_tasks = False
                if self.state.state is SupervisorStateEnum.WAITING_FOR_TASKS:
                    await self._change(Event.TASKS_DONE)
        if all_done:
            await self._send_tasks_done()

    # ----------------------------------------------------------------- answers

    async def answer(self, question_id: uuid.UUID, answer: str, uid: int | None) -> QuestionRecord:
        """Persist a person's answer (moving out of waiting_for_user when it was the
        last open question). Delivery to the agent is :meth:`deliver_answer`."""
        async with self._lock:
            old = self.state
            remaining = tuple(q for q in old.pending_questions if q.id != question_id)
            target: SupervisorStateEnum | None = None
            if not remaining and is_allowed(old.state, Event.ANSWERED):
                target = transition(old.state, Event.ANSWERED)
            record = await self._save(
                SavePoint.ANSWER,
                lambda: self.store.answer_question(
                    QuestionAnswered(question_id, answer, uid, target, self.fence)
                ),
            )
            self.state = dataclasses.replace(
                old, pending_questions=remaining, state=target or old.state
            )
        log.info("question.answered", supervisor_id=str(self.id), question_id=str(question_id))
        self.bus.publish(
            EventKind.QUESTION_ANSWERED,
            **question_event_fields(record, self.id),
            answer=record.answer,
            answered_at=record.answered_at.isoformat() if record.answered_at else None,
        )
        self._announce_state(old.state)
        return record

    async def deliver_answer(self, record: QuestionRecord) -> bool:
        """Send an answer to the running agent and record that it has it.

        With no started agent, the answer waits for the next one: held here
        until its start message is out, or read back by the next restoration.
        """
        qid = record.question_id
        if record.answer is None or record.delivered_at is not None or qid in self._given:
            return False
        if self.agent is None or not self._started:
            self._held_answers[qid] = record
            return False
        if not self._may_speak():
            return False
        self._given.add(qid)  # before the send: a second delivery racing this one stops here
        if not await self.agent.send(answer_message(str(qid), record.answer)):
            self._given.discard(qid)
            return False
        await self.store.deliver_answers(
            AnswersDelivered((record.question_id,), self.id, self.fence)
        )
        return True

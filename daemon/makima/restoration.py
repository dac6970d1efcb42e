"""The ten-step restoration flow (DESIGN §7).

1. trigger: daemon start, takeover, manual resume, or agent death;
2. load the state (in bulk on startup);
3. no state row: start fresh, with a warning;
4. validate (``validation.validate_supervisor_state``);
5. invalid: repair, revert to the latest checkpoint, start fresh, or mark failed;
6. valid: restore the conversation history;
7. re-deliver pending questions (``question.redelivered``, ``redelivery_count``+1)
   and deliver answers persisted but never received;
8. tasks that were running are re-run or marked ``interrupted``, and the
   agent is told;
9. send the restoration context in the agent's ``start`` message;
10. resume from the last state; ``mark_supervisor_restored``.

Decisions are pure (``makima.validation``); this module loads, writes and hands
back plans: it knows the store (makima.store), the event bus and the
configuration, never the daemon. Launching a plan is the runner's (``makima.runner``).

One supervisor's restoration failing in an unexpected way fails that supervisor
alone (its plan becomes ``mark_failed``); the others are restored as usual.
"""

from __future__ import annotations

import dataclasses
import enum
import uuid
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import anyio
import structlog

from makima.config import TaskRestartPolicy
from makima.errors import (
    FencedError,
    InvalidValueError,
    MakimaError,
    NotFoundError,
    crash_reason,
)
from makima.events import EventBus, EventKind
from makima.faults import FaultHook, Moment, SavePoint
from makima.limits import LINE_BUDGET, TEXT_LIMIT, encoded_size
from makima.model import (
    NO_FENCE,
    Fence,
    MessageRecord,
    PendingQuestion,
    QuestionRecord,
    RestorationInfo,
    RestorationSource,
    StateRecoveryAction,
    StateValidationResult,
    SupervisorRestorationContext,
    SupervisorState,
    TaskRecord,
    TaskStatus,
)
from makima.model import (
    SupervisorStateEnum as S,
)
from makima.store import (
    AnswersDelivered,
    QuestionRowsRepaired,
    QuestionsRedelivered,
    RestorationsCounted,
    StateRestored,
    StatesRestored,
    Store,
    TasksEnded,
    TasksRequeued,
)
from makima.supervisor import Supervisor, question_event_fields
from makima.tasks import stop_orphaned_tasks
from makima.validation import (
    LoadedSupervisor,
    fresh_state,
    generate_restoration_context_message,
    questions_to_record,
    repair_state,
    settled_state,
    validate_supervisor_state,
)

log = structlog.get_logger("makima.restoration")

HISTORY_LIMIT = 50


@dataclass(frozen=True, slots=True)
class Restorer:
    """What restoration works with: the store, the event bus and the settings."""

    store: Store
    bus: EventBus
    task_restart_policy: TaskRestartPolicy
    faults: FaultHook = field(default_factory=lambda: FaultHook(None))


class Outcome(enum.StrEnum):
    """How one restoration went, for the startup report."""

    RESTORED = "restored"
    REPAIRED = "repaired"
    REVERTED = "reverted"
    FRESH = "fresh"
    FAILED = "failed"


_OUTCOME = {
    None: Outcome.RESTORED,
    StateRecoveryAction.REPAIR: Outcome.REPAIRED,
    StateRecoveryAction.REVERT_TO_CHECKPOINT: Outcome.REVERTED,
    StateRecoveryAction.START_FRESH: Outcome.FRESH,
    StateRecoveryAction.MARK_FAILED: Outcome.FAILED,
}


@dataclass
class Plan:
    """Everything decided for one supervisor, ready to write and launch."""

    loaded: LoadedSupervisor
    source: RestorationSource
    validation: StateValidationResult
    state: SupervisorState
    tasks: list[TaskRecord]
    rerun: list[TaskRecord] = field(default_factory=list)
    history: list[Any] = field(default_factory=list)
    undelivered: list[QuestionRecord] = field(default_factory=list)
    outcome: Outcome = Outcome.RESTORED
    restoration_count: int = 0
    context_message: str = ""
    crash: str | None = None  # restoring it raised: it is marked failed with this
    redelivered: bool = False  # its open questions were counted re-delivered at startup
    fence: Fence = NO_FENCE  # the owner and lease epoch it is restored under
    lost: bool = False  # another daemon claimed it meanwhile: not launched here

    def stamped(self) -> None:
        """Its state carries its fence: what this daemon writes is checked against it."""
        if Fence.of(self.state) != self.fence:
            self.state = dataclasses.replace(
                self.state, owner_daemon_id=self.fence.owner, lease_epoch=self.fence.epoch
            )

    @property
    def supervisor_id(self) -> uuid.UUID:
        return self.loaded.spec.supervisor_id

    @property
    def launches(self) -> bool:
        return self.state.state.is_unfinished and not self.lost


# --------------------------------------------------------------------------- loading (step 2)


async def load(
    restorer: Restorer, supervisor_ids: Sequence[uuid.UUID] | None = None
) -> list[LoadedSupervisor]:
    """Load unfinished supervisors in bulk (all of them, or the ones named)."""
    store = restorer.store
    if supervisor_ids is None:
        rows = await store.load_unfinished_states()
        states = {sid: value for sid, value in rows}
        without_state = await store.load_specs_without_state()
        ids = [*states, *(s.supervisor_id for s in without_state)]
    else:
        ids = list(supervisor_ids)
        states = {sid: value for sid, value in await store.load_states(ids)}
    specs = await store.load_specs(ids)
    tasks = await store.load_tasks(ids)
    questions = await store.load_questions(ids)
    checkpointed = await store.load_checkpointed(ids)
    loaded: list[LoadedSupervisor] = []
    for sid in ids:
        spec = specs.get(sid)
        if spec is None:
            log.warning("restoration.state_without_spec", supervisor_id=str(sid))
            continue
        value = states.get(sid)
        loaded.append(
            LoadedSupervisor(
                spec=spec,
                state=value if isinstance(value, SupervisorState) else None,
                tasks=tuple(tasks.get(sid, ())),
                questions=tuple(questions.get(sid, ())),
                load_error=str(value) if isinstance(value, InvalidValueError) else None,
                has_checkpoint=sid in checkpointed,
            )
        )
    return loaded


async def load_guarded(
    restorer: Restorer, supervisor_ids: Sequence[uuid.UUID] | None = None
) -> tuple[list[LoadedSupervisor], list[tuple[uuid.UUID, str]]]:
    """:func:`load`, with the crash boundary: when a row cannot be read, the load
    goes one supervisor at a time, and those whose rows cannot be read come back
    apart, with why (they are then marked failed)."""
    try:
        return await load(restorer, supervisor_ids), []
    except InvalidValueError as exc:
        log.warning("restoration.bulk_load_failed", error=str(exc))
    ids = supervisor_ids
    if ids is None:
        ids = await restorer.store.load_unfinished_ids()
    loaded: list[LoadedSupervisor] = []
    unreadable: list[tuple[uuid.UUID, str]] = []
    for sid in ids:
        try:
            loaded.extend(await load(restorer, [sid]))
        except InvalidValueError as exc:
            log.exception(
                "supervisor.crashed", supervisor_id=str(sid), during="loading", error=str(exc)
            )
            unreadable.append((sid, f"its saved rows cannot be read: {exc}"))
    return loaded, unreadable


async def fail_unreadable(
    restorer: Restorer, supervisor_id: uuid.UUID, reason: str, fence: Fence = NO_FENCE
) -> None:
    """Mark failed a supervisor whose rows cannot be read (its state row is rewritten,
    under ``fence``)."""
    state = dataclasses.replace(
        fresh_state(supervisor_id, None),
        state=S.FAILED,
        error_message=reason,
        owner_daemon_id=fence.owner,
        lease_epoch=fence.epoch,
    )
    try:
        await restorer.store.restore_state(StateRestored(state))
    except MakimaError as exc:
        log.warning(
            "restoration.failed_state_not_saved", supervisor_id=str(supervisor_id), error=str(exc)
        )


# ------------------------------------------------------------ deciding and writing (3-8)


async def plan(
    restorer: Restorer,
    loaded: LoadedSupervisor,
    source: RestorationSource,
    prefetched: Prefetched | None = None,
    fence: Fence = NO_FENCE,
) -> Plan:
    """Steps 3 to 8 for one supervisor, under ``fence`` (the claim it is restored
    under). ``prefetched``: what a startup read for every supervisor at once (their
    history; their orphaned tasks already stopped)."""
    store = restorer.store
    sid = loaded.spec.supervisor_id
    restorer.faults.reached(SavePoint.RESTORE, Moment.BEFORE_COMMIT, loaded.spec.name)
    validation = validate_supervisor_state(loaded)
    action = validation.recovery_action
    if loaded.state is None and loaded.load_error is None:
        log.warning("restoration.no_state_row", supervisor_id=str(sid), action="start_fresh")
        restorer.bus.publish(
            EventKind.SUPERVISOR_WARNING,
            supervisor_id=str(sid),
            warning="no saved state was found; starting fresh",
        )
    state: SupervisorState
    questions = list(loaded.questions)
    if action is None:
        assert loaded.state is not None
        state = loaded.state
    elif action is StateRecoveryAction.REPAIR:
        assert loaded.state is not None
        state = await _repaired(restorer, loaded.state, loaded.tasks, questions, fence)
    elif action is StateRecoveryAction.REVERT_TO_CHECKPOINT:
        checkpoint = None
        try:
            checkpoint = await store.load_latest_checkpoint(sid)
        except InvalidValueError as exc:
            log.warning("restoration.checkpoint_unreadable", supervisor_id=str(sid), error=str(exc))
        if checkpoint is None:
            action = StateRecoveryAction.START_FRESH
            validation = StateValidationResult(False, validation.issues, action)
            state = fresh_state(sid, None, questions)
        else:
            state = await _repaired(restorer, checkpoint.snapshot, loaded.tasks, questions, fence)
    elif action is StateRecoveryAction.START_FRESH:
        state = fresh_state(sid, loaded.state, questions)
    else:  # MARK_FAILED
        base = loaded.state or fresh_state(sid, None)
        state = dataclasses.replace(
            base,
            state=S.FAILED,
            error_message="could not be restored: " + "; ".join(validation.issues),
        )
    result = Plan(
        loaded,
        source,
        validation,
        state,
        list(loaded.tasks),
        outcome=_OUTCOME[action],
        fence=fence,
    )
    result.stamped()
    if not result.launches:
        return result
    # Step 8: tasks that were running when the agent or daemon stopped. After a crash
    # their rows still say so; a clean stop marked them interrupted, and those (since
    # the last restoration: no restored agent has been told of them) count the same.
    # Without a readable state row that moment is unknown: only the crash case applies.
    rerun = restorer.task_restart_policy is TaskRestartPolicy.RERUN
    if rerun and loaded.state is not None:
        since = loaded.state.last_restored_at
        requeued = await store.requeue_tasks(TasksRequeued(sid, since, fence))
        by_id = {t.task_id: t for t in requeued}
        result.tasks = [by_id.get(t.task_id, t) for t in result.tasks]
    unfinished = [t for t in result.tasks if not t.status.is_finished]
    if unfinished:
        # A crashed daemon left these processes running: stop them first.
        if prefetched is None:
            await anyio.to_thread.run_sync(
                stop_orphaned_tasks, {str(t.task_id) for t in unfinished}
            )
        if rerun:
            result.rerun = unfinished
        else:
            interrupted = await store.end_tasks(TasksEnded(sid, TaskStatus.INTERRUPTED, fence))
            by_id = {t.task_id: t for t in interrupted}
            result.tasks = [by_id.get(t.task_id, t) for t in result.tasks]
    # Step 10's "resume from the last state", settled against the pending work.
    settled = settled_state(result.state, result.tasks)
    if result.state.state is S.INTERRUPTED or settled is not result.state.state:
        result.state = dataclasses.replace(
            result.state,
            state=settled,
            error_message=result.state.error_message if settled is S.BLOCKED else None,
        )
    # Steps 6 and 7: history, answers that never reached the agent.
    result.history = (
        await store.load_history(sid, HISTORY_LIMIT)
        if prefetched is None
        else prefetched.histories.get(sid, [])
    )
    answered = {
        q.question_id: q for q in questions if q.answer is not None and q.delivered_at is None
    }
    result.undelivered = sorted(answered.values(), key=lambda q: q.answered_at or q.asked_at)
    return result


async def _repaired(
    restorer: Restorer,
    state: SupervisorState,
    tasks: Sequence[TaskRecord],
    questions: list[QuestionRecord],
    fence: Fence,
) -> SupervisorState:
    missing = questions_to_record(state, questions)
    if missing:
        await restorer.store.repair_question_rows(
            QuestionRowsRepaired(state.supervisor_id, tuple(missing), fence)
        )
        questions.extend(
            QuestionRecord(q.id, state.supervisor_id, q.question, q.choices, q.context, q.asked_at)
            for q in missing
        )
    return repair_state(state, tasks, questions)


def crashed_plan(
    loaded: LoadedSupervisor,
    source: RestorationSource,
    exc: BaseException,
    fence: Fence = NO_FENCE,
) -> Plan:
    """The plan for a supervisor whose restoration raised: it is marked failed."""
    reason = crash_reason(exc, "restoring it")
    base = loaded.state or fresh_state(loaded.spec.supervisor_id, None)
    state = dataclasses.replace(base, state=S.FAILED, error_message=reason)
    validation = StateValidationResult(False, (reason,), StateRecoveryAction.MARK_FAILED)
    p = Plan(
        loaded,
        source,
        validation,
        state,
        list(loaded.tasks),
        outcome=Outcome.FAILED,
        crash=reason,
        fence=fence,
    )
    p.stamped()
    return p


@dataclass(frozen=True, slots=True)
class Prefetched:
    """What a startup reads and does for every supervisor at once, before planning."""

    histories: Mapping[uuid.UUID, list[MessageRecord]]


async def prefetch(restorer: Restorer, loaded: Sequence[LoadedSupervisor]) -> Prefetched:
    """Every supervisor's recent history in one statement, and every task a crashed
    daemon left running stopped in one scan of the process table."""
    ids = [item.spec.supervisor_id for item in loaded]
    histories = await restorer.store.load_histories(ids, HISTORY_LIMIT)
    orphans = {str(t.task_id) for item in loaded for t in item.tasks if not t.status.is_finished}
    if orphans:
        await anyio.to_thread.run_sync(stop_orphaned_tasks, orphans)
    return Prefetched(histories)


async def plan_guarded(
    restorer: Restorer,
    loaded: LoadedSupervisor,
    source: RestorationSource,
    prefetched: Prefetched | None = None,
    fence: Fence = NO_FENCE,
) -> Plan:
    """:func:`plan`, with the crash boundary: an unexpected error fails this one only
    (a FencedError goes on: the supervisor is another daemon's now)."""
    try:
        return await plan(restorer, loaded, source, prefetched, fence)
    except FencedError:
        raise
    except Exception as exc:
        log.exception(
            "supervisor.crashed",
            supervisor_id=str(loaded.spec.supervisor_id),
            during="restoration",
            error=f"{type(exc).__name__}: {exc}",
        )
        return crashed_plan(loaded, source, exc, fence)


async def write(restorer: Restorer, plans: list[Plan]) -> None:
    """Save each decided state, then count the restorations (in bulk). A state that
    cannot be saved fails its own supervisor (the crash boundary), not the others."""
    store = restorer.store
    try:
        versions = await store.restore_states(StatesRestored(tuple(p.state for p in plans)))
    except Exception as exc:  # noqa: BLE001 - one bad state: save them one by one below
        if len(plans) > 1:
            log.warning("restoration.bulk_write_failed", error=f"{type(exc).__name__}: {exc}")
        versions = {}
    for index, p in enumerate(plans):
        if p.supervisor_id in versions:
            p.state = dataclasses.replace(p.state, version=versions[p.supervisor_id])
            continue
        try:
            version = await store.restore_state(StateRestored(p.state))
        except FencedError:
            _lost(p)
            continue
        except Exception as exc:
            if p.crash is None:
                log.exception(
                    "supervisor.crashed",
                    supervisor_id=str(p.supervisor_id),
                    during="saving its restored state",
                    error=f"{type(exc).__name__}: {exc}",
                )
                p = plans[index] = crashed_plan(p.loaded, p.source, exc, p.fence)
                try:
                    version = await store.restore_state(StateRestored(p.state))
                except FencedError:
                    _lost(p)
                    continue
                except Exception as second:  # noqa: BLE001 - the crash boundary
                    exc = second
                else:
                    p.state = dataclasses.replace(p.state, version=version)
                    continue
            # Not even failed could be saved: the row stays as it was, unlaunched.
            log.warning(
                "restoration.failed_state_not_saved",
                supervisor_id=str(p.supervisor_id),
                error=f"{type(exc).__name__}: {exc}",
            )
            continue
        p.state = dataclasses.replace(p.state, version=version)
    launched = [p for p in plans if p.launches]
    for source in {p.source for p in launched}:
        ids = [p.supervisor_id for p in launched if p.source is source]
        saved = {p.supervisor_id: p.state.version for p in launched if p.source is source}
        fences = {p.supervisor_id: p.fence for p in launched if p.source is source}
        # Counted once even when retried after a commit whose reply was lost: a retry
        # leaves the rows whose version moved past the one just saved.
        counts = await store.count_restorations(
            RestorationsCounted(tuple(ids), source, saved, fences)
        )
        for p in launched:
            if p.source is source and p.supervisor_id not in counts:
                _lost(p)  # claimed by another daemon since its state was written
            elif p.supervisor_id in counts:
                p.restoration_count, version = counts[p.supervisor_id]
                p.state = dataclasses.replace(
                    p.state,
                    restoration_count=p.restoration_count,
                    restoration_source=source,
                    version=version,
                )
    for p in launched:
        if p.lost:
            continue
        p.context_message = generate_restoration_context_message(
            p.loaded.spec,
            p.state,
            p.source,
            p.tasks,
            p.undelivered,
            p.validation,
            p.restoration_count,
        )


def _lost(p: Plan) -> None:
    p.lost = True
    log.warning(
        "restoration.taken_over",
        supervisor_id=str(p.supervisor_id),
        lease_epoch=p.fence.epoch,
        note="another daemon claimed it while it was being restored; it is not launched here",
    )


@dataclass(frozen=True, slots=True)
class StartPayload:
    """The ``restoration`` object of a ``start`` line, fitted to the line limit, and
    the undelivered answers that did not fit (sent as ``answer`` lines after it)."""

    restoration: dict[str, Any] | None
    answers_inline: tuple[QuestionRecord, ...] = ()
    answers_after: tuple[QuestionRecord, ...] = ()

    @property
    def given(self) -> tuple[uuid.UUID, ...]:
        """The answers the ``start`` line itself carries."""
        return tuple(q.question_id for q in self.answers_inline)


def start_payload(p: Plan, budget: int = LINE_BUDGET) -> StartPayload:
    """The ``restoration`` object of the agent's ``start`` message (step 9), fitted
    into ``budget`` bytes (with the rest of the ``start`` line)."""
    if p.outcome is Outcome.FRESH and not p.state.pending_questions:
        # A fresh start is a first start for the agent, unless questions it asked
        # are still open: then it gets them back, and asking again takes them.
        return StartPayload(None, answers_after=tuple(p.undelivered))
    context = SupervisorRestorationContext(
        supervisor_id=p.supervisor_id,
        source=p.source,
        restoration_count=p.restoration_count,
        context_message=p.context_message,
        state=p.state,
        history=tuple(p.history),
        tasks=tuple(p.tasks),
        undelivered_answers=tuple(p.undelivered),
    )
    spec = p.loaded.spec
    fixed = encoded_size([str(spec.supervisor_id), spec.name, spec.goal])
    return fit_restoration(context, budget - fixed)


def fit_restoration(context: SupervisorRestorationContext, budget: int) -> StartPayload:
    """Fit a restoration into ``budget`` bytes (pure).

    Whole, always: the state, the checkpoint and the open questions (bounded when
    saved: makima.limits). Then, while they fit: undelivered answers (the rest go
    after the ``start`` line), the briefing (cut if need be), unfinished tasks,
    then finished ones newest first, then history newest first. ``history_before``
    is the oldest seq sent (page back from it with a ``history`` request),
    ``history_more`` says whether older entries exist, ``tasks_omitted`` counts
    the tasks that did not fit.
    """
    full = context.to_json()
    history: list[dict[str, Any]] = full.pop("history")
    tasks: list[dict[str, Any]] = full.pop("tasks")
    answers: list[dict[str, Any]] = full.pop("undelivered_answers")
    message: str = full.pop("context_message")
    payload: dict[str, Any] = {
        **full,
        "context_message": "",
        "history": [],
        "history_before": None,
        "history_more": False,
        "undelivered_answers": [],
        "tasks": [],
        "tasks_omitted": 0,
    }
    if encoded_size(payload) > budget:
        # Saved before the limits (makima.limits) existed: cut what can be cut.
        for key in ("phase", "current_activity"):
            if isinstance(payload[key], str):
                payload[key] = _cut_text(payload[key], TEXT_LIMIT)
        if encoded_size(payload) > budget:
            payload["checkpoint"] = None
            payload["checkpoint_omitted"] = True
    left = budget - encoded_size(payload)
    inline: list[QuestionRecord] = []
    after: list[QuestionRecord] = []
    for record, item in zip(context.undelivered_answers, answers, strict=True):
        size = encoded_size(item) + 1
        if size <= left:
            payload["undelivered_answers"].append(item)
            inline.append(record)
            left -= size
        else:
            after.append(record)
    cut = _cut_text(message, left)
    payload["context_message"] = cut
    left -= encoded_size(cut) - 2
    finished = [i for i, task in enumerate(context.tasks) if task.status.is_finished]
    unfinished = [i for i, task in enumerate(context.tasks) if not task.status.is_finished]
    chosen: list[int] = []
    for index in [*unfinished, *reversed(finished)]:
        size = encoded_size(tasks[index]) + 1
        if size <= left:
            chosen.append(index)
            left -= size
    payload["tasks"] = [tasks[i] for i in sorted(chosen)]
    payload["tasks_omitted"] = len(tasks) - len(chosen)
    kept: list[dict[str, Any]] = []
    for item in reversed(history):
        size = encoded_size(item) + 1
        if size > left:
            break
        kept.append(item)
        left -= size
    kept.reverse()
    payload["history"] = kept
    oldest = kept[0]["seq"] if kept else (history[-1]["seq"] + 1 if history else None)
    payload["history_before"] = oldest
    payload["history_more"] = oldest is not None and oldest > 1
    return StartPayload(payload, tuple(inline), tuple(after))


def _cut_text(text: str, budget: int) -> str:
    """``text``, cut to fit ``budget`` bytes once encoded (with a mark where it was cut)."""
    if encoded_size(text) <= budget:
        return text
    mark = "\n[… the rest did not fit in the start line]"
    if encoded_size(mark) > budget:
        return ""
    low, high = 0, len(text)  # the longest prefix that fits, by bisection
    while low < high:
        middle = (low + high + 1) // 2
        if encoded_size(text[:middle] + mark) <= budget:
            low = middle
        else:
            high = middle - 1
    return text[:low] + mark


def info(p: Plan) -> RestorationInfo:
    return RestorationInfo(
        supervisor_id=p.supervisor_id,
        source=p.source,
        restoration_count=p.restoration_count,
        validation=p.validation,
        redelivered_question_ids=tuple(q.id for q in p.state.pending_questions),
        waiting_task_ids=tuple(t.task_id for t in p.rerun)
        if p.state.state is S.WAITING_FOR_TASKS
        else tuple(t.task_id for t in p.tasks if not t.status.is_finished),
        context_message=p.context_message,
    )


# ------------------------------------------------------------ after the start message (7, 8)


def after_start(
    restorer: Restorer, supervisor: Supervisor, p: Plan, payload: StartPayload
) -> Callable[[], Awaitable[None]]:
    """What happens once the agent has its ``start`` message."""
    pending: list[PendingQuestion] = [] if p.redelivered else list(p.state.pending_questions)
    inline = [q.question_id for q in payload.answers_inline]
    rerun = list(p.rerun)
    fence = p.fence

    async def run() -> None:
        store = restorer.store
        if inline:
            await store.deliver_answers(AnswersDelivered(tuple(inline), supervisor.id, fence))
        for record in payload.answers_after:
            await supervisor.deliver_answer(record)
        if pending:
            await store.count_redeliveries(
                QuestionsRedelivered(tuple(q.id for q in pending), (fence,) * len(pending))
            )
            for question in pending:
                restorer.bus.publish(
                    EventKind.QUESTION_REDELIVERED,
                    **question_event_fields(question, supervisor.id),
                    source=p.source.value,
                )
        for task in rerun:
            await supervisor.rerun_task(task)
        restorer.bus.publish(
            EventKind.SUPERVISOR_RESTORED,
            supervisor_id=str(supervisor.id),
            name=supervisor.spec.name,
            source=p.source.value,
            restoration_count=p.restoration_count,
            outcome=p.outcome.value,
            state=supervisor.state.state.value,
        )

    return run


# --------------------------------------------------------------------------- entry points


@dataclass(frozen=True, slots=True)
class Claimed:
    """A supervisor this daemon may restore: what brought it here, and the fence
    (owner and lease epoch) it claimed it under."""

    source: RestorationSource
    fence: Fence


async def restore_all(
    restorer: Restorer,
    claims: Mapping[uuid.UUID, Claimed],
    *,
    stateless_owner: uuid.UUID | None = None,
    refused: Sequence[tuple[uuid.UUID, str]] = (),
) -> tuple[dict[str, Any], list[Plan]]:
    """Restore the supervisors this daemon claimed (at its start, or taken over from
    a daemon whose lease expired), and, with ``stateless_owner`` (a start), the specs
    that have no state row at all (they start fresh, owned by it). Returns the
    report and the plans whose agents are to be launched. A supervisor whose
    restoration raises is reported failed; it never stops the others; one claimed
    by another daemon meanwhile is left to it. ``refused``: those the database
    would not hand over (claimed as failed instead), reported failed."""
    claimed = dict(claims)
    if stateless_owner is not None:
        for spec in await restorer.store.load_specs_without_state():
            claimed.setdefault(
                spec.supervisor_id,
                Claimed(RestorationSource.DAEMON_RESTART, Fence(stateless_owner, 1)),
            )
    loaded: list[LoadedSupervisor] = []
    unreadable: list[tuple[uuid.UUID, str]] = []
    if claimed:
        loaded, unreadable = await load_guarded(restorer, list(claimed))
    for sid, reason in unreadable:
        await fail_unreadable(restorer, sid, reason, claimed[sid].fence)
    prefetched = await prefetch(restorer, loaded)
    plans: list[Plan] = []
    for item in loaded:
        claim = claimed[item.spec.supervisor_id]
        try:
            plans.append(await plan_guarded(restorer, item, claim.source, prefetched, claim.fence))
        except FencedError:
            log.warning(
                "restoration.taken_over",
                supervisor_id=str(item.spec.supervisor_id),
                lease_epoch=claim.fence.epoch,
            )
    await write(restorer, plans)
    plans = [p for p in plans if not p.lost]
    await redeliver(restorer, [p for p in plans if p.launches])
    report: dict[str, Any] = {o.value: [] for o in Outcome}
    for p in plans:
        entry = {
            "supervisor_id": str(p.supervisor_id),
            "name": p.loaded.spec.name,
            "state": p.state.state.value,
            "issues": list(p.validation.issues),
        }
        report[p.outcome.value].append(entry)
        log.info(
            "restoration.done",
            supervisor_id=str(p.supervisor_id),
            outcome=p.outcome.value,
            state=p.state.state.value,
            restoration_count=p.restoration_count,
            issues=list(p.validation.issues),
            pending_questions=len(p.state.pending_questions),
            undelivered_answers=len(p.undelivered),
        )
    for sid, reason in [*unreadable, *refused]:
        report[Outcome.FAILED.value].append(
            {"supervisor_id": str(sid), "name": None, "state": S.FAILED.value, "issues": [reason]}
        )
    report["counts"] = {o.value: len(report[o.value]) for o in Outcome}
    log.info("restoration.startup_report", **report["counts"])
    return report, [p for p in plans if p.launches]


async def redeliver(restorer: Restorer, plans: Sequence[Plan]) -> None:
    """Every open question of a startup delivered again, at once, before READY: counted
    in one statement and announced. The agents get theirs in their ``start`` lines."""
    questions = [(p, q) for p in plans for q in p.state.pending_questions]
    if questions:
        await restorer.store.count_redeliveries(
            QuestionsRedelivered(
                tuple(q.id for _, q in questions), tuple(p.fence for p, _ in questions)
            )
        )
    for p, question in questions:
        restorer.bus.publish(
            EventKind.QUESTION_REDELIVERED,
            **question_event_fields(question, p.supervisor_id),
            source=p.source.value,
        )
    for p in plans:
        p.redelivered = True


async def restore_one(
    restorer: Restorer, supervisor_id: uuid.UUID, source: RestorationSource, fence: Fence
) -> Plan:
    """Run steps 2 to 8 and write step 10 for one supervisor (resume, agent restart),
    under ``fence`` (the one it runs under here). A plan that raises is written as
    failed, and does not launch; FencedError when another daemon owns it now."""
    loaded, unreadable = await load_guarded(restorer, [supervisor_id])
    for sid, reason in unreadable:
        await fail_unreadable(restorer, sid, reason, fence)
        raise NotFoundError(f"supervisor {sid} cannot be restored: {reason}")
    if not loaded:
        raise NotFoundError(f"supervisor {supervisor_id} has nothing to restore")
    p = await plan_guarded(restorer, loaded[0], source, fence=fence)
    await write(restorer, [p])
    if p.lost:
        raise FencedError(supervisor_id, "its restoration")
    return p

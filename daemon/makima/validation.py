"""Pure decisions of restoration: is a loaded state valid, what to do when it
is not, how to repair it, and the briefing an agent reads when it comes back.

No I/O: everything here takes values loaded by the store and returns
values the restoration flow writes.
"""

from __future__ import annotations

import dataclasses
import uuid
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass

from makima.model import (
    PendingQuestion,
    QuestionRecord,
    RestorationSource,
    SpawnedTaskConsistency,
    StateRecoveryAction,
    StateValidationResult,
    SupervisorSpec,
    SupervisorState,
    TaskRecord,
)
from makima.model import (
    SupervisorStateEnum as S,
)


@dataclass(frozen=True, slots=True)
class LoadedSupervisor:
    """What restoration knows about one supervisor before deciding."""

    spec: SupervisorSpec
    state: SupervisorState | None  # None: no state row (or unreadable, see load_error)
    tasks: tuple[TaskRecord, ...] = ()
    questions: tuple[QuestionRecord, ...] = ()  # every question of the supervisor
    load_error: str | None = None  # the state row exists but could not be read
    has_checkpoint: bool = False


def task_consistency(state: SupervisorState, tasks: Sequence[TaskRecord]) -> SpawnedTaskConsistency:
    """In-memory twin of the SQL check ``validate_spawned_tasks``."""
    listed = dict.fromkeys(state.spawned_task_ids)  # ordered and O(1) to look up
    present = {t.task_id for t in tasks}
    return SpawnedTaskConsistency(
        missing_task_rows=tuple(sorted((t for t in listed if t not in present), key=str)),
        unlisted_task_ids=tuple(sorted((t for t in present if t not in listed), key=str)),
    )


def validate_supervisor_state(loaded: LoadedSupervisor) -> StateValidationResult:
    """Check every rule of DESIGN §7 step 4 and choose a recovery action."""
    if not loaded.spec.agent_command or not loaded.spec.agent_command[0]:
        return StateValidationResult(
            False,
            ("the supervisor has no agent command to run",),
            StateRecoveryAction.MARK_FAILED,
        )
    if loaded.load_error is not None:
        action = (
            StateRecoveryAction.REVERT_TO_CHECKPOINT
            if loaded.has_checkpoint
            else StateRecoveryAction.START_FRESH
        )
        return StateValidationResult(
            False, (f"the state row is unreadable: {loaded.load_error}",), action
        )
    state = loaded.state
    if state is None:
        return StateValidationResult(False, ("no state row",), StateRecoveryAction.START_FRESH)
    issues = state_issues(state, loaded.tasks, loaded.questions)
    if not issues:
        return StateValidationResult(True)
    return StateValidationResult(False, tuple(issues), StateRecoveryAction.REPAIR)


def state_issues(
    state: SupervisorState,
    tasks: Sequence[TaskRecord],
    questions: Sequence[QuestionRecord],
) -> list[str]:
    """Every rule a readable state may break (all repairable)."""
    issues: list[str] = []
    if not 0 <= state.progress <= 100:
        issues.append(f"progress {state.progress} is outside 0..100")
    ids = [q.id for q in state.pending_questions]
    duplicates = sorted(str(i) for i, n in Counter(ids).items() if n > 1)
    if duplicates:
        issues.append(f"pending question ids repeat: {', '.join(duplicates)}")
    by_id = {q.question_id: q for q in questions}
    for pending in state.pending_questions:
        record = by_id.get(pending.id)
        if record is None:
            issues.append(f"pending question {pending.id} has no row in questions")
        elif record.is_answered:
            issues.append(f"pending question {pending.id} was already answered")
    if state.state.is_unfinished:
        listed = set(ids)
        for record in questions:
            if not record.is_answered and record.question_id not in listed:
                issues.append(f"question {record.question_id} is unanswered but not pending")
    if state.state is S.WAITING_FOR_USER and not state.pending_questions:
        issues.append("state is waiting_for_user but no question is pending")
    unfinished = [t for t in tasks if not t.status.is_finished]
    if state.state is S.WAITING_FOR_TASKS and not unfinished:
        issues.append("state is waiting_for_tasks but no spawned task is unfinished")
    consistency = task_consistency(state, tasks)
    if consistency.missing_task_rows:
        issues.append(
            "spawned task ids without a task row: "
            + ", ".join(str(t) for t in consistency.missing_task_rows)
        )
    if consistency.unlisted_task_ids:
        issues.append(
            "task rows missing from spawned_task_ids: "
            + ", ".join(str(t) for t in consistency.unlisted_task_ids)
        )
    if len(set(state.spawned_task_ids)) != len(state.spawned_task_ids):
        issues.append("spawned task ids repeat")
    if state.state is S.FAILED and not state.error_message:
        issues.append("state is failed but error_message is empty")
    return issues


def settled_state(state: SupervisorState, tasks: Sequence[TaskRecord]) -> S:
    """The state an unfinished supervisor resumes in, derived from its pending work."""
    if state.pending_questions:
        return S.WAITING_FOR_USER
    if state.state is S.WAITING_FOR_TASKS and any(not t.status.is_finished for t in tasks):
        return S.WAITING_FOR_TASKS
    if state.state is S.BLOCKED:
        return S.BLOCKED
    return S.WORKING


def repair_state(
    state: SupervisorState,
    tasks: Sequence[TaskRecord],
    questions: Sequence[QuestionRecord],
) -> SupervisorState:
    """Fix what is fixable; the result always passes :func:`state_issues`
    when the missing question rows are recorded (see ``questions_to_record``)."""
    by_id = {q.question_id: q for q in questions}
    seen: set[uuid.UUID] = set()
    pending: list[PendingQuestion] = []
    for question in state.pending_questions:
        record = by_id.get(question.id)
        if question.id in seen or (record is not None and record.is_answered):
            continue
        seen.add(question.id)
        pending.append(question)
    if state.state.is_unfinished:  # a question still open is never dropped
        pending += open_questions(questions, exclude=seen)
    # Listed ids that have a row, in their order, then the unlisted rows (linear).
    present = {t.task_id for t in tasks}
    listed = dict.fromkeys(t for t in state.spawned_task_ids if t in present)
    listed.update(dict.fromkeys(t.task_id for t in tasks))
    repaired = dataclasses.replace(
        state,
        progress=min(100, max(0, state.progress)),
        pending_questions=tuple(pending),
        spawned_task_ids=tuple(listed),
    )
    new_state = settled_state(repaired, tasks) if repaired.state.is_unfinished else repaired.state
    error = repaired.error_message
    if new_state is S.FAILED and not error:
        error = "failed (no reason was recorded)"
    return dataclasses.replace(repaired, state=new_state, error_message=error)


def questions_to_record(
    state: SupervisorState, questions: Sequence[QuestionRecord]
) -> list[PendingQuestion]:
    """Pending questions that have no row in ``questions`` (repair records them)."""
    known = {q.question_id for q in questions}
    return [q for q in state.pending_questions if q.id not in known]


def open_questions(
    questions: Sequence[QuestionRecord], exclude: set[uuid.UUID] | None = None
) -> list[PendingQuestion]:
    """The unanswered questions (but those in ``exclude``), oldest first."""
    skip = exclude or set()
    records = [q for q in questions if not q.is_answered and q.question_id not in skip]
    return [q.pending() for q in sorted(records, key=lambda q: (q.asked_at, str(q.question_id)))]


def fresh_state(
    supervisor_id: uuid.UUID,
    previous: SupervisorState | None,
    questions: Sequence[QuestionRecord] = (),
) -> SupervisorState:
    """A new beginning that keeps the restoration bookkeeping and the questions still
    open: a person may be answering one, and the agent gets it back by asking again."""
    return SupervisorState(
        supervisor_id=supervisor_id,
        state=S.INITIALIZING,
        pending_questions=tuple(open_questions(questions)),
        restoration_count=previous.restoration_count if previous else 0,
        last_restored_at=previous.last_restored_at if previous else None,
        restoration_source=previous.restoration_source if previous else None,
    )


_REASONS = {
    RestorationSource.DAEMON_RESTART: "the makima daemon restarted (after a crash or a shutdown)",
    RestorationSource.TASK_REASSIGNMENT: "another makima daemon took over this supervisor",
    RestorationSource.MANUAL: "a person asked makima to resume this supervisor",
    RestorationSource.AGENT_RESTART: (
        "your previous agent process exited without reporting done or fail"
    ),
}


def generate_restoration_context_message(
    spec: SupervisorSpec,
    state: SupervisorState,
    source: RestorationSource,
    tasks: Sequence[TaskRecord],
    undelivered_answers: Sequence[QuestionRecord] = (),
    validation: StateValidationResult | None = None,
    restoration_count: int | None = None,
) -> str:
    """A plain-text briefing an LLM agent can act on after coming back."""
    count = restoration_count if restoration_count is not None else state.restoration_count
    lines = [
        f"You are resuming supervisor {spec.name!r} ({spec.supervisor_id}).",
        f"Why: {_REASONS[source]}. This is restoration number {count}.",
    ]
    if spec.goal:
        lines.append(f"Goal: {spec.goal}")
    lines.append(
        f"Where you were: state {state.state.value}, phase {state.phase or '(none)'}, "
        f"progress {state.progress}%."
    )
    if state.current_activity:
        lines.append(f"Last activity: {state.current_activity}")
    if validation is not None and not validation.is_valid and validation.recovery_action:
        lines.append(
            f"The saved state needed recovery ({validation.recovery_action.value}): "
            + "; ".join(validation.issues)
        )
    if state.pending_questions:
        lines.append(
            "Open questions (already asked; do not ask them again, their answers will arrive):"
        )
        for q in state.pending_questions:
            choices = f" [choices: {', '.join(q.choices)}]" if q.choices else ""
            lines.append(f"  - {q.id}: {q.question}{choices}")
    else:
        lines.append("No question is waiting for a person.")
    if undelivered_answers:
        lines.append("Answers that arrived while you were away:")
        for a in undelivered_answers:
            lines.append(f"  - {a.question_id}: {a.question} -> {a.answer}")
    if tasks:
        lines.append("Tasks you spawned:")
        for t in tasks:
            code = "" if t.exit_code is None else f", exit code {t.exit_code}"
            lines.append(f"  - {t.name} ({t.task_id}): {t.status.value}{code}")
        interrupted = [t for t in tasks if t.status.value == "interrupted"]
        if interrupted:
            lines.append(
                "Interrupted tasks did not finish; spawn them again if you still need them."
            )
    else:
        lines.append("You have not spawned any task.")
    if state.checkpoint_data is not None:
        lines.append("Your last checkpoint data is in restoration.checkpoint.")
    lines.append("Continue from where you left off.")
    return "\n".join(lines)

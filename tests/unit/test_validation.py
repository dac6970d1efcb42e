"""The pure decisions of restoration (DESIGN §7 steps 3-5 and 9): validation,
the recovery action, repair, and the briefing an agent reads when it comes back.

No database, no I/O: every test builds values and calls ``makima.validation``.
"""

from __future__ import annotations

import dataclasses
import uuid
from collections.abc import Sequence
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from makima.errors import InvalidValueError
from makima.model import (
    PendingQuestion,
    QuestionRecord,
    RestorationSource,
    StateRecoveryAction,
    StateValidationResult,
    SupervisorSpec,
    SupervisorState,
    TaskRecord,
    TaskStatus,
)
from makima.model import SupervisorStateEnum as S
from makima.validation import (
    LoadedSupervisor,
    fresh_state,
    generate_restoration_context_message,
    questions_to_record,
    repair_state,
    settled_state,
    state_issues,
    task_consistency,
    validate_supervisor_state,
)

NOW = datetime(2026, 1, 2, 3, 4, 5, tzinfo=UTC)
SID = uuid.UUID("00000000-0000-4000-8000-000000000001")
REPAIR = StateRecoveryAction.REPAIR
FINISHED = [s for s in TaskStatus if s.is_finished]
UNFINISHED_TASK = [s for s in TaskStatus if not s.is_finished]


# --------------------------------------------------------------------------- builders


def uid(n: int) -> uuid.UUID:
    return uuid.UUID(int=n)


def spec(**changes: Any) -> SupervisorSpec:
    base = SupervisorSpec(
        supervisor_id=SID, name="nightly-build", agent_command=("agent", "--run"), goal="ship it"
    )
    return dataclasses.replace(base, **changes)


def state(**changes: Any) -> SupervisorState:
    changes.setdefault("state", S.WORKING)
    return SupervisorState(supervisor_id=SID, **changes)


def task(task_id: uuid.UUID, status: TaskStatus = TaskStatus.RUNNING, **changes: Any) -> TaskRecord:
    return TaskRecord(
        task_id=task_id,
        supervisor_id=SID,
        name=f"task-{task_id.int}",
        command=("make", "test"),
        status=status,
        **changes,
    )


def pq(
    question_id: uuid.UUID, text: str = "Deploy?", choices: Sequence[str] = ()
) -> PendingQuestion:
    return PendingQuestion(id=question_id, question=text, choices=tuple(choices), asked_at=NOW)


def qrec(question_id: uuid.UUID, answer: str | None = None, **changes: Any) -> QuestionRecord:
    return QuestionRecord(
        question_id=question_id,
        supervisor_id=SID,
        question="Deploy?",
        choices=(),
        context=None,
        asked_at=NOW,
        answer=answer,
        answered_at=None if answer is None else NOW + timedelta(minutes=1),
        **changes,
    )


def unchecked(value: Any, **fields: Any) -> Any:
    """Set fields of a frozen value without its constructor's checks: a value
    the database should never hold but validation must still catch."""
    for name, item in fields.items():
        object.__setattr__(value, name, item)
    return value


def loaded(
    st_: SupervisorState | None,
    tasks: Sequence[TaskRecord] = (),
    questions: Sequence[QuestionRecord] = (),
    **changes: Any,
) -> LoadedSupervisor:
    return LoadedSupervisor(
        spec=changes.pop("spec", spec()),
        state=st_,
        tasks=tuple(tasks),
        questions=tuple(questions),
        **changes,
    )


def one_issue(result: StateValidationResult, *words: str) -> str:
    """The single issue of an invalid result; it names the problem in ``words``."""
    assert not result.is_valid
    assert len(result.issues) == 1, result.issues
    issue = result.issues[0]
    for word in words:
        assert word in issue, (word, issue)
    return issue


def record(
    questions: Sequence[QuestionRecord], missing: Sequence[PendingQuestion]
) -> list[QuestionRecord]:
    """What restoration does with ``questions_to_record``: write unanswered rows."""
    return [
        *questions,
        *(QuestionRecord(q.id, SID, q.question, q.choices, q.context, q.asked_at) for q in missing),
    ]


# --------------------------------------------------------------------------- valid states


def test_a_valid_state_has_no_issue_and_no_action() -> None:
    q, t1, t2 = uid(1), uid(2), uid(3)
    st_ = state(
        state=S.WAITING_FOR_USER,
        progress=40,
        spawned_task_ids=(t1, t2),
        pending_questions=(pq(q),),
    )
    tasks = [task(t1, TaskStatus.SUCCEEDED), task(t2, TaskStatus.RUNNING)]
    result = validate_supervisor_state(loaded(st_, tasks, [qrec(q), qrec(uid(9), "yes")]))
    assert result == StateValidationResult(True)
    assert result.issues == ()
    assert result.recovery_action is None
    assert state_issues(st_, tasks, [qrec(q)]) == []


@pytest.mark.parametrize("s", [s for s in S if s not in (S.WAITING_FOR_USER, S.WAITING_FOR_TASKS)])
def test_every_plain_state_is_valid_without_pending_work(s: S) -> None:
    st_ = state(state=s, error_message="boom" if s is S.FAILED else None)
    assert validate_supervisor_state(loaded(st_)) == StateValidationResult(True)


def test_waiting_for_tasks_with_one_unfinished_task_is_valid() -> None:
    t1, t2 = uid(1), uid(2)
    st_ = state(state=S.WAITING_FOR_TASKS, spawned_task_ids=(t1, t2))
    tasks = [task(t1, TaskStatus.FAILED), task(t2, TaskStatus.PENDING)]
    assert validate_supervisor_state(loaded(st_, tasks)).is_valid


# --------------------------------------------------------------------------- one test per rule


def test_no_state_row_starts_fresh() -> None:
    result = validate_supervisor_state(loaded(None))
    assert one_issue(result, "no state row")
    assert result.recovery_action is StateRecoveryAction.START_FRESH


def test_no_state_row_starts_fresh_even_with_a_checkpoint() -> None:
    result = validate_supervisor_state(loaded(None, has_checkpoint=True))
    assert result.recovery_action is StateRecoveryAction.START_FRESH


def test_unreadable_row_reverts_to_checkpoint_when_there_is_one() -> None:
    result = validate_supervisor_state(
        loaded(None, load_error="state must be one of …; got 'dancing'", has_checkpoint=True)
    )
    one_issue(result, "unreadable", "got 'dancing'")
    assert result.recovery_action is StateRecoveryAction.REVERT_TO_CHECKPOINT


def test_unreadable_row_starts_fresh_without_a_checkpoint() -> None:
    result = validate_supervisor_state(loaded(None, load_error="bad row", has_checkpoint=False))
    one_issue(result, "unreadable", "bad row")
    assert result.recovery_action is StateRecoveryAction.START_FRESH


def _row(**changes: Any) -> dict[str, Any]:
    row: dict[str, Any] = {
        "supervisor_id": str(SID),
        "state": "working",
        "phase": None,
        "current_activity": None,
        "progress": 0,
        "error_message": None,
        "spawned_task_ids": [],
        "pending_questions": [],
        "restoration_count": 0,
        "last_restored_at": None,
        "restoration_source": None,
        "checkpoint_data": None,
        "last_heartbeat": None,
        "version": 1,
        "owner_daemon_id": None,
        "lease_epoch": 0,
        "created_at": None,
        "updated_at": None,
    }
    row.update(changes)
    return row


@pytest.mark.parametrize(
    ("change", "named"),
    [
        ({"state": "dancing"}, "dancing"),  # state known
        ({"progress": 101}, "progress"),  # progress in range
        (  # pending question ids well formed
            {
                "pending_questions": [
                    {
                        "id": "nope",
                        "question": "q",
                        "choices": [],
                        "context": None,
                        "asked_at": NOW.isoformat(),
                    }
                ]
            },
            "nope",
        ),
    ],
)
def test_rules_enforced_when_reading_the_row_become_a_load_error(
    change: dict[str, Any], named: str
) -> None:
    """An unknown state, or a malformed pending question, cannot even be read:
    the repository hands the error over as ``load_error``."""
    with pytest.raises(InvalidValueError) as caught:
        SupervisorState.from_row(_row(**change))
    result = validate_supervisor_state(loaded(None, load_error=str(caught.value)))
    one_issue(result, "unreadable", named)
    assert result.recovery_action is StateRecoveryAction.START_FRESH


@pytest.mark.parametrize("progress", [-1, 101, 1000])
def test_progress_out_of_range_is_an_issue(progress: int) -> None:
    st_ = unchecked(state(), progress=progress)
    result = validate_supervisor_state(loaded(st_))
    one_issue(result, f"progress {progress}", "outside 0..100")
    assert result.recovery_action is REPAIR


def test_waiting_for_user_needs_a_pending_question() -> None:
    result = validate_supervisor_state(loaded(state(state=S.WAITING_FOR_USER)))
    one_issue(result, "waiting_for_user", "no question is pending")
    assert result.recovery_action is REPAIR


@pytest.mark.parametrize("statuses", [[], FINISHED])
def test_waiting_for_tasks_needs_an_unfinished_task(statuses: list[TaskStatus]) -> None:
    tasks = [task(uid(i + 1), s) for i, s in enumerate(statuses)]
    st_ = state(state=S.WAITING_FOR_TASKS, spawned_task_ids=tuple(t.task_id for t in tasks))
    result = validate_supervisor_state(loaded(st_, tasks))
    one_issue(result, "waiting_for_tasks", "no spawned task is unfinished")
    assert result.recovery_action is REPAIR


def test_spawned_task_id_without_a_task_row() -> None:
    ghost = uid(7)
    result = validate_supervisor_state(loaded(state(spawned_task_ids=(ghost,))))
    one_issue(result, "spawned task ids without a task row", str(ghost))
    assert result.recovery_action is REPAIR


def test_task_row_missing_from_spawned_task_ids() -> None:
    orphan = uid(8)
    result = validate_supervisor_state(loaded(state(), [task(orphan)]))
    one_issue(result, "task rows missing from spawned_task_ids", str(orphan))
    assert result.recovery_action is REPAIR


def test_spawned_task_ids_repeat() -> None:
    t = uid(3)
    result = validate_supervisor_state(loaded(state(spawned_task_ids=(t, t)), [task(t)]))
    one_issue(result, "spawned task ids repeat")
    assert result.recovery_action is REPAIR


def test_pending_question_ids_repeat() -> None:
    q = uid(4)
    st_ = state(state=S.WAITING_FOR_USER, pending_questions=(pq(q), pq(q, "again?")))
    result = validate_supervisor_state(loaded(st_, questions=[qrec(q)]))
    one_issue(result, "pending question ids repeat", str(q))
    assert result.recovery_action is REPAIR


def test_pending_question_without_a_questions_row() -> None:
    q = uid(5)
    st_ = state(state=S.WAITING_FOR_USER, pending_questions=(pq(q),))
    result = validate_supervisor_state(loaded(st_))
    one_issue(result, f"pending question {q}", "no row in questions")
    assert result.recovery_action is REPAIR


def test_pending_question_already_answered() -> None:
    q, open_q = uid(6), uid(60)
    st_ = state(state=S.WAITING_FOR_USER, pending_questions=(pq(q), pq(open_q)))
    result = validate_supervisor_state(loaded(st_, questions=[qrec(q, "yes"), qrec(open_q)]))
    one_issue(result, f"pending question {q}", "already answered")
    assert result.recovery_action is REPAIR


@pytest.mark.parametrize("message", [None, ""])
def test_failed_needs_an_error_message(message: str | None) -> None:
    result = validate_supervisor_state(loaded(state(state=S.FAILED, error_message=message)))
    one_issue(result, "failed", "error_message is empty")
    assert result.recovery_action is REPAIR


@pytest.mark.parametrize("command", [(), ("",)])
def test_a_spec_without_an_agent_command_is_marked_failed(command: tuple[str, ...]) -> None:
    bad = unchecked(spec(), agent_command=command)
    result = validate_supervisor_state(loaded(state(), spec=bad))
    one_issue(result, "no agent command")
    assert result.recovery_action is StateRecoveryAction.MARK_FAILED


def test_a_missing_command_wins_over_an_unreadable_row() -> None:
    bad = unchecked(spec(), agent_command=())
    result = validate_supervisor_state(
        loaded(None, spec=bad, load_error="bad row", has_checkpoint=True)
    )
    assert result.recovery_action is StateRecoveryAction.MARK_FAILED


def test_several_broken_rules_are_all_reported() -> None:
    q, ghost, orphan = uid(1), uid(2), uid(3)
    st_ = unchecked(
        state(state=S.FAILED, spawned_task_ids=(ghost,), pending_questions=(pq(q), pq(q))),
        progress=-5,
    )
    result = validate_supervisor_state(loaded(st_, [task(orphan)]))
    assert result.recovery_action is REPAIR
    text = "\n".join(result.issues)
    for words in [
        "progress -5",
        "pending question ids repeat",
        "no row in questions",
        "without a task row",
        "missing from spawned_task_ids",
        "error_message is empty",
    ]:
        assert words in text
    assert len(result.issues) == 7  # the missing row is reported once per pending copy


# --------------------------------------------------------------------------- repair


def _repair(
    st_: SupervisorState, tasks: Sequence[TaskRecord], questions: Sequence[QuestionRecord]
) -> tuple[SupervisorState, list[QuestionRecord]]:
    """As ``restoration._repaired``: record the missing question rows, then repair."""
    rows = record(questions, questions_to_record(st_, questions))
    return repair_state(st_, tasks, rows), rows


def test_repair_clamps_progress() -> None:
    assert repair_state(unchecked(state(), progress=150), [], []).progress == 100
    assert repair_state(unchecked(state(), progress=-3), [], []).progress == 0


def test_repair_dedupes_pending_questions_keeping_the_first() -> None:
    q, r = uid(1), uid(2)
    first, second = pq(q, "first?"), pq(q, "second?")
    st_ = state(state=S.WAITING_FOR_USER, pending_questions=(first, pq(r), second))
    repaired = repair_state(st_, [], [qrec(q), qrec(r)])
    assert repaired.pending_questions == (first, pq(r))
    assert repaired.state is S.WAITING_FOR_USER


def test_repair_drops_answered_questions_and_settles_the_state() -> None:
    q = uid(1)
    st_ = state(state=S.WAITING_FOR_USER, pending_questions=(pq(q),))
    repaired = repair_state(st_, [], [qrec(q, "yes")])
    assert repaired.pending_questions == ()
    assert repaired.state is S.WORKING
    assert state_issues(repaired, [], [qrec(q, "yes")]) == []


def test_repair_keeps_questions_without_a_row_for_them_to_be_recorded() -> None:
    q = uid(1)
    st_ = state(state=S.WAITING_FOR_USER, pending_questions=(pq(q),))
    assert questions_to_record(st_, []) == [pq(q)]
    repaired, rows = _repair(st_, [], [])
    assert repaired.pending_questions == (pq(q),)
    assert repaired.state is S.WAITING_FOR_USER
    assert state_issues(repaired, [], rows) == []


def test_repair_drops_task_ids_without_rows_and_readds_unlisted_rows() -> None:
    kept, ghost, orphan = uid(1), uid(2), uid(3)
    st_ = state(spawned_task_ids=(kept, ghost, kept))
    tasks = [task(orphan), task(kept)]
    repaired = repair_state(st_, tasks, [])
    assert repaired.spawned_task_ids == (kept, orphan)  # listed order first, then the orphans
    assert task_consistency(repaired, tasks).is_consistent
    assert state_issues(repaired, tasks, []) == []


def test_repair_settles_waiting_for_user_without_questions_to_working() -> None:
    assert repair_state(state(state=S.WAITING_FOR_USER), [], []).state is S.WORKING


def test_repair_settles_waiting_for_tasks_with_all_tasks_done_to_working() -> None:
    t = uid(1)
    st_ = state(state=S.WAITING_FOR_TASKS, spawned_task_ids=(t,))
    assert repair_state(st_, [task(t, TaskStatus.SUCCEEDED)], []).state is S.WORKING


def test_repair_keeps_waiting_for_tasks_when_an_unlisted_task_still_runs() -> None:
    orphan = uid(1)
    st_ = state(state=S.WAITING_FOR_TASKS)
    repaired = repair_state(st_, [task(orphan, TaskStatus.RUNNING)], [])
    assert repaired.state is S.WAITING_FOR_TASKS
    assert repaired.spawned_task_ids == (orphan,)


def test_repair_gives_a_failed_state_an_error_message() -> None:
    repaired = repair_state(state(state=S.FAILED), [], [])
    assert repaired.state is S.FAILED
    assert repaired.error_message
    assert state_issues(repaired, [], []) == []


def test_repair_keeps_an_existing_error_message_and_terminal_states() -> None:
    assert repair_state(state(state=S.FAILED, error_message="oom"), [], []).error_message == "oom"
    ghost = uid(1)
    done = repair_state(state(state=S.COMPLETED, spawned_task_ids=(ghost,)), [], [])
    assert done.state is S.COMPLETED
    assert done.spawned_task_ids == ()


def test_repair_keeps_the_bookkeeping() -> None:
    owner = uid(99)
    st_ = state(
        state=S.WAITING_FOR_USER,
        phase="deploy",
        current_activity="waiting for approval",
        progress=70,
        restoration_count=4,
        last_restored_at=NOW,
        restoration_source=RestorationSource.AGENT_RESTART,
        checkpoint_data={"step": 3, "files": ["a", "b"]},
        last_heartbeat=NOW,
        version=12,
        owner_daemon_id=owner,
        lease_epoch=5,
        created_at=NOW,
        updated_at=NOW,
    )
    repaired = repair_state(st_, [task(uid(1))], [])
    assert repaired.state is S.WORKING  # no question pending
    kept = [
        "supervisor_id",
        "phase",
        "current_activity",
        "progress",
        "restoration_count",
        "last_restored_at",
        "restoration_source",
        "checkpoint_data",
        "last_heartbeat",
        "version",
        "owner_daemon_id",
        "lease_epoch",
        "created_at",
        "updated_at",
    ]
    for name in kept:
        assert getattr(repaired, name) == getattr(st_, name), name


# --------------------------------------------------------------------------- settled_state


@pytest.mark.parametrize("s", [s for s in S if s.is_unfinished])
def test_settled_state_with_questions_is_waiting_for_user(s: S) -> None:
    assert settled_state(state(state=s, pending_questions=(pq(uid(1)),)), []) is S.WAITING_FOR_USER


def test_settled_state_without_questions() -> None:
    running, done = task(uid(1), TaskStatus.RUNNING), task(uid(2), TaskStatus.CANCELLED)
    assert settled_state(state(state=S.WAITING_FOR_TASKS), [running, done]) is S.WAITING_FOR_TASKS
    assert settled_state(state(state=S.WAITING_FOR_TASKS), [done]) is S.WORKING
    assert settled_state(state(state=S.BLOCKED), [running]) is S.BLOCKED
    for s in (S.INITIALIZING, S.IDLE, S.WORKING, S.INTERRUPTED):
        assert settled_state(state(state=s), [running]) is S.WORKING


# --------------------------------------------------------------------------- helpers


def test_task_consistency_both_directions() -> None:
    a, b, ghost, orphan = uid(1), uid(2), uid(3), uid(4)
    result = task_consistency(
        state(spawned_task_ids=(b, ghost, a, ghost)), [task(a), task(orphan), task(b)]
    )
    assert result.missing_task_rows == (ghost,)
    assert result.unlisted_task_ids == (orphan,)
    assert not result.is_consistent
    assert task_consistency(state(spawned_task_ids=(a, b)), [task(b), task(a)]).is_consistent
    assert task_consistency(state(), []).is_consistent


def test_task_consistency_sorts_the_ids() -> None:
    ids = [uid(n) for n in (9, 3, 7, 1)]
    result = task_consistency(state(spawned_task_ids=tuple(ids)), [])
    assert result.missing_task_rows == tuple(sorted(ids, key=str))
    result = task_consistency(state(), [task(i) for i in ids])
    assert result.unlisted_task_ids == tuple(sorted(ids, key=str))


def test_repair_readds_duplicate_task_rows_once() -> None:
    t = uid(1)
    repaired = repair_state(state(), [task(t), task(t)], [])
    assert repaired.spawned_task_ids == (t,)


def test_consistency_and_repair_with_many_tasks() -> None:
    """A supervisor with many tasks (how the time grows: bench/validation.py)."""
    n = 10_000
    ids = [uid(i) for i in range(1, n + 1)]
    tasks = [task(i, TaskStatus.SUCCEEDED) for i in ids]
    st_ = state(spawned_task_ids=(*ids[: n // 2], uid(n + 1)))
    consistency = task_consistency(st_, tasks)
    repaired = repair_state(st_, tasks, [])
    assert consistency.missing_task_rows == (uid(n + 1),)
    assert len(consistency.unlisted_task_ids) == n // 2
    assert repaired.spawned_task_ids == tuple(ids)


def test_fresh_state_keeps_the_restoration_bookkeeping() -> None:
    previous = state(
        state=S.WAITING_FOR_USER,
        phase="deploy",
        progress=80,
        pending_questions=(pq(uid(1)),),
        spawned_task_ids=(uid(2),),
        checkpoint_data={"x": 1},
        restoration_count=3,
        last_restored_at=NOW,
        restoration_source=RestorationSource.MANUAL,
    )
    fresh = fresh_state(SID, previous)
    assert fresh == SupervisorState(
        supervisor_id=SID,
        state=S.INITIALIZING,
        restoration_count=3,
        last_restored_at=NOW,
        restoration_source=RestorationSource.MANUAL,
    )
    assert fresh_state(SID, None) == SupervisorState(supervisor_id=SID)


def test_fresh_state_keeps_the_questions_still_open() -> None:
    older, newer, answered = uid(1), uid(2), uid(3)
    questions = [
        dataclasses.replace(qrec(newer), asked_at=NOW + timedelta(minutes=1)),
        qrec(answered, "yes"),
        qrec(older),
    ]
    fresh = fresh_state(SID, None, questions)
    assert [q.id for q in fresh.pending_questions] == [older, newer]
    assert state_issues(dataclasses.replace(fresh, state=S.WAITING_FOR_USER), [], questions) == []


def test_an_open_question_missing_from_pending_is_an_issue_and_repair_adds_it() -> None:
    listed, unlisted = uid(1), uid(2)
    questions = [
        qrec(listed),
        dataclasses.replace(qrec(unlisted), asked_at=NOW - timedelta(minutes=1)),
    ]
    st_ = state(state=S.WAITING_FOR_USER, pending_questions=(pq(listed),))
    result = validate_supervisor_state(loaded(st_, questions=questions))
    one_issue(result, f"question {unlisted}", "unanswered but not pending")
    assert result.recovery_action is REPAIR
    repaired = repair_state(st_, [], questions)
    assert [q.id for q in repaired.pending_questions] == [listed, unlisted]
    assert state_issues(repaired, [], questions) == []


def test_a_finished_supervisor_may_leave_a_question_unanswered() -> None:
    q = uid(1)
    st_ = state(state=S.COMPLETED, progress=100)
    assert state_issues(st_, [], [qrec(q)]) == []
    assert repair_state(st_, [], [qrec(q)]).pending_questions == ()


def test_questions_to_record_lists_pending_questions_without_rows() -> None:
    known, answered, missing = uid(1), uid(2), uid(3)
    st_ = state(pending_questions=(pq(known), pq(missing), pq(answered)))
    assert questions_to_record(st_, [qrec(known), qrec(answered, "yes")]) == [pq(missing)]
    assert questions_to_record(st_, [qrec(known), qrec(answered), qrec(missing)]) == []
    assert questions_to_record(state(), [qrec(known)]) == []


# --------------------------------------------------------------------------- the briefing


def _briefing(**overrides: Any) -> str:
    args: dict[str, Any] = {
        "spec": spec(),
        "state": state(phase="build", progress=42, current_activity="compiling"),
        "source": RestorationSource.DAEMON_RESTART,
        "tasks": [],
    }
    args.update(overrides)
    return generate_restoration_context_message(**args)


def test_briefing_names_the_supervisor_goal_and_where_it_was() -> None:
    text = _briefing()
    assert "'nightly-build'" in text
    assert str(SID) in text
    assert "Goal: ship it" in text
    assert "state working" in text
    assert "phase build" in text
    assert "progress 42%" in text
    assert "Last activity: compiling" in text
    assert "No question is waiting" in text
    assert "not spawned any task" in text
    assert "recovery" not in text
    assert "checkpoint" not in text
    assert text.endswith("Continue from where you left off.")


def test_briefing_without_phase_goal_or_activity() -> None:
    text = _briefing(spec=spec(goal=""), state=state())
    assert "phase (none)" in text
    assert "Goal:" not in text
    assert "Last activity" not in text


@pytest.mark.parametrize(
    ("source", "words"),
    [
        (RestorationSource.DAEMON_RESTART, "daemon restarted"),
        (RestorationSource.TASK_REASSIGNMENT, "another makima daemon took over"),
        (RestorationSource.MANUAL, "a person asked"),
        (RestorationSource.AGENT_RESTART, "agent process exited"),
    ],
)
def test_briefing_says_why_for_each_source(source: RestorationSource, words: str) -> None:
    assert words in _briefing(source=source)


def test_every_source_has_its_own_reason() -> None:
    reasons = {_briefing(source=s).splitlines()[1] for s in RestorationSource}
    assert len(reasons) == len(RestorationSource)


def test_briefing_restoration_count_defaults_to_the_state() -> None:
    assert "restoration number 2." in _briefing(state=state(restoration_count=2))
    assert "restoration number 5." in _briefing(
        state=state(restoration_count=2), restoration_count=5
    )


def test_briefing_lists_open_questions_with_ids_and_choices() -> None:
    q1, q2 = uid(11), uid(12)
    st_ = state(
        state=S.WAITING_FOR_USER,
        pending_questions=(pq(q1, "Deploy to prod?", ["yes", "no"]), pq(q2, "Which branch?")),
    )
    text = _briefing(state=st_)
    assert "do not ask them again" in text
    assert f"{q1}: Deploy to prod? [choices: yes, no]" in text
    line = next(line for line in text.splitlines() if str(q2) in line)
    assert "Which branch?" in line
    assert "choices" not in line
    assert "No question is waiting" not in text


def test_briefing_lists_undelivered_answers() -> None:
    q = uid(13)
    answer = dataclasses.replace(qrec(q, "eu-west"), question="Which region?")
    text = _briefing(undelivered_answers=[answer])
    assert "Answers that arrived while you were away" in text
    assert f"{q}: Which region? -> eu-west" in text
    assert "while you were away" not in _briefing()


def test_briefing_lists_every_task_with_its_status() -> None:
    tasks = [
        task(uid(20 + i), s, exit_code=1 if s is TaskStatus.FAILED else None)
        for i, s in enumerate(TaskStatus)
    ]
    text = _briefing(tasks=tasks)
    assert "Tasks you spawned" in text
    for t in tasks:
        line = next(line for line in text.splitlines() if str(t.task_id) in line)
        assert t.name in line
        assert t.status.value in line
    assert "exit code 1" in text
    assert "Interrupted tasks did not finish" in text


def test_briefing_hints_at_interrupted_tasks_only_when_there_are_some() -> None:
    text = _briefing(tasks=[task(uid(1), TaskStatus.SUCCEEDED, exit_code=0)])
    assert "succeeded, exit code 0" in text
    assert "Interrupted tasks" not in text


@pytest.mark.parametrize("action", list(StateRecoveryAction))
def test_briefing_names_the_recovery_action(action: StateRecoveryAction) -> None:
    validation = StateValidationResult(False, ("first issue", "second issue"), action)
    text = _briefing(validation=validation)
    assert f"needed recovery ({action.value})" in text
    assert "first issue; second issue" in text


def test_briefing_says_nothing_of_recovery_for_a_valid_state() -> None:
    assert "recovery" not in _briefing(validation=StateValidationResult(True))


def test_briefing_points_at_the_checkpoint() -> None:
    assert "restoration.checkpoint" in _briefing(state=state(checkpoint_data={"step": 1}))


# --------------------------------------------------------------------------- properties

QUESTION_FATES = ("missing", "open", "answered")
_FATES = st.dictionaries(st.integers(1, 60), st.sampled_from(QUESTION_FATES), max_size=8)
_TASK_ROWS = st.dictionaries(st.integers(1, 20), st.sampled_from(TaskStatus), max_size=4)
# Every state, the ones with rules of their own twice as often.
_STATES = st.sampled_from([*S, S.WAITING_FOR_USER, S.WAITING_FOR_TASKS, S.FAILED])
_PROGRESS = st.sampled_from([0, 1, 42, 99, 100, 100, -1, 101])  # a quarter out of range
_SPAWNED = st.lists(st.integers(1, 24), max_size=8)


@st.composite
def scenarios(
    draw: st.DrawFn,
) -> tuple[SupervisorState, list[TaskRecord], list[QuestionRecord]]:
    """A state with arbitrary pending work, and the task and question rows beside it.

    Question ids 1..40 may be pending (repeated or not) and each has no row, an
    open row or an answered row; ids 41..60 have rows but are not pending. Task
    ids may be spawned (repeated or not), have a row (any status), or both.
    """
    fates = draw(_FATES)  # a question's row: none, open or answered
    pendable = sorted(i for i in fates if i <= 40)
    pending_ids = draw(st.lists(st.sampled_from(pendable), max_size=4)) if pendable else []
    pending = tuple(pq(uid(1000 + i), f"q{i}?", ("a", "b") if i % 2 else ()) for i in pending_ids)
    questions = [
        qrec(uid(1000 + i), "a" if fate == "answered" else None)
        for i, fate in fates.items()
        if fate != "missing"
    ]
    rows = draw(_TASK_ROWS)
    tasks = [task(uid(i), status) for i, status in rows.items()]
    # Half the time the lists agree, so that the other rules get their turn.
    spawned = list(rows) if draw(st.booleans()) else draw(_SPAWNED)  # 21..24 have no row
    st_ = SupervisorState(
        supervisor_id=SID,
        state=draw(_STATES),
        phase=draw(st.sampled_from([None, "", "build"])),
        current_activity=draw(st.sampled_from([None, "compiling"])),
        error_message=draw(st.sampled_from([None, "", "boom"])),
        spawned_task_ids=tuple(uid(i) for i in spawned),
        pending_questions=pending,
        restoration_count=draw(st.integers(0, 5)),
        last_restored_at=NOW,
        restoration_source=draw(st.none() | st.sampled_from(RestorationSource)),
        checkpoint_data=draw(st.sampled_from([None, {"step": 1}, [1, 2]])),
        version=7,
        lease_epoch=2,
    )
    return unchecked(st_, progress=draw(_PROGRESS)), tasks, questions


PROPERTY = settings(max_examples=200, deadline=None)
QUICK = settings(max_examples=100, deadline=None)  # for the cheaper claims


@QUICK
@given(
    scenarios(),
    st.booleans(),
    st.none() | st.text(max_size=10),
    st.sampled_from([(), ("agent",), ("",)]),
)
def test_validation_never_raises(
    scenario: tuple[SupervisorState, list[TaskRecord], list[QuestionRecord]],
    checkpoint: bool,
    load_error: str | None,
    command: tuple[str, ...],
) -> None:
    st_, tasks, questions = scenario
    maybe_bad = unchecked(spec(), agent_command=command)
    for item in (
        loaded(st_, tasks, questions, has_checkpoint=checkpoint),
        loaded(st_, tasks, questions, spec=maybe_bad),
        loaded(None, tasks, questions, load_error=load_error, has_checkpoint=checkpoint),
    ):
        result = validate_supervisor_state(item)
        assert result.is_valid == (result.recovery_action is None)
        assert result.is_valid == (not result.issues)
        if not item.spec.agent_command or not item.spec.agent_command[0]:
            assert result.recovery_action is StateRecoveryAction.MARK_FAILED
        elif item.state is not None and item.load_error is None:
            assert result.recovery_action in (None, REPAIR)
            assert list(result.issues) == state_issues(st_, tasks, questions)


@PROPERTY
@given(scenarios())
def test_repair_always_yields_a_valid_state(
    scenario: tuple[SupervisorState, list[TaskRecord], list[QuestionRecord]],
) -> None:
    st_, tasks, questions = scenario
    result = validate_supervisor_state(loaded(st_, tasks, questions))
    if result.recovery_action is not REPAIR:
        assert result.is_valid
        return
    # As restoration does it: record the missing rows, then repair.
    repaired, rows = _repair(st_, tasks, questions)
    assert state_issues(repaired, tasks, rows) == []
    assert validate_supervisor_state(loaded(repaired, tasks, rows)).is_valid
    # The other order: repair, then record what the repaired state still lacks.
    alone = repair_state(st_, tasks, questions)
    after = record(questions, questions_to_record(alone, questions))
    assert state_issues(alone, tasks, after) == []
    assert alone == repaired

    # What repair keeps and what it may change.
    assert repaired.state.is_terminal == st_.state.is_terminal
    if st_.state.is_terminal:
        assert repaired.state is st_.state
    if repaired.state is S.FAILED and st_.error_message:
        assert repaired.error_message == st_.error_message
    # Pending: the listed ones still open, in their order, then (for an unfinished
    # supervisor) every other unanswered question, oldest first; never an answered one.
    original_ids = list(dict.fromkeys(q.id for q in st_.pending_questions))
    answered = {q.question_id for q in questions if q.is_answered}
    kept = [i for i in original_ids if i not in answered]
    unlisted = sorted(
        (q for q in questions if not q.is_answered and q.question_id not in set(kept)),
        key=lambda q: (q.asked_at, str(q.question_id)),
    )
    added = [q.question_id for q in unlisted] if st_.state.is_unfinished else []
    assert [q.id for q in repaired.pending_questions] == kept + added
    assert set(repaired.spawned_task_ids) == {t.task_id for t in tasks}
    for name in (
        "supervisor_id",
        "phase",
        "current_activity",
        "restoration_count",
        "last_restored_at",
        "restoration_source",
        "checkpoint_data",
        "version",
        "lease_epoch",
    ):
        assert getattr(repaired, name) == getattr(st_, name), name
    if 0 <= st_.progress <= 100:
        assert repaired.progress == st_.progress
    # Repair is idempotent.
    assert repair_state(repaired, tasks, rows) == repaired


@QUICK
@given(scenarios())
def test_settled_state_of_an_unfinished_state_is_never_terminal(
    scenario: tuple[SupervisorState, list[TaskRecord], list[QuestionRecord]],
) -> None:
    st_, tasks, _ = scenario
    if st_.state.is_unfinished:
        settled = settled_state(st_, tasks)
        assert settled.is_unfinished
        assert settled in (S.WORKING, S.WAITING_FOR_USER, S.WAITING_FOR_TASKS, S.BLOCKED)
        assert (settled is S.WAITING_FOR_USER) == bool(st_.pending_questions)
        if settled is S.WAITING_FOR_TASKS:  # it only waits for what can still finish
            assert st_.state is S.WAITING_FOR_TASKS
            assert any(not t.status.is_finished for t in tasks)
        if settled is S.BLOCKED:
            assert st_.state is S.BLOCKED


@QUICK
@given(scenarios(), st.sampled_from(RestorationSource))
def test_briefing_never_raises_and_mentions_every_question_and_task(
    scenario: tuple[SupervisorState, list[TaskRecord], list[QuestionRecord]],
    source: RestorationSource,
) -> None:
    st_, tasks, questions = scenario
    validation = validate_supervisor_state(loaded(st_, tasks, questions))
    answered = [q for q in questions if q.is_answered]
    text = generate_restoration_context_message(spec(), st_, source, tasks, answered, validation)
    for q in st_.pending_questions:
        assert str(q.id) in text
    for t in tasks:
        assert str(t.task_id) in text
    for a in answered:
        assert str(a.question_id) in text

from __future__ import annotations

import uuid
from datetime import UTC, datetime, timedelta, timezone

import pytest
from hypothesis import given
from hypothesis import strategies as st

from makima.errors import InvalidAnswerError, InvalidValueError, MakimaError
from makima.model import (
    TERMINAL_STATES,
    UNFINISHED_STATES,
    PendingQuestion,
    QuestionRecord,
    RestorationSource,
    StateRecoveryAction,
    StateValidationResult,
    SupervisorSpec,
    SupervisorState,
    SupervisorStateEnum,
    TaskStatus,
    check_answer,
    parse_enum,
    parse_progress,
)

NOW = datetime(2026, 1, 2, 3, 4, 5, tzinfo=UTC)


def test_nine_states_and_terminal_split() -> None:
    assert [s.value for s in SupervisorStateEnum] == [
        "initializing",
        "idle",
        "working",
        "waiting_for_user",
        "waiting_for_tasks",
        "blocked",
        "completed",
        "failed",
        "interrupted",
    ]
    assert {SupervisorStateEnum.COMPLETED, SupervisorStateEnum.FAILED} == TERMINAL_STATES
    assert len(UNFINISHED_STATES) == 7
    assert SupervisorStateEnum.INTERRUPTED.is_unfinished
    assert SupervisorStateEnum.FAILED.is_terminal


def test_enums_cover_design_values() -> None:
    assert {s.value for s in RestorationSource} == {
        "daemon_restart",
        "task_reassignment",
        "manual",
        "agent_restart",
    }
    assert {a.value for a in StateRecoveryAction} == {
        "repair",
        "revert_to_checkpoint",
        "start_fresh",
        "mark_failed",
    }
    assert not TaskStatus.RUNNING.is_finished
    assert TaskStatus.INTERRUPTED.is_finished


def test_unknown_state_is_named_in_the_error() -> None:
    with pytest.raises(
        InvalidValueError, match=r"state must be one of .*waiting_for_user.*'sleeping'"
    ):
        parse_enum(SupervisorStateEnum, "sleeping", "state")


@pytest.mark.parametrize("bad", [101, -1, 50.5, "50", None, True, float("nan")])
def test_progress_out_of_range_is_refused(bad: object) -> None:
    with pytest.raises(InvalidValueError, match="progress must be an integer from 0 to 100"):
        parse_progress(bad)


def test_progress_101_refused_by_state() -> None:
    with pytest.raises(InvalidValueError, match="got 101"):
        SupervisorState(supervisor_id=uuid.uuid4(), progress=101)


def test_pending_question_json_shape_is_exact() -> None:
    q = PendingQuestion(id=uuid.uuid4(), question="Ship?", choices=("yes", "no"), asked_at=NOW)
    assert set(q.to_json()) == {"id", "question", "choices", "context", "asked_at"}
    assert PendingQuestion.from_json(q.to_json()) == q


@pytest.mark.parametrize(
    ("obj", "message"),
    [
        ("not an object", "must be a JSON object"),
        ({"id": str(uuid.uuid4())}, "missing asked_at, choices, context, question"),
        (
            {
                "id": "nope",
                "question": "q",
                "choices": [],
                "context": None,
                "asked_at": NOW.isoformat(),
            },
            "question id must be a UUID string; got 'nope'",
        ),
        (
            {
                "id": str(uuid.uuid4()),
                "question": "",
                "choices": [],
                "context": None,
                "asked_at": NOW.isoformat(),
            },
            "question must not be empty",
        ),
        (
            {
                "id": str(uuid.uuid4()),
                "question": "q",
                "choices": "yes",
                "context": None,
                "asked_at": NOW.isoformat(),
            },
            "choices must be a list of strings",
        ),
        (
            {
                "id": str(uuid.uuid4()),
                "question": "q",
                "choices": [1],
                "context": None,
                "asked_at": NOW.isoformat(),
            },
            "choices must be a list of strings; found 1",
        ),
        (
            {
                "id": str(uuid.uuid4()),
                "question": "q",
                "choices": [],
                "context": None,
                "asked_at": "yesterday",
            },
            "asked_at must be an ISO 8601 timestamp",
        ),
        (
            {
                "id": str(uuid.uuid4()),
                "question": "q",
                "choices": [],
                "context": None,
                "asked_at": "2026-01-01T00:00:00",
            },
            "asked_at must carry a time zone",
        ),
    ],
)
def test_malformed_question_is_refused(obj: object, message: str) -> None:
    with pytest.raises(InvalidValueError, match=message):
        PendingQuestion.from_json(obj)


def test_errors_share_one_root() -> None:
    assert issubclass(InvalidValueError, MakimaError)
    assert issubclass(InvalidAnswerError, MakimaError)


def test_check_answer() -> None:
    assert check_answer("yes", ("yes", "no")) == "yes"
    assert check_answer("anything", ()) == "anything"
    with pytest.raises(InvalidAnswerError, match="'maybe' is not one of the choices: yes, no"):
        check_answer("maybe", ("yes", "no"))
    with pytest.raises(InvalidValueError, match="non-empty string"):
        check_answer("  ", ())


def test_spec_validation() -> None:
    spec = SupervisorSpec.new("demo", ["python", "agent.py"], goal="g", env={"A": "1"})
    assert spec.agent_command == ("python", "agent.py")
    with pytest.raises(InvalidValueError, match="command must not be empty"):
        SupervisorSpec.new("demo", [])
    with pytest.raises(InvalidValueError, match="name must not be empty"):
        SupervisorSpec.new(" ", ["x"])
    with pytest.raises(InvalidValueError, match="env must map strings to strings"):
        SupervisorSpec.new("demo", ["x"], env={"A": 1})  # type: ignore[dict-item]


def test_validation_result_consistency() -> None:
    assert StateValidationResult(True).to_json() == {"valid": True, "issues": [], "action": None}
    with pytest.raises(InvalidValueError):
        StateValidationResult(False, ("bad",))
    with pytest.raises(InvalidValueError):
        StateValidationResult(True, ("bad",), StateRecoveryAction.REPAIR)


def test_question_record_flattened_json() -> None:
    sid, qid = uuid.uuid4(), uuid.uuid4()
    record = QuestionRecord(qid, sid, "Ship?", ("yes", "no"), "ctx", NOW)
    out = record.to_json()
    assert out["question_id"] == str(qid)
    assert out["supervisor_id"] == str(sid)
    assert record.pending().to_json()["id"] == str(qid)


# --------------------------------------------------------------------------- round trips

texts = st.text(min_size=1, max_size=40).filter(lambda s: s.strip() != "")
aware = st.datetimes(
    min_value=datetime(2000, 1, 1), max_value=datetime(2100, 1, 1), timezones=st.just(UTC)
) | st.datetimes(
    min_value=datetime(2000, 1, 1),
    max_value=datetime(2100, 1, 1),
    timezones=st.just(timezone(timedelta(hours=5, minutes=30))),
)
questions = st.builds(
    PendingQuestion,
    id=st.uuids(),
    question=texts,
    choices=st.lists(texts, max_size=4, unique=True).map(tuple),
    context=st.none() | st.text(max_size=40),
    asked_at=aware,
)
states = st.builds(
    SupervisorState,
    supervisor_id=st.uuids(),
    state=st.sampled_from(SupervisorStateEnum),
    phase=st.none() | st.text(max_size=20),
    current_activity=st.none() | st.text(max_size=40),
    progress=st.integers(0, 100),
    error_message=st.none() | st.text(max_size=40),
    spawned_task_ids=st.lists(st.uuids(), max_size=4).map(tuple),
    pending_questions=st.lists(questions, max_size=3).map(tuple),
    restoration_count=st.integers(0, 1000),
    last_restored_at=st.none() | aware,
    restoration_source=st.none() | st.sampled_from(RestorationSource),
    checkpoint_data=st.none() | st.dictionaries(st.text(max_size=5), st.integers(), max_size=3),
    version=st.integers(0, 10**9),
    lease_epoch=st.integers(0, 10**6),
)


@given(questions)
def test_question_json_round_trip(q: PendingQuestion) -> None:
    assert PendingQuestion.from_json(q.to_json()) == q


@given(states)
def test_state_json_round_trip(state: SupervisorState) -> None:
    assert SupervisorState.from_json(state.to_json()) == state


@given(st.integers())
def test_progress_accepts_exactly_0_to_100(n: int) -> None:
    if 0 <= n <= 100:
        assert parse_progress(n) == n
    else:
        with pytest.raises(InvalidValueError):
            parse_progress(n)

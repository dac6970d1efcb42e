"""makima's vocabulary: enums and frozen dataclasses, with conversion to and
from database rows and JSON.

Pure: standard library only, no I/O. Every constructor validates its values
and raises :class:`~makima.errors.InvalidValueError` naming the bad value and
what was expected.
"""

from __future__ import annotations

import enum
import math
import uuid
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, Protocol, TypeVar

from makima.errors import InvalidAnswerError, InvalidValueError

JSONObject = dict[str, Any]
E = TypeVar("E", bound=enum.StrEnum)


class Row(Protocol):
    """A database row or a JSON object: anything indexed by column name."""

    def __getitem__(self, key: str, /) -> Any: ...


def optional_column(row: Row, key: str) -> Any:
    """``row[key]``, or None where the row has no such column (a snapshot saved
    before the column existed)."""
    try:
        return row[key]
    except KeyError:
        return None


class SupervisorStateEnum(enum.StrEnum):
    """The nine states of a supervisor (mirrored by a CHECK in schema.sql)."""

    INITIALIZING = "initializing"
    IDLE = "idle"
    WORKING = "working"
    WAITING_FOR_USER = "waiting_for_user"
    WAITING_FOR_TASKS = "waiting_for_tasks"
    BLOCKED = "blocked"
    COMPLETED = "completed"
    FAILED = "failed"
    INTERRUPTED = "interrupted"

    @property
    def is_terminal(self) -> bool:
        return self in _TERMINAL_STATES

    @property
    def is_unfinished(self) -> bool:
        return not self.is_terminal


_TERMINAL_STATES = frozenset({SupervisorStateEnum.COMPLETED, SupervisorStateEnum.FAILED})
TERMINAL_STATES: frozenset[SupervisorStateEnum] = _TERMINAL_STATES
UNFINISHED_STATES: frozenset[SupervisorStateEnum] = (
    frozenset(SupervisorStateEnum) - _TERMINAL_STATES
)


class RestorationSource(enum.StrEnum):
    """Why a supervisor is being restored."""

    DAEMON_RESTART = "daemon_restart"
    TASK_REASSIGNMENT = "task_reassignment"
    MANUAL = "manual"
    AGENT_RESTART = "agent_restart"


class StateRecoveryAction(enum.StrEnum):
    """What restoration does with a state that failed validation."""

    REPAIR = "repair"
    REVERT_TO_CHECKPOINT = "revert_to_checkpoint"
    START_FRESH = "start_fresh"
    MARK_FAILED = "mark_failed"


class TaskStatus(enum.StrEnum):
    """Lifecycle of a spawned task (mirrored by a CHECK in schema.sql)."""

    PENDING = "pending"
    RUNNING = "running"
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    CANCELLED = "cancelled"
    INTERRUPTED = "interrupted"

    @property
    def is_finished(self) -> bool:
        return self not in (TaskStatus.PENDING, TaskStatus.RUNNING)


# --------------------------------------------------------------------------- parsing helpers


def parse_enum(kind: type[E], value: object, what: str) -> E:
    """Return ``value`` as a member of ``kind`` or raise naming the allowed values."""
    if isinstance(value, kind):
        return value
    if isinstance(value, str):
        try:
            return kind(value)
        except ValueError:
            pass
    allowed = ", ".join(member.value for member in kind)
    raise InvalidValueError(f"{what} must be one of {allowed}; got {brief(value)}")


def parse_uuid(value: object, what: str) -> uuid.UUID:
    if isinstance(value, uuid.UUID):
        return value
    if isinstance(value, str):
        try:
            return uuid.UUID(value)
        except ValueError:
            pass
    raise InvalidValueError(f"{what} must be a UUID string; got {brief(value)}")


def parse_progress(value: object, what: str = "progress") -> int:
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise InvalidValueError(f"{what} must be an integer from 0 to 100; got {brief(value)}")
    if isinstance(value, float) and (not math.isfinite(value) or not value.is_integer()):
        raise InvalidValueError(f"{what} must be an integer from 0 to 100; got {brief(value)}")
    number = int(value)
    if not 0 <= number <= 100:
        raise InvalidValueError(f"{what} must be an integer from 0 to 100; got {brief(value)}")
    return number


def parse_datetime(value: object, what: str) -> datetime:
    if isinstance(value, datetime):
        parsed = value
    elif isinstance(value, str):
        try:
            parsed = datetime.fromisoformat(value)
        except ValueError:
            raise InvalidValueError(
                f"{what} must be an ISO 8601 timestamp with a time zone; got {brief(value)}"
            ) from None
    else:
        raise InvalidValueError(
            f"{what} must be an ISO 8601 timestamp with a time zone; got {brief(value)}"
        )
    if parsed.tzinfo is None:
        raise InvalidValueError(f"{what} must carry a time zone; got {brief(value)}")
    return parsed


def parse_optional_datetime(value: object, what: str) -> datetime | None:
    return None if value is None else parse_datetime(value, what)


def parse_text(value: object, what: str, *, allow_empty: bool = True) -> str:
    if not isinstance(value, str):
        raise InvalidValueError(f"{what} must be a string; got {brief(value)}")
    if not allow_empty and not value.strip():
        raise InvalidValueError(f"{what} must not be empty")
    return value


def parse_optional_text(value: object, what: str) -> str | None:
    return None if value is None else parse_text(value, what)


def parse_string_list(value: object, what: str, *, allow_empty: bool = True) -> tuple[str, ...]:
    if isinstance(value, str) or not isinstance(value, Sequence):
        raise InvalidValueError(f"{what} must be a list of strings; got {brief(value)}")
    items = tuple(value)
    for item in items:
        if not isinstance(item, str):
            raise InvalidValueError(f"{what} must be a list of strings; found {brief(item)}")
    if not allow_empty and not items:
        raise InvalidValueError(f"{what} must not be empty")
    return items


def parse_int(
    value: object, what: str, *, minimum: int | None = None, maximum: int | None = None
) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise InvalidValueError(f"{what} must be an integer; got {brief(value)}")
    if minimum is not None and value < minimum:
        raise InvalidValueError(f"{what} must be at least {minimum}; got {brief(value)}")
    if maximum is not None and value > maximum:
        raise InvalidValueError(f"{what} must be at most {maximum}; got {brief(value)}")
    return value


def parse_optional_int(value: object, what: str) -> int | None:
    return None if value is None else parse_int(value, what)


def brief(value: object, limit: int = 60) -> str:
    """``repr(value)``, cut to ``limit`` characters: error messages quote hostile input."""
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 1] + "…"


def parse_env(value: object, what: str = "env", *, strict: bool = True) -> dict[str, str]:
    """Environment variables for a child process: names non-empty, without ``=`` or
    NUL; values without NUL (what ``execve`` can take). ``strict=False`` checks the
    types only: a spec saved by an older makima is still read, and fails alone
    when its agent cannot start."""
    if value is None:
        return {}
    if not isinstance(value, Mapping):
        raise InvalidValueError(f"{what} must be an object of string values; got {brief(value)}")
    result: dict[str, str] = {}
    for key, item in value.items():
        if not isinstance(key, str) or not isinstance(item, str):
            raise InvalidValueError(
                f"{what} must map strings to strings; got {brief(key)}: {brief(item)}"
            )
        if strict and (not key or "=" in key or "\x00" in key):
            raise InvalidValueError(
                f"{what} key {brief(key)} is not a valid variable name; expected a non-empty "
                "name without '=' or NUL"
            )
        if strict and "\x00" in item:
            raise InvalidValueError(f"{what}[{brief(key)}] holds a NUL character; values cannot")
        result[key] = item
    return result


def parse_command(value: object, what: str = "command") -> tuple[str, ...]:
    """A child's argv: a non-empty list of strings without NUL, naming a program."""
    items = parse_string_list(value, what, allow_empty=False)
    if not items[0]:
        raise InvalidValueError(f"{what}[0] must name a program; got an empty string")
    for index, item in enumerate(items):
        if "\x00" in item:
            raise InvalidValueError(f"{what}[{index}] holds a NUL character: {brief(item)}")
    return items


def iso(value: datetime | None) -> str | None:
    return None if value is None else value.isoformat()


# --------------------------------------------------------------------------- questions


@dataclass(frozen=True, slots=True)
class PendingQuestion:
    """A question waiting for a person's answer.

    Its JSON shape is exactly ``{id, question, choices, context, asked_at}``,
    as kept in ``supervisor_states.pending_questions``. Empty ``choices``
    means any non-empty text is an answer.
    """

    id: uuid.UUID
    question: str
    choices: tuple[str, ...] = ()
    context: str | None = None
    asked_at: datetime = field(default_factory=lambda: datetime.now().astimezone())

    def __post_init__(self) -> None:
        parse_uuid(self.id, "question id")
        parse_text(self.question, "question", allow_empty=False)
        parse_string_list(self.choices, "choices")
        if len(set(self.choices)) != len(self.choices):
            raise InvalidValueError(f"choices must be distinct; got {brief(list(self.choices))}")
        parse_optional_text(self.context, "context")
        parse_datetime(self.asked_at, "asked_at")

    def to_json(self) -> JSONObject:
        return {
            "id": str(self.id),
            "question": self.question,
            "choices": list(self.choices),
            "context": self.context,
            "asked_at": self.asked_at.isoformat(),
        }

    @classmethod
    def from_json(cls, obj: object) -> PendingQuestion:
        if not isinstance(obj, Mapping):
            raise InvalidValueError(f"a pending question must be a JSON object; got {brief(obj)}")
        expected = {"id", "question", "choices", "context", "asked_at"}
        missing = expected - obj.keys()
        if missing:
            raise InvalidValueError(
                f"pending question is missing {', '.join(sorted(missing))}; "
                f"expected keys {', '.join(sorted(expected))}"
            )
        return cls(
            id=parse_uuid(obj["id"], "question id"),
            question=parse_text(obj["question"], "question", allow_empty=False),
            choices=parse_string_list(obj["choices"], "choices"),
            context=parse_optional_text(obj["context"], "context"),
            asked_at=parse_datetime(obj["asked_at"], "asked_at"),
        )

    def check_answer(self, answer: str) -> None:
        """Raise unless ``answer`` is acceptable for this question."""
        check_answer(answer, self.choices)


def check_answer(answer: object, choices: Sequence[str]) -> str:
    """Return ``answer`` if it answers a question with these ``choices``.

    Raises :class:`InvalidValueError` for an empty or non-string answer;
    :class:`~makima.errors.InvalidAnswerError` when it is not one of the choices.
    """
    if not isinstance(answer, str) or not answer.strip():
        raise InvalidValueError(f"answer must be a non-empty string; got {brief(answer)}")
    if choices and answer not in choices:
        raise InvalidAnswerError(
            f"answer {brief(answer)} is not one of the choices: {', '.join(choices)}",
            tuple(choices),
        )
    return answer


@dataclass(frozen=True, slots=True)
class QuestionRecord:
    """A row of ``questions``: a question with its answer, if any."""

    question_id: uuid.UUID
    supervisor_id: uuid.UUID
    question: str
    choices: tuple[str, ...]
    context: str | None
    asked_at: datetime
    answer: str | None = None
    answered_at: datetime | None = None
    answered_by_uid: int | None = None
    delivered_at: datetime | None = None
    redelivery_count: int = 0

    @property
    def is_answered(self) -> bool:
        return self.answer is not None

    def pending(self) -> PendingQuestion:
        return PendingQuestion(
            id=self.question_id,
            question=self.question,
            choices=self.choices,
            context=self.context,
            asked_at=self.asked_at,
        )

    @classmethod
    def from_row(cls, row: Row) -> QuestionRecord:
        return cls(
            question_id=parse_uuid(row["question_id"], "question_id"),
            supervisor_id=parse_uuid(row["supervisor_id"], "supervisor_id"),
            question=parse_text(row["question"], "question"),
            choices=parse_string_list(row["choices"], "choices"),
            context=parse_optional_text(row["context"], "context"),
            asked_at=parse_datetime(row["asked_at"], "asked_at"),
            answer=parse_optional_text(row["answer"], "answer"),
            answered_at=parse_optional_datetime(row["answered_at"], "answered_at"),
            answered_by_uid=parse_optional_int(row["answered_by_uid"], "answered_by_uid"),
            delivered_at=parse_optional_datetime(row["delivered_at"], "delivered_at"),
            redelivery_count=parse_int(row["redelivery_count"], "redelivery_count", minimum=0),
        )

    def to_json(self) -> JSONObject:
        """The flattened form used by ``question.list`` and events."""
        return {
            "question_id": str(self.question_id),
            "supervisor_id": str(self.supervisor_id),
            "question": self.question,
            "choices": list(self.choices),
            "context": self.context,
            "asked_at": self.asked_at.isoformat(),
            "answer": self.answer,
            "answered_at": iso(self.answered_at),
            "redelivery_count": self.redelivery_count,
        }


# --------------------------------------------------------------------------- supervisors


@dataclass(frozen=True, slots=True)
class SupervisorSpec:
    """What a supervisor is: written once when it is created."""

    supervisor_id: uuid.UUID
    name: str
    agent_command: tuple[str, ...]
    goal: str = ""
    cwd: str | None = None
    env: Mapping[str, str] = field(default_factory=dict)
    created_at: datetime | None = None

    def __post_init__(self) -> None:
        parse_uuid(self.supervisor_id, "supervisor_id")
        parse_text(self.name, "name", allow_empty=False)
        # A stored spec may lack a command (a database made by an older schema);
        # restoration marks such a supervisor failed. New specs need one (new()).
        parse_string_list(self.agent_command, "command")
        if self.agent_command and not self.agent_command[0]:
            raise InvalidValueError("command must start with a program name; got ''")
        parse_text(self.goal, "goal")
        parse_optional_text(self.cwd, "cwd")
        parse_env(self.env, strict=False)

    @classmethod
    def new(
        cls,
        name: str,
        command: Sequence[str],
        *,
        goal: str = "",
        cwd: str | None = None,
        env: Mapping[str, str] | None = None,
    ) -> SupervisorSpec:
        return cls(
            supervisor_id=uuid.uuid4(),
            name=name,
            agent_command=parse_command(command),
            goal=goal,
            cwd=cwd,
            env=parse_env(env),
        )

    @classmethod
    def from_row(cls, row: Row) -> SupervisorSpec:
        return cls(
            supervisor_id=parse_uuid(row["supervisor_id"], "supervisor_id"),
            name=parse_text(row["name"], "name"),
            agent_command=parse_string_list(row["agent_command"], "agent_command"),
            goal=parse_text(row["goal"], "goal"),
            cwd=parse_optional_text(row["cwd"], "cwd"),
            env=parse_env(row["env"], strict=False),
            created_at=parse_optional_datetime(row["created_at"], "created_at"),
        )

    def to_json(self) -> JSONObject:
        return {
            "supervisor_id": str(self.supervisor_id),
            "name": self.name,
            "goal": self.goal,
            "command": list(self.agent_command),
            "cwd": self.cwd,
            "env": dict(self.env),
            "created_at": iso(self.created_at),
        }


@dataclass(frozen=True, slots=True)
class Fence:
    """Who may write a supervisor's rows: the daemon that owns it and the lease
    epoch it claimed it at. Every write carries it and matches it against the row
    in the same statement (DESIGN §13); ``Fence()`` matches a row nobody owns."""

    owner: uuid.UUID | None = None
    epoch: int = 0

    @classmethod
    def of(cls, state: SupervisorState) -> Fence:
        return cls(state.owner_daemon_id, state.lease_epoch)


NO_FENCE = Fence()
"""The fence of a row nobody owns (a single daemon before leases; tests)."""


@dataclass(frozen=True, slots=True)
class Heartbeat:
    """One live supervisor's beat: what the daemon holds in memory for it.

    ``current_activity`` and ``progress`` are written only over the row
    ``version`` the daemon last saw: a save point committed since the beat was
    taken has moved the version on, and its values stay.
    """

    supervisor_id: uuid.UUID
    state: SupervisorStateEnum
    current_activity: str | None
    progress: int
    version: int
    fence: Fence = NO_FENCE


@dataclass(frozen=True, slots=True)
class SupervisorState:
    """The mutable state of one supervisor: a row of ``supervisor_states``."""

    supervisor_id: uuid.UUID
    state: SupervisorStateEnum = SupervisorStateEnum.INITIALIZING
    phase: str | None = None
    current_activity: str | None = None
    progress: int = 0
    error_message: str | None = None
    spawned_task_ids: tuple[uuid.UUID, ...] = ()
    pending_questions: tuple[PendingQuestion, ...] = ()
    restoration_count: int = 0
    last_restored_at: datetime | None = None
    restoration_source: RestorationSource | None = None
    checkpoint_data: Any = None
    last_heartbeat: datetime | None = None
    version: int = 0
    owner_daemon_id: uuid.UUID | None = None
    lease_epoch: int = 0
    created_at: datetime | None = None
    updated_at: datetime | None = None
    result: Any = None  # what the agent finished with (``done``'s result)

    def __post_init__(self) -> None:
        parse_uuid(self.supervisor_id, "supervisor_id")
        parse_enum(SupervisorStateEnum, self.state, "state")
        parse_optional_text(self.phase, "phase")
        parse_optional_text(self.current_activity, "current_activity")
        parse_progress(self.progress)
        parse_optional_text(self.error_message, "error_message")
        for task_id in self.spawned_task_ids:
            parse_uuid(task_id, "spawned task id")
        for question in self.pending_questions:
            if not isinstance(question, PendingQuestion):
                raise InvalidValueError(
                    f"pending_questions must hold PendingQuestion; got {brief(question)}"
                )
        parse_int(self.restoration_count, "restoration_count", minimum=0)
        if self.restoration_source is not None:
            parse_enum(RestorationSource, self.restoration_source, "restoration_source")

    @property
    def pending_question_ids(self) -> tuple[uuid.UUID, ...]:
        return tuple(q.id for q in self.pending_questions)

    @classmethod
    def from_row(cls, row: Row) -> SupervisorState:
        """Build from a ``supervisor_states`` row (JSONB already decoded)."""
        raw_questions = row["pending_questions"]
        if raw_questions is None:
            raw_questions = []
        if not isinstance(raw_questions, list):
            raise InvalidValueError(
                f"pending_questions must be a JSON array; got {brief(raw_questions)}"
            )
        source = row["restoration_source"]
        owner = row["owner_daemon_id"]
        return cls(
            supervisor_id=parse_uuid(row["supervisor_id"], "supervisor_id"),
            state=parse_enum(SupervisorStateEnum, row["state"], "state"),
            phase=parse_optional_text(row["phase"], "phase"),
            current_activity=parse_optional_text(row["current_activity"], "current_activity"),
            progress=parse_progress(row["progress"] if row["progress"] is not None else 0),
            error_message=parse_optional_text(row["error_message"], "error_message"),
            spawned_task_ids=tuple(
                parse_uuid(t, "spawned task id") for t in (row["spawned_task_ids"] or ())
            ),
            pending_questions=tuple(PendingQuestion.from_json(q) for q in raw_questions),
            restoration_count=parse_int(row["restoration_count"] or 0, "restoration_count"),
            last_restored_at=parse_optional_datetime(row["last_restored_at"], "last_restored_at"),
            restoration_source=(
                None
                if source is None
                else parse_enum(RestorationSource, source, "restoration_source")
            ),
            checkpoint_data=row["checkpoint_data"],
            last_heartbeat=parse_optional_datetime(row["last_heartbeat"], "last_heartbeat"),
            version=parse_int(row["version"], "version"),
            owner_daemon_id=None if owner is None else parse_uuid(owner, "owner_daemon_id"),
            lease_epoch=parse_int(row["lease_epoch"], "lease_epoch"),
            created_at=parse_optional_datetime(row["created_at"], "created_at"),
            updated_at=parse_optional_datetime(row["updated_at"], "updated_at"),
            result=optional_column(row, "result"),
        )

    def to_json(self) -> JSONObject:
        return {
            "supervisor_id": str(self.supervisor_id),
            "state": self.state.value,
            "phase": self.phase,
            "current_activity": self.current_activity,
            "progress": self.progress,
            "error_message": self.error_message,
            "spawned_task_ids": [str(t) for t in self.spawned_task_ids],
            "pending_questions": [q.to_json() for q in self.pending_questions],
            "restoration_count": self.restoration_count,
            "last_restored_at": iso(self.last_restored_at),
            "restoration_source": (
                None if self.restoration_source is None else self.restoration_source.value
            ),
            "checkpoint_data": self.checkpoint_data,
            "last_heartbeat": iso(self.last_heartbeat),
            "version": self.version,
            "owner_daemon_id": None if self.owner_daemon_id is None else str(self.owner_daemon_id),
            "lease_epoch": self.lease_epoch,
            "created_at": iso(self.created_at),
            "updated_at": iso(self.updated_at),
            "result": self.result,
        }

    @classmethod
    def from_json(cls, obj: object) -> SupervisorState:
        """Inverse of :meth:`to_json` (used for checkpoint snapshots)."""
        if not isinstance(obj, Mapping):
            raise InvalidValueError(f"a supervisor state must be a JSON object; got {brief(obj)}")
        try:
            return cls.from_row(obj)
        except KeyError as exc:
            raise InvalidValueError(f"supervisor state is missing {exc.args[0]!r}") from None


# --------------------------------------------------------------------------- tasks, messages


@dataclass(frozen=True, slots=True)
class TaskRecord:
    """A row of ``tasks``: a child command a supervisor spawned."""

    task_id: uuid.UUID
    supervisor_id: uuid.UUID
    name: str
    command: tuple[str, ...]
    cwd: str | None = None
    env: Mapping[str, str] = field(default_factory=dict)
    status: TaskStatus = TaskStatus.PENDING
    exit_code: int | None = None
    output_tail: str | None = None
    attempts: int = 0
    created_at: datetime | None = None
    started_at: datetime | None = None
    finished_at: datetime | None = None

    def __post_init__(self) -> None:
        parse_uuid(self.task_id, "task_id")
        parse_uuid(self.supervisor_id, "supervisor_id")
        parse_text(self.name, "task name", allow_empty=False)
        parse_string_list(self.command, "task command", allow_empty=False)
        parse_enum(TaskStatus, self.status, "task status")

    @classmethod
    def from_row(cls, row: Row) -> TaskRecord:
        return cls(
            task_id=parse_uuid(row["task_id"], "task_id"),
            supervisor_id=parse_uuid(row["supervisor_id"], "supervisor_id"),
            name=parse_text(row["name"], "task name"),
            command=parse_string_list(row["command"], "task command"),
            cwd=parse_optional_text(row["cwd"], "cwd"),
            env=parse_env(row["env"], strict=False),
            status=parse_enum(TaskStatus, row["status"], "task status"),
            exit_code=parse_optional_int(row["exit_code"], "exit_code"),
            output_tail=parse_optional_text(row["output_tail"], "output_tail"),
            attempts=parse_int(row["attempts"], "attempts", minimum=0),
            created_at=parse_optional_datetime(row["created_at"], "created_at"),
            started_at=parse_optional_datetime(row["started_at"], "started_at"),
            finished_at=parse_optional_datetime(row["finished_at"], "finished_at"),
        )

    def to_json(self) -> JSONObject:
        return {
            "task_id": str(self.task_id),
            "supervisor_id": str(self.supervisor_id),
            "name": self.name,
            "command": list(self.command),
            "cwd": self.cwd,
            "status": self.status.value,
            "exit_code": self.exit_code,
            "output_tail": self.output_tail,
            "attempts": self.attempts,
            "created_at": iso(self.created_at),
            "started_at": iso(self.started_at),
            "finished_at": iso(self.finished_at),
        }


@dataclass(frozen=True, slots=True)
class MessageRecord:
    """One entry of a supervisor's conversation history."""

    supervisor_id: uuid.UUID
    seq: int
    role: str
    content: Any
    created_at: datetime | None = None

    @classmethod
    def from_row(cls, row: Row) -> MessageRecord:
        return cls(
            supervisor_id=parse_uuid(row["supervisor_id"], "supervisor_id"),
            seq=parse_int(row["seq"], "seq", minimum=1),
            role=parse_text(row["role"], "role"),
            content=row["content"],
            created_at=parse_optional_datetime(row["created_at"], "created_at"),
        )

    def to_json(self) -> JSONObject:
        return {
            "seq": self.seq,
            "role": self.role,
            "content": self.content,
            "created_at": iso(self.created_at),
        }


@dataclass(frozen=True, slots=True)
class CheckpointRecord:
    """A full snapshot of a supervisor's state, to fall back on."""

    supervisor_id: uuid.UUID
    seq: int
    snapshot: SupervisorState
    reason: str
    created_at: datetime | None = None

    @classmethod
    def from_row(cls, row: Row) -> CheckpointRecord:
        return cls(
            supervisor_id=parse_uuid(row["supervisor_id"], "supervisor_id"),
            seq=parse_int(row["seq"], "seq", minimum=1),
            snapshot=SupervisorState.from_json(row["snapshot"]),
            reason=parse_text(row["reason"], "reason"),
            created_at=parse_optional_datetime(row["created_at"], "created_at"),
        )


@dataclass(frozen=True, slots=True)
class SpawnedTaskConsistency:
    """Result of ``validate_spawned_tasks``: ids that disagree between the
    supervisor's ``spawned_task_ids`` and the ``tasks`` table."""

    missing_task_rows: tuple[uuid.UUID, ...] = ()
    unlisted_task_ids: tuple[uuid.UUID, ...] = ()

    @property
    def is_consistent(self) -> bool:
        return not self.missing_task_rows and not self.unlisted_task_ids


# --------------------------------------------------------------------------- restoration


@dataclass(frozen=True, slots=True)
class StateValidationResult:
    """Outcome of validating a loaded state; ``recovery_action`` is None when valid."""

    is_valid: bool
    issues: tuple[str, ...] = ()
    recovery_action: StateRecoveryAction | None = None

    def __post_init__(self) -> None:
        if self.is_valid and (self.issues or self.recovery_action is not None):
            raise InvalidValueError("a valid state has no issues and no recovery action")
        if not self.is_valid and self.recovery_action is None:
            raise InvalidValueError("an invalid state needs a recovery action")

    def to_json(self) -> JSONObject:
        return {
            "valid": self.is_valid,
            "issues": list(self.issues),
            "action": None if self.recovery_action is None else self.recovery_action.value,
        }


@dataclass(frozen=True, slots=True)
class SupervisorRestorationContext:
    """Everything restoration hands to an agent in its ``start`` message."""

    supervisor_id: uuid.UUID
    source: RestorationSource
    restoration_count: int
    context_message: str
    state: SupervisorState
    history: tuple[MessageRecord, ...] = ()
    tasks: tuple[TaskRecord, ...] = ()
    undelivered_answers: tuple[QuestionRecord, ...] = ()

    def to_json(self) -> JSONObject:
        return {
            "source": self.source.value,
            "restoration_count": self.restoration_count,
            "context_message": self.context_message,
            "phase": self.state.phase,
            "state": self.state.state.value,
            "progress": self.state.progress,
            "current_activity": self.state.current_activity,
            "checkpoint": self.state.checkpoint_data,
            "history": [m.to_json() for m in self.history],
            "pending_questions": [q.to_json() for q in self.state.pending_questions],
            "undelivered_answers": [
                {
                    "question_id": str(a.question_id),
                    "question": a.question,
                    "choices": list(a.choices),
                    "answer": a.answer,
                }
                for a in self.undelivered_answers
            ],
            "tasks": [t.to_json() for t in self.tasks],
        }


@dataclass(frozen=True, slots=True)
class RestorationInfo:
    """What ``supervisor.resume`` returns."""

    supervisor_id: uuid.UUID
    source: RestorationSource
    restoration_count: int
    validation: StateValidationResult
    redelivered_question_ids: tuple[uuid.UUID, ...] = ()
    waiting_task_ids: tuple[uuid.UUID, ...] = ()
    context_message: str = ""

    def to_json(self) -> JSONObject:
        return {
            "supervisor_id": str(self.supervisor_id),
            "source": self.source.value,
            "restoration_count": self.restoration_count,
            "validation": self.validation.to_json(),
            "redelivered_question_ids": [str(q) for q in self.redelivered_question_ids],
            "waiting_task_ids": [str(t) for t in self.waiting_task_ids],
            "context_message": self.context_message,
        }

"""The store's commands: one frozen dataclass per kind of write (DESIGN §4, §5).

A command says what is to be saved, nothing about how: the store turns it into
one statement (makima.repository) and decides whether it goes out alone or
with others (group commit). Commands are plain values, easy to log and test.
"""

from __future__ import annotations

import uuid
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from makima.model import (
    Heartbeat,
    PendingQuestion,
    RestorationSource,
    SupervisorSpec,
    SupervisorState,
    SupervisorStateEnum,
    TaskRecord,
    TaskStatus,
)

__all__ = [
    "AnswersDelivered",
    "CheckpointSaved",
    "DaemonRegistered",
    "DaemonSeen",
    "Heartbeat",
    "Heartbeats",
    "MessageAdded",
    "PhaseChange",
    "QuestionAnswered",
    "QuestionAsked",
    "QuestionRowsRepaired",
    "QuestionsRedelivered",
    "RestorationsCounted",
    "StateChange",
    "StateRestored",
    "SupervisorCreated",
    "TaskFinished",
    "TaskSpawned",
    "TaskStarted",
    "TasksEnded",
    "TasksRequeued",
]

# ----------------------------------------------------------------- the save points (§5)


@dataclass(frozen=True, slots=True)
class StateChange:
    """Save point on every state change: state, activity, progress, error, and the
    result the agent finished with (``None`` leaves the saved result as it is)."""

    supervisor_id: uuid.UUID
    state: SupervisorStateEnum
    current_activity: str | None
    progress: int
    error_message: str | None = None
    result: Any = None

    @classmethod
    def of(cls, state: SupervisorState) -> StateChange:
        return cls(
            state.supervisor_id,
            state.state,
            state.current_activity,
            state.progress,
            state.error_message,
            state.result,
        )


@dataclass(frozen=True, slots=True)
class PhaseChange:
    """Save point on a phase change: the row's phase, state, activity and progress,
    and a checkpoint row holding ``snapshot`` whole."""

    snapshot: SupervisorState


@dataclass(frozen=True, slots=True)
class CheckpointSaved:
    """The agent's ``checkpoint``: its data in the row, and a checkpoint row."""

    snapshot: SupervisorState


@dataclass(frozen=True, slots=True)
class MessageAdded:
    """One entry of the conversation history."""

    supervisor_id: uuid.UUID
    role: str
    content: Any


@dataclass(frozen=True, slots=True)
class QuestionAsked:
    """Save point on a question: its row, the pending entry and the new state."""

    supervisor_id: uuid.UUID
    question: PendingQuestion
    state: SupervisorStateEnum


@dataclass(frozen=True, slots=True)
class QuestionAnswered:
    """Save point on an answer: the one answer, out of the pending entries, and the
    supervisor's new state when given."""

    question_id: uuid.UUID
    answer: str
    answered_by_uid: int | None
    state: SupervisorStateEnum | None = None


@dataclass(frozen=True, slots=True)
class TaskSpawned:
    """Save point on a spawn: the task's row, the supervisor's list of tasks and,
    when it changes, its state."""

    task: TaskRecord
    state: SupervisorStateEnum | None = None


@dataclass(frozen=True, slots=True)
class TaskStarted:
    """A new attempt of the task's process has started."""

    task_id: uuid.UUID


@dataclass(frozen=True, slots=True)
class TaskFinished:
    """A task reached a final status."""

    task_id: uuid.UUID
    status: TaskStatus
    exit_code: int | None
    output_tail: str | None


@dataclass(frozen=True, slots=True)
class TasksEnded:
    """Every pending or running task of a supervisor is ``status`` now (cancelled
    when it ended, interrupted when it stopped)."""

    supervisor_id: uuid.UUID
    status: TaskStatus


@dataclass(frozen=True, slots=True)
class AnswersDelivered:
    """The agent has these answers."""

    question_ids: tuple[uuid.UUID, ...]


@dataclass(frozen=True, slots=True)
class Heartbeats:
    """One beat for every live supervisor (model.Heartbeat each), in one statement."""

    beats: tuple[Heartbeat, ...]


# ----------------------------------------------------------------- restoration (§7)


@dataclass(frozen=True, slots=True)
class StateRestored:
    """A restored (or repaired, reverted, fresh, failed) state, written whole."""

    state: SupervisorState


@dataclass(frozen=True, slots=True)
class StatesRestored:
    """Every restored state of a startup, written whole in one statement."""

    states: tuple[SupervisorState, ...]


@dataclass(frozen=True, slots=True)
class RestorationsCounted:
    """Step 10: one more restoration for each supervisor, from ``source``.
    ``saved``: each one's row version once its restored state was written, so
    that a retry after a lost commit reply counts nobody twice."""

    supervisor_ids: tuple[uuid.UUID, ...]
    source: RestorationSource
    saved: Mapping[uuid.UUID, int] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class QuestionRowsRepaired:
    """Rows in ``questions`` for pending questions that lack one (repair)."""

    supervisor_id: uuid.UUID
    questions: tuple[PendingQuestion, ...]


@dataclass(frozen=True, slots=True)
class TasksRequeued:
    """Tasks interrupted after ``since`` (all, with None) are pending again."""

    supervisor_id: uuid.UUID
    since: datetime | None


@dataclass(frozen=True, slots=True)
class QuestionsRedelivered:
    """Open questions delivered once more (``redelivery_count``+1 each)."""

    question_ids: tuple[uuid.UUID, ...]


# ----------------------------------------------------------------- daemon and API


@dataclass(frozen=True, slots=True)
class SupervisorCreated:
    """A new supervisor: its spec and its initial state row."""

    spec: SupervisorSpec


@dataclass(frozen=True, slots=True)
class DaemonRegistered:
    daemon_id: uuid.UUID
    host: str
    pid: int


@dataclass(frozen=True, slots=True)
class DaemonSeen:
    daemon_id: uuid.UUID

"""The store's commands: one frozen dataclass per kind of write (DESIGN §4, §5).

A command says what is to be saved, nothing about how: the store turns it into
one statement (makima.repository) and decides whether it goes out alone or
with others (group commit). Commands are plain values, easy to log and test.

Every write to a supervisor's rows carries its :class:`~makima.model.Fence` (the
owner daemon and lease epoch it runs under; a state carries its own), checked
by the statement itself (DESIGN §13).
"""

from __future__ import annotations

import uuid
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from makima.model import (
    NO_FENCE,
    Fence,
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
    "CancelUnheld",
    "CheckpointSaved",
    "DaemonRegistered",
    "Fence",
    "Heartbeat",
    "Heartbeats",
    "LeaseReleased",
    "LeaseRenewed",
    "MessageAdded",
    "PhaseChange",
    "QuestionAnswered",
    "QuestionAsked",
    "QuestionRowsRepaired",
    "QuestionsRedelivered",
    "RequestAdded",
    "RequestFinished",
    "RestorationsCounted",
    "StateChange",
    "StateRestored",
    "SupervisorCreated",
    "SupervisorsClaimed",
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
    fence: Fence = NO_FENCE

    @classmethod
    def of(cls, state: SupervisorState) -> StateChange:
        return cls(
            state.supervisor_id,
            state.state,
            state.current_activity,
            state.progress,
            state.error_message,
            state.result,
            Fence.of(state),
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
    fence: Fence = NO_FENCE


@dataclass(frozen=True, slots=True)
class QuestionAsked:
    """Save point on a question: its row, the pending entry and the new state."""

    supervisor_id: uuid.UUID
    question: PendingQuestion
    state: SupervisorStateEnum
    fence: Fence = NO_FENCE


@dataclass(frozen=True, slots=True)
class QuestionAnswered:
    """Save point on an answer: the one answer, out of the pending entries, and the
    supervisor's new state when given. ``fence``: the owner's (its state row is then
    written only if it holds); None: a daemon that does not run the supervisor
    records a person's answer for the one that does."""

    question_id: uuid.UUID
    answer: str
    answered_by_uid: int | None
    state: SupervisorStateEnum | None = None
    fence: Fence | None = None


@dataclass(frozen=True, slots=True)
class TaskSpawned:
    """Save point on a spawn: the task's row, the supervisor's list of tasks and,
    when it changes, its state."""

    task: TaskRecord
    state: SupervisorStateEnum | None = None
    fence: Fence = NO_FENCE


@dataclass(frozen=True, slots=True)
class TaskStarted:
    """A new attempt of the task's process has started."""

    task_id: uuid.UUID
    supervisor_id: uuid.UUID
    fence: Fence = NO_FENCE


@dataclass(frozen=True, slots=True)
class TaskFinished:
    """A task reached a final status."""

    task_id: uuid.UUID
    status: TaskStatus
    exit_code: int | None
    output_tail: str | None
    supervisor_id: uuid.UUID
    fence: Fence = NO_FENCE


@dataclass(frozen=True, slots=True)
class TasksEnded:
    """Every pending or running task of a supervisor is ``status`` now (cancelled
    when it ended, interrupted when it stopped)."""

    supervisor_id: uuid.UUID
    status: TaskStatus
    fence: Fence = NO_FENCE


@dataclass(frozen=True, slots=True)
class AnswersDelivered:
    """The agent has these answers (of ``supervisor_id``'s questions, under its fence;
    no supervisor: any question's, unfenced)."""

    question_ids: tuple[uuid.UUID, ...]
    supervisor_id: uuid.UUID | None = None
    fence: Fence = NO_FENCE


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
    fences: Mapping[uuid.UUID, Fence] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class QuestionRowsRepaired:
    """Rows in ``questions`` for pending questions that lack one (repair)."""

    supervisor_id: uuid.UUID
    questions: tuple[PendingQuestion, ...]
    fence: Fence = NO_FENCE


@dataclass(frozen=True, slots=True)
class TasksRequeued:
    """Tasks interrupted after ``since`` (all, with None) are pending again."""

    supervisor_id: uuid.UUID
    since: datetime | None
    fence: Fence = NO_FENCE


@dataclass(frozen=True, slots=True)
class QuestionsRedelivered:
    """Open questions delivered once more (``redelivery_count``+1 each), each under
    its supervisor's fence (``fences``, parallel; empty: nobody's)."""

    question_ids: tuple[uuid.UUID, ...]
    fences: tuple[Fence, ...] = ()


# ----------------------------------------------------------------- daemon and API


@dataclass(frozen=True, slots=True)
class SupervisorCreated:
    """A new supervisor: its spec and its initial state row, owned by ``owner``."""

    spec: SupervisorSpec
    owner: uuid.UUID | None = None


@dataclass(frozen=True, slots=True)
class DaemonRegistered:
    daemon_id: uuid.UUID
    host: str
    pid: int
    ttl: float = 0.0


# ----------------------------------------------------------------- leases (§13)


@dataclass(frozen=True, slots=True)
class LeaseRenewed:
    """The daemon's lease renewed for ``ttl`` seconds (database clock); ``running``:
    the supervisors it runs, with the fence each runs under, to learn which were
    taken over and what waits for them."""

    daemon_id: uuid.UUID
    host: str
    pid: int
    ttl: float
    running: Mapping[uuid.UUID, Fence]


@dataclass(frozen=True, slots=True)
class LeaseReleased:
    """A handover: the daemon lets go of its lease, so that peers claim at once."""

    daemon_id: uuid.UUID


@dataclass(frozen=True, slots=True)
class SupervisorsClaimed:
    """Claim what nobody holds a lease on (and, with ``own``, what this daemon owns)."""

    daemon_id: uuid.UUID
    own: bool
    only: uuid.UUID | None = None  # this one supervisor alone (a manual resume)
    running: tuple[uuid.UUID, ...] = ()  # its own that run here (the others are claimed)


@dataclass(frozen=True, slots=True)
class RequestAdded:
    """A person's cancel or resume, for the daemon that runs the supervisor."""

    request_id: uuid.UUID
    supervisor_id: uuid.UUID
    kind: str
    requested_by_uid: int | None
    daemon_id: uuid.UUID


@dataclass(frozen=True, slots=True)
class RequestFinished:
    """What came of a request."""

    request_id: uuid.UUID
    daemon_id: uuid.UUID
    outcome: Any


@dataclass(frozen=True, slots=True)
class CancelUnheld:
    """A person's cancel of a supervisor no live daemon runs: claimed as failed here,
    its unfinished tasks cancelled."""

    daemon_id: uuid.UUID
    supervisor_id: uuid.UUID
    reason: str

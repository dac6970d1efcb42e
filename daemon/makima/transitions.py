"""The legal state changes of a supervisor, as one table.

Pure. ``transition(state, event)`` returns the next state or raises
:class:`~makima.errors.IllegalTransitionError` naming the state and the event.
Terminal states (completed, failed) accept no event.
"""

from __future__ import annotations

import enum
from collections.abc import Mapping
from types import MappingProxyType

from makima.errors import IllegalTransitionError
from makima.model import SupervisorStateEnum as S


class Event(enum.StrEnum):
    """What can happen to a supervisor."""

    AGENT_STARTED = "agent_started"  # a fresh agent process took the supervisor
    ACTIVITY = "activity"  # activity, progress, phase, message, checkpoint
    ASK = "ask"  # the agent asked a question
    ANSWERED = "answered"  # the last open question was answered
    SPAWN = "spawn"  # the agent spawned a task
    WAIT_TASKS = "wait_tasks"  # the agent waits for its tasks
    TASKS_DONE = "tasks_done"  # no task is left running
    BLOCKED = "blocked"  # the agent cannot go on without outside help
    DONE = "done"  # the agent finished its goal
    FAIL = "fail"  # the agent gave up
    CANCEL = "cancel"  # a person cancelled the supervisor
    AGENT_EXITED = "agent_exited"  # the agent process ended without done/fail
    INTERRUPT = "interrupt"  # the daemon is shutting down gracefully
    RESUME = "resume"  # restoration: back to work
    RESUME_WAITING_FOR_USER = "resume_waiting_for_user"  # restoration: questions still open
    RESUME_WAITING_FOR_TASKS = "resume_waiting_for_tasks"  # restoration: tasks still running
    RESTORE_FAILED = "restore_failed"  # restoration found the state unrecoverable


_UNFINISHED = (
    S.INITIALIZING,
    S.IDLE,
    S.WORKING,
    S.WAITING_FOR_USER,
    S.WAITING_FOR_TASKS,
    S.BLOCKED,
    S.INTERRUPTED,
)
_RUNNING = (S.INITIALIZING, S.IDLE, S.WORKING, S.WAITING_FOR_USER, S.WAITING_FOR_TASKS, S.BLOCKED)


def _build() -> Mapping[tuple[S, Event], S]:
    table: dict[tuple[S, Event], S] = {}

    def allow(sources: tuple[S, ...], event: Event, target: S | None) -> None:
        """``target`` None means "stay in the same state"."""
        for source in sources:
            table[(source, event)] = source if target is None else target

    allow((S.INITIALIZING, S.IDLE, S.INTERRUPTED), Event.AGENT_STARTED, S.WORKING)
    allow(
        (S.WORKING, S.WAITING_FOR_USER, S.WAITING_FOR_TASKS, S.BLOCKED), Event.AGENT_STARTED, None
    )
    # Activity wakes an idle or blocked agent; while waiting, the wait stands.
    allow((S.INITIALIZING, S.IDLE, S.WORKING, S.BLOCKED), Event.ACTIVITY, S.WORKING)
    allow((S.WAITING_FOR_USER, S.WAITING_FOR_TASKS), Event.ACTIVITY, None)
    allow(_RUNNING, Event.ASK, S.WAITING_FOR_USER)
    allow((S.WAITING_FOR_USER,), Event.ANSWERED, S.WORKING)
    allow((S.INITIALIZING, S.IDLE, S.WORKING, S.BLOCKED), Event.SPAWN, S.WORKING)
    allow((S.WAITING_FOR_USER, S.WAITING_FOR_TASKS), Event.SPAWN, None)
    allow(_RUNNING, Event.WAIT_TASKS, S.WAITING_FOR_TASKS)
    allow((S.WAITING_FOR_TASKS,), Event.TASKS_DONE, S.WORKING)
    allow(_RUNNING, Event.BLOCKED, S.BLOCKED)
    allow(_RUNNING, Event.DONE, S.COMPLETED)
    allow(_RUNNING, Event.FAIL, S.FAILED)
    allow(_UNFINISHED, Event.CANCEL, S.FAILED)
    allow(_RUNNING, Event.AGENT_EXITED, S.INTERRUPTED)
    allow(_UNFINISHED, Event.INTERRUPT, S.INTERRUPTED)
    allow(_UNFINISHED, Event.RESUME, S.WORKING)
    allow(_UNFINISHED, Event.RESUME_WAITING_FOR_USER, S.WAITING_FOR_USER)
    allow(_UNFINISHED, Event.RESUME_WAITING_FOR_TASKS, S.WAITING_FOR_TASKS)
    allow(_UNFINISHED, Event.RESTORE_FAILED, S.FAILED)
    return MappingProxyType(table)


TRANSITIONS: Mapping[tuple[S, Event], S] = _build()


def transition(state: S, event: Event) -> S:
    """Return the state after ``event``, or raise if the event is illegal in ``state``."""
    try:
        return TRANSITIONS[(state, event)]
    except KeyError:
        raise IllegalTransitionError(state.value, event.value) from None


def is_allowed(state: S, event: Event) -> bool:
    return (state, event) in TRANSITIONS


def resume_event(*, has_pending_questions: bool, waiting_for_tasks: bool) -> Event:
    """Which resume event restores a supervisor with this outstanding work.

    Open questions win: the agent cannot go on until a person answers.
    """
    if has_pending_questions:
        return Event.RESUME_WAITING_FOR_USER
    if waiting_for_tasks:
        return Event.RESUME_WAITING_FOR_TASKS
    return Event.RESUME

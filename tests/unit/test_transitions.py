from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from makima.errors import IllegalTransitionError
from makima.model import SupervisorStateEnum as S
from makima.transitions import TRANSITIONS, Event, is_allowed, resume_event, transition


def test_happy_path() -> None:
    state = S.INITIALIZING
    for event, expected in [
        (Event.AGENT_STARTED, S.WORKING),
        (Event.SPAWN, S.WORKING),
        (Event.WAIT_TASKS, S.WAITING_FOR_TASKS),
        (Event.TASKS_DONE, S.WORKING),
        (Event.ASK, S.WAITING_FOR_USER),
        (Event.ACTIVITY, S.WAITING_FOR_USER),
        (Event.ANSWERED, S.WORKING),
        (Event.DONE, S.COMPLETED),
    ]:
        state = transition(state, event)
        assert state is expected


def test_illegal_transition_names_state_and_event() -> None:
    with pytest.raises(
        IllegalTransitionError, match=r"event 'ask' is not allowed .* state 'completed'"
    ):
        transition(S.COMPLETED, Event.ASK)
    with pytest.raises(IllegalTransitionError, match=r"'tasks_done'.*'working'"):
        transition(S.WORKING, Event.TASKS_DONE)


@given(st.sampled_from([S.COMPLETED, S.FAILED]), st.sampled_from(Event))
def test_terminal_states_accept_nothing(state: S, event: Event) -> None:
    assert not is_allowed(state, event)
    with pytest.raises(IllegalTransitionError):
        transition(state, event)


@given(st.sampled_from(S), st.sampled_from(Event))
def test_transition_is_the_table(state: S, event: Event) -> None:
    if (state, event) in TRANSITIONS:
        assert transition(state, event) is TRANSITIONS[(state, event)]
    else:
        with pytest.raises(IllegalTransitionError):
            transition(state, event)


@pytest.mark.parametrize("state", [s for s in S if s.is_unfinished])
def test_every_unfinished_state_can_be_interrupted_cancelled_and_resumed(state: S) -> None:
    assert transition(state, Event.INTERRUPT) is S.INTERRUPTED
    assert transition(state, Event.CANCEL) is S.FAILED
    assert transition(state, Event.RESUME) is S.WORKING
    assert transition(state, Event.RESUME_WAITING_FOR_USER) is S.WAITING_FOR_USER


def test_resume_event_prefers_open_questions() -> None:
    assert (
        resume_event(has_pending_questions=True, waiting_for_tasks=True)
        is Event.RESUME_WAITING_FOR_USER
    )
    assert (
        resume_event(has_pending_questions=False, waiting_for_tasks=True)
        is Event.RESUME_WAITING_FOR_TASKS
    )
    assert resume_event(has_pending_questions=False, waiting_for_tasks=False) is Event.RESUME

"""The pure parts of ``makima top``: the model (snapshot, events, selection, keys)
and the key decoder. No I/O, no clock: times are given."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Any

from makima.top import keys
from makima.top.keys import KeyDecoder
from makima.top.model import (
    FINISHED_LINGER,
    Answering,
    Browsing,
    ConfirmingCancel,
    Connection,
    Fetch,
    Quit,
    RowKey,
    RowKind,
    SendAnswer,
    SendCancel,
    TopModel,
)

T0 = datetime(2025, 3, 1, 12, 0, 0, tzinfo=UTC)
A = "aaaaaaaa-0000-0000-0000-000000000000"
B = "bbbbbbbb-0000-0000-0000-000000000000"
C = "cccccccc-0000-0000-0000-000000000000"


def at(seconds: float) -> datetime:
    return T0 + timedelta(seconds=seconds)


def row(sid: str, name: str, created: float, **fields: Any) -> dict[str, Any]:
    return {
        "supervisor_id": sid,
        "name": name,
        "state": "working",
        "phase": None,
        "progress": 0,
        "current_activity": None,
        "pending_questions": 0,
        "last_heartbeat": at(0).isoformat(),
        "created_at": at(created).isoformat(),
        **fields,
    }


def asked(
    qid: str, sid: str, when: float, *choices: str, kind: str = "question.asked"
) -> dict[str, Any]:
    return {
        "kind": kind,
        "question_id": qid,
        "supervisor_id": sid,
        "question": f"question {qid}?",
        "choices": list(choices),
        "context": None,
        "asked_at": at(when).isoformat(),
    }


def model_with_two() -> TopModel:
    model = TopModel()
    model.load([row(B, "beta", 2, pending_questions=1), row(A, "alpha", 1)])
    model.connected()
    model.apply_event(asked("q1", B, 10, "ship", "hold", kind="question.pending"), at(20))
    return model


def press(model: TopModel, *typed: str) -> list[Any]:
    effects: list[Any] = []
    for key in typed:
        effects += model.handle_key(key, at(30))
    return effects


# --------------------------------------------------------------------------- snapshot, events


def test_snapshot_then_events() -> None:
    model = model_with_two()
    assert [s.name for s in model.supervisor_rows()] == ["alpha", "beta"]  # oldest first
    assert model.questions_arrived and model.connection is Connection.CONNECTED

    # phase, progress, activity and heartbeat come with supervisor.updated
    model.apply_event(
        {
            "kind": "supervisor.updated",
            "supervisor_id": A,
            "phase": "checks",
            "progress": 40,
            "current_activity": "linting",
            "last_heartbeat": at(25).isoformat(),
        },
        at(25),
    )
    alpha = model.supervisors[A]
    assert (alpha.phase, alpha.progress, alpha.current_activity) == ("checks", 40, "linting")
    assert alpha.last_heartbeat == at(25)

    # questions: oldest first, whatever order they come in; answered ones go
    model.apply_event(asked("q0", A, 5), at(26))
    assert [q.question_id for q in model.question_rows()] == ["q0", "q1"]
    model.apply_event(
        {"kind": "question.answered", "supervisor_id": A, "question_id": "q0"}, at(27)
    )
    assert [q.question_id for q in model.question_rows()] == ["q1"]

    # a warning is shown
    model.apply_event(
        {"kind": "supervisor.warning", "supervisor_id": B, "warning": "started fresh"}, at(28)
    )
    notice = model.visible_notice(at(29))
    assert notice is not None and notice.error and notice.text == "beta: started fresh"


def test_an_unknown_supervisor_is_fetched_once() -> None:
    model = model_with_two()
    changed = {
        "kind": "supervisor.state_changed",
        "supervisor_id": C,
        "name": "gamma",
        "old_state": "initializing",
        "state": "working",
        "phase": None,
        "progress": 0,
        "error_message": None,
    }
    assert model.apply_event(changed, at(30)) == [Fetch(C)]
    assert model.supervisors[C].name == "gamma"  # shown at once, from the event
    # more events about it before the fetch returns: no second fetch
    assert model.apply_event({**changed, "state": "waiting_for_user"}, at(31)) == []
    assert model.apply_event(asked("q9", C, 31), at(31)) == []
    model.apply_fetched(
        {**row(C, "gamma", 30), "state": "waiting_for_user", "current_activity": "asking"}, at(32)
    )
    assert model.supervisors[C].current_activity == "asking"
    # an update for a supervisor never seen: fetched (not shown until then)
    assert model.apply_event(
        {"kind": "supervisor.updated", "supervisor_id": "d" * 8, "phase": "x"}, at(33)
    ) == [Fetch("d" * 8)]
    assert "d" * 8 not in model.supervisors


def test_finished_supervisors_linger_then_go() -> None:
    model = model_with_two()
    model.apply_event(
        {
            "kind": "supervisor.state_changed",
            "supervisor_id": B,
            "name": "beta",
            "state": "completed",
            "progress": 100,
        },
        at(40),
    )
    beta = model.supervisors[B]
    assert beta.finished and beta.progress == 100
    assert model.questions == {}  # its questions closed with it
    assert [s.name for s in model.supervisor_rows()] == ["alpha", "beta"]  # unfinished first
    assert not model.tick(at(40) + FINISHED_LINGER)
    assert model.tick(at(41) + FINISHED_LINGER)
    assert list(model.supervisors) == [A]


def test_a_new_snapshot_replaces_everything() -> None:
    model = model_with_two()
    model.connection_lost("the daemon closed the connection")
    assert model.connection is Connection.GONE and model.attempts == 1
    assert model.supervisors  # the last picture stays on screen meanwhile
    model.load([row(A, "alpha", 1, pending_questions=2)])
    model.connected()
    assert list(model.supervisors) == [A] and model.questions == {}
    assert not model.questions_arrived  # two are counted; their events come next
    model.apply_event(asked("q5", A, 1, kind="question.pending"), at(50))
    model.apply_event(asked("q6", A, 2, kind="question.pending"), at(50))
    assert model.questions_arrived


# --------------------------------------------------------------------------- selection, keys


def test_moving_and_the_selection_follows_its_row() -> None:
    model = model_with_two()
    rows = model.rows()
    assert rows == [
        RowKey(RowKind.SUPERVISOR, A),
        RowKey(RowKind.SUPERVISOR, B),
        RowKey(RowKind.QUESTION, "q1"),
    ]
    assert model.selected == rows[0]
    press(model, "j", keys.DOWN)
    assert model.selected == rows[2]
    press(model, "j")  # at the end: stays
    assert model.selected == rows[2]
    press(model, keys.UP, "k", "k")
    assert model.selected == rows[0]
    press(model, "j")
    # a supervisor that sorts before it appears: the selection stays on beta
    model.apply_event(
        {
            "kind": "supervisor.state_changed",
            "supervisor_id": C,
            "name": "early",
            "state": "working",
        },
        at(31),
    )
    model.supervisors[C].created_at = at(0)
    assert model.selected == RowKey(RowKind.SUPERVISOR, B)
    # its row goes: the one now where it was is selected
    del model.supervisors[B]
    assert model.selected == RowKey(RowKind.SUPERVISOR, A)


def test_answer_with_a_choice_number() -> None:
    model = model_with_two()
    press(model, "j")  # beta, whose question is the target
    assert press(model, "a") == []
    assert model.mode == Answering("q1")
    assert model.selected == RowKey(RowKind.QUESTION, "q1")
    press(model, "7")  # no such choice: ignored
    assert model.mode == Answering("q1")
    press(model, "2")
    assert model.picked_choice() == 2
    press(model, keys.UP)
    assert model.picked_choice() == 1
    press(model, keys.DOWN)
    effects = press(model, keys.ENTER)
    assert effects == [SendAnswer("q1", B, "hold")]
    assert model.mode == Browsing()
    # its question.answered is not "answered elsewhere"
    model.apply_event(
        {"kind": "question.answered", "supervisor_id": B, "question_id": "q1"}, at(31)
    )
    notice = model.visible_notice(at(31))
    assert notice is not None and "elsewhere" not in notice.text


def test_answer_free_text_and_abort() -> None:
    model = model_with_two()
    model.apply_event(asked("q2", A, 11), at(20))  # no choices: free text
    press(model, "a")  # alpha selected: its oldest question
    assert model.mode == Answering("q2")
    assert press(model, keys.ENTER) == []  # nothing typed: not sent
    assert model.mode == Answering("q2")
    press(model, *"v2 rcx", keys.BACKSPACE)
    assert model.mode == Answering("q2", "v2 rc")
    assert press(model, keys.ENTER) == [SendAnswer("q2", A, "v2 rc")]
    model.apply_event(
        {"kind": "question.answered", "supervisor_id": A, "question_id": "q2"}, at(31)
    )

    model.apply_event(asked("q3", A, 12), at(20))
    press(model, "a", "x", keys.ESCAPE)
    assert model.mode == Browsing()
    # answered elsewhere while typing: back to browsing, and it says so
    press(model, "a", "y")
    assert isinstance(model.mode, Answering)
    question = model.mode.question_id
    model.apply_event(
        {"kind": "question.answered", "supervisor_id": A, "question_id": question}, at(32)
    )
    assert model.mode == Browsing()
    notice = model.visible_notice(at(32))
    assert notice is not None and "elsewhere" in notice.text


def test_a_on_a_supervisor_without_questions() -> None:
    model = model_with_two()
    assert press(model, "a") == []
    assert model.mode == Browsing()
    notice = model.visible_notice(at(30))
    assert notice is not None and notice.text == "alpha has no open question"


def test_cancel_asks_first_and_q_quits() -> None:
    model = model_with_two()
    press(model, "c")
    assert model.mode == ConfirmingCancel(A)
    assert press(model, "n") == []
    assert model.mode == Browsing()
    press(model, "j", "j", "c")  # on beta's question: its supervisor
    assert model.mode == ConfirmingCancel(B)
    assert press(model, "y") == [SendCancel(B, "beta")]
    # a finished supervisor is not cancelled again
    model.apply_event(
        {"kind": "supervisor.state_changed", "supervisor_id": B, "name": "beta", "state": "failed"},
        at(33),
    )
    press(model, keys.HOME, "j", "c")
    assert model.mode == Browsing()
    assert press(model, "q") == [Quit()]
    # "q" while typing an answer is a letter
    model.apply_event(asked("q4", A, 1), at(34))
    press(model, keys.HOME, "a", "q")
    assert model.mode == Answering("q4", "q")


def test_a_failed_call_is_shown() -> None:
    model = model_with_two()
    effect = SendAnswer("q1", B, "ship")
    model.failed(effect, "invalid_answer", at(40))
    notice = model.visible_notice(at(41))
    assert notice is not None and notice.error and "invalid_answer" in notice.text
    assert model.visible_notice(at(60)) is None  # it fades


# --------------------------------------------------------------------------- keys


def test_key_decoder() -> None:
    decoder = KeyDecoder()
    assert decoder.feed(b"\x1b[A\x1b[Bjk\x1bOA\r\n\x7f") == [
        keys.UP,
        keys.DOWN,
        "j",
        "k",
        keys.UP,
        keys.ENTER,
        keys.ENTER,
        keys.BACKSPACE,
    ]
    assert decoder.feed(b"\x1b[5~\x1b[6~\x1b[1;5C") == [keys.PAGE_UP, keys.PAGE_DOWN, keys.RIGHT]
    # a lone ESC waits: the start of a sequence, or Escape?
    assert decoder.feed(b"\x1b") == []
    assert decoder.pending
    assert decoder.feed(b"[") == []
    assert decoder.feed(b"B") == [keys.DOWN]
    assert decoder.feed(b"\x1b") == [] and decoder.flush() == [keys.ESCAPE]
    assert not decoder.pending
    assert decoder.feed(b"\x1b\x1b") == [keys.ESCAPE] and decoder.flush() == [keys.ESCAPE]
    # UTF-8 split across reads; unknown sequences and control bytes mean nothing
    assert decoder.feed("é".encode()[:1]) == []
    assert decoder.feed("é".encode()[1:] + b"\x1b[200~\x01") == ["é"]
    assert decoder.feed(b"\x1bx") == [keys.ESCAPE, "x"]

"""The pure parts of ``makima notify``: questions read from hostile events, the
payload and texts, the signature, and the record's decisions."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import anyio
import pytest

from makima.notify import message as m
from makima.notify.message import Notice, NoticeKind, notice_from_event, question_from_event
from makima.notify.signature import sign, signature_headers, verify
from makima.notify.state import NotifyState
from makima.notify.statefile import StateKeeper, default_state_file, load_state

QID = "6f1c2a8e-0000-4000-8000-000000000001"
SID = "9a2b3c4d-0000-4000-8000-000000000002"


def event(kind: str = "question.asked", **fields: Any) -> dict[str, Any]:
    base: dict[str, Any] = {
        "kind": kind,
        "question_id": QID,
        "supervisor_id": SID,
        "question": "Ship it?",
        "choices": ["ship", "hold"],
        "context": {"version": "2.1.0"},
        "asked_at": "2026-01-01T00:00:00+00:00",
    }
    base.update(fields)
    return base


def notice(kind: str = "question.asked", **fields: Any) -> Notice:
    found = notice_from_event(event(kind, **fields), "release")
    assert found is not None
    return found


# --------------------------------------------------------------------------- message


def test_a_question_event_becomes_a_notice() -> None:
    asked = notice()
    assert asked.kind is NoticeKind.ASKED
    assert asked.question.choices == ("ship", "hold")
    assert asked.question.context == {"version": "2.1.0"}
    assert not asked.question.truncated
    for kind in ("question.pending", "question.redelivered"):
        assert notice(kind).kind is NoticeKind.ASKED
    answered = notice("question.answered", answer="hold", answered_at="2026-01-01T00:01:00Z")
    assert answered.kind is NoticeKind.ANSWERED and answered.answer == "hold"
    assert notice_from_event(event("task.spawned"), "x") is None


@pytest.mark.parametrize(
    "bad",
    [
        {"question_id": None},
        {"question_id": 7},
        {"question_id": "../../etc/passwd"},
        {"supervisor_id": "x" * 101},
        {"question_id": "a b"},
    ],
)
def test_an_event_with_malformed_ids_is_refused(bad: dict[str, Any]) -> None:
    assert question_from_event(event(**bad)) is None


def test_hostile_text_is_cleaned_and_bounded() -> None:
    question = question_from_event(
        event(
            question="a\x00b\x1b[31mc\u202ed\ne" + "x" * 5000,
            choices=["ok", "we\nird", 7, "y" * 500, *[f"c{i}" for i in range(40)]],
            context={"blob": "z" * 10_000},
        )
    )
    assert question is not None
    assert question.question.startswith("ab[31mcd\ne")
    assert len(question.question) == m.MAX_QUESTION and question.question.endswith(m.ELLIPSIS)
    assert len(question.choices) <= m.MAX_CHOICES
    assert question.choices[:2] == ("ok", "we ird")
    assert len(question.choices[2]) == m.MAX_CHOICE
    assert question.truncated
    assert isinstance(question.context, str) and len(question.context) <= m.MAX_CONTEXT
    body = m.encode_payload(Notice(NoticeKind.ASKED, question, "n" * 50, "question.asked"))
    assert len(body) < 32 * 1024  # whatever the agent sent


def test_only_verbatim_choices_become_actions() -> None:
    question = question_from_event(event(choices=["ship", "we\nird", "y" * 500, "hold"]))
    assert question is not None
    assert m.desktop_actions(question) == ["choice-0", "ship", "choice-3", "hold"]
    assert m.choice_for_action(question, "choice-3") == "hold"
    for key in ("choice-1", "choice-2", "choice-9", "choice-", "choice-01x", "default", ""):
        assert m.choice_for_action(question, key) is None


def test_the_payload_names_supervisor_question_and_choices() -> None:
    body = json.loads(m.encode_payload(notice()))
    assert body["type"] == "question.asked"
    assert body["event"] == "question.asked"
    assert body["question_id"] == QID and body["supervisor_id"] == SID
    assert body["supervisor_name"] == "release"
    assert body["choices"] == ["ship", "hold"]
    assert body["title"] == "makima: release asks"
    assert "Ship it?" in body["message"] and "ship / hold" in body["message"]
    assert body["text"].startswith(body["title"])
    assert body["delivery_id"] == notice("question.pending").delivery_id
    answered = json.loads(m.encode_payload(notice("question.answered", answer="hold")))
    assert answered["type"] == "question.answered" and answered["answer"] == "hold"
    assert answered["delivery_id"] != body["delivery_id"]


def test_desktop_text_escapes_markup_only_where_it_is_read() -> None:
    hostile = notice(question="<b>bold</b> & <a href='x'>link</a>")
    _, plain = m.desktop_text(hostile, markup=False, actions=True)
    _, escaped = m.desktop_text(hostile, markup=True, actions=True)
    assert "<b>bold</b>" in plain
    assert "&lt;b&gt;bold&lt;/b&gt; &amp; &lt;a" in escaped and "<" not in escaped
    _, without_actions = m.desktop_text(notice(), markup=False, actions=False)
    assert f"makima answer {QID[:8]}" in without_actions


def test_exec_environment() -> None:
    env = m.exec_environment(notice("question.answered", answer="hold"))
    assert env["MAKIMA_EVENT"] == "question.answered"
    assert env["MAKIMA_SOURCE_EVENT"] == "question.answered"
    assert env["MAKIMA_CHOICES"] == "ship\nhold"
    assert env["MAKIMA_ANSWER"] == "hold"
    assert all("\x00" not in v for v in env.values())


# --------------------------------------------------------------------------- signature


def test_the_signature_covers_timestamp_and_exact_body() -> None:
    body = b'{"question":"Ship it?"}'
    headers = signature_headers("s3cret", 1_767_225_600, body)
    assert headers["X-Makima-Timestamp"] == "1767225600"
    signature = headers["X-Makima-Signature"]
    assert signature == sign(b"s3cret", 1_767_225_600, body)
    assert signature.startswith("sha256=") and len(signature) == 7 + 64
    assert verify("s3cret", body, "1767225600", signature, now=1_767_225_610)
    assert not verify("other", body, "1767225600", signature, now=1_767_225_610)
    assert not verify("s3cret", body + b" ", "1767225600", signature, now=1_767_225_610)
    assert not verify("s3cret", body, "1767225601", signature, now=1_767_225_610)
    assert not verify("s3cret", body, "1767225600", signature, now=1_767_225_600 + 301)
    assert not verify("s3cret", body, None, signature, now=1_767_225_610)
    assert not verify("s3cret", body, "-1", signature, now=1_767_225_610)
    assert not verify("s3cret", body, "1767225600", "sha256=00", now=1_767_225_610)


# --------------------------------------------------------------------------- record


def test_each_notifier_is_told_once_and_only_after_success() -> None:
    state = NotifyState()
    wanted = {NoticeKind.ASKED}
    assert state.plan(notice(), ["web", "exec"], wanted) == ["web", "exec"]
    assert state.mark_told(QID, NoticeKind.ASKED, "web")
    assert not state.mark_told(QID, NoticeKind.ASKED, "web")
    # the snapshot and redelivery send it again: only the notifier not yet told is owed it
    assert state.plan(notice("question.pending"), ["web", "exec"], wanted) == ["exec"]
    assert state.plan(notice("question.redelivered"), ["web", "exec"], wanted) == ["exec"]
    state.mark_told(QID, NoticeKind.ASKED, "exec")
    assert state.plan(notice("question.pending"), ["web", "exec"], wanted) == []
    # a notifier added later is told about it
    assert state.plan(notice("question.pending"), ["web", "exec", "desktop"], wanted) == ["desktop"]


def test_answered_closes_and_is_told_only_when_wanted() -> None:
    state = NotifyState()
    state.plan(notice(), ["web"], {NoticeKind.ASKED})
    answered = notice("question.answered", answer="ship")
    assert state.plan(answered, ["web"], {NoticeKind.ASKED}) == []
    assert state.is_closed(QID)
    # an old copy of the question does not reopen it
    assert state.plan(notice("question.pending"), ["web"], {NoticeKind.ASKED}) == []
    both = {NoticeKind.ASKED, NoticeKind.ANSWERED}
    assert state.plan(answered, ["web"], both) == ["web"]
    state.mark_told(QID, NoticeKind.ANSWERED, "web")
    assert state.plan(answered, ["web"], both) == []


def test_prune_forgets_questions_no_longer_open() -> None:
    state = NotifyState()
    other = "6f1c2a8e-0000-4000-8000-000000000009"
    state.plan(notice(), ["web"], {NoticeKind.ASKED})
    state.plan(notice(question_id=other), ["web"], {NoticeKind.ASKED})
    assert state.prune([other]) == [QID]
    assert list(state.entries) == [other]
    assert state.close_supervisor(SID) == [other]
    assert state.close_supervisor(SID) == []


def test_the_record_is_bounded_closed_questions_going_first() -> None:
    state = NotifyState(limit=3)
    ids = [f"q{i}" for i in range(5)]
    for qid in ids[:3]:
        state.plan(notice(question_id=qid), ["web"], {NoticeKind.ASKED})
    state.plan(notice("question.answered", question_id="q1"), ["web"], {NoticeKind.ASKED})
    state.plan(notice(question_id="q3"), ["web"], {NoticeKind.ASKED})
    assert list(state.entries) == ["q0", "q2", "q3"]  # the closed q1 went first
    state.plan(notice(question_id="q4"), ["web"], {NoticeKind.ASKED})
    assert list(state.entries) == ["q2", "q3", "q4"]  # then the oldest


def test_the_record_round_trips_and_survives_garbage() -> None:
    state = NotifyState()
    state.plan(notice(), ["web", "exec"], {NoticeKind.ASKED})
    state.mark_told(QID, NoticeKind.ASKED, "web")
    back, problems = NotifyState.from_json(json.loads(json.dumps(state.to_json())))
    assert problems == []
    assert back.told(QID, NoticeKind.ASKED, "web")
    assert not back.told(QID, NoticeKind.ASKED, "exec")
    garbage: Any
    for garbage in (None, [], {"version": 99}, {"version": 1, "questions": []}):
        empty, problems = NotifyState.from_json(garbage)
        assert len(empty) == 0 and problems
    mixed = state.to_json()
    mixed["questions"]["bad"] = {"supervisor_id": 5}
    mixed["questions"]["worse"] = {"supervisor_id": "s", "told": {"asked": [1]}}
    back, problems = NotifyState.from_json(mixed)
    assert list(back.entries) == [QID] and problems == ["2 malformed entries left out"]


def test_the_state_file(tmp_path: Path) -> None:
    path = default_state_file({"XDG_STATE_HOME": str(tmp_path)}, Path("/run/makima.sock"))
    assert path.parent == tmp_path / "makima" and path.name.startswith("notify-")
    assert path != default_state_file({"XDG_STATE_HOME": str(tmp_path)}, Path("/x.sock"))
    assert len(load_state(path)) == 0  # none yet
    path.parent.mkdir(parents=True)
    path.write_text("{not json")
    assert len(load_state(path)) == 0  # unreadable: start afresh

    async def keep() -> None:
        keeper = StateKeeper(path, NotifyState())
        async with anyio.create_task_group() as tg:
            await tg.start(keeper.run)
            keeper.state.plan(notice(), ["web"], {NoticeKind.ASKED})
            keeper.changed()
            keeper.state.mark_told(QID, NoticeKind.ASKED, "web")
            keeper.changed()
            tg.cancel_scope.cancel()  # at once: what is left is written on the way out
        assert not keeper.dirty

    anyio.run(keep)
    assert load_state(path).told(QID, NoticeKind.ASKED, "web")
    assert [p.name for p in path.parent.iterdir()] == [path.name]  # no temporary left

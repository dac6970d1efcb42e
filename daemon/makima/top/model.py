"""What ``makima top`` knows and what a key does (pure: no I/O, no clock).

The state is built from one snapshot (``supervisor.list`` and the
``question.pending`` events that open a subscription) and then from events
alone. Every method that changes it bumps :attr:`TopModel.revision` and
returns the :data:`Effect` values the I/O side must carry out (fetch a
supervisor it has not seen, send an answer, cancel, quit). Times come in as
arguments (``now``, aware UTC datetimes), so tests drive the clock.

The selection is one row of a flat list: the supervisors (unfinished first,
oldest first), then the open questions (oldest first). It is kept by identity,
so rows that appear or go away do not move it to another supervisor.
"""

from __future__ import annotations

import dataclasses
import enum
from collections.abc import Iterable, Mapping
from datetime import datetime, timedelta
from typing import Any

from makima.top import keys

FINISHED_LINGER = timedelta(seconds=60)
"""How long a supervisor that completed or failed stays on screen."""
NOTICE_TTL = timedelta(seconds=8)
"""How long a message at the bottom (answered, cancelled, an error) stays."""
ANSWER_MAX = 4000
"""Characters a free-text answer may have in the editor."""
PAGE = 10

TERMINAL_STATES = frozenset({"completed", "failed"})
KINDS = (
    "question.pending",
    "question.asked",
    "question.redelivered",
    "question.answered",
    "supervisor.state_changed",
    "supervisor.restored",
    "supervisor.warning",
    "supervisor.updated",
)
"""The event kinds ``makima top`` subscribes to."""


# --------------------------------------------------------------------------- rows


@dataclasses.dataclass(slots=True)
class SupervisorRow:
    supervisor_id: str
    name: str
    state: str
    phase: str | None = None
    progress: int = 0
    current_activity: str | None = None
    last_heartbeat: datetime | None = None
    error_message: str | None = None
    created_at: datetime | None = None
    finished_at: datetime | None = None  # when top saw it finish (for FINISHED_LINGER)

    @property
    def finished(self) -> bool:
        return self.state in TERMINAL_STATES


@dataclasses.dataclass(frozen=True, slots=True)
class QuestionRow:
    question_id: str
    supervisor_id: str
    question: str
    choices: tuple[str, ...]
    context: str | None
    asked_at: datetime | None


class RowKind(enum.StrEnum):
    SUPERVISOR = "supervisor"
    QUESTION = "question"


@dataclasses.dataclass(frozen=True, slots=True)
class RowKey:
    kind: RowKind
    id: str


# --------------------------------------------------------------------------- modes


@dataclasses.dataclass(frozen=True, slots=True)
class Browsing:
    """Moving between rows."""


@dataclasses.dataclass(frozen=True, slots=True)
class Answering:
    """Typing an answer: a choice's number, or free text when there are no choices."""

    question_id: str
    text: str = ""


@dataclasses.dataclass(frozen=True, slots=True)
class ConfirmingCancel:
    supervisor_id: str


Mode = Browsing | Answering | ConfirmingCancel


class Connection(enum.StrEnum):
    CONNECTING = "connecting"
    CONNECTED = "connected"
    GONE = "gone"


@dataclasses.dataclass(frozen=True, slots=True)
class Notice:
    text: str
    error: bool
    at: datetime


# --------------------------------------------------------------------------- effects


@dataclasses.dataclass(frozen=True, slots=True)
class Fetch:
    """Read a supervisor top has not seen yet (``supervisor.get``)."""

    supervisor_id: str


@dataclasses.dataclass(frozen=True, slots=True)
class SendAnswer:
    question_id: str
    supervisor_id: str
    answer: str


@dataclasses.dataclass(frozen=True, slots=True)
class SendCancel:
    supervisor_id: str
    name: str


@dataclasses.dataclass(frozen=True, slots=True)
class Quit:
    pass


Effect = Fetch | SendAnswer | SendCancel | Quit


# --------------------------------------------------------------------------- parsing


def parse_time(value: Any) -> datetime | None:
    """An ISO 8601 text from the daemon, or None when absent or unreadable."""
    if not isinstance(value, str):
        return None
    try:
        parsed = datetime.fromisoformat(value.replace("Z", "+00:00"))
    except ValueError:
        return None
    return parsed if parsed.tzinfo is not None else None


def _text(value: Any) -> str | None:
    return value if isinstance(value, str) else None


def _progress(value: Any, default: int = 0) -> int:
    if isinstance(value, int) and not isinstance(value, bool):
        return max(0, min(100, value))
    return default


def _count(value: Any) -> int:
    return value if isinstance(value, int) and not isinstance(value, bool) and value > 0 else 0


def _choices(value: Any) -> tuple[str, ...]:
    if not isinstance(value, list):
        return ()
    return tuple(str(c) for c in value)


def question_from(fields: Mapping[str, Any]) -> QuestionRow | None:
    """A question event's (or ``question.list``'s) flattened fields as a row."""
    qid = fields.get("question_id")
    sid = fields.get("supervisor_id")
    if not isinstance(qid, str) or not isinstance(sid, str):
        return None
    return QuestionRow(
        question_id=qid,
        supervisor_id=sid,
        question=str(fields.get("question") or ""),
        choices=_choices(fields.get("choices")),
        context=_text(fields.get("context")),
        asked_at=parse_time(fields.get("asked_at")),
    )


def supervisor_from(fields: Mapping[str, Any]) -> SupervisorRow | None:
    """A ``supervisor.list`` row or a ``supervisor.get`` body as a row."""
    sid = fields.get("supervisor_id")
    state = fields.get("state")
    if not isinstance(sid, str) or not isinstance(state, str):
        return None
    return SupervisorRow(
        supervisor_id=sid,
        name=str(fields.get("name") or sid[:8]),
        state=state,
        phase=_text(fields.get("phase")),
        progress=_progress(fields.get("progress")),
        current_activity=_text(fields.get("current_activity")),
        last_heartbeat=parse_time(fields.get("last_heartbeat")),
        error_message=_text(fields.get("error_message")),
        created_at=parse_time(fields.get("created_at")),
    )


def _sort_time(value: datetime | None) -> tuple[int, str]:
    return (1, "") if value is None else (0, value.isoformat())


# --------------------------------------------------------------------------- the model


class TopModel:
    def __init__(self, *, keys_enabled: bool = True) -> None:
        self.supervisors: dict[str, SupervisorRow] = {}
        self.questions: dict[str, QuestionRow] = {}
        self.mode: Mode = Browsing()
        self.connection = Connection.CONNECTING
        self.connection_detail: str | None = None
        self.attempts = 0  # reconnection attempts since the connection was lost
        self.notice: Notice | None = None
        self.keys_enabled = keys_enabled
        self.loaded = False  # a snapshot has been taken
        self.expected_questions = 0  # open questions the snapshot's rows counted
        self.snapshots = 0  # snapshots taken (one per connection)
        self.revision = 0
        self._selected: RowKey | None = None
        self._index = 0  # where the selection was, for when its row goes away
        self._fetching: set[str] = set()
        self._sent: set[str] = set()  # questions answered from here

    # ----------------------------------------------------------------- views

    def supervisor_rows(self) -> list[SupervisorRow]:
        """Unfinished first, each group oldest first."""
        return sorted(
            self.supervisors.values(),
            key=lambda s: (s.finished, _sort_time(s.created_at), s.name, s.supervisor_id),
        )

    def question_rows(self) -> list[QuestionRow]:
        """Oldest first."""
        return sorted(
            self.questions.values(), key=lambda q: (_sort_time(q.asked_at), q.question_id)
        )

    def rows(self) -> list[RowKey]:
        return [RowKey(RowKind.SUPERVISOR, s.supervisor_id) for s in self.supervisor_rows()] + [
            RowKey(RowKind.QUESTION, q.question_id) for q in self.question_rows()
        ]

    @property
    def selected(self) -> RowKey | None:
        """The selected row: the one chosen if it is still there, else the row now
        where it was."""
        rows = self.rows()
        if not rows:
            return None
        if self._selected in rows:
            return self._selected
        return rows[min(self._index, len(rows) - 1)]

    def name_of(self, supervisor_id: str) -> str:
        row = self.supervisors.get(supervisor_id)
        return row.name if row is not None else supervisor_id[:8]

    def open_questions_of(self, supervisor_id: str) -> list[QuestionRow]:
        return [q for q in self.question_rows() if q.supervisor_id == supervisor_id]

    def target_question(self) -> QuestionRow | None:
        """The selected question, or the selected supervisor's oldest one."""
        key = self.selected
        if key is None:
            return None
        if key.kind is RowKind.QUESTION:
            return self.questions.get(key.id)
        waiting = self.open_questions_of(key.id)
        return waiting[0] if waiting else None

    def target_supervisor(self) -> SupervisorRow | None:
        """The selected supervisor, or the selected question's."""
        key = self.selected
        if key is None:
            return None
        if key.kind is RowKind.SUPERVISOR:
            return self.supervisors.get(key.id)
        question = self.questions.get(key.id)
        return None if question is None else self.supervisors.get(question.supervisor_id)

    def answering(self) -> QuestionRow | None:
        mode = self.mode
        return self.questions.get(mode.question_id) if isinstance(mode, Answering) else None

    @property
    def questions_arrived(self) -> bool:
        """The snapshot's open questions (as many as its rows counted) are in."""
        return self.loaded and len(self.questions) >= self.expected_questions

    def visible_notice(self, now: datetime) -> Notice | None:
        notice = self.notice
        if notice is None or now - notice.at > NOTICE_TTL:
            return None
        return notice

    # ----------------------------------------------------------------- changes

    def _changed(self) -> None:
        self.revision += 1

    def say(self, text: str, now: datetime, *, error: bool = False) -> None:
        self.notice = Notice(text, error, now)
        self._changed()

    def connected(self) -> None:
        self.connection = Connection.CONNECTED
        self.connection_detail = None
        self.attempts = 0
        self._changed()

    def connection_lost(self, reason: str) -> None:
        self.connection = Connection.GONE
        self.connection_detail = reason
        self.attempts += 1
        self._fetching.clear()
        self._changed()

    def load(self, supervisors: Iterable[Mapping[str, Any]]) -> None:
        """A new snapshot: ``supervisor.list``'s rows. The open questions come next,
        as the subscription's ``question.pending`` events."""
        self.supervisors = {}
        self.expected_questions = 0
        for fields in supervisors:
            row = supervisor_from(fields)
            if row is not None:
                self.supervisors[row.supervisor_id] = row
                self.expected_questions += _count(fields.get("pending_questions"))
        self.questions = {}
        self._fetching.clear()
        self.loaded = True
        self.snapshots += 1
        self._check_mode()
        self._changed()

    def apply_event(self, event: Mapping[str, Any], now: datetime) -> list[Effect]:
        """Apply one event's params; the supervisors to fetch, if any."""
        kind = event.get("kind")
        sid = event.get("supervisor_id")
        if not isinstance(sid, str):
            return []
        effects: list[Effect] = []
        if kind in ("question.pending", "question.asked", "question.redelivered"):
            question = question_from(event)
            if question is None:
                return []
            self.questions[question.question_id] = question
            effects = self._know(sid)
        elif kind == "question.answered":
            qid = event.get("question_id")
            if isinstance(qid, str) and self.questions.pop(qid, None) is not None:
                mine = qid in self._sent
                self._sent.discard(qid)
                mode = self.mode
                if not mine and isinstance(mode, Answering) and mode.question_id == qid:
                    self.say("that question was answered elsewhere", now)
        elif kind in ("supervisor.state_changed", "supervisor.restored"):
            effects = self._on_state(sid, event, now)
        elif kind == "supervisor.updated":
            row = self.supervisors.get(sid)
            if row is None:
                return self._know(sid)
            row.phase = _text(event.get("phase"))
            row.progress = _progress(event.get("progress"), row.progress)
            row.current_activity = _text(event.get("current_activity"))
            row.last_heartbeat = parse_time(event.get("last_heartbeat")) or row.last_heartbeat
        elif kind == "supervisor.warning":
            warning = event.get("warning") or event.get("message") or "warning"
            self.say(f"{self.name_of(sid)}: {warning}", now, error=True)
        else:
            return []
        self._check_mode()
        self._changed()
        return effects

    def _on_state(self, sid: str, event: Mapping[str, Any], now: datetime) -> list[Effect]:
        state = event.get("state")
        if not isinstance(state, str):
            return []
        row = self.supervisors.get(sid)
        effects: list[Effect] = []
        if row is None:
            # Not in the snapshot: new (or restored). Shown at once from the event,
            # completed by one supervisor.get.
            row = SupervisorRow(sid, str(event.get("name") or sid[:8]), state)
            self.supervisors[sid] = row
            effects = self._know(sid, present=False)
        was_finished = row.finished
        row.state = state
        if isinstance(event.get("name"), str):
            row.name = event["name"]
        if "phase" in event:
            row.phase = _text(event.get("phase"))
        row.progress = _progress(event.get("progress"), row.progress)
        if "error_message" in event:
            row.error_message = _text(event.get("error_message"))
        if row.finished and not was_finished:
            row.finished_at = now
            # Its questions are closed with it.
            for qid in [q.question_id for q in self.open_questions_of(sid)]:
                del self.questions[qid]
        elif not row.finished:
            row.finished_at = None
        return effects

    def _know(self, sid: str, *, present: bool = True) -> list[Effect]:
        """Fetch a supervisor once, when an event names one top has not seen."""
        if (present and sid in self.supervisors) or sid in self._fetching:
            return []
        self._fetching.add(sid)
        return [Fetch(sid)]

    def apply_fetched(self, body: Mapping[str, Any], now: datetime) -> None:
        """``supervisor.get``'s answer for a :class:`Fetch`."""
        row = supervisor_from(body)
        if row is None:
            return
        self._fetching.discard(row.supervisor_id)
        old = self.supervisors.get(row.supervisor_id)
        if row.finished:
            row.finished_at = old.finished_at if old and old.finished_at else now
        beat = None if old is None else old.last_heartbeat
        if beat is not None and (row.last_heartbeat is None or beat > row.last_heartbeat):
            row.last_heartbeat = beat  # an event newer than the row read
        self.supervisors[row.supervisor_id] = row
        self._check_mode()
        self._changed()

    def fetch_failed(self, supervisor_id: str) -> None:
        self._fetching.discard(supervisor_id)

    def answered(self, effect: SendAnswer, now: datetime) -> None:
        self.say(f"answered {self.name_of(effect.supervisor_id)}: {effect.answer}", now)

    def cancelled(self, effect: SendCancel, state: str, now: datetime) -> None:
        self.say(f"cancelled {effect.name} ({state})", now)

    def failed(self, effect: Effect, message: str, now: datetime) -> None:
        if isinstance(effect, SendAnswer):
            self._sent.discard(effect.question_id)
            self.say(f"answer not sent: {message}", now, error=True)
        elif isinstance(effect, SendCancel):
            self.say(f"{effect.name} not cancelled: {message}", now, error=True)
        elif isinstance(effect, Fetch):
            self.fetch_failed(effect.supervisor_id)

    def tick(self, now: datetime) -> bool:
        """The clock moved on: finished supervisors past their linger go. True when
        something went."""
        gone = [
            sid
            for sid, row in self.supervisors.items()
            if row.finished_at is not None and now - row.finished_at > FINISHED_LINGER
        ]
        for sid in gone:
            del self.supervisors[sid]
        if gone:
            self._check_mode()
            self._changed()
        return bool(gone)

    def _check_mode(self) -> None:
        """Leave a mode whose question or supervisor has gone."""
        mode = self.mode
        if isinstance(mode, Answering) and mode.question_id not in self.questions:
            self.mode = Browsing()
        elif isinstance(mode, ConfirmingCancel):
            row = self.supervisors.get(mode.supervisor_id)
            if row is None or row.finished:
                self.mode = Browsing()

    # ----------------------------------------------------------------- keys

    def handle_key(self, key: str, now: datetime) -> list[Effect]:
        """What ``key`` does in the current mode."""
        mode = self.mode
        if isinstance(mode, Answering):
            effects = self._answer_key(mode, key, now)
        elif isinstance(mode, ConfirmingCancel):
            effects = self._cancel_key(mode, key, now)
        else:
            effects = self._browse_key(key, now)
        self._changed()
        return effects

    def _select_index(self, index: int) -> None:
        rows = self.rows()
        if not rows:
            self._selected, self._index = None, 0
            return
        self._index = max(0, min(index, len(rows) - 1))
        self._selected = rows[self._index]

    def _move(self, step: int) -> None:
        rows = self.rows()
        current = self.selected
        index = rows.index(current) if current in rows else self._index
        self._select_index(index + step)

    def _browse_key(self, key: str, now: datetime) -> list[Effect]:
        if key in (keys.UP, "k"):
            self._move(-1)
        elif key in (keys.DOWN, "j"):
            self._move(1)
        elif key == keys.PAGE_UP:
            self._move(-PAGE)
        elif key == keys.PAGE_DOWN:
            self._move(PAGE)
        elif key in (keys.HOME, "g"):
            self._select_index(0)
        elif key in (keys.END, "G"):
            self._select_index(len(self.rows()) - 1)
        elif key == "q":
            return [Quit()]
        elif key == "a":
            self._start_answer(now)
        elif key == "c":
            self._start_cancel(now)
        elif key == keys.ESCAPE:
            self.notice = None
        return []

    def _start_answer(self, now: datetime) -> None:
        question = self.target_question()
        if question is None:
            supervisor = self.target_supervisor()
            where = f"{supervisor.name} has" if supervisor is not None else "there is"
            self.say(f"{where} no open question", now, error=True)
            return
        self._selected = RowKey(RowKind.QUESTION, question.question_id)
        self.mode = Answering(question.question_id)
        self.notice = None

    def _start_cancel(self, now: datetime) -> None:
        supervisor = self.target_supervisor()
        if supervisor is None:
            self.say("no supervisor selected", now, error=True)
            return
        if supervisor.finished:
            self.say(f"{supervisor.name} has already {supervisor.state}", now, error=True)
            return
        self.mode = ConfirmingCancel(supervisor.supervisor_id)
        self.notice = None

    def _answer_key(self, mode: Answering, key: str, now: datetime) -> list[Effect]:
        question = self.questions.get(mode.question_id)
        if question is None or key == keys.ESCAPE:
            self.mode = Browsing()
            return []
        choices = question.choices
        text = mode.text
        if key == keys.ENTER:
            answer = self._answer_text(question, text)
            if answer is None:
                hint = (
                    f"type a number from 1 to {len(choices)}"
                    if choices
                    else "type an answer, or Esc"
                )
                self.say(hint, now, error=True)
                return []
            self.mode = Browsing()
            self._sent.add(question.question_id)
            self.say(f"sending the answer {answer!r}…", now)
            return [SendAnswer(question.question_id, question.supervisor_id, answer)]
        if key == keys.BACKSPACE:
            text = text[:-1]
        elif key == keys.CLEAR_LINE:
            text = ""
        elif choices and key in (keys.UP, keys.DOWN):
            current = int(text) if text.isdigit() else 0
            step = -1 if key == keys.UP else 1
            text = str(max(1, min(len(choices), current + step)))
        elif choices:
            if key.isdigit() and len(key) == 1:
                longer = text + key
                if 1 <= int(longer) <= len(choices):
                    text = longer
                elif 1 <= int(key) <= len(choices):
                    text = key
        elif len(key) == 1 and key.isprintable() and len(text) < ANSWER_MAX:
            text += key
        self.mode = Answering(mode.question_id, text)
        return []

    @staticmethod
    def _answer_text(question: QuestionRow, text: str) -> str | None:
        """The answer ``text`` stands for, or None while it is not one yet."""
        if question.choices:
            if text.isdigit() and 1 <= int(text) <= len(question.choices):
                return question.choices[int(text) - 1]
            return None
        return text.strip() or None

    def picked_choice(self) -> int | None:
        """The choice number typed so far (1-based), when answering one with choices."""
        mode = self.mode
        question = self.answering()
        if not isinstance(mode, Answering) or question is None or not question.choices:
            return None
        text = mode.text
        if text.isdigit() and 1 <= int(text) <= len(question.choices):
            return int(text)
        return None

    def _cancel_key(self, mode: ConfirmingCancel, key: str, now: datetime) -> list[Effect]:
        self.mode = Browsing()
        row = self.supervisors.get(mode.supervisor_id)
        if row is None:
            return []
        if key in ("y", "Y"):
            self.say(f"cancelling {row.name}…", now)
            return [SendCancel(row.supervisor_id, row.name)]
        self.say(f"{row.name} not cancelled", now)
        return []

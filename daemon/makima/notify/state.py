"""Which questions each notifier has told people about, and whom to tell next (pure).

A question counts as told *per notifier*, and only once that notifier
succeeded: a webhook that is down now is still owed the question, after a
restart too. The record is small and bounded: a question leaves it once it is
no longer open (answered, or its supervisor finished) and the notices about
that were given, and at most :data:`MAX_QUESTIONS` are kept (closed ones go
first, then the oldest).

:mod:`makima.notify.statefile` writes it to disk; this module only decides.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from makima.notify.message import MAX_ID, Notice, NoticeKind

MAX_QUESTIONS = 10_000
MAX_NOTIFIER_NAME = 200
VERSION = 1
_KINDS = frozenset(kind.value for kind in NoticeKind)


@dataclass(slots=True)
class Entry:
    supervisor_id: str
    told: dict[NoticeKind, set[str]] = field(default_factory=dict)
    closed: bool = False
    """Answered, or its supervisor finished: nobody need be told it is waiting."""


class NotifyState:
    """The record, in the order questions were first seen."""

    def __init__(self, limit: int = MAX_QUESTIONS) -> None:
        self.limit = limit
        self.entries: dict[str, Entry] = {}
        self.revision = 0
        """Grows with every change (so a caller knows when to write)."""

    def __len__(self) -> int:
        return len(self.entries)

    def told(self, question_id: str, kind: NoticeKind, notifier: str) -> bool:
        entry = self.entries.get(question_id)
        return entry is not None and notifier in entry.told.get(kind, ())

    def plan(
        self, notice: Notice, notifiers: Sequence[str], wanted: Iterable[NoticeKind]
    ) -> list[str]:
        """The notifiers to give ``notice`` to now (those not told yet), recording what
        it says: that the question exists, or that it is closed."""
        qid = notice.question_id
        entry = self.entries.get(qid)
        if notice.kind is NoticeKind.ASKED and entry is not None and entry.closed:
            return []  # an old copy of a question already answered
        if entry is None:
            entry = self._add(qid, notice.question.supervisor_id)
        if notice.kind is NoticeKind.ANSWERED and not entry.closed:
            entry.closed = True
            self.revision += 1
        if notice.kind not in set(wanted):
            return []
        done = entry.told.get(notice.kind, set())
        return [name for name in notifiers if name not in done]

    def mark_told(self, question_id: str, kind: NoticeKind, notifier: str) -> bool:
        """Record a success; False when there was nothing to change (or the question
        was forgotten meanwhile)."""
        entry = self.entries.get(question_id)
        if entry is None:
            return False
        done = entry.told.setdefault(kind, set())
        if notifier in done:
            return False
        done.add(notifier)
        self.revision += 1
        return True

    def is_closed(self, question_id: str) -> bool:
        entry = self.entries.get(question_id)
        return entry is not None and entry.closed

    def close_supervisor(self, supervisor_id: str) -> list[str]:
        """A supervisor finished: its questions are closed. Returns their ids."""
        closed = []
        for qid, entry in self.entries.items():
            if entry.supervisor_id == supervisor_id and not entry.closed:
                entry.closed = True
                closed.append(qid)
        self.revision += bool(closed)
        return closed

    def prune(self, open_ids: Iterable[str]) -> list[str]:
        """Forget every question that is not in ``open_ids`` (the daemon's whole list of
        open questions): it was answered or its supervisor finished. Returns their ids."""
        keep = set(open_ids)
        gone = [qid for qid in self.entries if qid not in keep]
        for qid in gone:
            del self.entries[qid]
        self.revision += bool(gone)
        return gone

    def forget(self, question_id: str) -> None:
        if self.entries.pop(question_id, None) is not None:
            self.revision += 1

    def _add(self, question_id: str, supervisor_id: str) -> Entry:
        while len(self.entries) >= self.limit:
            victim = next((q for q, e in self.entries.items() if e.closed), None)
            if victim is None:
                victim = next(iter(self.entries))
            del self.entries[victim]
        entry = Entry(supervisor_id)
        self.entries[question_id] = entry
        self.revision += 1
        return entry

    # ------------------------------------------------------------------- JSON

    def to_json(self) -> dict[str, Any]:
        return {
            "version": VERSION,
            "questions": {
                qid: {
                    "supervisor_id": entry.supervisor_id,
                    "closed": entry.closed,
                    "told": {kind.value: sorted(names) for kind, names in entry.told.items()},
                }
                for qid, entry in self.entries.items()
            },
        }

    @classmethod
    def from_json(cls, data: Any, limit: int = MAX_QUESTIONS) -> tuple[NotifyState, list[str]]:
        """The record read back, and what was wrong with what was read (entries that do
        not have the expected shape are left out, the newest ``limit`` kept)."""
        state = cls(limit)
        problems: list[str] = []
        if not isinstance(data, Mapping):
            return state, [f"expected a JSON object, got {type(data).__name__}"]
        if data.get("version") != VERSION:
            return state, [f"version {data.get('version')!r}, expected {VERSION}"]
        questions = data.get("questions")
        if not isinstance(questions, Mapping):
            return state, ["'questions' is not an object"]
        items = list(questions.items())
        if len(items) > limit:
            problems.append(f"{len(items)} questions, kept the newest {limit}")
            items = items[-limit:]
        bad = 0
        for qid, raw in items:
            entry = _entry(qid, raw)
            if entry is None:
                bad += 1
            else:
                state.entries[qid] = entry
        if bad:
            problems.append(f"{bad} malformed entries left out")
        return state, problems


def _name(value: Any) -> bool:
    return isinstance(value, str) and 0 < len(value) <= MAX_NOTIFIER_NAME


def _entry(qid: Any, raw: Any) -> Entry | None:
    if not (isinstance(qid, str) and 0 < len(qid) <= MAX_ID and isinstance(raw, Mapping)):
        return None
    supervisor_id = raw.get("supervisor_id")
    closed = raw.get("closed", False)
    told = raw.get("told", {})
    if not (_name(supervisor_id) and isinstance(closed, bool) and isinstance(told, Mapping)):
        return None
    entry = Entry(str(supervisor_id), closed=closed)
    for kind_text, names in told.items():
        if kind_text not in _KINDS or not isinstance(names, list):
            return None
        if not all(_name(n) for n in names):
            return None
        entry.told[NoticeKind(kind_text)] = set(names)
    return entry

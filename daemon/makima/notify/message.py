"""What ``makima notify`` tells: a question read from an event, and what is made of it (pure).

Everything in a question came from an agent, so every field is treated as
hostile: ids must look like ids, text loses its control characters (and the
bidirectional overrides that could make it read as something else), and
every field is cut to a size (``…`` marks a cut, ``truncated`` says so).
What goes out (a webhook's body, an environment, a desktop notification) is
built here from those bounded parts only, so its size is bounded too.
"""

from __future__ import annotations

import enum
import json
import re
import uuid
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

MAX_ID = 100
MAX_NAME = 200
MAX_QUESTION = 2000
MAX_CHOICES = 20
MAX_CHOICE = 200
MAX_ANSWER = 2000
MAX_CONTEXT = 4096
"""Bytes of the context's JSON kept as it is; a larger context is sent as cut text."""
MAX_STAMP = 64
ELLIPSIS = "…"

ASKING_EVENTS = frozenset({"question.pending", "question.asked", "question.redelivered"})
ANSWERED_EVENT = "question.answered"
STATE_EVENT = "supervisor.state_changed"
SUBSCRIBED_EVENTS = (*sorted(ASKING_EVENTS), ANSWERED_EVENT, STATE_EVENT)
FINISHED_STATES = frozenset({"completed", "failed"})

_DELIVERY_NAMESPACE = uuid.UUID("6d616b69-6d61-4e6f-b469-667900000001")
# C0/C1 controls but tab and newline, and the bidirectional embeddings,
# overrides and isolates (U+202A-U+202E, U+2066-U+2069).
_UNSAFE = re.compile("[\x00-\x08\x0b-\x1f\x7f-\x9f\u202a-\u202e\u2066-\u2069]")
_ID = re.compile(r"[A-Za-z0-9._:-]{1,100}")


class NoticeKind(enum.StrEnum):
    """What a notice tells: a question is waiting, or it was answered."""

    ASKED = "asked"
    ANSWERED = "answered"

    @property
    def event(self) -> str:
        return f"question.{self.value}"


def clean(text: str, *, single_line: bool = False) -> str:
    """``text`` without control characters (tab and newline kept, unless ``single_line``)."""
    text = _UNSAFE.sub("", text)
    if single_line:
        text = " ".join(text.split())
    return text


def clip(text: str, limit: int) -> tuple[str, bool]:
    """``text`` cut to ``limit`` characters (the last one an ellipsis), and whether it was."""
    if len(text) <= limit:
        return text, False
    return text[: max(limit - 1, 0)] + ELLIPSIS, True


def bounded(value: Any, limit: int, *, single_line: bool = False) -> tuple[str, bool]:
    """A hostile value as clean text of at most ``limit`` characters; non-text becomes ""."""
    if not isinstance(value, str):
        return "", False
    return clip(clean(value, single_line=single_line), limit)


def _identifier(value: Any) -> str | None:
    return value if isinstance(value, str) and _ID.fullmatch(value) else None


@dataclass(frozen=True, slots=True)
class Question:
    """One question, as bounded parts."""

    question_id: str
    supervisor_id: str
    question: str
    choices: tuple[str, ...]
    context: Any
    """The context as sent when its JSON fits :data:`MAX_CONTEXT`, else cut JSON text."""
    asked_at: str | None
    truncated: bool = False
    """Some field was cut (the question, a choice, the list of choices, the context)."""
    verbatim: tuple[bool, ...] = ()
    """For each choice, whether it is exactly as the agent gave it (so it can be the answer)."""

    @property
    def short_id(self) -> str:
        return self.question_id[:8]


def question_from_event(params: Mapping[str, Any]) -> Question | None:
    """The question an event carries, or None when its ids are missing or malformed."""
    question_id = _identifier(params.get("question_id"))
    supervisor_id = _identifier(params.get("supervisor_id"))
    if question_id is None or supervisor_id is None:
        return None
    text, cut = bounded(params.get("question"), MAX_QUESTION)
    raw_choices = params.get("choices")
    choices: list[str] = []
    verbatim: list[bool] = []
    if isinstance(raw_choices, list):
        if len(raw_choices) > MAX_CHOICES:
            cut = True
        for raw in raw_choices[:MAX_CHOICES]:
            choice, choice_cut = bounded(raw, MAX_CHOICE, single_line=True)
            cut = cut or choice_cut
            if choice:
                choices.append(choice)
                verbatim.append(choice == raw)
    context, context_cut = bound_context(params.get("context"))
    asked_at, _ = bounded(params.get("asked_at"), MAX_STAMP, single_line=True)
    return Question(
        question_id=question_id,
        supervisor_id=supervisor_id,
        question=text,
        choices=tuple(choices),
        context=context,
        asked_at=asked_at or None,
        truncated=cut or context_cut,
        verbatim=tuple(verbatim),
    )


def bound_context(context: Any) -> tuple[Any, bool]:
    """The context kept as it is when its JSON fits, else its JSON as cut, clean text."""
    if context is None:
        return None, False
    try:
        text = json.dumps(context, ensure_ascii=False, separators=(",", ":"))
    except (TypeError, ValueError):
        return None, True
    if len(text.encode()) <= MAX_CONTEXT:
        return context, False
    # Cut by characters to a quarter of the byte budget: at most 4 bytes each.
    return clip(clean(text), MAX_CONTEXT // 4)[0], True


@dataclass(frozen=True, slots=True)
class Notice:
    """Something to tell people: a question asked (or still open), or answered."""

    kind: NoticeKind
    question: Question
    supervisor_name: str
    source_event: str
    """The daemon's event kind it came from (``question.pending``, ``question.asked`` …)."""
    answer: str | None = None
    answered_at: str | None = None

    @property
    def question_id(self) -> str:
        return self.question.question_id

    @property
    def delivery_id(self) -> str:
        """The same for every attempt to tell this (question, kind): receivers may dedupe on it."""
        return str(uuid.uuid5(_DELIVERY_NAMESPACE, f"{self.question_id}:{self.kind.value}"))


def supervisor_name(value: Any, supervisor_id: str) -> str:
    """A supervisor's name, bounded; its short id when it has none."""
    name, _ = bounded(value, MAX_NAME, single_line=True)
    return name or supervisor_id[:8]


def notice_from_event(params: Mapping[str, Any], name: str) -> Notice | None:
    """The notice a question event calls for (None for other or malformed events)."""
    kind = params.get("kind")
    question = question_from_event(params)
    if question is None:
        return None
    if kind in ASKING_EVENTS:
        return Notice(NoticeKind.ASKED, question, name, str(kind))
    if kind == ANSWERED_EVENT:
        answer, _ = bounded(params.get("answer"), MAX_ANSWER)
        answered_at, _ = bounded(params.get("answered_at"), MAX_STAMP, single_line=True)
        return Notice(NoticeKind.ANSWERED, question, name, str(kind), answer, answered_at or None)
    return None


# --------------------------------------------------------------------------- texts


def choices_text(choices: Sequence[str]) -> str:
    return " / ".join(choices) if choices else "(free text)"


def title(notice: Notice) -> str:
    if notice.kind is NoticeKind.ASKED:
        return f"makima: {notice.supervisor_name} asks"
    return f"makima: {notice.supervisor_name}: answered"


def message_text(notice: Notice) -> str:
    """The plain-text message: the question, then its choices or its answer."""
    question = notice.question
    if notice.kind is NoticeKind.ANSWERED:
        return f"{question.question}\nAnswer: {notice.answer or ''}"
    return (
        f"{question.question}\nChoices: {choices_text(question.choices)}\n"
        f"(makima answer {question.short_id} …)"
    )


def payload(notice: Notice) -> dict[str, Any]:
    """The webhook's JSON body (and the exec command's stdin).

    ``title`` and ``message`` suit ntfy's templates (``?tpl=1&t={{.title}}&m={{.message}}``),
    ``text`` Slack's and Matrix bridges' incoming webhooks.
    """
    question = notice.question
    body: dict[str, Any] = {
        "source": "makima",
        "type": notice.kind.event,
        "event": notice.source_event,
        "delivery_id": notice.delivery_id,
        "question_id": question.question_id,
        "supervisor_id": question.supervisor_id,
        "supervisor_name": notice.supervisor_name,
        "question": question.question,
        "choices": list(question.choices),
        "context": question.context,
        "asked_at": question.asked_at,
        "truncated": question.truncated,
    }
    if notice.kind is NoticeKind.ANSWERED:
        body["answer"] = notice.answer
        body["answered_at"] = notice.answered_at
    text = message_text(notice)
    body["title"] = title(notice)
    body["message"] = text
    body["text"] = f"{title(notice)}\n{text}"
    return body


def encode_payload(notice: Notice) -> bytes:
    """:func:`payload` as compact UTF-8 JSON: the exact bytes that are sent and signed."""
    return json.dumps(payload(notice), ensure_ascii=False, separators=(",", ":")).encode()


def exec_environment(notice: Notice) -> dict[str, str]:
    """The ``MAKIMA_*`` variables an ``--exec`` command gets (no NUL can be in them)."""
    question = notice.question
    env = {
        "MAKIMA_EVENT": notice.kind.event,
        "MAKIMA_SOURCE_EVENT": notice.source_event,
        "MAKIMA_DELIVERY_ID": notice.delivery_id,
        "MAKIMA_QUESTION_ID": question.question_id,
        "MAKIMA_SUPERVISOR_ID": question.supervisor_id,
        "MAKIMA_SUPERVISOR_NAME": notice.supervisor_name,
        "MAKIMA_QUESTION": question.question,
        "MAKIMA_CHOICES": "\n".join(question.choices),
        "MAKIMA_CHOICES_JSON": json.dumps(list(question.choices), ensure_ascii=False),
        "MAKIMA_CONTEXT": json.dumps(question.context, ensure_ascii=False),
        "MAKIMA_ASKED_AT": question.asked_at or "",
        "MAKIMA_TITLE": title(notice),
        "MAKIMA_MESSAGE": message_text(notice),
    }
    if notice.kind is NoticeKind.ANSWERED:
        env["MAKIMA_ANSWER"] = notice.answer or ""
        env["MAKIMA_ANSWERED_AT"] = notice.answered_at or ""
    return {key: value.replace("\x00", "") for key, value in env.items()}


# --------------------------------------------------------------------------- desktop

ACTION_PREFIX = "choice-"


def escape_markup(text: str) -> str:
    """Text safe in a notification body that a server reads as markup."""
    return text.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")


def desktop_text(notice: Notice, *, markup: bool, actions: bool) -> tuple[str, str]:
    """A desktop notification's summary and body (the body escaped when read as markup)."""
    question = notice.question
    if notice.kind is NoticeKind.ANSWERED:
        body = f"{question.question}\nAnswer: {notice.answer or ''}"
    else:
        body = f"{question.question}\nChoices: {choices_text(question.choices)}"
        if not (actions and desktop_actions(question)):
            body += f"\nmakima answer {question.short_id} …"
    return title(notice), escape_markup(body) if markup else body


def desktop_actions(question: Question) -> list[str]:
    """The Notify call's actions: (key, label) pairs, flattened, one per choice that
    can be given back as the answer (one that was cleaned or cut cannot)."""
    flat: list[str] = []
    for index, choice in enumerate(question.choices):
        if index < len(question.verbatim) and question.verbatim[index]:
            flat += [f"{ACTION_PREFIX}{index}", choice]
    return flat


def choice_for_action(question: Question, action_key: str) -> str | None:
    """The choice an ActionInvoked key stands for, or None for a key that names none."""
    if not action_key.startswith(ACTION_PREFIX):
        return None
    digits = action_key.removeprefix(ACTION_PREFIX)
    if not digits.isdigit() or len(digits) > 3:
        return None
    index = int(digits)
    if index >= len(question.choices) or not question.verbatim[index]:
        return None
    return question.choices[index]

"""Every text makima shows Claude, or a person on Claude's behalf. Pure and bounded."""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping
from typing import Any, Final

TOOL_PREFIX: Final = "mcp__makima__"
SUMMARY_LIMIT: Final = 200  # characters of a tool input shown in a permission question
CONTEXT_LIMIT: Final = 8 * 1024  # characters of a tool input given as the question's context
SEED_HISTORY_LIMIT: Final = 48 * 1024  # characters of history in a seeded new session
ENTRY_LIMIT: Final = 2 * 1024  # characters of one history entry in that seed

SYSTEM_PROMPT: Final = f"""\
You run under makima, a supervisor daemon that keeps you going for hours and \
brings you back after a crash. A person is not watching this session; reach \
them only through makima's tools:
- {TOOL_PREFIX}ask_user: ask the person a question (with `choices` when the \
answer is one of a few options) and wait for the answer. It may take hours; \
the answer survives restarts. Ask once: never repeat a question you already \
asked unless makima tells you it is still open.
- {TOOL_PREFIX}spawn_task and {TOOL_PREFIX}wait_tasks: run long commands as \
makima tasks (they survive your restarts) and wait for them.
- {TOOL_PREFIX}set_phase and {TOOL_PREFIX}report_progress: say where you are.
- {TOOL_PREFIX}done (with a result) when the goal is reached, or \
{TOOL_PREFIX}fail (with the reason) when it cannot be. If you end without \
either, your final message becomes the result.
Tools Claude Code would ask permission for are put to the person as makima \
questions; a denial is final for that call.
If a message starts with "[makima]", it comes from makima, not the person: \
after a restart it tells you what happened while you were away."""


def permission_question(tool_name: str, tool_input: Mapping[str, Any]) -> tuple[str, str]:
    """The question put to a person for one tool call, and its context (the input)."""
    subject = _subject(tool_input)
    question = f"Allow {tool_name}: `{subject}`?" if subject else f"Allow {tool_name}?"
    return question, _clip(_json(tool_input), CONTEXT_LIMIT)


def _subject(tool_input: Mapping[str, Any]) -> str:
    for key in ("command", "file_path", "path", "url", "pattern", "query", "description"):
        value = tool_input.get(key)
        if isinstance(value, str) and value.strip():
            return _one_line(value)
    return _one_line(_json(tool_input)) if tool_input else ""


def denial(answer: str) -> str:
    return (
        f"The person denied this tool call through makima (their answer: {_clip(answer, 500)!r}). "
        "Do not retry it; choose another way or ask the person with ask_user."
    )


def answer_message(question_id: str, question: str, answer: str) -> str:
    """A restored question's answer, sent as a message when no tool call waits for it."""
    return (
        f"[makima] The person answered your question {question!r} "
        f"(makima question {question_id}, asked before the restart): {answer}"
    )


def resumed_message(context_message: str) -> str:
    """The restoration briefing as Claude's next message (less what only SDK agents use)."""
    lines = [line for line in context_message.splitlines() if "restoration.checkpoint" not in line]
    return "[makima] " + "\n".join(lines)


def bounded(value: Any, limit: int = 32 * 1024) -> Any:
    """A value as saved: itself when its JSON is small, else a clipped JSON text."""
    if isinstance(value, str):
        return _clip(value, limit)
    text = json.dumps(value, ensure_ascii=False, default=str)
    return value if len(text) <= limit else {"clipped": _clip(text, limit)}


def seeded_prompt(goal: str, history: Iterable[Mapping[str, Any]], context_message: str) -> str:
    """The first prompt of a new session that replaces one that could not be resumed."""
    lines = _fit_newest([render_entry(entry) for entry in history], SEED_HISTORY_LIMIT)
    transcript = "\n".join(lines) if lines else "(no history was saved)"
    return (
        "[makima] You are taking over a supervised session whose Claude Code transcript "
        "is gone (it cannot be resumed), so this is a new session.\n\n"
        f"The goal:\n{goal}\n\n"
        f"The conversation so far, as makima saved it (oldest first, may be cut):\n"
        f"{transcript}\n\n"
        f"What makima restored:\n{context_message}\n\n"
        "Carry on from where the conversation stopped; do not redo finished work."
    )


def render_entry(entry: Mapping[str, Any]) -> str:
    role = str(entry.get("role", "?"))
    content = entry.get("content")
    text = content if isinstance(content, str) else _json(content)
    return _clip(f"{role}: {text}", ENTRY_LIMIT)


def _fit_newest(lines: list[str], budget: int) -> list[str]:
    kept: list[str] = []
    used = 0
    for line in reversed(lines):
        used += len(line) + 1
        if used > budget:
            kept.append("… (older messages left out)")
            break
        kept.append(line)
    kept.reverse()
    return kept


def _json(value: object) -> str:
    return json.dumps(value, ensure_ascii=False, default=str, sort_keys=True)


def _one_line(text: str) -> str:
    return _clip(" ".join(text.split()), SUMMARY_LIMIT)


def _clip(text: str, limit: int) -> str:
    return text if len(text) <= limit else text[: limit - 1] + "…"

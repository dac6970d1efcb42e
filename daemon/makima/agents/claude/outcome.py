"""What the end of a Claude Code turn means for the supervisor. Pure.

Claude Code retries API errors itself, with backoff. When a turn still ends
in an error, :func:`judge` decides: credentials that the API refuses fail the
supervisor (no retry can fix them); a rate limit, an overloaded or failing
API, or an unreachable network leave it ``blocked`` with the reason, and the
adapter tries again later. Neither goes through agent restarts.
"""

from __future__ import annotations

import enum
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Final

AUTH_STATUSES: Final = frozenset({401, 403})
TRANSIENT_STATUSES: Final = frozenset({408, 409, 429, 500, 502, 503, 504, 529})
AUTH_ERRORS: Final = frozenset({"authentication_failed", "billing_error"})
TRANSIENT_ERRORS: Final = frozenset({"rate_limit", "server_error"})
REASON_LIMIT: Final = 2000


class Verdict(enum.Enum):
    CONTINUE = "continue"  # the turn ended normally
    FAILED = "failed"  # final: the supervisor fails
    BLOCKED = "blocked"  # transient: the supervisor is blocked and retried later


@dataclass(frozen=True, slots=True)
class TurnEnd:
    """The facts of a Claude Code result message, free of the SDK's types."""

    is_error: bool
    subtype: str
    text: str | None = None
    api_error_status: int | None = None
    errors: Sequence[str] = ()
    assistant_error: str | None = None  # the last assistant message's ``error``
    stop_reason: str | None = None


@dataclass(frozen=True, slots=True)
class Judgement:
    verdict: Verdict
    reason: str = ""


def judge(end: TurnEnd) -> Judgement:
    if not end.is_error and end.subtype == "success" and end.assistant_error is None:
        return Judgement(Verdict.CONTINUE)
    detail = _detail(end)
    status = end.api_error_status
    if (status is not None and status in AUTH_STATUSES) or end.assistant_error in AUTH_ERRORS:
        return Judgement(
            Verdict.FAILED,
            _clip(f"the Claude API refused the credentials{_status(status)}: {detail}"),
        )
    if end.subtype == "error_max_turns":
        return Judgement(Verdict.FAILED, _clip(f"Claude Code reached its turn limit: {detail}"))
    if (
        (status is not None and (status in TRANSIENT_STATUSES or status >= 500))
        or end.assistant_error in TRANSIENT_ERRORS
        or _looks_like_network(detail)
    ):
        return Judgement(
            Verdict.BLOCKED, _clip(f"the Claude API is unavailable{_status(status)}: {detail}")
        )
    return Judgement(Verdict.FAILED, _clip(f"Claude Code ended with an error: {detail}"))


def _detail(end: TurnEnd) -> str:
    parts = [*end.errors]
    if end.text:
        parts.append(end.text)
    if end.assistant_error and not parts:
        parts.append(end.assistant_error)
    return "; ".join(p.strip() for p in parts if p and p.strip()) or end.subtype


def _looks_like_network(detail: str) -> bool:
    lowered = detail.lower()
    return any(
        needle in lowered
        for needle in ("connection", "econnrefused", "network", "timed out", "timeout", "socket")
    )


def _status(status: int | None) -> str:
    return "" if status is None else f" (HTTP {status})"


def _clip(text: str) -> str:
    return text if len(text) <= REASON_LIMIT else text[: REASON_LIMIT - 1] + "…"

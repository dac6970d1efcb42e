"""How big what a supervisor saves may be, so that whatever the daemon later
sends back fits in one protocol line (pure).

Every line either way is at most :data:`makima.lines.MAX_LINE` (1 MiB). The
restoration ``start`` line carries the goal, the checkpoint and the open
questions whole; the rest (answers not yet delivered, tasks, the briefing,
history) fills what is left, newest first, and an agent pages back through
older history with a ``history`` request. So the parts sent whole are bounded
when they are saved, and a save that could never be sent back is refused then
(error ``too_large``), not found out at restore time.
"""

from __future__ import annotations

import json
from typing import Any

from makima.lines import MAX_LINE

KIB = 1024
CHECKPOINT_LIMIT = 256 * KIB
"""The largest checkpoint ``data``, encoded."""
MESSAGE_LIMIT = 256 * KIB
RESULT_LIMIT = 256 * KIB  # what an agent finishes with (done's result)
"""The largest history message (role and content), encoded."""
QUESTION_LIMIT = 64 * KIB
"""The largest question (text, choices and context), encoded."""
OPEN_QUESTIONS_LIMIT = 256 * KIB
"""All of a supervisor's open questions together, encoded."""
TEXT_LIMIT = 16 * KIB
"""The largest phase name or activity text, encoded."""
REASON_LIMIT = 64 * KIB
"""The largest ``blocked`` reason or ``fail`` error, encoded."""
ANSWER_LIMIT = 64 * KIB
"""The largest answer a person may give, in bytes."""
GOAL_LIMIT = 64 * KIB
"""The largest goal, in bytes."""
NAME_LIMIT = 200
"""The longest supervisor name, in characters."""
HISTORY_PAGE_LIMIT = 500
"""The most entries an agent's ``history`` page returns."""
HISTORY_LIMIT = 100_000
"""The largest ``limit`` of ``supervisor.history`` (the reply is fitted to a line too)."""
MAX_SEQ = (1 << 63) - 1
"""The largest history ``seq`` (a BIGINT); numbers from peers are checked against it."""
LINE_SLACK = 4 * KIB
"""Room kept free in a line for the envelope around a fitted payload."""
LINE_BUDGET = MAX_LINE - LINE_SLACK


def encoded_size(value: Any) -> int:
    """Bytes of ``value`` as the protocols encode it (compact, UTF-8)."""
    return len(json.dumps(value, separators=(",", ":"), ensure_ascii=False).encode())


def too_large(what: str, size: int, limit: int) -> str | None:
    """The refusal for ``what`` of ``size`` bytes, or None when it fits ``limit``."""
    if size <= limit:
        return None
    return f"{what} is {size} bytes encoded; the limit is {limit} bytes"


def fit_newest(entries: list[Any], budget: int = LINE_BUDGET) -> tuple[list[Any], bool]:
    """The newest ``entries`` (in order) that fit ``budget`` bytes together, and
    whether older ones were left out."""
    kept: list[Any] = []
    left = budget
    for entry in reversed(entries):
        left -= encoded_size(entry) + 1
        if left < 0:
            break
        kept.append(entry)
    kept.reverse()
    return kept, len(kept) < len(entries)

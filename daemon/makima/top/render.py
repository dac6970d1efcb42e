"""What ``makima top`` shows, as rich renderables for a given size (pure).

:func:`render` lays out one screen: a header line, the supervisors, the open
questions (oldest first) and, at the bottom, the message and the key help or
the answer being typed. Every line is cut to ``width`` and the whole fits in
``height`` lines: columns narrow or drop on a narrow terminal, and a section
with more rows than room shows the ones around the selection and "+N more".
With ``height=None`` (the plain fallback) every row is shown.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from datetime import datetime

from rich.console import Group, JustifyMethod, RenderableType
from rich.table import Column, Table
from rich.text import Text

from makima.top.model import (
    Answering,
    ConfirmingCancel,
    Connection,
    QuestionRow,
    RowKey,
    RowKind,
    SupervisorRow,
    TopModel,
)

STATE_STYLES = {
    "working": "green",
    "waiting_for_user": "bold yellow",
    "waiting_for_tasks": "cyan",
    "blocked": "bold red",
    "failed": "red",
    "completed": "dim",
    "interrupted": "magenta",
}
BAR_WIDTH = 8
SELECTED = "\u203a"  # the selected row's marker: a single right-pointing angle
MIN_FLEX = 12
STALE_BEAT = 30.0  # seconds: a heartbeat older than this is shown in yellow
DEAD_BEAT = 120.0  # and in red past this


def age(then: datetime | None, now: datetime) -> str:
    """A short age: 42s, 5m, 3h, 2d; "-" when unknown."""
    if then is None:
        return "-"
    seconds = max(0, int((now - then).total_seconds()))
    if seconds < 60:
        return f"{seconds}s"
    if seconds < 3600:
        return f"{seconds // 60}m"
    if seconds < 86400:
        return f"{seconds // 3600}h"
    return f"{seconds // 86400}d"


def bar(progress: int, *, ascii_only: bool) -> Text:
    """A progress bar and its percentage: ``██████░░  75%``."""
    filled = round(max(0, min(100, progress)) * BAR_WIDTH / 100)
    full, empty = ("#", ".") if ascii_only else ("█", "░")
    text = Text(full * filled, style="green")
    text.append(empty * (BAR_WIDTH - filled), style="bright_black")
    text.append(f" {progress:>3}%")
    return text


def one_line(value: str) -> str:
    """``value`` for one line of a terminal: line breaks and tabs become spaces, and
    other control characters (an agent's text could move the cursor) U+FFFD."""
    return "".join(
        ch if ch.isprintable() else " " if ch in "\n\r\t\v\f" else "\ufffd" for ch in value
    )


def cut(value: str | None, width: int, style: str = "") -> Text:
    """Data shown as it is (never markup), on one line, cut with an ellipsis."""
    text = Text(one_line(value or ""), style=style, no_wrap=True, overflow="ellipsis")
    if width > 0 and text.cell_len > width:
        text.truncate(width, overflow="ellipsis")
    return text


# --------------------------------------------------------------------------- columns


@dataclasses.dataclass(frozen=True, slots=True)
class Col:
    header: str
    width: int | None  # None: takes what the others leave
    justify: JustifyMethod = "left"
    drop: int = 0  # 0: always shown; else dropped on a narrow screen, lowest first


def fit_columns(cols: Sequence[Col], width: int) -> list[tuple[Col, int]]:
    """Widths for ``cols`` within ``width`` (one space between columns): optional
    columns drop, lowest ``drop`` first, until the flexible one has room."""
    kept = list(cols)

    def flex_room() -> int:
        fixed = sum(c.width or 0 for c in kept)
        return width - fixed - (len(kept) - 1)

    while flex_room() < MIN_FLEX:
        optional = [c for c in kept if c.drop]
        if not optional:
            break
        kept.remove(min(optional, key=lambda c: c.drop))
    room = flex_room()
    out: list[tuple[Col, int]] = []
    spare = max(1, room)
    for col in kept:
        out.append((col, col.width if col.width is not None else spare))
    # Still too wide (a very narrow screen): shrink from the widest.
    excess = sum(w for _, w in out) + len(out) - 1 - width
    while excess > 0:
        i = max(range(len(out)), key=lambda n: out[n][1])
        if out[i][1] <= 1:
            break
        cut_by = min(excess, out[i][1] - 1)
        out[i] = (out[i][0], out[i][1] - cut_by)
        excess -= cut_by
    return out


def make_table(columns: list[tuple[Col, int]], *, header: bool = True) -> Table:
    table = Table(
        *[
            Column(
                col.header,
                width=w,
                min_width=w,
                max_width=w,
                no_wrap=True,
                overflow="ellipsis",
                justify=col.justify,
            )
            for col, w in columns
        ],
        box=None,
        show_header=header,
        show_edge=False,
        pad_edge=False,
        padding=(0, 1, 0, 0),
        header_style="bold",
        expand=False,
    )
    return table


# --------------------------------------------------------------------------- sections


@dataclasses.dataclass(frozen=True, slots=True)
class Style:
    width: int
    plain: bool
    ascii_only: bool
    now: datetime


def window(count: int, room: int, selected: int | None) -> tuple[int, int]:
    """Which rows to show of ``count`` in ``room`` lines (one kept for "+N more"
    when they do not all fit), keeping ``selected`` in view: (start, shown)."""
    if count <= room:
        return 0, count
    shown = max(0, room - 1)
    start = 0
    if selected is not None and shown and selected >= shown:
        start = min(selected - shown + 1, count - shown)
    return start, shown


def supervisor_columns(style: Style) -> list[tuple[Col, int]]:
    w = style.width
    cols = [
        Col("", 1),
        Col("supervisor", max(8, min(24, w // 6))),
        Col("state", 17, drop=5),
        Col("phase", max(6, min(16, w // 8)), drop=1),
        Col("progress", BAR_WIDTH + 5, drop=2),
        Col("activity", None),
        Col("beat", 4, justify="right", drop=3),
    ]
    if style.plain:
        cols = cols[1:]
    return fit_columns(cols, w)


def supervisor_cells(row: SupervisorRow, marker: str, style: Style) -> dict[str, Text]:
    beat_style = ""
    if row.last_heartbeat is not None and not row.finished:
        seconds = (style.now - row.last_heartbeat).total_seconds()
        beat_style = "red" if seconds > DEAD_BEAT else "yellow" if seconds > STALE_BEAT else ""
    activity = row.current_activity or ""
    if row.error_message and row.state in ("failed", "blocked", "interrupted"):
        activity = row.error_message
    return {
        "": Text(marker),
        "supervisor": cut(row.name, 0, "bold"),
        "state": cut(row.state, 0, STATE_STYLES.get(row.state, "")),
        "phase": cut(row.phase or "-", 0),
        "progress": bar(row.progress, ascii_only=style.ascii_only),
        "activity": cut(activity, 0, "dim" if row.finished else ""),
        "beat": Text(age(row.last_heartbeat, style.now), style=beat_style),
    }


def question_columns(style: Style) -> list[tuple[Col, int]]:
    w = style.width
    cols = [
        Col("", 1),
        Col("age", 4, justify="right", drop=2),
        Col("supervisor", max(8, min(24, w // 6)), drop=3),
        Col("open question", None),
        Col("choices", max(10, min(30, w // 4)), drop=1),
    ]
    if style.plain:
        cols = cols[1:]
    return fit_columns(cols, w)


def question_cells(row: QuestionRow, name: str, marker: str, style: Style) -> dict[str, Text]:
    choices = " / ".join(row.choices) if row.choices else "(free text)"
    return {
        "": Text(marker),
        "age": Text(age(row.asked_at, style.now)),
        "supervisor": cut(name, 0, "bold"),
        "open question": cut(row.question, 0),
        "choices": cut(choices, 0, "" if row.choices else "dim italic"),
    }


def section(
    keys: list[RowKey],
    lines: int,
    selected: RowKey | None,
    columns: list[tuple[Col, int]],
    cells: Callable[[RowKey, str], dict[str, Text]],
    style: Style,
    empty: str,
    noun: str,
) -> list[RenderableType]:
    """One table in at most ``lines`` lines (``None``-free: the caller gives room)."""
    if lines <= 0:
        return []
    if not keys:
        return [cut(empty, style.width, "dim")]
    if lines == 1:
        return [cut(f"{noun}: +{len(keys)} more", style.width, "dim")]
    index = keys.index(selected) if selected in keys else None
    start, shown = window(len(keys), lines - 1, index)
    table = make_table(columns)
    for key in keys[start : start + shown]:
        chosen = not style.plain and key == selected
        marker = ">" if chosen and style.ascii_only else SELECTED if chosen else " "
        by_header = cells(key, marker)
        table.add_row(
            *[by_header[col.header] for col, _ in columns], style="reverse" if chosen else None
        )
    out: list[RenderableType] = [table]
    hidden = len(keys) - shown
    if hidden:
        out.append(cut(f"  +{hidden} more", style.width, "dim"))
    return out


def split(body: int, need_supervisors: int, need_questions: int) -> tuple[int, int, int]:
    """Lines for the supervisors, the questions and a blank line between."""
    gap = 1 if need_supervisors + need_questions + 1 <= body else 0
    room = body - gap
    if need_supervisors + need_questions <= room:
        return need_supervisors, need_questions, gap
    questions_least = min(need_questions, max(2, room // 3))
    supervisors = max(0, min(need_supervisors, room - questions_least))
    questions = max(0, min(need_questions, room - supervisors))
    return supervisors, questions, 0


# --------------------------------------------------------------------------- header, footer


def header(model: TopModel, style: Style) -> Text:
    n_sup = sum(1 for s in model.supervisors.values() if not s.finished)
    n_q = len(model.questions)
    text = Text()
    if style.plain:
        text.append(style.now.strftime("%Y-%m-%d %H:%M:%SZ "))
    text.append("makima top", style="bold")
    if model.connection is Connection.GONE:
        attempt = f" (attempt {model.attempts})" if model.attempts > 1 else ""
        text.append(f" · daemon gone, reconnecting{attempt}", style="bold red")
    elif model.connection is Connection.CONNECTING:
        text.append(" · connecting…", style="yellow")
    text.append(f" · {n_sup} supervisor{'s' if n_sup != 1 else ''}")
    text.append(f" · {n_q} open question{'s' if n_q != 1 else ''}")
    text.no_wrap = True
    text.overflow = "ellipsis"
    text.truncate(style.width, overflow="ellipsis")
    return text


def help_line(model: TopModel, style: Style) -> Text:
    if not model.keys_enabled:
        return cut("Ctrl-C quits (stdin is not a terminal: no keys)", style.width, "dim")
    arrows = "up/down" if style.ascii_only else "↑↓"
    return cut(f"{arrows} j/k move · a answer · c cancel · q quit", style.width, "dim")


def answer_lines(model: TopModel, mode: Answering, style: Style, most: int) -> list[Text]:
    question = model.answering()
    if question is None:
        return []
    w = style.width
    lines = [cut(f"Answer {model.name_of(question.supervisor_id)}: {question.question}", w, "bold")]
    if question.context and most >= 5:
        lines.append(cut(question.context, w, "dim"))
    if question.choices:
        picked = model.picked_choice()
        room = max(1, most - len(lines) - 1)
        numbered = list(enumerate(question.choices, 1))
        if len(numbered) > room:
            # One line: as many as fit, numbered.
            joined = "  ".join(f"{n}) {c}" for n, c in numbered)
            lines.append(cut(joined, w))
        else:
            for n, choice in numbered:
                lines.append(cut(f"  {n}) {choice}", w, "reverse" if n == picked else ""))
        prompt = f"choice 1-{len(question.choices)}: "
    else:
        prompt = "answer: "
    hint = "  (Enter sends · Esc aborts)"
    typed = mode.text
    room = w - len(prompt) - len(hint) - 1
    if room < 8:
        hint = ""
        room = w - len(prompt) - 1
    if len(typed) > room:
        typed = "…" + typed[-max(0, room - 1) :]
    line = Text(prompt, style="bold")
    line.append(typed)
    line.append("_" if style.ascii_only else "▏", style="blink")
    line.append(hint, style="dim")
    line.truncate(w, overflow="ellipsis")
    lines.append(line)
    return lines


def footer(model: TopModel, style: Style, most: int) -> list[Text]:
    """The bottom lines: the message, then the key help, the answer being typed or
    the cancel confirmation; at most ``most`` (the last ones are kept)."""
    if style.plain or most <= 0:
        return []
    lines: list[Text] = []
    notice = model.visible_notice(style.now)
    if notice is not None:
        lines.append(cut(notice.text, style.width, "bold red" if notice.error else "green"))
    mode = model.mode
    if isinstance(mode, Answering):
        lines.extend(answer_lines(model, mode, style, most - len(lines)))
    elif isinstance(mode, ConfirmingCancel):
        name = model.name_of(mode.supervisor_id)
        lines.append(
            cut(
                f"Cancel {name} ({mode.supervisor_id[:8]})? y = yes, any other key = no",
                style.width,
                "bold yellow",
            )
        )
    else:
        lines.append(help_line(model, style))
    return lines[-most:]


# --------------------------------------------------------------------------- the screen


def render(
    model: TopModel,
    now: datetime,
    width: int,
    height: int | None,
    *,
    plain: bool = False,
    ascii_only: bool = False,
) -> RenderableType:
    """One screen of ``model`` at ``now``, ``width`` columns by ``height`` lines
    (``None``: as many as it takes, for the plain fallback)."""
    style = Style(max(20, width), plain, ascii_only or plain, now)
    selected = model.selected if model.keys_enabled and not plain else None
    supervisors = model.supervisor_rows()
    questions = model.question_rows()
    sup_keys = [RowKey(RowKind.SUPERVISOR, s.supervisor_id) for s in supervisors]
    q_keys = [RowKey(RowKind.QUESTION, q.question_id) for q in questions]
    by_sup = {s.supervisor_id: s for s in supervisors}
    by_q = {q.question_id: q for q in questions}

    need_s = 1 + len(supervisors) if supervisors else 1
    need_q = 1 + len(questions) if questions else 1
    if height is None:
        foot: list[Text] = []
        lines_s, lines_q, gap = need_s, need_q, 1
    else:
        foot = footer(model, style, max(1, height // 2))
        body = max(0, height - 1 - len(foot))
        lines_s, lines_q, gap = split(body, need_s, need_q)

    sup_columns = supervisor_columns(style)
    q_columns = question_columns(style)

    def sup_cells(key: RowKey, marker: str) -> dict[str, Text]:
        return supervisor_cells(by_sup[key.id], marker, style)

    def q_cells(key: RowKey, marker: str) -> dict[str, Text]:
        row = by_q[key.id]
        return question_cells(row, model.name_of(row.supervisor_id), marker, style)

    parts: list[RenderableType] = [header(model, style)]
    if not model.loaded:
        waiting = "connecting to the daemon…"
        if model.connection is Connection.GONE:
            waiting = model.connection_detail or "no daemon"
        parts.append(cut(waiting, style.width, "dim"))
    else:
        parts.extend(
            section(
                sup_keys,
                lines_s,
                selected,
                sup_columns,
                sup_cells,
                style,
                "no unfinished supervisors",
                "supervisors",
            )
        )
        if gap:
            parts.append(Text(""))
        parts.extend(
            section(
                q_keys,
                lines_q,
                selected,
                q_columns,
                q_cells,
                style,
                "no open questions",
                "open questions",
            )
        )
    if foot:
        used = 1 + (1 if not model.loaded else lines_s + lines_q + gap)
        if height is not None and height - used - len(foot) > 0:
            parts.append(Text("\n" * (height - used - len(foot) - 1)))
        parts.extend(foot)
    return Group(*parts)

"""``makima top``'s screens fit the terminal: no line wider than it, no more lines
than it has, "+N more" for what does not fit (pure: rendered into a string)."""

from __future__ import annotations

import io
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from rich.cells import cell_len
from rich.console import Console
from rich.text import Text

from makima.top import keys
from makima.top.model import TopModel
from makima.top.render import age, render

NOW = datetime(2025, 3, 1, 12, 0, 0, tzinfo=UTC)
STATES = ["working", "waiting_for_user", "waiting_for_tasks", "blocked", "interrupted", "idle"]


def crowded(supervisors: int = 40, questions: int = 30) -> TopModel:
    model = TopModel()
    rows = [
        {
            "supervisor_id": f"{n:08x}-0000-4000-8000-000000000000",
            "name": f"supervisor-number-{n}-with-a-rather-long-name",
            "state": STATES[n % len(STATES)],
            "phase": "a-phase-name-that-is-long" if n % 2 else None,
            "progress": (n * 13) % 101,
            "current_activity": "running a very long activity description " * 3,
            "last_heartbeat": (NOW - timedelta(seconds=n * 17)).isoformat(),
            "created_at": (NOW - timedelta(minutes=n)).isoformat(),
        }
        for n in range(supervisors)
    ]
    model.load(rows)
    model.connected()
    for n in range(questions):
        model.apply_event(
            {
                "kind": "question.pending",
                "question_id": f"q{n:03d}",
                "supervisor_id": rows[n % supervisors]["supervisor_id"],
                "question": f"Question {n}: should the release go out now, with its notes? " * 2,
                "choices": [f"choice-{c}-long" for c in range(n % 12)],
                "context": "some context\nover two lines",
                "asked_at": (NOW - timedelta(seconds=n * 61)).isoformat(),
            },
            NOW,
        )
    return model


def lines_of(model: TopModel, width: int, height: int | None, **options: Any) -> list[str]:
    console = Console(
        width=width,
        height=height or 1000,
        file=io.StringIO(),
        force_terminal=True,
        color_system="truecolor",
        legacy_windows=False,
        _environ={},
    )
    with console.capture() as capture:
        console.print(render(model, NOW, width, height, **options))
    text = capture.get()
    assert text.endswith("\n")
    return [Text.from_ansi(line).plain for line in text[:-1].split("\n")]


def assert_fits(lines: list[str], width: int, height: int) -> None:
    assert len(lines) <= height, "\n".join(lines)
    wide = [line for line in lines if cell_len(line) > width]
    assert not wide, wide


def test_a_crowded_screen_fits_80x24() -> None:
    model = crowded()
    lines = lines_of(model, 80, 24)
    assert_fits(lines, 80, 24)
    assert len(lines) == 24  # the key help sits on the last line
    text = "\n".join(lines)
    assert "makima top · 40 supervisors · 30 open questions" in lines[0]
    assert text.count("more") == 2  # "+N more" under both lists
    assert "+" in text and "quit" in lines[-1]
    # some of each list is shown, with its columns
    for column in ("supervisor", "state", "progress", "activity", "beat", "open question"):
        assert column in text, column


@pytest.mark.parametrize("width", [40, 60, 80, 100, 160])
@pytest.mark.parametrize("height", [6, 12, 24, 50])
def test_every_mode_fits(width: int, height: int) -> None:
    model = crowded()
    screens = [lines_of(model, width, height)]
    for typed in (["j"] * 45, ["a", "3"], [keys.ESCAPE, "c"], [keys.ESCAPE, keys.END]):
        for key in typed:
            model.handle_key(key, NOW)
        screens.append(lines_of(model, width, height))
    model.connection_lost("the daemon closed the connection")
    screens.append(lines_of(model, width, height))
    for lines in screens:
        assert_fits(lines, width, height)


def test_the_selection_stays_in_view() -> None:
    model = crowded()
    for _ in range(25):
        model.handle_key("j", NOW)
    selected = model.supervisor_rows()[25].name
    lines = lines_of(model, 80, 24)
    marked = [line for line in lines if line.startswith("\u203a")]
    assert len(marked) == 1 and selected[:10] in marked[0], lines


def test_answering_shows_the_choices_numbered() -> None:
    model = crowded(supervisors=3, questions=3)
    model.handle_key("a", NOW)  # the oldest supervisor: its question has two choices
    model.handle_key("2", NOW)
    lines = lines_of(model, 80, 24)
    assert_fits(lines, 80, 24)
    assert lines[-5].startswith("Answer supervisor-number-2")
    assert lines[-4] == "some context over two lines"
    assert lines[-3:-1] == ["  1) choice-0-long", "  2) choice-1-long"]
    assert lines[-1].startswith("choice 1-2: 2")


def test_plain_has_every_row_and_no_marker() -> None:
    model = crowded(supervisors=30, questions=5)
    lines = lines_of(model, 80, None, plain=True)
    assert len(lines) > 24  # the plain fallback prints them all
    assert not any(line.startswith("\u203a") for line in lines)
    assert "more" not in "\n".join(lines)
    assert_fits(lines, 80, 1000)


def test_ages() -> None:
    assert age(None, NOW) == "-"
    assert age(NOW - timedelta(seconds=59), NOW) == "59s"
    assert age(NOW - timedelta(minutes=59), NOW) == "59m"
    assert age(NOW - timedelta(hours=5), NOW) == "5h"
    assert age(NOW - timedelta(days=3), NOW) == "3d"
    assert age(NOW + timedelta(seconds=3), NOW) == "0s"  # a clock a little ahead


def test_text_from_agents_cannot_drive_the_terminal() -> None:
    model = crowded(supervisors=1, questions=0)
    model.apply_event(
        {
            "kind": "question.asked",
            "question_id": "evil",
            "supervisor_id": next(iter(model.supervisors)),
            "question": "clear\x1b[2J\x1b]0;title\x07 the\nscreen?\x9b",
            "choices": ["a\x1b[31m"],
            "asked_at": NOW.isoformat(),
        },
        NOW,
    )
    console = Console(width=80, height=24, file=io.StringIO(), force_terminal=True, _environ={})
    with console.capture() as capture:
        console.print(render(model, NOW, 80, 24))
    out = capture.get()
    assert "\x1b[2J" not in out and "\x1b]0;" not in out and "\x9b" not in out
    shown = Text.from_ansi(out).plain
    assert "clear\ufffd[2J\ufffd]0;title\ufffd the screen?\ufffd" in shown
    assert "a\ufffd[31m" in shown

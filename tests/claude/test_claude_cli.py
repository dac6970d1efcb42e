"""``makima start --claude``: what the CLI refuses before it asks the daemon."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.integration.test_cli import makima

pytestmark = pytest.mark.anyio


@pytest.mark.parametrize(
    ("args", "needle"),
    [
        (["--claude", "goal", "--", "python", "x.py"], "either --claude GOAL or a COMMAND"),
        (["--claude", "goal", "--goal", "other"], "with --claude, GOAL is the goal"),
        (["--model", "m", "--", "python", "x.py"], "--model goes with --claude GOAL"),
        (["--allow-tool", "Bash", "--", "python"], "--allow-tool goes with --claude GOAL"),
        (["--claude", "goal", "--permission-mode", "yolo"], "'yolo' is not one of"),
        (["--claude", "goal", "--max-turns", "0"], "0 is not in the range"),
        (["--claude", "goal", "--model", "a\tb"], "control characters"),
        ([], "give the agent's COMMAND (after --) or --claude GOAL"),
    ],
)
async def test_usage_errors(short_tmp: Path, args: list[str], needle: str) -> None:
    run = await makima(short_tmp / "none.sock", "start", "name", *args)
    assert run.code == 2, run
    assert needle in run.err, run

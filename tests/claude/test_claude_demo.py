"""``makima demo --claude``: the demo with Claude Code, here against the fake API."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import anyio
import pytest

from tests.claude.fake_anthropic import FakeAnthropic, Text, ToolUse, Turn, tool_results

pytestmark = [pytest.mark.anyio, pytest.mark.timeout(240)]


async def _demo(env: dict[str, str], state_dir: Path) -> subprocess.CompletedProcess[bytes]:
    with anyio.fail_after(180):
        return await anyio.run_process(
            [sys.executable, "-m", "makima", "demo", "--claude", "--state-dir", str(state_dir)],
            stdin=subprocess.DEVNULL,
            env=env,
            check=False,
        )


def _clean_env(home: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("ANTHROPIC_", "CLAUDE_"))}
    env.update(HOME=str(home), CLAUDE_CONFIG_DIR=str(home / ".claude"), COLUMNS="200")
    return env


async def test_demo_with_claude(short_tmp: Path) -> None:
    state_dir = short_tmp / f"demo-{os.urandom(3).hex()}"
    target = state_dir / "claude-scratch" / "notes.md"
    script = [
        Turn(
            Text("Let me ask which name to use."),
            ToolUse(
                "mcp__makima__ask_user",
                {"question": "Which file name?", "choices": ["notes.md", "haiku.txt"]},
            ),
        ),
        Turn(ToolUse("Write", {"file_path": str(target), "content": "saved points hold\n"})),
        Turn(ToolUse("mcp__makima__done", {"result": "notes.md"})),
        Turn(Text("Written.")),
    ]
    async with FakeAnthropic(script) as api:
        run = await _demo({**_clean_env(short_tmp / "home"), **api.env()}, state_dir)
        err = run.stderr.decode()
        assert run.returncode == 0, err
        assert "question   Which file name?" in err
        assert "(answering 'notes.md'" in err
        assert "question   Allow Write:" in err and "(answering 'allow'" in err
        assert "supervisor completed" in err
        assert target.read_text() == "saved points hold\n"
        write_id = api.tool_use_ids()[1]
        assert not tool_results(api.main_requests[-1], write_id)[0].get("is_error")


async def test_demo_without_a_key_says_so(short_tmp: Path) -> None:
    state_dir = short_tmp / f"demo-{os.urandom(3).hex()}"
    run = await _demo(_clean_env(short_tmp / "nohome"), state_dir)
    assert run.returncode == 1
    assert "makima: no Claude credentials" in run.stderr.decode()

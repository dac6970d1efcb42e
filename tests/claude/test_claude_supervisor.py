"""Claude Code under makima, end to end: the real Claude Code binary from the
claude-agent-sdk wheel, a real daemon, and a scripted fake of the Anthropic API."""

from __future__ import annotations

import os
from pathlib import Path

import anyio
import pytest

from makima.embedded import ConnectParams
from tests.claude.conftest import claude_rig
from tests.claude.fake_anthropic import (
    Text,
    ToolUse,
    Turn,
    authentication_error,
    last_user_texts,
    overloaded_error,
    tool_result_text,
    tool_results,
    user_texts,
)

pytestmark = [pytest.mark.anyio, pytest.mark.timeout(240)]

ASK = "mcp__makima__ask_user"


def _occurrences(request: object, needle: str) -> int:
    from tests.claude.fake_anthropic import Request

    assert isinstance(request, Request)
    texts = user_texts(request) + [tool_result_text(b) for b in tool_results(request)]
    return sum(text.count(needle) for text in texts)


async def test_question_answer_and_history(short_tmp: Path, db_params: ConnectParams) -> None:
    script = [
        Turn(
            Text("I need to know which database to use."),
            ToolUse(ASK, {"question": "Which database?", "choices": ["postgres", "sqlite"]}),
        ),
        Turn(Text("Going with the answer: all set.")),
    ]
    async with claude_rig(short_tmp, db_params, script) as rig:
        supervisor_id = await rig.start("pick-db", "Pick a database")
        question = await rig.until_question()
        assert question["question"] == "Which database?"
        assert question["choices"] == ["postgres", "sqlite"]
        answered = await rig.cli("answer", question["question_id"], "postgres")
        assert answered.code == 0, answered

        with anyio.fail_after(60):
            second = await rig.api.wait_for_main(2)
        tool_use_id = rig.api.tool_use_ids()[0]
        results = tool_results(second, tool_use_id)
        assert [tool_result_text(r) for r in results] == ["postgres"]

        final = await rig.until_state(supervisor_id, "completed", "failed")
        assert final["state"] == "completed", final
        # the final text is the result, with Claude Code's report (the fake's usage)
        assert final["result"]["result"] == "Going with the answer: all set."
        report = final["result"]["claude"]
        assert report["turns"] >= 1 and report["usage"]["output_tokens"] > 0
        assert report["session_id"] == rig.api.main_requests[0].headers["x-claude-code-session-id"]
        history = await rig.history(supervisor_id)
        roles = [entry["role"] for entry in history]
        assert roles[0] == "user" and "Pick a database" in str(history[0]["content"])
        contents = [str(entry["content"]) for entry in history]
        assert any("Which database?" in c and "tool_use" in c for c in contents)
        assert any("postgres" in c for c, r in zip(contents, roles, strict=True) if r == "tool")
        assert any("all set" in c for c in contents)


async def test_restoration_after_kill_9(short_tmp: Path, db_params: ConnectParams) -> None:
    script = [
        Turn(
            Text("Asking."),
            ToolUse(ASK, {"question": "Deploy to production?", "choices": ["yes", "no"]}),
        ),
        # After the restart: Claude waits for the answer makima promised.
        Turn(Text("I will wait for the answer to my open question.")),
        Turn(Text("Deployed, as the person said.")),
    ]
    async with claude_rig(short_tmp, db_params, script) as rig:
        supervisor_id = await rig.start("deploy", "Deploy the service")
        question = await rig.until_question()
        before_kill = len(rig.api.main_requests)
        await rig.daemon.kill()
        await rig.restart()

        with anyio.fail_after(90):
            resumed = await rig.api.wait_for_main(before_kill + 1)
        assert any(
            "[makima]" in t and "restoration number 1" in t for t in last_user_texts(resumed)
        )
        # the same question, re-delivered with the same id
        again = await rig.until_question()
        assert again["question_id"] == question["question_id"]

        answered = await rig.cli("answer", question["question_id"], "yes")
        assert answered.code == 0, answered
        final = await rig.until_state(supervisor_id, "completed", "failed")
        assert final["state"] == "completed", final
        assert final["restoration_count"] == 1
        # Claude Code's counts: the two turns after the restart (the one cut off by
        # the kill never reported its result)
        assert final["result"]["claude"]["turns"] == 2
        last = rig.api.main_requests[-1]
        assert _occurrences(last, "Deploy to production?") >= 1
        answer_lines = [t for t in user_texts(last) if "answered your question" in t]
        assert len(answer_lines) == 1 and answer_lines[0].endswith(": yes"), answer_lines


async def test_permission_prompts(short_tmp: Path, db_params: ConnectParams) -> None:
    script = [
        Turn(ToolUse("Bash", {"command": "touch denied.txt", "description": "make a file"})),
        Turn(ToolUse("Bash", {"command": "touch allowed.txt", "description": "make a file"})),
        Turn(Text("Both tried.")),
    ]
    async with claude_rig(short_tmp, db_params, script) as rig:
        supervisor_id = await rig.start("perm", "Make files")
        denied = await rig.until_question()
        assert denied["question"] == "Allow Bash: `touch denied.txt`?"
        assert denied["choices"] == ["allow", "deny"]
        assert (await rig.cli("answer", denied["question_id"], "deny")).code == 0
        with anyio.fail_after(60):
            second = await rig.api.wait_for_main(2)
        [result] = tool_results(second, rig.api.tool_use_ids()[0])
        assert result.get("is_error") is True
        assert "denied" in tool_result_text(result)

        allowed = await rig.until_question()
        assert allowed["question"] == "Allow Bash: `touch allowed.txt`?"
        assert (await rig.cli("answer", allowed["question_id"], "allow")).code == 0
        final = await rig.until_state(supervisor_id, "completed", "failed")
        assert final["state"] == "completed", final
        assert (rig.workdir / "allowed.txt").exists()
        assert not (rig.workdir / "denied.txt").exists()


# --------------------------------------------------------------------------- (d) failures

FAST_GIVE_UP = ("--env", "CLAUDE_CODE_MAX_RETRIES=0")


async def test_no_credentials_is_refused(short_tmp: Path, db_params: ConnectParams) -> None:
    async with claude_rig(short_tmp, db_params, [], credentials=False) as rig:
        run = await rig.cli("start", "nokey", "--claude", "Do something")
        line = run.one_error_line()
        assert "no Claude credentials" in line and "ANTHROPIC_API_KEY" in line, line
        assert (await rig.cli("ls", "--all", "--json")).out.strip() == "[]"
        # the key given with --env is enough
        ok = await rig.cli(
            "start", "withkey", "--claude", "Do something", "--env", "ANTHROPIC_API_KEY=sk-x"
        )
        assert ok.code == 0, ok


def _shadow_sdk(directory: Path) -> str:
    """A ``claude_agent_sdk`` that cannot be imported and has no bundled Claude Code,
    first on the daemon's path: Claude Code as good as not installed."""
    package = directory / "shadow" / "claude_agent_sdk"
    package.mkdir(parents=True)
    (package / "__init__.py").write_text('raise ImportError("claude_agent_sdk is broken")\n')
    return os.pathsep.join([str(package.parent), os.environ.get("PYTHONPATH", "")])


async def test_not_installed(short_tmp: Path, db_params: ConnectParams) -> None:
    script = [Turn(ToolUse(ASK, {"question": "Go on?"}))]
    async with claude_rig(short_tmp, db_params, script) as rig:
        supervisor_id = await rig.start("later-broken", "Ask then wait")
        await rig.until_question()
        await rig.daemon.kill()
        # The daemon comes back with Claude Code gone: creating refuses, and the
        # restored supervisor fails with how to install it, without restarts.
        await rig.restart(PYTHONPATH=_shadow_sdk(rig.home))
        run = await rig.cli("start", "broken", "--claude", "Do something")
        line = run.one_error_line()
        assert "pip install 'makima[claude]'" in line, line
        final = await rig.until_state(supervisor_id, "failed", "completed")
        assert "pip install 'makima[claude]'" in final["error_message"], final


async def test_authentication_error_fails(short_tmp: Path, db_params: ConnectParams) -> None:
    async with claude_rig(short_tmp, db_params, [authentication_error()]) as rig:
        supervisor_id = await rig.start("badkey", "Do something", *FAST_GIVE_UP)
        final = await rig.until_state(supervisor_id, "failed", "completed")
        assert "refused the credentials (HTTP 401)" in final["error_message"], final
        assert final["restoration_count"] == 0
        assert len(rig.api.main_requests) == 1  # no agent restart asked again


async def test_overloaded_api_blocks(short_tmp: Path, db_params: ConnectParams) -> None:
    async with claude_rig(short_tmp, db_params, [overloaded_error()]) as rig:
        supervisor_id = await rig.start("busy", "Do something", *FAST_GIVE_UP)
        blocked = await rig.until_state(supervisor_id, "blocked", "failed", "completed")
        assert blocked["state"] == "blocked", blocked
        assert "unavailable (HTTP 529)" in blocked["error_message"], blocked
        assert "makima retries in 60 s" in blocked["error_message"], blocked
        assert blocked["agent_running"] is True
        assert blocked["restoration_count"] == 0
        assert len(rig.api.main_requests) == 1
        cancelled = await rig.cli("cancel", supervisor_id)
        assert cancelled.code == 0, cancelled


async def test_lost_transcript_starts_a_seeded_session(
    short_tmp: Path, db_params: ConnectParams
) -> None:
    question = {"question": "Which branch?", "choices": ["main", "dev"]}
    script = [
        Turn(Text("Let me ask about the branch."), ToolUse(ASK, question)),
        # The new session asks again, in the same words: the open question answers it.
        Turn(ToolUse(ASK, question)),
        Turn(Text("Merged into the branch the person chose.")),
    ]
    async with claude_rig(short_tmp, db_params, script) as rig:
        supervisor_id = await rig.start("merge", "Merge the feature branch")
        asked = await rig.until_question()
        first_session = rig.api.main_requests[0].headers["x-claude-code-session-id"]
        await rig.daemon.kill()
        transcripts = list((rig.home / ".claude" / "projects").rglob(f"{first_session}.jsonl"))
        assert transcripts, "Claude Code saved no transcript to delete"
        for transcript in transcripts:
            transcript.unlink()
        await rig.restart()

        with anyio.fail_after(90):
            seeded = await rig.api.wait_for_main(2)
        assert seeded.headers["x-claude-code-session-id"] != first_session
        [prompt] = [t for t in last_user_texts(seeded) if t.startswith("[makima]")]
        assert "transcript is gone" in prompt
        assert "Merge the feature branch" in prompt  # the goal
        assert "Let me ask about the branch." in prompt  # the saved history
        assert "restoration number 1" in prompt  # the context message
        again = await rig.until_question()
        assert again["question_id"] == asked["question_id"]
        assert (await rig.cli("answer", asked["question_id"], "dev")).code == 0

        final = await rig.until_state(supervisor_id, "completed", "failed")
        assert final["state"] == "completed", final
        last = rig.api.main_requests[-1]
        [result] = tool_results(last, rig.api.tool_use_ids()[1])
        assert tool_result_text(result) == "dev"
        assert not any("answered your question" in t for t in user_texts(last))
        assert len(await rig.questions()) == 0

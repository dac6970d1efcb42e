"""The fake Anthropic API against the real Claude Code binary (no makima involved).

These tests run the binary bundled in the ``claude-agent-sdk`` wheel, pointed at
:class:`tests.claude.fake_anthropic.FakeAnthropic` through ``ANTHROPIC_BASE_URL``.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import anyio
import pytest

from tests.claude.fake_anthropic import (
    ApiError,
    FakeAnthropic,
    Request,
    Text,
    ToolUse,
    Turn,
    authentication_error,
    tool_result_text,
    tool_results,
    user_texts,
)

sdk = pytest.importorskip("claude_agent_sdk")

pytestmark = pytest.mark.anyio

ANSWER = "Use the blue one."


@pytest.fixture
def claude_env(tmp_path: Path) -> dict[str, str]:
    """Keep Claude Code's files (config, transcripts, caches) inside the test's tmp dir."""
    home = tmp_path / "home"
    home.mkdir()
    return {
        "HOME": str(home),  # ~/.cache/claude-cli-nodejs (MCP logs) and the default config dir
        "CLAUDE_CONFIG_DIR": str(home / ".claude"),  # .claude.json, projects/<cwd>/<id>.jsonl
        "CLAUDE_CODE_MAX_RETRIES": "0",  # an API error ends the turn at once
    }


@pytest.fixture
def workdir(tmp_path: Path) -> Path:
    path = tmp_path / "work"
    path.mkdir()
    return path


def ask_user_server(answers: list[str], asked: list[dict[str, Any]]) -> Any:
    @sdk.tool("ask_user", "Ask the person a question.", {"question": str})
    async def ask_user(args: dict[str, Any]) -> dict[str, Any]:
        asked.append(args)
        return {"content": [{"type": "text", "text": answers.pop(0)}]}

    return sdk.create_sdk_mcp_server("makima", tools=[ask_user])


async def converse(options: Any, prompt: str) -> AsyncIterator[Any]:
    async with sdk.ClaudeSDKClient(options) as client:
        await client.query(prompt)
        async for message in client.receive_response():
            yield message


async def collect(options: Any, prompt: str) -> list[Any]:
    with anyio.fail_after(60):
        return [m async for m in converse(options, prompt)]


def transcripts(env: dict[str, str]) -> list[str]:
    """Transcripts: $CLAUDE_CONFIG_DIR/projects/<cwd, each non-alphanumeric as ->/<id>.jsonl."""
    return [p.name for p in Path(env["CLAUDE_CONFIG_DIR"], "projects").glob("*/*.jsonl")]


def result_of(messages: list[Any]) -> Any:
    results = [m for m in messages if isinstance(m, sdk.ResultMessage)]
    assert len(results) == 1, messages
    return results[0]


async def test_tool_result_reaches_the_next_request(
    claude_env: dict[str, str], workdir: Path
) -> None:
    script = [
        Turn(Text("Let me ask."), ToolUse("mcp__makima__ask_user", {"question": "Which one?"})),
        Turn(Text("Done: blue.")),
    ]
    asked: list[dict[str, Any]] = []
    stderr: list[str] = []
    async with FakeAnthropic(script) as api:
        options = sdk.ClaudeAgentOptions(
            env=api.env(**claude_env),
            cwd=workdir,
            mcp_servers={"makima": ask_user_server([ANSWER], asked)},
            allowed_tools=["mcp__makima__ask_user"],
            stderr=stderr.append,
        )
        messages = await collect(options, "Pick a colour.")

    assert asked == [{"question": "Which one?"}]
    result = result_of(messages)
    assert (result.subtype, result.is_error, result.result) == ("success", False, "Done: blue."), (
        stderr
    )

    first, second = api.main_requests
    assert "Pick a colour." in user_texts(first)
    assert not tool_results(first)
    [tool_use_id] = api.tool_use_ids()
    [block] = tool_results(second, tool_use_id)
    assert tool_result_text(block) == ANSWER
    assert not block.get("is_error")
    # the model's own turn is replayed before the result, with the same id
    assistant = [m for m in second.messages if m["role"] == "assistant"][-1]
    assert {"type": "tool_use", "id": tool_use_id, "name": "mcp__makima__ask_user",
            "input": {"question": "Which one?"}} in assistant["content"]  # fmt: skip

    # what the binary sends: the streaming Messages API, nothing else
    assert [(r.method, r.path, r.query) for r in api.requests] == [
        ("POST", "/v1/messages", "beta=true")
    ] * 2
    assert all(r.body and r.body["stream"] is True for r in api.requests)
    assert first.headers["x-api-key"] == "sk-ant-fake-key"
    # the MCP tool is deferred: named in a system text, not in `tools`
    assert "mcp__makima__ask_user" not in [t["name"] for t in first.body["tools"]]  # type: ignore[index]
    assert "mcp__makima__ask_user" in json.dumps(first.messages)


async def test_a_test_can_wait_for_the_nth_request(
    claude_env: dict[str, str], workdir: Path
) -> None:
    """The tool blocks until the test, woken by the fake, releases it: no sleeps."""
    release = anyio.Event()
    seen_while_blocked: list[Request] = []

    @sdk.tool("ask_user", "Ask the person a question.", {"question": str})
    async def ask_user(args: dict[str, Any]) -> dict[str, Any]:
        await release.wait()
        return {"content": [{"type": "text", "text": ANSWER}]}

    script = [
        Turn(ToolUse("mcp__makima__ask_user", {"question": "Which one?"})),
        Turn(Text("Thanks.")),
    ]
    async with FakeAnthropic(script) as api:
        options = sdk.ClaudeAgentOptions(
            env=api.env(**claude_env),
            cwd=workdir,
            mcp_servers={"makima": sdk.create_sdk_mcp_server("makima", tools=[ask_user])},
            allowed_tools=["mcp__makima__ask_user"],
        )
        async with anyio.create_task_group() as tg:
            messages: list[Any] = []

            async def run() -> None:
                messages.extend(await collect(options, "Go."))

            tg.start_soon(run)
            with anyio.fail_after(60):
                await api.wait_for_main(1)
                seen_while_blocked.extend(api.main_requests)
                release.set()
                second = await api.wait_for_main(2)

    assert len(seen_while_blocked) == 1
    assert tool_result_text(tool_results(second)[0]) == ANSWER
    assert result_of(messages).result == "Thanks."


async def test_authentication_error_ends_the_turn(
    claude_env: dict[str, str], workdir: Path
) -> None:
    async with FakeAnthropic([authentication_error()]) as api:
        options = sdk.ClaudeAgentOptions(env=api.env(**claude_env), cwd=workdir)
        messages = await collect(options, "Hello?")

    [assistant] = [m for m in messages if isinstance(m, sdk.AssistantMessage)]
    assert assistant.error == "authentication_failed"
    assert assistant.model == "<synthetic>"
    result = result_of(messages)
    assert (result.subtype, result.is_error, result.api_error_status, result.terminal_reason) == (
        "success",
        True,
        401,
        "api_error",
    )
    assert result.result == "Invalid API key · Fix external API key"
    assert len(api.main_requests) == 1  # not retried with CLAUDE_CODE_MAX_RETRIES=0


async def test_errors_then_recovery_within_retries(
    claude_env: dict[str, str], workdir: Path
) -> None:
    """An error step that is not `forever` is played once; Claude Code retries."""
    script = [
        ApiError(529, "overloaded_error", "Overloaded", headers=(("retry-after", "0"),)),
        Turn(Text("Recovered.")),
    ]
    async with FakeAnthropic(script) as api:
        env = api.env(**{**claude_env, "CLAUDE_CODE_MAX_RETRIES": "1"})
        options = sdk.ClaudeAgentOptions(env=env, cwd=workdir)
        messages = await collect(options, "Hello?")

    assert result_of(messages).result == "Recovered."
    assert [type(r.reply).__name__ for r in api.main_requests] == ["ApiError", "Turn"]


async def test_side_calls_do_not_consume_the_script(
    claude_env: dict[str, str], workdir: Path
) -> None:
    """Without CLAUDE_CODE_DISABLE_NONESSENTIAL_TRAFFIC Claude Code also probes
    ``HEAD /api/hello`` and asks for a session title; both get canned replies."""
    async with FakeAnthropic([Turn(Text("Only reply."))]) as api:
        env = api.env(**claude_env)
        del env["CLAUDE_CODE_DISABLE_NONESSENTIAL_TRAFFIC"]
        options = sdk.ClaudeAgentOptions(env=env, cwd=workdir)
        messages = await collect(options, "Hello?")

    assert result_of(messages).result == "Only reply."
    assert len(api.main_requests) == 1
    side = [r for r in api.requests if not r.main]
    assert side, "expected Claude Code's side calls"
    assert {(r.method, r.path) for r in side} <= {("HEAD", "/api/hello"), ("POST", "/v1/messages")}


async def test_resume_replays_the_conversation_then_the_new_prompt(
    claude_env: dict[str, str], workdir: Path
) -> None:
    async with FakeAnthropic([Turn(Text("First."))]) as api:
        options = sdk.ClaudeAgentOptions(env=api.env(**claude_env), cwd=workdir)
        first = await collect(options, "Start.")
    [init] = [m for m in first if isinstance(m, sdk.SystemMessage) and m.subtype == "init"]
    session_id = init.data["session_id"]
    assert result_of(first).session_id == session_id
    assert transcripts(claude_env) == [f"{session_id}.jsonl"]

    async with FakeAnthropic([Turn(Text("Second."))]) as api:
        options = sdk.ClaudeAgentOptions(env=api.env(**claude_env), cwd=workdir, resume=session_id)
        second = await collect(options, "You were restarted.")
    assert result_of(second).session_id == session_id
    [request] = api.main_requests
    roles = [m["role"] for m in request.messages if m["role"] != "system"]
    assert roles == ["user", "assistant", "user"]
    assert "Start." in user_texts(request)
    assert user_texts(request)[-1] == "You were restarted."


async def test_resume_of_an_unknown_session_fails_at_connect(
    claude_env: dict[str, str], workdir: Path
) -> None:
    missing = "00000000-0000-4000-8000-000000000000"
    async with FakeAnthropic([Turn(Text("never"))]) as api:
        options = sdk.ClaudeAgentOptions(env=api.env(**claude_env), cwd=workdir, resume=missing)
        client = sdk.ClaudeSDKClient(options)
        with anyio.fail_after(60), pytest.raises(sdk.ResultError) as caught:
            await client.connect()
        await client.disconnect()
    assert caught.value.subtype == "error_during_execution"
    assert caught.value.errors == [f"No conversation found with session ID: {missing}"]
    assert api.requests == []


@pytest.mark.parametrize("decision", ["allow", "deny"])
async def test_permission_callback_decides_a_bash_call(
    claude_env: dict[str, str], workdir: Path, decision: str
) -> None:
    command = "touch made-by-bash.txt && echo made"  # `echo` alone is auto-allowed
    asked: list[tuple[str, dict[str, Any], str | None]] = []

    async def can_use_tool(name: str, tool_input: dict[str, Any], context: Any) -> Any:
        asked.append((name, tool_input, context.tool_use_id))
        if decision == "allow":
            return sdk.PermissionResultAllow()
        return sdk.PermissionResultDeny(message="The person said no.")

    script = [
        Turn(ToolUse("Bash", {"command": command, "description": "Make a file"})),
        Turn(Text("Finished.")),
    ]
    async with FakeAnthropic(script) as api:
        options = sdk.ClaudeAgentOptions(
            env=api.env(**claude_env),
            cwd=workdir,
            permission_mode="default",
            can_use_tool=can_use_tool,
        )
        messages = await collect(options, "Make a file.")

    [tool_use_id] = api.tool_use_ids()
    assert asked == [("Bash", {"command": command, "description": "Make a file"}, tool_use_id)]
    assert result_of(messages).result == "Finished."
    [block] = tool_results(api.main_requests[1], tool_use_id)
    if decision == "allow":
        assert (block["is_error"], tool_result_text(block)) == (False, "made")
        assert (workdir / "made-by-bash.txt").exists()
    else:
        assert (block["is_error"], tool_result_text(block)) == (True, "The person said no.")
        assert not (workdir / "made-by-bash.txt").exists()

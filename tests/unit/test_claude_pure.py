"""The pure parts of the Claude Code adapter: settings, judgement of a turn, texts."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

from makima.agents.claude import prompts
from makima.agents.claude.outcome import TurnEnd, Verdict, judge
from makima.agents.claude.settings import (
    ClaudeSettings,
    PermissionMode,
    agent_command,
    credentials_problem,
    install_problem,
)
from makima.errors import InvalidValueError


def test_settings_round_trip_through_the_command() -> None:
    settings = ClaudeSettings(
        model="claude-x",
        permission_mode=PermissionMode.ACCEPT_EDITS,
        allow_tools=("Read", "Bash(git status)"),
        max_turns=12,
    )
    command = settings.command("/usr/bin/python3")
    assert command[:3] == ["/usr/bin/python3", "-m", "makima.agents.claude"]
    assert ClaudeSettings.from_argv(command[3:]) == settings
    assert ClaudeSettings.from_params(settings.to_params()) == settings


def test_a_value_that_looks_like_an_option_stays_a_value() -> None:
    settings = ClaudeSettings(allow_tools=("--model=evil",))
    assert ClaudeSettings.from_argv(settings.to_argv()).allow_tools == ("--model=evil",)
    assert ClaudeSettings.from_argv(settings.to_argv()).model is None


@pytest.mark.parametrize(
    ("params", "needle"),
    [
        ({"permission_mode": "yolo"}, "'permission_mode' must be one of ask, accept-edits"),
        ({"max_turns": 0}, "'max_turns' must be an integer from 1 to 10000"),
        ({"max_turns": True}, "'max_turns' must be an integer"),
        ({"model": ""}, "'model' must be a non-empty string"),
        ({"model": "a\nb"}, "control characters"),
        ({"allow_tools": "Bash"}, "'allow_tools' must be a list"),
        ({"allow_tools": ["x" * 201]}, "the limit is 200"),
        ({"colour": "red"}, "unknown 'claude' setting 'colour'"),
    ],
)
def test_bad_settings_are_refused_by_name(params: dict[str, object], needle: str) -> None:
    with pytest.raises(InvalidValueError, match=None) as caught:
        ClaudeSettings.from_params(params)
    assert needle in str(caught.value)


def test_bad_arguments_are_refused() -> None:
    with pytest.raises(InvalidValueError, match="not --key=value"):
        ClaudeSettings.from_argv(["--model"])
    with pytest.raises(InvalidValueError, match="unknown argument '--colour'"):
        ClaudeSettings.from_argv(["--colour=red"])
    with pytest.raises(InvalidValueError, match="--max-turns must be an integer"):
        ClaudeSettings.from_argv(["--max-turns=many"])


def test_credentials(tmp_path: Path) -> None:
    assert credentials_problem({"ANTHROPIC_API_KEY": "sk"}) is None
    assert credentials_problem({"ANTHROPIC_AUTH_TOKEN": "t"}) is None
    assert credentials_problem({"CLAUDE_CODE_USE_BEDROCK": "1"}) is None
    missing = credentials_problem({"HOME": str(tmp_path), "ANTHROPIC_API_KEY": " "})
    assert missing is not None and "no Claude credentials" in missing
    assert credentials_problem({"CLAUDE_CODE_USE_VERTEX": "0", "HOME": str(tmp_path)}) is not None
    (tmp_path / ".claude").mkdir()
    (tmp_path / ".claude" / ".credentials.json").write_text("{}")
    assert credentials_problem({"HOME": str(tmp_path)}) is None  # a `claude login`


def test_agent_command_checks() -> None:
    env = {"ANTHROPIC_API_KEY": "sk"}
    command = agent_command({"claude": {}}, "goal", {}, python=sys.executable, environ=env)
    assert command[1:] == ("-m", "makima.agents.claude", "--permission-mode=ask")
    with pytest.raises(InvalidValueError, match="either 'command' or 'claude'"):
        agent_command({"claude": {}, "command": ["x"]}, "g", {}, python="p", environ=env)
    with pytest.raises(InvalidValueError, match="needs a goal"):
        agent_command({"claude": {}}, "  ", {}, python="p", environ=env)
    with pytest.raises(InvalidValueError, match="must be an object"):
        agent_command({"claude": "fast"}, "g", {}, python="p", environ=env)
    with pytest.raises(InvalidValueError, match="no Claude credentials"):
        agent_command({"claude": {}}, "g", {}, python="p", environ={"HOME": "/nonexistent"})
    # --env of the supervisor counts
    agent_command({"claude": {}}, "g", env, python="p", environ={"HOME": "/nonexistent"})


def test_install_problem_names_the_extra(monkeypatch: pytest.MonkeyPatch) -> None:
    assert install_problem() is None  # the test extra installs it
    monkeypatch.setattr("importlib.util.find_spec", lambda name: None)
    problem = install_problem()
    assert problem is not None and "pip install 'makima[claude]'" in problem


@pytest.mark.parametrize(
    ("end", "verdict", "needle"),
    [
        (TurnEnd(is_error=False, subtype="success", text="ok"), Verdict.CONTINUE, ""),
        (
            TurnEnd(True, "success", "Invalid API key", 401, (), "authentication_failed"),
            Verdict.FAILED,
            "refused the credentials (HTTP 401): Invalid API key",
        ),
        (
            TurnEnd(True, "success", "billing", None, (), "billing_error"),
            Verdict.FAILED,
            "refused the credentials",
        ),
        (
            TurnEnd(True, "success", "API Error: Request rejected (429)", 429, (), "rate_limit"),
            Verdict.BLOCKED,
            "unavailable (HTTP 429)",
        ),
        (
            TurnEnd(True, "success", "API Error: 529 Overloaded", 529, (), "server_error"),
            Verdict.BLOCKED,
            "unavailable (HTTP 529)",
        ),
        (
            TurnEnd(True, "success", "API Error: Connection refused (ECONNREFUSED)", None, ()),
            Verdict.BLOCKED,
            "Connection refused",
        ),
        (
            TurnEnd(True, "error_max_turns", None, None, ("max turns",)),
            Verdict.FAILED,
            "turn limit",
        ),
        (
            TurnEnd(True, "success", "prompt too long", 400, (), "invalid_request"),
            Verdict.FAILED,
            "ended with an error: prompt too long",
        ),
    ],
)
def test_judge(end: TurnEnd, verdict: Verdict, needle: str) -> None:
    judgement = judge(end)
    assert judgement.verdict is verdict
    assert needle in judgement.reason


def test_a_reason_is_bounded() -> None:
    judgement = judge(TurnEnd(True, "success", "x" * 10_000, 500, ()))
    assert len(judgement.reason) <= 2000


def test_permission_question() -> None:
    question, context = prompts.permission_question("Bash", {"command": "rm -rf  build\n"})
    assert question == "Allow Bash: `rm -rf build`?"
    assert '"command"' in context
    question, _ = prompts.permission_question("Write", {"file_path": "/a/b", "content": "x"})
    assert question == "Allow Write: `/a/b`?"
    question, context = prompts.permission_question("Odd", {"blob": "y" * 50_000})
    assert len(question) < 300 and len(context) <= prompts.CONTEXT_LIMIT
    assert prompts.permission_question("Bare", {})[0] == "Allow Bare?"


def test_seeded_prompt_keeps_the_newest_history_within_bounds() -> None:
    history = [
        {"role": "assistant", "content": {"text": f"step {n} " + "z" * 3000}} for n in range(100)
    ]
    prompt = prompts.seeded_prompt("the goal", history, "the context")
    assert "the goal" in prompt and "the context" in prompt
    assert "step 99" in prompt and "step 0 " not in prompt
    assert "older messages left out" in prompt
    assert len(prompt) < prompts.SEED_HISTORY_LIMIT + 2000

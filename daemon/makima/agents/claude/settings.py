"""The options of ``makima start --claude``, pure: parsed, checked, turned into a command.

The daemon builds a Claude supervisor's agent command from these settings
(:meth:`ClaudeSettings.command`), so the spec holds them as arguments of
``python -m makima.agents.claude``, and the adapter reads them back with
:meth:`ClaudeSettings.from_argv`. Every value is checked here, on both
sides: a bad one is refused with a message naming it and what was expected.
"""

from __future__ import annotations

import enum
import importlib.util
import os
import shutil
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final

from makima.errors import InvalidValueError

MODULE: Final = "makima.agents.claude"
INSTALL_HINT: Final = "pip install 'makima[claude]'"
MAX_TURNS_LIMIT: Final = 10_000
NAME_LIMIT: Final = 200  # a model or tool name
TOOLS_LIMIT: Final = 100  # --allow-tool given this many times at most

CREDENTIAL_VARIABLES: Final = (
    "ANTHROPIC_API_KEY",
    "ANTHROPIC_AUTH_TOKEN",
    "CLAUDE_CODE_OAUTH_TOKEN",
)
PROVIDER_VARIABLES: Final = ("CLAUDE_CODE_USE_BEDROCK", "CLAUDE_CODE_USE_VERTEX")


class PermissionMode(enum.StrEnum):
    """What Claude Code may do without asking a person."""

    ASK = "ask"  # every tool Claude Code would ask about becomes a makima question
    ACCEPT_EDITS = "accept-edits"  # file edits go through; other tools are asked about
    ALLOW_ALL = "allow-all"  # makima allows every tool without asking


@dataclass(frozen=True, slots=True)
class ClaudeSettings:
    model: str | None = None
    permission_mode: PermissionMode = PermissionMode.ASK
    allow_tools: tuple[str, ...] = field(default=())
    max_turns: int | None = None

    def __post_init__(self) -> None:
        if self.model is not None:
            _check_name("model", self.model)
        if not isinstance(self.permission_mode, PermissionMode):
            raise InvalidValueError(
                f"'permission_mode' must be one of {', '.join(m.value for m in PermissionMode)}"
            )
        if len(self.allow_tools) > TOOLS_LIMIT:
            raise InvalidValueError(
                f"'allow_tools' has {len(self.allow_tools)} entries; the limit is {TOOLS_LIMIT}"
            )
        for tool in self.allow_tools:
            _check_name("allow_tools[]", tool)
        if self.max_turns is not None and (
            isinstance(self.max_turns, bool)
            or not isinstance(self.max_turns, int)
            or not 1 <= self.max_turns <= MAX_TURNS_LIMIT
        ):
            raise InvalidValueError(
                f"'max_turns' must be an integer from 1 to {MAX_TURNS_LIMIT}; "
                f"got {self.max_turns!r}"
            )

    @classmethod
    def from_params(cls, params: Mapping[str, Any]) -> ClaudeSettings:
        """From the ``claude`` object of ``supervisor.create`` (unknown keys refused)."""
        known = {"model", "permission_mode", "allow_tools", "max_turns"}
        unknown = sorted(set(params) - known)
        if unknown:
            raise InvalidValueError(
                f"unknown 'claude' setting {unknown[0]!r}; expected {', '.join(sorted(known))}"
            )
        model = params.get("model")
        if model is not None and not isinstance(model, str):
            raise InvalidValueError(f"'model' must be a string; got {model!r:.80}")
        tools = params.get("allow_tools", [])
        if not isinstance(tools, list) or not all(isinstance(t, str) for t in tools):
            raise InvalidValueError("'allow_tools' must be a list of tool names (strings)")
        return cls(
            model=model,
            permission_mode=parse_permission_mode(params.get("permission_mode", "ask")),
            allow_tools=tuple(tools),
            max_turns=params.get("max_turns"),
        )

    def to_params(self) -> dict[str, Any]:
        params: dict[str, Any] = {"permission_mode": self.permission_mode.value}
        if self.model is not None:
            params["model"] = self.model
        if self.allow_tools:
            params["allow_tools"] = list(self.allow_tools)
        if self.max_turns is not None:
            params["max_turns"] = self.max_turns
        return params

    def to_argv(self) -> list[str]:
        """The adapter's arguments: every one ``--key=value``, so no value reads as an option."""
        argv = [f"--permission-mode={self.permission_mode.value}"]
        if self.model is not None:
            argv.append(f"--model={self.model}")
        argv.extend(f"--allow-tool={tool}" for tool in self.allow_tools)
        if self.max_turns is not None:
            argv.append(f"--max-turns={self.max_turns}")
        return argv

    @classmethod
    def from_argv(cls, argv: Sequence[str]) -> ClaudeSettings:
        model: str | None = None
        mode = PermissionMode.ASK
        tools: list[str] = []
        max_turns: int | None = None
        for arg in argv:
            key, sep, value = arg.partition("=")
            if not sep:
                raise InvalidValueError(f"argument {arg!r:.80} is not --key=value")
            if key == "--model":
                model = value
            elif key == "--permission-mode":
                mode = parse_permission_mode(value)
            elif key == "--allow-tool":
                tools.append(value)
            elif key == "--max-turns":
                try:
                    max_turns = int(value)
                except ValueError:
                    raise InvalidValueError(
                        f"--max-turns must be an integer; got {value!r:.80}"
                    ) from None
            else:
                raise InvalidValueError(
                    f"unknown argument {key!r:.80}; expected --model, --permission-mode, "
                    "--allow-tool or --max-turns"
                )
        return cls(model=model, permission_mode=mode, allow_tools=tuple(tools), max_turns=max_turns)

    def command(self, python: str) -> list[str]:
        """The supervisor's agent command, run by ``python`` (the daemon's interpreter)."""
        return [python, "-m", MODULE, *self.to_argv()]


def parse_permission_mode(value: object) -> PermissionMode:
    try:
        return PermissionMode(str(value))
    except ValueError:
        raise InvalidValueError(
            f"'permission_mode' must be one of {', '.join(m.value for m in PermissionMode)}; "
            f"got {value!r:.80}"
        ) from None


def _check_name(what: str, value: object) -> None:
    if not isinstance(value, str) or not value.strip():
        raise InvalidValueError(f"'{what}' must be a non-empty string; got {value!r:.80}")
    if len(value) > NAME_LIMIT:
        raise InvalidValueError(f"'{what}' is {len(value)} characters; the limit is {NAME_LIMIT}")
    if any(ord(c) < 32 for c in value):
        raise InvalidValueError(f"'{what}' must not contain control characters; got {value!r:.80}")


# --------------------------------------------------------------------------- checks


def install_problem() -> str | None:
    """Why Claude Code cannot run under this interpreter, in one line, or None."""
    spec = importlib.util.find_spec("claude_agent_sdk")
    if spec is None or spec.origin is None:
        return f"Claude Code is not installed for this makima; install it with: {INSTALL_HINT}"
    bundled = Path(spec.origin).parent / "_bundled" / "claude"
    if os.access(bundled, os.X_OK) or shutil.which("claude") is not None:
        return None
    return (
        f"the Claude Agent SDK is installed but has no Claude Code binary ({bundled} is missing); "
        f"reinstall it with: {INSTALL_HINT}"
    )


def credentials_problem(env: Mapping[str, str]) -> str | None:
    """Why Claude Code would have no credentials in ``env``, in one line, or None.

    Credentials are an API key or token in the environment, a cloud provider
    selected for Claude Code, or a login saved by ``claude login``.
    """
    if any(env.get(name, "").strip() for name in CREDENTIAL_VARIABLES):
        return None
    if any(env.get(name, "").strip() not in ("", "0", "false") for name in PROVIDER_VARIABLES):
        return None
    config = env.get("CLAUDE_CONFIG_DIR") or (
        os.path.join(env["HOME"], ".claude") if env.get("HOME") else None
    )
    if config is not None and os.path.isfile(os.path.join(config, ".credentials.json")):
        return None
    return (
        "no Claude credentials: set ANTHROPIC_API_KEY (or ANTHROPIC_AUTH_TOKEN) in the "
        "daemon's environment, or pass --env ANTHROPIC_API_KEY=..."
    )


def agent_command(
    params: Mapping[str, Any],
    goal: str,
    env: Mapping[str, str],
    *,
    python: str,
    environ: Mapping[str, str],
) -> tuple[str, ...]:
    """The agent command of a ``supervisor.create`` with ``claude`` settings.

    Refused, with one line saying why, when the request also names a command,
    has no goal, when Claude Code is not installed for ``python``, or when
    the agent's environment (``environ``, the daemon's, plus ``env``) holds no
    credentials.
    """
    if params.get("command") is not None:
        raise InvalidValueError("give either 'command' or 'claude', not both")
    claude = params.get("claude")
    if not isinstance(claude, Mapping):
        raise InvalidValueError(f"'claude' must be an object of settings; got {claude!r:.80}")
    settings = ClaudeSettings.from_params(claude)
    if not goal.strip():
        raise InvalidValueError("a Claude supervisor needs a goal: the first prompt Claude gets")
    problem = install_problem() or credentials_problem({**environ, **env})
    if problem is not None:
        raise InvalidValueError(problem)
    return tuple(settings.command(python))

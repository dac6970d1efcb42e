"""Claude Code under a real makima daemon, against the fake Anthropic API.

A test gets a running daemon subprocess (``ClaudeRig``) whose environment
points Claude Code at a :class:`FakeAnthropic` playing the test's script,
with a private HOME and Claude config directory, and drives it through the
``makima`` CLI as a person would.
"""

from __future__ import annotations

import json
import os
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import anyio
import pytest

from makima.control.client import ControlClient
from makima.embedded import ConnectParams
from tests.claude.fake_anthropic import FakeAnthropic, Step
from tests.integration.test_cli import Run, makima
from tests.process import DaemonProcess, daemon_process

pytest.importorskip("claude_agent_sdk")

# Never let a real key or endpoint of the machine running the tests leak in.
SCRUBBED = (
    "ANTHROPIC_API_KEY",
    "ANTHROPIC_AUTH_TOKEN",
    "ANTHROPIC_BASE_URL",
    "CLAUDE_CODE_OAUTH_TOKEN",
    "CLAUDE_CONFIG_DIR",
    "CLAUDE_CODE_USE_BEDROCK",
    "CLAUDE_CODE_USE_VERTEX",
)


@pytest.fixture(autouse=True)
def no_real_credentials(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in SCRUBBED:
        monkeypatch.delenv(name, raising=False)


@dataclass
class ClaudeRig:
    api: FakeAnthropic
    daemon: DaemonProcess
    home: Path
    workdir: Path

    async def cli(self, *args: str) -> Run:
        return await makima(self.daemon.socket_path, *args)

    async def start(self, name: str, goal: str, *args: str) -> str:
        run = await self.cli("start", name, "--claude", goal, "--cwd", str(self.workdir), *args)
        assert run.code == 0, run
        return run.out.strip()

    async def get(self, supervisor_id: str) -> dict[str, Any]:
        async with ControlClient.connect(self.daemon.socket_path, timeout=30.0) as client:
            return await client.call("supervisor.get", {"supervisor_id": supervisor_id})

    async def state(self, supervisor_id: str) -> str:
        return str((await self.get(supervisor_id))["state"])

    async def until_state(
        self, supervisor_id: str, *states: str, deadline: float = 90.0
    ) -> dict[str, Any]:
        """The supervisor once it is in one of ``states`` (now or after a state change)."""
        return await self._until(
            ["supervisor.state_changed"],
            lambda event: event.get("supervisor_id") == supervisor_id,
            lambda: self._in_state(supervisor_id, states),
            f"supervisor {supervisor_id} in {states}",
            deadline,
        )

    async def _in_state(self, supervisor_id: str, states: tuple[str, ...]) -> dict[str, Any] | None:
        found = await self.get(supervisor_id)
        return found if found["state"] in states else None

    async def questions(self) -> list[dict[str, Any]]:
        run = await self.cli("questions", "--json")
        assert run.code == 0, run
        return list(json.loads(run.out))

    async def until_question(self, deadline: float = 90.0) -> dict[str, Any]:
        """The first question ``makima questions`` lists, once there is one."""

        async def listed() -> dict[str, Any] | None:
            found = await self.questions()
            return found[0] if found else None

        return await self._until(
            ["question.asked", "question.redelivered", "question.pending"],
            lambda event: True,
            listed,
            "a question listed by makima questions",
            deadline,
        )

    async def _until(
        self,
        kinds: list[str],
        relevant: Callable[[dict[str, Any]], bool],
        check: Callable[[], Awaitable[dict[str, Any] | None]],
        what: str,
        deadline: float,
    ) -> dict[str, Any]:
        """Check now, then again after each relevant event, until ``check`` finds it."""
        try:
            with anyio.fail_after(deadline):
                async with (
                    ControlClient.connect(self.daemon.socket_path, timeout=30.0) as client,
                    client.events(kinds) as events,
                ):
                    found = await check()
                    if found is not None:
                        return found
                    async for event in events:
                        if relevant(event) and (found := await check()) is not None:
                            return found
                    raise AssertionError(f"the event stream ended before {what}")
        except TimeoutError:
            raise AssertionError(f"not {what} within {deadline}s") from None

    async def history(self, supervisor_id: str) -> list[dict[str, Any]]:
        run = await self.cli("history", supervisor_id, "--json")
        assert run.code == 0, run
        return list(json.loads(run.out))

    async def restart(self, **extra: str) -> None:
        await self.daemon.start(extra_env={**self.env(), **extra})

    def env(self) -> dict[str, str]:
        return self.api.env(HOME=str(self.home), CLAUDE_CONFIG_DIR=str(self.home / ".claude"))


@asynccontextmanager
async def claude_rig(
    short_tmp: Path,
    params: ConnectParams,
    script: Iterable[Step],
    *,
    env: dict[str, str] | None = None,
    credentials: bool = True,
) -> AsyncIterator[ClaudeRig]:
    """A daemon whose Claude Code talks to a fake API playing ``script``; without
    ``credentials`` the daemon's environment holds no API key."""
    home = short_tmp / f"home-{os.urandom(3).hex()}"
    workdir = home / "work"
    workdir.mkdir(parents=True)
    async with FakeAnthropic(script) as api, daemon_process(short_tmp, params) as proc:
        rig = ClaudeRig(api, proc, home, workdir)
        daemon_env = {**rig.env(), **(env or {})}
        if not credentials:
            del daemon_env["ANTHROPIC_API_KEY"]
        await proc.start(extra_env=daemon_env)
        yield rig


__all__ = ["ClaudeRig", "claude_rig"]

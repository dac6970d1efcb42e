"""The Claude Code adapter when its daemon goes silent past its lease: the real
bundled Claude Code binary against the scripted fake API, the adapter run as a
real subprocess by a hand-played daemon (tests/unit/fake_daemon.py). After a
ping and then silence the adapter kills Claude Code and exits; no Claude Code
process is left."""

from __future__ import annotations

import contextlib
import os
from pathlib import Path

import anyio
import pytest

from makima import sdk
from makima.agent import ping_message
from tests.claude.fake_anthropic import FakeAnthropic, Text, ToolUse, Turn
from tests.unit.fake_daemon import FakeDaemon, fake_daemon, write_agent

pytestmark = [pytest.mark.anyio, pytest.mark.timeout(120)]

ASK = "mcp__makima__ask_user"


def children(pid: int) -> list[int]:
    """The live processes whose parent is ``pid``."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        with contextlib.suppress(OSError):
            stat = (entry / "stat").read_text()
            fields = stat[stat.rindex(")") + 2 :].split()
            if int(fields[1]) == pid and fields[0] != "Z":
                found.append(int(entry.name))
    return found


def alive(pid: int) -> bool:
    """True while ``pid`` exists and is not a zombie."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat[stat.rindex(")") + 2 :].split()[0] != "Z"


async def ack_until_ask(daemon: FakeDaemon) -> dict[str, object]:
    """Play the daemon (ack everything) until the adapter asks a question."""
    while True:
        message = await daemon.receive()
        if message["type"] == "ask":
            await daemon.ack(message, question_id="q-1")  # never answered
            return message
        await daemon.ack(message)


async def test_silent_daemon_kills_claude_code(short_tmp: Path) -> None:
    script = [Turn(Text("Asking."), ToolUse(ASK, {"question": "Go on?", "choices": ["yes", "no"]}))]
    home = short_tmp / f"home-{os.urandom(3).hex()}"
    workdir = home / "work"
    workdir.mkdir(parents=True)
    agent = write_agent(
        short_tmp,
        "from makima.agents.claude.__main__ import main as claude_main",
        run=f"os.chdir({str(workdir)!r})\nclaude_main([])",
    )
    async with FakeAnthropic(script) as api:
        env = api.env(HOME=str(home), CLAUDE_CONFIG_DIR=str(home / ".claude"))
        async with fake_daemon(agent, tmp_path=short_tmp, env=env) as daemon:
            await daemon.start(name="lost", goal="Ask whether to go on")
            with anyio.fail_after(60):
                ask = await ack_until_ask(daemon)
            assert ask["question"] == "Go on?"
            claude = children(daemon.process.pid)
            assert len(claude) == 1, claude  # Claude Code, waiting for the answer
            pidfd = os.pidfd_open(claude[0])  # readable once that process has ended
            try:
                await daemon.send(ping_message(0.5))
                code = await daemon.ack_until_exit(within=10.0)
                with anyio.fail_after(5):
                    await anyio.wait_readable(pidfd)
            finally:
                os.close(pidfd)
            assert not alive(claude[0])

    assert code == sdk.EXIT_DAEMON_SILENT, daemon.stderr
    assert "makima.sdk: no ping from the daemon for" in daemon.stderr
    assert "claude.daemon_lost" in daemon.stderr
    assert not daemon.of_type("done") and not daemon.of_type("fail")

"""The SDK's self-stop when the daemon goes silent past its lease: ``ping`` lines
arm a deadline; with no newer ping by then the agent runs its daemon-lost hooks,
cancels ``main`` and exits with EXIT_DAEMON_SILENT. Agents run as real
subprocesses over pipes, played by a hand-made daemon (tests/unit/fake_daemon.py)."""

from __future__ import annotations

import json
import time
from pathlib import Path

import anyio
import pytest

from makima import sdk
from makima.agent import ping_message
from tests.unit.fake_daemon import FakeDaemon, fake_daemon, write_agent

pytestmark = pytest.mark.anyio

VALID_FOR = 0.5
STOP_LINE = "makima.sdk: no ping from the daemon for"

# Sends an activity every 0.1 s (the test's clock: each tick is acknowledged), with
# two daemon-lost hooks, the first of which raises; says on stderr when cancelled.
TICKER = """
def boom():
    raise RuntimeError("hook boom")

async def main(agent):
    agent.on_daemon_lost(boom)
    agent.on_daemon_lost(lambda: print("hook ran", file=sys.stderr, flush=True))
    tick = 0
    try:
        while True:
            tick += 1
            await agent.activity(f"tick {tick}")
            await asyncio.sleep(0.1)
    except asyncio.CancelledError:
        print("main cancelled", file=sys.stderr, flush=True)
        raise
"""


async def tick(daemon: FakeDaemon) -> None:
    await daemon.ack(await daemon.expect("activity"))


async def test_silence_after_a_ping_stops_the_agent(tmp_path: Path) -> None:
    async with fake_daemon(write_agent(tmp_path, TICKER), tmp_path=tmp_path) as daemon:
        await daemon.start()
        await tick(daemon)
        pinged = time.monotonic()
        await daemon.send(ping_message(VALID_FOR))
        code = await daemon.ack_until_exit(within=4.0)
        elapsed = time.monotonic() - pinged

    assert code == sdk.EXIT_DAEMON_SILENT == 75, daemon.stderr
    assert elapsed >= VALID_FOR
    stderr = daemon.stderr
    assert STOP_LINE in stderr
    assert "(its lease deadline passed); stopping this agent so that the supervisor's" in stderr
    # the hooks ran (a raising one does not stop the next), then main was cancelled
    assert "a daemon-lost hook raised" in stderr and "hook boom" in stderr
    assert stderr.index(STOP_LINE) < stderr.index("hook ran") < stderr.index("main cancelled")
    assert stderr.count(STOP_LINE) == 1
    assert not daemon.of_type("done") and not daemon.of_type("fail")


async def test_pings_keep_it_alive_and_other_lines_do_not(tmp_path: Path) -> None:
    async with fake_daemon(write_agent(tmp_path, TICKER), tmp_path=tmp_path) as daemon:
        await daemon.start()
        await tick(daemon)
        await daemon.send(ping_message(VALID_FOR))
        began = time.monotonic()
        # A ping with every tick (about every 0.1 s) for five times VALID_FOR.
        while time.monotonic() - began < 5 * VALID_FOR:
            await daemon.send(ping_message(VALID_FOR))
            await tick(daemon)
        assert daemon.process.returncode is None, daemon.stderr
        assert STOP_LINE not in daemon.stderr
        # Acks, answers and the like go on; pings stop: the agent stops itself.
        stopped = time.monotonic()
        code = await daemon.ack_until_exit(within=3.0)
        assert time.monotonic() - stopped < VALID_FOR + 2.0

    assert code == sdk.EXIT_DAEMON_SILENT, daemon.stderr
    assert daemon.stderr.count(STOP_LINE) == 1
    assert len(daemon.of_type("activity")) > 20


async def test_an_agent_never_pinged_never_stops_itself(tmp_path: Path) -> None:
    async with fake_daemon(write_agent(tmp_path, TICKER), tmp_path=tmp_path) as daemon:
        await daemon.start()
        began = time.monotonic()
        while time.monotonic() - began < 3 * VALID_FOR:
            await tick(daemon)
        await daemon.send({"type": "ping", "valid_for": "soon"})  # not a deadline: ignored
        await tick(daemon)
        await tick(daemon)
        assert daemon.process.returncode is None, daemon.stderr
        await daemon.close_stdin()
        code = await daemon.ack_until_exit(within=3.0)

    assert code == sdk.EXIT_DAEMON_GONE, daemon.stderr
    assert "ignoring a ping without a finite 'valid_for'" in daemon.stderr
    assert STOP_LINE not in daemon.stderr
    assert "hook ran" not in daemon.stderr


async def test_a_ping_before_start_arms_and_start_still_works(tmp_path: Path) -> None:
    async with fake_daemon(write_agent(tmp_path, TICKER), tmp_path=tmp_path) as daemon:
        await daemon.send(ping_message(VALID_FOR))
        await daemon.start()
        await tick(daemon)
        code = await daemon.ack_until_exit(within=3.0)

    assert code == sdk.EXIT_DAEMON_SILENT, daemon.stderr
    assert "hook ran" in daemon.stderr


async def test_core_rearms_on_each_ping_only() -> None:
    """The sans-I/O core: the latest ping sets the deadline; a bad one changes nothing."""
    agent = sdk.Agent(lambda data: None)
    ran: list[str] = []
    lost = anyio.Event()
    agent.on_daemon_lost(lambda: ran.append("hook"))
    agent.on_daemon_lost(lost.set)
    agent.feed_line(json.dumps(ping_message(30.0)).encode())
    first = agent._ping_deadline
    assert first is not None
    agent.feed_line(json.dumps(ping_message(60.0)).encode())
    second = agent._ping_deadline
    assert second is not None and second > first
    for bad in (
        '{"type":"ping"}',
        '{"type":"ping","valid_for":true}',
        '{"type":"ping","valid_for":1e999}',
    ):
        agent.feed_line(bad.encode())
        assert agent._ping_deadline == second
    agent.feed_line(json.dumps(ping_message(0.0)).encode())  # a deadline of now: stop
    with anyio.fail_after(2):
        await lost.wait()
    assert agent.daemon_silent
    assert ran == ["hook"]
    assert agent.closed
    agent.on_daemon_lost(lambda: ran.append("late"))
    assert ran == ["hook", "late"]

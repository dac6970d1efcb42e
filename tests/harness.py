"""Test harness: an in-process daemon, a control client, and agents the test
drives by hand through a relay (tests/agents/relay_agent.py)."""

from __future__ import annotations

import json
import sys
import uuid
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import anyio
import anyio.abc

from makima.config import DaemonConfig
from makima.control.client import ControlClient
from makima.daemon import Daemon
from makima.embedded import ConnectParams
from makima.lines import LineBuffer, TooLong

AGENTS = Path(__file__).parent / "agents"
RELAY = AGENTS / "relay_agent.py"
RAW = AGENTS / "raw_agent.py"
DEADLINE = 30.0


def dsn(params: ConnectParams) -> str:
    return (
        f"postgresql://{params.user}:{params.password}@/{params.database}"
        f"?host={params.host}&port={params.port}"
    )


def relay_command(path: Path) -> list[str]:
    return [sys.executable, str(RELAY), str(path)]


PING = b'{"type":"ping"'


class AgentChannel:
    """The test's end of one relayed agent: it reads what the daemon sends."""

    def __init__(
        self, stream: anyio.abc.SocketStream, pid: int, buffer: LineBuffer, pending: list[bytes]
    ) -> None:
        self.stream = stream
        self.pid = pid
        self._buffer = buffer
        self._lines = [line for line in pending if not line.startswith(PING)]
        # Lease pings (a daemon on a shared database sends them every renewal) are
        # left out, unless a test asks for them.
        self.pings = False

    async def send(self, message: dict[str, Any]) -> None:
        await self.stream.send((json.dumps(message) + "\n").encode())

    async def send_raw(self, data: bytes) -> None:
        await self.stream.send(data)

    async def receive(self) -> dict[str, Any] | None:
        """The next message from the daemon, or None when it closed the agent's stdin."""
        with anyio.fail_after(DEADLINE):
            while not self._lines:
                try:
                    data = await self.stream.receive()
                except (anyio.EndOfStream, anyio.ClosedResourceError, anyio.BrokenResourceError):
                    await self.stream.aclose()  # lets the relay agent exit
                    return None
                for item in self._buffer.feed(data):
                    assert not isinstance(item, TooLong)
                    if item and (self.pings or not item.startswith(PING)):
                        self._lines.append(item)
            result: dict[str, Any] = json.loads(self._lines.pop(0))
            return result

    async def expect(self, kind: str) -> dict[str, Any]:
        message = await self.receive()
        assert message is not None, f"expected {kind!r}, but the daemon closed the agent's stdin"
        assert message["type"] == kind, f"expected {kind!r}, got {message}"
        return message

    async def request(self, message: dict[str, Any]) -> dict[str, Any]:
        """Send with a fresh ref and return the daemon's ack or error for it."""
        ref = uuid.uuid4().hex[:8]
        await self.send({**message, "ref": ref})
        reply = await self.receive()
        assert reply is not None and reply.get("ref") == ref, reply
        return reply

    async def close(self) -> None:
        await self.stream.aclose()


class Relay:
    def __init__(self, listener: anyio.abc.SocketListener, path: Path) -> None:
        self.listener = listener
        self.path = path
        self.channels: list[AgentChannel] = []

    @property
    def command(self) -> list[str]:
        return relay_command(self.path)

    async def accept(self) -> AgentChannel:
        with anyio.fail_after(DEADLINE):
            stream = await self.listener.accept()  # type: ignore[attr-defined]
            buffer = LineBuffer()
            lines: list[bytes] = []
            while not lines:
                data = await stream.receive()
                lines.extend(x for x in buffer.feed(data) if isinstance(x, bytes))
            pid = int(lines.pop(0))
            channel = AgentChannel(stream, pid, buffer, lines)
            self.channels.append(channel)
            return channel


@asynccontextmanager
async def relay_listener(directory: Path) -> AsyncIterator[Relay]:
    path = directory / f"r{uuid.uuid4().hex[:8]}.sock"
    listener = await anyio.create_unix_listener(path)
    relay = Relay(listener, path)
    try:
        yield relay
    finally:
        for channel in relay.channels:
            await channel.close()
        await listener.aclose()


def daemon_config(params: ConnectParams, directory: Path, **overrides: Any) -> DaemonConfig:
    name = uuid.uuid4().hex[:8]
    state = directory / f"st-{name}"
    state.mkdir()
    settings: dict[str, Any] = {"heartbeat_interval": 0.5, "shutdown_grace": 2.0}
    settings.update(overrides)
    return DaemonConfig(
        state_dir=state,
        socket_path=directory / f"d{name}.sock",
        database_url=dsn(params),
        **settings,
    )


@asynccontextmanager
async def running_daemon(config: DaemonConfig) -> AsyncIterator[Daemon]:
    daemon = Daemon(config, handle_signals=False)
    async with anyio.create_task_group() as tg:
        with anyio.fail_after(DEADLINE):
            await tg.start(daemon.run)
        try:
            yield daemon
        finally:
            daemon.request_shutdown()


@asynccontextmanager
async def client_for(daemon: Daemon) -> AsyncIterator[ControlClient]:
    async with ControlClient.connect(daemon.config.socket_path, timeout=DEADLINE) as client:
        yield client


async def until(
    predicate: Callable[[], bool], what: str = "the condition", deadline: float = DEADLINE
) -> None:
    """Wait for a condition that no event announces (a process gone, a file written),
    looking every few milliseconds; fail naming ``what`` after ``deadline`` seconds."""
    try:
        with anyio.fail_after(deadline):
            while not predicate():  # noqa: ASYNC110 - nothing to wait on but the condition
                await anyio.sleep(0.02)
    except TimeoutError:
        raise AssertionError(f"not {what} within {deadline}s") from None


async def next_event(events: Any, kind: str, **match: Any) -> dict[str, Any]:
    """Read events until one of ``kind`` whose fields match."""
    with anyio.fail_after(DEADLINE):
        async for event in events:
            if event["kind"] == kind and all(event.get(k) == v for k, v in match.items()):
                return dict(event)
    raise AssertionError(f"the event stream ended before {kind} {match}")

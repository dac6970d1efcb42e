"""What the control socket's connections may cost the daemon: how many are
served at once, and how much of their unfinished lines it holds (DESIGN §9)."""

from __future__ import annotations

import json
import os
import sys
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import anyio
import anyio.abc
import pytest
from structlog.testing import capture_logs

from makima.config import DaemonConfig
from makima.control import server
from makima.control.client import ControlClient, RemoteError
from makima.control.codec import MAX_LINE, SPILL
from makima.control.server import ControlServer, Peer, Reply, Stream
from makima.embedded import ConnectParams
from makima.errors import InvalidValueError
from tests.harness import DEADLINE, client_for, daemon_config, running_daemon
from tests.process import daemon_process

pytestmark = pytest.mark.anyio

PROTOCOL = "makima-control/1"
UNAVAILABLE = -32005
END = b"}\n"
"""What a :func:`hello_line` lacks while it is unfinished."""


def hello_line(request_id: int, size: int = 0) -> bytes:
    """A ``daemon.hello`` request of ``size`` bytes (at least), newline included,
    padded with JSON whitespace."""
    head = b'{"jsonrpc":"2.0","id":%d,"method":"daemon.hello"' % request_id
    return head + b" " * max(0, size - len(head) - len(END)) + END


class Raw:
    """One connection to the daemon, byte by byte."""

    def __init__(self, stream: anyio.abc.SocketStream) -> None:
        self.stream = stream
        self._buffer = b""

    async def send(self, data: bytes) -> bool:
        """False if the daemon had closed the connection."""
        try:
            with anyio.fail_after(DEADLINE):
                await self.stream.send(data)
        except anyio.BrokenResourceError:
            return False
        return True

    async def read(self) -> dict[str, Any] | None:
        """The next line from the daemon, or None once it has closed its side."""
        with anyio.fail_after(DEADLINE):
            while b"\n" not in self._buffer:
                try:
                    self._buffer += await self.stream.receive()
                except (anyio.EndOfStream, anyio.BrokenResourceError):
                    return None
        line, self._buffer = self._buffer.split(b"\n", 1)
        message: dict[str, Any] = json.loads(line)
        return message

    async def hello(self, request_id: int) -> dict[str, Any]:
        assert await self.send(hello_line(request_id))
        reply = await self.read()
        assert reply is not None and reply["id"] == request_id, reply
        result: dict[str, Any] = reply["result"]
        return result

    async def leave(self) -> None:
        """Stop sending and wait until the daemon has ended the connection."""
        await self.stream.send_eof()
        assert await self.read() is None


class Connections:
    def __init__(self, path: Path) -> None:
        self.path = path
        self.opened: list[Raw] = []

    async def new(self) -> Raw:
        with anyio.fail_after(DEADLINE):
            raw = Raw(await anyio.connect_unix(self.path))
        self.opened.append(raw)
        return raw


@asynccontextmanager
async def connections(path: Path) -> AsyncIterator[Connections]:
    opened = Connections(path)
    try:
        yield opened
    finally:
        for raw in opened.opened:
            await raw.stream.aclose()


def refused(message: dict[str, Any] | None, *words: str) -> bool:
    """An UNAVAILABLE error about no request (id null) whose message has ``words``."""
    return (
        message is not None
        and message.get("id", 0) is None
        and message.get("error", {}).get("code") == UNAVAILABLE
        and all(word in message["error"]["message"] for word in words)
    )


async def test_connections_over_the_cap_are_told_and_closed(
    db_params: ConnectParams, short_tmp: Path
) -> None:
    config = daemon_config(db_params, short_tmp, max_connections=3)
    async with running_daemon(config), connections(config.socket_path) as opened:
        served = [await opened.new() for _ in range(3)]
        for n, raw in enumerate(served):
            assert (await raw.hello(n))["protocol"] == PROTOCOL

        with capture_logs() as logged:
            over = await opened.new()
            await over.send(hello_line(99))  # sent before it reads why: no broken pipe
            refusal = await over.read()
        assert refusal is not None
        assert refused(refusal, "at most 3", "--max-connections", "MAKIMA_MAX_CONNECTIONS"), refusal
        assert await over.read() is None  # one line, then the daemon hangs up
        events = [e for e in logged if e["event"] == "control.connection_refused"]
        assert events == [
            {
                "event": "control.connection_refused",
                "log_level": "warning",
                "reason": "max_connections",
                "max_connections": 3,
                "pid": os.getpid(),
                "uid": os.getuid(),
            }
        ]

        for n, raw in enumerate(served):  # the three are still served
            assert (await raw.hello(10 + n))["protocol"] == PROTOCOL
        await served[0].leave()
        newcomer = await opened.new()  # one left: room for one
        assert (await newcomer.hello(20))["protocol"] == PROTOCOL
        again = await opened.new()  # and no more
        await again.send(hello_line(21))
        assert refused(await again.read(), "at most 3")


async def test_the_daemon_answers_while_connections_hold_unfinished_lines(
    db_params: ConnectParams, short_tmp: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Unfinished lines past SPILL bytes share one budget: a line that would pass
    it closes its connection only; short ones and other clients are unaffected;
    a finished line and a closed connection give their share back."""
    monkeypatch.setattr(server, "INPUT_BUDGET", MAX_LINE)
    long_line = MAX_LINE - 100  # two unfinished ones do not fit in the budget, one does
    config = daemon_config(db_params, short_tmp)
    async with running_daemon(config) as daemon, connections(config.socket_path) as opened:
        short = [await opened.new() for _ in range(20)]
        for n, raw in enumerate(short):  # SPILL bytes: each connection's own
            assert await raw.send(hello_line(n, SPILL + len(END))[: -len(END)])

        first_messages: dict[int, dict[str, Any] | None] = {}
        arrived = anyio.Event()

        async def first_message(raw: Raw) -> None:
            first_messages[id(raw)] = await raw.read()
            arrived.set()

        long = [await opened.new() for _ in range(2)]
        async with anyio.create_task_group() as tg:
            for n, raw in enumerate(long, start=100):
                tg.start_soon(first_message, raw)
                await raw.send(hello_line(n, long_line)[: -len(END)])  # False if refused
            with anyio.fail_after(DEADLINE):
                await arrived.wait()
            (loser,) = (raw for raw in long if id(raw) in first_messages)
            assert refused(first_messages[id(loser)], "unfinished input", str(MAX_LINE))
            assert await loser.read() is None  # closed
            (keeper,) = (raw for raw in long if raw is not loser)

            # meanwhile every other client is answered, short unfinished lines go on
            async with client_for(daemon) as client:
                assert (await client.call("daemon.hello"))["protocol"] == PROTOCOL
                assert "supervisors" in await client.call("supervisor.list")
            assert await short[0].send(END)
            reply = await short[0].read()
            assert reply is not None and reply["id"] == 0 and "result" in reply, reply

            await keeper.stream.send_eof()  # leaves mid-line: the daemon ends it
        assert first_messages[id(keeper)] is None
        for raw in short[1:]:
            await raw.leave()

        # everything was given back: a long line fits again, twice in a row
        last = await opened.new()
        assert await last.send(hello_line(200, long_line) + hello_line(201, long_line))
        for n in (200, 201):
            reply = await last.read()
            assert reply is not None and reply["id"] == n and "result" in reply, reply


async def test_the_cap_comes_from_the_command_line_or_the_environment(
    db_params: ConnectParams, short_tmp: Path
) -> None:
    async with daemon_process(short_tmp, db_params) as proc:
        await proc.start(extra_env={"MAKIMA_MAX_CONNECTIONS": "1"})
        async with connections(proc.socket_path) as opened:
            first = await opened.new()
            assert (await first.hello(1))["protocol"] == PROTOCOL
            second = await opened.new()
            await second.send(hello_line(2))
            assert refused(await second.read(), "at most 1")
        assert await proc.terminate() == 0

    invalid = await anyio.run_process(
        [sys.executable, "-m", "makima", "daemon", "--max-connections", "0"], check=False
    )
    assert invalid.returncode == 2
    assert b"0 is not in the range x>=1" in invalid.stderr


async def no_methods(peer: Peer, method: str, params: dict[str, Any]) -> Reply | Stream:
    raise AssertionError("not called")


def test_max_connections_must_be_at_least_one(short_tmp: Path) -> None:
    with pytest.raises(InvalidValueError, match="max connections must be at least 1; got 0"):
        DaemonConfig(state_dir=short_tmp, socket_path=short_tmp / "x.sock", max_connections=0)
    with pytest.raises(InvalidValueError, match="max_connections must be at least 1, got 0"):
        ControlServer(no_methods, max_connections=0)


async def test_a_client_over_the_cap_reports_the_daemons_reason(
    db_params: ConnectParams, short_tmp: Path
) -> None:
    """The CLI's client says why it was refused, not "could not read a request"."""
    config = daemon_config(db_params, short_tmp, max_connections=1)
    async with running_daemon(config) as daemon, client_for(daemon) as first:
        assert (await first.call("daemon.hello"))["protocol"] == PROTOCOL
        async with ControlClient.connect(config.socket_path, timeout=DEADLINE) as second:
            with pytest.raises(RemoteError) as refused:
                await second.call("daemon.hello")
        assert refused.value.code == UNAVAILABLE
        assert refused.value.message.startswith("too many connections")

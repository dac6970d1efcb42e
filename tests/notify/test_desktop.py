"""``makima notify --desktop``: without a notification service it says so in one
line and the other notifiers go on; with one (a private session bus and a
notification server run by the test) the notification names the supervisor,
the question and its choices, and a click on a choice answers the question."""

from __future__ import annotations

import shutil
import subprocess
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import anyio
import anyio.abc
import pytest
from jeepney import (  # type: ignore[import-untyped]
    DBusAddress,
    MessageType,
    new_error,
    new_method_return,
    new_signal,
)
from jeepney.wrappers import new_method_call  # type: ignore[import-untyped]

from makima.control.client import ControlClient
from makima.notify.dbus import BUS, BusConnection, member
from tests.harness import DEADLINE, next_event, until
from tests.notify.helpers import NotifyProcess, ask, notify_process, receiver

pytestmark = pytest.mark.anyio

DBUS_DAEMON = shutil.which("dbus-daemon")
NAME = "org.freedesktop.Notifications"
PATH = "/org/freedesktop/Notifications"
EMITTER = DBusAddress(PATH, interface=NAME)


@asynccontextmanager
async def session_bus(directory: Path) -> AsyncIterator[str]:
    """A private session bus: ``dbus-daemon`` on a socket under ``directory``; its address."""
    assert DBUS_DAEMON is not None
    process = await anyio.open_process(
        [
            DBUS_DAEMON,
            "--session",
            "--nofork",
            "--print-address",
            f"--address=unix:path={directory}/bus",
        ],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
    )
    try:
        assert process.stdout is not None
        data = b""
        with anyio.fail_after(DEADLINE):
            while b"\n" not in data:
                data += await process.stdout.receive()
        yield data.decode().splitlines()[0].strip()
    finally:
        process.kill()
        with anyio.CancelScope(shield=True):
            await process.wait()
            await process.aclose()


@dataclass
class NotificationServer:
    """org.freedesktop.Notifications, as a test double that records its calls."""

    bus: BusConnection
    calls: list[tuple[str, tuple[Any, ...]]] = field(default_factory=list)
    _changed: anyio.Event = field(default_factory=anyio.Event)
    _next_id: int = 0

    def of(self, method: str) -> list[tuple[Any, ...]]:
        return [body for name, body in self.calls if name == method]

    async def wait_for(self, method: str, count: int = 1) -> list[tuple[Any, ...]]:
        with anyio.fail_after(DEADLINE):
            while len(self.of(method)) < count:
                await self._changed.wait()
        return self.of(method)

    async def serve(self) -> None:
        async for message in self.bus.incoming:
            if message.header.message_type is not MessageType.method_call:
                continue
            _, method = member(message)
            self.calls.append((str(method), tuple(message.body)))
            if method == "GetCapabilities":
                reply = new_method_return(message, "as", (["actions", "body"],))
            elif method == "GetServerInformation":
                reply = new_method_return(message, "ssss", ("test", "makima", "1", "1.2"))
            elif method == "Notify":
                self._next_id += 1
                reply = new_method_return(message, "u", (self._next_id,))
            elif method == "CloseNotification":
                reply = new_method_return(message)
                await self.bus.send(
                    new_signal(EMITTER, "NotificationClosed", "uu", (message.body[0], 3))
                )
            else:
                reply = new_error(message, "org.freedesktop.DBus.Error.UnknownMethod")
            await self.bus.send(reply)
            changed, self._changed = self._changed, anyio.Event()
            changed.set()

    async def click(self, notification_id: int, action: str) -> None:
        await self.bus.send(new_signal(EMITTER, "ActionInvoked", "us", (notification_id, action)))


@asynccontextmanager
async def notification_server(address: str) -> AsyncIterator[NotificationServer]:
    async with BusConnection.open({"DBUS_SESSION_BUS_ADDRESS": address}) as bus:
        (result,) = await bus.call(new_method_call(BUS, "RequestName", "su", (NAME, 4)))
        assert result == 1  # the primary owner
        server = NotificationServer(bus)
        async with anyio.create_task_group() as tg:
            tg.start_soon(server.serve)
            try:
                yield server
            finally:
                tg.cancel_scope.cancel()


def logged(proc: NotifyProcess, event: str) -> bool:
    return any(e.get("event") == event for e in proc.events())


def one_desktop_line(lines: list[str]) -> str:
    assert len(lines) == 1, lines
    assert lines[0].startswith("makima: no desktop notifications: "), lines
    return lines[0]


async def test_without_a_session_bus_it_says_so_once_and_the_webhook_goes_on(
    daemon: object, client: ControlClient, short_tmp: Path, tmp_path: Path
) -> None:
    socket_path = daemon.config.socket_path  # type: ignore[attr-defined]
    async with receiver() as rx:
        args = ["--desktop", "--webhook", rx.url, "--state-file", str(tmp_path / "n.json")]
        nowhere = f"unix:path={tmp_path}/no-such-bus"
        env = {"DBUS_SESSION_BUS_ADDRESS": nowhere}
        async with notify_process(tmp_path, socket_path, args, **env) as proc:
            _, qid = await ask(client, short_tmp, "release", "Ship it?", ["ship", "hold"])
            await rx.wait_for(lambda: len(rx.ok()) == 1, "the question by webhook")
            assert await proc.stop() == 0
    assert rx.ok()[0].json()["question_id"] == qid
    line = one_desktop_line(proc.plain_lines())
    assert "no-such-bus" in line and line.endswith("the other notifiers go on")
    assert "Traceback" not in proc.text()


async def test_with_only_the_desktop_and_no_bus_it_exits_1_in_one_line(tmp_path: Path) -> None:
    env = {"DBUS_SESSION_BUS_ADDRESS": f"unix:path={tmp_path}/no-such-bus"}
    args = ["--desktop", "--state-file", str(tmp_path / "n.json")]
    async with notify_process(tmp_path, tmp_path / "no.sock", args, **env) as proc:
        assert await proc.wait() == 1
    line = one_desktop_line(proc.plain_lines())
    assert "the other notifiers go on" not in line


@pytest.mark.skipif(DBUS_DAEMON is None, reason="dbus-daemon not found")
async def test_a_bus_without_a_notification_service_is_said_in_one_line(tmp_path: Path) -> None:
    async with session_bus(tmp_path) as address:
        args = ["--desktop", "--state-file", str(tmp_path / "n.json")]
        env = {"DBUS_SESSION_BUS_ADDRESS": address}
        async with notify_process(tmp_path, tmp_path / "no.sock", args, **env) as proc:
            assert await proc.wait() == 1
    line = one_desktop_line(proc.plain_lines())
    assert "no notification service" in line


@pytest.mark.skipif(DBUS_DAEMON is None, reason="dbus-daemon not found")
async def test_a_click_on_a_choice_answers_the_question(
    daemon: object, client: ControlClient, short_tmp: Path, tmp_path: Path
) -> None:
    socket_path = daemon.config.socket_path  # type: ignore[attr-defined]
    async with session_bus(short_tmp) as address, notification_server(address) as server:
        args = ["--desktop", "--state-file", str(tmp_path / "n.json")]
        env = {"DBUS_SESSION_BUS_ADDRESS": address}
        async with notify_process(tmp_path, socket_path, args, **env) as proc:
            sid, qid = await ask(client, short_tmp, "release", "Ship 2.1.0?", ["ship", "hold"])
            (notify,) = await server.wait_for("Notify")
            app, replaces, _icon, summary, body, actions, _hints, expire = notify
            assert app == "makima" and replaces == 0 and expire == 0
            assert "release" in summary
            assert "Ship 2.1.0?" in body and "ship / hold" in body
            assert actions == ["choice-0", "ship", "choice-1", "hold"]

            async with (
                ControlClient.connect(socket_path, timeout=DEADLINE) as watcher,
                watcher.events(["question.answered"]) as events,
            ):
                # A signal from someone who is not the notification server is ignored.
                async with BusConnection.open({"DBUS_SESSION_BUS_ADDRESS": address}) as rogue:
                    await rogue.send(new_signal(EMITTER, "ActionInvoked", "us", (1, "choice-0")))
                    # An action key that names no choice is ignored too.
                    await server.click(1, "choice-7")
                    await server.click(1, "choice-1")
                answered = await next_event(events, "question.answered", question_id=qid)
            assert answered["answer"] == "hold"
            assert answered["supervisor_id"] == sid
            # The question is answered: its notification is closed.
            (closed,) = await server.wait_for("CloseNotification")
            assert closed == (1,)
            await until(lambda: logged(proc, "notify.desktop_answered"), "the answer logged")
            assert await proc.stop() == 0
    assert proc.plain_lines() == []
    assert logged(proc, "notify.desktop_foreign_signal")
    assert logged(proc, "notify.desktop_unknown_action")
    record = await client.call("supervisor.get", {"supervisor_id": sid})
    assert record["pending_questions"] == []

"""A real daemon as a subprocess: started, synchronised on systemd's READY=1
(through a NOTIFY_SOCKET the test owns), signalled and killed."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import uuid
from collections.abc import AsyncIterator, Mapping
from contextlib import asynccontextmanager
from pathlib import Path

import anyio
import anyio.abc

from makima.embedded import ConnectParams
from tests.harness import DEADLINE, dsn


class NotifyListener:
    """A datagram socket standing in for systemd's notification socket."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(str(path))
        self.sock.setblocking(False)
        self.messages: list[str] = []

    async def wait_for(self, field: str) -> list[str]:
        """Read datagrams until one carries ``field`` (e.g. READY=1)."""
        with anyio.fail_after(DEADLINE * 2):
            while True:
                await anyio.wait_readable(self.sock)
                data = self.sock.recv(65536).decode()
                self.messages.append(data)
                if field in data.split("\n"):
                    return self.messages

    def drain(self) -> list[str]:
        """Everything sent since the last read (after the process ended)."""
        while True:
            try:
                self.messages.append(self.sock.recv(65536).decode())
            except BlockingIOError:
                return self.messages

    def close(self) -> None:
        self.drain()
        self.sock.close()


class DaemonProcess:
    """``python -m makima daemon`` on a given database and state dir."""

    def __init__(
        self, directory: Path, params: ConnectParams | None, *, state_dir: Path | None = None
    ) -> None:
        name = uuid.uuid4().hex[:6]
        self.directory = directory
        self.state_dir = state_dir or directory / f"ps-{name}"
        self.state_dir.mkdir(exist_ok=True)
        self.socket_path = directory / f"p{name}.sock"
        self.params = params
        self.log_path = self.state_dir / "daemon.log"
        self.process: anyio.abc.Process | None = None
        self.notify: NotifyListener | None = None
        self.starts = 0

    def env(
        self, fault: str | None = None, extra: Mapping[str, str] | None = None
    ) -> dict[str, str]:
        env = dict(os.environ)
        env.update(
            MAKIMA_STATE_DIR=str(self.state_dir),
            MAKIMA_SOCKET=str(self.socket_path),
            MAKIMA_LOG_LEVEL="info",
        )
        if self.params is not None:
            env["MAKIMA_DATABASE_URL"] = dsn(self.params)
        env.pop("MAKIMA_FAULT", None)
        if fault:
            env["MAKIMA_FAULT"] = fault
        env.update(extra or {})
        return env

    async def start(
        self,
        *,
        fault: str | None = None,
        args: list[str] | None = None,
        extra_env: Mapping[str, str] | None = None,
    ) -> None:
        self.starts += 1
        notify_path = self.directory / f"n{uuid.uuid4().hex[:6]}.sock"
        self.notify = NotifyListener(notify_path)
        env = self.env(fault, extra_env)
        env["NOTIFY_SOCKET"] = str(notify_path)
        log = self.log_path.open("ab")
        try:
            self.process = await anyio.open_process(
                [
                    sys.executable,
                    "-m",
                    "makima",
                    "daemon",
                    "--heartbeat-interval",
                    "0.5",
                    *(args or []),
                ],
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=log,
                env=env,
            )
        finally:
            log.close()
        await self.notify.wait_for("READY=1")

    async def wait(self) -> int:
        assert self.process is not None
        with anyio.fail_after(DEADLINE * 2):
            code = await self.process.wait()
        await self.process.aclose()
        if self.notify is not None:
            self.notify.close()
        return code

    async def kill(self) -> int:
        assert self.process is not None
        self.process.send_signal(signal.SIGKILL)
        return await self.wait()

    async def terminate(self) -> int:
        assert self.process is not None
        self.process.send_signal(signal.SIGTERM)
        return await self.wait()

    @property
    def running(self) -> bool:
        return self.process is not None and self.process.returncode is None

    def log_text(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""


@asynccontextmanager
async def daemon_process(
    directory: Path, params: ConnectParams | None
) -> AsyncIterator[DaemonProcess]:
    proc = DaemonProcess(directory, params)
    try:
        yield proc
    finally:
        if proc.running:
            await proc.kill()

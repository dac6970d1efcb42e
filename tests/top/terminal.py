"""``makima top`` run on a pseudo-terminal of 80x24, and read back as text."""

from __future__ import annotations

import fcntl
import os
import re
import select
import signal
import struct
import subprocess
import sys
import termios
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

import anyio
import anyio.abc

from tests.harness import DEADLINE

ANSI = re.compile(
    r"\x1b\[[0-?]*[ -/]*[@-~]"  # CSI: cursor, colours, modes
    r"|\x1b\][^\x07\x1b]*(?:\x07|\x1b\\)"  # OSC: titles, links
    r"|\x1b[()][0-9A-Za-z]|\x1b[=>78]"  # charsets, keypad, save/restore
)
COLUMNS, LINES = 80, 24
ALT_SCREEN_OFF = b"\x1b[?1049l"
CURSOR_ON = b"\x1b[?25h"


def plain(data: bytes) -> str:
    """Terminal output as text: escape sequences out."""
    return ANSI.sub("", data.decode(errors="replace")).replace("\r", "")


def top_env(socket_path: Path) -> dict[str, str]:
    env = {
        k: v
        for k, v in os.environ.items()
        if k not in {"COLUMNS", "LINES", "FORCE_COLOR", "NO_COLOR", "TERM", "MAKIMA_LOG_LEVEL"}
    }
    env.update(MAKIMA_SOCKET=str(socket_path), TERM="xterm-256color", PYTHONUNBUFFERED="1")
    return env


def top_command(*args: str) -> list[str]:
    return [sys.executable, "-m", "makima", "top", *args]


def _read_once(master: int, wait: float) -> bytes | None:
    """What the master side has within ``wait`` seconds (b"" if nothing); None once
    it is closed."""
    try:
        ready, _, _ = select.select([master], [], [], wait)
        return os.read(master, 65536) if ready else b""
    except BlockingIOError:
        return b""
    except (OSError, ValueError):
        return None


async def _read(master: int) -> bytes | None:
    # A worker thread, not the event loop's reader callbacks (a pty master is
    # level-triggered); never abandoned, so no output is lost to a stray read.
    return await anyio.to_thread.run_sync(_read_once, master, 0.1)


class Terminal:
    """The test's end of a pseudo-terminal that ``makima top`` runs on."""

    def __init__(self, master: int, slave: int, process: anyio.abc.Process) -> None:
        self.master = master
        self.slave = slave  # kept open: its settings are read after the process exits
        self.process = process
        self.output = b""
        self.mark = 0  # where the output stood at the last key typed

    def text(self, since: int | None = None) -> str:
        return plain(self.output[self.mark if since is None else since :])

    async def until(self, *texts: str, since: int | None = None) -> str:
        """Read until every one of ``texts`` has been shown (since the last key typed,
        or ``since``); the text shown since then."""
        start = self.mark if since is None else since
        try:
            with anyio.fail_after(DEADLINE):
                while not all(t in plain(self.output[start:]) for t in texts):
                    chunk = await _read(self.master)
                    if chunk is None:
                        break
                    self.output += chunk
        except TimeoutError:
            pass
        shown = plain(self.output[start:])
        missing = [t for t in texts if t not in shown]
        assert not missing, f"never shown: {missing}; the screen showed:\n{shown[-3000:]}"
        return shown

    def type(self, keys: str) -> None:
        self.mark = len(self.output)
        os.write(self.master, keys.encode())

    async def exit_code(self) -> int:
        """Wait for the process to end, reading what it still writes."""
        with anyio.fail_after(DEADLINE):
            while True:
                chunk = await _read(self.master)
                if chunk:
                    self.output += chunk
                elif chunk is None or self.process.returncode is not None:
                    break
            code = await self.process.wait()
        return code


@asynccontextmanager
async def top_on_terminal(socket_path: Path, *args: str) -> AsyncIterator[Terminal]:
    """``makima top ARGS`` with a fresh 80x24 pseudo-terminal as stdin, stdout and stderr."""
    master, slave = os.openpty()
    fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", LINES, COLUMNS, 0, 0))
    try:
        process = await anyio.open_process(
            top_command(*args),
            stdin=slave,
            stdout=slave,
            stderr=slave,
            env=top_env(socket_path),
            start_new_session=True,
        )
        try:
            yield Terminal(master, slave, process)
        finally:
            if process.returncode is None:
                process.send_signal(signal.SIGKILL)
                with anyio.CancelScope(shield=True):
                    await process.wait()
            await process.aclose()
    finally:
        os.close(slave)
        os.close(master)


async def top_on_pipe(socket_path: Path, *args: str) -> anyio.abc.Process:
    """``makima top ARGS`` with stdout a pipe (the plain fallback)."""
    return await anyio.open_process(
        top_command(*args),
        stdin=subprocess.DEVNULL,
        env=top_env(socket_path),
    )

"""The terminal side of ``makima top``: its input mode and the keys typed.

:class:`KeyboardMode` puts stdin in cbreak mode (keys arrive one by one and
are not echoed; Ctrl-C stays a signal; Ctrl-Z is switched off, so the screen
is never left half-drawn by a suspension) and puts the saved settings back
when it is left, however it is left. :func:`read_keys` yields what is typed,
as key names (:mod:`makima.top.keys`).
"""

from __future__ import annotations

import contextlib
import os
import select
import termios
import tty
from collections.abc import AsyncIterator
from types import TracebackType
from typing import Any

import anyio

from makima.top.keys import KeyDecoder

ESCAPE_WAIT = 0.05
"""Seconds to wait after an ESC for the rest of a sequence before taking it as Escape."""


class KeyboardMode:
    """cbreak mode on ``fd`` while inside the ``with`` block."""

    def __init__(self, fd: int) -> None:
        self.fd = fd
        self._saved: list[Any] | None = None

    def __enter__(self) -> KeyboardMode:
        self._saved = termios.tcgetattr(self.fd)
        tty.setcbreak(self.fd, termios.TCSANOW)
        mode = termios.tcgetattr(self.fd)
        cc = mode[6]
        cc[termios.VSUSP] = b"\0" if isinstance(cc[termios.VSUSP], bytes) else 0
        termios.tcsetattr(self.fd, termios.TCSANOW, mode)
        return self

    def __exit__(
        self,
        kind: type[BaseException] | None,
        value: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.restore()

    def restore(self) -> None:
        saved, self._saved = self._saved, None
        if saved is not None:
            with contextlib.suppress(termios.error, OSError):
                termios.tcsetattr(self.fd, termios.TCSADRAIN, saved)


def read_ready(fd: int) -> bytes | None:
    """What ``fd`` has to read now: None when nothing, b"" at its end."""
    ready, _, _ = select.select([fd], [], [], 0)
    if not ready:
        return None
    try:
        return os.read(fd, 4096)
    except BlockingIOError:
        return None
    except OSError:  # EIO: the terminal is gone
        return b""


async def read_keys(fd: int) -> AsyncIterator[list[str]]:
    """The keys typed on ``fd``, a batch at a time; ends when the terminal does."""
    decoder = KeyDecoder()
    while True:
        await anyio.wait_readable(fd)
        data = read_ready(fd)
        if data is None:
            continue
        if not data:
            return
        keys = decoder.feed(data)
        while decoder.pending:
            with anyio.move_on_after(ESCAPE_WAIT):
                await anyio.wait_readable(fd)
            more = read_ready(fd)
            keys += decoder.feed(more) if more else decoder.flush()
        if keys:
            yield keys

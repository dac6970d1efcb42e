"""Splitting a byte stream into lines with a length limit (pure, sans-I/O).

Used by the agent protocol: a line over the limit is reported once as
:class:`TooLong` and skipped up to its newline; the stream carries on.
"""

from __future__ import annotations

from dataclasses import dataclass

MAX_LINE = 1 << 20  # 1 MiB, without the newline


@dataclass(frozen=True, slots=True)
class TooLong:
    """A line exceeded the limit; its bytes were dropped."""

    limit: int


class LineBuffer:
    """Feed bytes, get complete lines (without the newline, ``\\r`` stripped)."""

    def __init__(self, max_line: int = MAX_LINE) -> None:
        self.max_line = max_line
        self._buffer = bytearray()
        self._skipping = False

    def feed(self, data: bytes) -> list[bytes | TooLong]:
        out: list[bytes | TooLong] = []
        self._buffer += data
        while True:
            newline = self._buffer.find(b"\n")
            if newline < 0:
                if len(self._buffer) > self.max_line:
                    if not self._skipping:
                        out.append(TooLong(self.max_line))
                        self._skipping = True
                    self._buffer.clear()
                return out
            line = bytes(self._buffer[:newline])
            del self._buffer[: newline + 1]
            if self._skipping:
                self._skipping = False
                continue
            if line.endswith(b"\r"):
                line = line[:-1]
            if len(line) > self.max_line:
                out.append(TooLong(self.max_line))
                continue
            out.append(line)

    @property
    def pending(self) -> int:
        """Bytes held while waiting for a newline."""
        return len(self._buffer)

"""Bytes typed on a terminal into key names (pure).

A key is a one-character string (what was typed, UTF-8 decoded) or one of the
names below. Escape sequences for the arrows and the page keys are recognised
in both cursor modes (``ESC [ A`` and ``ESC O A``); other sequences are read
whole and ignored. A lone ``ESC`` cannot be told from the start of a sequence
until a moment has passed with nothing after it: :attr:`KeyDecoder.pending`
says so, and :meth:`KeyDecoder.flush` then turns it into ``esc``.
"""

from __future__ import annotations

import codecs

UP = "up"
DOWN = "down"
LEFT = "left"
RIGHT = "right"
PAGE_UP = "pgup"
PAGE_DOWN = "pgdn"
HOME = "home"
END = "end"
ENTER = "enter"
ESCAPE = "esc"
BACKSPACE = "backspace"
TAB = "tab"
CLEAR_LINE = "ctrl-u"

ESC = 0x1B
_FINAL_LETTERS = {"A": UP, "B": DOWN, "C": RIGHT, "D": LEFT, "H": HOME, "F": END}
_TILDE_CODES = {"1": HOME, "7": HOME, "4": END, "8": END, "5": PAGE_UP, "6": PAGE_DOWN}
_CONTROL = {
    0x0D: ENTER,
    0x0A: ENTER,
    0x7F: BACKSPACE,
    0x08: BACKSPACE,
    0x09: TAB,
    0x15: CLEAR_LINE,
}


class KeyDecoder:
    """Feed it what the terminal sends; it returns the keys, in order."""

    def __init__(self) -> None:
        self._buffer = b""
        self._text = codecs.getincrementaldecoder("utf-8")(errors="replace")

    @property
    def pending(self) -> bool:
        """True while an ``ESC`` waits to be told apart from a sequence's start."""
        return bool(self._buffer)

    def feed(self, data: bytes) -> list[str]:
        self._buffer += data
        keys: list[str] = []
        while self._buffer:
            taken = self._one(self._buffer, keys)
            if taken == 0:  # an unfinished escape sequence: wait for more
                break
            self._buffer = self._buffer[taken:]
        return keys

    def flush(self) -> list[str]:
        """Nothing more came: a waiting ``ESC`` was the Escape key."""
        if not self._buffer:
            return []
        rest, self._buffer = self._buffer[1:], b""
        return [ESCAPE, *self.feed(rest)]

    def _one(self, data: bytes, keys: list[str]) -> int:
        """Decode one key from the front of ``data`` into ``keys``; the bytes used
        (0: not enough yet)."""
        first = data[0]
        if first == ESC:
            return self._escape(data, keys)
        if first in _CONTROL:
            keys.append(_CONTROL[first])
            return 1
        if first < 0x20:
            return 1  # other control characters mean nothing here
        text = self._text.decode(data[:1])
        if text:
            keys.append(text)
        return 1

    def _escape(self, data: bytes, keys: list[str]) -> int:
        if len(data) < 2:
            return 0
        second = chr(data[1])
        if second not in "[O":
            keys.append(ESCAPE)  # Esc, then another key (or Alt+key, taken as Esc)
            return 1
        # CSI: parameters and intermediates (0x20-0x3F), then a final byte (0x40-0x7E).
        for end in range(2, len(data)):
            byte = data[end]
            if 0x40 <= byte <= 0x7E:
                params = data[2:end].decode("ascii", errors="replace")
                final = chr(byte)
                if final in _FINAL_LETTERS:
                    keys.append(_FINAL_LETTERS[final])
                elif final == "~" and params.split(";")[0] in _TILDE_CODES:
                    keys.append(_TILDE_CODES[params.split(";")[0]])
                return end + 1
            if not 0x20 <= byte <= 0x3F:
                return end  # not a sequence after all: drop the introducer only
        return 0

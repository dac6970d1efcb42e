"""Decoding one JSON line from a peer (pure): an agent's stdout or a control client.

Both protocols refuse, with a message naming the problem, what JSON allows but
PostgreSQL cannot store: ``NaN``/``Infinity``, a NUL character (``\\u0000``) and
a lone surrogate (``\\ud800``) in any string. Refusing them at the edge keeps a
save point from failing halfway through, after the peer was already answered.
"""

from __future__ import annotations

import json
import math
import re
from typing import Any, NoReturn


def _refuse_constant(name: str) -> NoReturn:
    raise ValueError(f"{name} is not valid JSON")


def _finite_float(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):
        raise ValueError(f"number {text} is out of range")
    return value


def load_json_line(line: bytes) -> Any:
    """The decoded JSON value of ``line``; ValueError with a clear message if there is none."""
    try:
        text = line.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise ValueError(
            f"line is not valid UTF-8 (byte {line[exc.start]:#04x} at offset {exc.start})"
        ) from None
    try:
        return json.loads(text, parse_constant=_refuse_constant, parse_float=_finite_float)
    except RecursionError:
        raise ValueError("invalid JSON: nested too deeply") from None
    except ValueError as exc:  # JSONDecodeError, NaN/Infinity, too many digits
        raise ValueError(f"invalid JSON: {exc}") from None


def _string_problem(text: str) -> str | None:
    if "\x00" in text:
        return "a NUL character (\\u0000)"
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as exc:
        return f"a lone surrogate (\\u{ord(text[exc.start]):04x})"
    return None


def unstorable(value: Any) -> str | None:
    """Why ``value`` (decoded JSON) cannot be stored as text or jsonb, or None if it can."""
    stack = [value]
    while stack:
        item = stack.pop()
        if isinstance(item, str):
            if (problem := _string_problem(item)) is not None:
                return f"a string holds {problem}, which cannot be stored: {json.dumps(item)[:40]}"
        elif isinstance(item, dict):
            stack.extend(item.keys())
            stack.extend(item.values())
        elif isinstance(item, list):
            stack.extend(item)
    return None


# A string token runs to its closing quote or, unterminated, to the end of the line:
# possessive and always matching, so the scan stays linear on any input.
_TOKEN = re.compile(r'"(?:[^"\\]|\\.)*+(?:"|\\?\Z)|[{}\[\]:,]', re.DOTALL)


def top_level_member(line: bytes, key: str) -> str | int | None:
    """The string or integer member ``key`` of the top-level object in a line that
    did not parse (nested too deeply, say), when a shallow scan can still read it."""
    try:
        text = line.decode("utf-8")
    except UnicodeDecodeError:
        return None
    depth = 0
    want_key = False
    found_key = False
    for token in _TOKEN.finditer(text):
        kind = token.group()
        if kind in "{[":
            depth += 1
            want_key = kind == "{" and depth == 1
        elif kind in "}]":
            depth -= 1
        elif kind == ",":
            want_key = depth == 1
        elif kind == ":":
            if found_key:
                return _scalar_at(text, token.end())
        elif want_key:
            want_key = False
            try:
                found_key = json.loads(kind) == key
            except ValueError:
                return None
    return None


def _scalar_at(text: str, position: int) -> str | int | None:
    while position < len(text) and text[position] in " \t\r\n":
        position += 1
    if position >= len(text) or text[position] not in '"-0123456789':
        return None
    try:
        value, _ = json.JSONDecoder().raw_decode(text, position)
    except ValueError:
        return None
    if isinstance(value, bool) or not isinstance(value, str | int):
        return None
    return value

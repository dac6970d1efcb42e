"""JSON text as it is written: what an encoder will not produce, and hostile strings and values."""

from __future__ import annotations

import itertools
import json
import random
import re
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from typing import Any

# --------------------------------------------------------------------------- JSON text


@dataclass(frozen=True, slots=True)
class Raw:
    """JSON text written as it is: what an encoder will not produce (NaN, 1e400,
    an integer of 5000 digits, nesting 100 000 deep)."""

    text: bytes


@dataclass(frozen=True, slots=True)
class Members:
    """An object whose members are written in this order, duplicates included."""

    items: tuple[tuple[str, object], ...]


def dump(value: object, *, escape: bool = True) -> bytes:
    """``value`` as JSON text. ``escape`` False writes non-ASCII characters as
    UTF-8, and so a lone surrogate as its three (invalid) bytes."""
    if isinstance(value, Raw):
        return value.text
    if value is None:
        return b"null"
    if value is True:
        return b"true"
    if value is False:
        return b"false"
    if isinstance(value, int):
        return str(value).encode()
    if isinstance(value, float):
        return json.dumps(value, allow_nan=False).encode()
    if isinstance(value, str):
        if escape:
            return json.dumps(value).encode("ascii")
        return json.dumps(value, ensure_ascii=False).encode("utf-8", "surrogatepass")
    if isinstance(value, Members):
        items = value.items
    elif isinstance(value, Mapping):
        items = tuple(value.items())
    elif isinstance(value, list | tuple):
        return b"[" + b",".join(dump(v, escape=escape) for v in value) + b"]"
    else:
        raise TypeError(f"cannot write {type(value).__name__} as JSON")
    return (
        b"{"
        + b",".join(dump(k, escape=escape) + b":" + dump(v, escape=escape) for k, v in items)
        + b"}"
    )


def deep(depth: int, *, objects: bool = False, inner: bytes = b"1") -> Raw:
    """Arrays (or objects) nested ``depth`` deep."""
    if objects:
        return Raw(b'{"a":' * depth + inner + b"}" * depth)
    return Raw(b"[" * depth + inner + b"]" * depth)


NOT_JSON_NUMBERS = (
    Raw(b"NaN"),
    Raw(b"Infinity"),
    Raw(b"-Infinity"),
    Raw(b"1e400"),
    Raw(b"-1e400"),
    Raw(b"1" + b"0" * 5000),  # more digits than Python's int() takes
)
"""Numbers both protocols refuse as not JSON, or out of range."""
NUMBERS: tuple[int | float, ...] = (
    0,
    1,
    -1,
    2**31,
    2**63,
    2**64,
    10**30,
    -(10**30),
    0.5,
    -0.0,
    1e300,
    -1e300,
    5e-324,
)
STRINGS: tuple[str, ...] = (
    "",
    " ",
    "x",
    "null",
    "0",
    "\t\r",
    "\x00",
    "a\x00b",
    "\ud800",
    "x\udfff",
    "\U0001f600",
    "é",
    "\u202e",
    "\ufeff",
    "\u2028",
    "=",
    "A=B",
    "../..",
    "%s%n",
    "{}",
    "\\",
    '"',
    "\x7f\x1b[31m",
    "\n",
)


_SURROGATE = re.compile("[\ud800-\udfff]")


def _strings(value: object) -> Iterator[str]:
    """Every string and key in ``value`` (decoded JSON, Members included)."""
    stack = [value]
    while stack:
        item = stack.pop()
        if isinstance(item, str):
            yield item
        elif isinstance(item, Members):
            stack.extend(itertools.chain.from_iterable(item.items))
        elif isinstance(item, Mapping):
            stack.extend(item.keys())
            stack.extend(item.values())
        elif isinstance(item, list | tuple):
            stack.extend(item)


def has_surrogate(value: object) -> bool:
    return any(_SURROGATE.search(text) for text in _strings(value))


def has_unstorable(value: object) -> bool:
    """A NUL or a lone surrogate in any string or key of ``value`` (DESIGN §8/§9:
    PostgreSQL cannot store them, so both protocols refuse them)."""
    return any("\x00" in text or _SURROGATE.search(text) for text in _strings(value))


def random_string(rng: random.Random) -> str:
    roll = rng.random()
    if roll < 0.6:
        return rng.choice(STRINGS)
    if roll < 0.9:
        return "".join(rng.choice("abcé =\u00a0\u4e2d-_/") for _ in range(rng.randint(1, 12)))
    return "x" * rng.choice((300, 5000, 70_000))


def random_value(rng: random.Random, depth: int = 0) -> Any:
    """Any JSON value, hostile strings and numbers included (never NaN: see
    NOT_JSON_NUMBERS)."""
    roll = rng.random()
    if depth > 3 or roll < 0.55:
        return rng.choice(
            (
                None,
                True,
                False,
                rng.choice(NUMBERS),
                rng.choice(NUMBERS),
                random_string(rng),
                random_string(rng),
            )
        )
    if roll < 0.8:
        return [random_value(rng, depth + 1) for _ in range(rng.randint(0, 4))]
    return {random_string(rng): random_value(rng, depth + 1) for _ in range(rng.randint(0, 4))}

"""Hostile input for a running daemon, and the checks that it survives it.

Two halves:

- **Generators** (pure, driven by a seeded ``random.Random``; the test suite
  adds hypothesis strategies for the calls, in tests/fuzz). They make hostile
  makima-control/1 frames (:func:`random_frames`, :func:`every_wrong_param`,
  :func:`catalogue`, :func:`boundary_frames`, :func:`closing_frames`) and
  hostile makima-agent/1 lines (:func:`random_agent_lines`, :func:`every_wrong_field`):
  bad JSON, invalid UTF-8, NUL, lone surrogates, NaN and out-of-range numbers,
  deep nesting, wrong types for every parameter of every method, ids of every
  JSON type, oversized and partial lines. Each carries what must come back
  for it: the oracle is DESIGN §8 and §9 written here again (:func:`judge`,
  :func:`expect_call`), on purpose not borrowed from the daemon's own parsers.
- **A runner** (:class:`Fuzzer`) that sends them to a daemon process and,
  after each batch, checks that the daemon still answers, that a canary
  supervisor kept everything acknowledged to it (questions, answers, its
  checkpoint), and that the daemon's RSS stays bounded. It also runs slow and
  never-reading clients, an agent that writes hostile lines, and an agent
  that reads nothing and is cancelled. It counts frames, replies by code,
  crashes (the daemon process gone) and hangs (no answer within a deadline).

``makima drill --fuzz N`` runs :func:`run_fuzz_drill` against a real daemon on
a scratch state directory. The agents the runner starts live here too:
``python -m makima.fuzz canary | lines PLAN LOG | sink``.
"""

from __future__ import annotations

import base64
import contextlib
import enum
import functools
import itertools
import json
import os
import random
import re
import select
import shutil
import sys
import tempfile
import threading
import time
import uuid
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator, Mapping, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from types import MappingProxyType
from typing import Any, TypeAlias, TypeGuard

import anyio
import anyio.abc

from makima.control.client import CallTimeoutError, ControlClient, ControlError, RemoteError
from makima.control.codec import (
    MAX_LINE,
    ErrorCode,
    ProtocolError,
    RequestId,
    Response,
    parse_server_message,
)
from makima.drill import Check, DaemonRunner
from makima.errors import MakimaError
from makima.events import EventKind

# --------------------------------------------------------------------------- outcomes

RESULT = 0
"""Outcome of a request answered with a result (error codes are negative)."""
NO_REPLY = 1
"""Outcome of a line that gets no reply (a blank line, a notification)."""

PARSE_ERROR = int(ErrorCode.PARSE_ERROR)
INVALID_REQUEST = int(ErrorCode.INVALID_REQUEST)
METHOD_NOT_FOUND = int(ErrorCode.METHOD_NOT_FOUND)
INVALID_PARAMS = int(ErrorCode.INVALID_PARAMS)
INTERNAL_ERROR = int(ErrorCode.INTERNAL_ERROR)
NOT_FOUND = int(ErrorCode.NOT_FOUND)
CONFLICT = int(ErrorCode.CONFLICT)
INVALID_ANSWER = int(ErrorCode.INVALID_ANSWER)

Expect: TypeAlias = frozenset[int]


def outcome_name(outcome: int) -> str:
    if outcome == RESULT:
        return "result"
    if outcome == NO_REPLY:
        return "no reply"
    try:
        return f"{outcome} {ErrorCode(outcome).name.lower()}"
    except ValueError:
        return str(outcome)


NOT_A_PROGRAM = "/nonexistent/makima-fuzz/no-such-agent"
"""Every command the generators make starts with something that cannot run."""
NOT_PROGRAMS = (NOT_A_PROGRAM, "/", "/dev/null", " ", "/nonexistent/é/agent")
SYNC_PREFIX = "makima-fuzz-sync-"
"""Ids and refs of the runner's own sentinels; the generators never make them."""

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


# --------------------------------------------------------------------------- the oracle


class Verdict(enum.Enum):
    VALID = "valid"
    WRONG = "wrong"  # the protocol refuses it
    UNSURE = "unsure"  # a reasonable daemon may take it or refuse it


class Kind(enum.Enum):
    """What a parameter (or an agent message's field) holds."""

    LABEL = "label"  # a non-blank string
    NAME = "name"  # a label of at most NAME_MAX characters
    TEXT = "text"  # any string
    COMMAND = "command"  # a non-empty list of strings naming a program, no NUL
    PATH = "path"  # a string
    ENV = "env"  # an object of strings, names that execve takes
    BOOL = "bool"
    UUID = "uuid"
    LIMIT = "limit"  # an integer >= 1
    KINDS = "kinds"  # a list of event kinds
    PROGRESS = "progress"  # an integer 0..100 (an integral number)
    ANY = "any"  # any JSON value
    CHOICES = "choices"  # a list of distinct strings


class Pool(enum.Enum):
    """Which known ids fit a UUID parameter."""

    NONE = "none"
    READ = "read"  # supervisors one may read: the canary, the fuzz's own
    MUTATE = "mutate"  # supervisors one may cancel or resume: the fuzz's own, finished
    ANSWERED = "answered"  # questions already answered


@dataclass(frozen=True, slots=True)
class Param:
    kind: Kind
    required: bool = False
    null: Verdict = Verdict.VALID  # what an explicit null is
    pool: Pool = Pool.NONE


NAME_MAX = 200
BIG_TEXT = 60_000
"""Strings longer than this may meet a size limit: their verdict is unsure."""
BIG_VALUE = 200_000
LIMIT_SURE = 500
"""A page size every daemon takes; larger ones may be refused (never an internal error)."""
EVENT_KINDS = frozenset(k.value for k in EventKind)
CANONICAL_UUID = re.compile(r"[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}")

METHODS: Mapping[str, Mapping[str, Param]] = MappingProxyType(
    {
        "daemon.hello": {},
        "daemon.status": {},
        "supervisor.create": {
            "name": Param(Kind.NAME, required=True, null=Verdict.WRONG),
            "command": Param(Kind.COMMAND, required=True, null=Verdict.WRONG),
            "goal": Param(Kind.TEXT),
            "cwd": Param(Kind.PATH),
            "env": Param(Kind.ENV),
        },
        "supervisor.list": {"all": Param(Kind.BOOL, null=Verdict.UNSURE)},
        "supervisor.get": {
            "supervisor_id": Param(Kind.UUID, required=True, null=Verdict.WRONG, pool=Pool.READ)
        },
        "supervisor.resume": {
            "supervisor_id": Param(Kind.UUID, required=True, null=Verdict.WRONG, pool=Pool.MUTATE)
        },
        "supervisor.cancel": {
            "supervisor_id": Param(Kind.UUID, required=True, null=Verdict.WRONG, pool=Pool.MUTATE)
        },
        "supervisor.history": {
            "supervisor_id": Param(Kind.UUID, required=True, null=Verdict.WRONG, pool=Pool.READ),
            "limit": Param(Kind.LIMIT),
        },
        "question.list": {
            "supervisor_id": Param(Kind.UUID, null=Verdict.UNSURE, pool=Pool.READ),
        },
        "question.answer": {
            "question_id": Param(Kind.UUID, required=True, null=Verdict.WRONG, pool=Pool.ANSWERED),
            "answer": Param(Kind.LABEL, required=True, null=Verdict.WRONG),
        },
        "events.subscribe": {"kinds": Param(Kind.KINDS)},
    }
)
"""Every makima-control/1 method and its parameters (DESIGN §9)."""
LENIENT = frozenset({"daemon.hello", "daemon.status"})
"""Methods without parameters: extra ones may be ignored or refused."""


def _size(value: object) -> int:
    try:
        return len(json.dumps(value, ensure_ascii=False).encode("utf-8", "surrogatepass"))
    except (TypeError, ValueError, RecursionError):
        return BIG_VALUE + 1


def _judge_kind(kind: Kind, value: object) -> Verdict:
    wrong, valid, unsure = Verdict.WRONG, Verdict.VALID, Verdict.UNSURE
    match kind:
        case Kind.LABEL | Kind.NAME:
            if not isinstance(value, str) or not value.strip():
                return wrong
            if len(value) > (NAME_MAX if kind is Kind.NAME else BIG_TEXT):
                return unsure
            return valid
        case Kind.TEXT | Kind.PATH:
            if not isinstance(value, str):
                return wrong
            return unsure if len(value) > BIG_TEXT else valid
        case Kind.COMMAND:
            if not isinstance(value, list) or not value:
                return wrong
            if not all(isinstance(v, str) for v in value) or not value[0]:
                return wrong
            return unsure if _size(value) > BIG_TEXT else valid
        case Kind.ENV:
            if not isinstance(value, dict):
                return wrong
            for key, item in value.items():
                if not isinstance(item, str) or not key or "=" in key:
                    return wrong
            return valid
        case Kind.BOOL:
            return valid if isinstance(value, bool) else wrong
        case Kind.UUID:
            if not isinstance(value, str):
                return wrong
            if CANONICAL_UUID.fullmatch(value):
                return valid
            try:
                uuid.UUID(value)
            except ValueError:
                return wrong
            return unsure  # upper case, braces, urn:, no hyphens: uuid.UUID takes them
        case Kind.LIMIT:
            if type(value) is not int or value < 1:
                return wrong
            return valid if value <= LIMIT_SURE else unsure  # a daemon may cap a page
        case Kind.KINDS:
            if not isinstance(value, list):
                return wrong
            return valid if all(isinstance(v, str) and v in EVENT_KINDS for v in value) else wrong
        case Kind.PROGRESS:
            if isinstance(value, bool) or not isinstance(value, int | float):
                return wrong
            if isinstance(value, float) and not value.is_integer():
                return wrong
            return valid if 0 <= value <= 100 else wrong
        case Kind.ANY:
            return unsure if _size(value) > BIG_VALUE else valid
        case Kind.CHOICES:
            if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
                return wrong
            if len(set(value)) != len(value):
                return wrong
            if any(not v.strip() or len(v) > BIG_TEXT for v in value):
                return unsure
            return valid


def judge(param: Param, value: object) -> Verdict:
    """What the protocol makes of ``value`` given for ``param`` (decoded JSON)."""
    if has_unstorable(value):
        return Verdict.WRONG  # DESIGN §8/§9 via jsonline: cannot be stored, refused at the edge
    if value is None:
        return param.null
    return _judge_kind(param.kind, value)


def worst(verdicts: Iterator[Verdict] | Sequence[Verdict]) -> Verdict:
    found = set(verdicts)
    if Verdict.WRONG in found:
        return Verdict.WRONG
    if Verdict.UNSURE in found:
        return Verdict.UNSURE
    return Verdict.VALID


@dataclass
class Ids:
    """Ids the daemon knows, for generators to aim at (DESIGN §9's not_found vs. found)."""

    readable: list[str] = field(default_factory=list)
    mutable: list[str] = field(default_factory=list)
    answered: list[str] = field(default_factory=list)

    def pool(self, pool: Pool) -> list[str]:
        match pool:
            case Pool.READ:
                return self.readable
            case Pool.MUTATE:
                return self.mutable
            case Pool.ANSWERED:
                return self.answered
            case Pool.NONE:
                return []


def _known(value: object, known: Sequence[str]) -> bool:
    if not isinstance(value, str):
        return False
    try:
        return str(uuid.UUID(value)) in known
    except ValueError:
        return False


def _success(method: str, params: Mapping[str, object], ids: Ids) -> Expect:
    """What a call with acceptable parameters returns."""
    if method in ("supervisor.get", "supervisor.history"):
        found = _known(params.get("supervisor_id"), ids.readable)
        return frozenset({RESULT if found else NOT_FOUND})
    if method in ("supervisor.resume", "supervisor.cancel"):
        if _known(params.get("supervisor_id"), ids.mutable):
            return frozenset({RESULT, CONFLICT})
        return frozenset({NOT_FOUND})
    if method == "question.answer":
        if _known(params.get("question_id"), ids.answered):
            return frozenset({CONFLICT, INVALID_ANSWER})
        return frozenset({NOT_FOUND})
    return frozenset({RESULT})


def expect_call(method: object, params: object, ids: Ids) -> Expect:
    """The outcomes DESIGN §9 allows for a readable request (``params`` None: absent)."""
    if params is not None and not isinstance(params, Mapping):
        return frozenset({INVALID_PARAMS if isinstance(params, list) else INVALID_REQUEST})
    given: Mapping[str, object] = params or {}
    if has_unstorable(given):
        return frozenset({INVALID_PARAMS})
    if not isinstance(method, str) or method not in METHODS:
        return frozenset({METHOD_NOT_FOUND})
    spec = METHODS[method]
    unknown = set(given) - set(spec)
    if unknown and method in LENIENT:
        return frozenset({RESULT, INVALID_PARAMS})
    if unknown:
        return frozenset({INVALID_PARAMS})
    verdicts = [
        judge(p, given[name]) if name in given else (Verdict.WRONG if p.required else Verdict.VALID)
        for name, p in spec.items()
    ]
    verdict = worst(verdicts)
    if verdict is Verdict.WRONG:
        return frozenset({INVALID_PARAMS})
    success = _success(method, given, ids)
    return success | {INVALID_PARAMS} if verdict is Verdict.UNSURE else success


# --------------------------------------------------------------------------- values by kind


def _some_uuid(rng: random.Random) -> str:
    return str(uuid.UUID(int=rng.getrandbits(128), version=4))


def valid_value(kind: Kind, rng: random.Random, known: Sequence[str] = ()) -> object:
    """A value the protocol takes for ``kind`` (commands never run: NOT_PROGRAMS)."""
    match kind:
        case Kind.LABEL:
            return rng.choice(("yes", "ship", "é", "a b", "x" * 1000))
        case Kind.NAME:
            return rng.choice(("fuzz", "é-name", "n" * NAME_MAX, "a b", "\U0001f600"))
        case Kind.TEXT:
            return rng.choice(("", "goal", "é\u2028", "g" * 5000))
        case Kind.PATH:
            return rng.choice(("/nonexistent/makima-fuzz", "/", "relative/dir", "", "é"))
        case Kind.COMMAND:
            extra = [random_string(rng) for _ in range(rng.randint(0, 3))]
            return [rng.choice(NOT_PROGRAMS), *(e for e in extra if not has_unstorable(e))]
        case Kind.ENV:
            return rng.choice(({}, {"MAKIMA_FUZZ": "1"}, {"LANG": "é"}, {"X": ""}, {"PATH": ""}))
        case Kind.BOOL:
            return rng.random() < 0.5
        case Kind.UUID:
            if known and rng.random() < 0.5:
                return rng.choice(known)
            return _some_uuid(rng)
        case Kind.LIMIT:
            return rng.choice((1, 2, 50, LIMIT_SURE))
        case Kind.KINDS:
            return rng.choice(([], ["question.asked"], sorted(EVENT_KINDS)))
        case Kind.PROGRESS:
            return rng.choice((0, 50, 100, 99.0))
        case Kind.ANY:
            return random_value(rng)
        case Kind.CHOICES:
            return rng.choice(([], ["yes", "no"], ["é"], [str(n) for n in range(20)]))


COMMON_WRONG: tuple[object, ...] = (
    None,
    True,
    False,
    0,
    -1,
    1.5,
    10**30,
    -(10**30),
    "",
    "x",
    [],
    [1],
    {},
    {"a": 1},
    "\x00",
    "\ud800",
)
"""A value of every JSON type; :func:`judge` says which are wrong for a kind."""


def near_misses(kind: Kind) -> tuple[object, ...]:
    """Values that are almost right for ``kind``."""
    some = "0f1e2d3c-4b5a-4978-8695-a4b3c2d1e0f9"
    match kind:
        case Kind.COMMAND:
            return (
                [],
                [""],
                ["a\x00"],
                [NOT_A_PROGRAM, "a\x00"],
                [1],
                [None],
                "ls",
                [[NOT_A_PROGRAM]],
                {"0": NOT_A_PROGRAM},
                ["\ud800"],
            )
        case Kind.ENV:
            return (
                {"A=B": "x"},
                {"": "x"},
                {"=": ""},
                {"A\x00": "x"},
                {"A": "x\x00"},
                {"A": 1},
                {"A": None},
                {"A": ["x"]},
                ["A=B"],
                "A=B",
            )
        case Kind.UUID:
            return (
                "",
                "nope",
                some[:-1] + "g",
                some.upper(),
                "{" + some + "}",
                "urn:uuid:" + some,
                some.replace("-", ""),
                some + "\x00",
                some + " ",
                " " + some,
                some[:-1],
                12345,
                "00000000-0000-0000-0000-000000000000",
                "\u0660" * 32,  # Arabic-Indic zeros: int(…, 16) reads them
            )
        case Kind.LIMIT:
            return (0, -1, -(10**30), 1.0, 1.5, "5", True, 10**30, 2**63, 2**64, 2**31)
        case Kind.BOOL:
            return (0, 1, "true", "false", None, [], {})
        case Kind.KINDS:
            return ("question.asked", ["nope"], [1], [None], ["question.asked", 1], {}, [""])
        case Kind.PROGRESS:
            return (-1, 101, 50.5, 1e300, True, "50", None, 10**30)
        case Kind.CHOICES:
            return ("yes", ["a", "a"], [1], [None], {}, [""], ["\x00"])
        case Kind.LABEL | Kind.NAME | Kind.TEXT | Kind.PATH:
            return ("", " ", "\t", 5, None, [], {}, "n" * (NAME_MAX + 1), "\x00", "\ud800")
        case Kind.ANY:
            return ("\x00", {"\ud800": 1}, [[["\x00"]]], "x" * (BIG_VALUE + 10))


def defang_command(value: object) -> object:
    """A command that would name a program gets NOT_A_PROGRAM as its program."""
    if (
        isinstance(value, list)
        and value
        and isinstance(value[0], str)
        and value[0]
        and value[0] not in NOT_PROGRAMS
        and not has_unstorable(value[0])
    ):
        return [NOT_A_PROGRAM, *value[1:]]
    return value


def hostile_value(kind: Kind, rng: random.Random, known: Sequence[str] = ()) -> object:
    """A value for ``kind``: valid, wrong or in between (judge it with :func:`judge`);
    a command never names a program that could run."""
    roll = rng.random()
    if roll < 0.4:
        return valid_value(kind, rng, known)
    if roll < 0.65:
        return rng.choice(COMMON_WRONG)
    if roll < 0.9:
        return rng.choice(near_misses(kind))
    value = random_value(rng)
    return defang_command(value) if kind is Kind.COMMAND else value


# --------------------------------------------------------------------------- control frames


@dataclass(frozen=True, slots=True)
class Frame:
    """One hostile control line and what must come back for it.

    ``expect``: the allowed outcomes (RESULT, NO_REPLY or error codes); None:
    anything but an internal error. ``reply_ids``: the ids a reply may carry
    (None in it: a null id); None: not checked.
    """

    data: bytes
    label: str
    expect: Expect | None
    reply_ids: frozenset[RequestId | None] | None = None
    method: str | None = None


_MISSING: Any = object()


def request_line(
    request_id: object = _MISSING,
    method: object = _MISSING,
    params: object = _MISSING,
    *,
    jsonrpc: object = "2.0",
    escape: bool = True,
) -> bytes:
    """One request line (with its newline); a member given as _MISSING is left out."""
    members: list[tuple[str, object]] = []
    if jsonrpc is not _MISSING:
        members.append(("jsonrpc", jsonrpc))
    if request_id is not _MISSING:
        members.append(("id", request_id))
    if method is not _MISSING:
        members.append(("method", method))
    if params is not _MISSING:
        members.append(("params", params))
    return dump(Members(tuple(members)), escape=escape) + b"\n"


def _is_id(value: object) -> TypeGuard[RequestId]:
    return isinstance(value, str) or (isinstance(value, int) and not isinstance(value, bool))


def _request_id(rng: random.Random) -> RequestId:
    return rng.choice((rng.randrange(1 << 31), f"f{rng.randrange(1 << 20)}"))


def call_frame(
    method: str,
    params: Mapping[str, object] | None,
    request_id: RequestId,
    ids: Ids,
    *,
    label: str = "call",
    escape: bool = True,
) -> Frame:
    """A well-formed request whose expectation comes from :func:`expect_call`."""
    line = request_line(request_id, method, _MISSING if params is None else params, escape=escape)
    if not escape and has_surrogate([method, params, request_id]):
        return Frame(line, f"{label} (raw surrogate)", frozenset({PARSE_ERROR}), frozenset({None}))
    return Frame(
        line, label, expect_call(method, params, ids), frozenset({request_id}), method=method
    )


def _params(method: str, rng: random.Random, ids: Ids) -> dict[str, object]:
    """Parameters for ``method``: each present or not, valid, wrong or in between."""
    params: dict[str, object] = {}
    for name, param in METHODS[method].items():
        if rng.random() < (0.9 if param.required else 0.5):
            params[name] = hostile_value(param.kind, rng, ids.pool(param.pool))
    if rng.random() < 0.05:
        params[random_string(rng)] = random_value(rng)
    return params


def _valid_params(method: str, rng: random.Random, ids: Ids) -> dict[str, object]:
    return {
        name: valid_value(p.kind, rng, ids.pool(p.pool))
        for name, p in METHODS[method].items()
        if p.required or rng.random() < 0.5
    }


def _method(rng: random.Random) -> str:
    return rng.choice(sorted(METHODS))


def _call(rng: random.Random, ids: Ids) -> Frame:
    method = _method(rng)
    return call_frame(method, _params(method, rng, ids), _request_id(rng), ids, label="call")


def _one_wrong_param(rng: random.Random, ids: Ids) -> Frame:
    method = rng.choice([m for m, spec in METHODS.items() if spec])
    params = _valid_params(method, rng, ids)
    name = rng.choice(sorted(METHODS[method]))
    params[name] = rng.choice((*COMMON_WRONG, *near_misses(METHODS[method][name].kind)))
    return call_frame(method, params, _request_id(rng), ids, label=f"{method} {name}")


GOOD_IDS: tuple[RequestId, ...] = (
    0,
    -1,
    2**53,
    10**30,
    -(10**30),
    "",
    "x",
    "\x00",
    "\ud800",
    "é",
    "i" * 5000,
)
BAD_IDS: tuple[object, ...] = (None, True, False, 1.5, 1.0, 1e300, [], {}, [1], {"id": 1})


def id_frame(request_id: object, ids: Ids) -> Frame:
    """``daemon.hello`` with this id: answered with it, or refused (a bad type)."""
    if _is_id(request_id):
        return call_frame("daemon.hello", None, request_id, ids, label="id of a good type")
    return Frame(
        request_line(request_id, "daemon.hello"),
        f"id {request_id!r:.12}",
        frozenset({INVALID_REQUEST}),
        frozenset({None}),
    )


def _id_frame(rng: random.Random, ids: Ids) -> Frame:
    return id_frame(rng.choice(GOOD_IDS) if rng.random() < 0.6 else rng.choice(BAD_IDS), ids)


def _envelope(rng: random.Random, ids: Ids) -> Frame:
    request_id = _request_id(rng)
    known = frozenset({request_id})
    cases: list[tuple[bytes, str, Expect, frozenset[RequestId | None]]] = [
        (
            request_line(request_id, "daemon.hello", jsonrpc=_MISSING),
            "jsonrpc missing",
            frozenset({INVALID_REQUEST}),
            known,
        ),
        (
            request_line(request_id, "daemon.hello", jsonrpc=rng.choice(("1.0", 2.0, 2, None))),
            "jsonrpc wrong",
            frozenset({INVALID_REQUEST}),
            known,
        ),
        (request_line(request_id), "method missing", frozenset({INVALID_REQUEST}), known),
        (
            request_line(request_id, rng.choice((None, 1, [], {}, True))),
            "method not a string",
            frozenset({INVALID_REQUEST}),
            known,
        ),
        (
            request_line(request_id, "supervisor.get", [_some_uuid(rng)]),
            "positional params",
            frozenset({INVALID_PARAMS}),
            known,
        ),
        (
            request_line(request_id, "daemon.hello", rng.choice((None, 1, "x", True))),
            "params not an object",
            frozenset({INVALID_REQUEST}),
            known,
        ),
        (
            b"[" + request_line(request_id, "daemon.hello")[:-1] + b"]\n",
            "batch",
            frozenset({INVALID_REQUEST}),
            frozenset({None}),
        ),
        (
            dump(rng.choice((1, "x", None, True, 1e300))) + b"\n",
            "not an object",
            frozenset({INVALID_REQUEST}),
            frozenset({None}),
        ),
    ]
    data, label, expect, reply_ids = rng.choice(cases)
    return Frame(data, label, expect, reply_ids)


UNKNOWN_METHODS = (
    "nope",
    "daemon.hello ",
    "DAEMON.HELLO",
    "__init__",
    "hello",
    "daemon.hello\x00",
    "daemon.\ud800",
    "",
    "m" * 70_000,
    "supervisor.create.x",
    "event",
)


def _unknown_method(rng: random.Random, ids: Ids) -> Frame:
    method = rng.choice(UNKNOWN_METHODS)
    return call_frame(method, None, _request_id(rng), ids, label="unknown method")


def _valid_line(rng: random.Random, ids: Ids) -> bytes:
    return _call(rng, ids).data[:-1]


_BAD_JSON = (
    b"{",
    b"}",
    b"{'jsonrpc': '2.0'}",
    b'{"jsonrpc":"2.0",}',
    b'{"jsonrpc":"2.0" "id":1}',
    b'{"a":01}',
    b'{"a":.5}',
    b'{"a":+1}',
    b'{"a":0x10}',
    b"{a:1}",
    b'{"a":1}}',
    b'{"a":1} {"b":2}',
    b"true false",
    b'{"a":"\\x41"}',
    b'{"a":"\\u12"}',
    b'{"a":[1,]}',
    b"// comment",
    b'{"a":1 /* c */}',
    b'\xef\xbb\xbf{"jsonrpc":"2.0","id":1,"method":"daemon.hello"}',  # a UTF-8 BOM
    b'{"jsonrpc":"2.0","id":1,"method":"daemon.hello"',
)


def _bad_json(rng: random.Random, ids: Ids) -> Frame:
    if rng.random() < 0.5:
        line = _valid_line(rng, ids)
        cut = rng.randrange(1, len(line))
        return Frame(line[:cut] + b"\n", "truncated", frozenset({PARSE_ERROR}), frozenset({None}))
    return Frame(
        rng.choice(_BAD_JSON) + b"\n", "bad JSON", frozenset({PARSE_ERROR}), frozenset({None})
    )


_BAD_UTF8 = (
    b"\xff",
    b"\xc3",
    b"\xed\xa0\x80",  # a lone surrogate, encoded
    b"\xc0\xaf",  # overlong
    b"\xf8\x88\x80\x80\x80",
    b"\xf4\x90\x80\x80",  # above U+10FFFF
    b"\x80",
    b"\xe2\x82",
)


def _insert(line: bytes, piece: bytes, rng: random.Random) -> bytes:
    at = rng.randrange(0, len(line) + 1)
    return line[:at] + piece + line[at:]


def _bad_utf8(rng: random.Random, ids: Ids) -> Frame:
    line = _insert(_valid_line(rng, ids), rng.choice(_BAD_UTF8), rng)
    return Frame(line + b"\n", "invalid UTF-8", frozenset({PARSE_ERROR}), frozenset({None}))


def _nul(rng: random.Random, ids: Ids) -> Frame:
    roll = rng.random()
    if roll < 0.4:
        line = _insert(_valid_line(rng, ids), b"\x00", rng)
        return Frame(line + b"\n", "raw NUL", frozenset({PARSE_ERROR}), frozenset({None}))
    method = _method(rng)
    params = _valid_params(method, rng, ids)
    if roll < 0.8 or not params:
        params[rng.choice(("x\x00", "\x00"))] = "v"
    else:
        params[rng.choice(sorted(params))] = rng.choice(("\x00", "a\x00", ["\x00"], {"k": "\x00"}))
    return call_frame(method, params, _request_id(rng), ids, label="escaped NUL")


def _surrogate(rng: random.Random, ids: Ids) -> Frame:
    method = _method(rng)
    params = _valid_params(method, rng, ids)
    target = rng.choice(("value", "key", "method", "id"))
    lone = rng.choice(("\ud800", "\udfff", "a\udbff", "\udc00z"))
    request_id: RequestId = _request_id(rng)
    if target == "value" and params:
        params[rng.choice(sorted(params))] = lone
    elif target == "method":
        method = method + lone
    elif target == "id":
        request_id = lone
    else:
        params[lone] = "v"
    escape = rng.random() < 0.7
    return call_frame(
        method, params, request_id, ids, label=f"lone surrogate in {target}", escape=escape
    )


def _number(rng: random.Random, ids: Ids) -> Frame:
    method = _method(rng)
    params: dict[str, object] = _valid_params(method, rng, ids)
    if rng.random() < 0.5:
        token = rng.choice(NOT_JSON_NUMBERS)
        params[rng.choice(sorted(params)) if params else "n"] = token
        line = request_line(_request_id(rng), method, params)
        return Frame(
            line, f"number {token.text[:12]!r}", frozenset({PARSE_ERROR}), frozenset({None})
        )
    if params and rng.random() < 0.7:
        params[rng.choice(sorted(params))] = rng.choice((10**30, -(10**30), 2**63, 2**64, 1e300))
    else:
        params["n"] = rng.choice((10**30, 1e300))
    return call_frame(method, params, _request_id(rng), ids, label="big number")


DEPTHS = (64, 500, 900, 990, 2000, 10**4, 10**5)
"""Nesting depths: read by any JSON parser; about Python's recursion limit; far past it."""


def deep_frame(
    depth: int,
    *,
    objects: bool,
    ids: Ids,
    method: str | None = None,
    params: Mapping[str, object] | None = None,
    name: str = "deep",
    request_id: RequestId = 1,
) -> Frame:
    """A line nested ``depth`` deep: the whole line (``method`` None), or the value
    of parameter ``name`` of a ``method`` call. A daemon may read it or refuse it
    as a parse error, never fail on it."""
    nest = deep(depth, objects=objects)
    if method is None:
        return Frame(
            nest.text + b"\n",
            f"nesting {depth} deep (the whole line)",
            frozenset({PARSE_ERROR, INVALID_REQUEST}),
            frozenset({None}),
        )
    given = {**(params or {}), name: nest}
    line = request_line(request_id, method, given)
    label = f"nesting {depth} deep in {method} {name}"
    if depth >= 2000:
        return Frame(line, label, frozenset({PARSE_ERROR}), frozenset({None}))
    readable = expect_call(method, {**given, name: [[1]]}, ids)  # then a value of the wrong kind
    return Frame(line, label, readable | {PARSE_ERROR}, frozenset({request_id, None}))


def _deep(rng: random.Random, ids: Ids) -> Frame:
    depth = rng.choice(DEPTHS)
    objects = rng.random() < 0.5
    if rng.random() < 0.25:
        return deep_frame(depth, objects=objects, ids=ids)
    method = _method(rng)
    params = _valid_params(method, rng, ids)
    name = rng.choice(sorted(params)) if params and rng.random() < 0.6 else "deep"
    return deep_frame(
        depth,
        objects=objects,
        ids=ids,
        method=method,
        params=params,
        name=name,
        request_id=_request_id(rng),
    )


def _whitespace(rng: random.Random, ids: Ids) -> Frame:
    if rng.random() < 0.5:
        return Frame(
            rng.choice((b"", b" ", b"\t", b"\r", b" \t \r")) + b"\n", "blank", frozenset({NO_REPLY})
        )
    frame = _call(rng, ids)
    pad = rng.choice((b" ", b"\t", b"  \t"))
    tail = rng.choice((b"\n", b"\r\n", b" \r\n"))
    return Frame(
        pad + frame.data[:-1] + tail, "padded", frame.expect, frame.reply_ids, frame.method
    )


def _notification(rng: random.Random, ids: Ids) -> Frame:
    method = _method(rng)
    if method == "supervisor.create":
        method = "daemon.status"
    params = _params(method, rng, ids)
    line = request_line(_MISSING, method, params)
    if has_unstorable(params):  # refused by the codec before it knows it is a notification
        return Frame(line, "notification", frozenset({NO_REPLY, INVALID_PARAMS}), frozenset({None}))
    return Frame(line, "notification", frozenset({NO_REPLY}))


def _duplicates(rng: random.Random, ids: Ids) -> Frame:
    line = dump(
        Members(
            (
                ("jsonrpc", "2.0"),
                ("id", 1),
                ("method", "nope"),
                ("method", "daemon.hello"),
                ("id", "dup"),
                ("params", {}),
                ("params", {"x": 1}),
            )
        )
    )
    return Frame(line + b"\n", "duplicate members", None, None)


def _garbage(rng: random.Random, ids: Ids) -> Frame:
    data = bytes(rng.getrandbits(8) for _ in range(rng.randint(1, 300))).replace(b"\n", b" ")
    return Frame(data + b"\n", "random bytes", None, None)


def padded_hello(request_id: RequestId, size: int, *, cr: bool = False) -> bytes:
    """A ``daemon.hello`` line of exactly ``size`` bytes before its newline (a ``\\r``
    included when ``cr``), padded with an unknown parameter."""
    head = request_line(request_id, "daemon.hello", {"pad": ""})[: -len(b'"}}\n')]
    tail = b'"}}' + (b"\r" if cr else b"")
    return head + b"x" * (size - len(head) - len(tail)) + tail + b"\n"


def _big(rng: random.Random, ids: Ids) -> Frame:
    """A line just under or at the 1 MiB limit (lines over it close the
    connection: see closing_frames)."""
    request_id = _request_id(rng)
    size = rng.choice((MAX_LINE, MAX_LINE - 1, MAX_LINE // 2))
    line = padded_hello(request_id, size, cr=rng.random() < 0.5)
    return Frame(
        line, f"{size}-byte line", frozenset({RESULT, INVALID_PARAMS}), frozenset({request_id})
    )


FrameMaker = Callable[[random.Random, Ids], Frame]
FRAME_KINDS: tuple[tuple[FrameMaker, float], ...] = (
    (_call, 30),
    (_one_wrong_param, 16),
    (_id_frame, 6),
    (_envelope, 6),
    (_unknown_method, 3),
    (_bad_json, 6),
    (_bad_utf8, 5),
    (_nul, 5),
    (_surrogate, 5),
    (_number, 5),
    (_deep, 2),
    (_whitespace, 3),
    (_notification, 3),
    (_duplicates, 0.5),
    (_garbage, 3),
    (_big, 0.2),
)


def random_frame(rng: random.Random, ids: Ids) -> Frame:
    makers = [m for m, _ in FRAME_KINDS]
    weights = [w for _, w in FRAME_KINDS]
    return rng.choices(makers, weights)[0](rng, ids)


def random_frames(rng: random.Random, count: int, ids: Ids | None = None) -> list[Frame]:
    """``count`` hostile frames of every kind, none of which closes the connection."""
    known = ids if ids is not None else Ids()
    return [random_frame(rng, known) for _ in range(count)]


def every_wrong_param(ids: Ids | None = None) -> list[Frame]:
    """For every parameter of every method, every wrong value (the others valid);
    every required parameter missing; an unknown parameter for every method."""
    known = ids if ids is not None else Ids()
    rng = random.Random(0)  # noqa: S311 - picks valid companions, not secrets
    frames: list[Frame] = []
    for method, spec in METHODS.items():
        for name, param in spec.items():
            for value in (*COMMON_WRONG, *near_misses(param.kind)):
                params = _valid_params(method, rng, known)
                params[name] = value
                frames.append(
                    call_frame(method, params, len(frames), known, label=f"{method} {name}")
                )
            if param.required:
                params = _valid_params(method, rng, known)
                params.pop(name, None)
                frames.append(
                    call_frame(method, params, len(frames), known, label=f"{method} no {name}")
                )
        for extra in ("colour", "", "\x00", "\ud800"):
            params = {**_valid_params(method, rng, known), extra: 1}
            frames.append(call_frame(method, params, len(frames), known, label=f"{method} +param"))
    return frames


def catalogue(ids: Ids | None = None) -> list[Frame]:
    """One frame of every fixed hostile form: ids of every JSON type, envelope
    faults, bad JSON, invalid UTF-8, raw and escaped NUL and lone surrogates,
    refused numbers, nesting from 64 to 100 000 deep, unknown methods, blank lines."""
    known = ids if ids is not None else Ids()
    frames = [id_frame(i, known) for i in (*GOOD_IDS, *BAD_IDS)]
    frames += [call_frame(m, None, 2, known, label="unknown method") for m in UNKNOWN_METHODS]
    hello = request_line(3, "daemon.hello", {"x": "abc"})[:-1]
    parse_error = frozenset({PARSE_ERROR})
    null_id = frozenset({None})
    frames += [Frame(b + b"\n", "bad JSON", parse_error, null_id) for b in _BAD_JSON]
    for piece in (*_BAD_UTF8, b"\x00"):
        for at in (0, hello.index(b"abc") + 1, len(hello)):
            frames.append(
                Frame(hello[:at] + piece + hello[at:] + b"\n", "raw", parse_error, null_id)
            )
    for token in NOT_JSON_NUMBERS:
        line = request_line(4, "daemon.hello", {"n": token})
        frames.append(Frame(line, f"number {token.text[:12]!r}", parse_error, null_id))
    for lone in ("\ud800", "\udfff", "\x00"):
        for escape in (True, False):
            for method, params, request_id in (
                ("daemon.hello", {"x": lone}, 5),
                ("daemon.hello", {lone: 1}, 5),
                ("daemon.hello" + lone, None, 5),
                ("daemon.hello", None, lone),
                ("supervisor.get", {"supervisor_id": str(uuid.UUID(int=1)) + lone}, 5),
            ):
                frames.append(
                    call_frame(method, params, request_id, known, label="lone", escape=escape)
                )
    for depth in DEPTHS:
        for objects in (False, True):
            frames.append(deep_frame(depth, objects=objects, ids=known))
            frames.append(deep_frame(depth, objects=objects, ids=known, method="daemon.hello"))
            frames.append(
                deep_frame(depth, objects=objects, ids=known, method="supervisor.list", name="all")
            )
    rng = random.Random(2)  # noqa: S311 - envelope cases, not secrets
    envelopes: dict[str, Frame] = {}
    while len(envelopes) < 8:
        frame = _envelope(rng, known)
        envelopes.setdefault(frame.label, frame)
    frames += envelopes.values()
    blank = frozenset({NO_REPLY})
    frames += [Frame(b + b"\n", "blank", blank) for b in (b"", b" ", b"\t", b"\r", b" \t \r")]
    return frames


# --------------------------------------------------------------------------- lines that close


@dataclass(frozen=True, slots=True)
class ClosingFrame:
    """Bytes sent alone on a connection. ``closes``: the daemon answers
    INVALID_REQUEST and hangs up at once; else this side shuts its writing half
    (a partial last line) and the daemon must hang up, with at most one reply."""

    data: bytes
    label: str
    closes: bool


def closing_frames(rng: random.Random, count: int = 1) -> list[ClosingFrame]:
    """Lines over the 1 MiB limit (the connection closes) and partial last lines."""
    frames: list[ClosingFrame] = []
    for _ in range(count):
        roll = rng.random()
        if roll < 0.2:
            frames.append(ClosingFrame(b"x" * (MAX_LINE + 1), "over 1 MiB, no newline", True))
        elif roll < 0.35:
            line = padded_hello(1, MAX_LINE, cr=True)[:-2] + b"x\r\n"
            frames.append(ClosingFrame(line, "1 MiB and its \\r", True))
        elif roll < 0.5:
            frames.append(ClosingFrame(b"[" * (2 * MAX_LINE) + b"\n", "2 MiB of [", True))
        elif roll < 0.6:
            frames.append(
                ClosingFrame(
                    b'{"jsonrpc":"2.0","id":1,' + b" " * MAX_LINE, "spaces past 1 MiB", True
                )
            )
        else:
            line = request_line(_request_id(rng), "daemon.hello")
            cut = rng.randrange(1, len(line) - 1)
            frames.append(ClosingFrame(line[:cut], "partial last line", False))
    return frames


def boundary_frames() -> list[Frame]:
    """Lines of exactly 1 MiB (and less one byte) before the newline, a ``\\r``
    counted: taken."""
    frames: list[Frame] = []
    for size in (MAX_LINE, MAX_LINE - 1):
        for cr in (False, True):
            request_id = f"b{size}{'r' if cr else ''}"
            frames.append(
                Frame(
                    padded_hello(request_id, size, cr=cr),
                    f"{size}-byte line" + (" ending in \\r" if cr else ""),
                    frozenset({RESULT, INVALID_PARAMS}),
                    frozenset({request_id}),
                )
            )
    return frames


# --------------------------------------------------------------------------- agent lines

AGENT_MESSAGES: Mapping[str, Mapping[str, Param]] = MappingProxyType(
    {
        "activity": {
            "text": Param(Kind.TEXT, required=True, null=Verdict.WRONG),
            "progress": Param(Kind.PROGRESS),
        },
        "phase": {"phase": Param(Kind.LABEL, required=True, null=Verdict.WRONG)},
        "message": {
            "role": Param(Kind.LABEL, required=True, null=Verdict.WRONG),
            "content": Param(Kind.ANY, required=True),
        },
        "checkpoint": {"data": Param(Kind.ANY, required=True)},
        "ask": {
            "question": Param(Kind.LABEL, required=True, null=Verdict.WRONG),
            "choices": Param(Kind.CHOICES),
            "context": Param(Kind.TEXT),
        },
        "spawn": {
            "name": Param(Kind.LABEL, required=True, null=Verdict.WRONG),
            "command": Param(Kind.COMMAND, required=True, null=Verdict.WRONG),
            "cwd": Param(Kind.PATH),
            "env": Param(Kind.ENV),
        },
        "wait_tasks": {},
        "blocked": {"reason": Param(Kind.LABEL, required=True, null=Verdict.WRONG)},
        "fail": {"error": Param(Kind.LABEL, required=True, null=Verdict.WRONG)},
        "done": {"result": Param(Kind.ANY)},
    }
)
"""Every makima-agent/1 message an agent sends, and its fields (DESIGN §8)."""
ENDING = frozenset({"done", "fail"})
"""A valid one ends the supervisor: the generators make only refused ones."""
ANSWERED_LATER = frozenset({"ask", "checkpoint", "message"})
"""Valid ones may still be refused for their size once saved ones add up."""

REF = "ref"  # a reply carrying the line's ref
NULL = "null"  # a reply with a null ref (the daemon could not read the line)
NONE = "none"  # no reply


@dataclass(frozen=True, slots=True)
class AgentLine:
    """One hostile agent line and what must come back for it.

    ``refs``: the allowed shapes of the reply (REF, NULL, NONE); ``replies``:
    the allowed reply types (``ack``, ``error``); ``chunks``: write it in
    pieces of these sizes.
    """

    data: bytes
    label: str
    ref: object
    refs: frozenset[str]
    replies: frozenset[str]
    chunks: tuple[int, ...] = ()


ACK_OR_ERROR = frozenset({"ack", "error"})
ERROR = frozenset({"error"})
ACK = frozenset({"ack"})


def expect_agent_line(obj: Mapping[str, object]) -> tuple[frozenset[str], frozenset[str]]:
    """What DESIGN §8 makes of a readable agent line (a decoded JSON object)."""
    ref = obj.get("ref")
    if ref is not None and not _is_id(ref):
        return frozenset({NULL}), ERROR
    with_ref = frozenset({REF}) if ref is not None else frozenset({NULL})
    kind = obj.get("type")
    if not isinstance(kind, str) or kind not in AGENT_MESSAGES or has_unstorable(obj):
        return with_ref, ERROR
    spec = AGENT_MESSAGES[kind]
    verdict = worst(
        [
            judge(p, obj[name]) if name in obj else (Verdict.WRONG if p.required else Verdict.VALID)
            for name, p in spec.items()
        ]
    )
    if verdict is Verdict.WRONG:
        return with_ref, ERROR
    if ref is None:
        return (frozenset({NULL, NONE}) if verdict is Verdict.UNSURE else frozenset({NONE})), ERROR
    if verdict is Verdict.UNSURE or kind in ANSWERED_LATER:
        return with_ref, ACK_OR_ERROR
    return with_ref, ACK


def _agent_ref(rng: random.Random, n: int) -> object:
    roll = rng.random()
    if roll < 0.8:
        return f"r{n}"
    return rng.choice((0, -1, 10**30, "", "\x00", "\ud800", "é", "r" * 100_000))


def _agent_fields(kind: str, rng: random.Random, *, valid: bool = False) -> dict[str, object]:
    fields: dict[str, object] = {}
    for name, param in AGENT_MESSAGES[kind].items():
        if rng.random() < (0.95 if param.required else 0.5):
            fields[name] = valid_value(param.kind, rng) if valid else hostile_value(param.kind, rng)
    return fields


def agent_line(
    kind: object, fields: Mapping[str, object], ref: object, *, label: str, escape: bool = True
) -> AgentLine:
    """A line for ``{"type": kind, **fields, "ref": ref}`` (ref _MISSING: none),
    with its expectation; a valid ``done`` or ``fail`` gets a refused field."""
    members: dict[str, object] = {"type": kind, **fields}
    if ref is not _MISSING:
        members["ref"] = ref
    refs, replies = expect_agent_line(members)
    ending = isinstance(kind, str) and kind in ENDING
    if ending and expect_agent_line({**members, "ref": "probe"})[1] != ERROR:
        field_name = "error" if kind == "fail" else "result"
        members[field_name] = "\x00"  # refused: the line must not end the supervisor
        refs, replies = expect_agent_line(members)
    data = dump(members, escape=escape) + b"\n"
    if not escape and has_surrogate(members):
        refs, replies = frozenset({NULL}), ERROR  # raw surrogates: not UTF-8
    shown_ref = members.get("ref") if _is_id(members.get("ref")) else None
    return AgentLine(data, label, shown_ref, refs, replies)


def _agent_message(rng: random.Random, n: int) -> AgentLine:
    kind = rng.choice(sorted(AGENT_MESSAGES))
    ref: object = _agent_ref(rng, n) if rng.random() < 0.9 else rng.choice((_MISSING, None))
    fields = _agent_fields(kind, rng)
    if rng.random() < 0.05:
        fields[random_string(rng)] = random_value(rng)
    return agent_line(kind, fields, ref, label=f"{kind}")


def _agent_wrong_field(rng: random.Random, n: int) -> AgentLine:
    kind = rng.choice([k for k, spec in AGENT_MESSAGES.items() if spec])
    fields = _agent_fields(kind, rng, valid=True)
    name = rng.choice(sorted(AGENT_MESSAGES[kind]))
    fields[name] = rng.choice((*COMMON_WRONG, *near_misses(AGENT_MESSAGES[kind][name].kind)))
    return agent_line(kind, fields, f"r{n}", label=f"{kind} {name}")


def _agent_envelope(rng: random.Random, n: int) -> AgentLine:
    roll = rng.random()
    if roll < 0.35:
        kind: object = rng.choice(
            ("nope", "ACK", "start", "answer", "cancel", "", "ask ", 5, None, [])
        )
        return agent_line(kind, {}, f"r{n}", label=f"type {kind!r:.12}")
    if roll < 0.55:
        members: dict[str, object] = {"text": "x"}
        line = dump(members)[:-1] + b',"ref":"r' + str(n).encode() + b'"}\n'
        return AgentLine(line, "no type", f"r{n}", frozenset({REF}), ERROR)
    if roll < 0.8:
        bad = rng.choice((True, False, 1.5, [], {}, ["r"], {"r": 1}))
        return agent_line("activity", {"text": "x"}, bad, label=f"ref {bad!r:.12}")
    value = rng.choice((1, "x", None, True, [], [{"type": "activity"}], 1e300))
    return AgentLine(dump(value) + b"\n", "not an object", None, frozenset({NULL}), ERROR)


def _agent_malformed(rng: random.Random, n: int) -> AgentLine:
    """A line that is not JSON, or not UTF-8. A daemon may still find its ref in it
    (the reply then carries it) or not (a null ref); never another ref."""
    ref = f"r{n}"
    valid = agent_line("activity", {"text": "x"}, ref, label="").data[:-1]
    roll = rng.random()
    if roll < 0.3:
        data = valid[: rng.randrange(1, len(valid))]
        label = "truncated"
    elif roll < 0.55:
        data = _insert(valid, rng.choice(_BAD_UTF8), rng)
        label = "invalid UTF-8"
    elif roll < 0.7:
        data = _insert(valid, b"\x00", rng)
        label = "raw NUL"
    elif roll < 0.85:
        line = agent_line(
            "message", {"role": "x", "content": "\ud800"}, ref, label="", escape=False
        )
        data = line.data[:-1]
        label = "raw lone surrogate"
    else:
        return AgentLine(rng.choice(_BAD_JSON) + b"\n", "bad JSON", None, frozenset({NULL}), ERROR)
    return AgentLine(data + b"\n", label, ref, frozenset({REF, NULL}), ERROR)


def _agent_number(rng: random.Random, n: int) -> AgentLine:
    token = rng.choice(NOT_JSON_NUMBERS)
    kind, name = rng.choice(
        (("checkpoint", "data"), ("message", "content"), ("activity", "progress"))
    )
    fields: dict[str, object] = {name: token}
    if kind == "message":
        fields["role"] = "assistant"
    if kind == "activity":
        fields["text"] = "x"
    line = dump({"type": kind, "ref": f"r{n}", **fields}) + b"\n"
    # The ref is there to read, but the daemon refuses the number while decoding:
    # the reply may carry the ref, or not.
    return AgentLine(line, f"number {token.text[:12]!r}", f"r{n}", frozenset({REF, NULL}), ERROR)


def _agent_deep(rng: random.Random, n: int) -> AgentLine:
    depth = rng.choice((64, 512, 900, 990, 2000, 10**4, 10**5))
    nest = deep(depth, objects=rng.random() < 0.5)
    line = dump(Members((("ref", f"r{n}"), ("type", "checkpoint"), ("data", nest)))) + b"\n"
    if depth <= 512:
        refs, replies = frozenset({REF}), ACK_OR_ERROR
    elif depth < 2000:
        refs, replies = frozenset({REF, NULL}), ACK_OR_ERROR
    else:
        refs, replies = frozenset({REF, NULL}), ERROR
    return AgentLine(line, f"checkpoint nested {depth} deep", f"r{n}", refs, replies)


def _agent_size(rng: random.Random, n: int) -> AgentLine:
    roll = rng.random()
    if roll < 0.4:
        pad = "x" * (MAX_LINE + rng.choice((1, 10, MAX_LINE)))
        data = dump({"ref": f"r{n}", "type": "checkpoint", "data": pad}) + b"\n"
        refs = frozenset({REF, NULL})  # a daemon may read the ref at the start, or not
        return AgentLine(data, f"{len(data) - 1}-byte line", f"r{n}", refs, ERROR)
    head = dump({"ref": f"r{n}", "type": "checkpoint", "data": ""})[: -len(b'"}')]
    size = rng.choice((MAX_LINE, MAX_LINE - 1, 300_000))
    data = head + b"x" * (size - len(head) - 2) + b'"}\n'
    return AgentLine(data, f"{size}-byte checkpoint line", f"r{n}", frozenset({REF}), ACK_OR_ERROR)


def _agent_blank(rng: random.Random, n: int) -> AgentLine:
    if rng.random() < 0.5:
        data = rng.choice((b"", b" ", b"\t", b"\r", b"  \r")) + b"\n"
        return AgentLine(data, "blank", None, frozenset({NONE}), ERROR)
    return agent_line("activity", {"text": "no ref"}, _MISSING, label="valid, no ref")


def _agent_environment(rng: random.Random, n: int) -> AgentLine:
    env = rng.choice((*near_misses(Kind.ENV), {"MAKIMA_FUZZ": "1"}))
    command = rng.choice((*near_misses(Kind.COMMAND), [NOT_A_PROGRAM]))
    fields = {"name": "t", "command": defang_command(command), "env": env}
    return agent_line("spawn", fields, f"r{n}", label="spawn env/command")


AgentLineMaker = Callable[[random.Random, int], AgentLine]
AGENT_LINE_KINDS: tuple[tuple[AgentLineMaker, float], ...] = (
    (_agent_message, 30),
    (_agent_wrong_field, 20),
    (_agent_envelope, 10),
    (_agent_malformed, 10),
    (_agent_number, 5),
    (_agent_deep, 3),
    (_agent_size, 1),
    (_agent_blank, 4),
    (_agent_environment, 6),
)


def _split(rng: random.Random, size: int) -> tuple[int, ...]:
    if size < 2 or rng.random() < 0.85:
        return ()
    cuts = sorted(rng.sample(range(1, size), min(size - 1, rng.randint(1, 4))))
    return tuple(b - a for a, b in itertools.pairwise([0, *cuts]))


def random_agent_lines(rng: random.Random, count: int) -> list[AgentLine]:
    """``count`` hostile agent lines of every kind, some written in pieces."""
    makers = [m for m, _ in AGENT_LINE_KINDS]
    weights = [w for _, w in AGENT_LINE_KINDS]
    lines: list[AgentLine] = []
    for n in range(count):
        line = rng.choices(makers, weights)[0](rng, n)
        chunks = _split(rng, len(line.data))
        lines.append(
            AgentLine(line.data, line.label, line.ref, line.refs, line.replies, chunks)
            if chunks
            else line
        )
    return lines


def every_wrong_field() -> list[AgentLine]:
    """For every field of every agent message, every wrong value (the others
    valid); every required field missing; the refs of every JSON type."""
    rng = random.Random(0)  # noqa: S311 - picks valid companions, not secrets
    lines: list[AgentLine] = []
    for kind, spec in AGENT_MESSAGES.items():
        for name, param in spec.items():
            for value in (*COMMON_WRONG, *near_misses(param.kind)):
                fields = _agent_fields(kind, rng, valid=True)
                fields[name] = defang_command(value) if param.kind is Kind.COMMAND else value
                lines.append(agent_line(kind, fields, f"w{len(lines)}", label=f"{kind} {name}"))
            if param.required:
                fields = _agent_fields(kind, rng, valid=True)
                fields.pop(name, None)
                lines.append(agent_line(kind, fields, f"w{len(lines)}", label=f"{kind} no {name}"))
    for ref in (*COMMON_WRONG, 10**30, "r" * 100_000):
        lines.append(agent_line("activity", {"text": "x"}, ref, label=f"ref {ref!r:.16}"))
    return lines


# --------------------------------------------------------------------------- the runner's agents

CANARY_PHASE = "makima-fuzz-canary"
CANARY_CHOICES = ("yes", "no")
LINES_FINISHED = "makima fuzz: every line sent"
SINK_QUESTION = "makima fuzz: the sink agent is writing and will read nothing"
TRACE_ENV = "MAKIMA_AGENT_TRACE"


def canary_question(n: int) -> str:
    return f"makima fuzz canary question {n}"


async def _canary(agent: Any) -> None:
    """Phase, then question after question, each answer checkpointed before the next."""
    data = agent.checkpoint_data
    answered = data.get("answered", 0) if isinstance(data, dict) else 0
    await agent.phase(CANARY_PHASE)
    while True:
        answer = await agent.ask(canary_question(answered), choices=list(CANARY_CHOICES))
        answered += 1
        await agent.checkpoint({"answered": answered, "last": answer})


def _lines_agent(plan_path: str, log_path: str) -> int:
    """Write every line of the plan, each followed by a sync activity, and log the
    replies that came before the sync's ack; then report blocked with LINES_FINISHED
    and wait for stdin to close."""
    stdin, stdout = sys.stdin.buffer, sys.stdout.buffer
    with open(log_path, "a", encoding="utf-8") as log, open(plan_path, encoding="utf-8") as plan:

        def record(entry: dict[str, object]) -> None:
            log.write(json.dumps(entry) + "\n")
            log.flush()

        start = stdin.readline()
        if not start:
            return 3
        if json.loads(start).get("restoration"):
            record({"restarted": True})
            while stdin.readline():
                pass
            return 0
        for i, text in enumerate(plan):
            entry = json.loads(text)
            data = base64.b64decode(entry["data"])
            at = 0
            for size in (*entry["chunks"], len(data)):
                stdout.write(data[at : at + size])
                stdout.flush()
                at += size
            sync = f"{SYNC_PREFIX}{i}"
            stdout.write(json.dumps({"type": "activity", "text": "sync", "ref": sync}).encode())
            stdout.write(b"\n")
            stdout.flush()
            replies: list[dict[str, object]] = []
            while True:
                raw = stdin.readline()
                if not raw:
                    record({"i": i, "replies": replies, "eof": True})
                    return 4
                try:
                    message = json.loads(raw)
                except ValueError:
                    replies.append({"type": "unreadable", "size": len(raw)})
                    continue
                if not isinstance(message, dict) or message.get("type") not in ("ack", "error"):
                    continue
                if message.get("ref") == sync:
                    record({"i": i, "replies": replies, "sync": message.get("type")})
                    break
                replies.append(
                    {
                        "type": message.get("type"),
                        "ref": message.get("ref"),
                        "code": message.get("code"),
                        "message": str(message.get("message", ""))[:300],
                        "question_id": message.get("question_id"),
                        "size": len(raw),
                    }
                )
        record({"finished": True})
        finish = {"type": "blocked", "reason": LINES_FINISHED, "ref": f"{SYNC_PREFIX}end"}
        stdout.write(json.dumps(finish).encode() + b"\n")
        stdout.flush()
        while stdin.readline():
            pass
    return 0


def _sink_agent() -> int:
    """Ask one question, then write far more than the daemon's replies can fit in
    a pipe, and read nothing; exit when stdin closes (POLLHUP, without reading)."""
    out = sys.stdout.buffer

    def flood() -> None:
        with contextlib.suppress(OSError):
            out.write(json.dumps({"type": "ask", "question": SINK_QUESTION, "ref": "q"}).encode())
            out.write(b"\n")
            big = "r" * 200_000
            for k in range(4):
                out.write(json.dumps({"type": "fuzz-sink", "ref": f"{k}{big}"}).encode() + b"\n")
            for k in range(3000):
                out.write(json.dumps({"type": "fuzz-sink", "ref": f"s{k:064d}"}).encode() + b"\n")
            out.flush()

    threading.Thread(target=flood, daemon=True).start()
    poller = select.poll()
    poller.register(sys.stdin.fileno(), 0)  # POLLHUP only: the daemon closed our stdin
    poller.poll()
    os._exit(0)


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m makima.fuzz canary | lines PLAN LOG | sink``: the runner's agents."""
    args = list(sys.argv[1:] if argv is None else argv)
    if args == ["canary"]:
        from makima import sdk

        sdk.run(_canary)
    if len(args) == 3 and args[0] == "lines":
        return _lines_agent(args[1], args[2])
    if args == ["sink"]:
        return _sink_agent()
    print("usage: python -m makima.fuzz canary | lines PLAN LOG | sink", file=sys.stderr)
    return 2


# --------------------------------------------------------------------------- the runner

CRASH = "no crash: the daemon process stayed up"
HANG = "no hang: every request answered within its deadline"
ANSWERS = "the daemon answered after every batch"
INTERNAL = "no internal error (-32603, or 'internal' to an agent)"
PROTOCOL = "every reply as the protocol says"
LOST = "nothing acknowledged was lost"
AGENT = "every agent line answered as the protocol says"
SLOW = "stalled clients and agents did not stall the daemon"
RSS = "RSS stayed bounded"
CHECKS = (CRASH, HANG, ANSWERS, INTERNAL, PROTOCOL, LOST, AGENT, SLOW)
TERMINAL = frozenset({"completed", "failed"})
EXAMPLES = 5  # problems kept per check
AGENT_RUN = 250  # hostile lines per agent


@dataclass(frozen=True, slots=True)
class FuzzSettings:
    frames: int = 100_000  # hostile control frames, closing ones included
    seed: int | None = None
    connections: int = 4  # sending at once
    batch: int = 50  # frames per connection per round
    agent_lines: int | None = None  # None: frames // 50, at least 100
    slow_clients: int = 16  # clients that flood requests and never read
    held_lines: int = 160  # clients that each hold an unfinished 1 MiB line
    closing_every: int = 4  # a frame that closes its connection every this many rounds
    deadline: float = 30.0  # seconds for a batch's replies, a check, a create to settle
    quick: float = 5.0  # seconds in which others must be answered while clients stall
    cancel_deadline: float = 20.0  # seconds for supervisor.cancel of an agent that reads nothing
    rss_growth_mib: int = 128  # over the RSS before, at any moment (less than held_lines)
    rss_after_mib: int = 64  # over the RSS before, once it is over
    restart: bool = True  # after a crash, start the daemon again and go on

    @property
    def lines(self) -> int:
        return self.agent_lines if self.agent_lines is not None else max(100, self.frames // 50)


@dataclass
class FuzzReport:
    seed: int
    rss_growth_limit: int  # KiB
    rss_after_limit: int  # KiB
    frames: int = 0
    agent_lines: int = 0
    rounds: int = 0
    replies: Counter[str] = field(default_factory=Counter)
    agent_replies: Counter[str] = field(default_factory=Counter)
    crashes: int = 0
    hangs: int = 0
    rss_before: int | None = None  # KiB
    rss_max: int | None = None
    rss_after: int | None = None
    problems: dict[str, list[str]] = field(default_factory=dict)
    counts: Counter[str] = field(default_factory=Counter)
    extra: list[Check] = field(default_factory=list)
    seconds: float = 0.0
    scratch: Path | None = None

    def add(self, check: str, detail: str) -> None:
        self.counts[check] += 1
        examples = self.problems.setdefault(check, [])
        if len(examples) < EXAMPLES:
            examples.append(detail if len(detail) <= 900 else detail[:900] + "…")

    def checks(self) -> list[Check]:
        out = [
            Check(
                name,
                not self.counts[name],
                "ok"
                if not self.counts[name]
                else f"{self.counts[name]} times, e.g. " + " | ".join(self.problems[name][:2]),
            )
            for name in CHECKS
        ]
        out.append(self._rss_check())
        return out + self.extra

    def _rss_check(self) -> Check:
        before, peak, after = self.rss_before, self.rss_max, self.rss_after
        if before is None or peak is None:
            return Check(RSS, False, "not measured")
        growth = peak - before
        kept = (after - before) if after is not None else 0
        ok = growth <= self.rss_growth_limit and kept <= self.rss_after_limit
        detail = (
            f"{mib(before)} before, {mib(peak)} max (+{mib(growth)}, limit "
            f"+{mib(self.rss_growth_limit)}), {mib(after)} after (+{mib(kept)}, limit "
            f"+{mib(self.rss_after_limit)})"
        )
        return Check(RSS, ok, detail)

    @property
    def ok(self) -> bool:
        return all(c.ok for c in self.checks())

    def describe(self) -> str:
        """Every failed check with its examples, for an assertion message."""
        lines = [f"fuzz seed {self.seed}: {self.frames} frames, {self.agent_lines} agent lines"]
        for check in self.checks():
            if not check.ok:
                lines.append(f"FAILED {check.name}: {check.detail[:200]}")
                lines.extend(f"    {p}" for p in self.problems.get(check.name, []))
        return "\n".join(lines)

    def to_json(self) -> dict[str, Any]:
        return {
            "ok": self.ok,
            "seed": self.seed,
            "frames": self.frames,
            "agent_lines": self.agent_lines,
            "replies": dict(self.replies),
            "agent_replies": dict(self.agent_replies),
            "crashes": self.crashes,
            "hangs": self.hangs,
            "rss_kib": {"before": self.rss_before, "max": self.rss_max, "after": self.rss_after},
            "seconds": round(self.seconds, 1),
            "checks": [{"name": c.name, "ok": c.ok, "detail": c.detail} for c in self.checks()],
            "problems": self.problems,
        }


def mib(kib: int | None) -> str:
    return "unknown" if kib is None else f"{kib / 1024:.0f} MiB"


def rss_kib(pid: int) -> int | None:
    """VmRSS of ``pid`` in KiB (None: no such process, or a zombie)."""
    try:
        text = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return None
    for line in text.splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    return None


def describe(data: bytes, label: str) -> str:
    """A frame or line for a report: its label, its start and its end, its size."""
    shown = repr(data) if len(data) <= 240 else f"{data[:150]!r} … {data[-70:]!r}"
    return f"{label}: {shown} ({len(data)} bytes)"


def sync_line(sync_id: str) -> bytes:
    return b'{"jsonrpc":"2.0","id":' + json.dumps(sync_id).encode() + b',"method":"daemon.hello"}\n'


_FAILURE_LINE = re.compile(r'Error|Exception|Traceback|"level": "(error|critical)"')
"""A line of the daemon's log that tells why it failed."""


class _Broken(MakimaError):
    """A step lost its connection or its subscription (the daemon may be gone)."""


class _LineReader:
    """Lines from a stream, any length (the caller judges the length)."""

    def __init__(self, stream: anyio.abc.ByteReceiveStream) -> None:
        self.stream = stream
        self.buffer = bytearray()
        self.scanned = 0

    async def line(self) -> bytes | None:
        """The next line without its newline; None at the end of the stream."""
        while True:
            end = self.buffer.find(b"\n", self.scanned)
            if end >= 0:
                line = bytes(self.buffer[:end])
                del self.buffer[: end + 1]
                self.scanned = 0
                return line
            self.scanned = len(self.buffer)
            try:
                self.buffer += await self.stream.receive()
            except (
                anyio.EndOfStream,
                anyio.BrokenResourceError,
                anyio.ClosedResourceError,
                OSError,
            ):
                return None


@dataclass
class _Canary:
    supervisor_id: str
    trace: Path
    answers: dict[str, str] = field(default_factory=dict)  # acknowledged: question id → answer


class Fuzzer:
    """Drives one daemon process (a :class:`~makima.drill.DaemonRunner`, started)
    with hostile input and checks it after each step. Open a :meth:`session`,
    then call the steps (or :meth:`run` for the whole mix); the findings are in
    :attr:`report`."""

    def __init__(
        self,
        runner: DaemonRunner,
        settings: FuzzSettings,
        scratch: Path,
        progress: Callable[[FuzzReport], None] | None = None,
    ) -> None:
        self.runner = runner
        self.settings = settings
        self.scratch = scratch
        seed = settings.seed if settings.seed is not None else random.randrange(1 << 30)  # noqa: S311
        self.rng = random.Random(seed)  # noqa: S311 - hostile input, not secrets
        self.report = FuzzReport(
            seed=seed,
            rss_growth_limit=settings.rss_growth_mib * 1024,
            rss_after_limit=settings.rss_after_mib * 1024,
        )
        self.ids = Ids()
        self.progress = progress or (lambda _: None)
        self.dead = False
        self.restarts = 0
        self._canary: _Canary | None = None
        self._states: dict[str, str] = {}
        self._reasons: dict[str, object] = {}
        self._asked: dict[str, list[tuple[str, str]]] = {}
        self._changed = anyio.Event()
        self._watch_lost: str | None = None
        self._tg: anyio.abc.TaskGroup | None = None
        self._exchanges = 0
        self._agent_runs = 0
        self._context = ""  # what was sent last, for a crash report
        self._suspects: list[tuple[int, str]] = []  # what may have killed the daemon, ranked

    @property
    def socket_path(self) -> Path:
        return self.runner.socket_path

    # ----------------------------------------------------------------- session

    @asynccontextmanager
    async def session(self, *, canary: bool = True) -> AsyncIterator[Fuzzer]:
        """Watch the daemon's events and start the canary; at the end, check
        everything acknowledged to it and measure RSS after."""
        started = time.monotonic()
        async with anyio.create_task_group() as tg:
            self._tg = tg
            await self._step("subscribing to events", self._start_watch)
            if canary:
                await self._step("starting the canary", self._start_canary)
            self.report.rss_before = self._rss()
            self.report.rss_max = self.report.rss_before
            try:
                yield self
                await self._step("final check", self._final_check)
            finally:
                self.report.rss_after = self._rss()
                self.report.seconds = time.monotonic() - started
                tg.cancel_scope.cancel()
                self._tg = None

    def _rss(self) -> int | None:
        process = self.runner.process
        value = rss_kib(process.pid) if process is not None else None
        if value is not None and (self.report.rss_max is None or value > self.report.rss_max):
            self.report.rss_max = value
        return value

    def _client(
        self, timeout: float | None = None
    ) -> contextlib.AbstractAsyncContextManager[ControlClient]:
        return ControlClient.connect(self.socket_path, timeout=timeout or self.settings.deadline)

    async def _step(self, name: str, action: Callable[[], Awaitable[None]]) -> None:
        """Run one step; tell a crash (the process gone) from a failure or a hang."""
        if self.dead:
            return
        self._context = name
        self._suspects = []
        failure: str | None = None
        try:
            await action()
        except CallTimeoutError as exc:
            self.report.hangs += 1
            self.report.add(HANG, f"{name}: {exc}")
        except (ControlError, _Broken, OSError) as exc:
            failure = f"{name}: {type(exc).__name__}: {exc}"
        except (KeyError, TypeError) as exc:  # a result without the members it must have
            self.report.add(PROTOCOL, f"{name}: a result of the wrong shape: {exc!r}")
        process = self.runner.process
        if failure is None and process is not None and process.returncode is None:
            return
        if await self._gone():
            await self._crashed(name)
        elif failure is not None:
            self.report.add(ANSWERS, failure)

    async def _gone(self) -> bool:
        process = self.runner.process
        if process is None:
            return True
        if process.returncode is None:
            with anyio.move_on_after(3.0):
                await process.wait()
        return process.returncode is not None

    async def _crashed(self, name: str) -> None:
        self.report.crashes += 1
        process = self.runner.process
        code = process.returncode if process is not None else None
        ranked = [text for _, text in sorted(self._suspects, key=lambda s: s[0])]
        suspects = "; ".join(ranked[:3]) or f"last sent: {self._context}"
        self.report.add(
            CRASH,
            f"the daemon exited (status {code}) during {name}; {suspects}; "
            f"its log: {self._log_tail()}",
        )
        if self.settings.restart:
            try:
                with anyio.fail_after(120):
                    await self.runner.wait()
                    await self.runner.start()
                self.restarts += 1
                await self._start_watch()
            except (MakimaError, OSError, TimeoutError) as exc:
                self.report.add(CRASH, f"could not start the daemon again: {exc}")
            else:
                return
        self.dead = True
        with contextlib.suppress(MakimaError, OSError, TimeoutError):
            # Reap it and close its notification socket.
            await (self.runner.kill() if self.runner.running else self.runner.wait())

    def _log_tail(self) -> str:
        try:
            with self.runner.log_path.open("rb") as log:
                log.seek(0, os.SEEK_END)
                log.seek(max(0, log.tell() - 40_000))
                lines = log.read().decode(errors="replace").splitlines()
        except OSError:
            return "(no log)"
        wanted = [ln for ln in lines if _FAILURE_LINE.search(ln)]
        picked = (wanted or lines)[-3:]
        return " ⏎ ".join(ln.strip()[-700:] for ln in picked)

    # ----------------------------------------------------------------- events

    async def _start_watch(self) -> None:
        assert self._tg is not None
        self._watch_lost = None
        await self._tg.start(self._watch)

    async def _watch(self, *, task_status: anyio.abc.TaskStatus[None]) -> None:
        started = False
        try:
            async with (
                self._client() as client,
                client.events(
                    [EventKind.SUPERVISOR_STATE_CHANGED.value, EventKind.QUESTION_ASKED.value],
                    buffer=1 << 16,
                ) as events,
            ):
                task_status.started()
                started = True
                async for event in events:
                    self._on_event(event)
            self._watch_lost = "the daemon ended the event subscription"
        except ControlError as exc:
            if not started:
                raise
            self._watch_lost = f"the event subscription broke: {exc}"
        finally:
            self._notify()

    def _on_event(self, event: Mapping[str, Any]) -> None:
        sid = str(event.get("supervisor_id"))
        if event.get("kind") == EventKind.SUPERVISOR_STATE_CHANGED.value:
            self._states[sid] = str(event.get("state"))
            self._reasons[sid] = event.get("error_message")
        elif event.get("kind") == EventKind.QUESTION_ASKED.value:
            entry = (str(event.get("question_id")), str(event.get("question")))
            self._asked.setdefault(sid, []).append(entry)
        self._notify()

    def _notify(self) -> None:
        self._changed.set()
        self._changed = anyio.Event()

    async def _wait_for(self, condition: Callable[[], bool], limit: float) -> bool:
        """Wait (on events) until ``condition`` holds; False after ``limit`` seconds."""
        with anyio.move_on_after(limit):
            while not condition():
                if self._watch_lost is not None:
                    raise _Broken(self._watch_lost)
                await self._changed.wait()
            return True
        return False

    # ----------------------------------------------------------------- checks

    async def check(self) -> None:
        """The daemon answers; the canary kept everything acknowledged to it."""
        await self._step("check", self._check)

    async def _check(self) -> None:
        if self.runner.notify is not None:
            self.runner.notify.drain()  # else its status updates pile up and fail (EAGAIN)
        async with self._client() as client:
            try:
                await client.call("daemon.status")
            except RemoteError as exc:
                self.report.add(ANSWERS, f"daemon.status: {exc}")
            if self._canary is not None:
                await self._check_canary(client, self._canary)
        self._rss()

    async def _check_canary(self, client: ControlClient, canary: _Canary) -> None:
        sid = canary.supervisor_id
        questions = (await client.call("question.list", {"supervisor_id": sid}))["questions"]
        body = await client.call("supervisor.get", {"supervisor_id": sid})
        if (
            body.get("state") in TERMINAL
            or body.get("phase") != CANARY_PHASE
            or body.get("restoration_count") != self.restarts
        ):
            self.report.add(
                LOST,
                f"the canary is {body.get('state')} in phase {body.get('phase')!r} "
                f"(restored {body.get('restoration_count')} times, the daemon restarted "
                f"{self.restarts} times): {body.get('error_message')}",
            )
        checkpoint = body.get("checkpoint_data")
        answered = checkpoint.get("answered", 0) if isinstance(checkpoint, dict) else 0
        if len(questions) > 1:
            self.report.add(LOST, f"the canary has {len(questions)} open questions, not one")
        if questions:
            question = questions[0]
            n = len(canary.answers)
            if question.get("question") != canary_question(n) or answered != n:
                self.report.add(
                    LOST,
                    f"after {n} acknowledged answers the canary asks {question.get('question')!r}"
                    f" with checkpoint answered={answered}",
                )
            choice = CANARY_CHOICES[n % 2]
            qid = str(question.get("question_id"))
            try:
                await client.call("question.answer", {"question_id": qid, "answer": choice})
            except RemoteError as exc:
                self.report.add(LOST, f"the canary's question {qid} could not be answered: {exc}")
            else:
                canary.answers[qid] = choice
                self.ids.answered.append(qid)
        recent = list(canary.answers)[-2:]
        older = list(canary.answers)[:-2]
        await self._verify_answers(
            client, canary, [*recent, *self.rng.sample(older, min(1, len(older)))]
        )

    async def _verify_answers(
        self, client: ControlClient, canary: _Canary, question_ids: Sequence[str]
    ) -> None:
        """An acknowledged answer stays as given: answering again is a conflict carrying it."""
        for qid in question_ids:
            given = canary.answers[qid]
            other = CANARY_CHOICES[1 - CANARY_CHOICES.index(given)]
            try:
                await client.call("question.answer", {"question_id": qid, "answer": other})
            except RemoteError as exc:
                kept = exc.data.get("answer") if isinstance(exc.data, dict) else None
                if exc.code != CONFLICT or kept != given:
                    self.report.add(
                        LOST, f"the acknowledged answer {given!r} to {qid}: now {exc} ({kept!r})"
                    )
            else:
                self.report.add(LOST, f"question {qid}, answered {given!r}, took a second answer")

    async def _start_canary(self) -> None:
        trace = self.scratch / f"canary-{uuid.uuid4().hex[:8]}.jsonl"
        async with self._client() as client:
            created = await client.call(
                "supervisor.create",
                {
                    "name": "makima-fuzz-canary",
                    "goal": "keep everything acknowledged to it",
                    "command": [sys.executable, "-m", "makima.fuzz", "canary"],
                    "env": {TRACE_ENV: str(trace)},
                },
            )
        sid = str(created["supervisor_id"])
        self._canary = _Canary(sid, trace)
        self.ids.readable.append(sid)
        if not await self._wait_for(lambda: bool(self._asked.get(sid)), self.settings.deadline):
            self.report.add(LOST, "the canary agent never asked its first question")

    async def _final_check(self) -> None:
        await self._check()
        canary = self._canary
        if canary is None or not canary.answers:
            return
        n = len(canary.answers)
        asked = await self._wait_for(
            lambda: any(
                t == canary_question(n) for _, t in self._asked.get(canary.supervisor_id, [])
            ),
            self.settings.deadline,
        )
        if not asked:
            self.report.add(LOST, f"the canary never asked question {n}: its last answer is lost")
        async with self._client() as client:
            await self._verify_answers(client, canary, list(canary.answers))
        self._check_trace(canary)

    def _check_trace(self, canary: _Canary) -> None:
        """Every acknowledged answer reached the canary, once per agent process."""
        try:
            lines = canary.trace.read_text(encoding="utf-8").splitlines()
        except OSError as exc:
            self.report.add(LOST, f"no trace of the canary's agent: {exc}")
            return
        got: Counter[str] = Counter()
        in_process: Counter[str] = Counter()
        for text in lines:
            try:
                message = json.loads(text)
            except ValueError:
                continue
            if message.get("type") == "start":
                in_process = Counter()
                for entry in (message.get("restoration") or {}).get("undelivered_answers", []):
                    in_process[entry["question_id"]] += 1
                    got[entry["question_id"]] += 1
            elif message.get("type") == "answer":
                in_process[message["question_id"]] += 1
                got[message["question_id"]] += 1
            for qid, count in in_process.items():
                if count > 1:
                    self.report.add(
                        LOST, f"the canary's agent got the answer to {qid} {count} times"
                    )
                    in_process[qid] = 1
        for qid in canary.answers:
            if not got[qid]:
                self.report.add(LOST, f"the acknowledged answer to {qid} never reached the canary")

    # ----------------------------------------------------------------- control frames

    async def control_batch(self, frames: Sequence[Frame]) -> None:
        """Send ``frames`` over up to ``connections`` connections at once (each in
        random pieces, each frame followed by a sentinel request) and judge every
        reply; then wait for the supervisors they created to settle."""
        await self._step("control frames", lambda: self._control_batch(frames))

    async def _control_batch(self, frames: Sequence[Frame]) -> None:
        count = max(1, min(self.settings.connections, len(frames)))
        parts = [list(frames[k::count]) for k in range(count)]
        created: list[str] = []
        errors: list[str] = []
        async with anyio.create_task_group() as tg:
            for part in parts:
                tg.start_soon(self._exchange, part, created, errors)
        self.report.frames += len(frames)
        self._rss()
        if errors:
            raise _Broken("; ".join(errors[:3]))
        await self._settle(created)

    def _chunks(self, data: bytes) -> list[bytes]:
        roll = self.rng.random()
        if roll < 0.5 or len(data) < 2:
            return [data]
        if roll < 0.85:
            chunks, at = [], 0
            while at < len(data):
                size = self.rng.randint(1, 8192)
                chunks.append(data[at : at + size])
                at += size
            return chunks
        head = min(len(data), 96)
        return [data[k : k + 1] for k in range(head)] + ([data[head:]] if head < len(data) else [])

    async def _send_chunks(self, stream: anyio.abc.SocketStream, chunks: Sequence[bytes]) -> None:
        with contextlib.suppress(anyio.BrokenResourceError, anyio.ClosedResourceError, OSError):
            for chunk in chunks:
                await stream.send(chunk)

    async def _exchange(
        self, frames: Sequence[Frame], created: list[str], errors: list[str]
    ) -> None:
        self._exchanges += 1
        tag = f"{SYNC_PREFIX}{self._exchanges}-"
        data = b"".join(f.data + sync_line(f"{tag}{k}") for k, f in enumerate(frames))
        self._context = "; ".join(describe(f.data, f.label) for f in frames[-3:])
        limit = self.settings.deadline + len(data) / 2e6
        results: list[list[tuple[Response, int]]] = [[] for _ in frames]
        answered = 0
        closed = False
        try:
            stream = await anyio.connect_unix(self.socket_path)
        except OSError as exc:
            errors.append(f"connecting: {exc}")
            return
        async with stream:
            reader = _LineReader(stream)
            async with anyio.create_task_group() as tg:
                tg.start_soon(self._send_chunks, stream, self._chunks(data))
                current: list[tuple[Response, int]] = []
                with anyio.move_on_after(limit) as scope:
                    while answered < len(frames):
                        line = await reader.line()
                        if line is None:
                            closed = True
                            break
                        message = parse_server_message(line)
                        if isinstance(message, ProtocolError):
                            self.report.add(
                                PROTOCOL,
                                f"the daemon sent a bad line ({message.message}): {line[:200]!r}",
                            )
                        elif isinstance(message, Response):
                            if message.id == f"{tag}{answered}":
                                results[answered] = current
                                current = []
                                answered += 1
                            else:
                                current.append((message, len(line)))
                tg.cancel_scope.cancel()
        if scope.cancelled_caught:
            self.report.hangs += 1
            self.report.add(
                HANG,
                f"no answer within {limit:.0f}s to frame {answered + 1} of {len(frames)}: "
                + describe(frames[answered].data, frames[answered].label),
            )
        elif closed:
            frame = frames[answered]
            shown = describe(frame.data, frame.label)
            rank = 1 if frame.method == "supervisor.create" else 2
            self._suspects.append((rank, f"the connection closed at {shown}"))
            errors.append(f"the daemon closed the connection at frame {answered + 1}: {shown}")
        for frame, replies in zip(frames[:answered], results[:answered], strict=True):
            self._judge(frame, replies, created)

    def _judge(self, frame: Frame, replies: list[tuple[Response, int]], created: list[str]) -> None:
        shown = describe(frame.data, frame.label)
        outcome = NO_REPLY
        message = ""
        if replies:
            response, size = replies[0]
            outcome = RESULT if response.error is None else response.error.code
            message = "" if response.error is None else response.error.message[:200]
            if len(replies) > 1:
                self.report.add(PROTOCOL, f"{len(replies)} replies to one line: {shown}")
            if size > MAX_LINE:
                self.report.add(PROTOCOL, f"a {size}-byte reply, over the line limit, to {shown}")
            if frame.reply_ids is not None and response.id not in frame.reply_ids:
                allowed = ", ".join(sorted(repr(i)[:40] for i in frame.reply_ids))
                self.report.add(
                    PROTOCOL, f"reply id {response.id!r:.40} instead of {allowed}: {shown}"
                )
            if outcome == RESULT and frame.method == "supervisor.create":
                result = response.result
                if isinstance(result, dict) and isinstance(result.get("supervisor_id"), str):
                    created.append(result["supervisor_id"])
                    # First of all: one taken though the protocol refuses it.
                    refused = frame.expect is not None and RESULT not in frame.expect
                    self._suspects.append(
                        (0 if refused else 3, f"its agent starting after {shown}")
                    )
        self.report.replies[outcome_name(outcome)] += 1
        if outcome == INTERNAL_ERROR:
            self.report.add(INTERNAL, f"{message}: {shown}")
        elif frame.expect is not None and outcome not in frame.expect:
            wanted = " or ".join(outcome_name(o) for o in sorted(frame.expect))
            self.report.add(
                PROTOCOL, f"expected {wanted}, got {outcome_name(outcome)} ({message}): {shown}"
            )

    async def _settle(self, created: Sequence[str]) -> None:
        """Wait until every supervisor the frames created has finished (its agent
        cannot run: the generators give it none that can)."""
        if not created:
            return
        settled = await self._wait_for(
            lambda: all(self._states.get(s) in TERMINAL for s in created), self.settings.deadline
        )
        if not settled:
            stuck = [s for s in created if self._states.get(s) not in TERMINAL]
            self.report.hangs += 1
            self.report.add(HANG, f"supervisors created by the fuzz never finished: {stuck[:3]}")
        self.ids.readable.extend(created)
        self.ids.mutable.extend(created)

    async def closing(self, frames: Sequence[ClosingFrame]) -> None:
        """Each frame alone on a connection: the daemon answers and hangs up."""
        for frame in frames:
            await self._step("a line that closes", functools.partial(self._closing, frame))

    async def _closing(self, frame: ClosingFrame) -> None:
        self._context = describe(frame.data, frame.label)
        replies: list[bytes] = []
        ended = False
        async with await anyio.connect_unix(self.socket_path) as stream:
            reader = _LineReader(stream)

            async def send() -> None:
                await self._send_chunks(stream, self._chunks(frame.data))
                if not frame.closes:
                    with contextlib.suppress(
                        anyio.BrokenResourceError, anyio.ClosedResourceError, OSError
                    ):
                        await stream.send_eof()

            with anyio.move_on_after(self.settings.deadline + len(frame.data) / 2e6):
                async with anyio.create_task_group() as tg:
                    tg.start_soon(send)
                    while (line := await reader.line()) is not None:
                        replies.append(line)
                    ended = True
                    tg.cancel_scope.cancel()
        self.report.frames += 1
        if not ended:
            self.report.hangs += 1
            self.report.add(HANG, f"the daemon did not hang up after {self._context}")
            return
        responses = [m for m in map(parse_server_message, replies) if isinstance(m, Response)]
        if len(responses) < len(replies):
            self.report.add(PROTOCOL, f"lines that are not responses after {self._context}")
        codes = [RESULT if m.error is None else m.error.code for m in responses]
        self.report.replies[outcome_name(codes[0]) if codes else outcome_name(NO_REPLY)] += 1
        if INTERNAL_ERROR in codes:
            self.report.add(INTERNAL, self._context)
        if frame.closes and codes != [INVALID_REQUEST]:
            names = ", ".join(outcome_name(c) for c in codes) or "no reply"
            self.report.add(
                PROTOCOL, f"expected one -32600 and a hang-up, got {names}: {self._context}"
            )
        elif not frame.closes and len(codes) > 1:
            self.report.add(PROTOCOL, f"{len(codes)} replies to one partial line: {self._context}")

    # ----------------------------------------------------------------- stalled peers

    async def _quick_probe(self, when: str) -> None:
        with anyio.move_on_after(self.settings.quick) as scope:
            async with self._client() as client:
                await client.call("daemon.hello")
                await client.call("daemon.status")
        if scope.cancelled_caught:
            self.report.hangs += 1
            self.report.add(SLOW, f"no answer within {self.settings.quick:.0f}s {when}")

    async def slow_clients(self) -> None:
        """Clients that flood requests and never read, clients that each send all
        but the end of a 1 MiB line (``held_lines`` MiB in all, more than a daemon
        should hold), idle ones: others are still answered at once, RSS stays bounded."""
        await self._step("slow and never-reading clients", self._slow_clients)

    async def _slow_clients(self) -> None:
        settings = self.settings
        flood = request_line(1, "events.subscribe") + b"".join(
            request_line(k, "daemon.status") for k in range(2, 400)
        )
        held = padded_hello("held", MAX_LINE)[:-2]  # without its closing brace and newline
        streams: list[anyio.abc.UNIXSocketStream] = []

        async def stall(payload: bytes) -> None:
            with contextlib.suppress(anyio.BrokenResourceError, OSError):
                stream = await anyio.connect_unix(self.socket_path)
                streams.append(stream)
                if payload:
                    await stream.send(payload)

        count = settings.slow_clients + settings.held_lines + 4
        try:
            with anyio.move_on_after(settings.quick * 2):
                async with anyio.create_task_group() as tg:
                    for _ in range(settings.slow_clients):
                        tg.start_soon(stall, flood)
                    for _ in range(settings.held_lines):
                        tg.start_soon(stall, held)
                    for _ in range(4):
                        tg.start_soon(stall, b"")
            self._rss()
            await self._quick_probe(f"while {count} clients stall")
            self._rss()
        finally:
            for opened in streams:
                with contextlib.suppress(Exception):
                    await opened.aclose()
        await self._quick_probe(f"after {count} stalled clients went")

    async def stuck_agent(self) -> None:
        """An agent that writes and never reads: others are answered, and a
        person's cancel of it answers."""
        await self._step("an agent that reads nothing", self._stuck_agent)

    async def _stuck_agent(self) -> None:
        async with self._client() as client:
            created = await client.call(
                "supervisor.create",
                {
                    "name": "makima-fuzz-sink",
                    "command": [sys.executable, "-m", "makima.fuzz", "sink"],
                },
            )
        sid = str(created["supervisor_id"])
        self.ids.readable.append(sid)
        asked = await self._wait_for(
            lambda: any(t == SINK_QUESTION for _, t in self._asked.get(sid, [])),
            self.settings.deadline,
        )
        if not asked:
            self.report.add(SLOW, "the agent that reads nothing never got to ask its question")
            return
        await self._quick_probe("while an agent reads nothing")
        result: Any = None
        with anyio.move_on_after(self.settings.cancel_deadline) as scope:
            async with self._client(timeout=self.settings.cancel_deadline + 5) as client:
                result = await client.call("supervisor.cancel", {"supervisor_id": sid})
        if scope.cancelled_caught:
            self.report.hangs += 1
            self.report.add(
                SLOW,
                f"supervisor.cancel of an agent that reads nothing did not answer within "
                f"{self.settings.cancel_deadline:.0f}s",
            )
        elif not isinstance(result, dict) or result.get("state") != "failed":
            self.report.add(
                SLOW, f"supervisor.cancel of an agent that reads nothing: {result!r:.200}"
            )
        await self._quick_probe("after cancelling an agent that reads nothing")

    # ----------------------------------------------------------------- agent lines

    async def agent_lines(self, lines: Sequence[AgentLine]) -> None:
        """Agents write ``lines`` (AGENT_RUN at most each, so that a line that ends
        its supervisor hides few others), each line followed by a sync: every line
        gets the reply the protocol says; the questions acknowledged are kept."""
        for start in range(0, len(lines), AGENT_RUN):
            part = lines[start : start + AGENT_RUN]
            await self._step("hostile agent lines", functools.partial(self._agent_lines, part))

    async def _agent_lines(self, lines: Sequence[AgentLine]) -> None:
        self._agent_runs += 1
        plan = self.scratch / f"lines-{self._agent_runs}.jsonl"
        log = self.scratch / f"lines-{self._agent_runs}.log"
        with plan.open("w", encoding="utf-8") as out:
            for line in lines:
                entry = {"data": base64.b64encode(line.data).decode(), "chunks": list(line.chunks)}
                out.write(json.dumps(entry) + "\n")
        async with self._client() as client:
            created = await client.call(
                "supervisor.create",
                {
                    "name": f"makima-fuzz-lines-{self._agent_runs}",
                    "command": [sys.executable, "-m", "makima.fuzz", "lines", str(plan), str(log)],
                },
            )
        sid = str(created["supervisor_id"])
        self.ids.readable.append(sid)
        size = sum(len(line.data) for line in lines)
        try:
            finished = await self._wait_for(
                lambda: (
                    (
                        self._states.get(sid) == "blocked"
                        and self._reasons.get(sid) == LINES_FINISHED
                    )
                    or self._states.get(sid) in TERMINAL
                ),
                self.settings.deadline + 0.05 * len(lines) + size / 1e6,
            )
        except _Broken:
            self._context = self._line_context(lines, log)
            raise
        records = self._read_log(log)
        done = [r for r in records if "i" in r]
        self.report.agent_lines += len(done)
        if not finished:
            self.report.hangs += 1
            self.report.add(
                HANG, f"no reply within the deadline to {self._line_context(lines, log)}"
            )
        elif self._states.get(sid) in TERMINAL:
            self.report.add(
                AGENT,
                f"the hostile agent's supervisor ended ({self._states.get(sid)}: "
                f"{self._reasons.get(sid)}); {self._line_context(lines, log)}",
            )
        for record in done:
            index = int(record["i"])
            if index < len(lines):
                self._judge_line(lines[index], record)
        await self._agent_aftermath(sid, done, finished)

    async def _agent_aftermath(
        self, sid: str, done: Sequence[Mapping[str, Any]], finished: bool
    ) -> None:
        acked = [
            str(r["question_id"])
            for record in done
            for r in record.get("replies", [])
            if r.get("type") == "ack" and r.get("question_id")
        ]
        async with self._client() as client:
            try:
                await client.call("supervisor.get", {"supervisor_id": sid})
            except RemoteError as exc:
                self.report.add(ANSWERS, f"supervisor.get of the hostile agent's supervisor: {exc}")
            if finished and self._states.get(sid) not in TERMINAL:
                listed = await client.call("question.list", {"supervisor_id": sid})
                open_ids = {q.get("question_id") for q in listed["questions"]}
                missing = [q for q in acked if q not in open_ids]
                if missing:
                    self.report.add(
                        LOST, f"{len(missing)} questions acknowledged to the hostile agent are gone"
                    )
            with anyio.move_on_after(self.settings.cancel_deadline) as scope:
                with contextlib.suppress(RemoteError):
                    await client.call("supervisor.cancel", {"supervisor_id": sid})
            if scope.cancelled_caught:
                self.report.hangs += 1
                self.report.add(SLOW, "supervisor.cancel of the hostile agent did not answer")

    @staticmethod
    def _read_log(path: Path) -> list[dict[str, Any]]:
        try:
            text = path.read_text(encoding="utf-8")
        except OSError:
            return []
        records: list[dict[str, Any]] = []
        for entry in text.splitlines():
            with contextlib.suppress(ValueError):
                records.append(json.loads(entry))
        return records

    def _line_context(self, lines: Sequence[AgentLine], log: Path) -> str:
        """The line the daemon was handling (and the one before it), from the agent's log."""
        index = sum(1 for r in self._read_log(log) if "i" in r and not r.get("eof"))
        where = [
            f"{what} agent line {k}: " + describe(lines[k].data, lines[k].label)
            for what, k in (("after", index - 1), ("at", index))
            if 0 <= k < len(lines)
        ]
        return "; ".join(where) or "the end of the lines"

    def _judge_line(self, line: AgentLine, record: Mapping[str, Any]) -> None:
        replies: list[dict[str, Any]] = list(record.get("replies", []))
        shown = describe(line.data, line.label)
        if record.get("eof"):
            return  # the daemon went away: the step reports it
        if record.get("sync") != "ack":
            self.report.add(AGENT, f"the sync after this line was refused: {shown}")
        for reply in replies:
            kind = str(reply.get("type"))
            code = reply.get("code")
            self.report.agent_replies[kind if code is None else f"{kind} {code}"] += 1
            if code == "internal":
                self.report.add(INTERNAL, f"{reply.get('message')}: {shown}")
            if int(reply.get("size", 0)) > MAX_LINE + 1:
                self.report.add(
                    PROTOCOL, f"a {reply.get('size')}-byte line to the agent for {shown}"
                )
        if not replies:
            self.report.agent_replies["no reply"] += 1
            if NONE not in line.refs:
                self.report.add(AGENT, f"no reply: {shown}")
            return
        if len(replies) > 1:
            self.report.add(AGENT, f"{len(replies)} replies: {shown}")
        reply = replies[0]
        ref = reply.get("ref")
        shape = (
            NULL if ref is None else (REF if ref == line.ref and line.ref is not None else "other")
        )
        if shape not in line.refs or str(reply.get("type")) not in line.replies:
            wanted = " or ".join(sorted(line.refs))
            self.report.add(
                AGENT,
                f"expected {'/'.join(sorted(line.replies))} with ref {wanted}, got "
                f"{reply.get('type')} {reply.get('code') or ''} with ref {ref!r:.40} "
                f"({reply.get('message', '')}): {shown}",
            )

    # ----------------------------------------------------------------- the whole mix

    async def run(self) -> None:
        """``frames`` hostile frames in rounds, each round checked; stalled clients,
        hostile agent lines and an agent that reads nothing along the way."""
        settings = self.settings
        per_round = max(1, settings.connections * settings.batch)
        rounds = max(1, -(-settings.frames // per_round))
        specials: list[tuple[int, Callable[[], Awaitable[None]]]] = [
            (rounds // 4, self.slow_clients),
            (rounds // 2, lambda: self.agent_lines(random_agent_lines(self.rng, settings.lines))),
            ((3 * rounds) // 4, self.stuck_agent),
        ]
        sent = 0
        round_no = 0
        while sent < settings.frames and not self.dead:
            size = min(per_round, settings.frames - sent)
            closing = 1 if round_no % settings.closing_every == 0 and size > 1 else 0
            await self.control_batch(random_frames(self.rng, size - closing, self.ids))
            if closing:
                await self.closing(closing_frames(self.rng, closing))
            sent += size
            await self.check()
            while specials and specials[0][0] <= round_no:
                await specials.pop(0)[1]()
                await self.check()
            round_no += 1
            self.report.rounds = round_no
            self.progress(self.report)
        for _, special in specials:
            await special()
            await self.check()


# --------------------------------------------------------------------------- the drill


async def run_fuzz_drill(
    settings: FuzzSettings,
    *,
    database_url: str | None = None,
    scratch: Path | None = None,
    progress: Callable[[FuzzReport], None] | None = None,
) -> FuzzReport:
    """``makima drill --fuzz``: a real daemon on a scratch state directory (its own
    embedded PostgreSQL unless ``database_url``), fuzzed, then stopped with SIGTERM."""
    made = scratch is None
    where = scratch or Path(tempfile.mkdtemp(prefix="mkfuzz-", dir="/tmp"))
    where.mkdir(parents=True, exist_ok=True)
    if os.geteuid() == 0:
        where.chmod(0o711)  # the embedded server's account passes through
    runner = DaemonRunner(
        state_dir=where / "state",
        socket_path=where / "s.sock",
        database_url=database_url,
        log_path=where / "daemon.log",
    )
    fuzzer = Fuzzer(runner, settings, where, progress)
    report = fuzzer.report
    report.scratch = where
    try:
        await runner.start()
        async with fuzzer.session():
            await fuzzer.run()
        status: int | None = None
        if runner.running:
            with contextlib.suppress(TimeoutError):
                status = await runner.terminate()
        report.extra.append(
            Check(
                "the daemon stopped cleanly after the fuzz",
                status == 0,
                f"SIGTERM: exit status {status}" if status is not None else "no exit within 60 s",
            )
        )
    finally:
        if runner.running:
            with anyio.CancelScope(shield=True):
                await runner.kill()
        if not database_url:
            from makima.embedded import EmbeddedPostgres

            with contextlib.suppress(Exception):
                await anyio.to_thread.run_sync(EmbeddedPostgres(runner.state_dir).stop)
    if report.ok and made:
        shutil.rmtree(where, ignore_errors=True)
    return report


if __name__ == "__main__":
    sys.exit(main())

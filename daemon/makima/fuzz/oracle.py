"""The oracle: what must come back for a request (DESIGN §8 and §9 written here
again, on purpose not borrowed from the daemon's own parsers), and values by kind."""

from __future__ import annotations

import enum
import json
import random
import re
import uuid
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import TypeAlias

from makima.control.codec import ErrorCode
from makima.events import EventKind
from makima.fuzz.json_text import has_unstorable, random_string, random_value

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

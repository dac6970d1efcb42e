"""Hostile makima-agent/1 lines and what must come back for each."""

from __future__ import annotations

import itertools
import random
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from types import MappingProxyType

from makima.agent import REF_LIMIT
from makima.control.codec import MAX_LINE
from makima.fuzz.frames import _BAD_JSON, _BAD_UTF8, _MISSING, _insert, _is_id
from makima.fuzz.json_text import (
    NOT_JSON_NUMBERS,
    Members,
    deep,
    dump,
    has_surrogate,
    has_unstorable,
    random_string,
    random_value,
)
from makima.fuzz.oracle import (
    COMMON_WRONG,
    NOT_A_PROGRAM,
    Kind,
    Param,
    Verdict,
    defang_command,
    hostile_value,
    judge,
    near_misses,
    valid_value,
    worst,
)

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
            # A message says something: the daemon refuses an explicit null.
            "content": Param(Kind.ANY, required=True, null=Verdict.WRONG),
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
    if isinstance(ref, str) and len(ref) > REF_LIMIT:  # too long to echo: refused, ref null
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

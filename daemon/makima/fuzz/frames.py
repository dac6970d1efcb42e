"""Hostile makima-control/1 frames, and lines that close the connection."""

from __future__ import annotations

import random
import uuid
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, TypeGuard

from makima.control.codec import MAX_LINE, RequestId
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
    INVALID_PARAMS,
    INVALID_REQUEST,
    METHODS,
    NO_REPLY,
    PARSE_ERROR,
    RESULT,
    Expect,
    Ids,
    _some_uuid,
    expect_call,
    hostile_value,
    near_misses,
    valid_value,
)

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

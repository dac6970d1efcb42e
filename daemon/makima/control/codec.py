"""makima-control/1 on the wire, without I/O (h11 style).

JSON-RPC 2.0, one JSON object per line: UTF-8, ending in ``\\n`` (``\\r\\n``
tolerated), at most :data:`MAX_LINE` bytes before the ``\\n``. Bytes go into a
decoder's :meth:`~LineDecoder.feed`, frames come out; encoders turn plain
JSON values into one line of bytes. Nothing here touches a socket: the server
and the client do the I/O and act on the frames.

What the decoders do with bad input (design §9):

- a line longer than the limit: ``ProtocolError(INVALID_REQUEST, fatal=True)``,
  reported as soon as the unfinished line would pass the limit (nothing more
  is kept); the decoder is then closed and the server closes the connection;
- an unfinished line longer than :data:`SPILL` that would take the decoders
  sharing an :class:`InputBudget` past it: ``ProtocolError(UNAVAILABLE,
  fatal=True)``, likewise (the server gives all its connections one budget);
- a line that is not UTF-8, or not JSON (``NaN`` and ``Infinity`` included):
  ``PARSE_ERROR``, not fatal;
- JSON that is not a proper message: ``INVALID_REQUEST``, not fatal, carrying
  the id when it could be read. Batches (JSON arrays) are not supported and
  get ``INVALID_REQUEST``. An explicit ``"id": null`` is refused too: a request
  without ``id`` is a notification, one with an id expects a reply;
- positional params (a JSON array): ``INVALID_PARAMS``, with the id;
- blank lines are skipped.

Unknown members of a message are ignored.
"""

from __future__ import annotations

import enum
import json
import mmap
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Generic, NoReturn, TypeAlias, TypeGuard, TypeVar

from makima.errors import InvalidValueError, MakimaError
from makima.jsonline import load_json_line, unstorable

MAX_LINE = 1 << 20
"""The longest line, in bytes, not counting its ``\\n`` (a ``\\r`` before it counts)."""
EVENT_METHOD = "event"
"""The method of the notifications that carry the daemon's events."""

RequestId: TypeAlias = str | int


class ErrorCode(enum.IntEnum):
    """JSON-RPC error codes: the standard ones, then makima's application errors."""

    PARSE_ERROR = -32700
    INVALID_REQUEST = -32600
    METHOD_NOT_FOUND = -32601
    INVALID_PARAMS = -32602
    INTERNAL_ERROR = -32603
    NOT_FOUND = -32001
    CONFLICT = -32002
    INVALID_ANSWER = -32003
    FORBIDDEN = -32004
    UNAVAILABLE = -32005


# --- frames ------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Request:
    """A call from a client. ``id`` None: a notification, which gets no reply."""

    id: RequestId | None
    method: str
    params: dict[str, Any]

    @property
    def is_notification(self) -> bool:
        return self.id is None


@dataclass(frozen=True, slots=True)
class ErrorObject:
    """The ``error`` member of a response."""

    code: int
    message: str
    data: Any = None


@dataclass(frozen=True, slots=True)
class Response:
    """The server's answer to one request: ``error`` None means success.

    ``id`` is None only for an error about a request the server could not read.
    """

    id: RequestId | None
    result: Any = None
    error: ErrorObject | None = None


@dataclass(frozen=True, slots=True)
class Notification:
    """A message from the server that answers nothing, e.g. ``event``."""

    method: str
    params: dict[str, Any]


@dataclass(frozen=True, slots=True)
class ProtocolError:
    """A line the decoder refused. ``fatal``: the connection cannot go on.

    The server answers it with ``encode_error(id, code, message)``.
    """

    code: ErrorCode
    message: str
    id: RequestId | None = None
    fatal: bool = False


class DecoderClosedError(MakimaError, RuntimeError):
    """A decoder was fed after a fatal error or after ``feed_eof()``."""


# --- parsing one line --------------------------------------------------------


def _is_int(value: object) -> TypeGuard[int]:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_id(value: object) -> TypeGuard[RequestId]:
    return isinstance(value, str) or _is_int(value)


def _json_type(value: object) -> str:
    """The JSON name of a decoded value's type, for messages."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, int):
        return "an integer"
    if isinstance(value, float):
        return "a number"
    if isinstance(value, str):
        return "a string"
    if isinstance(value, list):
        return "an array"
    return "an object"


def _check_jsonrpc(obj: dict[str, Any]) -> str | None:
    """A message for a missing or wrong ``jsonrpc`` member, or None if it is "2.0"."""
    if "jsonrpc" not in obj:
        return 'jsonrpc is missing; it must be "2.0"'
    if obj["jsonrpc"] != "2.0":
        return f'jsonrpc must be "2.0", got {json.dumps(obj["jsonrpc"])[:40]}'
    return None


def parse_request(line: bytes) -> Request | ProtocolError:
    """One line received by the server (without its newline)."""
    try:
        obj = load_json_line(line)
    except ValueError as exc:
        return ProtocolError(ErrorCode.PARSE_ERROR, str(exc))
    if isinstance(obj, list):
        return ProtocolError(
            ErrorCode.INVALID_REQUEST,
            "batch requests (JSON arrays) are not supported; send one object per line",
        )
    if not isinstance(obj, dict):
        return ProtocolError(
            ErrorCode.INVALID_REQUEST, f"a request must be a JSON object, got {_json_type(obj)}"
        )
    request_id: RequestId | None = None
    if "id" in obj:
        raw_id = obj["id"]
        if not _is_id(raw_id):
            return ProtocolError(
                ErrorCode.INVALID_REQUEST,
                f"id must be a string or an integer, got {_json_type(raw_id)}"
                " (leave it out for a notification)",
            )
        request_id = raw_id
    if (problem := _check_jsonrpc(obj)) is not None:
        return ProtocolError(ErrorCode.INVALID_REQUEST, problem, request_id)
    method = obj.get("method")
    if not isinstance(method, str):
        got = "missing" if "method" not in obj else f"{_json_type(method)}"
        return ProtocolError(
            ErrorCode.INVALID_REQUEST, f"method must be a string, got {got}", request_id
        )
    if "params" not in obj:
        return Request(request_id, method, {})
    params = obj["params"]
    if isinstance(params, dict):
        if (problem := unstorable(params)) is not None:
            return ProtocolError(ErrorCode.INVALID_PARAMS, f"params: {problem}", request_id)
        return Request(request_id, method, params)
    if isinstance(params, list):
        return ProtocolError(
            ErrorCode.INVALID_PARAMS,
            "params must be an object of named parameters;"
            " positional params (a JSON array) are not supported",
            request_id,
        )
    return ProtocolError(
        ErrorCode.INVALID_REQUEST,
        f"params must be an object, got {_json_type(params)}",
        request_id,
    )


def parse_server_message(line: bytes) -> Response | Notification | ProtocolError:
    """One line received by the client (without its newline)."""
    try:
        obj = load_json_line(line)
    except ValueError as exc:
        return ProtocolError(ErrorCode.PARSE_ERROR, str(exc))
    if not isinstance(obj, dict):
        return ProtocolError(
            ErrorCode.INVALID_REQUEST,
            f"a message from the server must be a JSON object, got {_json_type(obj)}",
        )
    if (problem := _check_jsonrpc(obj)) is not None:
        return ProtocolError(ErrorCode.INVALID_REQUEST, problem)
    if "method" in obj:
        return _parse_notification(obj)
    if "id" not in obj:
        return ProtocolError(
            ErrorCode.INVALID_REQUEST, "a response must have an id, or a notification a method"
        )
    raw_id = obj["id"]
    if raw_id is not None and not _is_id(raw_id):
        return ProtocolError(
            ErrorCode.INVALID_REQUEST,
            f"a response id must be a string, an integer or null, got {_json_type(raw_id)}",
        )
    if ("result" in obj) == ("error" in obj):
        return ProtocolError(
            ErrorCode.INVALID_REQUEST,
            "a response must have exactly one of result and error",
            raw_id,
        )
    if "result" in obj:
        if raw_id is None:
            return ProtocolError(
                ErrorCode.INVALID_REQUEST, "a result must carry the request's id, got null"
            )
        return Response(raw_id, result=obj["result"])
    error = obj["error"]
    if not isinstance(error, dict):
        return ProtocolError(
            ErrorCode.INVALID_REQUEST,
            f"a response's error must be an object, got {_json_type(error)}",
            raw_id,
        )
    code, message = error.get("code"), error.get("message")
    if not _is_int(code) or not isinstance(message, str):
        return ProtocolError(
            ErrorCode.INVALID_REQUEST,
            "a response's error must have an integer code and a string message",
            raw_id,
        )
    return Response(raw_id, error=ErrorObject(code, message, error.get("data")))


def _parse_notification(obj: dict[str, Any]) -> Notification | ProtocolError:
    method = obj["method"]
    if not isinstance(method, str):
        return ProtocolError(
            ErrorCode.INVALID_REQUEST, f"method must be a string, got {_json_type(method)}"
        )
    if "id" in obj:
        return ProtocolError(
            ErrorCode.INVALID_REQUEST,
            f"the server sent a request ({method!r}); clients take no requests",
        )
    params = obj.get("params", {})
    if not isinstance(params, dict):
        return ProtocolError(
            ErrorCode.INVALID_REQUEST,
            f"notification params must be an object, got {_json_type(params)}",
        )
    return Notification(method, params)


# --- line framing ------------------------------------------------------------

SPILL = 16 * 1024
"""Bytes of an unfinished line a decoder keeps in an ordinary buffer.

A longer unfinished line moves to memory mapped for it alone (anonymous
``mmap``), given back to the operating system the moment the line ends or the
decoder closes, and drawn from the decoder's :class:`InputBudget`, if any.
"""


class InputBudget:
    """Bytes of long unfinished lines that the decoders sharing it may hold together.

    A decoder draws on it for an unfinished line once the line passes
    :data:`SPILL` bytes (for the whole line from then on), and gives it all back
    when the line ends or the decoder closes. A line that would take the total
    past ``limit`` is refused with a fatal ``UNAVAILABLE`` :class:`ProtocolError`.
    """

    def __init__(self, limit: int) -> None:
        if limit < 0:
            raise InvalidValueError(f"an input budget must be at least 0 bytes, got {limit}")
        self.limit = limit
        self.used = 0

    def take(self, size: int) -> bool:
        """Draw ``size`` bytes; False, and nothing drawn, if they do not fit."""
        if self.used + size > self.limit:
            return False
        self.used += size
        return True

    def give(self, size: int) -> None:
        if size > self.used:
            raise RuntimeError(f"gave back {size} bytes of an input budget with {self.used} used")
        self.used -= size


class _UnfinishedLine:
    """The bytes received of a line whose newline has not come yet (never a newline).

    Up to :data:`SPILL` bytes live in a bytearray; a longer line lives in an
    anonymous mmap of ``capacity`` bytes (only the pages written take memory),
    unmapped as soon as the line is taken or cleared. Copying each piece in,
    rather than keeping the received chunks, keeps nothing of the caller's
    buffers, and costs no per-chunk overhead when a peer sends a byte at a time.
    """

    __slots__ = ("_budget", "_capacity", "_head", "_spill", "charged", "size")

    def __init__(self, capacity: int, budget: InputBudget | None) -> None:
        self._capacity = capacity
        self._budget = budget
        self._head = bytearray()
        self._spill: mmap.mmap | None = None
        self.size = 0
        self.charged = 0  # bytes drawn from the budget

    def add(self, piece: memoryview) -> bool:
        """Keep ``piece`` (the caller checked the capacity); False if the budget
        refuses it, and then nothing was added."""
        size = self.size + len(piece)
        if self._spill is None and size <= SPILL:
            self._head += piece
            self.size = size
            return True
        if self._budget is not None:
            if not self._budget.take(size - self.charged):
                return False
            self.charged = size
        if self._spill is None:
            self._spill = mmap.mmap(-1, self._capacity)
            self._spill[: self.size] = self._head
            self._head = bytearray()
        self._spill[self.size : size] = piece
        self.size = size
        return True

    def take(self, tail: memoryview) -> bytes:
        """What is held followed by ``tail``, as one line; this is then empty."""
        if self._spill is None:
            line = b"".join((self._head, tail)) if self.size else bytes(tail)
        else:
            held = memoryview(self._spill)
            try:
                line = b"".join((held[: self.size], tail))
            finally:
                held.release()
        self.clear()
        return line

    def clear(self) -> None:
        """Drop what is held; give the mapped memory and the budget back."""
        if self._spill is not None:
            self._spill.close()
            self._spill = None
        if self.size:
            self._head = bytearray()
            self.size = 0
        if self.charged:
            assert self._budget is not None
            self._budget.give(self.charged)
            self.charged = 0


FrameT = TypeVar("FrameT")


class BaseLineDecoder(Generic[FrameT]):
    """Bytes in, frames out: the framing both sides share.

    Use :class:`LineDecoder` (the server's side) or :class:`ClientDecoder`.

    ``feed`` returns the frames of every complete line, in order. It keeps at
    most ``max_line`` bytes of an unfinished line, none of the bytes it is given,
    and draws on ``budget`` for an unfinished line longer than :data:`SPILL`.
    After a fatal :class:`ProtocolError` (a line over ``max_line``, or over the
    budget), after :meth:`feed_eof` or after :meth:`close`, the decoder is
    closed, holds nothing, and feeding it raises :class:`DecoderClosedError`.
    """

    def __init__(self, *, max_line: int = MAX_LINE, budget: InputBudget | None = None) -> None:
        if max_line < 1:
            raise InvalidValueError(f"max_line must be at least 1, got {max_line}")
        self.max_line = max_line
        self.budget = budget
        self._line = _UnfinishedLine(max_line, budget)
        self._closed = False

    @property
    def closed(self) -> bool:
        return self._closed

    @property
    def pending(self) -> int:
        """Bytes held while waiting for a newline (never more than ``max_line``)."""
        return self._line.size

    def feed(self, data: bytes | bytearray) -> list[FrameT | ProtocolError]:
        self._check_open()
        frames: list[FrameT | ProtocolError] = []
        view = memoryview(data)
        start = 0
        while True:
            newline = data.find(b"\n", start)
            end = len(data) if newline < 0 else newline
            if self._line.size + end - start > self.max_line:
                frames.append(self._too_long())
                return frames
            if newline < 0:
                if start < end and not self._line.add(view[start:]):
                    frames.append(self._over_budget(self._line.size + end - start))
                return frames
            line = self._line.take(view[start:newline])
            start = newline + 1
            frame = self._parse_line(line)
            if frame is not None:
                frames.append(frame)

    def feed_eof(self) -> list[FrameT | ProtocolError]:
        """The peer closed its side: parse a last line left without a newline, then close."""
        self._check_open()
        line = self._line.take(memoryview(b""))
        self.close()
        frame = self._parse_line(line)
        return [] if frame is None else [frame]

    def close(self) -> None:
        """Drop any unfinished line, giving its memory and budget back; idempotent.

        Whoever reads a connection calls this when the connection ends, however
        it ends: an unfinished line's share of the budget is not given back before.
        """
        self._closed = True
        self._line.clear()

    def _check_open(self) -> None:
        if self._closed:
            raise DecoderClosedError(
                "this decoder is closed (after a fatal protocol error or end of input)"
            )

    def _too_long(self) -> ProtocolError:
        self.close()
        return ProtocolError(
            ErrorCode.INVALID_REQUEST,
            f"line longer than {self.max_line} bytes; closing the connection",
            fatal=True,
        )

    def _over_budget(self, size: int) -> ProtocolError:
        assert self.budget is not None
        self.close()  # what this line held is given back before the numbers are read
        return ProtocolError(
            ErrorCode.UNAVAILABLE,
            f"too much unfinished input: this line's first {size} bytes and the"
            f" {self.budget.used} bytes of long unfinished lines held for other connections"
            f" would pass the limit of {self.budget.limit} bytes for them all;"
            " closing the connection, try again later",
            fatal=True,
        )

    def _parse_line(self, line: bytes) -> FrameT | ProtocolError | None:
        if line.endswith(b"\r"):
            line = line[:-1]
        if not line.strip():
            return None
        return self._parse(line)

    def _parse(self, line: bytes) -> FrameT | ProtocolError:
        raise NotImplementedError


class LineDecoder(BaseLineDecoder[Request]):
    """The server's side: lines become :class:`Request` frames."""

    def _parse(self, line: bytes) -> Request | ProtocolError:
        return parse_request(line)


class ClientDecoder(BaseLineDecoder[Response | Notification]):
    """The client's side: lines become :class:`Response` or :class:`Notification` frames."""

    def _parse(self, line: bytes) -> Response | Notification | ProtocolError:
        return parse_server_message(line)


# --- encoding ----------------------------------------------------------------


def _refuse(value: object) -> NoReturn:
    raise TypeError(
        f"cannot encode {type(value).__name__} {value!r:.60} as JSON; pass plain JSON values"
        " (a str for a UUID, an ISO 8601 str for a datetime)"
    )


def _line(message: dict[str, Any]) -> bytes:
    """One compact JSON line. TypeError on a non-JSON value, ValueError on NaN/Infinity."""
    text = json.dumps(
        message, ensure_ascii=False, separators=(",", ":"), allow_nan=False, default=_refuse
    )
    try:
        data = text.encode("utf-8")
    except UnicodeEncodeError:  # a lone surrogate, e.g. echoed from a peer's "\ud800"
        data = json.dumps(
            message, ensure_ascii=True, separators=(",", ":"), allow_nan=False, default=_refuse
        ).encode("ascii")
    return data + b"\n"


def _checked_id(request_id: object, *, null: bool = False) -> RequestId | None:
    if request_id is None and null:
        return None
    if not _is_id(request_id):
        raise TypeError(f"a request id must be a str or an int, got {type(request_id).__name__}")
    return request_id


def _checked_method(method: object) -> str:
    if not isinstance(method, str):
        raise TypeError(f"a method must be a str, got {type(method).__name__}")
    return method


def _checked_params(params: object) -> dict[str, Any]:
    if not isinstance(params, Mapping):
        raise TypeError(f"params must be a mapping, got {type(params).__name__}")
    return dict(params)


def encode_request(
    request_id: RequestId, method: str, params: Mapping[str, Any] | None = None
) -> bytes:
    """A call expecting a reply; ``params`` None leaves the member out."""
    message: dict[str, Any] = {
        "jsonrpc": "2.0",
        "id": _checked_id(request_id),
        "method": _checked_method(method),
    }
    if params is not None:
        message["params"] = _checked_params(params)
    return _line(message)


def encode_notification(method: str, params: Mapping[str, Any]) -> bytes:
    """A message without id, e.g. ``encode_notification(EVENT_METHOD, {"kind": …})``."""
    return _line(
        {"jsonrpc": "2.0", "method": _checked_method(method), "params": _checked_params(params)}
    )


def encode_result(request_id: RequestId, result: Any) -> bytes:
    return _line({"jsonrpc": "2.0", "id": _checked_id(request_id), "result": result})


def encode_error(request_id: RequestId | None, code: int, message: str, data: Any = None) -> bytes:
    """An error reply; ``request_id`` None when the request's id could not be read.

    ``data`` None leaves the member out.
    """
    error: dict[str, Any] = {"code": int(code), "message": message}
    if data is not None:
        error["data"] = data
    return _line({"jsonrpc": "2.0", "id": _checked_id(request_id, null=True), "error": error})

"""A fake Anthropic Messages API for running the real Claude Code binary in tests.

It listens on 127.0.0.1 on an ephemeral port, inside the test's own event loop
(anyio), and plays a *script* of model turns kept as data::

    script = [
        Turn(Text("Let me ask."), ToolUse("mcp__makima__ask_user", {"question": "Which?"})),
        Turn(Text("Done.")),
    ]
    async with FakeAnthropic(script) as api:
        env = api.env()          # ANTHROPIC_BASE_URL, ANTHROPIC_API_KEY, ...
        ...
        request = await api.wait_for_main(2)   # the 2nd main-conversation request
        assert tool_results(request)[0]["tool_use_id"] == api.tool_use_ids()[0]

Every request is recorded (:attr:`FakeAnthropic.requests`). Only requests of the
*main conversation* consume the script; Claude Code's side calls (see
:func:`is_side_call`) get a harmless canned reply. Because the server runs on the
test's loop, the test must not block that loop (use ``anyio.run_process`` or
``anyio.to_thread`` for blocking work).
"""

from __future__ import annotations

import gzip
import itertools
import json
import math
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from types import TracebackType
from typing import Any, Self

import anyio
import anyio.abc
from anyio.streams.buffered import BufferedByteReceiveStream

JSON = dict[str, Any]

MODEL = "claude-sonnet-4-5"


# ---------------------------------------------------------------- the script


@dataclass(frozen=True)
class Text:
    """A text block of a model turn."""

    text: str


@dataclass(frozen=True)
class ToolUse:
    """A tool_use block; ``id`` is generated (``toolu_fake_N``) unless given."""

    name: str
    input: JSON = field(default_factory=dict)
    id: str | None = None


Block = Text | ToolUse


@dataclass(frozen=True)
class Turn:
    """One model reply. Its stop_reason is ``tool_use`` when it holds a tool_use."""

    blocks: tuple[Block, ...]

    def __init__(self, *blocks: Block) -> None:
        object.__setattr__(self, "blocks", tuple(blocks))

    @property
    def stop_reason(self) -> str:
        return "tool_use" if any(isinstance(b, ToolUse) for b in self.blocks) else "end_turn"


@dataclass(frozen=True)
class ApiError:
    """An HTTP error reply with an Anthropic-style body.

    ``forever=True`` keeps it at the head of the script: every later main request
    gets it too. ``headers`` are added to the response (e.g. ``retry-after``).
    """

    status: int
    type: str
    message: str
    forever: bool = False
    headers: tuple[tuple[str, str], ...] = ()

    def body(self) -> JSON:
        return {"type": "error", "error": {"type": self.type, "message": self.message}}


def authentication_error(*, forever: bool = True) -> ApiError:
    return ApiError(401, "authentication_error", "invalid x-api-key", forever=forever)


def rate_limit_error(*, forever: bool = True) -> ApiError:
    return ApiError(
        429,
        "rate_limit_error",
        "Number of request tokens has exceeded your per-minute rate limit",
        forever=forever,
        headers=(("retry-after", "0"),),
    )


def overloaded_error(*, forever: bool = True) -> ApiError:
    return ApiError(529, "overloaded_error", "Overloaded", forever=forever)


Step = Turn | ApiError

CANNED_SIDE_REPLY = Turn(Text("OK"))
EXHAUSTED_REPLY = Turn(Text("(fake model: script exhausted)"))


# ------------------------------------------------------------ the recordings


@dataclass
class Request:
    """One request as received."""

    index: int  # position among all requests
    method: str
    path: str  # without the query string
    query: str
    headers: dict[str, str]  # lower-cased names
    body: JSON | None
    main: bool = False  # part of the main conversation (consumed the script)
    main_index: int | None = None  # 1-based position among main requests
    reply: Step | None = None  # what it got (None: count_tokens and others)
    at: float = 0.0  # anyio.current_time() on arrival

    @property
    def messages(self) -> list[JSON]:
        return list((self.body or {}).get("messages") or [])

    @property
    def model(self) -> str | None:
        return (self.body or {}).get("model")


def _blocks(message: JSON) -> list[JSON]:
    content = message.get("content")
    if isinstance(content, str):
        return [{"type": "text", "text": content}]
    return [b for b in content or [] if isinstance(b, dict)]


def tool_results(request: Request, tool_use_id: str | None = None) -> list[JSON]:
    """Every tool_result block in the request's messages (optionally of one tool_use)."""
    found = [
        block
        for message in request.messages
        if message.get("role") == "user"
        for block in _blocks(message)
        if block.get("type") == "tool_result"
    ]
    if tool_use_id is not None:
        found = [b for b in found if b.get("tool_use_id") == tool_use_id]
    return found


def tool_result_text(block: JSON) -> str:
    """A tool_result's content as one string (its content is a string or text blocks)."""
    content = block.get("content")
    if isinstance(content, str):
        return content
    return "".join(
        b.get("text", "") for b in content or [] if isinstance(b, dict) and b.get("type") == "text"
    )


def user_texts(request: Request) -> list[str]:
    """The text blocks of the request's user messages, in order.

    Claude Code adds its own user-role text (``<system-reminder>`` blocks); they
    are included, so match with ``in`` rather than ``==``.
    """
    return [
        block.get("text", "")
        for message in request.messages
        if message.get("role") == "user"
        for block in _blocks(message)
        if block.get("type") == "text"
    ]


def last_user_texts(request: Request) -> list[str]:
    """The text blocks of the request's last user message only."""
    users = [m for m in request.messages if m.get("role") == "user"]
    if not users:
        return []
    return [b.get("text", "") for b in _blocks(users[-1]) if b.get("type") == "text"]


def system_text(request: Request) -> str:
    system = (request.body or {}).get("system")
    if isinstance(system, str):
        return system
    return "\n".join(b.get("text", "") for b in system or [] if isinstance(b, dict))


def is_side_call(body: JSON | None) -> bool:
    """True for a request that is not a turn of the main conversation.

    Claude Code 2.1.x sends its main turns with the agent's tool list and streaming;
    its side calls carry no ``tools``, or are not streamed, or ask for structured
    output (the session title generator sets ``output_config.format``; it is sent
    only without ``CLAUDE_CODE_DISABLE_NONESSENTIAL_TRAFFIC``), or (a quota check)
    have ``max_tokens`` 1. A main request always lists tools unless the agent was
    started with no tools at all.
    """
    if not body:
        return True
    if not body.get("stream") or not body.get("tools"):
        return True
    if (body.get("output_config") or {}).get("format"):
        return True  # structured output: the title generator
    return int(body.get("max_tokens") or 0) <= 1


# ------------------------------------------------------------------ the server


class FakeAnthropic:
    """The fake API. Use as ``async with FakeAnthropic(script) as api``."""

    def __init__(self, script: Iterable[Step] = (), *, model: str = MODEL) -> None:
        self.script: list[Step] = list(script)
        self.model = model
        self.requests: list[Request] = []
        self.port = 0
        self._ids = itertools.count(1)
        self._tool_use_ids: list[str] = []
        self._changed = anyio.Event()
        self._tg: anyio.abc.TaskGroup | None = None
        self._listener: anyio.abc.Listener[anyio.abc.SocketStream] | None = None

    # ---------------------------------------------------------------- control

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def env(self, **extra: str) -> dict[str, str]:
        """The environment Claude Code needs to talk to this fake."""
        return {
            "ANTHROPIC_BASE_URL": self.url,
            "ANTHROPIC_API_KEY": "sk-ant-fake-key",
            "CLAUDE_CODE_DISABLE_NONESSENTIAL_TRAFFIC": "1",
            **extra,
        }

    def add(self, *steps: Step) -> None:
        """Append steps to the script (e.g. once a test knows what comes next)."""
        self.script.extend(steps)

    @property
    def main_requests(self) -> list[Request]:
        return [r for r in self.requests if r.main]

    def tool_use_ids(self) -> list[str]:
        """The ids of the tool_use blocks sent so far, in order."""
        return list(self._tool_use_ids)

    async def wait_for_main(self, n: int) -> Request:
        """Wait until the n-th (1-based) main-conversation request has arrived."""
        while len(self.main_requests) < n:
            await self._changed.wait()
        return self.main_requests[n - 1]

    async def wait_for(self, predicate: Callable[[Request], bool]) -> Request:
        """Wait until some recorded request satisfies ``predicate(request)``."""
        seen = 0
        while True:
            for request in self.requests[seen:]:
                if predicate(request):
                    return request
            seen = len(self.requests)
            await self._changed.wait()

    async def __aenter__(self) -> Self:
        listener = await anyio.create_tcp_listener(local_host="127.0.0.1", local_port=0)
        self.port = listener.extra(anyio.abc.SocketAttribute.local_port)
        self._listener = listener
        self._tg = anyio.create_task_group()
        await self._tg.__aenter__()
        self._tg.start_soon(listener.serve, self._serve)
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> bool | None:
        assert self._tg is not None and self._listener is not None
        self._tg.cancel_scope.cancel()
        try:
            return await self._tg.__aexit__(exc_type, exc, tb)
        finally:
            await self._listener.aclose()

    # ------------------------------------------------------------------ HTTP

    async def _serve(self, stream: anyio.abc.SocketStream) -> None:
        reader = BufferedByteReceiveStream(stream)
        async with stream:
            try:
                while True:
                    head = await reader.receive_until(b"\r\n\r\n", 1 << 20)
                    lines = head.decode("latin-1").split("\r\n")
                    method, target, _ = lines[0].split(" ", 2)
                    headers = {}
                    for line in lines[1:]:
                        name, _, value = line.partition(":")
                        headers[name.strip().lower()] = value.strip()
                    raw = await self._read_body(reader, headers)
                    status, reply_headers, payload = self._handle(method, target, headers, raw)
                    await stream.send(self._response(status, reply_headers, payload, method))
                    if headers.get("connection", "").lower() == "close":
                        return
            except (anyio.EndOfStream, anyio.IncompleteRead, anyio.BrokenResourceError, OSError):
                return  # the client went away (Claude Code killed mid-request, say)

    @staticmethod
    async def _read_body(reader: BufferedByteReceiveStream, headers: dict[str, str]) -> bytes:
        if "chunked" in headers.get("transfer-encoding", "").lower():
            chunks: list[bytes] = []
            while True:
                size = int((await reader.receive_until(b"\r\n", 1024)).split(b";")[0], 16)
                chunk = await reader.receive_exactly(size + 2)
                if size == 0:
                    # trailers are not expected; the chunk read the final CRLF
                    return b"".join(chunks)
                chunks.append(chunk[:-2])
        length = int(headers.get("content-length") or 0)
        body = await reader.receive_exactly(length) if length else b""
        if headers.get("content-encoding", "").lower() == "gzip":  # CLAUDE_CODE_GZIP_REQUEST_BODIES
            body = gzip.decompress(body)
        return body

    @staticmethod
    def _response(
        status: int, headers: Sequence[tuple[str, str]], payload: bytes, method: str
    ) -> bytes:
        reason = {200: "OK", 401: "Unauthorized", 404: "Not Found", 429: "Too Many Requests"}
        lines = [f"HTTP/1.1 {status} {reason.get(status, 'Error')}"]
        lines += [f"{k}: {v}" for k, v in headers]
        lines += [f"content-length: {len(payload)}", "connection: keep-alive", "", ""]
        return "\r\n".join(lines).encode("latin-1") + (b"" if method == "HEAD" else payload)

    def _handle(
        self, method: str, target: str, headers: dict[str, str], raw: bytes
    ) -> tuple[int, list[tuple[str, str]], bytes]:
        path, _, query = target.partition("?")
        try:
            body = json.loads(raw) if raw else None
        except ValueError:
            body = None
        request = Request(
            len(self.requests), method, path, query, headers, body, at=anyio.current_time()
        )
        self.requests.append(request)
        try:
            return self._route(request)
        finally:
            self._changed.set()
            self._changed = anyio.Event()

    def _route(self, request: Request) -> tuple[int, list[tuple[str, str]], bytes]:
        if request.method == "HEAD":
            return 200, [], b""  # connectivity probe (HEAD /api/hello); no body
        if request.method == "POST" and request.path == "/v1/messages/count_tokens":
            tokens = math.ceil(len(json.dumps(request.body or {})) / 4)
            return _json(200, {"input_tokens": tokens})
        if request.method != "POST" or request.path != "/v1/messages":
            return _json(
                404,
                {"type": "error", "error": {"type": "not_found_error", "message": "not found"}},
            )
        body = request.body or {}
        if is_side_call(body):
            step: Step = _side_reply(body)
        else:
            request.main = True
            request.main_index = len(self.main_requests)
            step = self._next_step()
        request.reply = step
        if isinstance(step, ApiError):
            status, headers, payload = _json(step.status, step.body())
            return status, [*headers, ("request-id", "req_fake"), *step.headers], payload
        model = str(body.get("model") or self.model)
        if body.get("stream"):
            return 200, [("content-type", "text/event-stream")], self._sse(step, model)
        return _json(200, self._message(step, model))

    def _next_step(self) -> Step:
        if not self.script:
            return EXHAUSTED_REPLY
        step = self.script[0]
        if not (isinstance(step, ApiError) and step.forever):
            self.script.pop(0)
        return step

    def _content(self, turn: Turn) -> list[JSON]:
        content: list[JSON] = []
        for block in turn.blocks:
            if isinstance(block, Text):
                content.append({"type": "text", "text": block.text})
            else:
                tool_id = block.id or f"toolu_fake_{next(self._ids)}"
                self._tool_use_ids.append(tool_id)
                content.append(
                    {"type": "tool_use", "id": tool_id, "name": block.name, "input": block.input}
                )
        return content

    def _message(self, turn: Turn, model: str) -> JSON:
        content = self._content(turn)
        return {
            "id": f"msg_fake_{next(self._ids)}",
            "type": "message",
            "role": "assistant",
            "model": model,
            "content": content,
            "stop_reason": turn.stop_reason,
            "stop_sequence": None,
            "usage": _usage(output=_output_tokens(content)),
        }

    def _sse(self, turn: Turn, model: str) -> bytes:
        message = self._message(turn, model)
        events: list[tuple[str, JSON]] = [
            (
                "message_start",
                {
                    "type": "message_start",
                    "message": {
                        **message,
                        "content": [],
                        "stop_reason": None,
                        "usage": _usage(output=1),
                    },
                },
            )
        ]
        for index, block in enumerate(message["content"]):
            start: JSON
            delta: JSON
            if block["type"] == "text":
                start = {"type": "text", "text": ""}
                delta = {"type": "text_delta", "text": block["text"]}
            else:
                start = {**block, "input": {}}
                delta = {"type": "input_json_delta", "partial_json": json.dumps(block["input"])}
            events += [
                ("content_block_start", {"type": "content_block_start", "index": index,
                                         "content_block": start}),
                ("content_block_delta", {"type": "content_block_delta", "index": index,
                                         "delta": delta}),
                ("content_block_stop", {"type": "content_block_stop", "index": index}),
            ]  # fmt: skip
        events += [
            (
                "message_delta",
                {
                    "type": "message_delta",
                    "delta": {"stop_reason": message["stop_reason"], "stop_sequence": None},
                    "usage": {"output_tokens": message["usage"]["output_tokens"]},
                },
            ),
            ("message_stop", {"type": "message_stop"}),
        ]
        return "".join(
            f"event: {name}\ndata: {json.dumps(data)}\n\n" for name, data in events
        ).encode()


def _side_reply(body: JSON) -> Turn:
    """A canned reply; for structured output, a JSON object of its string fields."""
    schema = ((body.get("output_config") or {}).get("format") or {}).get("schema") or {}
    if schema.get("type") == "object":
        fields = {name: "Fake" for name in schema.get("required") or []}
        return Turn(Text(json.dumps(fields)))
    return CANNED_SIDE_REPLY


def _output_tokens(content: list[JSON]) -> int:
    return max(1, math.ceil(len(json.dumps(content)) / 4))


def _usage(*, output: int) -> JSON:
    return {
        "input_tokens": 100,
        "cache_creation_input_tokens": 0,
        "cache_read_input_tokens": 0,
        "output_tokens": output,
    }


def _json(status: int, body: JSON) -> tuple[int, list[tuple[str, str]], bytes]:
    return status, [("content-type", "application/json")], json.dumps(body).encode()

"""makima-control/1 codec: bytes in, frames out; frames in, bytes out. No sockets."""

from __future__ import annotations

import json
import uuid
from datetime import UTC, datetime
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from makima.control.codec import (
    MAX_LINE,
    SPILL,
    ClientDecoder,
    DecoderClosedError,
    ErrorCode,
    ErrorObject,
    InputBudget,
    LineDecoder,
    Notification,
    ProtocolError,
    Request,
    Response,
    encode_error,
    encode_notification,
    encode_request,
    encode_result,
    parse_request,
    parse_server_message,
)
from makima.errors import InvalidValueError

PING = b'{"jsonrpc":"2.0","id":1,"method":"daemon.hello"}\n'


def line(obj: Any) -> bytes:
    return json.dumps(obj).encode() + b"\n"


def padded_request(size: int) -> bytes:
    """A valid request line of exactly ``size`` bytes before its newline."""
    head = b'{"jsonrpc":"2.0","id":7,"method":"m","params":{"pad":"'
    tail = b'"}}'
    body = head + b"a" * (size - len(head) - len(tail)) + tail
    assert len(body) == size
    return body + b"\n"


def test_error_codes() -> None:
    assert {code.name: int(code) for code in ErrorCode} == {
        "PARSE_ERROR": -32700,
        "INVALID_REQUEST": -32600,
        "METHOD_NOT_FOUND": -32601,
        "INVALID_PARAMS": -32602,
        "INTERNAL_ERROR": -32603,
        "NOT_FOUND": -32001,
        "CONFLICT": -32002,
        "INVALID_ANSWER": -32003,
        "FORBIDDEN": -32004,
        "UNAVAILABLE": -32005,
    }
    assert MAX_LINE == 1 << 20


# --- server side: requests ----------------------------------------------------


def test_one_request() -> None:
    frames = LineDecoder().feed(
        b'{"jsonrpc":"2.0","id":"a","method":"question.answer",'
        b'"params":{"question_id":"q","answer":"yes"}}\n'
    )
    assert frames == [
        Request("a", "question.answer", {"question_id": "q", "answer": "yes"}),
    ]


def test_missing_params_are_an_empty_object() -> None:
    assert LineDecoder().feed(PING) == [Request(1, "daemon.hello", {})]


def test_notification_has_no_id() -> None:
    (frame,) = LineDecoder().feed(b'{"jsonrpc":"2.0","method":"x","params":{"a":1}}\n')
    assert frame == Request(None, "x", {"a": 1})
    assert isinstance(frame, Request)
    assert frame.is_notification


def test_request_split_across_feeds() -> None:
    decoder = LineDecoder()
    assert decoder.feed(PING[:10]) == []
    assert decoder.pending == 10
    assert decoder.feed(PING[10:-1]) == []
    assert decoder.feed(PING[-1:]) == [Request(1, "daemon.hello", {})]
    assert decoder.pending == 0


def test_several_requests_in_one_feed() -> None:
    data = b"".join(line({"jsonrpc": "2.0", "id": i, "method": f"m{i}"}) for i in range(3))
    assert LineDecoder().feed(data + b'{"jsonrpc"') == [
        Request(0, "m0", {}),
        Request(1, "m1", {}),
        Request(2, "m2", {}),
    ]


def test_empty_lines_skipped_and_crlf_tolerated() -> None:
    frames = LineDecoder().feed(b"\n\r\n   \n" + PING[:-1] + b"\r\n\n")
    assert frames == [Request(1, "daemon.hello", {})]


def test_line_of_exactly_max_line_is_accepted() -> None:
    frames = LineDecoder().feed(padded_request(MAX_LINE))
    assert len(frames) == 1
    assert isinstance(frames[0], Request)
    assert frames[0].id == 7


def test_max_line_without_newline_waits() -> None:
    decoder = LineDecoder()
    data = padded_request(MAX_LINE)
    assert decoder.feed(data[:-1]) == []
    assert decoder.pending == MAX_LINE
    (frame,) = decoder.feed(b"\n")
    assert isinstance(frame, Request)
    assert frame == Request(7, "m", json.loads(data)["params"])


def test_line_of_max_line_plus_one_is_fatal() -> None:
    decoder = LineDecoder()
    frames = decoder.feed(PING + padded_request(MAX_LINE + 1) + PING)
    assert frames[0] == Request(1, "daemon.hello", {})
    assert frames[1] == ProtocolError(
        ErrorCode.INVALID_REQUEST,
        f"line longer than {MAX_LINE} bytes; closing the connection",
        None,
        fatal=True,
    )
    assert len(frames) == 2  # nothing after the fatal error
    assert decoder.closed
    assert decoder.pending == 0
    with pytest.raises(DecoderClosedError):
        decoder.feed(PING)


def test_too_long_is_detected_before_the_newline() -> None:
    decoder = LineDecoder()
    assert decoder.feed(b"x" * MAX_LINE) == []
    (error,) = decoder.feed(b"x")  # one byte over the limit, no newline yet
    assert isinstance(error, ProtocolError)
    assert error.fatal
    assert error.code is ErrorCode.INVALID_REQUEST
    assert decoder.pending == 0  # nothing more buffered


def test_small_limit() -> None:
    decoder = LineDecoder(max_line=4)
    assert decoder.feed(b"1234\n") != []  # four bytes: parsed (not an object: refused)
    (error,) = decoder.feed(b"12345")
    assert isinstance(error, ProtocolError)
    assert error.fatal
    with pytest.raises(InvalidValueError):
        LineDecoder(max_line=0)


def test_crlf_counts_towards_the_limit() -> None:
    # the limit is on the bytes before "\n"; a "\r" there counts
    decoder = LineDecoder(max_line=3)
    assert decoder.feed(b"  \r\n") == []
    (error,) = decoder.feed(b"   \r\n")
    assert isinstance(error, ProtocolError)
    assert error.fatal


def test_invalid_utf8_is_a_parse_error_and_the_connection_goes_on() -> None:
    decoder = LineDecoder()
    frames = decoder.feed(b'{"jsonrpc":"2.0","id":1,"method":"\xff\xfe"}\n' + PING)
    assert frames[0] == ProtocolError(
        ErrorCode.PARSE_ERROR, "line is not valid UTF-8 (byte 0xff at offset 34)"
    )
    assert frames[1] == Request(1, "daemon.hello", {})
    assert not decoder.closed


def test_bad_json_then_a_good_request() -> None:
    decoder = LineDecoder()
    (error,) = decoder.feed(b'{"jsonrpc": "2.0", "id": 1,\n')
    assert isinstance(error, ProtocolError)
    assert error.code is ErrorCode.PARSE_ERROR
    assert error.id is None
    assert not error.fatal
    assert error.message.startswith("invalid JSON: ")
    assert decoder.feed(PING) == [Request(1, "daemon.hello", {})]


@pytest.mark.parametrize(
    "data",
    [
        b"NaN\n",
        b'{"jsonrpc":"2.0","id":1,"method":"m","params":{"x":Infinity}}\n',
        b'{"jsonrpc":"2.0","id":1,"method":"m","params":{"x":1e999}}\n',
        b"[" * 100_000 + b"\n",
        b"1" * 5000 + b"\n",
        b"\xef\xbb\xbf" + PING,  # a BOM
        b"{'single': 'quotes'}\n",
    ],
    ids=["nan", "infinity", "overflow", "deep", "digits", "bom", "quotes"],
)
def test_not_json(data: bytes) -> None:
    (error,) = LineDecoder().feed(data)
    assert isinstance(error, ProtocolError)
    assert error.code is ErrorCode.PARSE_ERROR
    assert not error.fatal


@pytest.mark.parametrize(
    ("data", "message"),
    [
        (b"42\n", "a request must be a JSON object, got an integer"),
        (b'"hello"\n', "a request must be a JSON object, got a string"),
        (b"null\n", "a request must be a JSON object, got null"),
        (
            b'[{"jsonrpc":"2.0","id":1,"method":"m"}]\n',
            "batch requests (JSON arrays) are not supported; send one object per line",
        ),
        (b"[]\n", "batch requests (JSON arrays) are not supported; send one object per line"),
        (b'{"id":1,"method":"m"}\n', 'jsonrpc is missing; it must be "2.0"'),
        (b'{"jsonrpc":"1.0","id":1,"method":"m"}\n', 'jsonrpc must be "2.0", got "1.0"'),
        (b'{"jsonrpc":2,"id":1,"method":"m"}\n', 'jsonrpc must be "2.0", got 2'),
        (b'{"jsonrpc":"2.0","id":1}\n', "method must be a string, got missing"),
        (b'{"jsonrpc":"2.0","id":1,"method":5}\n', "method must be a string, got an integer"),
        (
            b'{"jsonrpc":"2.0","id":1,"method":"m","params":"x"}\n',
            "params must be an object, got a string",
        ),
    ],
)
def test_invalid_request_echoes_the_id_when_readable(data: bytes, message: str) -> None:
    (error,) = LineDecoder().feed(data)
    assert isinstance(error, ProtocolError)
    assert error.code is ErrorCode.INVALID_REQUEST
    assert error.message == message
    assert not error.fatal
    readable = b'"id":1' in data and not data.startswith(b"[")
    assert error.id == (1 if readable else None)


@pytest.mark.parametrize(
    ("raw_id", "kind"),
    [("null", "null"), ("1.5", "a number"), ("true", "a boolean"), ("[1]", "an array")],
)
def test_bad_id_type(raw_id: str, kind: str) -> None:
    (error,) = LineDecoder().feed(f'{{"jsonrpc":"2.0","id":{raw_id},"method":"m"}}\n'.encode())
    assert error == ProtocolError(
        ErrorCode.INVALID_REQUEST,
        f"id must be a string or an integer, got {kind} (leave it out for a notification)",
    )


def test_positional_params_are_invalid_params() -> None:
    (error,) = LineDecoder().feed(b'{"jsonrpc":"2.0","id":"x","method":"m","params":[1,2]}\n')
    assert isinstance(error, ProtocolError)
    assert error.code is ErrorCode.INVALID_PARAMS
    assert error.id == "x"
    assert "positional params" in error.message


def test_unknown_members_are_ignored() -> None:
    assert parse_request(b'{"jsonrpc":"2.0","id":3,"method":"m","extra":true}') == Request(
        3, "m", {}
    )


def test_feed_eof_parses_a_last_line_without_newline() -> None:
    decoder = LineDecoder()
    assert decoder.feed(PING[:-1]) == []
    assert decoder.feed_eof() == [Request(1, "daemon.hello", {})]
    assert decoder.closed
    with pytest.raises(DecoderClosedError):
        decoder.feed(b"")
    assert LineDecoder().feed_eof() == []


# --- bounded input: what an unfinished line may hold ----------------------------


def over_budget(frame: object) -> bool:
    return (
        isinstance(frame, ProtocolError)
        and frame.code is ErrorCode.UNAVAILABLE
        and frame.fatal
        and frame.id is None
    )


def test_a_long_unfinished_line_draws_on_the_budget_until_it_ends() -> None:
    budget = InputBudget(4 * SPILL)
    decoder = LineDecoder(budget=budget)
    data = padded_request(3 * SPILL)
    assert decoder.feed(data[:SPILL]) == []
    assert (decoder.pending, budget.used) == (SPILL, 0)  # short: the connection's own
    assert decoder.feed(data[SPILL : SPILL + 1]) == []
    assert budget.used == SPILL + 1  # past SPILL: the whole line, from then on
    assert decoder.feed(data[SPILL + 1 : -1]) == []
    assert budget.used == decoder.pending == 3 * SPILL
    (frame,) = decoder.feed(data[-1:] + PING[:5])  # the line ends, a short one starts
    assert frame == Request(7, "m", json.loads(data)["params"])
    assert (decoder.pending, budget.used) == (5, 0)
    assert decoder.feed(PING[5:]) == [Request(1, "daemon.hello", {})]


def test_a_line_that_would_pass_the_budget_closes_only_its_decoder() -> None:
    budget = InputBudget(3 * SPILL)
    first, second, short = (LineDecoder(budget=budget) for _ in range(3))
    assert first.feed(b"a" * (2 * SPILL)) == []
    assert second.feed(b"b" * SPILL) == []  # its own share: nothing drawn
    (error,) = second.feed(b"b")  # SPILL + 1 more would make 3 * SPILL + 1
    assert over_budget(error)
    assert isinstance(error, ProtocolError)
    assert f"limit of {3 * SPILL} bytes" in error.message
    assert second.closed
    assert (second.pending, budget.used) == (0, 2 * SPILL)
    with pytest.raises(DecoderClosedError):
        second.feed(PING)
    # short lines are never refused for the others' long ones, even with no budget left
    assert first.feed(b"a" * SPILL) == []
    assert budget.used == budget.limit
    assert short.feed(b"x" * SPILL) == []  # unfinished, but short
    error, request = short.feed(b"\n" + PING)
    assert isinstance(error, ProtocolError) and error.code is ErrorCode.PARSE_ERROR
    assert request == Request(1, "daemon.hello", {})
    # a line that fits exactly is kept
    exact = InputBudget(SPILL + 1)
    third = LineDecoder(budget=exact)
    assert third.feed(b"c" * (SPILL + 1)) == []
    assert exact.used == SPILL + 1
    assert over_budget(third.feed(b"c")[0])
    assert exact.used == 0


def test_close_gives_an_unfinished_line_back() -> None:
    budget = InputBudget(8 * SPILL)
    decoders = [LineDecoder(budget=budget) for _ in range(3)]
    for n, decoder in enumerate(decoders):
        assert decoder.feed(b"z" * (SPILL + 100 * n)) == []
    assert budget.used == 2 * SPILL + 300  # the first one is short: not drawn
    for decoder in decoders:
        decoder.close()
        decoder.close()  # idempotent
        assert decoder.closed and decoder.pending == 0
        with pytest.raises(DecoderClosedError):
            decoder.feed(b"\n")
    assert budget.used == 0


def test_too_long_and_end_of_input_give_the_budget_back() -> None:
    budget = InputBudget(4 * MAX_LINE)
    long_one, ended = LineDecoder(budget=budget), LineDecoder(budget=budget)
    assert long_one.feed(b"x" * MAX_LINE) == []
    data = padded_request(2 * SPILL)
    assert ended.feed(data[:-1]) == []
    assert budget.used == MAX_LINE + 2 * SPILL
    (error,) = long_one.feed(b"x")
    assert isinstance(error, ProtocolError) and error.code is ErrorCode.INVALID_REQUEST
    assert budget.used == 2 * SPILL
    assert ended.feed_eof() == [Request(7, "m", json.loads(data)["params"])]
    assert budget.used == 0


def test_a_byte_at_a_time_past_spill() -> None:
    budget = InputBudget(MAX_LINE)
    decoder = LineDecoder(budget=budget)
    data = padded_request(SPILL + 3)
    for n, byte in enumerate(data[:-1], start=1):
        assert decoder.feed(bytes([byte])) == []
        assert decoder.pending == n
        assert budget.used == (n if n > SPILL else 0)
    assert decoder.feed(b"\n") == [Request(7, "m", json.loads(data)["params"])]
    assert budget.used == 0


def test_the_decoder_keeps_none_of_the_bytes_it_is_fed() -> None:
    for size in (10 + len(PING), SPILL + 10):
        decoder = LineDecoder(budget=InputBudget(MAX_LINE))
        line = padded_request(size)
        data = bytearray(line[:-1])
        assert decoder.feed(data) == []
        data[:] = b"\n" * len(data)  # the caller reuses its buffer...
        data.extend(b"\n")  # ...and resizes it: no view of it is kept
        assert decoder.feed(b"\n") == [Request(7, "m", json.loads(line)["params"])]


def test_budgets_and_limits_are_checked() -> None:
    with pytest.raises(InvalidValueError):
        InputBudget(-1)
    budget = InputBudget(10)
    assert budget.take(10) and not budget.take(1)
    budget.give(10)
    with pytest.raises(RuntimeError):
        budget.give(1)


# --- client side: responses and notifications ---------------------------------


def test_client_decodes_results_errors_and_events() -> None:
    data = (
        encode_result(1, {"protocol": 1})
        + encode_notification("event", {"kind": "question.asked", "supervisor_id": "s"})
        + encode_error(2, ErrorCode.CONFLICT, "already answered", {"answer": "yes"})
        + encode_error(None, ErrorCode.PARSE_ERROR, "invalid JSON")
        + encode_result("x", None)
    )
    assert ClientDecoder().feed(data) == [
        Response(1, result={"protocol": 1}),
        Notification("event", {"kind": "question.asked", "supervisor_id": "s"}),
        Response(2, error=ErrorObject(-32002, "already answered", {"answer": "yes"})),
        Response(None, error=ErrorObject(-32700, "invalid JSON")),
        Response("x", result=None),
    ]


@pytest.mark.parametrize(
    "data",
    [
        b"[1]",
        b'{"id":1,"result":1}',
        b'{"jsonrpc":"2.0","result":1}',
        b'{"jsonrpc":"2.0","id":null,"result":1}',
        b'{"jsonrpc":"2.0","id":1.5,"result":1}',
        b'{"jsonrpc":"2.0","id":1}',
        b'{"jsonrpc":"2.0","id":1,"result":1,"error":{"code":1,"message":"m"}}',
        b'{"jsonrpc":"2.0","id":1,"error":"bad"}',
        b'{"jsonrpc":"2.0","id":1,"error":{"code":"x","message":"m"}}',
        b'{"jsonrpc":"2.0","id":1,"error":{"code":true,"message":"m"}}',
        b'{"jsonrpc":"2.0","id":1,"error":{"code":1}}',
        b'{"jsonrpc":"2.0","id":1,"method":"m"}',
        b'{"jsonrpc":"2.0","method":7}',
        b'{"jsonrpc":"2.0","method":"event","params":[1]}',
    ],
)
def test_client_refuses_malformed_messages(data: bytes) -> None:
    error = parse_server_message(data)
    assert isinstance(error, ProtocolError)
    assert error.code is ErrorCode.INVALID_REQUEST
    assert not error.fatal


def test_client_limit_and_parse_errors() -> None:
    assert parse_server_message(b"{") == ProtocolError(
        ErrorCode.PARSE_ERROR,
        "invalid JSON: Expecting property name enclosed in double quotes: line 1 column 2 (char 1)",
    )
    (error,) = ClientDecoder().feed(b" " * (MAX_LINE + 1))
    assert isinstance(error, ProtocolError)
    assert error.fatal


# --- encoding -----------------------------------------------------------------


def test_encoders_write_one_compact_line() -> None:
    assert encode_request(1, "supervisor.get", {"supervisor_id": "s"}) == (
        b'{"jsonrpc":"2.0","id":1,"method":"supervisor.get","params":{"supervisor_id":"s"}}\n'
    )
    assert (
        encode_request(2, "daemon.hello") == b'{"jsonrpc":"2.0","id":2,"method":"daemon.hello"}\n'
    )
    assert encode_result("a", [1, "é"]) == '{"jsonrpc":"2.0","id":"a","result":[1,"é"]}\n'.encode()
    assert encode_error(3, ErrorCode.NOT_FOUND, "no such supervisor") == (
        b'{"jsonrpc":"2.0","id":3,"error":{"code":-32001,"message":"no such supervisor"}}\n'
    )
    assert encode_error(None, -32700, "bad", {"at": 1}) == (
        b'{"jsonrpc":"2.0","id":null,"error":{"code":-32700,"message":"bad","data":{"at":1}}}\n'
    )
    assert encode_notification("event", {"kind": "k"}) == (
        b'{"jsonrpc":"2.0","method":"event","params":{"kind":"k"}}\n'
    )


def test_newlines_in_values_stay_escaped() -> None:
    data = encode_result(1, "two\nlines\u2028")
    assert data.count(b"\n") == 1
    assert data.endswith(b"\n")


def test_lone_surrogate_is_escaped_not_a_crash() -> None:
    # a peer may send "\ud800" as an id; echoing it must still give valid UTF-8
    (error,) = LineDecoder().feed(b'{"jsonrpc":"2.0","id":"\\ud800","method":7}\n')
    assert isinstance(error, ProtocolError)
    data = encode_error(error.id, error.code, error.message)
    assert b'"id":"\\ud800"' in data
    data.decode("utf-8")


@pytest.mark.parametrize("value", [uuid.uuid4(), datetime.now(UTC), {1, 2}, b"bytes", object()])
def test_encoder_refuses_non_json_values(value: object) -> None:
    with pytest.raises(TypeError, match="as JSON; pass plain JSON values"):
        encode_result(1, {"value": value})


def test_encoder_refuses_bad_ids_methods_params_and_nan() -> None:
    with pytest.raises(TypeError, match="request id"):
        encode_result(True, 1)
    with pytest.raises(TypeError, match="request id"):
        encode_request(None, "m")  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="method"):
        encode_request(1, 5)  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="params"):
        encode_notification("event", [1])  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="not JSON compliant"):
        encode_result(1, float("nan"))


# --- properties ---------------------------------------------------------------

# Text PostgreSQL can store: no NUL, no lone surrogate (params with them are refused).
storable = st.characters(exclude_categories=["Cs"], exclude_characters="\x00")
json_values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers()
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(storable),
    lambda children: (
        st.lists(children, max_size=4)
        | st.dictionaries(st.text(storable, max_size=8), children, max_size=4)
    ),
    max_leaves=12,
)
request_ids = st.integers() | st.text(max_size=10)
params = st.dictionaries(st.text(storable, max_size=8), json_values, max_size=4)


@pytest.mark.parametrize(
    ("params_json", "shown"),
    [
        ('{"answer": "a\\u0000b"}', "a NUL character (\\u0000)"),
        ('{"x": [{"k\\u0000": 1}]}', "a NUL character (\\u0000)"),
        ('{"answer": "\\ud800"}', "a lone surrogate (\\ud800)"),
    ],
)
def test_params_postgresql_cannot_store_are_refused(params_json: str, shown: str) -> None:
    line = f'{{"jsonrpc":"2.0","id":7,"method":"question.answer","params":{params_json}}}'
    frame = parse_request(line.encode())
    assert isinstance(frame, ProtocolError), frame
    assert (frame.code, frame.id) == (ErrorCode.INVALID_PARAMS, 7)
    assert shown in frame.message and "cannot be stored" in frame.message


@st.composite
def wire_lines(draw: st.DrawFn) -> bytes:
    """One line of a stream: mostly valid requests, sometimes blank or broken ones."""
    kind = draw(st.sampled_from(["request", "notification", "blank", "crlf", "junk"]))
    if kind == "request":
        return encode_request(draw(request_ids), draw(st.text(max_size=12)), draw(params))
    if kind == "notification":
        return encode_notification(draw(st.text(max_size=12)), draw(params))
    if kind == "blank":
        return b"\n"
    if kind == "crlf":
        return encode_request(draw(request_ids), "m", draw(params))[:-1] + b"\r\n"
    return draw(st.binary(max_size=20).filter(lambda b: b"\n" not in b)) + b"\n"


def _content(raw: bytes) -> bytes:
    """A line without its "\n" and one "\r" before it."""
    raw = raw.removesuffix(b"\n")
    return raw.removesuffix(b"\r")


@given(
    st.lists(wire_lines(), max_size=8),
    st.lists(st.integers(min_value=0, max_value=2000), max_size=10),
)
def test_any_split_gives_the_same_frames(lines: list[bytes], cuts: list[int]) -> None:
    stream = b"".join(lines)
    whole = LineDecoder().feed(stream)
    decoder = LineDecoder()
    pieces: list[Request | ProtocolError] = []
    start = 0
    for cut in [*sorted({min(c, len(stream)) for c in cuts}), len(stream)]:
        pieces += decoder.feed(stream[start:cut])
        start = cut
    assert pieces == whole
    assert whole == [parse_request(raw) for raw in map(_content, lines) if raw.strip()]
    assert decoder.pending == 0


@given(request_ids, st.text(), params)
def test_request_round_trip(request_id: str | int, method: str, values: dict[str, Any]) -> None:
    assert LineDecoder().feed(encode_request(request_id, method, values)) == [
        Request(request_id, method, values)
    ]


@given(request_ids, json_values)
def test_result_round_trip(request_id: str | int, result: Any) -> None:
    assert ClientDecoder().feed(encode_result(request_id, result)) == [
        Response(request_id, result=result)
    ]


@given(
    st.lists(
        st.one_of(wire_lines(), st.integers(SPILL - 2, 3 * SPILL).map(padded_request)),
        max_size=5,
    ),
    st.lists(st.integers(min_value=0, max_value=8 * SPILL), max_size=12),
)
def test_any_split_draws_on_the_budget_for_the_long_unfinished_line_only(
    lines: list[bytes], cuts: list[int]
) -> None:
    stream = b"".join(lines)
    budget = InputBudget(MAX_LINE)
    decoder = LineDecoder(budget=budget)
    pieces: list[Request | ProtocolError] = []
    start = 0
    for cut in [*sorted({min(c, len(stream)) for c in cuts}), len(stream)]:
        pieces += decoder.feed(stream[start:cut])
        start = cut
        assert budget.used == (decoder.pending if decoder.pending > SPILL else 0)
    assert pieces == LineDecoder().feed(stream)
    assert budget.used == 0

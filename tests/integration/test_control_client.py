"""The control client against a small fake daemon on a real Unix socket."""

from __future__ import annotations

import shutil
import socket
import tempfile
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import anyio
import anyio.abc
import pytest

from makima.control import client as client_module
from makima.control.client import (
    CallTimeoutError,
    ConnectionClosedError,
    ControlClient,
    ControlError,
    ControlProtocolError,
    DaemonNotRunningError,
    EventsOverflowError,
    RemoteError,
)
from makima.control.codec import (
    MAX_LINE,
    ErrorCode,
    LineDecoder,
    Request,
    encode_error,
    encode_notification,
    encode_result,
)
from makima.errors import InvalidValueError, MakimaError

pytestmark = pytest.mark.anyio

READER = "makima control client reader"


class Peer:
    """The fake daemon's end of one connection."""

    def __init__(self, stream: anyio.abc.SocketStream) -> None:
        self.stream = stream
        self._decoder = LineDecoder()
        self._frames: list[Any] = []

    async def receive(self) -> Request | None:
        """The next request, or None once the client has closed its end."""
        while not self._frames:
            try:
                data = await self.stream.receive()
            except anyio.EndOfStream:
                return None
            self._frames += self._decoder.feed(data)
        frame = self._frames.pop(0)
        assert isinstance(frame, Request), frame
        return frame

    async def expect(self, method: str) -> Request:
        request = await self.receive()
        assert request is not None
        assert request.method == method
        return request

    async def send(self, data: bytes) -> None:
        await self.stream.send(data)

    async def event(self, kind: str, **fields: Any) -> None:
        await self.send(encode_notification("event", {"kind": kind, **fields}))

    async def drain(self) -> None:
        """Wait until the client closes its end."""
        while await self.receive() is not None:
            pass


Handler = Callable[[Peer], Awaitable[None]]


@pytest.fixture
def socket_path() -> Iterator[Path]:
    directory = Path(tempfile.mkdtemp(prefix="mk-", dir="/tmp"))
    yield directory / "control.sock"
    shutil.rmtree(directory, ignore_errors=True)


@asynccontextmanager
async def fake_daemon(path: Path, handler: Handler) -> AsyncIterator[None]:
    """Serve one connection with ``handler``; the block's end waits for it to finish."""
    listener = await anyio.create_unix_listener(path)

    async def serve_one() -> None:
        stream = await listener.accept()
        async with stream:
            await handler(Peer(stream))

    async with listener, anyio.create_task_group() as tg:
        tg.start_soon(serve_one)
        yield


def reader_tasks() -> list[str]:
    return [t.name for t in anyio.get_running_tasks() if t.name and t.name.startswith(READER)]


async def test_call_returns_the_result(socket_path: Path) -> None:
    async def handler(peer: Peer) -> None:
        hello = await peer.expect("daemon.hello")
        assert hello.params == {}
        assert hello.id == 1
        await peer.send(encode_result(hello.id, {"protocol": 1, "version": "0.1.0"}))
        get = await peer.expect("supervisor.get")
        assert get.params == {"supervisor_id": "s-1"}
        assert get.id == 2
        await peer.send(encode_result(get.id, {"supervisor_id": "s-1", "state": "working"}))
        await peer.drain()

    with anyio.fail_after(5):
        async with fake_daemon(socket_path, handler):
            async with ControlClient.connect(socket_path) as client:
                assert reader_tasks()
                assert await client.call("daemon.hello") == {"protocol": 1, "version": "0.1.0"}
                assert await client.call("supervisor.get", {"supervisor_id": "s-1"}) == {
                    "supervisor_id": "s-1",
                    "state": "working",
                }
            assert reader_tasks() == []


async def test_error_response_raises_remote_error(socket_path: Path) -> None:
    async def handler(peer: Peer) -> None:
        request = await peer.expect("question.answer")
        await peer.send(
            encode_error(
                request.id,
                ErrorCode.CONFLICT,
                "question q-1 is already answered",
                {"answer": "yes"},
            )
        )
        while (other := await peer.receive()) is not None:
            await peer.send(encode_error(other.id, -1, "odd\nerror"))

    with anyio.fail_after(5):
        async with fake_daemon(socket_path, handler), ControlClient.connect(socket_path) as client:
            with pytest.raises(RemoteError) as caught:
                await client.call("question.answer", {"question_id": "q-1", "answer": "no"})
            error = caught.value
            assert isinstance(error, MakimaError)
            assert error.code == -32002
            assert error.error_code is ErrorCode.CONFLICT
            assert error.message == "question q-1 is already answered"
            assert error.data == {"answer": "yes"}
            assert str(error) == "conflict (-32002): question q-1 is already answered"

            with pytest.raises(RemoteError) as caught:
                await client.call("nope")
            assert caught.value.error_code is None
            assert caught.value.data is None
            assert str(caught.value) == "error (-1): odd error"

            # the connection is still usable after an error reply
            with pytest.raises(RemoteError):
                await client.call("nope")


async def test_concurrent_calls_are_matched_by_id(socket_path: Path) -> None:
    count = 5

    async def handler(peer: Peer) -> None:
        requests = [await peer.expect("echo") for _ in range(count)]
        assert sorted(r.id for r in requests if isinstance(r.id, int)) == list(range(1, count + 1))
        for request in reversed(requests):  # answer in the opposite order
            assert request.id is not None
            await peer.send(encode_result(request.id, request.params["n"]))
        await peer.drain()

    results: dict[int, Any] = {}

    with anyio.fail_after(5):
        async with fake_daemon(socket_path, handler), ControlClient.connect(socket_path) as client:

            async def one(n: int) -> None:
                results[n] = await client.call("echo", {"n": n})

            async with anyio.create_task_group() as tg:
                for n in range(count):
                    tg.start_soon(one, n)
    assert results == {n: n for n in range(count)}


async def test_events_interleave_with_responses(socket_path: Path) -> None:
    async def handler(peer: Peer) -> None:
        subscribe = await peer.expect("events.subscribe")
        assert subscribe.params == {"kinds": ["question.pending", "question.asked"]}
        assert subscribe.id is not None
        # an event may even come before the reply to the subscription
        await peer.event("question.pending", supervisor_id="s-1", question_id="q-1")
        await peer.send(encode_result(subscribe.id, {"subscribed": True}))
        await peer.event("question.asked", supervisor_id="s-1", question_id="q-2")
        status = await peer.expect("daemon.status")
        assert status.id is not None
        await peer.event("question.asked", supervisor_id="s-2", question_id="q-3")
        await peer.send(encode_result(status.id, {"pending_questions": 3}))
        await peer.event("question.asked", supervisor_id="s-2", question_id="q-4")
        # then the daemon goes away

    seen: list[dict[str, Any]] = []
    with anyio.fail_after(5):
        async with fake_daemon(socket_path, handler), ControlClient.connect(socket_path) as client:
            async with client.events(["question.pending", "question.asked"]) as events:
                async for event in events:
                    seen.append(event)
                    if len(seen) == 2:
                        assert await client.call("daemon.status") == {"pending_questions": 3}
                # the daemon closed the connection: the iterator ended
            with pytest.raises(ConnectionClosedError, match="closed the connection"):
                await client.call("daemon.status")
    assert [e["question_id"] for e in seen] == ["q-1", "q-2", "q-3", "q-4"]
    assert all(set(e) == {"kind", "supervisor_id", "question_id"} for e in seen)


async def test_events_without_kinds_and_only_one_subscription(socket_path: Path) -> None:
    async def handler(peer: Peer) -> None:
        subscribe = await peer.expect("events.subscribe")
        assert subscribe.params == {}
        assert subscribe.id is not None
        await peer.send(encode_result(subscribe.id, {"subscribed": True}))
        await peer.event("task.spawned", supervisor_id="s-1")
        await peer.send(encode_notification("something.else", {"x": 1}))  # not an event: skipped
        await peer.event("task.finished", supervisor_id="s-1")
        await peer.drain()

    with anyio.fail_after(5):
        async with fake_daemon(socket_path, handler), ControlClient.connect(socket_path) as client:
            async with client.events() as events:
                with pytest.raises(ControlError, match="already has an open events"):
                    async with client.events():
                        pass
                kinds = [(await anext(events))["kind"], (await anext(events))["kind"]]
            assert kinds == ["task.spawned", "task.finished"]
            # after the block the iterator is over
            assert [e async for e in events] == []


async def test_slow_event_reader_gets_an_overflow_error(socket_path: Path) -> None:
    async def handler(peer: Peer) -> None:
        subscribe = await peer.expect("events.subscribe")
        assert subscribe.id is not None
        await peer.send(encode_result(subscribe.id, {"subscribed": True}))
        for n in range(5):
            await peer.event("task.spawned", supervisor_id="s", n=n)
        ping = await peer.expect("ping")
        assert ping.id is not None
        await peer.send(encode_result(ping.id, "pong"))
        await peer.drain()

    with anyio.fail_after(5):
        async with (
            fake_daemon(socket_path, handler),
            ControlClient.connect(socket_path) as client,
            client.events(buffer=2) as events,
        ):
            # the reply comes after the five events, so all were dispatched by now
            assert await client.call("ping") == "pong"
            assert [e["n"] for e in [await anext(events), await anext(events)]] == [0, 1]
            with pytest.raises(EventsOverflowError, match="more than 2 events"):
                await anext(events)


async def test_server_closing_fails_a_waiting_call(socket_path: Path) -> None:
    async def handler(peer: Peer) -> None:
        await peer.expect("supervisor.resume")  # and close without answering

    with anyio.fail_after(5):
        async with fake_daemon(socket_path, handler), ControlClient.connect(socket_path) as client:
            with pytest.raises(ConnectionClosedError) as caught:
                await client.call("supervisor.resume", {"supervisor_id": "s"})
            assert str(caught.value) == (
                f"the makima daemon at {socket_path} closed the connection"
            )


@pytest.mark.parametrize(
    ("data", "message"),
    [
        (b"{not json\n", "sent a bad line: invalid JSON"),
        (b" " * (MAX_LINE + 1), f"sent a bad line: line longer than {MAX_LINE} bytes"),
        (b'{"jsonrpc":"2.0","id":1,"method":"x"}\n', "sent a bad line: the server sent a request"),
        (
            encode_error(None, ErrorCode.PARSE_ERROR, "invalid JSON: oops"),
            r"could not read a request: invalid JSON: oops \(-32700\)",
        ),
    ],
    ids=["bad-json", "too-long", "request", "null-id-error"],
)
async def test_protocol_violation_by_the_server(
    socket_path: Path, data: bytes, message: str
) -> None:
    async def handler(peer: Peer) -> None:
        await peer.expect("daemon.hello")
        await peer.send(data)
        await peer.drain()

    with anyio.fail_after(5):
        async with fake_daemon(socket_path, handler), ControlClient.connect(socket_path) as client:
            with pytest.raises(ControlProtocolError, match=message):
                await client.call("daemon.hello")
            # the connection is not used again
            with pytest.raises(ControlProtocolError, match=message):
                await client.call("daemon.hello")
            with pytest.raises(ControlProtocolError):
                async with client.events():
                    pass
        assert reader_tasks() == []


REFUSAL = encode_error(None, ErrorCode.FORBIDDEN, "uid 65534 may not use this daemon")


async def refuse(peer: Peer) -> None:
    """What the daemon does with a peer it refuses: say why at once, then hang up."""
    await peer.send(REFUSAL)


async def test_a_refusal_fails_the_connection(socket_path: Path) -> None:
    for _ in range(10):  # the request goes out before or after the daemon hangs up
        with anyio.fail_after(5):
            async with (
                fake_daemon(socket_path, refuse),
                ControlClient.connect(socket_path) as client,
            ):
                with pytest.raises(RemoteError) as caught:
                    await client.call("daemon.hello")
                assert caught.value.error_code is ErrorCode.FORBIDDEN
                assert str(caught.value) == (
                    "forbidden (-32004): uid 65534 may not use this daemon"
                )
                with pytest.raises(RemoteError):  # and the connection is over
                    await client.call("daemon.hello")
        await anyio.Path(socket_path).unlink()


class SendsAfterHangUp(anyio.abc.ByteStream):
    """The client's end, holding each send until the daemon has hung up."""

    def __init__(self, stream: anyio.abc.ByteStream, hung_up: anyio.Event) -> None:
        self.stream = stream
        self.hung_up = hung_up

    async def send(self, item: bytes) -> None:
        await self.hung_up.wait()
        await self.stream.send(item)

    async def receive(self, max_bytes: int = 65536) -> bytes:
        return await self.stream.receive(max_bytes)

    async def send_eof(self) -> None:
        await self.stream.send_eof()

    async def aclose(self) -> None:
        await self.stream.aclose()


async def test_a_refusal_read_after_the_request_failed_to_go_out(
    socket_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    hung_up = anyio.Event()

    async def refuse_and_tell(peer: Peer) -> None:
        await refuse(peer)
        await peer.stream.aclose()
        hung_up.set()

    async def open_late(path: str, limit: float) -> anyio.abc.ByteStream:
        return SendsAfterHangUp(await anyio.connect_unix(path), hung_up)

    monkeypatch.setattr(client_module, "_open", open_late)
    with anyio.fail_after(5):
        async with (
            fake_daemon(socket_path, refuse_and_tell),
            ControlClient.connect(socket_path) as client,
        ):
            with pytest.raises(RemoteError) as caught:  # not "broken pipe"
                await client.call("daemon.hello")
            assert caught.value.error_code is ErrorCode.FORBIDDEN


async def test_call_timeout(socket_path: Path) -> None:
    async def handler(peer: Peer) -> None:
        await peer.expect("stall")
        late = await peer.expect("daemon.hello")
        assert late.id is not None
        await peer.send(encode_result(1, "too late"))  # the timed-out call's reply: dropped
        await peer.send(encode_result(late.id, "hello"))
        await peer.drain()

    with anyio.fail_after(5):
        async with (
            fake_daemon(socket_path, handler),
            ControlClient.connect(socket_path, timeout=0.05) as client,
        ):
            with pytest.raises(CallTimeoutError, match=r"did not answer 'stall' within 0\.05 s"):
                await client.call("stall")
            client.timeout = 5
            assert await client.call("daemon.hello") == "hello"


async def test_send_that_cannot_finish_gives_the_connection_up(socket_path: Path) -> None:
    done = anyio.Event()

    async def handler(peer: Peer) -> None:
        await done.wait()  # never reads: the client's send fills the socket buffer

    big = {"goal": "x" * (MAX_LINE - 100)}
    with anyio.fail_after(5):
        async with (
            fake_daemon(socket_path, handler),
            ControlClient.connect(socket_path, timeout=0.2) as client,
        ):
            with pytest.raises(CallTimeoutError, match=r"did not take the 'supervisor\.create'"):
                await client.call("supervisor.create", big)
            # part of the line may have gone out: the connection is not used again
            with pytest.raises(CallTimeoutError, match="the connection was given up"):
                await client.call("daemon.hello")
            done.set()


async def test_request_over_the_limit_is_refused_before_sending(socket_path: Path) -> None:
    async def handler(peer: Peer) -> None:
        request = await peer.expect("daemon.hello")  # the big one never arrives
        assert request.id == 2
        await peer.send(encode_result(request.id, "hello"))
        await peer.drain()

    with anyio.fail_after(5):
        async with fake_daemon(socket_path, handler), ControlClient.connect(socket_path) as client:
            with pytest.raises(InvalidValueError, match="the limit is 1048576"):
                await client.call("supervisor.create", {"goal": "x" * MAX_LINE})
            assert await client.call("daemon.hello") == "hello"


async def test_calls_after_close_fail_clearly(socket_path: Path) -> None:
    async def handler(peer: Peer) -> None:
        await peer.drain()

    with anyio.fail_after(5):
        async with fake_daemon(socket_path, handler):
            async with ControlClient.connect(str(socket_path)) as client:
                pass
            with pytest.raises(ConnectionClosedError, match="this control client is closed"):
                await client.call("daemon.hello")


async def test_missing_socket(socket_path: Path) -> None:
    with anyio.fail_after(5), pytest.raises(DaemonNotRunningError) as caught:
        async with ControlClient.connect(socket_path):
            pass
    assert caught.value.path == str(socket_path)
    assert str(socket_path) in str(caught.value)
    assert "no socket there" in str(caught.value)
    assert isinstance(caught.value, MakimaError)


async def test_socket_with_nobody_listening(socket_path: Path) -> None:
    stale = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    stale.bind(str(socket_path))  # the file stays, as after a daemon killed with -9
    stale.close()
    with anyio.fail_after(5), pytest.raises(DaemonNotRunningError) as caught:
        async with ControlClient.connect(socket_path):
            pass
    assert str(socket_path) in str(caught.value)
    assert "connection refused" in str(caught.value)

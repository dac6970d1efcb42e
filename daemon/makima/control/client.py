"""The control socket's client, for the ``makima`` CLI and the tests.

::

    async with ControlClient.connect(path) as client:
        status = await client.call("daemon.status")
        async with client.events(["question.asked"]) as events:
            async for event in events:  # each a dict with "kind" and "supervisor_id"
                ...

One background task reads the socket and hands each response to the caller
waiting on its id and each ``event`` notification to the open subscription,
so calls may run concurrently and events may arrive between responses. The
task ends with the ``async with`` block; an exception raised in the block comes
out as it is, not wrapped in an ExceptionGroup. Each call (and connecting) is
bounded by the client's ``timeout``.

When the daemon closes the connection, waiting and later calls raise
:class:`ConnectionClosedError` and an open event iterator simply ends. When
the daemon sends something that is not makima-control/1 (bad JSON, a line over
:data:`~makima.control.codec.MAX_LINE`), both raise :class:`ControlProtocolError`.
"""

from __future__ import annotations

import os
from collections.abc import AsyncIterator, Callable, Mapping, Sequence
from contextlib import asynccontextmanager
from functools import partial
from typing import Any, Self

import anyio
import anyio.abc

from makima.control.codec import (
    EVENT_METHOD,
    MAX_LINE,
    ClientDecoder,
    ErrorCode,
    Notification,
    ProtocolError,
    Response,
    encode_request,
)
from makima.control.streams import hang_up
from makima.errors import InvalidValueError, MakimaError

_ERROR_NAMES = {code.value: code.name.lower() for code in ErrorCode}


class ControlError(MakimaError):
    """Talking to the daemon over its control socket went wrong."""


class ControlConnectionError(ControlError):
    """The control socket could not be reached, or the connection was lost."""


class DaemonNotRunningError(ControlConnectionError):
    """No daemon accepts connections at the socket path."""

    def __init__(self, path: str, reason: str) -> None:
        super().__init__(
            f"no makima daemon is listening at {path} ({reason}); start one with"
            " `makima daemon`, or point --socket / MAKIMA_SOCKET at its socket"
        )
        self.path = path
        self.reason = reason


class ConnectionClosedError(ControlConnectionError):
    """The connection ended: the daemon closed it, or this client was closed."""


class ControlProtocolError(ControlError):
    """The daemon sent something that is not makima-control/1."""


class CallTimeoutError(ControlError, TimeoutError):
    """The daemon did not answer a call in time."""


class EventsOverflowError(ControlError):
    """Events arrived faster than the subscription's reader took them."""


class RemoteError(ControlError):
    """The daemon answered a call with an error.

    ``code`` is the JSON-RPC error code (see :class:`~makima.control.codec.ErrorCode`),
    ``data`` the error's ``data`` member (e.g. the existing answer on a conflict).
    """

    def __init__(self, code: int, message: str, data: Any = None) -> None:
        name = _ERROR_NAMES.get(code, "error")
        super().__init__(f"{name} ({code}): {' '.join(message.splitlines())}")
        self.code = code
        self.message = message
        self.data = data

    @property
    def error_code(self) -> ErrorCode | None:
        """``code`` as an :class:`ErrorCode`, or None for a code makima does not define."""
        return ErrorCode(self.code) if self.code in _ERROR_NAMES else None


_ErrorFactory = Callable[[], ControlError]


class _Waiter:
    """One call waiting for its response."""

    __slots__ = ("done", "error", "response")

    def __init__(self) -> None:
        self.done = anyio.Event()
        self.response: Response | None = None
        self.error: _ErrorFactory | None = None


class EventSubscription:
    """Async iterator over the ``params`` of the daemon's ``event`` notifications.

    It ends when the daemon closes the connection or the subscription's
    ``async with`` block is left; it raises :class:`EventsOverflowError` if more
    than ``buffer`` events were waiting to be read, and
    :class:`ControlProtocolError` if the daemon broke the protocol. Events
    already received are yielded first.
    """

    def __init__(self, buffer: int) -> None:
        self.buffer = buffer
        self._send, self._receive = anyio.create_memory_object_stream[dict[str, Any]](buffer)
        self._error: _ErrorFactory | None = None
        self._ended = False

    def __aiter__(self) -> Self:
        return self

    async def __anext__(self) -> dict[str, Any]:
        try:
            return await self._receive.receive()
        except (anyio.EndOfStream, anyio.ClosedResourceError):
            if self._error is not None:
                raise self._error() from None
            raise StopAsyncIteration from None

    def _put(self, event: dict[str, Any]) -> None:
        """Called by the reader task; never waits."""
        if self._ended:
            return
        try:
            self._send.send_nowait(event)
        except anyio.WouldBlock:
            self._end(
                partial(
                    EventsOverflowError,
                    f"more than {self.buffer} events waited to be read; the subscription ended",
                )
            )

    def _end(self, error: _ErrorFactory | None) -> None:
        """No more events: the iterator ends after the buffered ones (raising ``error``)."""
        if not self._ended:
            self._ended = True
            self._error = error
            self._send.close()

    def _close(self) -> None:
        self._end(None)
        self._receive.close()


class ControlClient:
    """A connection to the daemon's control socket. Open it with :meth:`connect`."""

    def __init__(self, stream: anyio.abc.ByteStream, path: str, timeout: float) -> None:
        self.path = path
        self.timeout = timeout
        self._stream = stream
        self._send_lock = anyio.Lock()
        self._last_id = 0
        self._pending: dict[int, _Waiter] = {}
        self._subscription: EventSubscription | None = None
        self._failure: _ErrorFactory | None = None
        self._finished = anyio.Event()

    @classmethod
    @asynccontextmanager
    async def connect(
        cls,
        path: str | os.PathLike[str],
        timeout: float = 5.0,  # noqa: ASYNC109 - a default bound for each call, not one deadline
    ) -> AsyncIterator[Self]:
        """Connect to the socket at ``path``; close the connection when the block ends.

        ``timeout`` bounds connecting and each call (``math.inf``: no limit;
        :attr:`timeout` may be changed later). Raises :class:`DaemonNotRunningError`
        when nothing listens there and :class:`ControlConnectionError` for other
        failures (e.g. permission denied).
        """
        where = os.fspath(path)
        stream = await _open(where, timeout)
        async with stream:
            client = cls(stream, where, timeout)
            failure: Exception | None = None
            async with anyio.create_task_group() as tg:
                tg.start_soon(client._read, name=f"makima control client reader ({where})")
                try:
                    yield client
                except Exception as exc:  # noqa: BLE001 - re-raised below, outside the task group
                    failure = exc  # so callers catch RemoteError etc., not an ExceptionGroup
                finally:
                    client._finish(
                        partial(ConnectionClosedError, "this control client is closed"),
                        clean=True,
                    )
                    # The reader wakes at the hang-up and ends by itself (see hang_up).
                    if not hang_up(stream):
                        with anyio.CancelScope(shield=True):
                            await stream.aclose()
                        tg.cancel_scope.cancel()
            if failure is not None:
                raise failure

    async def call(
        self,
        method: str,
        params: Mapping[str, Any] | None = None,
    ) -> Any:
        """Call ``method`` and return its result; :class:`RemoteError` if it failed.

        :class:`CallTimeoutError` when no answer comes within :attr:`timeout` seconds.
        """
        if self._failure is not None:
            raise self._failure()
        self._last_id += 1
        request_id = self._last_id
        line = encode_request(request_id, method, params)
        if len(line) > MAX_LINE + 1:
            raise InvalidValueError(
                f"the {method!r} request is {len(line) - 1} bytes long; the limit is {MAX_LINE}"
            )
        waiter = _Waiter()
        self._pending[request_id] = waiter
        limit = self.timeout
        try:
            with anyio.fail_after(limit):
                try:
                    await self._send(line, method)
                except ConnectionClosedError:
                    # The daemon may have answered and closed before the request went
                    # out (a refused peer): the reader, which ends with the connection,
                    # has the better reason.
                    await self._finished.wait()
                await waiter.done.wait()
        except CallTimeoutError:
            raise
        except TimeoutError:
            raise CallTimeoutError(
                f"the makima daemon at {self.path} did not answer {method!r} within {limit} s"
            ) from None
        finally:
            self._pending.pop(request_id, None)
        if waiter.error is not None:
            raise waiter.error()
        response = waiter.response
        assert response is not None  # done is set only with a response or an error
        if response.error is not None:
            raise RemoteError(response.error.code, response.error.message, response.error.data)
        return response.result

    @asynccontextmanager
    async def events(
        self, kinds: Sequence[str] | None = None, *, buffer: int = 1024
    ) -> AsyncIterator[EventSubscription]:
        """Subscribe (``events.subscribe``, with ``{"kinds": kinds}`` when given).

        Yields an :class:`EventSubscription`. One subscription per client at a
        time; the daemon keeps sending events after the block ends (there is no
        unsubscribe), and they are dropped.
        """
        if self._subscription is not None:
            raise ControlError(
                "this client already has an open events() subscription;"
                " open another connection for a second one"
            )
        subscription = EventSubscription(buffer)
        self._subscription = subscription  # before subscribing: the snapshot may come first
        try:
            params = None if kinds is None else {"kinds": list(kinds)}
            await self.call("events.subscribe", params)
            yield subscription
        finally:
            self._subscription = None
            subscription._close()

    # --- inside ---------------------------------------------------------------

    async def _send(self, line: bytes, method: str) -> None:
        """Send one whole line, or give the connection up.

        A UNIX stream send may be cut short by cancellation after part of the line
        went out, which would garble the stream; so the send is shielded from
        outside cancellation and bounded by :attr:`timeout` on its own.
        """
        try:
            async with self._send_lock:
                with anyio.CancelScope(shield=True), anyio.move_on_after(self.timeout) as scope:
                    await self._stream.send(line)
        except (anyio.BrokenResourceError, anyio.ClosedResourceError, OSError) as exc:
            raise ConnectionClosedError(
                f"lost the connection to the makima daemon at {self.path} while sending {method!r}"
            ) from exc
        if scope.cancelled_caught:
            message = (
                f"the makima daemon at {self.path} did not take the {method!r} request"
                f" within {self.timeout} s; the connection was given up"
            )
            self._finish(partial(CallTimeoutError, message), clean=False)
            raise CallTimeoutError(message)

    async def _read(self) -> None:
        """The reader task: dispatch frames until the connection ends or breaks."""
        decoder = ClientDecoder()
        while True:
            try:
                data = await self._stream.receive()
            except anyio.EndOfStream:
                self._finish(
                    partial(
                        ConnectionClosedError,
                        f"the makima daemon at {self.path} closed the connection",
                    ),
                    clean=True,
                )
                return
            except (anyio.BrokenResourceError, anyio.ClosedResourceError, OSError) as exc:
                self._finish(
                    partial(
                        ConnectionClosedError,
                        f"lost the connection to the makima daemon at {self.path}: {exc!r}",
                    ),
                    clean=False,
                )
                return
            for frame in decoder.feed(data):
                if not self._dispatch(frame):
                    return

    def _dispatch(self, frame: Response | Notification | ProtocolError) -> bool:
        """Hand one frame on; False when it broke the protocol and reading must stop."""
        if isinstance(frame, ProtocolError):
            return self._broken(f"sent a bad line: {frame.message}")
        if isinstance(frame, Notification):
            if frame.method == EVENT_METHOD and self._subscription is not None:
                self._subscription._put(frame.params)
            return True
        if frame.id is None:
            error = frame.error
            assert error is not None  # the codec allows a null id only with an error
            if error.code in (ErrorCode.FORBIDDEN, ErrorCode.UNAVAILABLE):
                # The daemon refuses this peer (not allowed, or too many connections
                # or too much unfinished input): every call fails with its reason.
                self._finish(
                    partial(RemoteError, error.code, error.message, error.data), clean=False
                )
                return False
            # It could not read a request this client sent: this client is broken.
            return self._broken(f"could not read a request: {error.message} ({error.code})")
        waiter = self._pending.pop(frame.id, None) if isinstance(frame.id, int) else None
        if waiter is not None:  # else its caller gave up (timeout, cancellation)
            waiter.response = frame
            waiter.done.set()
        return True

    def _broken(self, what: str) -> bool:
        self._finish(
            partial(ControlProtocolError, f"the makima daemon at {self.path} {what}"),
            clean=False,
        )
        return False

    def _finish(self, error: _ErrorFactory, *, clean: bool) -> None:
        """The connection is over: fail waiting calls, end the subscription. Sync, so atomic."""
        if self._failure is not None:
            return
        self._failure = error
        self._finished.set()
        for waiter in self._pending.values():
            waiter.error = error
            waiter.done.set()
        if self._subscription is not None:
            self._subscription._end(None if clean else error)


async def _open(path: str, limit: float) -> anyio.abc.SocketStream:
    """Connect to the Unix socket at ``path``, turning failures into clear errors."""
    try:
        with anyio.fail_after(limit):
            return await anyio.connect_unix(path)
    except (FileNotFoundError, NotADirectoryError) as exc:
        raise DaemonNotRunningError(path, "no socket there") from exc
    except ConnectionRefusedError as exc:
        raise DaemonNotRunningError(path, "connection refused") from exc
    except TimeoutError as exc:
        raise DaemonNotRunningError(path, f"no connection within {limit} s") from exc
    except PermissionError as exc:
        raise ControlConnectionError(
            f"cannot connect to the makima daemon at {path}: permission denied"
            " (the socket is open to root, the daemon's user and the socket's group)"
        ) from exc
    except OSError as exc:
        raise ControlConnectionError(
            f"cannot connect to the makima daemon at {path}: {exc.strerror or exc}"
        ) from exc

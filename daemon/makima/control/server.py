"""The control socket server: accepts connections, checks each peer with
SO_PEERCRED, decodes JSON-RPC lines and hands requests to a dispatcher.

Generic: what the methods do lives in :mod:`makima.api`. A dispatcher
returns a :class:`Reply` (a result, plus optional work to do once the
response is written) or a :class:`Stream` (a result, then notifications).

What the connections may cost is bounded:

- at most ``max_connections`` are served at once; one more gets an
  ``UNAVAILABLE`` error line naming the cap, and is closed;
- an unfinished line is at most :data:`~makima.control.codec.MAX_LINE` bytes
  (``INVALID_REQUEST``, closed), and up to
  :data:`~makima.control.codec.SPILL` bytes of it are the connection's own;
  longer unfinished lines draw on one budget of :data:`INPUT_BUDGET` bytes for
  all connections together (past it: ``UNAVAILABLE``, closed). Such lines live
  in memory mapped for each alone, given back to the OS when the line ends or
  the connection closes. So all unfinished input together stays under
  ``max_connections`` x ``SPILL`` + ``INPUT_BUDGET`` (4 + 64 MiB by default),
  and a connection that sends short lines is never refused for the others' long
  ones;
- at most :data:`MAX_LINGERING` refused connections wait for their peer to read
  why; the others are closed right after their error line.
"""

from __future__ import annotations

import contextlib
import errno
import os
import socket
import struct
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import anyio
import anyio.abc
import structlog

from makima.control.codec import (
    EVENT_METHOD,
    ErrorCode,
    InputBudget,
    LineDecoder,
    ProtocolError,
    Request,
    encode_error,
    encode_notification,
    encode_result,
)
from makima.control.streams import hang_up
from makima.errors import (
    ConflictError,
    DatabaseUnavailableError,
    ForbiddenError,
    InvalidAnswerError,
    InvalidParamsError,
    InvalidValueError,
    MakimaError,
    NotFoundError,
)

log = structlog.get_logger("makima.control")

REFUSAL_LINGER = 2.0
"""Seconds a refused peer's connection stays open for it to read why."""
MAX_REFUSED_INPUT = 64 * 1024
"""Bytes read (and dropped) from a refused peer before its connection is closed."""
RECEIVE_SIZE = 16 * 1024
"""Bytes asked of the socket per read (anyio's default, 64 KiB, is allocated whole
for every read, and a shorter read leaves a hole the next one may not fit)."""
MAX_LINGERING = 64
"""Refused connections that may wait for their peer at once; more are closed at once."""
INPUT_BUDGET = 64 << 20
"""Bytes of long unfinished lines (past ``codec.SPILL`` each) all connections may hold."""


@dataclass(frozen=True, slots=True)
class Peer:
    pid: int
    uid: int
    gid: int


@dataclass(frozen=True, slots=True)
class Reply:
    result: Any
    after: Callable[[], Awaitable[None]] | None = None


@dataclass(frozen=True, slots=True)
class Stream:
    """A result followed by notifications until the iterator ends."""

    result: Any
    events: AsyncIterator[dict[str, Any]]


class Dispatcher(Protocol):
    async def __call__(self, peer: Peer, method: str, params: dict[str, Any]) -> Reply | Stream: ...


def peer_credentials(sock: socket.socket) -> Peer:
    raw = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
    pid, uid, gid = struct.unpack("3i", raw)
    return Peer(pid, uid, gid)


def supplementary_groups(pid: int) -> set[int]:
    try:
        text = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return set()
    for line in text.splitlines():
        if line.startswith("Groups:"):
            return {int(g) for g in line.split()[1:]}
    return set()


def peer_allowed(peer: Peer, *, daemon_uid: int, socket_gid: int, groups: set[int]) -> bool:
    """Root, the daemon's own uid, or a member of the socket's group (pure)."""
    return peer.uid in (0, daemon_uid) or peer.gid == socket_gid or socket_gid in groups


def error_for(exc: Exception) -> tuple[ErrorCode, str, Any]:
    """Map an exception raised by a method to a JSON-RPC error (pure)."""
    if isinstance(exc, NotFoundError):
        return ErrorCode.NOT_FOUND, str(exc), None
    if isinstance(exc, ConflictError):
        return ErrorCode.CONFLICT, str(exc), exc.data or None
    if isinstance(exc, InvalidAnswerError):
        return ErrorCode.INVALID_ANSWER, str(exc), {"choices": list(exc.choices)}
    if isinstance(exc, ForbiddenError):
        return ErrorCode.FORBIDDEN, str(exc), None
    if isinstance(exc, DatabaseUnavailableError):
        return ErrorCode.UNAVAILABLE, str(exc), None
    if isinstance(exc, InvalidParamsError | InvalidValueError):
        return ErrorCode.INVALID_PARAMS, str(exc), None
    return ErrorCode.INTERNAL_ERROR, f"internal error: {type(exc).__name__}", None


class MethodNotFoundError(MakimaError):
    pass


async def prepare_socket_path(path: Path) -> None:
    """Make the folder; remove a stale socket file, refuse a live one."""
    await anyio.Path(path.parent).mkdir(parents=True, exist_ok=True, mode=0o755)
    if not await anyio.Path(path).exists():
        return
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    probe.setblocking(False)
    try:
        probe.connect(str(path))
    except OSError as exc:
        if exc.errno in (errno.ECONNREFUSED, errno.ENOENT, errno.ENOTSOCK):
            await anyio.Path(path).unlink(missing_ok=True)
            log.info("control.stale_socket_removed", path=str(path))
            return
        if exc.errno not in (errno.EAGAIN, errno.EINPROGRESS):
            raise
    finally:
        probe.close()
    raise MakimaError(f"another makima daemon is already listening on {path}")


class ControlServer:
    def __init__(
        self,
        dispatch: Dispatcher,
        *,
        daemon_uid: int | None = None,
        send_timeout: float = 5.0,
        max_connections: int = 256,
        input_budget: int | None = None,
    ) -> None:
        if max_connections < 1:
            raise InvalidValueError(f"max_connections must be at least 1, got {max_connections}")
        self.dispatch = dispatch
        self.max_connections = max_connections
        self.input_budget = InputBudget(INPUT_BUDGET if input_budget is None else input_budget)
        self.daemon_uid = os.getuid() if daemon_uid is None else daemon_uid
        self.send_timeout = send_timeout
        self.connections = 0  # served now (refused ones not counted)
        self._lingering = 0
        self._socket_gid = os.getgid()
        self._effects: anyio.abc.TaskGroup | None = None

    async def listen(self, path: Path, mode: int = 0o660) -> anyio.abc.SocketListener:
        await prepare_socket_path(path)
        listener = await anyio.create_unix_listener(path, mode=mode)
        self._socket_gid = os.stat(path).st_gid
        log.info("control.listening", path=str(path), mode=oct(mode))
        return listener

    async def adopt(self, sock: socket.socket) -> anyio.abc.SocketListener:
        """Use a listening socket handed over by systemd socket activation."""
        with contextlib.suppress(OSError):
            name = sock.getsockname()
            if isinstance(name, str) and name:
                self._socket_gid = os.stat(name).st_gid
        log.info("control.adopted", fd=sock.fileno())
        return await anyio.abc.SocketListener.from_socket(sock)

    async def serve(self, listener: anyio.abc.SocketListener) -> None:
        async with anyio.create_task_group() as effects, listener:
            self._effects = effects
            await listener.serve(self._connection)

    def carry_out(self, after: Callable[[], Awaitable[None]]) -> None:
        """Run what follows a committed change (an answer's delivery) in the server's
        own task group: it belongs to the daemon, not to the client that asked."""
        if self._effects is None:
            raise RuntimeError("the control server is not serving")
        self._effects.start_soon(_call, after)

    async def _connection(self, stream: anyio.abc.SocketStream) -> None:
        async with stream:
            raw = stream.extra(anyio.abc.SocketAttribute.raw_socket)  # noqa: S610
            peer = peer_credentials(raw)
            allowed = peer_allowed(
                peer,
                daemon_uid=self.daemon_uid,
                socket_gid=self._socket_gid,
                groups=supplementary_groups(peer.pid)
                if peer.uid not in (0, self.daemon_uid)
                else set(),
            )
            if not allowed:
                log.warning("control.peer_refused", pid=peer.pid, uid=peer.uid, gid=peer.gid)
                await self._refuse(
                    stream,
                    ErrorCode.FORBIDDEN,
                    f"uid {peer.uid} may not use this daemon: it needs to be root, "
                    f"uid {self.daemon_uid}, or in group {self._socket_gid}",
                )
                return
            if self.connections >= self.max_connections:
                log.warning(
                    "control.connection_refused",
                    reason="max_connections",
                    max_connections=self.max_connections,
                    pid=peer.pid,
                    uid=peer.uid,
                )
                await self._refuse(
                    stream,
                    ErrorCode.UNAVAILABLE,
                    f"too many connections: the daemon serves at most {self.max_connections}"
                    " at once; try again when one has closed, or raise the limit with"
                    " `makima daemon --max-connections N` (env MAKIMA_MAX_CONNECTIONS)",
                )
                return
            self.connections += 1
            try:
                await _Connection(self, stream, peer).run()
            except* Exception:  # one connection's failure is its own
                log.exception("control.connection_failed", pid=peer.pid, uid=peer.uid)
            finally:
                self.connections -= 1

    async def _refuse(self, stream: anyio.abc.SocketStream, code: ErrorCode, message: str) -> None:
        """Tell a refused peer why, then read what it sends until it hangs up (briefly).

        Closing at once could beat the peer's first request: its send would then fail
        (EPIPE) before it read the reason, and it would report a broken pipe instead.
        The wait ends by hanging the socket up, not by cancelling the read (see
        :func:`~makima.control.streams.hang_up`). Past :data:`MAX_LINGERING` refused
        connections waiting at once, one is closed right after its line.
        """
        linger = self._lingering < MAX_LINGERING
        self._lingering += int(linger)
        try:
            async with anyio.create_task_group() as tg:
                tg.start_soon(_hang_up_after, stream, REFUSAL_LINGER)
                with contextlib.suppress(
                    anyio.EndOfStream, anyio.BrokenResourceError, anyio.ClosedResourceError, OSError
                ):
                    await stream.send(encode_error(None, code, message))
                    await stream.send_eof()
                    received = 0
                    while linger and received < MAX_REFUSED_INPUT:
                        received += len(await stream.receive())
                tg.cancel_scope.cancel()  # the timer: nothing waits on the socket now
        finally:
            self._lingering -= int(linger)


async def _hang_up_after(stream: anyio.abc.SocketStream, delay: float) -> None:
    """End, after ``delay`` seconds, whatever still waits on ``stream``."""
    await anyio.sleep(delay)
    hang_up(stream)


async def _call(function: Callable[[], Awaitable[None]]) -> None:
    await function()


class _Connection:
    def __init__(self, server: ControlServer, stream: anyio.abc.SocketStream, peer: Peer) -> None:
        self.server = server
        self.stream = stream
        self.peer = peer
        self._send_lock = anyio.Lock()
        self.closed = False  # set when the daemon drops the connection

    async def send(self, data: bytes) -> None:
        async with self._send_lock:
            with anyio.fail_after(self.server.send_timeout):
                await self.stream.send(data)

    async def run(self) -> None:
        decoder = LineDecoder(budget=self.server.input_budget)
        try:
            async with anyio.create_task_group() as tg:
                with contextlib.suppress(
                    anyio.BrokenResourceError, anyio.ClosedResourceError, TimeoutError, OSError
                ):
                    await self._serve(decoder, tg)
                tg.cancel_scope.cancel()
        finally:
            decoder.close()  # an unfinished line's memory and budget, however this ends

    async def _serve(self, decoder: LineDecoder, tg: anyio.abc.TaskGroup) -> None:
        """Answer requests until the peer stops, or breaks the protocol beyond repair."""
        while True:
            try:
                data = await self.stream.receive(RECEIVE_SIZE)
            except anyio.EndOfStream:
                return
            for frame in decoder.feed(data):
                if self.closed:  # dropped: what it sent after that is not run
                    break
                if isinstance(frame, ProtocolError):
                    if frame.fatal:  # the decoder has already let go of the line
                        log.warning(
                            "control.connection_closed",
                            reason=frame.message,
                            code=int(frame.code),
                            pid=self.peer.pid,
                        )
                    await self.send(encode_error(frame.id, frame.code, frame.message))
                    if frame.fatal:
                        return
                    continue
                if isinstance(frame, Request):
                    await self._request(frame, tg)

    async def _request(self, request: Request, tg: anyio.abc.TaskGroup) -> None:
        try:
            outcome = await self.server.dispatch(self.peer, request.method, request.params)
        except MethodNotFoundError as exc:
            await self._error(request, ErrorCode.METHOD_NOT_FOUND, str(exc), None)
            return
        except Exception as exc:  # every failure of a method becomes an error reply
            code, message, data = error_for(exc)
            if code is ErrorCode.INTERNAL_ERROR:
                log.exception("control.method_failed", method=request.method)
            await self._error(request, code, message, data)
            return
        after = outcome.after if isinstance(outcome, Reply) else None
        try:
            if request.id is not None:
                await self.send(encode_result(request.id, outcome.result))
        finally:
            # The change is committed: its effect follows even if this client
            # has gone, or goes before the reply reaches it.
            if after is not None:
                self.server.carry_out(after)
        if isinstance(outcome, Stream):
            tg.start_soon(self._pump, outcome.events)

    async def _error(self, request: Request, code: ErrorCode, message: str, data: Any) -> None:
        if request.id is not None:
            await self.send(encode_error(request.id, code, message, data))

    async def _pump(self, events: AsyncIterator[dict[str, Any]]) -> None:
        try:
            async for event in events:
                await self.send(encode_notification(EVENT_METHOD, event))
        except TimeoutError:
            log.warning("control.subscriber_dropped", reason="send_timeout", pid=self.peer.pid)
        except (anyio.BrokenResourceError, anyio.ClosedResourceError, OSError):
            pass
        finally:
            self.closed = True
            if not hang_up(self.stream):  # the reading side then ends the connection
                with contextlib.suppress(Exception):
                    await self.stream.aclose()

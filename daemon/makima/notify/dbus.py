"""A small D-Bus client connection on anyio, over jeepney's sans-I/O messages.

jeepney builds, parses and authenticates D-Bus messages without doing I/O;
this module does the I/O: it connects to a bus (a Unix socket), authenticates
(EXTERNAL), says Hello, and runs one reader task that hands each method
reply to the call waiting for it and every other message (signals, method
calls) to :attr:`BusConnection.incoming`. Calls are bounded by a timeout;
when the bus goes away, waiting calls fail and ``incoming`` ends.
"""

from __future__ import annotations

import os
from collections.abc import AsyncIterator, Mapping
from contextlib import asynccontextmanager
from itertools import count
from pathlib import Path
from typing import Any, Self

import anyio
import anyio.abc
from anyio.streams.memory import MemoryObjectReceiveStream, MemoryObjectSendStream
from jeepney import (  # type: ignore[import-untyped]
    DBusAddress,
    HeaderFields,
    MessageType,
    Parser,
    new_method_call,
)
from jeepney.auth import BEGIN, AuthenticationError, Authenticator  # type: ignore[import-untyped]
from jeepney.bus import get_connectable_addresses  # type: ignore[import-untyped]

from makima.errors import MakimaError

BUS = DBusAddress(
    "/org/freedesktop/DBus", bus_name="org.freedesktop.DBus", interface="org.freedesktop.DBus"
)
MAX_MESSAGE = 1024 * 1024
"""A message longer than this from the bus ends the connection (D-Bus allows 128 MiB)."""
INCOMING_BUFFER = 256


class BusError(MakimaError):
    """Talking to a D-Bus bus went wrong."""


class BusUnavailableError(BusError):
    """No session bus could be reached."""


class BusCallError(BusError):
    """A method call was answered with a D-Bus error."""

    def __init__(self, name: str, detail: str) -> None:
        super().__init__(f"{name}: {detail}" if detail else name)
        self.name = name


def session_bus_paths(env: Mapping[str, str]) -> list[str]:
    """Where the session bus listens: ``DBUS_SESSION_BUS_ADDRESS`` (unix transports;
    an abstract socket's name starts with NUL), else ``$XDG_RUNTIME_DIR/bus`` as
    systemd's user manager makes it. Raises :class:`BusUnavailableError`."""
    address = env.get("DBUS_SESSION_BUS_ADDRESS")
    if address:
        try:
            return list(get_connectable_addresses(address))
        except (RuntimeError, ValueError) as exc:
            raise BusUnavailableError(f"DBUS_SESSION_BUS_ADDRESS is not usable ({exc})") from exc
    runtime = env.get("XDG_RUNTIME_DIR")
    if runtime and Path(runtime, "bus").exists():
        return [str(Path(runtime, "bus"))]
    raise BusUnavailableError("no session bus (DBUS_SESSION_BUS_ADDRESS is not set)")


def member(message: Any) -> tuple[str | None, str | None]:
    """A message's (interface, member)."""
    fields = message.header.fields
    return fields.get(HeaderFields.interface), fields.get(HeaderFields.member)


def sender(message: Any) -> str | None:
    value = message.header.fields.get(HeaderFields.sender)
    return value if isinstance(value, str) else None


class _Call:
    __slots__ = ("done", "reply")

    def __init__(self) -> None:
        self.done = anyio.Event()
        self.reply: Any = None


class BusConnection:
    """One connection to a bus. Open it with :meth:`open`."""

    def __init__(self, stream: anyio.abc.ByteStream, timeout: float) -> None:
        self.timeout = timeout
        self.unique_name: str | None = None
        self._stream = stream
        self._serials = count(1)
        self._calls: dict[int, _Call] = {}
        self._send_lock = anyio.Lock()
        self._incoming_send: MemoryObjectSendStream[Any]
        self.incoming: MemoryObjectReceiveStream[Any]
        self._incoming_send, self.incoming = anyio.create_memory_object_stream[Any](INCOMING_BUFFER)
        self.closed = anyio.Event()
        self.close_reason = "closed"

    @classmethod
    @asynccontextmanager
    async def open(
        cls,
        env: Mapping[str, str] | None = None,
        timeout: float = 5.0,  # noqa: ASYNC109 - a bound for connecting and each call
    ) -> AsyncIterator[Self]:
        """Connect to the session bus of ``env`` (default: this process's environment)."""
        paths = session_bus_paths(os.environ if env is None else env)
        stream = await _connect(paths, timeout)
        async with stream:
            with anyio.fail_after(timeout):
                leftover = await _authenticate(stream)
            bus = cls(stream, timeout)
            failure: BaseException | None = None
            async with anyio.create_task_group() as tg:
                tg.start_soon(bus._read, leftover)
                try:
                    (name,) = await bus.call(new_method_call(BUS, "Hello"))
                    bus.unique_name = str(name)
                    yield bus
                except Exception as exc:  # noqa: BLE001 - re-raised below, outside the task group
                    failure = exc  # so callers catch it as it is, not in an ExceptionGroup
                finally:
                    tg.cancel_scope.cancel()
                    bus._end("closed by this process")
                    bus.incoming.close()
            if failure is not None:
                raise failure

    async def call(self, message: Any) -> tuple[Any, ...]:
        """Send a method call; its reply's body, or :class:`BusCallError`."""
        serial = next(self._serials)
        waiter = _Call()
        self._calls[serial] = waiter
        try:
            with anyio.fail_after(self.timeout):
                await self._send(message, serial)
                await waiter.done.wait()
        except TimeoutError:
            raise BusError(f"no D-Bus reply within {self.timeout} s") from None
        finally:
            self._calls.pop(serial, None)
        reply = waiter.reply
        if reply is None:
            raise BusError(f"the D-Bus connection ended: {self.close_reason}")
        if reply.header.message_type is MessageType.error:
            name = str(reply.header.fields.get(HeaderFields.error_name, "error"))
            detail = str(reply.body[0]) if reply.body and isinstance(reply.body[0], str) else ""
            raise BusCallError(name, detail[:300])
        return tuple(reply.body)

    async def send(self, message: Any) -> None:
        """Send a message that expects no reply (a signal, a method return)."""
        await self._send(message, next(self._serials))

    async def _send(self, message: Any, serial: int) -> None:
        if self.closed.is_set():
            raise BusError(f"the D-Bus connection ended: {self.close_reason}")
        data = message.serialise(serial=serial)
        try:
            async with self._send_lock:
                with anyio.CancelScope(shield=True), anyio.fail_after(self.timeout):
                    await self._stream.send(data)
        except (anyio.BrokenResourceError, anyio.ClosedResourceError, OSError, TimeoutError) as exc:
            self._end(f"sending failed: {exc!r}")
            raise BusError(f"the D-Bus connection ended: {self.close_reason}") from exc

    async def _read(self, leftover: bytes) -> None:
        parser = Parser()
        data = leftover
        while True:
            if data:
                parser.add_data(data)
                try:
                    while (message := parser.get_next_message()) is not None:
                        self._dispatch(message)
                except (ValueError, KeyError, IndexError) as exc:  # jeepney's parse errors
                    self._end(f"the bus sent a message that does not parse: {exc!r}")
                    return
                if parser.buf.bytes_buffered > MAX_MESSAGE:
                    self._end("the bus sent a message over 1 MiB")
                    return
            try:
                data = await self._stream.receive()
            except (
                anyio.EndOfStream,
                anyio.BrokenResourceError,
                anyio.ClosedResourceError,
                OSError,
            ):
                self._end("the bus closed the connection")
                return

    def _dispatch(self, message: Any) -> None:
        kind = message.header.message_type
        if kind in (MessageType.method_return, MessageType.error):
            serial = message.header.fields.get(HeaderFields.reply_serial)
            waiter = self._calls.pop(serial, None) if isinstance(serial, int) else None
            if waiter is not None:
                waiter.reply = message
                waiter.done.set()
            return
        try:
            self._incoming_send.send_nowait(message)
        except anyio.WouldBlock:
            pass  # nobody reads fast enough: dropped rather than stalling the replies
        except (anyio.ClosedResourceError, anyio.BrokenResourceError):
            pass

    def _end(self, reason: str) -> None:
        if self.closed.is_set():
            return
        self.close_reason = reason
        self.closed.set()
        self._incoming_send.close()
        for waiter in self._calls.values():
            waiter.done.set()


async def _connect(paths: list[str], limit: float) -> anyio.abc.SocketStream:
    reasons = []
    for path in paths:
        try:
            with anyio.fail_after(limit):
                return await anyio.connect_unix(path)
        except (OSError, TimeoutError) as exc:
            shown = "@" + path[1:] if path.startswith("\0") else path
            reasons.append(f"{shown}: {getattr(exc, 'strerror', None) or type(exc).__name__}")
    raise BusUnavailableError(f"cannot connect to the session bus ({'; '.join(reasons)})")


async def _authenticate(stream: anyio.abc.ByteStream) -> bytes:
    """The SASL EXTERNAL exchange; returns what the bus sent past it (nothing, normally)."""
    auth = Authenticator()
    try:
        for line in auth:
            if line:
                await stream.send(line)
            data = await stream.receive()
            auth.feed(data)
    except (anyio.EndOfStream, anyio.BrokenResourceError, OSError) as exc:
        raise BusUnavailableError(
            "the session bus closed the connection while authenticating"
        ) from exc
    except AuthenticationError as exc:
        raise BusUnavailableError(f"the session bus refused authentication: {exc}") from exc
    if not auth.authenticated:
        raise BusUnavailableError("the session bus did not authenticate this connection")
    await stream.send(BEGIN)
    return b""

"""Ending a socket stream that another task is still reading."""

from __future__ import annotations

import socket

import anyio.abc


def hang_up(stream: anyio.abc.ByteStream) -> bool:
    """Shut the connection down both ways without closing the stream; False if it could not.

    A task blocked in ``receive`` then wakes through the socket itself, reads the
    end of the stream and finishes by itself. Closing the stream under it instead
    (``aclose``) or cancelling it races in anyio's asyncio UNIX streams: the
    socket's readiness callback may already be queued, and then resolves the
    receive's future a second time (InvalidStateError from the event loop).
    """
    raw = stream.extra(anyio.abc.SocketAttribute.raw_socket, None)  # noqa: S610
    if raw is None or raw.fileno() < 0:
        return False
    try:
        raw.shutdown(socket.SHUT_RDWR)
    except OSError:
        return False
    return True

"""The event loop makima runs on: asyncio's, with its own errors logged as events.

asyncio hands an exception raised by a bare callback (not a task) to the loop's
exception handler; the default one writes prose through :mod:`logging`. On
:class:`Loop`, those reports become ``loop.callback_failed`` events, except one
that is not an error at all (see :func:`is_cancelled_wakeup`). A handler set
with ``set_exception_handler`` (a test runner's, say) still gets every other
report.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar, TypeVarTuple, Unpack

import anyio
import structlog

log = structlog.get_logger("makima.loop")

T = TypeVar("T")
Args = TypeVarTuple("Args")


def is_cancelled_wakeup(context: dict[str, Any]) -> bool:
    """True when a socket-readiness wakeup fired on a future already cancelled.

    anyio's asyncio backend waits on a UNIX socket with
    ``loop.add_reader(sock, future.set_result, None)`` and unregisters the reader
    from the future's done-callback, which runs a loop turn later. If the waiting
    task is cancelled in the same turn in which the socket became ready, the
    queued ``set_result`` meets the cancelled future and raises InvalidStateError.
    The waiting task has already received its cancellation, so nothing is lost;
    only the report is spurious.
    """
    if not isinstance(context.get("exception"), asyncio.InvalidStateError):
        return False
    callback = getattr(context.get("handle"), "_callback", None)
    future = getattr(callback, "__self__", None)
    return (
        isinstance(future, asyncio.Future)
        and future.cancelled()
        and getattr(callback, "__name__", None) == "set_result"
    )


class Loop(asyncio.SelectorEventLoop):
    """asyncio's selector loop, reporting through structlog and without false alarms."""

    def call_exception_handler(self, context: dict[str, Any]) -> None:
        if is_cancelled_wakeup(context):
            log.debug("loop.cancelled_wakeup_ignored")
            return
        super().call_exception_handler(context)

    def default_exception_handler(self, context: dict[str, Any]) -> None:
        exception = context.get("exception")
        # What failed (the task, future or handle), as asyncio's own report names it.
        where = {
            key: repr(value)
            for key, value in context.items()
            if key not in ("message", "exception", "source_traceback", "handle_traceback")
        }
        log.error(
            "loop.callback_failed",
            message=context.get("message"),
            exc_info=exception if isinstance(exception, BaseException) else None,
            **where,
        )


def run(func: Callable[[Unpack[Args]], Awaitable[T]], *args: *Args) -> T:
    """``anyio.run`` on a :class:`Loop`."""
    return anyio.run(func, *args, backend="asyncio", backend_options={"loop_factory": Loop})

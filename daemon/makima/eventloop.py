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
import os
import sys
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


def pidfd_supported() -> bool:
    """True when this kernel hands out pidfds (Linux 5.3 and later)."""
    if not hasattr(os, "pidfd_open"):
        return False
    try:
        fd = os.pidfd_open(os.getpid())
    except OSError:
        return False
    os.close(fd)
    return True


if sys.version_info < (3, 12):

    class PidfdChildWatcher(asyncio.PidfdChildWatcher):
        """Python 3.12's pidfd watcher on 3.11: no thread, and no loop of its own.

        3.11's :class:`asyncio.PidfdChildWatcher` is bound to the one loop it was
        attached to; the watcher is process-wide, and another loop (a setup
        helper's in a thread, say) would register its children on the wrong
        loop. This one waits on each child's pidfd in the loop that started the
        child, as 3.12's does: a readable pidfd means the child exited, and the
        ``waitpid`` that follows does not block.
        """

        def is_active(self) -> bool:
            return True

        def close(self) -> None:
            pass

        def attach_loop(self, loop: asyncio.AbstractEventLoop | None) -> None:
            pass

        def add_child_handler(
            self, pid: int, callback: Callable[[int, int, Unpack[Args]], object], *args: *Args
        ) -> None:
            loop = asyncio.get_running_loop()
            pidfd = os.pidfd_open(pid)
            loop.add_reader(pidfd, self._reap, loop, pid, pidfd, callback, args)

        def _reap(
            self,
            loop: asyncio.AbstractEventLoop,
            pid: int,
            pidfd: int,
            callback: Callable[..., object],
            args: tuple[object, ...],
        ) -> None:
            loop.remove_reader(pidfd)
            try:
                _, status = os.waitpid(pid, 0)
            except ChildProcessError:
                # Reaped by someone else: asyncio's own watchers report 255 then.
                returncode = 255
                log.warning("loop.child_already_reaped", pid=pid)
            else:
                returncode = os.waitstatus_to_exitcode(status)
            finally:
                os.close(pidfd)
            callback(pid, returncode, *args)

        def remove_child_handler(self, pid: int) -> bool:
            # asyncio never calls it (nor does 3.12's watcher do anything here).
            return True

    def install_child_watcher(policy: asyncio.AbstractEventLoopPolicy) -> bool:
        """Give ``policy`` a pidfd child watcher in place of the threaded default.

        Returns whether one is installed now. A watcher someone chose on purpose
        (anything but the default :class:`asyncio.ThreadedChildWatcher`) is left
        alone, and so is the default when this kernel has no pidfds.
        """
        current = policy.get_child_watcher()
        if isinstance(current, PidfdChildWatcher):
            return True
        if type(current) is not asyncio.ThreadedChildWatcher or not pidfd_supported():
            return False
        policy.set_child_watcher(PidfdChildWatcher())
        log.debug("loop.pidfd_child_watcher_installed")
        return True

else:

    def install_child_watcher(policy: asyncio.AbstractEventLoopPolicy) -> bool:
        """Nothing to do: since Python 3.12 asyncio waits on pidfds by default
        (and setting a child watcher is deprecated)."""
        return False


class Loop(asyncio.SelectorEventLoop):
    """asyncio's selector loop, reporting through structlog and without false alarms,
    whose children are reaped without a thread each (see :func:`install_child_watcher`)."""

    def __init__(self, selector: Any = None) -> None:
        super().__init__(selector)
        if sys.platform == "linux":
            install_child_watcher(asyncio.get_event_loop_policy())

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


class IdleLock:
    """An :class:`anyio.Lock` that exists only while someone holds it or waits for it.

    A lock costs about 0.4 KB (its waiters' deque); an idle supervisor holds no
    lock, so thousands of them need not keep one each. The lock is made on the
    first acquire and dropped on the release that leaves it free with nobody
    waiting, so that whoever comes next makes a new one; one that holds or
    waits always has the current lock.
    """

    __slots__ = ("_lock",)

    def __init__(self) -> None:
        self._lock: anyio.Lock | None = None

    async def __aenter__(self) -> None:
        lock = self._lock
        if lock is None:
            lock = self._lock = anyio.Lock()
        await lock.acquire()

    async def __aexit__(self, *exc_info: object) -> None:
        lock = self._lock
        assert lock is not None
        lock.release()
        if not lock.locked() and not lock.statistics().tasks_waiting:
            self._lock = None

    def locked(self) -> bool:
        return self._lock is not None and self._lock.locked()

    def statistics(self) -> anyio.LockStatistics:
        if self._lock is None:
            return anyio.LockStatistics(locked=False, owner=None, tasks_waiting=0)
        return self._lock.statistics()


def run(func: Callable[[Unpack[Args]], Awaitable[T]], *args: *Args) -> T:
    """``anyio.run`` on a :class:`Loop`."""
    return anyio.run(func, *args, backend="asyncio", backend_options={"loop_factory": Loop})

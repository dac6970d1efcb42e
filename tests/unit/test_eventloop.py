"""makima's event loop: the spurious wakeup report is dropped, real ones are not."""

from __future__ import annotations

import asyncio
import socket
from collections.abc import Awaitable, Callable
from typing import Any

import anyio
import anyio.abc
import anyio.lowlevel
import pytest
import structlog

from makima import eventloop
from makima.control.streams import hang_up

Interrupt = Callable[[anyio.abc.SocketStream, anyio.CancelScope], Awaitable[None]]


async def race(interrupt: Interrupt) -> str:
    """Park a task in ``receive`` on a UNIX stream; then, in one loop turn, run
    ``interrupt`` (up to its first await) just before the socket's readiness
    callback. Return how the receive ended."""
    ours, theirs = socket.socketpair()
    outcome = "still reading"
    with ours:
        async with await anyio.abc.UNIXSocketStream.from_socket(theirs) as stream:
            scope = anyio.CancelScope()
            parked, go = anyio.Event(), anyio.Event()

            async def receive() -> None:
                nonlocal outcome
                with scope:
                    parked.set()
                    try:
                        outcome = f"received {await stream.receive()!r}"
                    except anyio.EndOfStream:
                        outcome = "end of stream"
                    except anyio.ClosedResourceError:
                        outcome = "closed"
                if scope.cancelled_caught:
                    outcome = "cancelled"

            async def interrupter() -> None:
                await go.wait()
                await interrupt(stream, scope)

            with anyio.fail_after(5):
                async with anyio.create_task_group() as tg:
                    tg.start_soon(receive)
                    tg.start_soon(interrupter)
                    await parked.wait()
                    await anyio.lowlevel.checkpoint()  # the receive waits on its future now
                    ours.send(b"x")  # seen at the next turn's poll...
                    go.set()  # ...which runs after the interrupter's next step
    return outcome


async def cancel(stream: anyio.abc.SocketStream, scope: anyio.CancelScope) -> None:
    scope.cancel()


async def close(stream: anyio.abc.SocketStream, scope: anyio.CancelScope) -> None:
    await stream.aclose()


async def hang_up_(stream: anyio.abc.SocketStream, scope: anyio.CancelScope) -> None:
    assert hang_up(stream)


def run_with_reports(
    loop_factory: Any, interrupt: Interrupt
) -> tuple[str, list[tuple[type[BaseException], bool]]]:
    """How the receive ended, and each loop report: the exception's type and whether it
    looked like a cancelled wakeup when reported (a cancelled handle forgets its callback)."""
    reports: list[tuple[type[BaseException], bool]] = []

    def handler(_loop: object, context: dict[str, Any]) -> None:
        reports.append((type(context["exception"]), eventloop.is_cancelled_wakeup(context)))

    async def main() -> str:
        asyncio.get_running_loop().set_exception_handler(handler)
        return await race(interrupt)

    outcome = anyio.run(main, backend="asyncio", backend_options={"loop_factory": loop_factory})
    return outcome, reports


def test_plain_asyncio_reports_a_cancelled_wakeup() -> None:
    outcome, reports = run_with_reports(asyncio.new_event_loop, cancel)
    assert outcome == "cancelled"
    if not reports:
        pytest.skip("this anyio no longer resolves a cancelled receive's future again")
    assert reports == [(asyncio.InvalidStateError, True)]


def test_makima_loop_drops_the_cancelled_wakeup() -> None:
    assert run_with_reports(eventloop.Loop, cancel) == ("cancelled", [])


def test_closing_under_a_reader_is_a_real_report() -> None:
    """Why the control client and server never close a stream that is being read: the
    future is resolved twice, which is not the harmless case the loop drops."""
    outcome, reports = run_with_reports(eventloop.Loop, close)
    assert outcome == "closed"
    if not reports:
        pytest.skip("this anyio no longer resolves a closed receive's future again")
    assert reports == [(asyncio.InvalidStateError, False)]


def test_hanging_up_wakes_the_reader_cleanly() -> None:
    assert run_with_reports(asyncio.new_event_loop, hang_up_) == ("received b'x'", [])


def test_other_callback_errors_reach_the_handler() -> None:
    reports: list[dict[str, Any]] = []

    async def main() -> None:
        loop = asyncio.get_running_loop()
        loop.set_exception_handler(lambda _loop, context: reports.append(context))
        future = loop.create_future()
        future.set_result(1)
        loop.call_soon(future.set_result, 2)  # done, not cancelled: a real error
        await anyio.lowlevel.checkpoint()
        await anyio.lowlevel.checkpoint()

    eventloop.run(main)
    assert [type(r["exception"]) for r in reports] == [asyncio.InvalidStateError]
    assert not eventloop.is_cancelled_wakeup(reports[0])


def test_without_a_handler_errors_are_logged_as_events() -> None:
    def fail() -> None:
        raise ValueError("boom")

    async def main() -> None:
        asyncio.get_running_loop().call_soon(fail)
        await anyio.lowlevel.checkpoint()

    with structlog.testing.capture_logs() as logs:
        eventloop.run(main)
    failed = [e for e in logs if e["event"] == "loop.callback_failed"]
    assert len(failed) == 1
    assert "fail" in failed[0]["message"] and "fail" in failed[0]["handle"]
    assert isinstance(failed[0]["exc_info"], ValueError)


@pytest.mark.parametrize(
    "context",
    [
        {},
        {"exception": ValueError("x")},
        {"exception": asyncio.InvalidStateError(), "handle": None},
    ],
)
def test_is_cancelled_wakeup_needs_all_the_signs(context: dict[str, Any]) -> None:
    assert not eventloop.is_cancelled_wakeup(context)


# --------------------------------------------------------------------------- IdleLock


@pytest.mark.anyio
async def test_idle_lock_excludes_and_exists_only_while_used() -> None:
    lock = eventloop.IdleLock()
    assert not lock.locked() and lock.statistics().tasks_waiting == 0
    order: list[str] = []
    second_waiting = anyio.Event()

    async def second() -> None:
        second_waiting.set()
        async with lock:
            order.append("second")

    async with anyio.create_task_group() as tg, lock:
        assert lock.locked()
        tg.start_soon(second)
        await second_waiting.wait()
        with anyio.fail_after(5):
            while lock.statistics().tasks_waiting != 1:
                await anyio.lowlevel.checkpoint()
        order.append("first")
    assert order == ["first", "second"]
    assert not lock.locked() and lock._lock is None  # dropped once free


@pytest.mark.anyio
async def test_idle_lock_survives_a_cancelled_waiter() -> None:
    lock = eventloop.IdleLock()

    async def waiter() -> None:
        async with lock:
            raise AssertionError("acquired a held lock")

    async with lock, anyio.create_task_group() as tg:
        tg.start_soon(waiter)
        with anyio.fail_after(5):
            while lock.statistics().tasks_waiting != 1:
                await anyio.lowlevel.checkpoint()
        tg.cancel_scope.cancel()
    assert not lock.locked() and lock._lock is None
    async with lock:
        assert lock.locked()

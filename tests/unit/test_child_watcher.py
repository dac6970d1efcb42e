"""Children of makima's loop are reaped through pidfds, not one waitpid thread each."""

from __future__ import annotations

import asyncio
import os
import signal
import sys
import threading

import anyio
import anyio.abc
import pytest

from makima import eventloop

pytestmark = pytest.mark.skipif(sys.platform != "linux", reason="pidfds are Linux's")

CHILDREN = 200
# Each child waits for one line, then exits with the status that line names. A
# fixed script, never built from input; sh is light enough to run 200 at once.
EXIT_WITH_WHAT_IT_READS = ("/bin/sh", "-c", 'read code; exit "$code"')


def threads() -> set[threading.Thread]:
    return set(threading.enumerate())


async def run_children(count: int) -> tuple[int, int, list[int]]:
    """Start ``count`` children, all alive at once; return how many threads there
    were before them, how many threads started while all of them ran, and their
    exit codes in order. Child ``i`` exits with ``i % 256``, except every 50th,
    which is killed. (Threads are compared as sets: an idle worker thread of
    another loop may end meanwhile.)"""
    before = threads()
    processes: list[anyio.abc.Process] = []
    try:
        for _ in range(count):
            processes.append(
                await anyio.open_process(EXIT_WITH_WHAT_IT_READS, stdin=-1, stdout=-3, stderr=-3)
            )
        started = len(threads() - before)
        for i, process in enumerate(processes):
            if i % 50 == 49:
                process.kill()
            else:
                assert process.stdin is not None
                await process.stdin.send(b"%d\n" % (i % 256))
        with anyio.fail_after(60):
            codes = [await process.wait() for process in processes]
    finally:
        for process in processes:
            if process.returncode is None:
                process.kill()
        with anyio.CancelScope(shield=True):
            for process in processes:
                await process.aclose()
    return len(before), started, codes


def expected_codes(count: int) -> list[int]:
    return [-signal.SIGKILL if i % 50 == 49 else i % 256 for i in range(count)]


@pytest.mark.skipif(not eventloop.pidfd_supported(), reason="this kernel has no pidfd_open")
def test_two_hundred_children_take_no_thread_and_are_all_reaped() -> None:
    before = threads()
    _, started, codes = eventloop.run(run_children, CHILDREN)
    assert started == 0, f"{started} threads for {CHILDREN} children"
    assert codes == expected_codes(CHILDREN)
    assert not threads() - before


@pytest.mark.skipif(not eventloop.pidfd_supported(), reason="this kernel has no pidfd_open")
def test_children_of_two_loops_at_once_are_each_reaped_by_their_own() -> None:
    """The watcher is process-wide; a loop in another thread (as conftest's setup
    helper runs) must still get its own children's exits."""
    results: list[tuple[int, int, list[int]]] = []
    errors: list[BaseException] = []

    def other() -> None:
        try:
            results.append(eventloop.run(run_children, 20))
        except BaseException as exc:
            errors.append(exc)

    async def main() -> list[int]:
        thread = threading.Thread(target=other)
        thread.start()
        try:
            _, _, codes = await run_children(20)
        finally:
            await anyio.to_thread.run_sync(thread.join)
        return codes

    assert eventloop.run(main) == expected_codes(20)
    assert not errors
    assert [codes for _, _, codes in results] == [expected_codes(20)]


@pytest.mark.skipif(sys.version_info >= (3, 12), reason="3.12+ reaps through pidfds already")
def test_a_fresh_policy_gets_the_pidfd_watcher_on_3_11() -> None:
    policy = asyncio.DefaultEventLoopPolicy()
    assert isinstance(policy.get_child_watcher(), asyncio.ThreadedChildWatcher)
    installed = eventloop.install_child_watcher(policy)
    assert installed == eventloop.pidfd_supported()
    if installed:
        assert isinstance(policy.get_child_watcher(), asyncio.PidfdChildWatcher)
        assert eventloop.install_child_watcher(policy)  # idempotent


@pytest.mark.skipif(sys.version_info >= (3, 12), reason="3.12+ reaps through pidfds already")
def test_without_pidfds_the_threaded_default_stays(monkeypatch: pytest.MonkeyPatch) -> None:
    def no_pidfds(pid: int, flags: int = 0) -> int:
        raise OSError(38, "Function not implemented")  # ENOSYS, as an old kernel says

    monkeypatch.setattr(os, "pidfd_open", no_pidfds)
    assert not eventloop.pidfd_supported()
    policy = asyncio.DefaultEventLoopPolicy()
    assert not eventloop.install_child_watcher(policy)
    assert type(policy.get_child_watcher()) is asyncio.ThreadedChildWatcher


@pytest.mark.skipif(sys.version_info >= (3, 12), reason="3.12+ reaps through pidfds already")
def test_a_watcher_chosen_on_purpose_is_kept() -> None:
    policy = asyncio.DefaultEventLoopPolicy()
    chosen = asyncio.SafeChildWatcher()
    policy.set_child_watcher(chosen)
    assert not eventloop.install_child_watcher(policy)
    assert policy.get_child_watcher() is chosen
    chosen.close()


@pytest.mark.skipif(sys.version_info < (3, 12), reason="only 3.12+ leaves the default alone")
def test_nothing_is_installed_on_3_12() -> None:
    assert not eventloop.install_child_watcher(asyncio.get_event_loop_policy())

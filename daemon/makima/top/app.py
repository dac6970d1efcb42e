"""The I/O of ``makima top``: the daemon connection, the screen, the keys.

One connection at a time: ``events.subscribe`` first (its ``question.pending``
snapshot then live events), then one ``supervisor.list``; from then on the
view changes only with events (and one ``supervisor.get`` for a supervisor an
event names that top has not seen). The only timer is the clock for the ages
shown, which redraws the screen once a second without a call to the daemon.
When the connection is lost the screen says so and top connects again, waiting
0.5 s, then 1, 2, 4 … up to 10 s between attempts.

On a terminal the view is a rich ``Live`` screen driven by keys; with stdout
elsewhere (a pipe, a file) the plain fallback prints a table whenever what it
shows changes, at most once a second, with no cursor control and no keys.
"""

from __future__ import annotations

import io
import os
import random
import signal
import sys
import time
from collections import deque
from collections.abc import Callable, Hashable
from contextlib import ExitStack
from datetime import UTC, datetime
from pathlib import Path
from typing import TextIO

import anyio
import anyio.abc
import structlog
from rich.console import Console
from rich.live import Live

from makima.control.client import ControlClient, ControlError, RemoteError
from makima.control.codec import ErrorCode
from makima.top.model import (
    KINDS,
    Effect,
    Fetch,
    Quit,
    SendAnswer,
    SendCancel,
    TopModel,
)
from makima.top.render import render
from makima.top.terminal import KeyboardMode, read_keys

log = structlog.get_logger("makima.top")

CALL_TIMEOUT = 30.0
EVENT_BUFFER = 1_000_000
"""Events the subscription may hold before they are read (the snapshot of open
questions comes at once)."""
BACKOFF_FIRST = 0.5
BACKOFF_MAX = 10.0
PLAIN_INTERVAL = 1.0
"""The plain fallback looks for changes (and prints at most one table) this often."""
MIN_FRAME = 0.05
"""Seconds between two frames on the screen at least."""
SNAPSHOT_WAIT = 2.0
"""Seconds the plain fallback's first table waits for the snapshot's open questions."""

Quitter = Callable[[int], None]


def utcnow() -> datetime:
    return datetime.now(UTC)


class Redraw:
    """A flag the screen waits on: something changed, draw again."""

    def __init__(self) -> None:
        self._event = anyio.Event()

    def request(self) -> None:
        self._event.set()

    async def wait(self, timeout: float) -> None:  # noqa: ASYNC109 - a redraw's deadline
        """Until a change is requested or ``timeout`` seconds pass."""
        with anyio.move_on_after(timeout):
            await self._event.wait()
        self._event = anyio.Event()


class Link:
    """The connection to the daemon: it feeds the model and carries its effects."""

    def __init__(self, path: Path, model: TopModel, redraw: Redraw) -> None:
        self.path = path
        self.model = model
        self.redraw = redraw
        self._client: ControlClient | None = None
        self._calls: anyio.abc.TaskGroup | None = None
        self._ready: Callable[[], None] | None = None
        self._snapshot_taken = False

    def submit(self, effect: Effect) -> None:
        """Carry out ``effect`` on the current connection, without waiting for it."""
        if isinstance(effect, Quit):
            return
        if self._client is None or self._calls is None:
            self.model.failed(effect, "not connected to the daemon", utcnow())
            self.redraw.request()
            return
        self._calls.start_soon(self._perform, self._client, effect)

    async def _perform(self, client: ControlClient, effect: Effect) -> None:
        try:
            if isinstance(effect, Fetch):
                body = await client.call("supervisor.get", {"supervisor_id": effect.supervisor_id})
                self.model.apply_fetched(body, utcnow())
            elif isinstance(effect, SendAnswer):
                await client.call(
                    "question.answer", {"question_id": effect.question_id, "answer": effect.answer}
                )
                log.info("top.answered", question_id=effect.question_id)
                self.model.answered(effect, utcnow())
            elif isinstance(effect, SendCancel):
                result = await client.call(
                    "supervisor.cancel", {"supervisor_id": effect.supervisor_id}
                )
                log.info("top.cancelled", supervisor_id=effect.supervisor_id)
                self.model.cancelled(effect, str(result.get("state")), utcnow())
        except RemoteError as exc:
            log.warning("top.call_failed", effect=type(effect).__name__, error=exc.message)
            self.model.failed(effect, exc.message, utcnow())
        except ControlError as exc:
            log.warning("top.call_failed", effect=type(effect).__name__, error=str(exc))
            self.model.failed(effect, str(exc), utcnow())
        self.redraw.request()

    async def follow(self, *, task_status: anyio.abc.TaskStatus[None]) -> None:
        """Follow the daemon for ever. Started once the first snapshot is taken; the
        first connection's failure is raised (there is no daemon there to wait for)."""
        self._ready = task_status.started
        delay = BACKOFF_FIRST
        while True:
            self._snapshot_taken = False
            try:
                reason = await self._session()
            except RemoteError as exc:
                if exc.code == ErrorCode.FORBIDDEN or self._never_connected():
                    raise
                reason = exc.message
            except ControlError as exc:
                if self._never_connected():
                    raise
                reason = str(exc)
            if self._snapshot_taken:
                delay = BACKOFF_FIRST
            self.model.connection_lost(reason)
            self.redraw.request()
            log.warning("top.daemon_gone", reason=reason, retry_in=delay)
            jitter = random.uniform(0, delay / 5)  # noqa: S311 - spread, not a secret
            await anyio.sleep(delay + jitter)
            delay = min(delay * 2, BACKOFF_MAX)

    def _never_connected(self) -> bool:
        return self._ready is not None

    async def _session(self) -> str:
        """One connection: snapshot, then events until it ends (the reason it ended)."""
        async with (
            ControlClient.connect(self.path, timeout=CALL_TIMEOUT) as client,
            client.events(list(KINDS), buffer=EVENT_BUFFER) as events,
        ):
            listed = await client.call("supervisor.list", {"all": False})
            self.model.load(listed.get("supervisors", []))
            self.model.connected()
            self._snapshot_taken = True
            count = len(self.model.supervisors)
            log.info("top.connected", socket=str(self.path), supervisors=count)
            self.redraw.request()
            if self._ready is not None:
                ready, self._ready = self._ready, None
                ready()
            failure: ControlError | None = None
            async with anyio.create_task_group() as calls:
                self._client, self._calls = client, calls
                try:
                    async for event in events:
                        for effect in self.model.apply_event(event, utcnow()):
                            self.submit(effect)
                        self.redraw.request()
                except ControlError as exc:  # raised after the task group, not in a group
                    failure = exc
                finally:
                    self._client = self._calls = None
                    calls.cancel_scope.cancel()  # calls on a dead connection
            if failure is not None:
                raise failure
        return "the daemon closed the connection"


# --------------------------------------------------------------------------- loops


async def watch_signals(
    quit_with: Quitter, redraw: Redraw, *, task_status: anyio.abc.TaskStatus[None]
) -> None:
    """Ctrl-C quits (exit 0); SIGTERM and SIGHUP quit with 128 + the signal's number
    (the terminal is put back either way); a resized terminal is drawn again."""
    wanted = [signal.SIGINT, signal.SIGTERM, signal.SIGHUP, signal.SIGWINCH]
    with anyio.open_signal_receiver(*wanted) as received:
        task_status.started()
        async for signum in received:
            if signum == signal.SIGWINCH:
                redraw.request()
            elif signum == signal.SIGINT:
                quit_with(0)
            else:
                quit_with(128 + signum)


async def follow_keys(
    fd: int, model: TopModel, link: Link, redraw: Redraw, quit_with: Quitter
) -> None:
    async for batch in read_keys(fd):
        for key in batch:
            for effect in model.handle_key(key, utcnow()):
                if isinstance(effect, Quit):
                    quit_with(0)
                    return
                link.submit(effect)
        redraw.request()
    # The terminal is gone (EOF): keys are over, the view goes on until a signal.
    model.keys_enabled = False
    redraw.request()


def until_next_second() -> float:
    return 1.0 - time.time() % 1.0 + 0.001


async def show_live(live: Live, console: Console, model: TopModel, redraw: Redraw) -> None:
    """Draw at every change (at most one frame per :data:`MIN_FRAME`, so a burst of
    events is drawn once) and at every second of the clock, for the ages."""
    ascii_only = not console.encoding.lower().startswith("utf")
    while True:
        now = utcnow()
        model.tick(now)
        size = console.size
        live.update(
            render(model, now, size.width, size.height, ascii_only=ascii_only), refresh=True
        )
        drawn = anyio.current_time()
        await redraw.wait(until_next_second())
        await anyio.sleep(max(0.0, drawn + MIN_FRAME - anyio.current_time()))


def plain_key(model: TopModel) -> Hashable:
    """What the plain table shows, less the ages: it is printed when this changes."""
    return (
        model.connection,
        tuple(
            (s.supervisor_id, s.name, s.state, s.phase, s.progress, s.current_activity)
            for s in model.supervisor_rows()
        ),
        tuple(q.question_id for q in model.question_rows()),
    )


async def print_plain(console: Console, model: TopModel, redraw: Redraw) -> None:
    """Print the table when what it shows changed, looking once a second."""
    shown: Hashable = None
    checked = -1  # the model's revision when last looked at
    settled = 0  # the snapshot whose open questions were waited for
    while True:
        if settled != model.snapshots:
            # A new snapshot's open questions come as events after its rows: the
            # table waits (a little) for them.
            settled = model.snapshots
            with anyio.move_on_after(SNAPSHOT_WAIT):
                while not model.questions_arrived:
                    await redraw.wait(SNAPSHOT_WAIT)
        now = utcnow()
        model.tick(now)
        if model.revision != checked:
            checked = model.revision
            key = plain_key(model)
            if key != shown:
                shown = key
                console.print(render(model, now, console.width, None, plain=True))
                console.print()
                console.file.flush()
        await anyio.sleep(PLAIN_INTERVAL)


# --------------------------------------------------------------------------- main


class HeldLog(io.StringIO):
    """Log lines held while the screen is up, written out when it is gone."""

    def __init__(self, keep: int = 200) -> None:
        super().__init__()
        self.lines: deque[str] = deque(maxlen=keep)

    def write(self, text: str) -> int:
        self.lines.extend(line for line in text.splitlines() if line)
        return len(text)

    def isatty(self) -> bool:
        return False


async def run(path: Path, out: TextIO, stdin: TextIO) -> int:
    """``makima top`` on ``out`` (a live screen on a terminal, else the plain
    fallback), keys from ``stdin`` when it is a terminal. Returns the exit code."""
    interactive = out.isatty()
    keys_fd = stdin.fileno() if interactive and stdin.isatty() else None
    model = TopModel(keys_enabled=keys_fd is not None)
    redraw = Redraw()
    link = Link(path, model, redraw)
    code = 0
    async with anyio.create_task_group() as tg:

        def quit_with(exit_code: int) -> None:
            nonlocal code
            code = exit_code
            tg.cancel_scope.cancel()

        await tg.start(watch_signals, quit_with, redraw)
        await tg.start(link.follow)
        if not interactive:
            await print_plain(Console(file=out, soft_wrap=False), model, redraw)
            return code  # not reached: it runs until a signal
        console = Console(file=out)
        with ExitStack() as stack:
            if keys_fd is not None:
                stack.enter_context(KeyboardMode(keys_fd))
            live = stack.enter_context(
                Live(
                    console=console,
                    screen=True,
                    auto_refresh=False,
                    redirect_stdout=False,
                    redirect_stderr=False,
                    transient=True,
                )
            )
            if keys_fd is not None:
                tg.start_soon(follow_keys, keys_fd, model, link, redraw, quit_with)
            await show_live(live, console, model, redraw)
    return code


def quiet_stdout() -> None:
    """stdout's reader went away (``makima top | head``): nothing more to write, and
    nothing to complain about at exit."""
    with open(os.devnull, "w") as devnull:
        os.dup2(devnull.fileno(), sys.stdout.fileno())

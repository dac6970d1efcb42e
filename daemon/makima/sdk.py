"""Write a makima agent in a few lines: the agent side of makima-agent/1.

An agent is a child process of the makima daemon. It speaks the agent
protocol (DESIGN §8) on its stdin and stdout: UTF-8 JSON, one object per
line, at most 1 MiB a line. This module does the protocol for you::

    import makima.sdk

    async def main(agent: makima.sdk.Agent) -> None:
        await agent.phase("checks")
        await agent.activity("running the checks", progress=10)
        task_id = await agent.spawn("lint", ["ruff", "check", "."])
        results = await agent.wait_tasks()
        answer = await agent.ask("Ship it?", choices=["ship", "hold"])
        await agent.done({"answer": answer})

    makima.sdk.run(main)

What :func:`run` does for you:

- It takes the real stdin and stdout for the protocol and gives the rest of
  the program a harmless stdio: ``print`` (and anything a subprocess writes
  to its inherited stdout) goes to stderr, which the daemon logs; reading
  stdin gives end-of-file. A stray ``print`` cannot corrupt the protocol.
  (Only from the moment :func:`run` starts: do not write to stdout before
  calling it - with ``PYTHONUNBUFFERED`` such output reaches the daemon.)
- It reads the daemon's ``start`` message, then runs ``main(agent)``.
- Every call that sends a message uses a fresh ``ref`` and returns once the
  daemon has acknowledged it, i.e. once the effect is durable; an ``error``
  reply raises :class:`DaemonError`.
- When stdin closes (the daemon is gone) or the daemon sends ``cancel``,
  ``main`` is cancelled and the process exits at once; if ``main`` does not
  stop within ``exit_grace`` seconds the process is ended anyway, so no
  agent outlives its daemon.
- When the daemon has gone silent past its lease, the agent stops itself.
  A daemon sharing its database with peers under leases sends
  ``{"type": "ping", "valid_for": S}`` after each lease renewal: its lease is
  valid for at least S more seconds. Each ping re-arms a deadline S seconds
  after its receipt, kept on a clock that counts while the machine is
  suspended (``CLOCK_BOOTTIME`` on Linux, else ``time.monotonic``); other lines
  do not extend it. If the deadline passes with no newer ping, a paused or
  frozen daemon may have lost the supervisor to a peer that now runs a new
  agent for it, so this one logs a line on stderr, runs the hooks registered
  with :meth:`Agent.on_daemon_lost` (e.g. to kill a child it drives), cancels
  ``main`` and exits with :data:`EXIT_DAEMON_SILENT`. Before the first ping
  there is no deadline: an agent of a daemon that never pings (one on the
  embedded single-machine database) never stops itself. Agents that speak the
  raw protocol without this SDK ignore pings and are not stopped this way;
  their daemon stops them when it runs again and finds itself fenced.
- If ``main`` returns without having sent ``done`` or ``fail``, the SDK sends
  ``done`` with the returned value as ``result``. If ``main`` raises, the
  traceback goes to stderr and the process exits with status 1 *without*
  sending ``fail``: the daemon treats it as a crash and restarts the agent
  (with backoff) through restoration. Call :meth:`Agent.fail` yourself for a
  failure that should be final.

Restoration: after a crash or a restart the daemon sends ``start`` again with
``restoration`` filled in. :attr:`Agent.checkpoint_data` holds the last data
you saved with :meth:`Agent.checkpoint`, so you can skip work already done.
:meth:`Agent.ask` is restoration-aware: asking the same question text as a
question still open from before the restart (``pending_questions``), or one
whose answer was recorded but never delivered (``undelivered_answers``),
does not ask a person again; it returns that question's answer. Every answer
is returned exactly once.

Standard library only (plus makima's own exception root), so an agent needs
nothing but the ``makima`` package.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import itertools
import json
import logging
import math
import os
import select
import sys
import threading
import time
import types
from collections.abc import Awaitable, Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Final, NoReturn

from makima.errors import MakimaError

__all__ = [
    "EXIT_CANCELLED",
    "EXIT_DAEMON_GONE",
    "EXIT_DAEMON_SILENT",
    "EXIT_ERROR",
    "EXIT_OK",
    "EXIT_PROTOCOL",
    "FINISHED_TASK_STATUSES",
    "MAX_LINE",
    "PROTOCOL_VERSION",
    "Agent",
    "AgentError",
    "AgentMain",
    "DaemonError",
    "DaemonGoneError",
    "OpenQuestion",
    "ProtocolError",
    "Restoration",
    "StartMessage",
    "TaskResult",
    "UndeliveredAnswer",
    "arun",
    "run",
]

log = logging.getLogger("makima.sdk")

PROTOCOL_VERSION: Final = 1
MAX_LINE: Final = 1 << 20
DROPPED_LINE: Final = b"\x00(a line over the limit, dropped)"
"""What the stdin reader hands on in place of a line over :data:`MAX_LINE`."""
"""The longest line either side may send: 1 MiB, not counting the newline."""

EXIT_OK: Final = 0
"""``main`` finished and ``done`` or ``fail`` was acknowledged."""
EXIT_CANCELLED: Final = 0
"""The daemon sent ``cancel``; the agent stopped as asked."""
EXIT_ERROR: Final = 1
"""``main`` raised (or ``done`` could not be sent); the daemon may restart the agent."""
EXIT_PROTOCOL: Final = 2
"""No usable protocol channel, or the daemon's first message was not a valid ``start``."""
EXIT_DAEMON_GONE: Final = 3
"""stdin closed (or stdout broke) before the agent finished."""
EXIT_DAEMON_SILENT: Final = 75
"""The daemon's last ``ping`` ran out with no newer one (its lease may have passed
to a peer): the agent stopped itself. 75 is ``EX_TEMPFAIL`` of sysexits.h."""

SILENCE_RECHECK: Final = 1.0
"""The longest the ping watchdog sleeps before it looks at the clock again, so
that a stop after the machine resumes from suspension comes within a second
(the event loop's timers do not count suspended time)."""

FINISHED_TASK_STATUSES: Final = frozenset({"succeeded", "failed", "cancelled", "interrupted"})

_READ_CHUNK = 64 * 1024


# --------------------------------------------------------------------------- errors


class AgentError(MakimaError):
    """Root of the errors the SDK raises."""


class DaemonError(AgentError):
    """The daemon answered a message with an ``error`` reply."""

    def __init__(self, request: str, code: str, message: str, ref: str | None) -> None:
        super().__init__(f"the daemon refused {request!r} (ref {ref}): {code}: {message}")
        self.request = request
        self.code = code
        self.message = message
        self.ref = ref


class DaemonGoneError(AgentError):
    """The protocol channel is closed: stdin reached end-of-file or stdout broke."""


class ProtocolError(AgentError):
    """The daemon sent something this SDK cannot use (e.g. a malformed ``start``)."""


# --------------------------------------------------------------------------- messages


def _need_str(obj: Mapping[str, Any], key: str, what: str) -> str:
    value = obj.get(key)
    if not isinstance(value, str):
        raise ProtocolError(f"{what}: {key!r} must be a string; got {value!r}")
    return value


def _opt_str(obj: Mapping[str, Any], key: str, what: str) -> str | None:
    value = obj.get(key)
    if value is not None and not isinstance(value, str):
        raise ProtocolError(f"{what}: {key!r} must be a string or null; got {value!r}")
    return value


def _opt_int(obj: Mapping[str, Any], key: str, what: str) -> int | None:
    value = obj.get(key)
    if value is not None and (isinstance(value, bool) or not isinstance(value, int)):
        raise ProtocolError(f"{what}: {key!r} must be an integer or null; got {value!r}")
    return value


def _id(obj: Mapping[str, Any], keys: Sequence[str], what: str) -> str:
    for key in keys:
        value = obj.get(key)
        if isinstance(value, str) and value:
            return value
        if isinstance(value, int) and not isinstance(value, bool):
            return str(value)
    raise ProtocolError(f"{what}: needs {' or '.join(map(repr, keys))}; got {dict(obj)!r}")


def _str_list(value: object, what: str) -> tuple[str, ...]:
    if value is None:
        return ()
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise ProtocolError(f"{what} must be a list of strings; got {value!r}")
    return tuple(value)


def _objects(value: object, what: str) -> list[Mapping[str, Any]]:
    if value is None:
        return []
    if not isinstance(value, list) or not all(isinstance(v, dict) for v in value):
        raise ProtocolError(f"{what} must be a list of objects; got {value!r}")
    return value


def _answer_text(value: object) -> str:
    return value if isinstance(value, str) else json.dumps(value, ensure_ascii=False)


@dataclass(frozen=True, slots=True)
class OpenQuestion:
    """A question asked before the restart and still waiting for its answer."""

    question_id: str
    question: str
    choices: tuple[str, ...] = ()
    context: str | None = None
    asked_at: str | None = None

    @classmethod
    def from_json(cls, obj: Mapping[str, Any]) -> OpenQuestion:
        what = "restoration.pending_questions[]"
        return cls(
            question_id=_id(obj, ("id", "question_id"), what),
            question=_need_str(obj, "question", what),
            choices=_str_list(obj.get("choices"), f"{what}.choices"),
            context=_opt_str(obj, "context", what),
            asked_at=_opt_str(obj, "asked_at", what),
        )


@dataclass(frozen=True, slots=True)
class UndeliveredAnswer:
    """An answer recorded before the restart but never received by the agent.

    ``question`` is the question's text when the daemon sends it (or when the
    question is also listed in ``pending_questions``); without it the answer can
    still be had with :meth:`Agent.wait_answer`, but :meth:`Agent.ask` cannot
    match it by text.
    """

    question_id: str
    answer: str
    question: str | None = None

    @classmethod
    def from_json(cls, obj: Mapping[str, Any]) -> UndeliveredAnswer:
        what = "restoration.undelivered_answers[]"
        if "answer" not in obj:
            raise ProtocolError(f"{what}: needs 'answer'; got {dict(obj)!r}")
        return cls(
            question_id=_id(obj, ("question_id", "id"), what),
            answer=_answer_text(obj["answer"]),
            question=_opt_str(obj, "question", what),
        )


@dataclass(frozen=True, slots=True)
class TaskResult:
    """What is known about a spawned task; ``finished`` once it has ended."""

    task_id: str
    status: str
    exit_code: int | None = None
    output_tail: str | None = None
    name: str | None = None
    command: tuple[str, ...] = ()

    @property
    def finished(self) -> bool:
        return self.status in FINISHED_TASK_STATUSES

    @property
    def ok(self) -> bool:
        """True when the task succeeded."""
        return self.status == "succeeded"

    @classmethod
    def from_json(cls, obj: Mapping[str, Any], what: str = "task") -> TaskResult:
        command = obj.get("command")
        return cls(
            task_id=_id(obj, ("task_id", "id"), what),
            status=_need_str(obj, "status", what),
            exit_code=_opt_int(obj, "exit_code", what),
            output_tail=_opt_str(obj, "output_tail", what),
            name=_opt_str(obj, "name", what),
            command=_str_list(command, f"{what}.command") if command is not None else (),
        )


@dataclass(frozen=True, slots=True)
class Restoration:
    """The ``restoration`` part of ``start``: why and from where the agent is resumed."""

    source: str
    restoration_count: int = 0
    context_message: str = ""
    phase: str | None = None
    state: str | None = None
    progress: int | None = None
    current_activity: str | None = None
    checkpoint: Any = None
    history: tuple[Mapping[str, Any], ...] = ()
    pending_questions: tuple[OpenQuestion, ...] = ()
    undelivered_answers: tuple[UndeliveredAnswer, ...] = ()
    tasks: tuple[TaskResult, ...] = ()
    history_before: int | None = None  # page back from here with Agent.history
    history_more: bool = False  # older history exists than what came in ``history``
    tasks_omitted: int = 0  # tasks that did not fit in the start line
    raw: Mapping[str, Any] = field(default_factory=dict, repr=False, compare=False)

    @classmethod
    def from_json(cls, obj: Mapping[str, Any]) -> Restoration:
        what = "restoration"
        return cls(
            source=_need_str(obj, "source", what),
            restoration_count=_opt_int(obj, "restoration_count", what) or 0,
            context_message=_opt_str(obj, "context_message", what) or "",
            phase=_opt_str(obj, "phase", what),
            state=_opt_str(obj, "state", what),
            progress=_opt_int(obj, "progress", what),
            current_activity=_opt_str(obj, "current_activity", what),
            checkpoint=obj.get("checkpoint"),
            history=tuple(_objects(obj.get("history"), "restoration.history")),
            pending_questions=tuple(
                OpenQuestion.from_json(q)
                for q in _objects(obj.get("pending_questions"), "restoration.pending_questions")
            ),
            undelivered_answers=tuple(
                UndeliveredAnswer.from_json(a)
                for a in _objects(obj.get("undelivered_answers"), "restoration.undelivered_answers")
            ),
            tasks=tuple(
                TaskResult.from_json(t, "restoration.tasks[]")
                for t in _objects(obj.get("tasks"), "restoration.tasks")
            ),
            history_before=_opt_int(obj, "history_before", what),
            history_more=obj.get("history_more") is True,
            tasks_omitted=_opt_int(obj, "tasks_omitted", what) or 0,
            raw=types.MappingProxyType(dict(obj)),
        )


@dataclass(frozen=True, slots=True)
class StartMessage:
    """The daemon's first message: who the agent is and, after a restart, where it was."""

    supervisor_id: str
    name: str
    goal: str
    restoration: Restoration | None = None
    protocol: int = PROTOCOL_VERSION
    raw: Mapping[str, Any] = field(default_factory=dict, repr=False, compare=False)

    @classmethod
    def from_json(cls, obj: Mapping[str, Any]) -> StartMessage:
        what = "start"
        if obj.get("type") != "start":
            raise ProtocolError(f"expected a 'start' message; got {obj.get('type')!r}")
        protocol = obj.get("protocol")
        if protocol != PROTOCOL_VERSION or isinstance(protocol, bool):
            raise ProtocolError(
                f"the daemon speaks makima-agent/{protocol}; "
                f"this SDK speaks makima-agent/{PROTOCOL_VERSION}"
            )
        restoration = obj.get("restoration")
        if restoration is not None and not isinstance(restoration, dict):
            raise ProtocolError(
                f"start: 'restoration' must be an object or null; got {restoration!r}"
            )
        return cls(
            supervisor_id=_id(obj, ("supervisor_id",), what),
            name=_opt_str(obj, "name", what) or "",
            goal=_opt_str(obj, "goal", what) or "",
            restoration=None if restoration is None else Restoration.from_json(restoration),
            protocol=PROTOCOL_VERSION,
            raw=types.MappingProxyType(dict(obj)),
        )


def _encode(message: Mapping[str, Any], kind: str) -> bytes:
    """One protocol line, newline included; AgentError if it is not JSON or too long."""
    try:
        text = json.dumps(message, ensure_ascii=False, separators=(",", ":"), allow_nan=False)
    except (TypeError, ValueError) as exc:
        raise AgentError(f"cannot send {kind!r}: the data is not JSON-serialisable: {exc}") from exc
    data = text.encode("utf-8")
    if len(data) > MAX_LINE:
        raise AgentError(
            f"cannot send {kind!r}: the line would be {len(data)} bytes; "
            f"the protocol allows at most {MAX_LINE} (1 MiB)"
        )
    return data + b"\n"


def _fail_future(future: asyncio.Future[Any], exc: BaseException) -> None:
    """Fail a future that may or may not have a waiter, without 'never retrieved' noise."""
    if not future.done():
        future.set_exception(exc)
        future.exception()  # mark retrieved; a waiter still gets the exception raised


def _suspend_aware_clock() -> Callable[[], float]:
    """Seconds on a clock that keeps counting while the machine is suspended."""
    boottime = getattr(time, "CLOCK_BOOTTIME", None)
    if boottime is not None:
        try:
            time.clock_gettime(boottime)
        except OSError:
            pass
        else:
            return lambda: time.clock_gettime(boottime)
    return time.monotonic


_clock = _suspend_aware_clock()


# --------------------------------------------------------------------------- the agent


@dataclass(slots=True)
class _PendingRequest:
    kind: str
    future: asyncio.Future[dict[str, Any]]


class Agent:
    """One agent's end of the protocol. :func:`run` makes it and hands it to ``main``.

    The core is sans-I/O: lines from the daemon go in through :meth:`feed_line`
    and :meth:`feed_eof`; frames go out through the ``write`` callable (one
    complete line per call; it must write the whole line or raise ``OSError``).
    :func:`run` wires these to the process's stdio; tests may wire them to
    anything. Must be created inside a running event loop.
    """

    def __init__(self, write: Callable[[bytes], None]) -> None:
        self._loop = asyncio.get_running_loop()
        self._write = write
        self._refs = itertools.count(1)
        self._pending: dict[str, _PendingRequest] = {}
        self._abandoned: set[str] = set()
        self._started: asyncio.Future[StartMessage] = self._loop.create_future()
        self._start: StartMessage | None = None
        # questions and answers
        self._answers: dict[str, str] = {}
        self._answer_waiters: dict[str, asyncio.Future[str]] = {}
        self._returned: set[str] = set()
        self._restored_questions: list[tuple[str, str]] = []  # (text, question_id), unclaimed
        # tasks
        self._tasks: dict[str, TaskResult] = {}
        self._unseen: list[str] = []
        self._wait_slots: collections.deque[asyncio.Future[None]] = collections.deque()
        # life
        self._checkpoint_data: Any = None
        self._finished: str | None = None
        self._cancelled = False
        self._cancel_reason: str | None = None
        self._closed = False
        self._main_task: asyncio.Task[Any] | None = None
        self._on_stop: Callable[[int, str], None] | None = None
        # the daemon's lease pings
        self._ping_deadline: float | None = None  # on _clock; None until the first ping
        self._pinged_at = 0.0
        self._silence_watch: asyncio.Task[None] | None = None
        self._daemon_lost_hooks: list[Callable[[], object]] = []
        self._daemon_silent = False
        self._handlers: dict[str, Callable[[dict[str, Any]], None]] = {
            "ack": self._on_ack,
            "error": self._on_error,
            "answer": self._on_answer,
            "task_finished": self._on_task_finished,
            "tasks_done": self._on_tasks_done,
            "cancel": self._on_cancel,
            "ping": self._on_ping,
            "start": self._on_extra_start,
        }

    # ------------------------------------------------------------------ what the daemon said

    async def started(self) -> StartMessage:
        """Wait for the daemon's ``start`` message (already done when ``main`` runs)."""
        return await asyncio.shield(self._started)

    @property
    def start(self) -> StartMessage:
        """The parsed ``start`` message."""
        if self._start is None:
            raise AgentError("the daemon has not sent 'start' yet")
        return self._start

    @property
    def supervisor_id(self) -> str:
        return self.start.supervisor_id

    @property
    def name(self) -> str:
        return self.start.name

    @property
    def goal(self) -> str:
        return self.start.goal

    @property
    def restoration(self) -> Restoration | None:
        """None on a first start; what the daemon restored otherwise."""
        return self.start.restoration

    @property
    def is_restored(self) -> bool:
        return self.start.restoration is not None

    @property
    def checkpoint_data(self) -> Any:
        """The last checkpoint data: from ``restoration`` at start, then from :meth:`checkpoint`."""
        return self._checkpoint_data

    @property
    def tasks(self) -> Mapping[str, TaskResult]:
        """Every task known to this agent by id: restored ones, spawned ones, finished ones."""
        return types.MappingProxyType(self._tasks)

    @property
    def cancelled(self) -> bool:
        """True once the daemon has sent ``cancel``."""
        return self._cancelled

    @property
    def cancel_reason(self) -> str | None:
        return self._cancel_reason

    @property
    def closed(self) -> bool:
        """True once the protocol channel is gone (stdin at end-of-file, or stdout broken)."""
        return self._closed

    @property
    def finished(self) -> str | None:
        """``"done"`` or ``"fail"`` once that message was acknowledged, else None."""
        return self._finished

    @property
    def daemon_silent(self) -> bool:
        """True once the daemon's last ``ping`` ran out and the agent stopped itself."""
        return self._daemon_silent

    def on_daemon_lost(self, hook: Callable[[], object]) -> None:
        """Call ``hook()`` if the daemon goes silent past its lease (see the module docs).

        Hooks run in the order registered, synchronously in the event loop, before
        ``main`` is cancelled and the process exits with :data:`EXIT_DAEMON_SILENT`:
        the place to end at once what must not outlive the agent, such as a child
        process it drives. Keep a hook quick; what it raises is logged and ignored.
        A hook registered after the agent stopped itself runs at once.
        """
        self._daemon_lost_hooks.append(hook)
        if self._daemon_silent:
            self._run_daemon_lost_hook(hook)

    # ------------------------------------------------------------------ agent → daemon

    async def activity(self, text: str, progress: int | None = None) -> None:
        """Say what the agent is doing now, optionally with progress (0-100)."""
        fields: dict[str, Any] = {"text": text}
        if progress is not None:
            fields["progress"] = progress
        await self._call("activity", fields)

    async def phase(self, phase: str) -> None:
        """Enter a named phase (a save point in the daemon)."""
        await self._call("phase", {"phase": phase})

    async def message(self, role: str, content: Any) -> None:
        """Append a message to the supervisor's conversation history."""
        await self._call("message", {"role": role, "content": content})

    async def history(
        self, before: int | None = None, limit: int = 50
    ) -> tuple[list[dict[str, Any]], bool]:
        """A page of the conversation history: up to ``limit`` entries with ``seq``
        below ``before`` (the newest, if None), oldest first, and whether older ones
        remain. After a restart, page back from ``restoration.history_before``: the
        ``start`` line carries only the newest entries that fit in it."""
        fields: dict[str, Any] = {"limit": limit}
        if before is not None:
            fields["before"] = before
        reply = await self._call("history", fields)
        messages = reply.get("messages")
        if not isinstance(messages, list):
            raise ProtocolError(f"history: the ack has no 'messages' list: {reply!r:.200}")
        return [m for m in messages if isinstance(m, dict)], bool(reply.get("more"))

    async def checkpoint(self, data: Any) -> None:
        """Save resumable data; after a restart it is :attr:`checkpoint_data`."""
        copy = json.loads(_encode({"data": data}, "checkpoint"))["data"]
        await self._call("checkpoint", {"data": data})
        self._checkpoint_data = copy

    async def ask(
        self,
        question: str,
        *,
        choices: Sequence[str] | None = None,
        context: str | None = None,
    ) -> str:
        """Ask a person and wait for the answer (restoration-aware; see the module docs)."""
        question_id = await self.submit_question(question, choices=choices, context=context)
        return await self.wait_answer(question_id)

    async def submit_question(
        self,
        question: str,
        *,
        choices: Sequence[str] | None = None,
        context: str | None = None,
    ) -> str:
        """Ask without waiting; return the question id (for :meth:`wait_answer`).

        If the same question text is still open from before a restart (or its
        answer is waiting undelivered), that question's id is returned and
        nothing is sent.
        """
        if isinstance(choices, str):
            raise TypeError("choices must be a sequence of strings, not a single string")
        restored = self._claim_restored(question)
        if restored is not None:
            log.info(
                "makima.sdk: %r was asked before the restart as %s; not asking again",
                question,
                restored,
            )
            return restored
        fields: dict[str, Any] = {"question": question}
        if choices is not None:
            fields["choices"] = list(choices)
        if context is not None:
            fields["context"] = context
        reply = await self._call("ask", fields)
        return _id(reply, ("question_id",), "the ack of 'ask'")

    async def wait_answer(self, question_id: str) -> str:
        """Wait for the answer to one question; each answer is returned once only."""
        question_id = str(question_id)
        if question_id in self._returned:
            raise AgentError(f"the answer to question {question_id} was already returned")
        if question_id in self._answers:
            self._returned.add(question_id)
            return self._answers.pop(question_id)
        if question_id in self._answer_waiters:
            raise AgentError(f"the answer to question {question_id} is already being awaited")
        if self._closed:
            raise DaemonGoneError("the protocol channel is closed; no answer can arrive")
        waiter: asyncio.Future[str] = self._loop.create_future()
        self._answer_waiters[question_id] = waiter
        try:
            return await waiter
        except asyncio.CancelledError:
            if waiter.done() and not waiter.cancelled() and waiter.exception() is None:
                # The answer came in as we were cancelled: keep it for the next caller.
                self._answers[question_id] = waiter.result()
                self._returned.discard(question_id)
            raise
        finally:
            if self._answer_waiters.get(question_id) is waiter:
                del self._answer_waiters[question_id]

    async def spawn(
        self,
        name: str,
        command: Sequence[str],
        *,
        cwd: str | None = None,
        env: Mapping[str, str] | None = None,
    ) -> str:
        """Have the daemon run a task; return its id once the task is recorded."""
        if isinstance(command, str) or not command or not all(isinstance(c, str) for c in command):
            raise TypeError(f"command must be a non-empty sequence of strings; got {command!r}")
        fields: dict[str, Any] = {"name": name, "command": list(command)}
        if cwd is not None:
            fields["cwd"] = cwd
        if env is not None:
            fields["env"] = dict(env)
        reply = await self._call("spawn", fields)
        task_id = _id(reply, ("task_id",), "the ack of 'spawn'")
        status = reply.get("status")
        if task_id not in self._tasks:  # a very fast task may already have reported
            self._tasks[task_id] = TaskResult(
                task_id=task_id,
                status=status if isinstance(status, str) else "running",
                name=name,
                command=tuple(command),
            )
        return task_id

    async def wait_tasks(self) -> list[TaskResult]:
        """Wait until no task is running; return the tasks that finished since the last wait.

        The results come in the order the daemon reported them, each task once.
        """
        ref, reply = self._send_request("wait_tasks", {})
        slot: asyncio.Future[None] = self._loop.create_future()
        self._wait_slots.append(slot)  # before any await: tasks_done cannot overtake it
        try:
            await self._await_reply("wait_tasks", ref, reply)
            await slot
        except asyncio.CancelledError:
            slot.cancel()  # the daemon got the wait: its tasks_done will consume this slot
            raise
        except BaseException:
            if slot in self._wait_slots:  # refused or lost: no tasks_done will come for it
                self._wait_slots.remove(slot)
            slot.cancel()
            raise
        finished = [self._tasks[t] for t in self._unseen]
        self._unseen.clear()
        return finished

    async def blocked(self, reason: str) -> None:
        """Say the agent cannot go on without outside help."""
        await self._call("blocked", {"reason": reason})

    async def done(self, result: Any = None) -> None:
        """Finish successfully; no message may follow."""
        await self._call("done", {} if result is None else {"result": result})

    async def fail(self, error: str) -> None:
        """Finish with a failure the daemon records as final; no message may follow."""
        await self._call("fail", {"error": error})

    async def request(self, kind: str, /, **fields: Any) -> dict[str, Any]:
        """Send any message type and return the fields of its ``ack`` (low-level)."""
        return await self._call(kind, fields)

    # ------------------------------------------------------------------ daemon → agent

    def feed_line(self, line: bytes) -> None:
        """Take one line from the daemon (without its newline); :data:`DROPPED_LINE`
        stands for a line over the limit that was dropped."""
        if line is DROPPED_LINE:
            self.feed_dropped()
            return
        line = line.strip()
        if not line:
            return
        try:
            obj = json.loads(line.decode("utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError) as exc:
            log.warning("makima.sdk: ignoring a line from the daemon that is not JSON: %s", exc)
            return
        if not isinstance(obj, dict) or not isinstance(obj.get("type"), str):
            log.warning("makima.sdk: ignoring a message without a string 'type': %.200r", obj)
            return
        if obj["type"] == "ping":
            self._on_ping(obj)  # may come before 'start'; it carries only a deadline
            return
        if not self._started.done():
            try:
                start = StartMessage.from_json(obj)
            except ProtocolError as exc:
                _fail_future(self._started, exc)
                return
            self._begin(start)
            self._started.set_result(start)
            return
        if self._start is None:
            return  # start was bad; nothing more to do
        handler = self._handlers.get(obj["type"])
        if handler is None:
            log.warning("makima.sdk: ignoring unknown message type %r from the daemon", obj["type"])
            return
        handler(obj)

    def feed_dropped(self) -> None:
        """A line from the daemon was over the limit and was dropped. What it said
        (an ack, an answer, the start message) is lost, so nothing the agent waits
        for can be trusted to come: fail every wait, loudly, and stop."""
        why = f"the daemon sent a line over {MAX_LINE} bytes, which was dropped"
        log.error("makima.sdk: %s; stopping so that makima restarts the agent", why)
        self._lose(why, cancel_main=True)

    def feed_eof(self) -> None:
        """The daemon closed the channel: fail every wait and cancel ``main``."""
        self._lose("the daemon closed the agent's stdin", cancel_main=True)

    # ------------------------------------------------------------------ internals

    def _begin(self, start: StartMessage) -> None:
        self._start = start
        restoration = start.restoration
        if restoration is None:
            return
        self._checkpoint_data = restoration.checkpoint
        texts = {q.question_id: q.question for q in restoration.pending_questions}
        claimable: list[tuple[str, str]] = []
        for undelivered in restoration.undelivered_answers:
            self._answers[undelivered.question_id] = undelivered.answer
            text = undelivered.question or texts.get(undelivered.question_id)
            if text is not None:
                claimable.append((text, undelivered.question_id))
            else:
                log.warning(
                    "makima.sdk: an undelivered answer for question %s came without its text; "
                    "ask() cannot match it (use wait_answer(%r))",
                    undelivered.question_id,
                    undelivered.question_id,
                )
        known = {qid for _, qid in claimable}
        claimable.extend(
            (q.question, q.question_id)
            for q in restoration.pending_questions
            if q.question_id not in known
        )
        self._restored_questions = claimable
        for task in restoration.tasks:
            self._tasks[task.task_id] = task

    def take_restored_questions(self) -> list[OpenQuestion]:
        """Take over the questions restored from before the restart.

        For an agent that matches restored questions itself (an LLM adapter
        that re-asks in other words, or relays the answers as messages): it
        returns the open ones and stops :meth:`ask` from claiming any restored
        question by its text. Their answers still come through
        :meth:`wait_answer`. Answers recorded before the restart
        (``undelivered_answers``) are dropped here: the restoration's
        ``context_message`` already carries them, so each reaches the agent
        exactly once.
        """
        restoration = self.start.restoration
        self._restored_questions = []
        if restoration is None:
            return []
        for undelivered in restoration.undelivered_answers:
            self._answers.pop(undelivered.question_id, None)
            self._returned.add(undelivered.question_id)
        delivered = {a.question_id for a in restoration.undelivered_answers}
        return [q for q in restoration.pending_questions if q.question_id not in delivered]

    def _claim_restored(self, question: str) -> str | None:
        for index, (text, question_id) in enumerate(self._restored_questions):
            if text == question:
                del self._restored_questions[index]
                return question_id
        return None

    def _check_can_send(self, kind: str) -> None:
        if self._start is None:
            raise AgentError(f"cannot send {kind!r}: the daemon has not sent 'start' yet")
        if self._closed:
            raise DaemonGoneError(f"cannot send {kind!r}: the protocol channel is closed")
        if self._finished is not None:
            raise AgentError(
                f"cannot send {kind!r}: the agent already sent {self._finished!r}, "
                "which must be its last message"
            )

    def _send_request(
        self, kind: str, fields: Mapping[str, Any]
    ) -> tuple[str, asyncio.Future[dict[str, Any]]]:
        self._check_can_send(kind)
        ref = f"r{next(self._refs)}"
        frame = _encode({"type": kind, "ref": ref, **fields}, kind)
        future: asyncio.Future[dict[str, Any]] = self._loop.create_future()
        self._pending[ref] = _PendingRequest(kind, future)
        try:
            self._write(frame)
        except OSError as exc:
            del self._pending[ref]
            self._lose(f"writing to the daemon failed: {exc}", cancel_main=False)
            raise DaemonGoneError(f"cannot send {kind!r}: the daemon is gone ({exc})") from exc
        return ref, future

    async def _await_reply(
        self, kind: str, ref: str, future: asyncio.Future[dict[str, Any]]
    ) -> dict[str, Any]:
        try:
            return await future
        except asyncio.CancelledError:
            if ref in self._pending:
                self._abandoned.add(ref)
            raise
        finally:
            self._pending.pop(ref, None)

    async def _call(self, kind: str, fields: Mapping[str, Any]) -> dict[str, Any]:
        ref, future = self._send_request(kind, fields)
        return await self._await_reply(kind, ref, future)

    def _on_ack(self, obj: dict[str, Any]) -> None:
        ref = obj.get("ref")
        key = ref if isinstance(ref, str) else str(ref)
        pending = self._pending.get(key)
        if pending is None:
            if key in self._abandoned:
                self._abandoned.discard(key)
            else:
                log.warning("makima.sdk: ignoring an ack for unknown ref %r", ref)
            return
        if pending.kind in ("done", "fail"):
            self._finished = pending.kind  # durable now, whatever happens to the waiter
        if not pending.future.done():
            pending.future.set_result({k: v for k, v in obj.items() if k not in ("type", "ref")})

    def _on_error(self, obj: dict[str, Any]) -> None:
        ref = obj.get("ref")
        code = str(obj.get("code", "error"))
        message = str(obj.get("message", ""))
        key = None if ref is None else (ref if isinstance(ref, str) else str(ref))
        pending = None if key is None else self._pending.get(key)
        if pending is None:
            if key is not None and key in self._abandoned:
                self._abandoned.discard(key)
                return
            log.warning(
                "makima.sdk: the daemon reported an error (ref %r): %s: %s", ref, code, message
            )
            return
        _fail_future(pending.future, DaemonError(pending.kind, code, message, key))

    def _on_answer(self, obj: dict[str, Any]) -> None:
        try:
            question_id = _id(obj, ("question_id",), "answer")
        except ProtocolError as exc:
            log.warning("makima.sdk: ignoring an answer: %s", exc)
            return
        if "answer" not in obj:
            log.warning("makima.sdk: ignoring an answer without 'answer' for %s", question_id)
            return
        if question_id in self._returned:
            return  # re-delivered after we already handed it out: exactly once
        answer = _answer_text(obj["answer"])
        waiter = self._answer_waiters.get(question_id)
        if waiter is not None and not waiter.done():
            self._returned.add(question_id)
            waiter.set_result(answer)
        else:
            self._answers[question_id] = answer

    def _on_task_finished(self, obj: dict[str, Any]) -> None:
        try:
            reported = TaskResult.from_json(obj, "task_finished")
        except ProtocolError as exc:
            log.warning("makima.sdk: ignoring a task_finished: %s", exc)
            return
        known = self._tasks.get(reported.task_id)
        if known is not None:
            reported = TaskResult(
                task_id=reported.task_id,
                status=reported.status,
                exit_code=reported.exit_code,
                output_tail=reported.output_tail,
                name=reported.name or known.name,
                command=reported.command or known.command,
            )
        self._tasks[reported.task_id] = reported
        if reported.task_id not in self._unseen:
            self._unseen.append(reported.task_id)

    def _on_tasks_done(self, obj: dict[str, Any]) -> None:
        if not self._wait_slots:
            log.warning("makima.sdk: ignoring a tasks_done nobody waits for")
            return
        slot = self._wait_slots.popleft()
        if not slot.done():
            slot.set_result(None)

    def _on_cancel(self, obj: dict[str, Any]) -> None:
        if self._cancelled:
            return
        self._cancelled = True
        reason = obj.get("reason")
        self._cancel_reason = reason if isinstance(reason, str) else None
        if self._on_stop is not None:
            self._on_stop(EXIT_CANCELLED, "the daemon sent 'cancel'")
        if self._main_task is not None and not self._main_task.done():
            self._main_task.cancel()

    def _on_extra_start(self, obj: dict[str, Any]) -> None:
        log.warning("makima.sdk: ignoring a second 'start' message")

    def _on_ping(self, obj: dict[str, Any]) -> None:
        valid_for = obj.get("valid_for")
        if (
            isinstance(valid_for, bool)
            or not isinstance(valid_for, int | float)
            or not math.isfinite(valid_for)
        ):
            log.warning("makima.sdk: ignoring a ping without a finite 'valid_for': %.200r", obj)
            return
        if self._closed:
            return
        now = _clock()
        self._pinged_at = now
        self._ping_deadline = now + max(0.0, float(valid_for))
        if self._silence_watch is None:
            self._silence_watch = self._loop.create_task(
                self._watch_silence(), name="makima-sdk-ping-watchdog"
            )

    async def _watch_silence(self) -> None:
        """Sleep until the current ping deadline; stop the agent once one passes."""
        while not self._closed:
            deadline = self._ping_deadline
            assert deadline is not None
            now = _clock()
            if now >= deadline:
                self._go_silent(now - self._pinged_at)
                return
            await asyncio.sleep(min(deadline - now, SILENCE_RECHECK))

    def _go_silent(self, silence: float) -> None:
        self._daemon_silent = True
        why = f"no ping from the daemon for {silence:.1f} s (its lease deadline passed)"
        with contextlib.suppress(OSError, ValueError):
            sys.stderr.write(
                f"makima.sdk: {why}; stopping this agent so that the supervisor's "
                "new owner is the only one running it\n"
            )
            sys.stderr.flush()
        for hook in list(self._daemon_lost_hooks):
            self._run_daemon_lost_hook(hook)
        self._silence_watch = None  # this very task, ending now
        self._lose(why, cancel_main=True, code=EXIT_DAEMON_SILENT)

    @staticmethod
    def _run_daemon_lost_hook(hook: Callable[[], object]) -> None:
        try:
            hook()
        except Exception:
            log.exception("makima.sdk: a daemon-lost hook raised; going on")

    def _lose(self, why: str, *, cancel_main: bool, code: int = EXIT_DAEMON_GONE) -> None:
        if self._closed:
            return
        self._closed = True
        if self._finished is None and self._started.done() and code == EXIT_DAEMON_GONE:
            log.warning("makima.sdk: %s before the agent finished; stopping", why)
        if self._silence_watch is not None:
            self._silence_watch.cancel()
        if self._on_stop is not None:
            self._on_stop(code, why)
        if cancel_main and self._main_task is not None and not self._main_task.done():
            self._main_task.cancel()
        gone = DaemonGoneError(why)
        _fail_future(self._started, gone)
        for pending in self._pending.values():
            _fail_future(pending.future, gone)
        for waiter in self._answer_waiters.values():
            _fail_future(waiter, gone)
        for slot in self._wait_slots:
            _fail_future(slot, gone)


# --------------------------------------------------------------------------- stdio


@dataclass(frozen=True, slots=True)
class _Stdio:
    in_fd: int
    out_fd: int


def _take_stdio() -> _Stdio:
    """Keep private copies of fds 0 and 1 for the protocol; give the program harmless ones.

    Afterwards fd 0 reads /dev/null and fd 1 is a copy of stderr, in this process and
    in every child it starts, and ``sys.stdout`` is ``sys.stderr``. The private copies
    are not inherited by children.
    """
    try:
        in_fd = os.dup(0)
        out_fd = os.dup(1)
    except OSError as exc:
        raise ProtocolError(
            f"an agent needs stdin and stdout as its protocol channel: {exc}"
        ) from exc
    null = os.open(os.devnull, os.O_RDONLY)
    try:
        os.dup2(null, 0)
    finally:
        os.close(null)
    try:
        os.dup2(2, 1)
    except OSError:
        null = os.open(os.devnull, os.O_WRONLY)
        try:
            os.dup2(null, 1)
        finally:
            os.close(null)
    if sys.stdout is not None:
        sys.stdout.flush()  # anything printed before run() goes to stderr now
    sys.stdout = sys.stderr
    with contextlib.suppress(OSError):  # odd descriptors: the reader copes with EAGAIN
        os.set_blocking(in_fd, True)
    return _Stdio(in_fd, out_fd)


class _FdWriter:
    """Write whole lines to a descriptor; one line at a time, from any thread."""

    def __init__(self, fd: int) -> None:
        self._fd = fd
        self._lock = threading.Lock()

    def __call__(self, data: bytes) -> None:
        with self._lock:
            view = memoryview(data)
            while view:
                try:
                    written = os.write(self._fd, view)
                except BlockingIOError:
                    select.select([], [self._fd], [])
                    continue
                view = view[written:]


class _StdinReader(threading.Thread):
    """Read protocol lines on a thread and hand them to the event loop.

    A thread works with any kind of stdin (pipe, socket, file) and notices
    end-of-file even while the event loop is busy in synchronous code.
    """

    def __init__(
        self,
        fd: int,
        loop: asyncio.AbstractEventLoop,
        on_line: Callable[[bytes], None],
        on_eof: Callable[[], None],
        on_eof_in_thread: Callable[[], None],
    ) -> None:
        super().__init__(name="makima-sdk-stdin", daemon=True)
        self._fd = fd
        self._loop = loop
        self._on_line = on_line
        self._on_eof = on_eof
        self._on_eof_in_thread = on_eof_in_thread

    def run(self) -> None:
        for line in self._lines():
            if not self._post(self._on_line, line):
                return  # the event loop is over: so is the agent
        self._on_eof_in_thread()
        self._post(self._on_eof)

    def _lines(self) -> Iterable[bytes]:
        buffer = bytearray()
        skipping = False
        while True:
            try:
                chunk = os.read(self._fd, _READ_CHUNK)
            except BlockingIOError:
                select.select([self._fd], [], [])
                continue
            except OSError:
                chunk = b""
            if not chunk:
                if buffer and not skipping:
                    yield bytes(buffer)
                return
            buffer += chunk
            while True:
                newline = buffer.find(b"\n")
                if newline < 0:
                    if len(buffer) > MAX_LINE + 1:
                        if not skipping:
                            yield DROPPED_LINE
                        skipping = True
                        buffer.clear()
                    break
                line = bytes(buffer[:newline])
                del buffer[: newline + 1]
                if skipping:
                    skipping = False
                    continue
                if len(line.rstrip(b"\r")) > MAX_LINE:
                    yield DROPPED_LINE
                    continue
                yield line

    def _post(self, callback: Callable[..., None], *args: Any) -> bool:
        try:
            self._loop.call_soon_threadsafe(callback, *args)
        except RuntimeError:  # the loop is closed: the agent is over
            return False
        return True


class _Watchdog:
    """Ends the process if it has not stopped ``grace`` seconds after it was told to."""

    def __init__(self, grace: float) -> None:
        self._grace = grace
        self._lock = threading.Lock()
        self._timer: threading.Timer | None = None

    def arm(self, code: int, why: str) -> None:
        with self._lock:
            if self._timer is not None:
                return
            self._timer = threading.Timer(self._grace, self._fire, (code, why))
            self._timer.daemon = True
            self._timer.start()

    def _fire(self, code: int, why: str) -> None:
        try:
            sys.stderr.write(
                f"makima.sdk: still running {self._grace:g}s after {why}; exiting now\n"
            )
            sys.stderr.flush()
        finally:
            os._exit(code)


# --------------------------------------------------------------------------- entry points

AgentMain = Callable[[Agent], Awaitable[object]]
"""``async def main(agent: Agent) -> object``; a returned value becomes ``done``'s result."""


async def _call_main(main: AgentMain, agent: Agent) -> object:
    return await main(agent)


def _stop_code(agent: Agent) -> int | None:
    """The exit status when the daemon ended the agent (cancel, or channel gone).

    Once ``done`` or ``fail`` is acknowledged the agent has finished, even if
    stdin closes before ``main`` gets to return.
    """
    if agent.finished is not None:
        return EXIT_OK
    if agent.daemon_silent:
        return EXIT_DAEMON_SILENT
    if agent.cancelled:
        return EXIT_CANCELLED
    if agent.closed:
        return EXIT_DAEMON_GONE
    return None


async def _serve(agent: Agent, main: AgentMain) -> int:
    problem: ProtocolError | None = None
    try:
        await agent.started()
    except DaemonGoneError:
        if agent.daemon_silent:
            return EXIT_DAEMON_SILENT
        log.warning("makima.sdk: stdin closed before the daemon sent 'start'; exiting")
        return EXIT_DAEMON_GONE
    except ProtocolError as exc:
        problem = exc
    if problem is not None:
        log.error("makima.sdk: %s", problem)
        return EXIT_PROTOCOL
    stopped = _stop_code(agent)
    if stopped is not None:
        return stopped
    task = asyncio.create_task(_call_main(main, agent), name="makima-agent-main")
    agent._main_task = task
    try:
        await asyncio.wait({task})
    except asyncio.CancelledError:
        task.cancel()
        raise
    stopped = _stop_code(agent)
    if task.cancelled():
        if stopped is not None:
            return stopped
        log.error("makima.sdk: the agent's main coroutine was cancelled")
        return EXIT_ERROR
    error = task.exception()
    if error is not None:
        if isinstance(error, DaemonGoneError) and agent.finished is not None:
            return EXIT_OK
        if agent.daemon_silent:
            return EXIT_DAEMON_SILENT
        if isinstance(error, DaemonGoneError) or agent.closed:
            log.warning("makima.sdk: the daemon is gone (%s); exiting", error)
            return EXIT_DAEMON_GONE
        log.error(
            "makima.sdk: the agent's main coroutine raised %s", type(error).__name__, exc_info=error
        )
        return EXIT_ERROR
    if stopped is not None:
        return stopped
    if agent.finished is None:
        return await _finish(agent, task.result())
    return EXIT_OK


async def _finish(agent: Agent, result: object) -> int:
    """Send ``done`` for a ``main`` that returned without sending ``done`` or ``fail``."""
    failure: AgentError | None = None
    try:
        await agent.done(result)
    except DaemonGoneError as gone:
        log.warning("makima.sdk: the daemon is gone (%s); exiting", gone)
        return EXIT_DAEMON_GONE
    except AgentError as exc:
        failure = exc
    if failure is not None:
        log.error("makima.sdk: could not send 'done': %s", failure)
        return EXIT_ERROR
    return EXIT_OK


TRACE_ENV = "MAKIMA_AGENT_TRACE"


def _traced(feed: Callable[[bytes], None], path: str) -> Callable[[bytes], None]:
    """Append every line from the daemon to ``path`` before handling it (for drills
    and debugging: set MAKIMA_AGENT_TRACE in the agent's environment)."""
    handle = open(path, "ab", buffering=0)  # noqa: SIM115 - lives as long as the agent

    def traced(line: bytes) -> None:
        handle.write(line.rstrip(b"\r\n") + b"\n")
        feed(line)

    return traced


async def arun(main: AgentMain, *, exit_grace: float = 3.0) -> int:
    """Run ``main`` as this process's agent on stdio; return the exit status.

    For programs that already run an event loop; most agents call :func:`run`.
    The process is ended ``exit_grace`` seconds after stdin closes or ``cancel``
    arrives if it has not stopped by then.
    """
    try:
        stdio = _take_stdio()
    except ProtocolError as exc:
        log.error("makima.sdk: %s", exc)  # noqa: TRY400 - a plain message, no traceback
        return EXIT_PROTOCOL
    watchdog = _Watchdog(exit_grace)
    agent = Agent(_FdWriter(stdio.out_fd))
    agent._on_stop = watchdog.arm
    feed: Callable[[bytes], None] = agent.feed_line
    trace_path = os.environ.get(TRACE_ENV)
    if trace_path:
        feed = _traced(feed, trace_path)
    reader = _StdinReader(
        stdio.in_fd,
        asyncio.get_running_loop(),
        feed,
        agent.feed_eof,
        lambda: watchdog.arm(EXIT_DAEMON_GONE, "stdin closed"),
    )
    reader.start()
    return await _serve(agent, main)


def run(main: AgentMain, *, exit_grace: float = 3.0) -> NoReturn:
    """The entry point of an agent: run ``main`` on stdio, then exit with its status."""
    try:
        code = asyncio.run(arun(main, exit_grace=exit_grace))
    except KeyboardInterrupt:
        code = 130
    sys.exit(code)

"""makima-agent/1, the daemon's side: parsing agent lines, encoding daemon
messages (pure), and the agent child process (I/O).

One JSON object per line, UTF-8, at most 1 MiB a line. Every message has a
``type``; a message may carry ``ref``, which the daemon echoes in its
``ack`` (once the effect is durable) or ``error`` reply.
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import json
import os
import signal
from collections.abc import AsyncIterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import anyio
import anyio.abc
import anyio.lowlevel
import structlog

from makima.childenv import child_environment
from makima.errors import InvalidValueError, MakimaError
from makima.eventloop import IdleLock
from makima.jsonline import load_json_line, top_level_member, unstorable
from makima.limits import HISTORY_PAGE_LIMIT, MAX_SEQ
from makima.lines import MAX_LINE, LineBuffer, TooLong
from makima.model import (
    brief,
    parse_command,
    parse_env,
    parse_int,
    parse_optional_text,
    parse_progress,
    parse_string_list,
    parse_text,
)

log = structlog.get_logger("makima.agent")

PROTOCOL_VERSION = 1
REF_LIMIT = 256
"""The longest ``ref`` a reply echoes, in characters."""
READ_SIZE = 1 << 16
"""The most bytes one read from an agent's stdout or stderr takes."""
STDERR_LINE = 64 * 1024
"""The longest stderr line logged whole (a longer one is dropped)."""


class AgentMessageType(enum.StrEnum):
    ACTIVITY = "activity"
    PHASE = "phase"
    MESSAGE = "message"
    CHECKPOINT = "checkpoint"
    ASK = "ask"
    SPAWN = "spawn"
    WAIT_TASKS = "wait_tasks"
    BLOCKED = "blocked"
    DONE = "done"
    FAIL = "fail"
    HISTORY = "history"


class ErrorCode(enum.StrEnum):
    """``code`` of an ``error`` reply to the agent."""

    MALFORMED = "malformed"  # not JSON, not an object, not UTF-8
    TOO_LONG = "too_long"  # over 1 MiB
    UNKNOWN_TYPE = "unknown_type"
    INVALID = "invalid"  # a field is missing or of the wrong kind
    ILLEGAL_STATE = "illegal_state"  # not allowed in the supervisor's state
    TOO_LARGE = "too_large"  # could never be sent back in one line (makima.limits)
    INTERNAL = "internal"


# --------------------------------------------------------------------------- agent → daemon


@dataclass(frozen=True, slots=True)
class Activity:
    text: str
    progress: int | None = None


@dataclass(frozen=True, slots=True)
class Phase:
    phase: str


@dataclass(frozen=True, slots=True)
class Message:
    role: str
    content: Any


@dataclass(frozen=True, slots=True)
class Checkpoint:
    data: Any


@dataclass(frozen=True, slots=True)
class Ask:
    question: str
    choices: tuple[str, ...] = ()
    context: str | None = None


@dataclass(frozen=True, slots=True)
class Spawn:
    name: str
    command: tuple[str, ...]
    cwd: str | None = None
    env: Mapping[str, str] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class WaitTasks:
    pass


@dataclass(frozen=True, slots=True)
class Blocked:
    reason: str


@dataclass(frozen=True, slots=True)
class Done:
    result: Any = None


@dataclass(frozen=True, slots=True)
class Fail:
    error: str


@dataclass(frozen=True, slots=True)
class History:
    """A page of older history: entries with ``seq`` below ``before`` (all, if None)."""

    before: int | None = None
    limit: int = 50


AgentMessage = (
    Activity
    | Phase
    | Message
    | Checkpoint
    | Ask
    | Spawn
    | WaitTasks
    | Blocked
    | Done
    | Fail
    | History
)
Ref = str | int | None


@dataclass(frozen=True, slots=True)
class Envelope:
    """One parsed agent line."""

    message: AgentMessage
    ref: Ref = None


class LineTooLongError(MakimaError):
    """A line for the agent would exceed the protocol's limit; it was not sent."""


class AgentProtocolError(MakimaError):
    """An agent line that cannot be applied; answered with an ``error`` reply."""

    def __init__(self, code: ErrorCode, message: str, ref: Ref = None) -> None:
        super().__init__(message)
        self.code = code
        self.ref = ref


def _parse_body(kind: AgentMessageType, obj: Mapping[str, Any]) -> AgentMessage:
    def need(key: str) -> Any:
        if key not in obj:
            raise InvalidValueError(f"{kind.value!r} needs {key!r}")
        return obj[key]

    match kind:
        case AgentMessageType.ACTIVITY:
            progress = obj.get("progress")
            return Activity(
                text=parse_text(need("text"), "text"),
                progress=None if progress is None else parse_progress(progress),
            )
        case AgentMessageType.PHASE:
            return Phase(parse_text(need("phase"), "phase", allow_empty=False))
        case AgentMessageType.MESSAGE:
            content = need("content")
            if content is None:
                raise InvalidValueError("'message' needs a 'content' that is not null")
            return Message(
                role=parse_text(need("role"), "role", allow_empty=False), content=content
            )
        case AgentMessageType.CHECKPOINT:
            return Checkpoint(data=need("data"))
        case AgentMessageType.ASK:
            choices = obj.get("choices")
            parsed_choices = () if choices is None else parse_string_list(choices, "choices")
            if len(set(parsed_choices)) != len(parsed_choices):
                raise InvalidValueError(f"choices must be distinct; got {list(parsed_choices)!r}")
            return Ask(
                question=parse_text(need("question"), "question", allow_empty=False),
                choices=parsed_choices,
                context=parse_optional_text(obj.get("context"), "context"),
            )
        case AgentMessageType.SPAWN:
            return Spawn(
                name=parse_text(need("name"), "name", allow_empty=False),
                command=parse_command(need("command")),
                cwd=parse_optional_text(obj.get("cwd"), "cwd"),
                env=parse_env(obj.get("env")),
            )
        case AgentMessageType.WAIT_TASKS:
            return WaitTasks()
        case AgentMessageType.BLOCKED:
            return Blocked(reason=parse_text(need("reason"), "reason", allow_empty=False))
        case AgentMessageType.DONE:
            return Done(result=obj.get("result"))
        case AgentMessageType.FAIL:
            return Fail(error=parse_text(need("error"), "error", allow_empty=False))
        case AgentMessageType.HISTORY:
            before = obj.get("before")
            limit = obj.get("limit")
            return History(
                before=None
                if before is None
                else parse_int(before, "before", minimum=1, maximum=MAX_SEQ),
                limit=50
                if limit is None
                else parse_int(limit, "limit", minimum=1, maximum=HISTORY_PAGE_LIMIT),
            )


def parse_agent_line(line: bytes) -> Envelope:
    """Parse one line from an agent, or raise AgentProtocolError (with ``ref`` if readable)."""
    try:
        obj = load_json_line(line)
    except ValueError as exc:
        # Answer with its ref when a shallow scan can read it (deep nesting, say).
        found = top_level_member(line, "ref")
        raise AgentProtocolError(ErrorCode.MALFORMED, str(exc), _echoable(found)) from None
    if not isinstance(obj, dict):
        raise AgentProtocolError(
            ErrorCode.MALFORMED, f"a message must be a JSON object; got {type(obj).__name__}"
        )
    ref = obj.get("ref")
    if ref is not None and (isinstance(ref, bool) or not isinstance(ref, str | int)):
        raise AgentProtocolError(
            ErrorCode.INVALID, f"ref must be a string or an integer; got {brief(ref)}"
        )
    if _echoable(ref) != ref:
        raise AgentProtocolError(
            ErrorCode.INVALID, f"ref is too long to echo; at most {REF_LIMIT} characters"
        )
    kind = obj.get("type")
    if not isinstance(kind, str):
        raise AgentProtocolError(ErrorCode.INVALID, "a message needs a string 'type'", ref)
    try:
        message_type = AgentMessageType(kind)
    except ValueError:
        known = ", ".join(t.value for t in AgentMessageType)
        raise AgentProtocolError(
            ErrorCode.UNKNOWN_TYPE,
            f"unknown message type {brief(kind)}; expected one of {known}",
            ref,
        ) from None
    if (problem := unstorable(obj)) is not None:
        raise AgentProtocolError(ErrorCode.INVALID, problem, ref)
    try:
        return Envelope(_parse_body(message_type, obj), ref)
    except InvalidValueError as exc:
        raise AgentProtocolError(ErrorCode.INVALID, str(exc), ref) from None


def _echoable(ref: Ref) -> Ref:
    """``ref`` if replies may echo it (short enough), else None."""
    if isinstance(ref, str) and len(ref) > REF_LIMIT:
        return None
    if isinstance(ref, int) and abs(ref).bit_length() > 4 * REF_LIMIT:
        return None
    return ref


# --------------------------------------------------------------------------- daemon → agent


def encode(message: Mapping[str, Any]) -> bytes:
    """One line for the agent: compact UTF-8 JSON (ASCII escapes for a lone surrogate,
    which UTF-8 cannot carry)."""
    try:
        return (json.dumps(message, separators=(",", ":"), ensure_ascii=False) + "\n").encode()
    except UnicodeEncodeError:
        return (json.dumps(message, separators=(",", ":")) + "\n").encode()


def ack(ref: Ref, **results: Any) -> dict[str, Any]:
    return {"type": "ack", "ref": ref, **results}


def error_reply(ref: Ref, code: ErrorCode, message: str) -> dict[str, Any]:
    return {"type": "error", "ref": ref, "code": code.value, "message": message}


def start_message(
    supervisor_id: str, name: str, goal: str, restoration: Mapping[str, Any] | None
) -> dict[str, Any]:
    return {
        "type": "start",
        "protocol": PROTOCOL_VERSION,
        "supervisor_id": supervisor_id,
        "name": name,
        "goal": goal,
        "restoration": restoration,
    }


def answer_message(question_id: str, answer: str) -> dict[str, Any]:
    return {"type": "answer", "question_id": question_id, "answer": answer}


def task_finished_message(
    task_id: str, status: str, exit_code: int | None, output_tail: str | None
) -> dict[str, Any]:
    return {
        "type": "task_finished",
        "task_id": task_id,
        "status": status,
        "exit_code": exit_code,
        "output_tail": output_tail,
    }


def tasks_done_message() -> dict[str, Any]:
    return {"type": "tasks_done"}


def cancel_message(reason: str) -> dict[str, Any]:
    return {"type": "cancel", "reason": reason}


def ping_message(valid_for: float) -> dict[str, Any]:
    """A lease heartbeat: the daemon's lease is certainly valid for at least
    ``valid_for`` more seconds from when this is sent.

    Sent (only when leases are enforced) to every started agent after each
    renewal. An agent that hears no further ping within ``valid_for`` seconds
    of receiving this one must assume a peer may own its supervisor now and
    stop itself (:mod:`makima.sdk` does; see ``EXIT_DAEMON_SILENT`` there).
    """
    return {"type": "ping", "valid_for": valid_for}


# --------------------------------------------------------------------------- the process


class AgentProcess:
    """An agent child process in its own process group, speaking over stdio.

    Its three pipes are plain non-blocking file descriptors the daemon reads and
    writes itself (no asyncio transports, stream readers or a task per pipe): an
    idle agent costs the daemon as little memory as possible. Its stderr is read
    by a loop callback that logs each line; its stdout by :meth:`lines`; its
    stdin is written by :meth:`send`, one whole line at a time.
    """

    __slots__ = (
        "_send_lock",
        "_stderr",
        "_stderr_buffer",
        "_stdin",
        "_stdin_closed",
        "_stdout",
        "process",
        "stuck",
        "supervisor_id",
        "write_timeout",
    )

    def __init__(
        self,
        process: anyio.abc.Process,
        supervisor_id: str,
        write_timeout: float = 30.0,
        *,
        stdin: int,
        stdout: int,
        stderr: int,
    ) -> None:
        self.process = process
        self.supervisor_id = supervisor_id
        self.write_timeout = write_timeout
        self.stuck: str | None = None  # why the daemon gave up writing to it, if it did
        self._send_lock = IdleLock()
        self._stdin = stdin  # the daemon's ends of the pipes; -1 once closed
        self._stdout = stdout
        self._stderr = stderr
        self._stderr_buffer: LineBuffer | None = None  # made on the first stderr bytes
        self._stdin_closed = False
        asyncio.get_running_loop().add_reader(stderr, self._stderr_ready)

    @classmethod
    async def start(
        cls,
        command: Sequence[str],
        *,
        supervisor_id: str,
        cwd: str | None,
        env: Mapping[str, str],
        write_timeout: float = 30.0,
    ) -> AgentProcess:
        full_env = child_environment(
            env,
            {"MAKIMA_SUPERVISOR_ID": supervisor_id, "MAKIMA_PROTOCOL": str(PROTOCOL_VERSION)},
        )
        ours: list[int] = []  # the daemon's ends (stdin, stdout, stderr), kept if it starts
        theirs: list[int] = []  # the child's ends, closed here once it has them
        try:
            for child_reads in (True, False, False):
                read_end, write_end = os.pipe()  # both close-on-exec
                ours.append(write_end if child_reads else read_end)
                theirs.append(read_end if child_reads else write_end)
            process = await anyio.open_process(
                list(command),
                stdin=theirs[0],
                stdout=theirs[1],
                stderr=theirs[2],
                cwd=cwd,
                env=full_env,
                start_new_session=True,
            )
        except BaseException:
            for fd in ours:
                os.close(fd)
            raise
        finally:
            for fd in theirs:
                os.close(fd)
        for fd in ours:
            os.set_blocking(fd, False)
        log.info(
            "agent.started", supervisor_id=supervisor_id, pid=process.pid, command=list(command)
        )
        return cls(
            process, supervisor_id, write_timeout, stdin=ours[0], stdout=ours[1], stderr=ours[2]
        )

    @property
    def pid(self) -> int:
        return self.process.pid

    async def send(self, message: Mapping[str, Any]) -> bool:
        """Write one line; False if the agent's stdin is gone.

        An agent that takes nothing from its stdin for ``write_timeout`` seconds
        while the daemon has a line for it (its pipe is full) is stuck: it is
        killed, so that it never holds up anyone waiting to write to it.
        """
        line = encode(message)
        if len(line) > MAX_LINE + 1:
            raise LineTooLongError(
                f"a {message.get('type')!r} line for the agent is {len(line) - 1} bytes; "
                f"the limit is {MAX_LINE}"
            )
        async with self._send_lock:
            if self._stdin_closed:
                return False
            try:
                with anyio.move_on_after(self.write_timeout) as scope:
                    await self._write(line)
            except (anyio.BrokenResourceError, anyio.ClosedResourceError, OSError):
                self._stdin_closed = True
                return False
            if scope.cancelled_caught:
                self.stuck = (
                    f"the agent took nothing from its stdin for {self.write_timeout:g}s while "
                    "the daemon had a line for it; it was stopped"
                )
                log.warning(
                    "agent.write_timeout",
                    supervisor_id=self.supervisor_id,
                    pid=self.pid,
                    timeout_s=self.write_timeout,
                    message_type=message.get("type"),
                )
                self._stdin_closed = True
                self.signal_group(signal.SIGKILL)
                return False
        return True

    async def _write(self, data: bytes) -> None:
        """All of ``data`` into the stdin pipe, waiting while it is full."""
        view = memoryview(data)
        while view:
            if self._stdin < 0:
                raise anyio.ClosedResourceError
            try:
                written = os.write(self._stdin, view)
            except BlockingIOError:
                written = -1
            if written < 0:  # (not in the except block: the error is not kept meanwhile)
                await anyio.wait_writable(self._stdin)
            else:
                view = view[written:]
        await anyio.lowlevel.cancel_shielded_checkpoint()

    async def lines(self) -> AsyncIterator[Envelope | AgentProtocolError]:
        """Parsed lines from the agent's stdout until it closes."""
        buffer = LineBuffer(MAX_LINE)
        while True:
            try:
                data = await self._read_stdout()
            except (anyio.ClosedResourceError, OSError):
                return
            if not data:
                return
            for item in buffer.feed(data):
                if isinstance(item, TooLong):
                    yield AgentProtocolError(
                        ErrorCode.TOO_LONG, f"line longer than {item.limit} bytes; dropped"
                    )
                    continue
                if not item.strip():
                    continue
                try:
                    yield parse_agent_line(item)
                except AgentProtocolError as exc:
                    yield exc

    async def _read_stdout(self) -> bytes:
        """The next bytes the agent wrote on stdout; empty at its end."""
        while True:
            if self._stdout < 0:
                return b""
            try:
                data: bytes | None = os.read(self._stdout, READ_SIZE)
            except BlockingIOError:
                data = None
            if data is not None:
                await anyio.lowlevel.checkpoint()
                return data
            # Waited on outside the except block, which would keep the error (and
            # its traceback) alive for as long as an idle agent says nothing.
            await anyio.wait_readable(self._stdout)

    def _stderr_ready(self) -> None:
        """A loop callback: log what the agent wrote on stderr, line by line."""
        try:
            data = os.read(self._stderr, READ_SIZE)
        except BlockingIOError:
            return
        except OSError:
            data = b""
        if not data:
            self._close_stderr()
            return
        if self._stderr_buffer is None:
            self._stderr_buffer = LineBuffer(STDERR_LINE)
        for item in self._stderr_buffer.feed(data):
            if isinstance(item, bytes) and item.strip():
                log.info(
                    "agent.stderr",
                    supervisor_id=self.supervisor_id,
                    line=item.decode("utf-8", errors="replace"),
                )

    def _close_stderr(self) -> None:
        if self._stderr >= 0:
            asyncio.get_running_loop().remove_reader(self._stderr)
            os.close(self._stderr)
            self._stderr = -1
            self._stderr_buffer = None

    @staticmethod
    def _close(fd: int) -> None:
        if fd >= 0:
            anyio.notify_closing(fd)  # a task waiting on it gets ClosedResourceError
            os.close(fd)

    async def close_stdin(self) -> None:
        self._stdin_closed = True
        fd, self._stdin = self._stdin, -1
        self._close(fd)
        await anyio.lowlevel.checkpoint()

    def signal_group(self, signum: int) -> None:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self.process.pid, signum)

    async def stop(self, grace: float, farewell: Mapping[str, Any] | None = None) -> int | None:
        """Send ``farewell`` (if any) and close stdin; after ``grace`` SIGTERM, after
        another ``grace`` SIGKILL the process group, whatever its pipe does."""
        with anyio.CancelScope(shield=True):
            with anyio.move_on_after(grace):
                if farewell is not None:
                    await self.send(farewell)
                await self.close_stdin()
                return await self.process.wait()
            self.signal_group(signal.SIGTERM)
            with anyio.move_on_after(grace):
                return await self.process.wait()
            self.signal_group(signal.SIGKILL)
            return await self.process.wait()
        return self.process.returncode  # only if the shielded scope was somehow left early

    async def wait(self) -> int:
        return await self.process.wait()

    async def aclose(self) -> None:
        with anyio.CancelScope(shield=True):
            self.signal_group(signal.SIGKILL)
            self._stdin_closed = True
            stdin, stdout, self._stdin, self._stdout = self._stdin, self._stdout, -1, -1
            self._close(stdin)
            self._close(stdout)
            self._close_stderr()
            await self.process.aclose()

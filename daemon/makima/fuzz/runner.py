"""The runner (:class:`Fuzzer`) and the drill (:func:`run_fuzz_drill`)."""

from __future__ import annotations

import base64
import contextlib
import functools
import json
import os
import random
import re
import shutil
import sys
import tempfile
import time
import uuid
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import anyio
import anyio.abc

from makima.control.client import CallTimeoutError, ControlClient, ControlError, RemoteError
from makima.control.codec import MAX_LINE, ProtocolError, Response, parse_server_message
from makima.drill import Check, DaemonRunner
from makima.errors import MakimaError
from makima.events import EventKind
from makima.fuzz.agent_lines import NONE, NULL, REF, AgentLine, random_agent_lines
from makima.fuzz.agents import (
    CANARY_CHOICES,
    CANARY_PHASE,
    LINES_FINISHED,
    SINK_QUESTION,
    TRACE_ENV,
    canary_question,
)
from makima.fuzz.frames import (
    ClosingFrame,
    Frame,
    closing_frames,
    padded_hello,
    random_frames,
    request_line,
)
from makima.fuzz.oracle import (
    CONFLICT,
    INTERNAL_ERROR,
    INVALID_REQUEST,
    NO_REPLY,
    RESULT,
    SYNC_PREFIX,
    Ids,
    outcome_name,
)

# --------------------------------------------------------------------------- the runner

CRASH = "no crash: the daemon process stayed up"
HANG = "no hang: every request answered within its deadline"
ANSWERS = "the daemon answered after every batch"
INTERNAL = "no internal error (-32603, or 'internal' to an agent)"
PROTOCOL = "every reply as the protocol says"
LOST = "nothing acknowledged was lost"
AGENT = "every agent line answered as the protocol says"
SLOW = "stalled clients and agents did not stall the daemon"
RSS = "RSS stayed bounded"
CHECKS = (CRASH, HANG, ANSWERS, INTERNAL, PROTOCOL, LOST, AGENT, SLOW)
TERMINAL = frozenset({"completed", "failed"})
EXAMPLES = 5  # problems kept per check
AGENT_RUN = 250  # hostile lines per agent


@dataclass(frozen=True, slots=True)
class FuzzSettings:
    frames: int = 100_000  # hostile control frames, closing ones included
    seed: int | None = None
    connections: int = 4  # sending at once
    batch: int = 50  # frames per connection per round
    agent_lines: int | None = None  # None: frames // 50, at least 100
    slow_clients: int = 16  # clients that flood requests and never read
    held_lines: int = 160  # clients that each hold an unfinished 1 MiB line
    closing_every: int = 4  # a frame that closes its connection every this many rounds
    deadline: float = 30.0  # seconds for a batch's replies, a check, a create to settle
    quick: float = 5.0  # seconds in which others must be answered while clients stall
    cancel_deadline: float = 20.0  # seconds for supervisor.cancel of an agent that reads nothing
    rss_growth_mib: int = 128  # over the RSS before, at any moment (less than held_lines)
    rss_after_mib: int = 64  # over the RSS before, once it is over
    restart: bool = True  # after a crash, start the daemon again and go on

    @property
    def lines(self) -> int:
        return self.agent_lines if self.agent_lines is not None else max(100, self.frames // 50)


@dataclass
class FuzzReport:
    seed: int
    rss_growth_limit: int  # KiB
    rss_after_limit: int  # KiB
    frames: int = 0
    agent_lines: int = 0
    rounds: int = 0
    replies: Counter[str] = field(default_factory=Counter)
    agent_replies: Counter[str] = field(default_factory=Counter)
    crashes: int = 0
    hangs: int = 0
    rss_before: int | None = None  # KiB
    rss_max: int | None = None
    rss_after: int | None = None
    problems: dict[str, list[str]] = field(default_factory=dict)
    counts: Counter[str] = field(default_factory=Counter)
    extra: list[Check] = field(default_factory=list)
    seconds: float = 0.0
    scratch: Path | None = None

    def add(self, check: str, detail: str) -> None:
        self.counts[check] += 1
        examples = self.problems.setdefault(check, [])
        if len(examples) < EXAMPLES:
            examples.append(detail if len(detail) <= 900 else detail[:900] + "…")

    def checks(self) -> list[Check]:
        out = [
            Check(
                name,
                not self.counts[name],
                "ok"
                if not self.counts[name]
                else f"{self.counts[name]} times, e.g. " + " | ".join(self.problems[name][:2]),
            )
            for name in CHECKS
        ]
        out.append(self._rss_check())
        return out + self.extra

    def _rss_check(self) -> Check:
        before, peak, after = self.rss_before, self.rss_max, self.rss_after
        if before is None or peak is None:
            return Check(RSS, False, "not measured")
        growth = peak - before
        kept = (after - before) if after is not None else 0
        ok = growth <= self.rss_growth_limit and kept <= self.rss_after_limit
        detail = (
            f"{mib(before)} before, {mib(peak)} max (+{mib(growth)}, limit "
            f"+{mib(self.rss_growth_limit)}), {mib(after)} after (+{mib(kept)}, limit "
            f"+{mib(self.rss_after_limit)})"
        )
        return Check(RSS, ok, detail)

    @property
    def ok(self) -> bool:
        return all(c.ok for c in self.checks())

    def describe(self) -> str:
        """Every failed check with its examples, for an assertion message."""
        lines = [f"fuzz seed {self.seed}: {self.frames} frames, {self.agent_lines} agent lines"]
        for check in self.checks():
            if not check.ok:
                lines.append(f"FAILED {check.name}: {check.detail[:200]}")
                lines.extend(f"    {p}" for p in self.problems.get(check.name, []))
        return "\n".join(lines)

    def to_json(self) -> dict[str, Any]:
        return {
            "ok": self.ok,
            "seed": self.seed,
            "frames": self.frames,
            "agent_lines": self.agent_lines,
            "replies": dict(self.replies),
            "agent_replies": dict(self.agent_replies),
            "crashes": self.crashes,
            "hangs": self.hangs,
            "rss_kib": {"before": self.rss_before, "max": self.rss_max, "after": self.rss_after},
            "seconds": round(self.seconds, 1),
            "checks": [{"name": c.name, "ok": c.ok, "detail": c.detail} for c in self.checks()],
            "problems": self.problems,
        }


def mib(kib: int | None) -> str:
    return "unknown" if kib is None else f"{kib / 1024:.0f} MiB"


def rss_kib(pid: int) -> int | None:
    """VmRSS of ``pid`` in KiB (None: no such process, or a zombie)."""
    try:
        text = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return None
    for line in text.splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    return None


def describe(data: bytes, label: str) -> str:
    """A frame or line for a report: its label, its start and its end, its size."""
    shown = repr(data) if len(data) <= 240 else f"{data[:150]!r} … {data[-70:]!r}"
    return f"{label}: {shown} ({len(data)} bytes)"


def sync_line(sync_id: str) -> bytes:
    return b'{"jsonrpc":"2.0","id":' + json.dumps(sync_id).encode() + b',"method":"daemon.hello"}\n'


_FAILURE_LINE = re.compile(r'Error|Exception|Traceback|"level": "(error|critical)"')
"""A line of the daemon's log that tells why it failed."""


class _Broken(MakimaError):
    """A step lost its connection or its subscription (the daemon may be gone)."""


class _LineReader:
    """Lines from a stream, any length (the caller judges the length)."""

    def __init__(self, stream: anyio.abc.ByteReceiveStream) -> None:
        self.stream = stream
        self.buffer = bytearray()
        self.scanned = 0

    async def line(self) -> bytes | None:
        """The next line without its newline; None at the end of the stream."""
        while True:
            end = self.buffer.find(b"\n", self.scanned)
            if end >= 0:
                line = bytes(self.buffer[:end])
                del self.buffer[: end + 1]
                self.scanned = 0
                return line
            self.scanned = len(self.buffer)
            try:
                self.buffer += await self.stream.receive()
            except (
                anyio.EndOfStream,
                anyio.BrokenResourceError,
                anyio.ClosedResourceError,
                OSError,
            ):
                return None


@dataclass
class _Canary:
    supervisor_id: str
    trace: Path
    answers: dict[str, str] = field(default_factory=dict)  # acknowledged: question id → answer


class Fuzzer:
    """Drives one daemon process (a :class:`~makima.drill.DaemonRunner`, started)
    with hostile input and checks it after each step. Open a :meth:`session`,
    then call the steps (or :meth:`run` for the whole mix); the findings are in
    :attr:`report`."""

    def __init__(
        self,
        runner: DaemonRunner,
        settings: FuzzSettings,
        scratch: Path,
        progress: Callable[[FuzzReport], None] | None = None,
    ) -> None:
        self.runner = runner
        self.settings = settings
        self.scratch = scratch
        seed = settings.seed if settings.seed is not None else random.randrange(1 << 30)  # noqa: S311
        self.rng = random.Random(seed)  # noqa: S311 - hostile input, not secrets
        self.report = FuzzReport(
            seed=seed,
            rss_growth_limit=settings.rss_growth_mib * 1024,
            rss_after_limit=settings.rss_after_mib * 1024,
        )
        self.ids = Ids()
        self.progress = progress or (lambda _: None)
        self.dead = False
        self.restarts = 0
        self._canary: _Canary | None = None
        self._states: dict[str, str] = {}
        self._reasons: dict[str, object] = {}
        self._asked: dict[str, list[tuple[str, str]]] = {}
        self._changed = anyio.Event()
        self._watch_lost: str | None = None
        self._tg: anyio.abc.TaskGroup | None = None
        self._exchanges = 0
        self._agent_runs = 0
        self._context = ""  # what was sent last, for a crash report
        self._suspects: list[tuple[int, str]] = []  # what may have killed the daemon, ranked

    @property
    def socket_path(self) -> Path:
        return self.runner.socket_path

    # ----------------------------------------------------------------- session

    @asynccontextmanager
    async def session(self, *, canary: bool = True) -> AsyncIterator[Fuzzer]:
        """Watch the daemon's events and start the canary; at the end, check
        everything acknowledged to it and measure RSS after."""
        started = time.monotonic()
        async with anyio.create_task_group() as tg:
            self._tg = tg
            await self._step("subscribing to events", self._start_watch)
            if canary:
                await self._step("starting the canary", self._start_canary)
            self.report.rss_before = self._rss()
            self.report.rss_max = self.report.rss_before
            try:
                yield self
                await self._step("final check", self._final_check)
            finally:
                self.report.rss_after = self._rss()
                self.report.seconds = time.monotonic() - started
                tg.cancel_scope.cancel()
                self._tg = None

    def _rss(self) -> int | None:
        process = self.runner.process
        value = rss_kib(process.pid) if process is not None else None
        if value is not None and (self.report.rss_max is None or value > self.report.rss_max):
            self.report.rss_max = value
        return value

    def _client(
        self, timeout: float | None = None
    ) -> contextlib.AbstractAsyncContextManager[ControlClient]:
        return ControlClient.connect(self.socket_path, timeout=timeout or self.settings.deadline)

    async def _step(self, name: str, action: Callable[[], Awaitable[None]]) -> None:
        """Run one step; tell a crash (the process gone) from a failure or a hang."""
        if self.dead:
            return
        self._context = name
        self._suspects = []
        failure: str | None = None
        try:
            await action()
        except CallTimeoutError as exc:
            self.report.hangs += 1
            self.report.add(HANG, f"{name}: {exc}")
        except (ControlError, _Broken, OSError) as exc:
            failure = f"{name}: {type(exc).__name__}: {exc}"
        except (KeyError, TypeError) as exc:  # a result without the members it must have
            self.report.add(PROTOCOL, f"{name}: a result of the wrong shape: {exc!r}")
        process = self.runner.process
        if failure is None and process is not None and process.returncode is None:
            return
        if await self._gone():
            await self._crashed(name)
        elif failure is not None:
            self.report.add(ANSWERS, failure)

    async def _gone(self) -> bool:
        process = self.runner.process
        if process is None:
            return True
        if process.returncode is None:
            with anyio.move_on_after(3.0):
                await process.wait()
        return process.returncode is not None

    async def _crashed(self, name: str) -> None:
        self.report.crashes += 1
        process = self.runner.process
        code = process.returncode if process is not None else None
        ranked = [text for _, text in sorted(self._suspects, key=lambda s: s[0])]
        suspects = "; ".join(ranked[:3]) or f"last sent: {self._context}"
        self.report.add(
            CRASH,
            f"the daemon exited (status {code}) during {name}; {suspects}; "
            f"its log: {self._log_tail()}",
        )
        if self.settings.restart:
            try:
                with anyio.fail_after(120):
                    await self.runner.wait()
                    await self.runner.start()
                self.restarts += 1
                await self._start_watch()
            except (MakimaError, OSError, TimeoutError) as exc:
                self.report.add(CRASH, f"could not start the daemon again: {exc}")
            else:
                return
        self.dead = True
        with contextlib.suppress(MakimaError, OSError, TimeoutError):
            # Reap it and close its notification socket.
            await (self.runner.kill() if self.runner.running else self.runner.wait())

    def _log_tail(self) -> str:
        try:
            with self.runner.log_path.open("rb") as log:
                log.seek(0, os.SEEK_END)
                log.seek(max(0, log.tell() - 40_000))
                lines = log.read().decode(errors="replace").splitlines()
        except OSError:
            return "(no log)"
        wanted = [ln for ln in lines if _FAILURE_LINE.search(ln)]
        picked = (wanted or lines)[-3:]
        return " ⏎ ".join(ln.strip()[-700:] for ln in picked)

    # ----------------------------------------------------------------- events

    async def _start_watch(self) -> None:
        assert self._tg is not None
        self._watch_lost = None
        await self._tg.start(self._watch)

    async def _watch(self, *, task_status: anyio.abc.TaskStatus[None]) -> None:
        started = False
        try:
            async with (
                self._client() as client,
                client.events(
                    [EventKind.SUPERVISOR_STATE_CHANGED.value, EventKind.QUESTION_ASKED.value],
                    buffer=1 << 16,
                ) as events,
            ):
                task_status.started()
                started = True
                async for event in events:
                    self._on_event(event)
            self._watch_lost = "the daemon ended the event subscription"
        except ControlError as exc:
            if not started:
                raise
            self._watch_lost = f"the event subscription broke: {exc}"
        finally:
            self._notify()

    def _on_event(self, event: Mapping[str, Any]) -> None:
        sid = str(event.get("supervisor_id"))
        if event.get("kind") == EventKind.SUPERVISOR_STATE_CHANGED.value:
            self._states[sid] = str(event.get("state"))
            self._reasons[sid] = event.get("error_message")
        elif event.get("kind") == EventKind.QUESTION_ASKED.value:
            entry = (str(event.get("question_id")), str(event.get("question")))
            self._asked.setdefault(sid, []).append(entry)
        self._notify()

    def _notify(self) -> None:
        self._changed.set()
        self._changed = anyio.Event()

    async def _wait_for(self, condition: Callable[[], bool], limit: float) -> bool:
        """Wait (on events) until ``condition`` holds; False after ``limit`` seconds."""
        with anyio.move_on_after(limit):
            while not condition():
                if self._watch_lost is not None:
                    raise _Broken(self._watch_lost)
                await self._changed.wait()
            return True
        return False

    # ----------------------------------------------------------------- checks

    async def check(self) -> None:
        """The daemon answers; the canary kept everything acknowledged to it."""
        await self._step("check", self._check)

    async def _check(self) -> None:
        if self.runner.notify is not None:
            self.runner.notify.drain()  # else its status updates pile up and fail (EAGAIN)
        async with self._client() as client:
            try:
                await client.call("daemon.status")
            except RemoteError as exc:
                self.report.add(ANSWERS, f"daemon.status: {exc}")
            if self._canary is not None:
                await self._check_canary(client, self._canary)
        self._rss()

    async def _check_canary(self, client: ControlClient, canary: _Canary) -> None:
        sid = canary.supervisor_id
        questions = (await client.call("question.list", {"supervisor_id": sid}))["questions"]
        body = await client.call("supervisor.get", {"supervisor_id": sid})
        if (
            body.get("state") in TERMINAL
            or body.get("phase") != CANARY_PHASE
            or body.get("restoration_count") != self.restarts
        ):
            self.report.add(
                LOST,
                f"the canary is {body.get('state')} in phase {body.get('phase')!r} "
                f"(restored {body.get('restoration_count')} times, the daemon restarted "
                f"{self.restarts} times): {body.get('error_message')}",
            )
        checkpoint = body.get("checkpoint_data")
        answered = checkpoint.get("answered", 0) if isinstance(checkpoint, dict) else 0
        if len(questions) > 1:
            self.report.add(LOST, f"the canary has {len(questions)} open questions, not one")
        if questions:
            question = questions[0]
            n = len(canary.answers)
            if question.get("question") != canary_question(n) or answered != n:
                self.report.add(
                    LOST,
                    f"after {n} acknowledged answers the canary asks {question.get('question')!r}"
                    f" with checkpoint answered={answered}",
                )
            choice = CANARY_CHOICES[n % 2]
            qid = str(question.get("question_id"))
            try:
                await client.call("question.answer", {"question_id": qid, "answer": choice})
            except RemoteError as exc:
                self.report.add(LOST, f"the canary's question {qid} could not be answered: {exc}")
            else:
                canary.answers[qid] = choice
                self.ids.answered.append(qid)
        recent = list(canary.answers)[-2:]
        older = list(canary.answers)[:-2]
        await self._verify_answers(
            client, canary, [*recent, *self.rng.sample(older, min(1, len(older)))]
        )

    async def _verify_answers(
        self, client: ControlClient, canary: _Canary, question_ids: Sequence[str]
    ) -> None:
        """An acknowledged answer stays as given: answering again is a conflict carrying it."""
        for qid in question_ids:
            given = canary.answers[qid]
            other = CANARY_CHOICES[1 - CANARY_CHOICES.index(given)]
            try:
                await client.call("question.answer", {"question_id": qid, "answer": other})
            except RemoteError as exc:
                kept = exc.data.get("answer") if isinstance(exc.data, dict) else None
                if exc.code != CONFLICT or kept != given:
                    self.report.add(
                        LOST, f"the acknowledged answer {given!r} to {qid}: now {exc} ({kept!r})"
                    )
            else:
                self.report.add(LOST, f"question {qid}, answered {given!r}, took a second answer")

    async def _start_canary(self) -> None:
        trace = self.scratch / f"canary-{uuid.uuid4().hex[:8]}.jsonl"
        async with self._client() as client:
            created = await client.call(
                "supervisor.create",
                {
                    "name": "makima-fuzz-canary",
                    "goal": "keep everything acknowledged to it",
                    "command": [sys.executable, "-m", "makima.fuzz", "canary"],
                    "env": {TRACE_ENV: str(trace)},
                },
            )
        sid = str(created["supervisor_id"])
        self._canary = _Canary(sid, trace)
        self.ids.readable.append(sid)
        if not await self._wait_for(lambda: bool(self._asked.get(sid)), self.settings.deadline):
            self.report.add(LOST, "the canary agent never asked its first question")

    async def _final_check(self) -> None:
        await self._check()
        canary = self._canary
        if canary is None or not canary.answers:
            return
        n = len(canary.answers)
        asked = await self._wait_for(
            lambda: any(
                t == canary_question(n) for _, t in self._asked.get(canary.supervisor_id, [])
            ),
            self.settings.deadline,
        )
        if not asked:
            self.report.add(LOST, f"the canary never asked question {n}: its last answer is lost")
        async with self._client() as client:
            await self._verify_answers(client, canary, list(canary.answers))
        self._check_trace(canary)

    def _check_trace(self, canary: _Canary) -> None:
        """Every acknowledged answer reached the canary, once per agent process."""
        try:
            lines = canary.trace.read_text(encoding="utf-8").splitlines()
        except OSError as exc:
            self.report.add(LOST, f"no trace of the canary's agent: {exc}")
            return
        got: Counter[str] = Counter()
        in_process: Counter[str] = Counter()
        for text in lines:
            try:
                message = json.loads(text)
            except ValueError:
                continue
            if message.get("type") == "start":
                in_process = Counter()
                for entry in (message.get("restoration") or {}).get("undelivered_answers", []):
                    in_process[entry["question_id"]] += 1
                    got[entry["question_id"]] += 1
            elif message.get("type") == "answer":
                in_process[message["question_id"]] += 1
                got[message["question_id"]] += 1
            for qid, count in in_process.items():
                if count > 1:
                    self.report.add(
                        LOST, f"the canary's agent got the answer to {qid} {count} times"
                    )
                    in_process[qid] = 1
        for qid in canary.answers:
            if not got[qid]:
                self.report.add(LOST, f"the acknowledged answer to {qid} never reached the canary")

    # ----------------------------------------------------------------- control frames

    async def control_batch(self, frames: Sequence[Frame]) -> None:
        """Send ``frames`` over up to ``connections`` connections at once (each in
        random pieces, each frame followed by a sentinel request) and judge every
        reply; then wait for the supervisors they created to settle."""
        await self._step("control frames", lambda: self._control_batch(frames))

    async def _control_batch(self, frames: Sequence[Frame]) -> None:
        count = max(1, min(self.settings.connections, len(frames)))
        parts = [list(frames[k::count]) for k in range(count)]
        created: list[str] = []
        errors: list[str] = []
        async with anyio.create_task_group() as tg:
            for part in parts:
                tg.start_soon(self._exchange, part, created, errors)
        self.report.frames += len(frames)
        self._rss()
        if errors:
            raise _Broken("; ".join(errors[:3]))
        await self._settle(created)

    def _chunks(self, data: bytes) -> list[bytes]:
        roll = self.rng.random()
        if roll < 0.5 or len(data) < 2:
            return [data]
        if roll < 0.85:
            chunks, at = [], 0
            while at < len(data):
                size = self.rng.randint(1, 8192)
                chunks.append(data[at : at + size])
                at += size
            return chunks
        head = min(len(data), 96)
        return [data[k : k + 1] for k in range(head)] + ([data[head:]] if head < len(data) else [])

    async def _send_chunks(self, stream: anyio.abc.SocketStream, chunks: Sequence[bytes]) -> None:
        with contextlib.suppress(anyio.BrokenResourceError, anyio.ClosedResourceError, OSError):
            for chunk in chunks:
                await stream.send(chunk)

    async def _exchange(
        self, frames: Sequence[Frame], created: list[str], errors: list[str]
    ) -> None:
        self._exchanges += 1
        tag = f"{SYNC_PREFIX}{self._exchanges}-"
        data = b"".join(f.data + sync_line(f"{tag}{k}") for k, f in enumerate(frames))
        self._context = "; ".join(describe(f.data, f.label) for f in frames[-3:])
        limit = self.settings.deadline + len(data) / 2e6
        results: list[list[tuple[Response, int]]] = [[] for _ in frames]
        answered = 0
        closed = False
        try:
            stream = await anyio.connect_unix(self.socket_path)
        except OSError as exc:
            errors.append(f"connecting: {exc}")
            return
        async with stream:
            reader = _LineReader(stream)
            async with anyio.create_task_group() as tg:
                tg.start_soon(self._send_chunks, stream, self._chunks(data))
                current: list[tuple[Response, int]] = []
                with anyio.move_on_after(limit) as scope:
                    while answered < len(frames):
                        line = await reader.line()
                        if line is None:
                            closed = True
                            break
                        message = parse_server_message(line)
                        if isinstance(message, ProtocolError):
                            self.report.add(
                                PROTOCOL,
                                f"the daemon sent a bad line ({message.message}): {line[:200]!r}",
                            )
                        elif isinstance(message, Response):
                            if message.id == f"{tag}{answered}":
                                results[answered] = current
                                current = []
                                answered += 1
                            else:
                                current.append((message, len(line)))
                tg.cancel_scope.cancel()
        if scope.cancelled_caught:
            self.report.hangs += 1
            self.report.add(
                HANG,
                f"no answer within {limit:.0f}s to frame {answered + 1} of {len(frames)}: "
                + describe(frames[answered].data, frames[answered].label),
            )
        elif closed:
            frame = frames[answered]
            shown = describe(frame.data, frame.label)
            rank = 1 if frame.method == "supervisor.create" else 2
            self._suspects.append((rank, f"the connection closed at {shown}"))
            errors.append(f"the daemon closed the connection at frame {answered + 1}: {shown}")
        for frame, replies in zip(frames[:answered], results[:answered], strict=True):
            self._judge(frame, replies, created)

    def _judge(self, frame: Frame, replies: list[tuple[Response, int]], created: list[str]) -> None:
        shown = describe(frame.data, frame.label)
        outcome = NO_REPLY
        message = ""
        if replies:
            response, size = replies[0]
            outcome = RESULT if response.error is None else response.error.code
            message = "" if response.error is None else response.error.message[:200]
            if len(replies) > 1:
                self.report.add(PROTOCOL, f"{len(replies)} replies to one line: {shown}")
            if size > MAX_LINE:
                self.report.add(PROTOCOL, f"a {size}-byte reply, over the line limit, to {shown}")
            if frame.reply_ids is not None and response.id not in frame.reply_ids:
                allowed = ", ".join(sorted(repr(i)[:40] for i in frame.reply_ids))
                self.report.add(
                    PROTOCOL, f"reply id {response.id!r:.40} instead of {allowed}: {shown}"
                )
            if outcome == RESULT and frame.method == "supervisor.create":
                result = response.result
                if isinstance(result, dict) and isinstance(result.get("supervisor_id"), str):
                    created.append(result["supervisor_id"])
                    # First of all: one taken though the protocol refuses it.
                    refused = frame.expect is not None and RESULT not in frame.expect
                    self._suspects.append(
                        (0 if refused else 3, f"its agent starting after {shown}")
                    )
        self.report.replies[outcome_name(outcome)] += 1
        if outcome == INTERNAL_ERROR:
            self.report.add(INTERNAL, f"{message}: {shown}")
        elif frame.expect is not None and outcome not in frame.expect:
            wanted = " or ".join(outcome_name(o) for o in sorted(frame.expect))
            self.report.add(
                PROTOCOL, f"expected {wanted}, got {outcome_name(outcome)} ({message}): {shown}"
            )

    async def _settle(self, created: Sequence[str]) -> None:
        """Wait until every supervisor the frames created has finished (its agent
        cannot run: the generators give it none that can)."""
        if not created:
            return
        settled = await self._wait_for(
            lambda: all(self._states.get(s) in TERMINAL for s in created), self.settings.deadline
        )
        if not settled:
            stuck = [s for s in created if self._states.get(s) not in TERMINAL]
            self.report.hangs += 1
            self.report.add(HANG, f"supervisors created by the fuzz never finished: {stuck[:3]}")
        self.ids.readable.extend(created)
        self.ids.mutable.extend(created)

    async def closing(self, frames: Sequence[ClosingFrame]) -> None:
        """Each frame alone on a connection: the daemon answers and hangs up."""
        for frame in frames:
            await self._step("a line that closes", functools.partial(self._closing, frame))

    async def _closing(self, frame: ClosingFrame) -> None:
        self._context = describe(frame.data, frame.label)
        replies: list[bytes] = []
        ended = False
        async with await anyio.connect_unix(self.socket_path) as stream:
            reader = _LineReader(stream)

            async def send() -> None:
                await self._send_chunks(stream, self._chunks(frame.data))
                if not frame.closes:
                    with contextlib.suppress(
                        anyio.BrokenResourceError, anyio.ClosedResourceError, OSError
                    ):
                        await stream.send_eof()

            with anyio.move_on_after(self.settings.deadline + len(frame.data) / 2e6):
                async with anyio.create_task_group() as tg:
                    tg.start_soon(send)
                    while (line := await reader.line()) is not None:
                        replies.append(line)
                    ended = True
                    tg.cancel_scope.cancel()
        self.report.frames += 1
        if not ended:
            self.report.hangs += 1
            self.report.add(HANG, f"the daemon did not hang up after {self._context}")
            return
        responses = [m for m in map(parse_server_message, replies) if isinstance(m, Response)]
        if len(responses) < len(replies):
            self.report.add(PROTOCOL, f"lines that are not responses after {self._context}")
        codes = [RESULT if m.error is None else m.error.code for m in responses]
        self.report.replies[outcome_name(codes[0]) if codes else outcome_name(NO_REPLY)] += 1
        if INTERNAL_ERROR in codes:
            self.report.add(INTERNAL, self._context)
        if frame.closes and codes != [INVALID_REQUEST]:
            names = ", ".join(outcome_name(c) for c in codes) or "no reply"
            self.report.add(
                PROTOCOL, f"expected one -32600 and a hang-up, got {names}: {self._context}"
            )
        elif not frame.closes and len(codes) > 1:
            self.report.add(PROTOCOL, f"{len(codes)} replies to one partial line: {self._context}")

    # ----------------------------------------------------------------- stalled peers

    async def _quick_probe(self, when: str) -> None:
        with anyio.move_on_after(self.settings.quick) as scope:
            async with self._client() as client:
                await client.call("daemon.hello")
                await client.call("daemon.status")
        if scope.cancelled_caught:
            self.report.hangs += 1
            self.report.add(SLOW, f"no answer within {self.settings.quick:.0f}s {when}")

    async def slow_clients(self) -> None:
        """Clients that flood requests and never read, clients that each send all
        but the end of a 1 MiB line (``held_lines`` MiB in all, more than a daemon
        should hold), idle ones: others are still answered at once, RSS stays bounded."""
        await self._step("slow and never-reading clients", self._slow_clients)

    async def _slow_clients(self) -> None:
        settings = self.settings
        flood = request_line(1, "events.subscribe") + b"".join(
            request_line(k, "daemon.status") for k in range(2, 400)
        )
        held = padded_hello("held", MAX_LINE)[:-2]  # without its closing brace and newline
        streams: list[anyio.abc.UNIXSocketStream] = []

        async def stall(payload: bytes) -> None:
            with contextlib.suppress(anyio.BrokenResourceError, OSError):
                stream = await anyio.connect_unix(self.socket_path)
                streams.append(stream)
                if payload:
                    await stream.send(payload)

        count = settings.slow_clients + settings.held_lines + 4
        try:
            with anyio.move_on_after(settings.quick * 2):
                async with anyio.create_task_group() as tg:
                    for _ in range(settings.slow_clients):
                        tg.start_soon(stall, flood)
                    for _ in range(settings.held_lines):
                        tg.start_soon(stall, held)
                    for _ in range(4):
                        tg.start_soon(stall, b"")
            self._rss()
            await self._quick_probe(f"while {count} clients stall")
            self._rss()
        finally:
            for opened in streams:
                with contextlib.suppress(Exception):
                    await opened.aclose()
        await self._quick_probe(f"after {count} stalled clients went")

    async def stuck_agent(self) -> None:
        """An agent that writes and never reads: others are answered, and a
        person's cancel of it answers."""
        await self._step("an agent that reads nothing", self._stuck_agent)

    async def _stuck_agent(self) -> None:
        async with self._client() as client:
            created = await client.call(
                "supervisor.create",
                {
                    "name": "makima-fuzz-sink",
                    "command": [sys.executable, "-m", "makima.fuzz", "sink"],
                },
            )
        sid = str(created["supervisor_id"])
        self.ids.readable.append(sid)
        asked = await self._wait_for(
            lambda: any(t == SINK_QUESTION for _, t in self._asked.get(sid, [])),
            self.settings.deadline,
        )
        if not asked:
            self.report.add(SLOW, "the agent that reads nothing never got to ask its question")
            return
        await self._quick_probe("while an agent reads nothing")
        result: Any = None
        with anyio.move_on_after(self.settings.cancel_deadline) as scope:
            async with self._client(timeout=self.settings.cancel_deadline + 5) as client:
                result = await client.call("supervisor.cancel", {"supervisor_id": sid})
        if scope.cancelled_caught:
            self.report.hangs += 1
            self.report.add(
                SLOW,
                f"supervisor.cancel of an agent that reads nothing did not answer within "
                f"{self.settings.cancel_deadline:.0f}s",
            )
        elif not isinstance(result, dict) or result.get("state") != "failed":
            self.report.add(
                SLOW, f"supervisor.cancel of an agent that reads nothing: {result!r:.200}"
            )
        await self._quick_probe("after cancelling an agent that reads nothing")

    # ----------------------------------------------------------------- agent lines

    async def agent_lines(self, lines: Sequence[AgentLine]) -> None:
        """Agents write ``lines`` (AGENT_RUN at most each, so that a line that ends
        its supervisor hides few others), each line followed by a sync: every line
        gets the reply the protocol says; the questions acknowledged are kept."""
        for start in range(0, len(lines), AGENT_RUN):
            part = lines[start : start + AGENT_RUN]
            await self._step("hostile agent lines", functools.partial(self._agent_lines, part))

    async def _agent_lines(self, lines: Sequence[AgentLine]) -> None:
        self._agent_runs += 1
        plan = self.scratch / f"lines-{self._agent_runs}.jsonl"
        log = self.scratch / f"lines-{self._agent_runs}.log"
        with plan.open("w", encoding="utf-8") as out:
            for line in lines:
                entry = {"data": base64.b64encode(line.data).decode(), "chunks": list(line.chunks)}
                out.write(json.dumps(entry) + "\n")
        async with self._client() as client:
            created = await client.call(
                "supervisor.create",
                {
                    "name": f"makima-fuzz-lines-{self._agent_runs}",
                    "command": [sys.executable, "-m", "makima.fuzz", "lines", str(plan), str(log)],
                },
            )
        sid = str(created["supervisor_id"])
        self.ids.readable.append(sid)
        size = sum(len(line.data) for line in lines)
        try:
            finished = await self._wait_for(
                lambda: (
                    (
                        self._states.get(sid) == "blocked"
                        and self._reasons.get(sid) == LINES_FINISHED
                    )
                    or self._states.get(sid) in TERMINAL
                ),
                self.settings.deadline + 0.05 * len(lines) + size / 1e6,
            )
        except _Broken:
            self._context = self._line_context(lines, log)
            raise
        records = self._read_log(log)
        done = [r for r in records if "i" in r]
        self.report.agent_lines += len(done)
        if not finished:
            self.report.hangs += 1
            self.report.add(
                HANG, f"no reply within the deadline to {self._line_context(lines, log)}"
            )
        elif self._states.get(sid) in TERMINAL:
            self.report.add(
                AGENT,
                f"the hostile agent's supervisor ended ({self._states.get(sid)}: "
                f"{self._reasons.get(sid)}); {self._line_context(lines, log)}",
            )
        for record in done:
            index = int(record["i"])
            if index < len(lines):
                self._judge_line(lines[index], record)
        await self._agent_aftermath(sid, done, finished)

    async def _agent_aftermath(
        self, sid: str, done: Sequence[Mapping[str, Any]], finished: bool
    ) -> None:
        acked = [
            str(r["question_id"])
            for record in done
            for r in record.get("replies", [])
            if r.get("type") == "ack" and r.get("question_id")
        ]
        async with self._client() as client:
            try:
                await client.call("supervisor.get", {"supervisor_id": sid})
            except RemoteError as exc:
                self.report.add(ANSWERS, f"supervisor.get of the hostile agent's supervisor: {exc}")
            if finished and self._states.get(sid) not in TERMINAL:
                listed = await client.call("question.list", {"supervisor_id": sid})
                open_ids = {q.get("question_id") for q in listed["questions"]}
                missing = [q for q in acked if q not in open_ids]
                if missing:
                    self.report.add(
                        LOST, f"{len(missing)} questions acknowledged to the hostile agent are gone"
                    )
            with anyio.move_on_after(self.settings.cancel_deadline) as scope:
                with contextlib.suppress(RemoteError):
                    await client.call("supervisor.cancel", {"supervisor_id": sid})
            if scope.cancelled_caught:
                self.report.hangs += 1
                self.report.add(SLOW, "supervisor.cancel of the hostile agent did not answer")

    @staticmethod
    def _read_log(path: Path) -> list[dict[str, Any]]:
        try:
            text = path.read_text(encoding="utf-8")
        except OSError:
            return []
        records: list[dict[str, Any]] = []
        for entry in text.splitlines():
            with contextlib.suppress(ValueError):
                records.append(json.loads(entry))
        return records

    def _line_context(self, lines: Sequence[AgentLine], log: Path) -> str:
        """The line the daemon was handling (and the one before it), from the agent's log."""
        index = sum(1 for r in self._read_log(log) if "i" in r and not r.get("eof"))
        where = [
            f"{what} agent line {k}: " + describe(lines[k].data, lines[k].label)
            for what, k in (("after", index - 1), ("at", index))
            if 0 <= k < len(lines)
        ]
        return "; ".join(where) or "the end of the lines"

    def _judge_line(self, line: AgentLine, record: Mapping[str, Any]) -> None:
        replies: list[dict[str, Any]] = list(record.get("replies", []))
        shown = describe(line.data, line.label)
        if record.get("eof"):
            return  # the daemon went away: the step reports it
        if record.get("sync") != "ack":
            self.report.add(AGENT, f"the sync after this line was refused: {shown}")
        for reply in replies:
            kind = str(reply.get("type"))
            code = reply.get("code")
            self.report.agent_replies[kind if code is None else f"{kind} {code}"] += 1
            if code == "internal":
                self.report.add(INTERNAL, f"{reply.get('message')}: {shown}")
            if int(reply.get("size", 0)) > MAX_LINE + 1:
                self.report.add(
                    PROTOCOL, f"a {reply.get('size')}-byte line to the agent for {shown}"
                )
        if not replies:
            self.report.agent_replies["no reply"] += 1
            if NONE not in line.refs:
                self.report.add(AGENT, f"no reply: {shown}")
            return
        if len(replies) > 1:
            self.report.add(AGENT, f"{len(replies)} replies: {shown}")
        reply = replies[0]
        ref = reply.get("ref")
        shape = (
            NULL if ref is None else (REF if ref == line.ref and line.ref is not None else "other")
        )
        if shape not in line.refs or str(reply.get("type")) not in line.replies:
            wanted = " or ".join(sorted(line.refs))
            self.report.add(
                AGENT,
                f"expected {'/'.join(sorted(line.replies))} with ref {wanted}, got "
                f"{reply.get('type')} {reply.get('code') or ''} with ref {ref!r:.40} "
                f"({reply.get('message', '')}): {shown}",
            )

    # ----------------------------------------------------------------- the whole mix

    async def run(self) -> None:
        """``frames`` hostile frames in rounds, each round checked; stalled clients,
        hostile agent lines and an agent that reads nothing along the way."""
        settings = self.settings
        per_round = max(1, settings.connections * settings.batch)
        rounds = max(1, -(-settings.frames // per_round))
        specials: list[tuple[int, Callable[[], Awaitable[None]]]] = [
            (rounds // 4, self.slow_clients),
            (rounds // 2, lambda: self.agent_lines(random_agent_lines(self.rng, settings.lines))),
            ((3 * rounds) // 4, self.stuck_agent),
        ]
        sent = 0
        round_no = 0
        while sent < settings.frames and not self.dead:
            size = min(per_round, settings.frames - sent)
            closing = 1 if round_no % settings.closing_every == 0 and size > 1 else 0
            await self.control_batch(random_frames(self.rng, size - closing, self.ids))
            if closing:
                await self.closing(closing_frames(self.rng, closing))
            sent += size
            await self.check()
            while specials and specials[0][0] <= round_no:
                await specials.pop(0)[1]()
                await self.check()
            round_no += 1
            self.report.rounds = round_no
            self.progress(self.report)
        for _, special in specials:
            await special()
            await self.check()


# --------------------------------------------------------------------------- the drill


async def run_fuzz_drill(
    settings: FuzzSettings,
    *,
    database_url: str | None = None,
    scratch: Path | None = None,
    progress: Callable[[FuzzReport], None] | None = None,
) -> FuzzReport:
    """``makima drill --fuzz``: a real daemon on a scratch state directory (its own
    embedded PostgreSQL unless ``database_url``), fuzzed, then stopped with SIGTERM."""
    made = scratch is None
    where = scratch or Path(tempfile.mkdtemp(prefix="mkfuzz-", dir="/tmp"))
    where.mkdir(parents=True, exist_ok=True)
    if os.geteuid() == 0:
        where.chmod(0o711)  # the embedded server's account passes through
    runner = DaemonRunner(
        state_dir=where / "state",
        socket_path=where / "s.sock",
        database_url=database_url,
        log_path=where / "daemon.log",
    )
    fuzzer = Fuzzer(runner, settings, where, progress)
    report = fuzzer.report
    report.scratch = where
    try:
        await runner.start()
        async with fuzzer.session():
            await fuzzer.run()
        status: int | None = None
        if runner.running:
            with contextlib.suppress(TimeoutError):
                status = await runner.terminate()
        report.extra.append(
            Check(
                "the daemon stopped cleanly after the fuzz",
                status == 0,
                f"SIGTERM: exit status {status}" if status is not None else "no exit within 60 s",
            )
        )
    finally:
        if runner.running:
            with anyio.CancelScope(shield=True):
                await runner.kill()
        if not database_url:
            from makima.embedded import EmbeddedPostgres

            with contextlib.suppress(Exception):
                await anyio.to_thread.run_sync(EmbeddedPostgres(runner.state_dir).stop)
    if report.ok and made:
        shutil.rmtree(where, ignore_errors=True)
    return report

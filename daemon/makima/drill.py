"""Crash-and-restart drill: proves makima's invariants with real processes.

On a scratch state directory it starts a real daemon (``python -m makima
daemon``, synchronised on systemd's READY=1 through a notification socket the
drill owns), runs example release-manager agents under it, answers their
questions, kills the daemon with SIGKILL at random moments (after a random
number of events) and starts it again, several times. Then it lets every
supervisor finish, stops the daemon cleanly and checks, against the database
and the agents' protocol traces:

- every supervisor finished; the daemon came back after every kill;
- no acknowledged question, answer or task was lost;
- every answer reached its agent, at most once per agent process;
- ``restoration_count`` grew by exactly one per restoration.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import anyio
import anyio.abc

from makima.control.client import ControlClient, ControlError, RemoteError
from makima.errors import MakimaError

if TYPE_CHECKING:
    import asyncpg

    from makima.embedded import EmbeddedPostgres

AGENT_MODULE = "makima.examples.release_manager"
READY_TIMEOUT = 90.0


class DrillError(MakimaError):
    """The drill itself could not run (not a violation of an invariant)."""


# --------------------------------------------------------------------------- a daemon process


class NotifyListener:
    """A datagram socket standing in for systemd's notification socket."""

    def __init__(self, path: Path, sock: anyio.abc.UNIXDatagramSocket) -> None:
        self.path = path
        self.sock = sock
        self.messages: list[str] = []

    @classmethod
    async def bind(cls, path: Path) -> NotifyListener:
        await anyio.Path(path).unlink(missing_ok=True)
        return cls(path, await anyio.create_unix_datagram_socket(local_path=path))

    async def wait_for(self, field_line: str, limit: float = READY_TIMEOUT) -> None:
        """Read notifications until one carries ``field_line`` (e.g. READY=1)."""
        with anyio.fail_after(limit):
            while True:
                data, _ = await self.sock.receive()
                self.messages.append(data.decode())
                if field_line in data.decode().split("\n"):
                    return

    def drain(self) -> list[str]:
        """Everything sent since the last read (call when nothing else reads)."""
        raw = self.sock.extra(anyio.abc.SocketAttribute.raw_socket)  # noqa: S610
        while True:
            try:
                self.messages.append(raw.recv(65536).decode())
            except BlockingIOError:
                return self.messages

    async def aclose(self) -> None:
        self.drain()
        await self.sock.aclose()
        with contextlib.suppress(OSError):
            self.path.unlink()


class DaemonRunner:
    """``python -m makima daemon`` as a child process, started and killed at will."""

    def __init__(
        self,
        *,
        state_dir: Path,
        socket_path: Path,
        database_url: str | None,
        log_path: Path,
        args: list[str] | None = None,
    ) -> None:
        self.state_dir = state_dir
        self.socket_path = socket_path
        self.database_url = database_url
        self.log_path = log_path
        self.args = args or []
        self.process: anyio.abc.Process | None = None
        self.notify: NotifyListener | None = None
        self.starts = 0

    def environment(self, extra: Mapping[str, str] | None = None) -> dict[str, str]:
        env = dict(os.environ)
        for name in ("MAKIMA_FAULT", "NOTIFY_SOCKET", "LISTEN_FDS", "LISTEN_PID", "WATCHDOG_USEC"):
            env.pop(name, None)
        env.update(
            MAKIMA_STATE_DIR=str(self.state_dir),
            MAKIMA_SOCKET=str(self.socket_path),
            MAKIMA_LOG_LEVEL=env.get("MAKIMA_LOG_LEVEL", "info"),
        )
        if self.database_url:
            env["MAKIMA_DATABASE_URL"] = self.database_url
        else:
            env.pop("MAKIMA_DATABASE_URL", None)
        env.update(extra or {})
        return env

    async def start(
        self, extra_env: Mapping[str, str] | None = None, args: list[str] | None = None
    ) -> None:
        """Start and wait for READY=1."""
        self.starts += 1
        notify_path = self.socket_path.with_name(f"n{self.starts}-{os.getpid()}.sock")
        self.notify = await NotifyListener.bind(notify_path)
        env = self.environment(extra_env)
        env["NOTIFY_SOCKET"] = str(notify_path)
        command = [sys.executable, "-m", "makima", "daemon", "--heartbeat-interval", "0.5"]
        with self.log_path.open("ab") as log:
            self.process = await anyio.open_process(
                [*command, *self.args, *(args or [])],
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=log,
                env=env,
            )
        await self._until_ready(self.process, self.notify)

    async def _until_ready(self, process: anyio.abc.Process, notify: NotifyListener) -> None:
        """READY=1; a daemon that exits first (or is silent too long) is a DrillError at once."""
        ready = False
        async with anyio.create_task_group() as tg:

            async def exited() -> None:
                await process.wait()
                tg.cancel_scope.cancel()

            tg.start_soon(exited)
            with anyio.move_on_after(READY_TIMEOUT):
                await notify.wait_for("READY=1", limit=math.inf)
                ready = True
            tg.cancel_scope.cancel()
        if not ready:
            how = "did not become ready" if process.returncode is None else "exited"
            status = "" if process.returncode is None else f" (status {process.returncode})"
            raise DrillError(f"the daemon {how}{status}; see {self.log_path}")

    async def wait(self, limit: float = 60.0) -> int:
        assert self.process is not None
        with anyio.fail_after(limit):
            code = await self.process.wait()
        await self.process.aclose()
        if self.notify is not None:
            await self.notify.aclose()
        return code

    async def kill(self) -> int:
        assert self.process is not None
        self.process.send_signal(signal.SIGKILL)
        return await self.wait()

    async def terminate(self) -> int:
        assert self.process is not None
        self.process.send_signal(signal.SIGTERM)
        return await self.wait()

    @property
    def running(self) -> bool:
        return self.process is not None and self.process.returncode is None


# --------------------------------------------------------------------------- the drill


@dataclass(frozen=True, slots=True)
class DrillSettings:
    agents: int = 6  # supervisors running at once
    kills: int = 100
    seed: int | None = None
    database_url: str | None = None  # None: the embedded database in the scratch dir
    scratch: Path | None = None  # None: a new temporary directory, removed when all passed
    limit: float = 600.0  # seconds for the whole drill
    min_events: int = 2  # a kill comes after this many to max_events daemon events
    max_events: int = 14


@dataclass(frozen=True, slots=True)
class Check:
    name: str
    ok: bool
    detail: str


@dataclass
class DrillProgress:
    kills_done: int = 0
    kills_planned: int = 0
    created: int = 0
    finished: int = 0
    questions_answered: int = 0
    phase: str = "starting"


@dataclass
class DrillReport:
    checks: list[Check]
    kills_survived: int
    supervisors: int
    questions: int
    answers: int
    tasks: int
    seconds: float
    scratch: Path
    seed: int

    @property
    def ok(self) -> bool:
        return all(c.ok for c in self.checks)


@dataclass
class _Observed:
    created: dict[str, int] = field(default_factory=dict)  # supervisor id -> agent number
    finished: set[str] = field(default_factory=set)
    questions: set[str] = field(default_factory=set)
    answers: dict[str, str] = field(default_factory=dict)  # question id -> answer acked
    tasks: set[str] = field(default_factory=set)
    restorations: Counter[str] = field(default_factory=Counter)
    kills_survived: int = 0
    clean_exit: int | None = None


class _Drill:
    def __init__(self, settings: DrillSettings, report: Callable[[DrillProgress], None]) -> None:
        self.settings = settings
        self.seed = settings.seed if settings.seed is not None else random.randrange(1 << 30)  # noqa: S311
        self.rng = random.Random(self.seed)  # noqa: S311 - chooses kill moments, not secrets
        self.report = report
        self.progress = DrillProgress(kills_planned=settings.kills)
        self.seen = _Observed()
        made = settings.scratch is None
        self.scratch = settings.scratch or Path(tempfile.mkdtemp(prefix="mkdrill-", dir="/tmp"))
        self.scratch.mkdir(parents=True, exist_ok=True)
        self.remove_scratch = made
        if os.geteuid() == 0:
            self.scratch.chmod(0o711)  # the embedded server's account passes through
        self.state_dir = self.scratch / "state"
        self.runner = DaemonRunner(
            state_dir=self.state_dir,
            socket_path=self.scratch / "s.sock",
            database_url=settings.database_url,
            log_path=self.scratch / "daemon.log",
        )
        self.next_agent = 0

    def tell(self, phase: str | None = None) -> None:
        if phase is not None:
            self.progress.phase = phase
        self.progress.finished = len(self.seen.finished)
        self.progress.created = len(self.seen.created)
        self.progress.questions_answered = len(self.seen.answers)
        self.report(self.progress)

    # ----------------------------------------------------------------- driving

    async def run(self) -> DrillReport:
        started = time.monotonic()
        with anyio.fail_after(self.settings.limit):
            await self._start_daemon()
            while self.progress.kills_done < self.settings.kills:
                await self._cycle(
                    kill_after=self.rng.randint(self.settings.min_events, self.settings.max_events)
                )
                code = await self.runner.kill()
                self.progress.kills_done += 1
                self.tell(f"killed the daemon ({code}); starting it again")
                await self._start_daemon()
                self.seen.kills_survived += 1
            self.tell("letting every supervisor finish")
            await self._cycle(kill_after=None)
            self.tell("stopping the daemon cleanly")
            self.seen.clean_exit = await self.runner.terminate()
        self.tell("checking")
        checks = await self._verify()
        return DrillReport(
            checks=checks,
            kills_survived=self.seen.kills_survived,
            supervisors=len(self.seen.created),
            questions=len(self.seen.questions),
            answers=len(self.seen.answers),
            tasks=len(self.seen.tasks),
            seconds=time.monotonic() - started,
            scratch=self.scratch,
            seed=self.seed,
        )

    async def _start_daemon(self) -> None:
        await self.runner.start()
        async with ControlClient.connect(self.runner.socket_path, timeout=60.0) as client:
            status = await client.call("daemon.status")
        report = status.get("last_startup_report") or {}
        for outcome in ("restored", "repaired", "reverted", "fresh"):
            for entry in report.get(outcome, []):
                self.seen.restorations[entry["supervisor_id"]] += 1
        self.tell(f"daemon up (start {self.runner.starts})")

    async def _create(self, client: ControlClient) -> None:
        n = self.next_agent
        self.next_agent += 1
        trace = self.scratch / f"trace-{n}.jsonl"
        result = await client.call(
            "supervisor.create",
            {
                "name": f"release-{n}",
                "goal": f"release 1.{n}.0",
                "command": [
                    sys.executable,
                    "-m",
                    AGENT_MODULE,
                    "--version",
                    f"1.{n}.0",
                    "--checks",
                    str(self.rng.randint(1, 3)),
                ],
                "env": {"MAKIMA_AGENT_TRACE": str(trace)},
            },
        )
        self.seen.created[result["supervisor_id"]] = n

    def _unfinished(self) -> int:
        return len(set(self.seen.created) - self.seen.finished)

    async def _cycle(self, *, kill_after: int | None) -> None:
        """Drive the running daemon: keep agents busy, answer questions; return after
        ``kill_after`` events (None: when every supervisor has finished)."""
        storm = kill_after is not None
        creations_left = self.settings.agents + self.settings.kills if storm else 0
        try:
            async with ControlClient.connect(self.runner.socket_path, timeout=60.0) as client:
                await self._refresh_finished(client)
                async with client.events() as events:
                    while (
                        storm
                        and self._unfinished() < self.settings.agents
                        and (len(self.seen.created) < creations_left)
                    ):
                        await self._create(client)
                    if not storm and self._unfinished() == 0:
                        return
                    # In a storm, a quiet daemon is killed anyway after a while.
                    with anyio.move_on_after(10.0 if storm else math.inf):
                        await self._pump(client, events, storm, kill_after, creations_left)
        except ControlError as exc:
            raise DrillError(
                f"lost the daemon unexpectedly: {exc}; see {self.runner.log_path}"
            ) from exc

    async def _pump(
        self,
        client: ControlClient,
        events: Any,
        storm: bool,
        kill_after: int | None,
        creations_left: int,
    ) -> None:
        count = 0
        async for event in events:
            count += 1
            await self._on_event(client, event)
            if storm and count >= (kill_after or 0):
                return
            if (
                storm
                and self._unfinished() < self.settings.agents
                and (len(self.seen.created) < creations_left)
            ):
                await self._create(client)
            if not storm and self._unfinished() == 0:
                return

    async def _refresh_finished(self, client: ControlClient) -> None:
        rows = (await client.call("supervisor.list", {"all": True}))["supervisors"]
        for row in rows:
            if row["state"] in ("completed", "failed"):
                self.seen.finished.add(row["supervisor_id"])

    async def _on_event(self, client: ControlClient, event: dict[str, Any]) -> None:
        kind = event["kind"]
        sid = event.get("supervisor_id", "")
        if kind in ("question.asked", "question.pending", "question.redelivered"):
            qid = event["question_id"]
            self.seen.questions.add(qid)
            if qid not in self.seen.answers:
                choice = "ship" if self.rng.random() < 0.8 else "hold"
                try:
                    await client.call("question.answer", {"question_id": qid, "answer": choice})
                    self.seen.answers[qid] = choice
                except RemoteError as exc:
                    if exc.code == -32002 and isinstance(exc.data, dict):
                        self.seen.answers[qid] = str(exc.data.get("answer"))
                    else:
                        raise
        elif kind == "task.spawned":
            self.seen.tasks.add(event["task_id"])
        elif kind == "supervisor.state_changed" and event["state"] in ("completed", "failed"):
            self.seen.finished.add(sid)
        elif kind == "supervisor.restored" and event.get("source") == "agent_restart":
            self.seen.restorations[sid] += 1
        self.tell()

    # ----------------------------------------------------------------- checking

    async def _connect_database(self) -> tuple[asyncpg.Connection, EmbeddedPostgres | None]:
        # Imported here: the CLI imports this module for DrillSettings, and every
        # ``makima`` command would otherwise pay for the database driver.
        import asyncpg

        from makima.embedded import EmbeddedPostgres

        if self.settings.database_url:
            return await asyncpg.connect(self.settings.database_url), None
        server = EmbeddedPostgres(self.state_dir)
        params = await anyio.to_thread.run_sync(server.start)
        return await asyncpg.connect(**params.asyncpg_kwargs()), server

    async def _verify(self) -> list[Check]:
        conn, server = await self._connect_database()
        try:
            return await self._checks(conn)
        finally:
            await conn.close()
            if server is not None:
                await anyio.to_thread.run_sync(server.stop)

    async def _checks(self, conn: asyncpg.Connection) -> list[Check]:
        ids = list(self.seen.created)
        states = {
            str(r["supervisor_id"]): r
            for r in await conn.fetch(
                "SELECT supervisor_id, state, restoration_count, pending_questions::text AS pq "
                "FROM supervisor_states WHERE supervisor_id = ANY($1::uuid[])",
                ids,
            )
        }
        questions = {
            str(r["question_id"]): r
            for r in await conn.fetch(
                "SELECT question_id, supervisor_id, answer, delivered_at FROM questions "
                "WHERE supervisor_id = ANY($1::uuid[])",
                ids,
            )
        }
        tasks = {
            str(r["task_id"]): r["status"]
            for r in await conn.fetch(
                "SELECT task_id, status FROM tasks WHERE supervisor_id = ANY($1::uuid[])", ids
            )
        }
        checks: list[Check] = []

        def check(name: str, bad: list[str], total: int, what: str) -> None:
            detail = f"{total - len(bad)}/{total} {what}"
            if bad:
                detail += "; e.g. " + ", ".join(bad[:3])
            checks.append(Check(name, not bad, detail))

        check(
            "daemon came back after every kill",
            [] if self.seen.kills_survived == self.settings.kills else ["missing restarts"],
            self.settings.kills,
            "kills survived",
        )
        check(
            "clean shutdown after the drill",
            [] if self.seen.clean_exit == 0 else [f"exit status {self.seen.clean_exit}"],
            1,
            "SIGTERM exits 0",
        )
        unfinished = [s[:8] for s in ids if s not in states or states[s]["state"] != "completed"]
        check("every supervisor completed", unfinished, len(ids), "completed")
        lost = [q[:8] for q in self.seen.questions if q not in questions]
        check(
            "no acknowledged question lost",
            lost,
            len(self.seen.questions),
            "questions in the database",
        )
        wrong = [
            q[:8]
            for q, a in self.seen.answers.items()
            if q not in questions or questions[q]["answer"] != a
        ]
        check(
            "every acknowledged answer recorded as given", wrong, len(self.seen.answers), "answers"
        )
        open_left = [q[:8] for q, r in questions.items() if r["answer"] is None]
        open_left += [s[:8] for s, r in states.items() if r["pq"] not in ("[]", None)]
        check("no question left open", open_left, len(questions), "questions answered")
        missing_tasks = [t[:8] for t in self.seen.tasks if t not in tasks]
        running = [t[:8] for t, st in tasks.items() if st in ("pending", "running")]
        check(
            "no acknowledged task lost",
            missing_tasks,
            len(self.seen.tasks),
            "tasks in the database",
        )
        check("no task left running", running, len(tasks), "tasks finished")
        counts = [
            f"{s[:8]}: {states[s]['restoration_count']} != {self.seen.restorations[s]}"
            for s in ids
            if s in states and states[s]["restoration_count"] != self.seen.restorations[s]
        ]
        check("restoration_count = restorations", counts, len(ids), "supervisors")
        deliveries_bad, total = self._deliveries(questions)
        check("each answer reached its agent, once per process", deliveries_bad, total, "answers")
        return checks

    def _deliveries(self, questions: Mapping[str, Any]) -> tuple[list[str], int]:
        """From the agents' traces: every answered question reached the agent at
        least once, and no single agent process got the same answer twice."""
        bad: list[str] = []
        answered = [q for q, r in questions.items() if r["answer"] is not None]
        per_question: Counter[str] = Counter()
        for n in self.seen.created.values():
            trace = self.scratch / f"trace-{n}.jsonl"
            if not trace.exists():
                continue
            seen_in_process: Counter[str] = Counter()
            for line in trace.read_text().splitlines():
                try:
                    message = json.loads(line)
                except ValueError:
                    continue
                if message.get("type") == "start":
                    seen_in_process = Counter()
                    for entry in (message.get("restoration") or {}).get("undelivered_answers", []):
                        seen_in_process[entry["question_id"]] += 1
                        per_question[entry["question_id"]] += 1
                elif message.get("type") == "answer":
                    seen_in_process[message["question_id"]] += 1
                    per_question[message["question_id"]] += 1
                twice = [q[:8] for q, c in seen_in_process.items() if c > 1]
                bad.extend(f"{q} twice in one process" for q in twice)
                for q in twice:
                    seen_in_process[q] = 1
        bad.extend(f"{q[:8]} never delivered" for q in answered if per_question[q] == 0)
        return bad, len(answered)

    def cleanup(self, passed: bool) -> None:
        if passed and self.remove_scratch:
            shutil.rmtree(self.scratch, ignore_errors=True)


async def run_drill(
    settings: DrillSettings, report: Callable[[DrillProgress], None] | None = None
) -> DrillReport:
    drill = _Drill(settings, report or (lambda _: None))
    try:
        result = await drill.run()
    finally:
        if drill.runner.running:
            with anyio.CancelScope(shield=True):
                await drill.runner.kill()
                if not settings.database_url:
                    from makima.embedded import EmbeddedPostgres

                    with contextlib.suppress(Exception):
                        EmbeddedPostgres(drill.state_dir).stop()
    drill.cleanup(result.ok)
    return result

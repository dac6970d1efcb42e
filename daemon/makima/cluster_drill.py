"""Cluster drill (``makima drill --daemons N``): several daemons on one PostgreSQL.

On a scratch directory it starts one embedded PostgreSQL and N daemons
(``python -m makima daemon``, each with its own state dir and socket, all on
that server, with a short lease), creates supervisors spread over them, each
running :mod:`makima.examples.drill_agent`, and answers every question as it
appears, through every daemon's socket in turn. Then, round after round, it
does to one daemon after another:

1. ``kill -9``: its supervisors must be taken over by the others (their agent
   restarted elsewhere with source ``task_reassignment``) within the TTL plus
   the renewal interval plus a few seconds; then it is started again (same
   state dir) and rejoins.
2. SIGSTOP past its TTL, then SIGCONT: its supervisors are taken over; its SDK
   agents must have stopped by themselves within the TTL (status 75, no ping),
   and once resumed the daemon, fenced, must not run them any more.
3. ``pg_terminate_backend`` of its lease connection: it reconnects and keeps
   its supervisors, or, had it missed its deadline, they are taken over
   cleanly.

Finally every supervisor is told to finish, the daemons are stopped with
SIGTERM, and the drill checks the agents' records (see
:mod:`makima.cluster_checks`) against the database: no supervisor acknowledged
in two processes at once, nothing acknowledged lost, every answer delivered
once per process, every supervisor completed.
"""

from __future__ import annotations

import contextlib
import datetime
import math
import os
import random
import shutil
import signal
import sys
import tempfile
import time
import urllib.parse
from collections import Counter
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import anyio
import structlog

from makima import cluster_checks as cc
from makima.control.client import ControlClient, ControlError, RemoteError
from makima.drill import Check, DaemonRunner, DrillError

if TYPE_CHECKING:
    import asyncpg

    from makima.embedded import ConnectParams, EmbeddedPostgres

log = structlog.get_logger("makima.cluster_drill")

AGENT_MODULE = "makima.examples.drill_agent"
SCENARIOS = ("kill", "pause", "terminate")
SELF_STOP_SLACK = 0.5  # the drill looks at /proc every POLL seconds; an exit takes a moment
POLL = 0.05
CONFLICT = -32002
INTERNAL_ERROR = -32603
ANSWER_ATTEMPTS = 25


@dataclass(frozen=True, slots=True)
class ClusterSettings:
    daemons: int = 3
    supervisors: int = 30
    lease_ttl: float = 5.0
    lease_renew: float = 1.0
    rounds: int = 1
    scenarios: tuple[str, ...] = SCENARIOS
    seed: int | None = None
    database_url: str | None = None  # None: one embedded server in the scratch dir
    scratch: Path | None = None  # None: a new temporary directory, removed when all passed
    limit: float = 900.0  # seconds for the whole drill
    pace: float = 0.3  # the agents' pause between steps
    takeover_slack: float = 3.0  # beyond TTL + renew, for a takeover to count as in time
    call_timeout: float = 5.0

    @property
    def takeover_limit(self) -> float:
        return self.lease_ttl + self.lease_renew + self.takeover_slack


@dataclass
class ClusterProgress:
    phase: str = "starting"
    steps_done: int = 0
    steps: int = 0
    created: int = 0
    finished: int = 0
    answers: int = 0


@dataclass(frozen=True, slots=True)
class Takeover:
    """The supervisors of one daemon, and how long each took to resume elsewhere."""

    scenario: str
    round: int
    daemon: int
    times: Mapping[str, float | None]  # to the new agent's first record
    limit: float
    restored: Mapping[str, float | None]  # to ``last_restored_at`` (claimed and restored)


@dataclass(frozen=True, slots=True)
class TakeoverRow:
    """One scenario's takeovers: seconds from the event to the restoration (the new
    owner's ``last_restored_at``) and to the new agent's first record."""

    scenario: str
    resumed: int
    restored: cc.Stats
    started: cc.Stats
    limit: float

    def to_json(self) -> dict[str, Any]:
        def r(value: float | None) -> float | None:
            return None if value is None else round(value, 3)

        return {
            "scenario": self.scenario,
            "resumed": self.resumed,
            "restored_median_s": r(self.restored.median),
            "restored_worst_s": r(self.restored.worst),
            "median_s": r(self.started.median),
            "worst_s": r(self.started.worst),
            "limit_s": self.limit,
        }


@dataclass
class ClusterReport:
    checks: list[Check]
    takeovers: list[Takeover]
    notes: list[str]
    daemons: int
    supervisors: int
    processes: int
    questions: int
    answers: int
    tasks: int
    answers_by_daemon: list[int]
    seconds: float
    scratch: Path
    seed: int

    @property
    def ok(self) -> bool:
        return all(c.ok for c in self.checks)

    def takeover_rows(self) -> list[TakeoverRow]:
        rows = []
        for scenario in SCENARIOS:
            mine = [t for t in self.takeovers if t.scenario == scenario]
            if not mine:
                continue
            started = cc.stats(v for t in mine for v in t.times.values() if v is not None)
            restored = cc.stats(v for t in mine for v in t.restored.values() if v is not None)
            rows.append(TakeoverRow(scenario, started.count, restored, started, mine[0].limit))
        return rows

    def to_json(self) -> dict[str, Any]:
        return {
            "ok": self.ok,
            "seed": self.seed,
            "daemons": self.daemons,
            "supervisors": self.supervisors,
            "agent_processes": self.processes,
            "questions": self.questions,
            "answers": self.answers,
            "answers_by_daemon": self.answers_by_daemon,
            "tasks": self.tasks,
            "seconds": round(self.seconds, 1),
            "takeovers": [row.to_json() for row in self.takeover_rows()],
            "checks": [{"name": c.name, "ok": c.ok, "detail": c.detail} for c in self.checks],
            "notes": self.notes,
            "scratch": str(self.scratch),
        }


# --------------------------------------------------------------------------- I/O helpers


def database_url(params: ConnectParams) -> str:
    """A postgresql:// URL for the embedded server (a Unix socket directory as host)."""
    user = urllib.parse.quote(params.user, safe="")
    password = urllib.parse.quote(params.password or "", safe="")
    query = urllib.parse.urlencode({"host": params.host, "port": str(params.port)})
    return f"postgresql://{user}:{password}@/{urllib.parse.quote(params.database)}?{query}"


def wall_time(seconds: float) -> str:
    """A moment as the daemons' logs show it (UTC, ISO 8601), to find it there."""
    moment = datetime.datetime.fromtimestamp(seconds, datetime.UTC)
    return moment.isoformat(timespec="milliseconds").replace("+00:00", "Z")


def proc_state(pid: int) -> cc.ProcState | None:
    """The process as /proc shows it; None when there is no such process."""
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except (FileNotFoundError, ProcessLookupError):
        return None
    except OSError:
        return cc.ProcState("?", None)
    return cc.parse_proc_stat(text)


def is_running(pid: int) -> bool:
    state = proc_state(pid)
    return state is not None and not state.ended


class RecordBook:
    """The agents' record files, read as they grow."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        self.records: list[cc.Record] = []
        self._offsets: dict[Path, int] = {}

    def refresh(self) -> list[cc.Record]:
        for path in sorted(self.directory.glob("*.jsonl")):
            if path.name.startswith("trace-"):
                continue
            offset = self._offsets.get(path, 0)
            with path.open("rb") as handle:
                handle.seek(offset)
                data = handle.read()
            end = data.rfind(b"\n") + 1  # a torn last line waits for its end
            if end:
                lines = data[:end].decode(errors="replace").splitlines()
                self.records.extend(cc.parse_records(lines))
                self._offsets[path] = offset + end
        return self.records

    def deliveries(self) -> list[cc.Delivery]:
        found: list[cc.Delivery] = []
        for path in sorted(self.directory.glob("trace-*.jsonl")):
            sid, _, pid = path.stem.removeprefix("trace-").rpartition("-")
            if not pid.isdigit():
                continue
            lines = path.read_text(errors="replace").splitlines()
            found += cc.deliveries_from_trace(sid, int(pid), lines)
        return found

    def live_agents(self, supervisor_ids: Sequence[str], on: int | None) -> dict[int, str]:
        """pid -> supervisor id of the agent processes of these supervisors that run
        under daemon pid ``on`` and have not ended."""
        wanted = set(supervisor_ids)
        found: dict[int, str] = {}
        for sid, listed in cc.processes(self.refresh()).items():
            if sid not in wanted:
                continue
            for process in listed:
                if process.ppid == on and process.exited is None and is_running(process.pid):
                    found[process.pid] = sid
        return found


class Member:
    """One daemon of the cluster: its runner, identity and whether the drill may call it."""

    def __init__(self, index: int, runner: DaemonRunner) -> None:
        self.index = index
        self.runner = runner
        self.daemon_id: str | None = None
        self.pid: int | None = None
        self.client: ControlClient | None = None
        self.available = False
        self.back = anyio.Event()
        self.answers = 0
        self.paused = False

    @property
    def name(self) -> str:
        return f"d{self.index}"

    def up(self) -> None:
        self.available = True
        self.back.set()

    def down(self) -> None:
        self.available = False
        if self.back.is_set():
            self.back = anyio.Event()


# --------------------------------------------------------------------------- the drill


class _ClusterDrill:
    def __init__(
        self, settings: ClusterSettings, report: Callable[[ClusterProgress], None]
    ) -> None:
        if settings.daemons < 2:
            raise DrillError("a cluster drill needs at least two daemons")
        self.settings = settings
        self.seed = settings.seed if settings.seed is not None else random.randrange(1 << 30)  # noqa: S311
        self.rng = random.Random(self.seed)  # noqa: S311 - picks victims, not secrets
        self.report = report
        self.progress = ClusterProgress(steps=settings.rounds * len(settings.scenarios))
        made = settings.scratch is None
        self.scratch = settings.scratch or Path(tempfile.mkdtemp(prefix="mkc-", dir="/tmp"))
        self.scratch.mkdir(parents=True, exist_ok=True)
        self.remove_scratch = made
        if os.geteuid() == 0:
            self.scratch.chmod(0o711)  # the embedded server's account passes through
        self.records_dir = self.scratch / "records"
        self.records_dir.mkdir(exist_ok=True)
        self.records_dir.chmod(0o777)  # agents may run as another user than the drill
        self.book = RecordBook(self.records_dir)
        self.members = [
            Member(
                i,
                DaemonRunner(
                    state_dir=self.scratch / f"d{i}",
                    # In its state dir: the runner names its notification socket
                    # after the control socket's folder, one per daemon.
                    socket_path=self.scratch / f"d{i}" / "d.sock",
                    database_url=None,  # set once the server runs
                    log_path=self.scratch / f"d{i}" / "daemon.log",
                ),
            )
            for i in range(settings.daemons)
        ]
        for member in self.members:
            member.runner.state_dir.mkdir(mode=0o700, exist_ok=True)
        self.server: EmbeddedPostgres | None = None
        self.url: str | None = settings.database_url
        self.conn: asyncpg.Connection | None = None
        # what the drill saw and did
        self.created: dict[str, int] = {}  # supervisor id -> creating daemon
        self.finished: set[str] = set()
        self.accepted: dict[str, str] = {}  # question id -> answer the cluster accepted
        self.queued: set[str] = set()
        self.finishing = False
        self.closing = False
        self.takeovers: list[Takeover] = []
        self.notes: list[str] = []
        self.problems: dict[str, list[str]] = {}  # check name -> problems found on the way
        self.totals: dict[str, int] = {}  # check name -> things looked at
        self.statuses: dict[int, dict[str, Any]] = {}
        self.stop_codes: dict[int, int] = {}
        self.refusals: Counter[str] = Counter()  # answers refused, by code and message
        self.calls = 0  # control calls made
        self.internal_errors: list[str] = []  # calls answered with -32603
        self._rr = 0
        send, receive = anyio.create_memory_object_stream[str](math.inf)
        self._queue_send = send
        self._queue_receive = receive

    # ----------------------------------------------------------------- reporting

    def tell(self, phase: str | None = None) -> None:
        if phase is not None:
            self.progress.phase = phase
            log.info("cluster_drill.phase", phase=phase)
        self.progress.created = len(self.created)
        self.progress.finished = len(self.finished)
        self.progress.answers = len(self.accepted)
        self.report(self.progress)

    def note(self, text: str) -> None:
        self.notes.append(text)
        log.info("cluster_drill.note", note=text)

    def judge(self, check: str, problems: Sequence[str], total: int) -> None:
        self.problems.setdefault(check, []).extend(problems)
        self.totals[check] = self.totals.get(check, 0) + total

    # ----------------------------------------------------------------- the run

    async def run(self) -> ClusterReport:
        started = time.monotonic()
        try:
            with anyio.fail_after(self.settings.limit):
                await self._start_database()
                await self._start_members()
                failure: Exception | None = None
                async with anyio.create_task_group() as tg:
                    for member in self.members:
                        tg.start_soon(self._watch, member)
                    for _ in range(4):
                        tg.start_soon(self._answer_loop)
                    tg.start_soon(self._poll_loop)
                    try:
                        await self._create_supervisors()
                        await self._warm_up()
                        await self._rounds()
                        await self._check_cluster_view("after the scenarios")
                        await self._finish()
                    except Exception as exc:  # noqa: BLE001 - re-raised below, outside the group
                        failure = exc
                    finally:
                        self.closing = True
                        tg.cancel_scope.cancel()
                if failure is not None:
                    raise failure
                await self._stop_members()
        except TimeoutError as exc:
            raise DrillError(
                f"the cluster drill did not finish within {self.settings.limit:.0f}s "
                f"(at: {self.progress.phase}); files in {self.scratch}"
            ) from exc
        self.tell("checking")
        checks = await self._verify()
        records = self.book.refresh()
        questions, tasks = cc.acknowledged_counts(records)
        return ClusterReport(
            checks=checks,
            takeovers=self.takeovers,
            notes=self.notes,
            daemons=len(self.members),
            supervisors=len(self.created),
            processes=sum(len(p) for p in cc.processes(records).values()),
            questions=questions,
            answers=len(self.accepted),
            tasks=tasks,
            answers_by_daemon=[m.answers for m in self.members],
            seconds=time.monotonic() - started,
            scratch=self.scratch,
            seed=self.seed,
        )

    async def _start_database(self) -> None:
        import asyncpg

        from makima.database import ensure_database
        from makima.embedded import EmbeddedPostgres

        self.tell("starting PostgreSQL")
        if self.url is None:
            self.server = EmbeddedPostgres(self.scratch / "pg")
            params = await anyio.to_thread.run_sync(self.server.start)
            await ensure_database(params)
            self.url = database_url(params)
        for member in self.members:
            member.runner.database_url = self.url
        self.conn = await asyncpg.connect(self.url)

    def _lease_env(self) -> dict[str, str]:
        return {
            "MAKIMA_LEASE_TTL": str(self.settings.lease_ttl),
            "MAKIMA_LEASE_RENEW": str(self.settings.lease_renew),
        }

    async def _call(
        self, member: Member, client: ControlClient, method: str, params: Any = None
    ) -> Any:
        """``client.call``, counted; an internal error (-32603) is a finding, kept for
        the report, and raised like any other."""
        self.calls += 1
        try:
            return await client.call(method, params)
        except RemoteError as exc:
            if exc.code == INTERNAL_ERROR:
                self.internal_errors.append(f"{member.name} {method}: {exc}")
                log.warning("cluster_drill.internal_error", daemon=member.name, method=method)
            raise

    async def _status(self, member: Member, client: ControlClient) -> dict[str, Any]:
        """``daemon.status``, tried again after an internal error (reported anyway)."""
        for _ in range(3):
            try:
                status: dict[str, Any] = await self._call(member, client, "daemon.status")
            except RemoteError as exc:
                if exc.code != INTERNAL_ERROR:
                    raise
                await anyio.sleep(0.5)
            else:
                return status
        last: dict[str, Any] = await self._call(member, client, "daemon.status")
        return last

    async def _start_member(self, member: Member) -> None:
        await member.runner.start(self._lease_env())
        assert member.runner.process is not None
        member.pid = member.runner.process.pid
        member.paused = False
        async with ControlClient.connect(
            member.runner.socket_path, timeout=self.settings.call_timeout
        ) as client:
            member.daemon_id = (await self._call(member, client, "daemon.hello"))["daemon_id"]
            self.statuses[member.index] = await self._status(member, client)
        member.up()
        log.info(
            "cluster_drill.daemon_ready",
            daemon=member.name,
            daemon_id=member.daemon_id,
            pid=member.pid,
            start=member.runner.starts,
        )

    async def _start_members(self) -> None:
        self.tell(f"starting {len(self.members)} daemons")
        failures: list[Exception] = []

        async def start(member: Member) -> None:
            try:
                await self._start_member(member)
            except (DrillError, ControlError) as exc:
                failures.append(exc)

        async with anyio.create_task_group() as tg:
            for member in self.members:
                tg.start_soon(start, member)
        if failures:
            raise failures[0]
        await self._check_cluster_view("at start")

    def _view_problems(self, member: Member, status: Mapping[str, Any]) -> list[str]:
        """What is wrong with one daemon's view of the cluster (``daemon.status``)."""
        cluster = status.get("cluster")
        if not isinstance(cluster, dict):
            return [f"{member.name}: daemon.status has no 'cluster'"]
        problems: list[str] = []
        ids = {m.daemon_id for m in self.members}
        listed = {
            d.get("daemon_id")
            for d in cluster.get("daemons", [])
            if isinstance(d, dict) and d.get("alive")
        }
        if not ids <= listed:
            problems.append(f"{member.name} sees {len(ids & listed)}/{len(ids)} daemons alive")
        lease = cluster.get("lease") or {}
        asked = (self.settings.lease_ttl, self.settings.lease_renew, True)
        found = (lease.get("ttl"), lease.get("renew"), lease.get("enforced"))
        if found != asked:
            problems.append(f"{member.name}: lease ttl/renew/enforced {found} != {asked}")
        return problems

    async def _check_cluster_view(self, when: str) -> None:
        """Every daemon's status lists every daemon alive, with the lease asked for
        (waiting a renewal or two for a daemon that just started to show)."""
        problems: dict[int, list[str]] = {}

        async def agreed() -> bool:
            for member in self.members:
                try:
                    with anyio.fail_after(self.settings.call_timeout):
                        async with ControlClient.connect(
                            member.runner.socket_path, timeout=self.settings.call_timeout
                        ) as client:
                            status = await self._status(member, client)
                except (ControlError, TimeoutError) as exc:
                    problems[member.index] = [f"{member.name}: daemon.status failed: {exc}"]
                    continue
                self.statuses[member.index] = status
                problems[member.index] = self._view_problems(member, status)
            return not any(problems.values())

        await self._until(agreed, 2 * (self.settings.lease_ttl + self.settings.lease_renew))
        found = [p for listed in problems.values() for p in listed]
        self.judge(f"every daemon sees the whole cluster alive ({when})", found, len(self.members))

    # ----------------------------------------------------------------- clients: events, answers

    async def _watch(self, member: Member) -> None:
        """Follow one daemon's events while it is available; reconnect when it is back."""
        while not self.closing:
            await member.back.wait()
            try:
                async with (
                    ControlClient.connect(
                        member.runner.socket_path, timeout=self.settings.call_timeout
                    ) as client,
                    client.events() as events,
                ):
                    member.client = client
                    async for event in events:
                        self._on_event(event)
            except ControlError as exc:
                log.info("cluster_drill.watch_lost", daemon=member.name, error=str(exc))
            finally:
                member.client = None
            await anyio.sleep(0.2)  # a dead or paused daemon: do not spin

    def _on_event(self, event: Mapping[str, Any]) -> None:
        kind = event.get("kind")
        if kind in ("question.asked", "question.pending", "question.redelivered"):
            self._offer(str(event.get("question_id")))
        elif kind == "supervisor.state_changed" and event.get("state") in ("completed", "failed"):
            sid = str(event.get("supervisor_id"))
            if sid in self.created:
                self.finished.add(sid)
                self.tell()

    def _offer(self, question_id: str) -> None:
        if question_id in self.accepted or question_id in self.queued:
            return
        self.queued.add(question_id)
        self._queue_send.send_nowait(question_id)

    def _next_member(self) -> Member | None:
        """The next daemon in turn that can take a call (round robin over the sockets)."""
        count = len(self.members)
        for _ in range(count):
            member = self.members[self._rr % count]
            self._rr += 1
            if member.available and member.client is not None:
                return member
        return None

    async def _answer_loop(self) -> None:
        async for question_id in self._queue_receive:
            try:
                await self._answer(question_id)
            finally:
                self.queued.discard(question_id)

    async def _answer(self, question_id: str) -> None:
        """Answer once, through whichever daemon is next; try the others on failure
        (for a while: a question still open is offered again by the poller)."""
        for _ in range(ANSWER_ATTEMPTS):
            if question_id in self.accepted or self.closing:
                return
            member = self._next_member()
            client = None if member is None else member.client
            if member is None or client is None:
                await anyio.sleep(0.1)
                continue
            choice = "finish" if self.finishing else "continue"
            try:
                await self._call(
                    member,
                    client,
                    "question.answer",
                    {"question_id": question_id, "answer": choice},
                )
            except RemoteError as exc:
                existing = exc.data.get("answer") if isinstance(exc.data, dict) else None
                if exc.code == CONFLICT and isinstance(existing, str):
                    self.accepted[question_id] = existing  # answered already, through another
                    return
                log.info(
                    "cluster_drill.answer_refused",
                    daemon=member.name,
                    question_id=question_id,
                    code=exc.code,
                    error=str(exc),
                )
                self.refusals[f"{exc.code} {exc}"[:160]] += 1
                await anyio.sleep(0.2)
            except ControlError as exc:
                log.info("cluster_drill.answer_failed", daemon=member.name, error=str(exc))
            else:
                self.accepted[question_id] = choice
                member.answers += 1
                self.tell()
                return
        log.warning("cluster_drill.answer_given_up", question_id=question_id)

    def _drain_notifications(self) -> None:
        """Read what the daemons told "systemd" since READY (their STATUS= lines), so
        that a full notification socket makes no daemon log a failure."""
        for member in self.members:
            notify = member.runner.notify
            if notify is not None and member.runner.running and not member.paused:
                with contextlib.suppress(OSError):
                    notify.drain()
                notify.messages.clear()

    async def _poll_loop(self) -> None:
        """Every second, through one daemon in turn: open questions (in case an event
        was missed while a daemon was down) and finished supervisors."""
        while not self.closing:
            self._drain_notifications()
            member = self._next_member()
            client = None if member is None else member.client
            if client is not None:
                try:
                    assert member is not None
                    for q in (await self._call(member, client, "question.list"))["questions"]:
                        self._offer(str(q["question_id"]))
                    listed = await self._call(member, client, "supervisor.list", {"all": True})
                    rows = listed["supervisors"]
                    for row in rows:
                        sid = str(row.get("supervisor_id"))
                        if sid in self.created and row.get("state") in ("completed", "failed"):
                            self.finished.add(sid)
                except ControlError as exc:
                    log.info("cluster_drill.poll_failed", error=str(exc))
            await anyio.sleep(1.0)

    # ----------------------------------------------------------------- supervisors

    async def _create_supervisors(self) -> None:
        self.tell(f"creating {self.settings.supervisors} supervisors")
        env = {
            "MAKIMA_DRILL_DIR": str(self.records_dir),
            "MAKIMA_DRILL_PACE": str(self.settings.pace),
        }

        async with contextlib.AsyncExitStack() as stack:
            clients = [
                await stack.enter_async_context(
                    ControlClient.connect(m.runner.socket_path, timeout=30.0)
                )
                for m in self.members
            ]
            for n in range(self.settings.supervisors):
                index = n % len(self.members)  # spread over the daemons, through each socket
                result = await clients[index].call(
                    "supervisor.create",
                    {
                        "name": f"drill-{n}",
                        "goal": f"cluster drill supervisor {n}",
                        "command": [sys.executable, "-m", AGENT_MODULE],
                        "cwd": str(self.scratch),
                        "env": env,
                    },
                )
                self.created[str(result["supervisor_id"])] = index
                self.tell()

    async def _until(self, done: Callable[[], Awaitable[bool]], limit: float) -> bool:
        """Poll ``done`` every 0.1 s for at most ``limit`` seconds."""
        with anyio.move_on_after(limit):
            while True:
                if await done():
                    return True
                await anyio.sleep(0.1)  # polling files and /proc: nothing to wait on
        return False

    async def _warm_up(self) -> None:
        """Every supervisor has had one question answered."""
        self.tell("warming up: a first answer for every supervisor")

        async def answered_everywhere() -> bool:
            got = {r.supervisor_id for r in self.book.refresh() if r.what == "answer"}
            return set(self.created) <= got

        limit = 30.0 + 0.5 * len(self.created)
        if not await self._until(answered_everywhere, limit):
            got = {r.supervisor_id for r in self.book.refresh() if r.what == "answer"}
            self.note(
                f"warm-up: {len(set(self.created) & got)}/{len(self.created)} supervisors "
                f"answered within {limit:.0f}s"
            )

    async def _owned(self, member: Member) -> list[str]:
        """The unfinished supervisors the database says ``member`` owns (else, when no
        owner is recorded, the ones whose agent runs under it)."""
        assert self.conn is not None
        rows: list[Any] = []
        if member.daemon_id is not None:
            rows = await self.conn.fetch(
                "SELECT supervisor_id::text AS sid FROM supervisor_states "
                "WHERE owner_daemon_id::text = $1 AND state NOT IN ('completed', 'failed') "
                "AND supervisor_id = ANY($2::uuid[])",
                member.daemon_id,
                list(self.created),
            )
        owned = sorted(r["sid"] for r in rows)
        if owned:
            return owned
        running = sorted(set(self.book.live_agents(list(self.created), member.pid).values()))
        self.note(
            f"{member.name}: no unfinished supervisor has owner_daemon_id = {member.daemon_id};"
            f" using the {len(running)} whose agent runs under pid {member.pid}"
        )
        return running

    async def _owners(self, supervisor_ids: Sequence[str]) -> dict[str, tuple[str | None, int]]:
        assert self.conn is not None
        rows = await self.conn.fetch(
            "SELECT supervisor_id::text AS sid, owner_daemon_id::text AS owner, lease_epoch "
            "FROM supervisor_states WHERE supervisor_id = ANY($1::uuid[])",
            list(supervisor_ids),
        )
        return {r["sid"]: (r["owner"], int(r["lease_epoch"] or 0)) for r in rows}

    async def _lock_waits(self) -> set[str]:
        """Statements waiting for a lock now, with what holds it (for the notes: a
        paused daemon's open transaction holds its locks until it runs again)."""
        assert self.conn is not None
        rows = await self.conn.fetch(
            "SELECT w.application_name AS app, left(regexp_replace(w.query, '\\s+', ' ', 'g'), 90) "
            "AS query, b.state AS holder_state, b.application_name AS holder_app, "
            "left(regexp_replace(b.query, '\\s+', ' ', 'g'), 60) AS holder_query "
            "FROM pg_stat_activity w JOIN pg_stat_activity b "
            "ON b.pid = ANY(pg_blocking_pids(w.pid)) WHERE w.datname = current_database()"
        )
        return {
            f"{r['app'] or 'a pool connection'} waited on a lock ({r['query']!r}) held by "
            f"{r['holder_app'] or 'a pool connection'}, {r['holder_state']} "
            f"(last: {r['holder_query']!r})"
            for r in rows
        }

    async def _restored_after(
        self, supervisor_ids: Sequence[str], wall: float
    ) -> dict[str, float | None]:
        """Seconds from ``wall`` (the host's clock, as the database's: one host) to each
        supervisor's ``last_restored_at``, when that came later."""
        assert self.conn is not None
        rows = await self.conn.fetch(
            "SELECT supervisor_id::text AS sid, extract(epoch FROM last_restored_at)::float8 AS at "
            "FROM supervisor_states WHERE supervisor_id = ANY($1::uuid[])",
            list(supervisor_ids),
        )
        found = {r["sid"]: r["at"] for r in rows}
        return {
            sid: None if found.get(sid) is None or found[sid] < wall else found[sid] - wall
            for sid in supervisor_ids
        }

    async def _await_takeovers(
        self, supervisor_ids: Sequence[str], *, after: float, not_on: int | None, limit: float
    ) -> dict[str, float | None]:
        times: dict[str, float | None] = {}

        async def all_resumed() -> bool:
            nonlocal times
            times = cc.takeover_times(
                self.book.refresh(), supervisor_ids, after=after, not_on=not_on
            )
            return all(t is not None for t in times.values())

        await self._until(all_resumed, max(0.0, after + limit - time.monotonic()))
        await all_resumed()
        return times

    # ----------------------------------------------------------------- scenarios

    async def _rounds(self) -> None:
        scenarios = {"kill": self._kill, "pause": self._pause, "terminate": self._terminate}
        count = len(self.members)
        first = self.rng.randrange(count)  # which daemon suffers first (the seed repeats it)
        step = 0
        for round_no in range(self.settings.rounds):
            for scenario in self.settings.scenarios:
                # Each round shifts by one: over rounds, each daemon meets each scenario.
                victim = self.members[(first + step + round_no) % count]
                self.tell(f"round {round_no + 1}: {scenario} {victim.name}")
                await scenarios[scenario](round_no, victim)
                step += 1
                self.progress.steps_done = step
                await self._settle()

    async def _ensure_running(self, member: Member, why: str) -> None:
        """Start ``member`` again if its process is gone."""
        if member.runner.running:
            return
        code = member.runner.process.returncode if member.runner.process else None
        self.note(f"{member.name} exited ({code}) {why}; starting it again")
        await member.runner.wait()
        await self._start_member(member)

    async def _settle(self) -> None:
        """Every daemon runs and every unfinished supervisor makes progress again."""
        for member in self.members:
            await self._ensure_running(member, "after the scenario")
        since = time.monotonic()

        async def moving() -> bool:
            recent = {r.supervisor_id for r in self.book.refresh() if r.t > since and r.is_ack}
            return set(self.created) - self.finished <= recent

        limit = 3 * self.settings.takeover_limit + 10.0
        if not await self._until(moving, limit):
            recent = {r.supervisor_id for r in self.book.refresh() if r.t > since and r.is_ack}
            stuck = sorted(set(self.created) - self.finished - recent)
            self.note(
                f"{self.progress.phase}: {len(stuck)} supervisors made no progress within "
                f"{limit:.0f}s afterwards, e.g. {', '.join(s[:8] for s in stuck[:3])}"
            )

    async def _kill(self, round_no: int, victim: Member) -> None:
        owned = await self._owned(victim)
        victim.down()
        killed_at, killed_wall = time.monotonic(), time.time()
        code = await victim.runner.kill()
        log.info("cluster_drill.killed", daemon=victim.name, status=code, supervisors=len(owned))
        self.note(
            f"kill -9 {victim.name} (pid {victim.pid}) at {wall_time(killed_wall)}, owning "
            f"{len(owned)} supervisors"
        )
        limit = self.settings.takeover_limit
        times = await self._await_takeovers(
            owned, after=killed_at, not_on=victim.pid, limit=limit + 10.0
        )
        restored = await self._restored_after(owned, killed_wall)
        self.takeovers.append(Takeover("kill", round_no, victim.index, times, limit, restored))
        name = f"kill -9: supervisors resumed elsewhere within {limit:g}s"
        self.judge(name, cc.slow_takeovers(times, limit), len(times))
        if not owned:
            self.judge(name, [f"{victim.name} ran no supervisor when killed"], 0)
        self.tell(f"round {round_no + 1}: restarting {victim.name}")
        before = victim.daemon_id
        await self._start_member(victim)
        self.note(
            f"{victim.name} restarted after kill -9: daemon id {before} -> {victim.daemon_id}"
        )

    async def _pause(self, round_no: int, victim: Member) -> None:
        settings = self.settings
        owned = await self._owned(victim)
        agents = self.book.live_agents(owned, victim.pid)
        assert victim.pid is not None
        victim.down()
        paused_at, paused_wall = time.monotonic(), time.time()
        endings: dict[int, cc.Ending] = {}
        times: dict[str, float | None] = {}
        os.kill(victim.pid, signal.SIGSTOP)
        victim.paused = True
        self.note(
            f"SIGSTOP {victim.name} (pid {victim.pid}) at {wall_time(paused_wall)}, owning "
            f"{len(owned)} supervisors, {len(agents)} agents running"
        )
        waits: set[str] = set()
        sampled = 0.0
        try:
            log.info("cluster_drill.paused", daemon=victim.name, agents=len(agents))
            earliest = paused_at + settings.lease_ttl + settings.lease_renew + 1.0
            latest = paused_at + settings.takeover_limit + 10.0
            while True:
                now = time.monotonic()
                if now - sampled >= 0.25:
                    sampled = now
                    waits |= await self._lock_waits()
                for pid, sid in agents.items():
                    if pid not in endings:
                        state = proc_state(pid)
                        if state is None or state.ended:
                            code = None if state is None else state.exit_code
                            endings[pid] = cc.Ending(pid, sid, now, code)
                times = cc.takeover_times(
                    self.book.refresh(), owned, after=paused_at, not_on=victim.pid
                )
                resumed = all(t is not None for t in times.values())
                if now >= latest or (now >= earliest and resumed and len(endings) == len(agents)):
                    break
                await anyio.sleep(POLL)
        finally:
            os.kill(victim.pid, signal.SIGCONT)
            victim.paused = False
        resumed_at = time.monotonic()
        self.note(f"SIGCONT {victim.name} at {wall_time(time.time())}")
        for wait in sorted(waits)[:6]:
            self.note(f"while {victim.name} was paused: {wait}")
        restored = await self._restored_after(owned, paused_wall)
        self.takeovers.append(
            Takeover("pause", round_no, victim.index, times, settings.takeover_limit, restored)
        )
        self.judge(
            f"SIGSTOP: supervisors resumed elsewhere within {settings.takeover_limit:g}s",
            cc.slow_takeovers(times, settings.takeover_limit)
            + ([f"{victim.name} ran no supervisor when paused"] if not owned else []),
            len(times),
        )
        final = cc.with_exit_records(
            [endings.get(pid, cc.Ending(pid, sid, None, None)) for pid, sid in agents.items()],
            self.book.refresh(),
        )
        verdict = cc.self_stops(
            final,
            paused_at=paused_at,
            resumed_at=resumed_at,
            ttl=settings.lease_ttl,
            slack=SELF_STOP_SLACK,
        )
        if verdict.worst is not None:
            self.note(
                f"paused {victim.name}: its agents stopped {verdict.worst:.2f}s "
                "after SIGSTOP at worst"
            )
        self.judge(
            "SIGSTOP: the paused daemon's SDK agents stopped themselves within "
            f"{settings.lease_ttl:g}s (status 75)",
            verdict.problems + ([] if agents else [f"{victim.name} ran no agent when paused"]),
            len(agents),
        )
        await self._after_resume(round_no, victim, agents, owned, resumed_at)

    async def _after_resume(
        self,
        round_no: int,
        victim: Member,
        agents: Mapping[int, str],
        owned: Sequence[str],
        resumed_at: float,
    ) -> None:
        """After SIGCONT the fenced daemon must not run the old agents, nor start new
        ones for the supervisors it lost."""
        grace = 2 * self.settings.lease_renew + 5.0

        async def gone() -> bool:
            return not any(is_running(pid) for pid in agents)

        await self._until(gone, grace)
        problems = [
            f"pid {p} ({s[:8]}) still running {grace:g}s after SIGCONT"
            for p, s in agents.items()
            if is_running(p)
        ]
        restarted = [
            r
            for r in self.book.refresh()
            if r.what == cc.START
            and r.supervisor_id in owned
            and r.ppid == victim.pid
            and r.t > resumed_at
        ]
        problems += [
            f"{r.supervisor_id[:8]} restarted by the fenced daemon (pid {r.pid})" for r in restarted
        ]
        self.judge(
            "SIGCONT: the fenced daemon runs none of its former agents", problems, len(agents)
        )
        if victim.runner.running:
            try:
                with anyio.fail_after(self.settings.call_timeout * 2):
                    async with ControlClient.connect(
                        victim.runner.socket_path, timeout=self.settings.call_timeout
                    ) as client:
                        status = await self._status(victim, client)
                victim.daemon_id = status.get("daemon_id", victim.daemon_id)
                self.note(
                    f"{victim.name} after SIGCONT: still running (daemon id {victim.daemon_id})"
                )
                victim.up()
            except (ControlError, TimeoutError) as exc:
                self.note(f"{victim.name} after SIGCONT: running but not answering ({exc})")
                victim.down()
        await self._ensure_running(victim, "after SIGCONT")

    async def _terminate(self, round_no: int, victim: Member) -> None:
        assert self.conn is not None
        settings = self.settings
        owned = await self._owned(victim)
        before = await self._owners(owned)
        agents = self.book.live_agents(owned, victim.pid)
        cut_at, cut_wall = time.monotonic(), time.time()
        name = f"makima-lease {victim.daemon_id}"
        rows = await self.conn.fetch(
            "SELECT pid, pg_terminate_backend(pid) AS ended FROM pg_stat_activity "
            "WHERE application_name = $1",
            name,
        )
        check = "pg_terminate_backend of a lease connection: kept, or a clean takeover"
        problems: list[str] = []
        if not rows:
            names = await self.conn.fetch(
                "SELECT DISTINCT application_name FROM pg_stat_activity "
                "WHERE datname = current_database()"
            )
            problems.append(
                f"no backend named {name!r}; application names: "
                + ", ".join(repr(r["application_name"]) for r in names)
            )
        else:
            self.note(
                f"pg_terminate_backend of {victim.name}'s lease backend(s) "
                f"{[r['pid'] for r in rows]} at {wall_time(cut_wall)}, owning {len(owned)}"
            )
        # Long enough for a missed deadline to show: its supervisors taken over.
        await anyio.sleep(settings.lease_ttl + settings.lease_renew + 1.0)
        times = cc.takeover_times(self.book.refresh(), owned, after=cut_at, not_on=victim.pid)
        after = await self._owners(owned)
        kept = moved = 0
        for sid in owned:
            same = after.get(sid) == before.get(sid)
            old = [p for p, s in agents.items() if s == sid]
            if same and all(is_running(p) for p in old) and times[sid] is None:
                kept += 1
            elif not same and times[sid] is not None and not any(is_running(p) for p in old):
                moved += 1
            else:
                problems.append(
                    f"{sid[:8]}: owner/epoch {before.get(sid)} -> {after.get(sid)}, old agent "
                    f"{'running' if any(is_running(p) for p in old) else 'gone'}, "
                    f"{'resumed elsewhere' if times[sid] is not None else 'not resumed elsewhere'}"
                )
        if not victim.runner.running:
            problems.append(f"{victim.name} exited after losing its lease connection")
        self.note(f"lease cut on {victim.name}: {kept} supervisors kept, {moved} taken over")
        if moved:
            moved_times = {s: t for s, t in times.items() if t is not None}
            restored = await self._restored_after(list(moved_times), cut_wall)
            self.takeovers.append(
                Takeover(
                    "terminate",
                    round_no,
                    victim.index,
                    moved_times,
                    settings.takeover_limit,
                    restored,
                )
            )
            problems += cc.slow_takeovers(moved_times, settings.takeover_limit)
        if not owned:
            problems.append(f"{victim.name} ran no supervisor when its lease connection was cut")
        self.judge(check, problems, len(owned))

    # ----------------------------------------------------------------- the end

    async def _finish(self) -> None:
        self.tell("finishing: every question now answered 'finish'")
        self.finishing = True
        assert self.conn is not None
        conn = self.conn
        ids = list(self.created)

        async def all_finished() -> bool:
            done = await conn.fetch(
                "SELECT supervisor_id::text AS sid FROM supervisor_states "
                "WHERE supervisor_id = ANY($1::uuid[]) AND state IN ('completed', 'failed')",
                ids,
            )
            self.finished |= {r["sid"] for r in done}
            self.tell()
            return len(self.finished) >= len(ids)

        limit = 60.0 + 1.0 * len(ids)
        if not await self._until(all_finished, limit):
            self.note(f"{len(ids) - len(self.finished)} supervisors unfinished after {limit:.0f}s")

    async def _stop_members(self) -> None:
        self.tell("stopping the daemons (SIGTERM)")
        for member in self.members:
            member.down()
            if member.runner.running:
                try:
                    self.stop_codes[member.index] = await member.runner.terminate()
                except TimeoutError:
                    self.stop_codes[member.index] = -1
                    await member.runner.kill()

    async def _verify(self) -> list[Check]:
        for refusal, count in self.refusals.most_common(3):
            self.note(f"answers refused {count} times: {refusal}")
        stored = await self._stored()
        records = self.book.refresh()
        ids = list(self.created)
        checks: list[Check] = []

        def check(name: str, problems: Sequence[str], total: int, what: str) -> None:
            detail = f"{total - min(len(problems), total)}/{total} {what}"
            if problems:
                detail += "; e.g. " + "; ".join(problems[:3])
                if len(problems) > 3:
                    detail += f" (+{len(problems) - 3} more)"
            checks.append(Check(name, not problems, detail))

        for name, problems in self.problems.items():
            check(name, problems, self.totals.get(name, 0), "as required")
        check(
            "no control call answered with an internal error (-32603)",
            self.internal_errors,
            self.calls,
            "calls",
        )
        silent = [m.name for m in self.members if m.answers == 0]
        check(
            "answers went through every daemon's socket",
            [f"none through {n}" for n in silent],
            len(self.members),
            "sockets (" + ", ".join(f"{m.name}: {m.answers}" for m in self.members) + " answers)",
        )
        found = cc.overlaps(records)
        intervals = sum(len(p) for p in cc.processes(records).values())
        check(
            "no supervisor acknowledged in two agent processes at once",
            [o.describe() for o in found],
            intervals,
            "agent processes without overlap",
        )
        questions, tasks = cc.acknowledged_counts(records)
        lost = cc.lost_acknowledgements(records, self.accepted, stored)
        check(
            "no acknowledged question, answer or task lost",
            lost,
            questions + tasks + len(self.accepted),
            "questions, tasks and answers in the database",
        )
        deliveries = self.book.deliveries()
        answered = sum(1 for a in stored.questions.values() if a is not None)
        check(
            "each answer reached its agent, at most once per process",
            cc.delivery_problems(deliveries, stored),
            answered,
            "answered questions",
        )
        check(
            "every supervisor completed, no question left open",
            cc.unfinished(stored, ids),
            len(ids),
            "completed",
        )
        codes = [
            f"{self.members[i].name} exited {c}"
            for i, c in sorted(self.stop_codes.items())
            if c != 0
        ]
        check("every daemon stops cleanly (SIGTERM)", codes, len(self.stop_codes), "exit 0")
        return checks

    async def _stored(self) -> cc.Stored:
        assert self.conn is not None
        ids = list(self.created)
        questions = await self.conn.fetch(
            "SELECT question_id::text AS qid, supervisor_id::text AS sid, answer FROM questions "
            "WHERE supervisor_id = ANY($1::uuid[])",
            ids,
        )
        tasks = await self.conn.fetch(
            "SELECT task_id::text AS tid FROM tasks WHERE supervisor_id = ANY($1::uuid[])", ids
        )
        states = await self.conn.fetch(
            "SELECT supervisor_id::text AS sid, state, "
            "jsonb_array_length(COALESCE(pending_questions, '[]'::jsonb)) AS open "
            "FROM supervisor_states WHERE supervisor_id = ANY($1::uuid[])",
            ids,
        )
        return cc.Stored(
            questions={r["qid"]: r["answer"] for r in questions},
            question_owner={r["qid"]: r["sid"] for r in questions},
            tasks=frozenset(r["tid"] for r in tasks),
            states={r["sid"]: r["state"] for r in states},
            open_questions={r["sid"]: int(r["open"]) for r in states},
        )

    # ----------------------------------------------------------------- cleanup

    async def cleanup(self) -> None:
        """Whatever happened: no daemon left paused or running, the server stopped."""
        self._queue_send.close()
        self._queue_receive.close()
        with anyio.CancelScope(shield=True):
            for member in self.members:
                if member.runner.running:
                    if member.pid is not None:
                        with contextlib.suppress(ProcessLookupError):
                            os.kill(member.pid, signal.SIGCONT)
                    with contextlib.suppress(Exception):
                        await member.runner.kill()
            if self.conn is not None:
                with contextlib.suppress(Exception):
                    await self.conn.close()
            if self.server is not None:
                with contextlib.suppress(Exception):
                    await anyio.to_thread.run_sync(self.server.stop)

    def remove(self, passed: bool) -> None:
        if passed and self.remove_scratch:
            shutil.rmtree(self.scratch, ignore_errors=True)


async def run_cluster_drill(
    settings: ClusterSettings, report: Callable[[ClusterProgress], None] | None = None
) -> ClusterReport:
    """Run the cluster drill; the report says which checks held."""
    drill = _ClusterDrill(settings, report or (lambda _: None))
    try:
        result = await drill.run()
    finally:
        await drill.cleanup()
    drill.remove(result.ok)
    return result


__all__ = [
    "ClusterProgress",
    "ClusterReport",
    "ClusterSettings",
    "Takeover",
    "database_url",
    "run_cluster_drill",
]

"""What a makima save point costs next to the physical floor, and next to its peers.

On one PostgreSQL server, in one run, every line measured side by side in
interleaved rounds:

- **serial**: one caller, one operation at a time. The floor is raw asyncpg on
  a dedicated connection (not a pool): a single-row UPSERT in autocommit, one
  round trip and one commit. Each of makima's save points, and each peer that
  is installed (a DBOS step; LangGraph's ``PostgresSaver.put``), is timed
  alone: p50 and p90, and p50 ÷ the floor's p50.
- **concurrent**: 1,000 supervisors, each one task making its save points in
  order, over a pool of 10 connections. The floor is the same UPSERT from
  1,000 callers over a raw asyncpg pool of 10 (no reset query): save points
  per second ÷ the floor's.

makima's save points are written by one adapter (the ``Makima`` class just
below): it is the only part of this file that knows how makima saves.

Without ``--database-url`` an embedded PostgreSQL is started in a fresh
temporary directory and stopped at the end. With a URL, everything is created
in scratch schemas that are dropped at the end.

    .venv/bin/python bench/savepoints.py [--mode serial|concurrent|both]
        [--seconds S] [--rounds R] [--warmup W] [--supervisors N]
        [--concurrent-supervisors M] [--pool P] [--no-peers]
        [--database-url URL] [--synchronous-commit on|off] [--json]

The peers need the ``bench`` extra (``pip install -e '.[bench]'``); a peer that
is not installed is skipped with a line saying so. bench/README.md says what
each line means and what it measured here.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import os
import shutil
import sys
import tempfile
import time
import uuid
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol
from urllib.parse import parse_qsl, quote, urlencode, urlsplit, urlunsplit

import anyio
import asyncpg
import structlog

from makima import repository as repo
from makima.database import Database, apply_schema, create_pool, ensure_database, told_of_retries
from makima.embedded import ConnectParams, EmbeddedPostgres
from makima.model import PendingQuestion, SupervisorSpec, SupervisorState, TaskRecord
from makima.model import SupervisorStateEnum as S

# =========================================================================== makima's save points
#
# The one section that knows how makima writes a save point: a method per kind,
# each doing what the daemon does for it today (repository calls through
# Database.save, as Supervisor and Daemon make them). To bench the store, change
# these methods (and the imports above); nothing below this section changes.


class Makima:
    """makima's save points, over makima's own pool (its connection class and codecs)."""

    def __init__(self, pool: asyncpg.Pool) -> None:
        self.db = Database(pool)

    async def create_supervisor(self, i: int) -> SupervisorState:
        spec = SupervisorSpec.new(f"bench-{i}", ["true"], goal="benchmark save points")
        return await self.db.save(lambda pool: repo.create_supervisor(pool, spec), "create")

    async def state_change(self, s: SupervisorState, n: int) -> None:
        await self.db.save(
            lambda pool: repo.update_supervisor_detailed_state(
                pool, s.supervisor_id, S.WORKING, f"step {n}", n % 101
            ),
            "state_change",
        )

    async def heartbeat(self, s: SupervisorState, n: int) -> None:
        await self.db.save(
            lambda pool: repo.update_supervisor_heartbeat_state(
                pool, s.supervisor_id, S.WORKING, f"step {n}", n % 101
            ),
            "heartbeat",
        )

    async def phase_change(self, s: SupervisorState, n: int) -> None:
        snapshot = dataclasses.replace(
            s, state=S.WORKING, phase=f"phase {n}", current_activity=f"step {n}"
        )
        await self.db.save(lambda pool: repo.record_phase_change(pool, snapshot), "phase")

    async def question_asked(self, s: SupervisorState, n: int) -> uuid.UUID:
        question = PendingQuestion(
            id=uuid.uuid4(),
            question=f"Deploy build {n} to staging?",
            choices=("yes", "no"),
            context="The tests passed on the last commit.",
        )
        await self.db.save(
            lambda pool: repo.record_question_asked(
                pool, s.supervisor_id, question, S.WAITING_FOR_USER
            ),
            "ask",
        )
        return question.id

    async def question_answered(self, s: SupervisorState, question_id: uuid.UUID) -> None:
        """From the client's call to the agent having it, as the daemon does it: the
        question looked up, the answer saved (moving the supervisor back to work),
        and its delivery to the agent recorded."""
        record = await self.db.query(lambda pool: repo.get_question(pool, question_id))
        assert record is not None
        await self.db.save(
            told_of_retries(
                lambda pool, retry: repo.answer_question(
                    pool, question_id, "yes", 1000, state=S.WORKING, retry=retry
                )
            ),
            "answer",
        )
        await self.db.save(
            lambda pool: repo.mark_answer_delivered(pool, question_id), "answer_delivered"
        )

    async def task_spawned(self, s: SupervisorState, n: int) -> None:
        task = TaskRecord(
            task_id=uuid.uuid4(),
            supervisor_id=s.supervisor_id,
            name=f"test-{n}",
            command=("pytest", "-q", "tests/unit"),
        )
        await self.db.save(lambda pool: repo.create_task(pool, task), "spawn")

    async def forget_spawned_tasks(self) -> None:
        """Between task phases, not timed: empty every supervisor's task list (the
        rows stay), so that the lists, and the figures, do not grow with the run."""
        await self.db.pool.execute(
            "UPDATE supervisor_states SET spawned_task_ids = ARRAY[]::uuid[]"
        )


# =========================================================================== the harness

# At most this many pending questions per supervisor before they are answered,
# and spawned tasks per supervisor before the list is emptied (outside the timed
# section): long lists would make the figures depend on how long the run is.
QUESTIONS_PER_SUPERVISOR = 4
TASKS_PER_SUPERVISOR = 32
ANSWER_PHASE_LIMIT_S = 120.0  # a safety net: answering is bounded by the questions asked
# The mix: per supervisor, a cycle of ten save points in this order.
MIX = (
    "state_change",
    "heartbeat",
    "state_change",
    "phase_change",
    "state_change",
    "heartbeat",
    "task_spawned",
    "state_change",
    "question_asked",
    "question_answered",
)

FLOOR_SQL = (
    "INSERT INTO bench_kv (k, v) VALUES ($1, $2) ON CONFLICT (k) DO UPDATE SET v = EXCLUDED.v"
)


class NoResetConnection(asyncpg.Connection):
    """The floor's pooled connection: released without asyncpg's reset query."""

    def get_reset_query(self) -> str:
        return ""


@dataclass
class Sample:
    """Latencies (seconds) of the operations of one or more phases, and their wall time."""

    latencies: list[float] = field(default_factory=list)
    elapsed: float = 0.0
    cpu: float = 0.0  # CPU time of this (client) process over the same time

    def add(self, other: Sample) -> None:
        self.latencies.extend(other.latencies)
        self.elapsed += other.elapsed
        self.cpu += other.cpu

    @property
    def ops(self) -> int:
        return len(self.latencies)

    @property
    def ops_per_s(self) -> float:
        return self.ops / self.elapsed if self.elapsed > 0 else 0.0

    def percentile_ms(self, p: float) -> float:
        """Nearest-rank percentile, in milliseconds."""
        if not self.latencies:
            return float("nan")
        ordered = sorted(self.latencies)
        rank = max(1, min(len(ordered), round(p / 100 * len(ordered) + 0.5)))
        return ordered[rank - 1] * 1000


def merged(samples: Sequence[Sample]) -> Sample:
    total = Sample()
    for sample in samples:
        total.add(sample)
    return total


@dataclass
class Context:
    """One mode's callers: who owns which supervisors and floor rows."""

    makima: Makima
    floor: Callable[[int, str], Awaitable[None]]  # one floor UPSERT: (key, value)
    concurrency: int
    owned: list[list[SupervisorState]]  # worker -> the supervisors it owns
    keys: list[list[int]]  # worker -> the floor rows it owns
    asked: list[list[tuple[SupervisorState, uuid.UUID]]]  # worker -> questions left open
    mix_open: list[tuple[SupervisorState, uuid.UUID] | None] = field(default_factory=list)

    def supervisor(self, w: int, n: int, per: int = 1) -> SupervisorState:
        """The supervisor of worker ``w``'s ``n``-th operation, ``per`` in a row each."""
        owned = self.owned[w]
        return owned[(n // per) % len(owned)]


Op = Callable[[Context, int, int], Awaitable[None]]  # (ctx, worker, n-th op of the worker)


async def timed_loop(
    ctx: Context, op: Op, seconds: float, caps: Sequence[int] | None = None
) -> Sample:
    """Run ``op`` in ``ctx.concurrency`` workers until ``seconds`` pass (worker ``w``
    stops early after ``caps[w]`` operations). Each operation is timed alone; the
    wall time runs until the last worker has finished its last operation."""
    latencies: list[float] = []
    cpu = time.process_time()
    start = time.perf_counter()
    deadline = start + seconds

    async def worker(w: int) -> None:
        limit = None if caps is None else caps[w]
        n = 0
        while time.perf_counter() < deadline and (limit is None or n < limit):
            t0 = time.perf_counter()
            await op(ctx, w, n)
            latencies.append(time.perf_counter() - t0)
            n += 1

    async with anyio.create_task_group() as tg:
        for w in range(ctx.concurrency):
            tg.start_soon(worker, w)
    return Sample(latencies, time.perf_counter() - start, time.process_time() - cpu)


# --------------------------------------------------------------------------- the operations


async def floor_upsert(ctx: Context, w: int, n: int) -> None:
    keys = ctx.keys[w]
    await ctx.floor(keys[n % len(keys)], f"step {n}")


async def state_change(ctx: Context, w: int, n: int) -> None:
    await ctx.makima.state_change(ctx.supervisor(w, n), n)


async def heartbeat(ctx: Context, w: int, n: int) -> None:
    await ctx.makima.heartbeat(ctx.supervisor(w, n), n)


async def phase_change(ctx: Context, w: int, n: int) -> None:
    await ctx.makima.phase_change(ctx.supervisor(w, n), n)


async def question_asked(ctx: Context, w: int, n: int) -> None:
    s = ctx.supervisor(w, n)
    ctx.asked[w].append((s, await ctx.makima.question_asked(s, n)))


async def question_answered(ctx: Context, w: int, n: int) -> None:
    s, question_id = ctx.asked[w][n]
    await ctx.makima.question_answered(s, question_id)


async def task_spawned(ctx: Context, w: int, n: int) -> None:
    await ctx.makima.task_spawned(ctx.supervisor(w, n), n)


async def mix(ctx: Context, w: int, n: int) -> None:
    """One save point of the mix: a supervisor takes ten in a row, in MIX's order."""
    s = ctx.supervisor(w, n, per=len(MIX))
    kind = MIX[n % len(MIX)]
    m = ctx.makima
    if kind == "question_asked":
        ctx.mix_open[w] = (s, await m.question_asked(s, n))
    elif kind == "question_answered":
        open_question = ctx.mix_open[w]
        if open_question is None:  # the phase began between the two: a state change instead
            await m.state_change(s, n)
        else:
            ctx.mix_open[w] = None
            await m.question_answered(*open_question)
    else:
        await getattr(m, kind)(s, n)


# --------------------------------------------------------------------------- lines


class Line(Protocol):
    name: str
    what: str

    async def run(self, ctx: Context, seconds: float, *, timed: bool) -> Sample: ...


Between = Callable[[Context, bool], Awaitable[None]]  # (ctx, timed?) run between phases


@dataclass
class Measured:
    """One line of makima's (or the floor's): its operation and how its phases end.

    With ``per_supervisor``, a phase ends once each worker has done that many
    operations per supervisor it owns; ``between`` then runs, outside the
    measured time, before the next phase."""

    name: str
    what: str
    op: Op
    per_supervisor: int | None = None
    between: Between | None = None

    async def run(self, ctx: Context, seconds: float, *, timed: bool) -> Sample:
        caps: list[int] | None = None
        if self.per_supervisor is not None:
            caps = [self.per_supervisor * len(owned) for owned in ctx.owned]
        total = Sample()
        while total.elapsed < seconds:
            total.add(await timed_loop(ctx, self.op, seconds - total.elapsed, caps))
            if self.between is not None:
                await self.between(ctx, timed)
        return total


class AnswerAll:
    """Between question phases: answer every question asked, timed as a line of its own."""

    def __init__(self) -> None:
        self.sample = Sample()

    async def __call__(self, ctx: Context, timed: bool) -> None:
        caps = [len(asked) for asked in ctx.asked]
        phase = await timed_loop(ctx, question_answered, ANSWER_PHASE_LIMIT_S, caps)
        for w, asked in enumerate(ctx.asked):
            del asked[: caps[w]]
        if timed:
            self.sample.add(phase)

    def take(self) -> Sample:
        sample, self.sample = self.sample, Sample()
        return sample


async def forget_tasks(ctx: Context, timed: bool) -> None:
    await ctx.makima.forget_spawned_tasks()


def makima_lines(answers: AnswerAll) -> list[Measured]:
    return [
        Measured("state_change", "update_supervisor_detailed_state", state_change),
        Measured("heartbeat", "update_supervisor_heartbeat_state", heartbeat),
        Measured("phase_change", "record_phase_change", phase_change),
        Measured(
            "question_asked",
            "record_question_asked",
            question_asked,
            QUESTIONS_PER_SUPERVISOR,
            answers,
        ),
        Measured("task_spawned", "create_task", task_spawned, TASKS_PER_SUPERVISOR, forget_tasks),
        Measured(
            "mix",
            "10 save points: 4 state, 2 beat, phase, task, ask, answer",
            mix,
            len(MIX) * TASKS_PER_SUPERVISOR,
            forget_tasks,
        ),
    ]


ANSWER_WHAT = "get_question + answer_question + mark_answer_delivered"


# --------------------------------------------------------------------------- peers


@dataclass
class PeerTarget:
    """Where the peers write: a libpq URL, and a schema each may make its own."""

    url: str
    dbos_schema: str
    langgraph_schema: str


class ThreadLine:
    """A peer's line: its timed slices run in a worker thread (the peers are sync)."""

    name: str
    what: str

    def slice(self, seconds: float) -> list[float]:
        raise NotImplementedError

    async def run(self, ctx: Context, seconds: float, *, timed: bool) -> Sample:
        cpu = time.process_time()
        start = time.perf_counter()
        latencies = await anyio.to_thread.run_sync(self.slice, seconds)
        return Sample(latencies, time.perf_counter() - start, time.process_time() - cpu)

    def close(self) -> None:
        pass


class DbosStep(ThreadLine):
    """A ``@DBOS.step`` inside a workflow: DBOS checkpoints each step's output.

    One workflow per slice runs steps back to back and times each step call;
    the workflow's own start and end are outside the timed steps."""

    name = "dbos_step"
    what = "DBOS @DBOS.step in a @DBOS.workflow"

    def __init__(self, target: PeerTarget) -> None:
        from dbos import DBOS

        self.dbos = DBOS
        DBOS(
            config={
                "name": "makima-bench",
                "system_database_url": target.url,
                "dbos_system_schema": target.dbos_schema,
                "log_level": "WARNING",
            }
        )

        @DBOS.step()
        def save_point(n: int) -> int:
            return n

        @DBOS.workflow()
        def steps(seconds: float) -> list[float]:
            latencies = []
            deadline = time.perf_counter() + seconds
            n = 0
            while time.perf_counter() < deadline:
                t0 = time.perf_counter()
                save_point(n)
                latencies.append(time.perf_counter() - t0)
                n += 1
            return latencies

        self.steps = steps
        DBOS.launch()

    def slice(self, seconds: float) -> list[float]:
        return list(self.steps(seconds))

    def close(self) -> None:
        self.dbos.destroy(destroy_registry=True)


class LangGraphPut(ThreadLine):
    """LangGraph's ``PostgresSaver.put``: one checkpoint of a graph step, on one
    psycopg connection in autocommit, as LangGraph's docs set it up. Each of 64
    threads (LangGraph's unit, as a supervisor is makima's) is written in turn."""

    name = "langgraph_put"
    what = "langgraph PostgresSaver.put"

    def __init__(self, target: PeerTarget, threads: int = 64) -> None:
        from langgraph.checkpoint.base import empty_checkpoint
        from langgraph.checkpoint.postgres import PostgresSaver
        from psycopg import Connection
        from psycopg.conninfo import make_conninfo
        from psycopg.rows import dict_row

        conninfo = make_conninfo(target.url, options=f"-c search_path={target.langgraph_schema}")
        self.conn = Connection.connect(
            conninfo, autocommit=True, prepare_threshold=0, row_factory=dict_row
        )
        self.conn.execute(f"CREATE SCHEMA IF NOT EXISTS {target.langgraph_schema}")
        self.saver = PostgresSaver(self.conn)
        self.saver.setup()
        self.empty_checkpoint = empty_checkpoint
        self.configs: list[Any] = [
            {"configurable": {"thread_id": f"bench-{i}", "checkpoint_ns": ""}}
            for i in range(threads)
        ]
        self.n = 0

    def slice(self, seconds: float) -> list[float]:
        latencies = []
        deadline = time.perf_counter() + seconds
        while time.perf_counter() < deadline:
            n = self.n = self.n + 1
            i = n % len(self.configs)
            checkpoint = self.empty_checkpoint()
            checkpoint["channel_values"] = {
                "state": {"state": "working", "activity": f"step {n}", "progress": n % 101}
            }
            checkpoint["channel_versions"] = {"state": n}
            t0 = time.perf_counter()
            self.configs[i] = self.saver.put(
                self.configs[i], checkpoint, {"source": "loop", "step": n}, {"state": n}
            )
            latencies.append(time.perf_counter() - t0)
        return latencies

    def close(self) -> None:
        self.conn.close()


def open_peers(target: PeerTarget, args: argparse.Namespace) -> tuple[list[ThreadLine], list[str]]:
    """The peers that are installed, and a line for each one that is not."""
    peers: list[ThreadLine] = []
    skipped: list[str] = []
    for name, module, make in (
        ("dbos_step", "dbos", DbosStep),
        ("langgraph_put", "langgraph.checkpoint.postgres", LangGraphPut),
    ):
        try:
            __import__(module)
            if module.startswith("langgraph"):
                __import__("psycopg")
        except ImportError as exc:
            skipped.append(
                f"{name}: skipped, {exc.name or module} is not installed "
                "(pip install -e '.[bench]')"
            )
            continue
        say(args, f"  starting peer {name} ...")
        peers.append(make(target))
    return peers, skipped


# --------------------------------------------------------------------------- the run


def say(args: argparse.Namespace, text: str) -> None:
    if not args.json:
        print(text, file=sys.stderr, flush=True)


async def server_facts(conn: asyncpg.Connection) -> dict[str, str]:
    names = ("server_version", "fsync", "synchronous_commit", "wal_sync_method", "shared_buffers")
    row = await conn.fetchrow(
        "SELECT " + ", ".join(f"current_setting('{n}') AS {n}" for n in names)
    )
    assert row is not None
    return dict(row.items())


@dataclass
class Target:
    """How each side reaches the server."""

    makima: ConnectParams | str  # for makima's pool
    raw: dict[str, Any]  # asyncpg.connect keyword arguments, for the floor
    peers: PeerTarget


async def make_context(
    makima: Makima, floor: Callable[[int, str], Awaitable[None]], workers: int, n: int
) -> Context:
    supervisors = [await makima.create_supervisor(i) for i in range(n)]
    return Context(
        makima=makima,
        floor=floor,
        concurrency=workers,
        owned=[supervisors[w::workers] for w in range(workers)],
        keys=[list(range(n))[w::workers] for w in range(workers)],
        asked=[[] for _ in range(workers)],
        mix_open=[None] * workers,
    )


async def run_rounds(
    args: argparse.Namespace,
    ctx: Context,
    plan: Sequence[Line],
    answers: AnswerAll,
    seconds: float,
) -> dict[str, list[Sample]]:
    """Every line gets a slice of every round, in an order that rotates each round,
    so a disturbance (a slow disk, a noisy neighbour) hits every line alike."""
    rounds: dict[str, list[Sample]] = {line.name: [] for line in plan}
    rounds["question_answered"] = []
    for line in plan:
        await line.run(ctx, args.warmup, timed=False)
    answers.take()
    for r in range(args.rounds):
        say(args, f"    round {r + 1}/{args.rounds} ...")
        shift = r % len(plan)
        for line in [*plan[shift:], *plan[:shift]]:
            rounds[line.name].append(await line.run(ctx, seconds / args.rounds, timed=True))
            if line.name == "question_asked":
                rounds["question_answered"].append(answers.take())
    return rounds


async def serial_mode(
    args: argparse.Namespace, target: Target, makima: Makima, peers: Sequence[ThreadLine]
) -> dict[str, Any]:
    say(args, f"  serial: one caller, {args.supervisors} supervisors")
    floor_conn = await asyncpg.connect(**target.raw, timeout=30)
    try:

        async def floor(key: int, value: str) -> None:
            await floor_conn.execute(FLOOR_SQL, key, value)

        ctx = await make_context(makima, floor, 1, args.supervisors)
        answers = AnswerAll()
        floor_line = Measured("floor", "raw asyncpg upsert, dedicated conn", floor_upsert)
        plan: list[Line] = [floor_line, *makima_lines(answers), *peers]
        rounds = await run_rounds(args, ctx, plan, answers, args.seconds)
    finally:
        await floor_conn.close()
    what = {line.name: line.what for line in plan} | {"question_answered": ANSWER_WHAT}
    return {"mode": "serial", "results": results(rounds, what, by="p50")}


async def concurrent_mode(
    args: argparse.Namespace, target: Target, makima: Makima
) -> dict[str, Any]:
    m = args.concurrent_supervisors
    say(args, f"  concurrent: {m} supervisors, one task each, pool of {args.pool}")
    floor_pool = await asyncpg.create_pool(
        **target.raw,
        min_size=args.pool,
        max_size=args.pool,
        connection_class=NoResetConnection,
    )
    try:

        async def floor(key: int, value: str) -> None:
            await floor_pool.execute(FLOOR_SQL, key, value)

        ctx = await make_context(makima, floor, m, m)
        answers = AnswerAll()
        floor_line = Measured("floor", f"raw asyncpg upsert, pool of {args.pool}", floor_upsert)
        plan: list[Line] = [floor_line, *makima_lines(answers)]
        rounds = await run_rounds(args, ctx, plan, answers, args.concurrent_seconds)
    finally:
        with anyio.CancelScope(shield=True):
            await floor_pool.close()
    what = {line.name: line.what for line in plan} | {"question_answered": ANSWER_WHAT}
    return {"mode": "concurrent", "results": results(rounds, what, by="ops")}


LINE_ORDER = (
    "floor",
    "state_change",
    "heartbeat",
    "phase_change",
    "question_asked",
    "question_answered",
    "task_spawned",
    "mix",
    "dbos_step",
    "langgraph_put",
)


def results(
    rounds: dict[str, list[Sample]], what: dict[str, str], *, by: str
) -> list[dict[str, Any]]:
    """Each line against the floor: its p50 (``by="p50"``, higher is slower) or its
    ops/s (``by="ops"``, lower is slower); each round against the same round's floor."""
    floor_rounds = rounds["floor"]
    floor = merged(floor_rounds)
    out = []
    for name in sorted(rounds, key=LINE_ORDER.index):
        s = merged(rounds[name])
        if by == "p50":
            ratio = s.percentile_ms(50) / floor.percentile_ms(50)
            per_round = [
                r.percentile_ms(50) / f.percentile_ms(50)
                for r, f in zip(rounds[name], floor_rounds, strict=True)
                if r.ops
            ]
        else:
            ratio = s.ops_per_s / floor.ops_per_s
            per_round = [
                r.ops_per_s / f.ops_per_s
                for r, f in zip(rounds[name], floor_rounds, strict=True)
                if r.ops
            ]
        out.append(
            {
                "name": name,
                "operation": what[name],
                "ops": s.ops,
                "seconds": round(s.elapsed, 3),
                "ops_per_s": round(s.ops_per_s, 1),
                "p50_ms": round(s.percentile_ms(50), 3),
                "p90_ms": round(s.percentile_ms(90), 3),
                "p99_ms": round(s.percentile_ms(99), 3),
                "ratio": round(ratio, 3),
                "ratio_min": round(min(per_round, default=float("nan")), 3),
                "ratio_max": round(max(per_round, default=float("nan")), 3),
                "client_cpu": round(s.cpu / s.elapsed, 2) if s.elapsed > 0 else 0.0,
            }
        )
    return out


async def bench(args: argparse.Namespace, target: Target) -> dict[str, Any]:
    """Both modes, each line in interleaved rounds; returns the report."""
    admin = await asyncpg.connect(**target.raw, timeout=30)
    try:
        facts = await server_facts(admin)
        await admin.execute("CREATE TABLE IF NOT EXISTS bench_kv (k integer PRIMARY KEY, v text)")
    finally:
        await admin.close()
    say(args, f"PostgreSQL {facts['server_version']}")
    size = max(args.pool, 2)
    pool = await create_pool(target.makima, min_size=size, max_size=size)
    modes = []
    skipped: list[str] = []
    peers: list[ThreadLine] = []
    try:
        await apply_schema(pool)
        makima = Makima(pool)
        if args.mode in ("serial", "both"):
            if not args.no_peers:
                peers, skipped = open_peers(target.peers, args)
            for line in skipped:
                say(args, f"  {line}")
            modes.append(await serial_mode(args, target, makima, peers))
        if args.mode in ("concurrent", "both"):
            modes.append(await concurrent_mode(args, target, makima))
    finally:
        for peer in peers:
            peer.close()
        with anyio.CancelScope(shield=True), anyio.move_on_after(10) as scope:
            await pool.close()
        if scope.cancelled_caught:
            pool.terminate()
    return {
        "bench": "savepoints",
        "modes": modes,
        "skipped": skipped,
        "settings": {
            "seconds": args.seconds,
            "concurrent_seconds": args.concurrent_seconds,
            "rounds": args.rounds,
            "warmup": args.warmup,
            "supervisors": args.supervisors,
            "concurrent_supervisors": args.concurrent_supervisors,
            "pool": args.pool,
        },
        "server": {"embedded": not args.database_url, **facts},
    }


# --------------------------------------------------------------------------- the table


def print_table(data: dict[str, Any]) -> None:
    for mode in data["modes"]:
        serial = mode["mode"] == "serial"
        settings = data["settings"]
        if serial:
            title = "serial: one caller; x = p50 / the floor's p50 (higher is slower)"
        else:
            title = (
                f"concurrent: {settings['concurrent_supervisors']} supervisors over a pool of "
                f"{settings['pool']}; x = ops/s / the floor's ops/s (lower is slower)"
            )
        print(title)
        header = (
            f"{'line':<18} {'timed call':<40} {'ops/s':>7} {'p50 ms':>7} {'p90 ms':>7} "
            f"{'p99 ms':>7} {'x':>6} {'rounds':>11} {'cpu':>4}"
        )
        print(header)
        print("-" * len(header))
        for r in mode["results"]:
            spread = f"{r['ratio_min']:.2f}-{r['ratio_max']:.2f}"
            print(
                f"{r['name']:<18} {r['operation'][:40]:<40} {r['ops_per_s']:>7.0f} "
                f"{r['p50_ms']:>7.2f} {r['p90_ms']:>7.2f} {r['p99_ms']:>7.2f} "
                f"{r['ratio']:>6.2f} {spread:>11} {r['client_cpu']:>4.0%}"
            )
        print()
    for line in data["skipped"]:
        print(line)
    server = data["server"]
    where = "embedded" if server["embedded"] else "URL"
    print(
        "rounds = lowest-highest of the per-round ratios, each against the same round's floor; "
        "cpu = this Python process's CPU time / wall time (100% = one core)"
    )
    print(
        f"PostgreSQL {server['server_version']} ({where}): fsync={server['fsync']}, "
        f"synchronous_commit={server['synchronous_commit']}, "
        f"wal_sync_method={server['wal_sync_method']}"
    )
    s = data["settings"]
    print(
        f"serial {s['seconds']:g} s and concurrent {s['concurrent_seconds']:g} s per line, in "
        f"{s['rounds']} rounds after {s['warmup']:g} s warm-up; "
        f"the whole run took {data['run_seconds']:g} s"
    )
    host = data["host"]
    print(
        f"{host['cpus']} CPUs; load average before the run: "
        + " ".join(f"{x:.2f}" for x in host["loadavg_before"])
    )


# --------------------------------------------------------------------------- databases


def libpq_url(params: ConnectParams) -> str:
    """A URL for the peers' drivers (psycopg, SQLAlchemy) to the embedded server's socket."""
    password = quote(params.password or "", safe="")
    query = urlencode({"host": params.host, "port": params.port})
    return f"postgresql://{quote(params.user, safe='')}:{password}@/{params.database}?{query}"


async def prepare_embedded(params: ConnectParams, synchronous_commit: str | None) -> None:
    await ensure_database(params)
    if synchronous_commit is not None:
        conn = await asyncpg.connect(**params.asyncpg_kwargs(), timeout=10)
        try:
            # A throw-away cluster: setting it on the database is the simplest way.
            await conn.execute(
                f"ALTER DATABASE {params.database} SET synchronous_commit = {synchronous_commit}"
            )
        finally:
            await conn.close()


def run_embedded(args: argparse.Namespace) -> dict[str, Any]:
    """Start a private server in a fresh short temp dir, bench, always stop it."""
    tmp = Path(tempfile.mkdtemp(prefix="mkb-", dir="/tmp"))
    try:
        if os.geteuid() == 0:
            tmp.chmod(0o711)  # as root, the embedded server runs as another account
        server = EmbeddedPostgres(tmp / "pg")
        try:
            say(args, f"starting an embedded PostgreSQL in {tmp} ...")
            params = server.start()
            anyio.run(prepare_embedded, params, args.synchronous_commit)
            target = Target(
                makima=params,
                raw=params.asyncpg_kwargs(),
                peers=PeerTarget(libpq_url(params), "dbos", "langgraph"),
            )
            return anyio.run(bench, args, target)
        finally:
            server.stop()
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


async def run_with_url(args: argparse.Namespace) -> dict[str, Any]:
    """Bench in scratch schemas of the given database, dropped at the end."""
    schema = f"makima_bench_{uuid.uuid4().hex[:12]}"
    schemas = (schema, f"{schema}_dbos", f"{schema}_langgraph")
    admin = await asyncpg.connect(args.database_url, timeout=10)
    try:
        await admin.execute(f"CREATE SCHEMA {schema}")
        try:
            parts = urlsplit(args.database_url)
            query = dict(parse_qsl(parts.query))
            query["search_path"] = schema
            if args.synchronous_commit is not None:
                query["synchronous_commit"] = args.synchronous_commit
            url = urlunsplit(parts._replace(query=urlencode(query)))
            target = Target(
                makima=url, raw={"dsn": url}, peers=PeerTarget(args.database_url, *schemas[1:])
            )
            return await bench(args, target)
        finally:
            with anyio.CancelScope(shield=True):
                for name in schemas:
                    await admin.execute(f"DROP SCHEMA IF EXISTS {name} CASCADE")
    finally:
        with anyio.CancelScope(shield=True):
            await admin.close()


# --------------------------------------------------------------------------- main


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mode", choices=("serial", "concurrent", "both"), default="both")
    parser.add_argument("--seconds", type=float, default=5.0, help="serial: time per line")
    parser.add_argument(
        "--concurrent-seconds", type=float, default=5.0, help="concurrent: time per line"
    )
    parser.add_argument("--rounds", type=int, default=5, help="interleaved rounds (see README)")
    parser.add_argument("--warmup", type=float, default=0.5, help="discarded time per line, once")
    parser.add_argument("--supervisors", type=int, default=64, help="serial: supervisors")
    parser.add_argument(
        "--concurrent-supervisors", type=int, default=1000, help="concurrent: supervisors"
    )
    parser.add_argument("--pool", type=int, default=10, help="concurrent: pool size")
    parser.add_argument("--no-peers", action="store_true", help="skip DBOS and LangGraph")
    parser.add_argument("--database-url", help="bench this server instead of an embedded one")
    parser.add_argument(
        "--synchronous-commit",
        choices=("on", "off"),
        help="override the server's synchronous_commit for makima's and the floor's sessions",
    )
    parser.add_argument("--json", action="store_true", help="print only the JSON line")
    args = parser.parse_args(argv)
    for name in ("seconds", "concurrent_seconds"):
        value = getattr(args, name)
        if not 0 < value <= 600 or value / args.rounds < 0.05:
            parser.error(f"--{name.replace('_', '-')} must be in (0, 600], 0.05 s per round")
    if not 1 <= args.rounds <= 100:
        parser.error("--rounds must be in [1, 100]")
    if not 0 <= args.warmup <= 60:
        parser.error("--warmup must be in [0, 60]")
    if not 1 <= args.supervisors <= 100_000 or not 1 <= args.concurrent_supervisors <= 100_000:
        parser.error("--supervisors and --concurrent-supervisors must be in [1, 100000]")
    if not 1 <= args.pool <= 100:
        parser.error("--pool must be in [1, 100]")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    # makima logs through structlog; keep stdout for the results.
    structlog.configure(
        wrapper_class=structlog.make_filtering_bound_logger(logging.WARNING),
        logger_factory=structlog.PrintLoggerFactory(file=sys.stderr),
    )
    load_before = os.getloadavg()  # others' load on this machine skews every figure
    started = time.perf_counter()
    try:
        data = anyio.run(run_with_url, args) if args.database_url else run_embedded(args)
    except KeyboardInterrupt:
        print("interrupted; the database was cleaned up", file=sys.stderr)
        return 130
    data["run_seconds"] = round(time.perf_counter() - started, 1)
    data["host"] = {"cpus": os.cpu_count(), "loadavg_before": [round(x, 2) for x in load_before]}
    if not args.json:
        print_table(data)
        print()
    print(json.dumps(data, separators=(",", ":")))
    return 0


if __name__ == "__main__":
    sys.exit(main())

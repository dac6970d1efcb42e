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
below): it is the only part of this file that knows how makima saves, and it
saves as the daemon does, through ``makima.store.Store`` (group commit on) on a
``Database`` opened as the daemon opens it. At the end, each save point is
made once more through a proxy that counts round trips on the wire (embedded
server only).

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
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol
from urllib.parse import parse_qsl, quote, urlencode, urlsplit, urlunsplit

import anyio
import anyio.abc
import asyncpg
import structlog

from makima.database import Database, DatabaseConfig, ensure_database
from makima.embedded import ConnectParams, EmbeddedPostgres
from makima.model import Fence, PendingQuestion, SupervisorSpec, SupervisorState, TaskRecord
from makima.model import SupervisorStateEnum as S
from makima.store import (
    AnswersDelivered,
    CheckpointSaved,
    CommitterStats,
    Heartbeat,
    Heartbeats,
    MessageAdded,
    PhaseChange,
    QuestionAnswered,
    QuestionAsked,
    StateChange,
    Store,
    SupervisorCreated,
    TaskSpawned,
)

# =========================================================================== makima's save points
#
# The one section that knows how makima writes a save point: a method per kind,
# each building the store command the daemon builds for it (Supervisor, Daemon)
# and calling the same Store method, on a Database opened as the daemon opens it
# (Database.open: makima's pool, its no-reset Connection class, its codecs, the
# schema) and a Store with group commit on. Nothing below this section knows how
# makima saves.


class Makima:
    """makima's save points, through makima.store as the daemon makes them."""

    def __init__(self, db: Database) -> None:
        self.db = db
        self.store = Store(db)  # group commit on, as in the daemon
        # What the daemon holds in memory per supervisor: the state and row version
        # its next save point (and its heartbeat) starts from.
        self.memory: dict[uuid.UUID, SupervisorState] = {}
        self.daemon_id = uuid.uuid4()

    @classmethod
    async def open(cls, url: str, pool_size: int) -> Makima:
        config = DatabaseConfig(
            state_dir=Path(tempfile.gettempdir()),  # unused with a URL
            url=url,
            min_connections=pool_size,
            max_connections=pool_size,
        )
        return cls(await Database.open(config))

    async def close(self) -> None:
        await self.db.close()

    def _saved(self, s: SupervisorState, version: int | None, **changes: Any) -> None:
        old = self.memory.get(s.supervisor_id, s)
        new = dataclasses.replace(old, **changes)
        if version is not None:
            new = dataclasses.replace(new, version=version)
        self.memory[s.supervisor_id] = new

    def _fence(self, s: SupervisorState) -> Fence:
        return Fence.of(self.memory.get(s.supervisor_id, s))

    async def create_supervisor(self, i: int) -> SupervisorState:
        spec = SupervisorSpec.new(f"bench-{i}", ["true"], goal="benchmark save points")
        # Owned by this (pretend) daemon, as the daemon creates them: every save
        # point below carries the fence (owner, lease epoch) and its statement checks it.
        state = await self.store.create_supervisor(SupervisorCreated(spec, self.daemon_id))
        self.memory[state.supervisor_id] = state
        return state

    async def state_change(self, s: SupervisorState, n: int) -> None:
        """Supervisor._change: an activity the agent waits an ack for, say."""
        activity, progress = f"step {n}", n % 101
        command = StateChange(s.supervisor_id, S.WORKING, activity, progress, fence=self._fence(s))
        version = await self.store.change_state(command)
        self._saved(s, version, state=S.WORKING, current_activity=activity, progress=progress)

    def _beat(self, s: SupervisorState, n: int) -> Heartbeat:
        """Supervisor.heartbeat: what the daemon holds for one live supervisor."""
        m = self.memory.get(s.supervisor_id, s)
        return Heartbeat(s.supervisor_id, m.state, f"beat {n}", n % 101, m.version, Fence.of(m))

    def _after_beats(self, outcomes: dict[uuid.UUID, tuple[int, bool]]) -> None:
        """Supervisor.after_heartbeat: adopt the row's version when the beat could not write."""
        for sid, (version, written) in outcomes.items():
            m = self.memory[sid]
            if not written and version != m.version:
                self.memory[sid] = dataclasses.replace(m, version=version)

    async def heartbeat(self, s: SupervisorState, n: int) -> None:
        """Daemon._heartbeat with one live supervisor: Heartbeats of one beat."""
        self._after_beats(await self.store.beat(Heartbeats((self._beat(s, n),))))

    async def heartbeat_all(self, supervisors: Sequence[SupervisorState], n: int) -> None:
        """Daemon._heartbeat: every live supervisor's beat in one Heartbeats (one statement)."""
        beats = tuple(self._beat(s, n) for s in supervisors)
        self._after_beats(await self.store.beat(Heartbeats(beats)))

    async def phase_change(self, s: SupervisorState, n: int) -> None:
        """Supervisor._on_phase: the row and a checkpoint row with the whole state."""
        m = self.memory.get(s.supervisor_id, s)
        new = dataclasses.replace(m, state=S.WORKING, phase=f"phase {n}")
        version = await self.store.change_phase(PhaseChange(new))
        self._saved(s, version, state=S.WORKING, phase=new.phase)

    async def checkpoint(self, s: SupervisorState, n: int) -> None:
        """Supervisor._on_checkpoint: the agent's data in the row and a checkpoint row."""
        m = self.memory.get(s.supervisor_id, s)
        data = {"step": n, "done": ["lint", "unit tests"], "next": "integration tests"}
        new = dataclasses.replace(m, state=S.WORKING, checkpoint_data=data)
        version = await self.store.save_checkpoint(CheckpointSaved(new))
        self._saved(s, version, state=S.WORKING, checkpoint_data=data)

    async def message(self, s: SupervisorState, n: int) -> None:
        """Supervisor._apply on a ``message``: one entry of the conversation history."""
        content = {"text": f"Step {n}: the unit tests pass; running the integration tests."}
        await self.store.add_message(
            MessageAdded(s.supervisor_id, "assistant", content, self._fence(s))
        )

    async def question_asked(self, s: SupervisorState, n: int) -> uuid.UUID:
        """Supervisor._on_ask: the question's row, the pending entry and the state."""
        question = PendingQuestion(
            id=uuid.uuid4(),
            question=f"Deploy build {n} to staging?",
            choices=("yes", "no"),
            context="The tests passed on the last commit.",
        )
        command = QuestionAsked(s.supervisor_id, question, S.WAITING_FOR_USER, self._fence(s))
        version = await self.store.ask_question(command)
        self._saved(s, version, state=S.WAITING_FOR_USER)
        return question.id

    async def question_answered(self, s: SupervisorState, question_id: uuid.UUID) -> None:
        """Daemon.answer_question for a running supervisor's open question (found in
        memory): Supervisor.answer, one statement from the call to the commit. The
        client's reply goes out after it; the delivery mark is answer_delivered."""
        command = QuestionAnswered(question_id, "yes", 1000, S.WORKING, self._fence(s))
        await self.store.answer_question(command)
        self._saved(s, None, state=S.WORKING)

    def committer_stats(self) -> CommitterStats:
        """The group committer's counts (round trips, save points written)."""
        assert self.store.committer is not None
        return self.store.committer.stats

    async def answer_delivered(self, s: SupervisorState, question_id: uuid.UUID) -> None:
        """Supervisor.deliver_answer, once the agent has the answer: the delivery mark."""
        await self.store.deliver_answers(
            AnswersDelivered((question_id,), s.supervisor_id, self._fence(s))
        )

    async def task_spawned(self, s: SupervisorState, n: int) -> None:
        """Supervisor._on_spawn: the task's row and the supervisor's list (state unchanged)."""
        task = TaskRecord(
            task_id=uuid.uuid4(),
            supervisor_id=s.supervisor_id,
            name=f"test-{n}",
            command=("pytest", "-q", "tests/unit"),
        )
        _, version = await self.store.spawn_task(TaskSpawned(task, None, self._fence(s)))
        self._saved(s, version)

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
# The mix: per supervisor, a cycle of twelve save points in this order. No
# heartbeat: the daemon writes every live supervisor's beat in one statement per
# interval, not one per supervisor (the heartbeat lines measure it).
MIX = (
    "state_change",
    "message",
    "state_change",
    "phase_change",
    "state_change",
    "message",
    "task_spawned",
    "state_change",
    "question_asked",
    "question_answered",
    "answer_delivered",
    "checkpoint",
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
    commits: int = 0  # round trips the group committer made meanwhile
    batched: int = 0  # save points it wrote in them

    def add(self, other: Sample) -> None:
        self.latencies.extend(other.latencies)
        self.elapsed += other.elapsed
        self.cpu += other.cpu
        self.commits += other.commits
        self.batched += other.batched

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
    # worker -> the mix's question asked (then answered) and not yet delivered
    mix_open: list[tuple[SupervisorState, uuid.UUID] | None] = field(default_factory=list)
    mix_answered: list[tuple[SupervisorState, uuid.UUID] | None] = field(default_factory=list)

    def everyone(self) -> list[SupervisorState]:
        return [s for owned in self.owned for s in owned]

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
    stats = ctx.makima.committer_stats()
    commits, batched = stats.commits, stats.written
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
    elapsed, cpu = time.perf_counter() - start, time.process_time() - cpu
    return Sample(latencies, elapsed, cpu, stats.commits - commits, stats.written - batched)


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


async def checkpoint(ctx: Context, w: int, n: int) -> None:
    await ctx.makima.checkpoint(ctx.supervisor(w, n), n)


async def message(ctx: Context, w: int, n: int) -> None:
    await ctx.makima.message(ctx.supervisor(w, n), n)


async def question_asked(ctx: Context, w: int, n: int) -> None:
    s = ctx.supervisor(w, n)
    ctx.asked[w].append((s, await ctx.makima.question_asked(s, n)))


async def question_answered(ctx: Context, w: int, n: int) -> None:
    s, question_id = ctx.asked[w][n]
    await ctx.makima.question_answered(s, question_id)


async def answer_delivered(ctx: Context, w: int, n: int) -> None:
    s, question_id = ctx.asked[w][n]
    await ctx.makima.answer_delivered(s, question_id)


async def task_spawned(ctx: Context, w: int, n: int) -> None:
    await ctx.makima.task_spawned(ctx.supervisor(w, n), n)


async def mix(ctx: Context, w: int, n: int) -> None:
    """One save point of the mix: a supervisor takes twelve in a row, in MIX's order."""
    s = ctx.supervisor(w, n, per=len(MIX))
    kind = MIX[n % len(MIX)]
    m = ctx.makima
    # The phase may begin between an ask and its answer or delivery: then a state
    # change instead, and the question stays open.
    if kind == "question_asked":
        ctx.mix_open[w] = (s, await m.question_asked(s, n))
    elif kind == "question_answered":
        asked = ctx.mix_open[w]
        ctx.mix_open[w] = None
        if asked is None:
            await m.state_change(s, n)
        else:
            await m.question_answered(*asked)
            ctx.mix_answered[w] = asked
    elif kind == "answer_delivered":
        answered = ctx.mix_answered[w]
        ctx.mix_answered[w] = None
        if answered is None:
            await m.state_change(s, n)
        else:
            await m.answer_delivered(*answered)
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
    """Between question phases: answer every question asked, then mark each answer
    delivered; each timed as a line of its own (the daemon's answer path)."""

    def __init__(self) -> None:
        self.answered = Sample()
        self.delivered = Sample()

    async def __call__(self, ctx: Context, timed: bool) -> None:
        caps = [len(asked) for asked in ctx.asked]
        answered = await timed_loop(ctx, question_answered, ANSWER_PHASE_LIMIT_S, caps)
        delivered = await timed_loop(ctx, answer_delivered, ANSWER_PHASE_LIMIT_S, caps)
        for w, asked in enumerate(ctx.asked):
            del asked[: caps[w]]
        if timed:
            self.answered.add(answered)
            self.delivered.add(delivered)

    def take(self) -> tuple[Sample, Sample]:
        taken = self.answered, self.delivered
        self.answered, self.delivered = Sample(), Sample()
        return taken


class BulkBeat:
    """Concurrent mode's heartbeat: the daemon's heartbeat loop, every supervisor's
    beat in one ``Heartbeats`` (one statement), timed back to back. Each beat
    counts as a save point; its latency is the statement's."""

    name = "heartbeat"
    what = "store.beat(Heartbeats(all M beats))"

    async def run(self, ctx: Context, seconds: float, *, timed: bool) -> Sample:
        everyone = ctx.everyone()
        latencies: list[float] = []
        cpu = time.process_time()
        start = time.perf_counter()
        n = 0
        while time.perf_counter() - start < seconds:
            t0 = time.perf_counter()
            await ctx.makima.heartbeat_all(everyone, n)
            latencies.extend([time.perf_counter() - t0] * len(everyone))
            n += 1
        return Sample(latencies, time.perf_counter() - start, time.process_time() - cpu)


async def forget_tasks(ctx: Context, timed: bool) -> None:
    await ctx.makima.forget_spawned_tasks()


def makima_lines(answers: AnswerAll, *, bulk_beat: bool) -> list[Line]:
    beat: Line = (
        BulkBeat()
        if bulk_beat
        else Measured("heartbeat", "store.beat(Heartbeats(1 beat))", heartbeat)
    )
    return [
        Measured("state_change", "store.change_state(StateChange)", state_change),
        beat,
        Measured("phase_change", "store.change_phase(PhaseChange)", phase_change),
        Measured("checkpoint", "store.save_checkpoint(CheckpointSaved)", checkpoint),
        Measured("message", "store.add_message(MessageAdded)", message),
        Measured(
            "question_asked",
            "store.ask_question(QuestionAsked)",
            question_asked,
            QUESTIONS_PER_SUPERVISOR,
            answers,
        ),
        Measured(
            "task_spawned",
            "store.spawn_task(TaskSpawned)",
            task_spawned,
            TASKS_PER_SUPERVISOR,
            forget_tasks,
        ),
        Measured(
            "mix",
            "12: 4 state, 2 msg, phase, ckpt, task, ask, answer, delivered",
            mix,
            len(MIX) * TASKS_PER_SUPERVISOR,
            forget_tasks,
        ),
    ]


# Timed between question phases (AnswerAll), not lines of the plan.
ANSWER_WHAT = {
    "question_answered": "store.answer_question(QuestionAnswered)",
    "answer_delivered": "store.deliver_answers(AnswersDelivered)",
}


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
        mix_answered=[None] * workers,
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
    rounds["answer_delivered"] = []
    for line in plan:
        await line.run(ctx, args.warmup, timed=False)
    answers.take()
    for r in range(args.rounds):
        say(args, f"    round {r + 1}/{args.rounds} ...")
        shift = r % len(plan)
        for line in [*plan[shift:], *plan[:shift]]:
            rounds[line.name].append(await line.run(ctx, seconds / args.rounds, timed=True))
            if line.name == "question_asked":
                answered, delivered = answers.take()
                rounds["question_answered"].append(answered)
                rounds["answer_delivered"].append(delivered)
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
        plan: list[Line] = [floor_line, *makima_lines(answers, bulk_beat=False), *peers]
        rounds = await run_rounds(args, ctx, plan, answers, args.seconds)
    finally:
        await floor_conn.close()
    what = {line.name: line.what for line in plan} | ANSWER_WHAT
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
        plan: list[Line] = [floor_line, *makima_lines(answers, bulk_beat=True)]
        rounds = await run_rounds(args, ctx, plan, answers, args.concurrent_seconds)
    finally:
        with anyio.CancelScope(shield=True):
            await floor_pool.close()
    what = {line.name: line.what for line in plan} | ANSWER_WHAT
    return {"mode": "concurrent", "results": results(rounds, what, by="ops")}


LINE_ORDER = (
    "floor",
    "state_change",
    "heartbeat",
    "phase_change",
    "checkpoint",
    "message",
    "question_asked",
    "question_answered",
    "answer_delivered",
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
                "batch": round(s.batched / s.commits, 1) if s.commits else None,
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
    makima = await Makima.open(makima_url(target.makima), max(args.pool, 2))
    modes = []
    skipped: list[str] = []
    peers: list[ThreadLine] = []
    trips: dict[str, int] | None = None
    try:
        if args.mode in ("serial", "both"):
            if not args.no_peers:
                peers, skipped = open_peers(target.peers, args)
            for line in skipped:
                say(args, f"  {line}")
            modes.append(await serial_mode(args, target, makima, peers))
        if args.mode in ("concurrent", "both"):
            modes.append(await concurrent_mode(args, target, makima))
        if isinstance(target.makima, ConnectParams):
            say(args, "  counting round trips on the wire ...")
            trips = await count_round_trips(target.makima)
        else:
            skipped.append("round trips: counted on the embedded server only")
    finally:
        for peer in peers:
            peer.close()
        with anyio.CancelScope(shield=True):
            await makima.close()
    return {
        "bench": "savepoints",
        "modes": modes,
        "round_trips": trips,
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


# --------------------------------------------------------------------------- round trips


@dataclass
class Wire:
    """What the proxied connections said: round trips (ReadyForQuery messages)."""

    round_trips: int = 0


def _count(wire: Wire, buffer: bytearray) -> None:
    """Consume whole server messages from ``buffer``: type byte, int32 length."""
    while len(buffer) >= 5:
        length = int.from_bytes(buffer[1:5], "big")
        if len(buffer) < 1 + length:
            return
        if buffer[0:1] == b"Z":  # ReadyForQuery: once per Sync or simple Query
            wire.round_trips += 1
        del buffer[: 1 + length]


@asynccontextmanager
async def counting_proxy(server: ConnectParams) -> AsyncIterator[tuple[str, Wire]]:
    """A URL that reaches the embedded ``server`` through a Unix socket proxy
    counting round trips (as tests/integration/test_store_committer.py does)."""
    directory = Path(tempfile.mkdtemp(prefix="mkp-", dir="/tmp"))
    target = str(Path(server.host) / f".s.PGSQL.{server.port}")
    wire = Wire()

    async def pump(
        src: anyio.abc.SocketStream,
        dst: anyio.abc.SocketStream,
        done: anyio.CancelScope,
        count: bool,
    ) -> None:
        buffer = bytearray()
        try:
            async for chunk in src:
                if count:
                    buffer += chunk
                    _count(wire, buffer)  # before the client can see it
                await dst.send(chunk)
        except (anyio.BrokenResourceError, anyio.ClosedResourceError):
            pass
        done.cancel()

    async def handle(client: anyio.abc.SocketStream) -> None:
        async with (
            client,
            await anyio.connect_unix(target) as upstream,
            anyio.create_task_group() as tg,
        ):
            tg.start_soon(pump, upstream, client, tg.cancel_scope, True)
            tg.start_soon(pump, client, upstream, tg.cancel_scope, False)

    try:
        listener = await anyio.create_unix_listener(directory / f".s.PGSQL.{server.port}")
        password = f":{quote(server.password, safe='')}" if server.password else ""
        url = (
            f"postgresql://{quote(server.user, safe='')}{password}@/{server.database}"
            f"?host={directory}&port={server.port}&sslmode=disable"
        )
        async with listener, anyio.create_task_group() as tg:
            tg.start_soon(listener.serve, handle)
            try:
                yield url, wire
            finally:
                tg.cancel_scope.cancel()
    finally:
        shutil.rmtree(directory, ignore_errors=True)


async def count_round_trips(server: ConnectParams) -> dict[str, int]:
    """Each save point made twice through the counting proxy by a Makima of its own
    (a pool of one connection); the second one is counted (the first prepares the
    statement). The floor's UPSERT likewise, on a raw connection."""
    async with counting_proxy(server) as (url, wire):
        makima = await Makima.open(url, 1)
        try:
            s = await makima.create_supervisor(0)
            await makima.state_change(s, 0)
            questions = [await makima.question_asked(s, i) for i in range(2)]
            ops: dict[str, Callable[[int], Awaitable[Any]]] = {
                "state_change": lambda i: makima.state_change(s, i),
                "heartbeat": lambda i: makima.heartbeat(s, i),
                "phase_change": lambda i: makima.phase_change(s, i),
                "checkpoint": lambda i: makima.checkpoint(s, i),
                "message": lambda i: makima.message(s, i),
                "question_answered": lambda i: makima.question_answered(s, questions[i]),
                "answer_delivered": lambda i: makima.answer_delivered(s, questions[i]),
                "question_asked": lambda i: makima.question_asked(s, i),
                "task_spawned": lambda i: makima.task_spawned(s, i),
            }
            trips: dict[str, int] = {}
            for name, op in ops.items():
                await op(0)
                before = wire.round_trips
                await op(1)
                trips[name] = wire.round_trips - before
        finally:
            await makima.close()
        conn = await asyncpg.connect(url, timeout=30)
        try:
            await conn.execute(FLOOR_SQL, 0, "prepare")
            before = wire.round_trips
            await conn.execute(FLOOR_SQL, 0, "counted")
            trips["floor"] = wire.round_trips - before
        finally:
            await conn.close()
    return trips


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
        trips = data.get("round_trips") or {}
        header = (
            f"{'line':<18} {'timed call':<40} {'ops/s':>7} {'p50 ms':>7} {'p90 ms':>7} "
            f"{'p99 ms':>7} {'x':>6} {'rounds':>11} {'cpu':>4} {'rt':>3} {'batch':>6}"
        )
        print(header)
        print("-" * len(header))
        for r in mode["results"]:
            spread = f"{r['ratio_min']:.2f}-{r['ratio_max']:.2f}"
            print(
                f"{r['name']:<18} {r['operation'][:40]:<40} {r['ops_per_s']:>7.0f} "
                f"{r['p50_ms']:>7.2f} {r['p90_ms']:>7.2f} {r['p99_ms']:>7.2f} "
                f"{r['ratio']:>6.2f} {spread:>11} {r['client_cpu']:>4.0%} "
                f"{trips.get(r['name'], '') if serial else '':>3} "
                f"{'' if r['batch'] is None else format(r['batch'], '.1f'):>6}"
            )
        print()
    for line in data["skipped"]:
        print(line)
    server = data["server"]
    where = "embedded" if server["embedded"] else "URL"
    print(
        "rounds = lowest-highest of the per-round ratios, each against the same round's floor; "
        "cpu = this Python process's CPU time / wall time (100% = one core); "
        "rt = round trips of one such call alone, counted on the wire; "
        "batch = save points per group-commit round trip"
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


def makima_url(target: ConnectParams | str) -> str:
    """The URL makima's DatabaseConfig takes (the daemon's ``database_url``)."""
    return target if isinstance(target, str) else libpq_url(target)


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

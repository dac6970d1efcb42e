"""How much a makima save point costs, as a ratio to a raw asyncpg commit.

Runs, on one PostgreSQL server and in one run, with the same concurrency and
for the same time each:

- a baseline: raw asyncpg, a single-row UPSERT committed on its own
  (autocommit), keys spread over as many rows as there are supervisors;
- makima's save points, through :mod:`makima.repository`: a state change, a
  heartbeat, a question asked, a question answered and a task spawned.

Each worker owns its own share of the rows (worker ``w`` of ``C`` owns rows
``w, w + C, w + 2C, ...``), as each supervisor's save points come from its
one agent in order: the figures measure the cost of a write, not lock waits.

Without ``--database-url`` an embedded PostgreSQL is started in a fresh
temporary directory and stopped at the end. With a URL, everything is created
in a scratch schema that is dropped at the end.

    .venv/bin/python bench/savepoints.py [--seconds S] [--rounds R] [--warmup W]
        [--concurrency C] [--supervisors N] [--database-url URL]
        [--synchronous-commit on|off] [--json]

bench/README.md says what each line means and what it measured here.
"""

from __future__ import annotations

import argparse
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
from typing import Any
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

import anyio
import asyncpg
import structlog

from makima import repository
from makima.database import apply_schema, create_pool, ensure_database
from makima.embedded import ConnectParams, EmbeddedPostgres
from makima.model import PendingQuestion, SupervisorSpec, SupervisorStateEnum, TaskRecord

# At most this many pending questions per supervisor before they are answered,
# and spawned task ids per supervisor before the list is reset (outside the timed
# section): long lists would make the figures depend on how long the run is.
QUESTIONS_PER_SUPERVISOR = 4
TASKS_PER_SUPERVISOR = 32
# A phase that answers questions is bounded by their number; this is a safety net.
ANSWER_PHASE_LIMIT_S = 60.0

# The lines of the report, in order.
LINE_ORDER = (
    "baseline",
    "state_change",
    "heartbeat",
    "question_asked",
    "question_answered",
    "task_spawned",
)

BASELINE_SQL = (
    "INSERT INTO bench_kv (k, v) VALUES ($1, $2) ON CONFLICT (k) DO UPDATE SET v = EXCLUDED.v"
)


# --------------------------------------------------------------------------- samples


@dataclass
class Sample:
    """Latencies (seconds) of the operations of one or more phases and their wall time."""

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


@dataclass
class Context:
    """What every measured operation needs: the pool and each worker's rows."""

    pool: asyncpg.Pool
    concurrency: int
    owned: list[list[uuid.UUID]]  # worker -> supervisor ids it owns
    keys: list[list[int]]  # worker -> baseline keys it owns
    asked: list[list[uuid.UUID]]  # worker -> questions asked and not answered yet


Op = Callable[[Context, int, int], Awaitable[None]]  # (ctx, worker, n-th op of the worker)


# --------------------------------------------------------------------------- the timed loop


async def timed_loop(
    ctx: Context, op: Op, seconds: float, caps: Sequence[int] | None = None
) -> Sample:
    """Run ``op`` in ``ctx.concurrency`` workers until ``seconds`` pass.

    Worker ``w`` also stops after ``caps[w]`` operations. Each operation's
    latency is timed alone; the wall time runs from the start until the last
    worker has finished its last operation.
    """
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


Between = Callable[[Context, bool], Awaitable[None]]  # (ctx, timed?) run between phases


@dataclass(frozen=True)
class Measured:
    """One measured line: its operation and how its phases are bounded."""

    name: str
    what: str  # what is timed: the repository function, or the baseline
    op: Op
    # With ``per_supervisor``, a phase ends once each worker has done that many
    # operations per supervisor it owns; ``between`` then runs, outside the
    # measured time, before the next phase.
    per_supervisor: int | None = None
    between: Between | None = None


async def run_phases(ctx: Context, line: Measured, seconds: float, *, timed: bool) -> Sample:
    """Run ``line`` for ``seconds`` of measured wall time in total."""
    caps: list[int] | None = None
    if line.per_supervisor is not None:
        caps = [line.per_supervisor * len(owned) for owned in ctx.owned]
    total = Sample()
    while total.elapsed < seconds:
        total.add(await timed_loop(ctx, line.op, seconds - total.elapsed, caps))
        if line.between is not None:
            await line.between(ctx, timed)
    return total


# --------------------------------------------------------------------------- the operations


async def baseline_upsert(ctx: Context, w: int, n: int) -> None:
    keys = ctx.keys[w]
    await ctx.pool.execute(BASELINE_SQL, keys[n % len(keys)], f"step {n}")


async def state_change(ctx: Context, w: int, n: int) -> None:
    supervisor_id = ctx.owned[w][n % len(ctx.owned[w])]
    await repository.update_supervisor_detailed_state(
        ctx.pool, supervisor_id, SupervisorStateEnum.WORKING, f"step {n}", n % 101
    )


async def heartbeat(ctx: Context, w: int, n: int) -> None:
    supervisor_id = ctx.owned[w][n % len(ctx.owned[w])]
    await repository.update_supervisor_heartbeat_state(
        ctx.pool, supervisor_id, SupervisorStateEnum.WORKING, f"step {n}", n % 101
    )


async def question_asked(ctx: Context, w: int, n: int) -> None:
    supervisor_id = ctx.owned[w][n % len(ctx.owned[w])]
    question = PendingQuestion(
        id=uuid.uuid4(),
        question=f"Deploy build {n} to staging?",
        choices=("yes", "no"),
        context="The tests passed on the last commit.",
    )
    await repository.record_question_asked(
        ctx.pool, supervisor_id, question, SupervisorStateEnum.WAITING_FOR_USER
    )
    ctx.asked[w].append(question.id)


async def question_answered(ctx: Context, w: int, n: int) -> None:
    # As the supervisor does: the answer also moves it back to work.
    await repository.answer_question(
        ctx.pool, ctx.asked[w][n], "yes", 1000, state=SupervisorStateEnum.WORKING
    )


async def task_spawned(ctx: Context, w: int, n: int) -> None:
    supervisor_id = ctx.owned[w][n % len(ctx.owned[w])]
    task = TaskRecord(
        task_id=uuid.uuid4(),
        supervisor_id=supervisor_id,
        name=f"test-{n}",
        command=("pytest", "-q", "tests/unit"),
    )
    await repository.create_task(ctx.pool, task)


# --------------------------------------------------------------------------- between phases


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


async def reset_spawned_task_ids(ctx: Context, timed: bool) -> None:
    """Between task phases: empty the supervisors' task lists (the task rows stay)."""
    await ctx.pool.execute("UPDATE supervisor_states SET spawned_task_ids = ARRAY[]::uuid[]")


# --------------------------------------------------------------------------- the run


def say(args: argparse.Namespace, text: str) -> None:
    if not args.json:
        print(text, file=sys.stderr, flush=True)


async def server_facts(pool: asyncpg.Pool) -> dict[str, str]:
    names = ("server_version", "fsync", "synchronous_commit", "wal_sync_method", "shared_buffers")
    row = await pool.fetchrow(
        "SELECT " + ", ".join(f"current_setting('{n}') AS {n}" for n in names)
    )
    assert row is not None
    return dict(row.items())


async def make_context(args: argparse.Namespace, pool: asyncpg.Pool) -> Context:
    """The baseline's table and the supervisors, shared out among the workers."""
    c, n = args.concurrency, args.supervisors
    await pool.execute("CREATE TABLE IF NOT EXISTS bench_kv (k integer PRIMARY KEY, v text)")
    supervisor_ids = []
    for i in range(n):
        spec = SupervisorSpec.new(f"bench-{i}", ["true"], goal="benchmark save points")
        await repository.create_supervisor(pool, spec)
        supervisor_ids.append(spec.supervisor_id)
    return Context(
        pool=pool,
        concurrency=c,
        owned=[supervisor_ids[w::c] for w in range(c)],
        keys=[list(range(n))[w::c] for w in range(c)],
        asked=[[] for _ in range(c)],
    )


async def bench(args: argparse.Namespace, target: ConnectParams | str) -> dict[str, Any]:
    """Every measurement on one pool, interleaved in rounds; returns the report."""
    pool = await create_pool(target, min_size=args.concurrency, max_size=args.concurrency)
    try:
        await apply_schema(pool)
        ctx = await make_context(args, pool)
        facts = await server_facts(pool)
        say(
            args,
            f"PostgreSQL {facts['server_version']}, {args.supervisors} supervisors, "
            f"concurrency {args.concurrency}",
        )
        answers = AnswerAll()
        plan = [
            Measured("baseline", "raw asyncpg upsert, autocommit", baseline_upsert),
            Measured("state_change", "update_supervisor_detailed_state", state_change),
            Measured("heartbeat", "update_supervisor_heartbeat_state", heartbeat),
            Measured(
                "question_asked",
                "record_question_asked",
                question_asked,
                QUESTIONS_PER_SUPERVISOR,
                answers,
            ),
            Measured(
                "task_spawned",
                "create_task",
                task_spawned,
                TASKS_PER_SUPERVISOR,
                reset_spawned_task_ids,
            ),
        ]
        what = {line.name: line.what for line in plan} | {"question_answered": "answer_question"}
        rounds: dict[str, list[Sample]] = {name: [] for name in LINE_ORDER}

        say(args, f"  warming up ({args.warmup:g} s per line) ...")
        for line in plan:
            await run_phases(ctx, line, args.warmup, timed=False)
        # Every line gets a slice of every round, next to a slice of the baseline,
        # so a disturbance (a slow disk, a noisy neighbour) hits all lines alike.
        for r in range(args.rounds):
            say(args, f"  round {r + 1}/{args.rounds} ...")
            shift = r % len(plan)
            for line in plan[shift:] + plan[:shift]:
                sample = await run_phases(ctx, line, args.seconds / args.rounds, timed=True)
                rounds[line.name].append(sample)
                if line.between is answers:
                    rounds["question_answered"].append(answers.take())
    finally:
        with anyio.CancelScope(shield=True), anyio.move_on_after(10) as scope:
            await pool.close()
        if scope.cancelled_caught:
            pool.terminate()
    return report(args, facts, what, rounds)


def merged(samples: Sequence[Sample]) -> Sample:
    total = Sample()
    for sample in samples:
        total.add(sample)
    return total


def report(
    args: argparse.Namespace,
    facts: dict[str, str],
    what: dict[str, str],
    rounds: dict[str, list[Sample]],
) -> dict[str, Any]:
    base_rounds = rounds["baseline"]
    base = merged(base_rounds)
    results = []
    for name in LINE_ORDER:
        s = merged(rounds[name])
        # Each round's ratio against the baseline measured in the same round.
        per_round = [
            r.ops_per_s / b.ops_per_s for r, b in zip(rounds[name], base_rounds, strict=True)
        ]
        results.append(
            {
                "name": name,
                "operation": what[name],
                "ops": s.ops,
                "seconds": round(s.elapsed, 3),
                "ops_per_s": round(s.ops_per_s, 1),
                "p50_ms": round(s.percentile_ms(50), 3),
                "p95_ms": round(s.percentile_ms(95), 3),
                "p99_ms": round(s.percentile_ms(99), 3),
                "max_ms": round(max(s.latencies, default=0.0) * 1000, 3),
                "throughput_ratio": round(s.ops_per_s / base.ops_per_s, 3),
                "throughput_ratio_min": round(min(per_round), 3),
                "throughput_ratio_max": round(max(per_round), 3),
                "latency_ratio": round(s.percentile_ms(50) / base.percentile_ms(50), 3),
                "client_cpu": round(s.cpu / s.elapsed, 2) if s.elapsed > 0 else 0.0,
            }
        )
    return {
        "bench": "savepoints",
        "concurrency": args.concurrency,
        "supervisors": args.supervisors,
        "seconds": args.seconds,
        "rounds": args.rounds,
        "warmup": args.warmup,
        "server": {"embedded": not args.database_url, **facts},
        "results": results,
    }


def print_table(data: dict[str, Any]) -> None:
    header = (
        f"{'line':<18} {'timed call':<34} {'ops/s':>6} {'p50 ms':>7} {'p95 ms':>7} "
        f"{'p99 ms':>7} {'x tput':>6} {'rounds':>9} {'x p50':>6} {'cpu':>4}"
    )
    print(header)
    print("-" * len(header))
    for r in data["results"]:
        spread = f"{r['throughput_ratio_min']:.2f}-{r['throughput_ratio_max']:.2f}"
        print(
            f"{r['name']:<18} {r['operation']:<34} {r['ops_per_s']:>6.0f} {r['p50_ms']:>7.2f} "
            f"{r['p95_ms']:>7.2f} {r['p99_ms']:>7.2f} {r['throughput_ratio']:>6.2f} "
            f"{spread:>9} {r['latency_ratio']:>6.2f} {r['client_cpu']:>4.0%}"
        )
    server = data["server"]
    where = "embedded" if server["embedded"] else "URL"
    print(
        "\nx tput = ops/s / baseline ops/s (rounds: lowest-highest of the per-round ratios); "
        "x p50 = p50 / baseline p50;\ncpu = this Python process's CPU time / wall time "
        "(100% = one core)"
    )
    print(
        f"PostgreSQL {server['server_version']} ({where}): fsync={server['fsync']}, "
        f"synchronous_commit={server['synchronous_commit']}, "
        f"wal_sync_method={server['wal_sync_method']}"
    )
    print(
        f"concurrency {data['concurrency']}, {data['supervisors']} supervisors, "
        f"{data['seconds']:g} s per line in {data['rounds']} rounds after "
        f"{data['warmup']:g} s warm-up; the whole run took {data['run_seconds']:g} s"
    )
    host = data["host"]
    print(
        f"{host['cpus']} CPUs; load average before the run: "
        + " ".join(f"{x:.2f}" for x in host["loadavg_before"])
    )


# --------------------------------------------------------------------------- databases


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
            return anyio.run(bench, args, params)
        finally:
            server.stop()
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


async def run_with_url(args: argparse.Namespace) -> dict[str, Any]:
    """Bench in a scratch schema of the given database, dropped at the end."""
    schema = f"makima_bench_{uuid.uuid4().hex[:12]}"
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
            return await bench(args, url)
        finally:
            with anyio.CancelScope(shield=True):
                await admin.execute(f"DROP SCHEMA {schema} CASCADE")
    finally:
        with anyio.CancelScope(shield=True):
            await admin.close()


# --------------------------------------------------------------------------- main


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=5.0, help="measured time per line")
    parser.add_argument("--rounds", type=int, default=5, help="interleaved rounds (see README)")
    parser.add_argument("--warmup", type=float, default=0.5, help="discarded time per line, once")
    parser.add_argument("--concurrency", type=int, default=8, help="concurrent workers")
    parser.add_argument("--supervisors", type=int, default=64, help="supervisors (and rows)")
    parser.add_argument("--database-url", help="bench this server instead of an embedded one")
    parser.add_argument(
        "--synchronous-commit",
        choices=("on", "off"),
        help="override the server's synchronous_commit for the bench's sessions",
    )
    parser.add_argument("--json", action="store_true", help="print only the JSON line")
    args = parser.parse_args(argv)
    if not 0 < args.seconds <= 600:
        parser.error("--seconds must be in (0, 600]")
    if not 1 <= args.rounds <= 100 or args.seconds / args.rounds < 0.05:
        parser.error("--rounds must be in [1, 100], with at least 0.05 s per round")
    if not 0 <= args.warmup <= 60:
        parser.error("--warmup must be in [0, 60]")
    if not 1 <= args.concurrency <= 100:
        parser.error("--concurrency must be in [1, 100]")
    if args.supervisors < args.concurrency:
        parser.error("--supervisors must be at least --concurrency (each worker owns its own)")
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

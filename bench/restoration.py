"""How long a real daemon takes to come back over N unfinished supervisors.

For each N, on a fresh state directory with its embedded PostgreSQL:

1. a daemon starts over an empty database (the baseline: its RSS, threads and
   fds with 0 supervisors), and one supervisor is created through it; its
   agent asks one question; the daemon is then killed (SIGKILL), as in a crash;
2. that supervisor's rows (spec, state, open question: exactly what makima
   saved) are cloned N - 1 times in a few set-based statements, every clone
   with its own ids, and every agent command set to ``bench/agents/idle_agent.sh``
   (reads its start message, reports it on a FIFO, waits on stdin);
3. a fresh daemon (``python -m makima daemon``) is started and timed, from
   its spawn: READY=1 on a notification socket the bench owns; every question
   listed by ``question.list`` on the control socket; every question
   re-delivered (``redelivery_count`` bumped in the database); every agent
   holding its start message (its line on the FIFO). Then its RSS, threads
   and fds are read from /proc;
4. the daemon is stopped (SIGTERM) and the directory removed.

    .venv/bin/python bench/restoration.py [--n N [N ...]] [--timeout S] [--json]

bench/README.md says what each column means and what it measured here.
"""

from __future__ import annotations

import argparse
import contextlib
import errno
import json
import logging
import os
import resource
import shutil
import signal
import stat
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from dataclasses import asdict, dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

import anyio
import anyio.abc
import asyncpg
import structlog
from anyio.streams.buffered import BufferedByteReceiveStream

from makima.control.client import ControlClient
from makima.control.codec import MAX_LINE
from makima.embedded import EmbeddedPostgres

AGENT = Path(__file__).resolve().parent / "agents" / "idle_agent.sh"
SHELL = "/bin/sh"
POLL_S = 0.02  # how often the database and question.list are polled (a bench may wait)
# Tables whose rows the cloning knows how to copy (the rest must be empty).
CLONED = ("supervisors", "supervisor_states", "questions")


class BenchError(Exception):
    """The bench could not run (not a slow result)."""


def say(args: argparse.Namespace, text: str) -> None:
    if not args.json:
        print(text, file=sys.stderr, flush=True)


# --------------------------------------------------------------------------- /proc


@dataclass
class ProcFacts:
    rss_kb: int
    threads: int
    fds: int
    cpu_s: float


def proc_facts(pid: int) -> ProcFacts:
    fields = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        key, _, value = line.partition(":")
        fields[key] = value.split()
    ticks = os.sysconf("SC_CLK_TCK")
    # Fields after the command name (which may hold spaces): utime and stime are 14 and 15.
    stat_fields = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()
    return ProcFacts(
        rss_kb=int(fields["VmRSS"][0]),
        threads=int(fields["Threads"][0]),
        fds=len(os.listdir(f"/proc/{pid}/fd")),
        cpu_s=(int(stat_fields[11]) + int(stat_fields[12])) / ticks,
    )


# --------------------------------------------------------------------------- the control socket


async def rpc(path: Path, method: str, params: dict[str, Any] | None = None) -> tuple[Any, int]:
    """One makima-control/1 call on its own connection; the result and the reply's size.

    Not :class:`ControlClient`: its replies are capped at ``MAX_LINE`` (1 MiB), and
    ``question.list`` or ``daemon.status`` over thousands of supervisors go past it.
    The bench reports how far past.
    """
    request: dict[str, Any] = {"jsonrpc": "2.0", "id": 1, "method": method}
    if params:
        request["params"] = params
    async with await anyio.connect_unix(path) as stream:
        await stream.send(json.dumps(request).encode() + b"\n")
        line = await BufferedByteReceiveStream(stream).receive_until(b"\n", 1 << 30)
    reply = json.loads(line)
    if "error" in reply:
        raise BenchError(f"{method} failed: {reply['error']}")
    return reply["result"], len(line)


# --------------------------------------------------------------------------- the agents' FIFO


class Started:
    """Reads the agents' FIFO: when each supervisor's agent first had its start message."""

    def __init__(self, path: Path) -> None:
        self.path = path
        os.mkfifo(path, 0o622)
        os.chmod(path, 0o622)  # agents may run as another user; the umask must not stop them
        # Read and write: never EOF while no agent has it open, and opening never blocks.
        self.fd = os.open(path, os.O_RDWR | os.O_NONBLOCK)
        self.first: dict[str, float] = {}
        self.lines = 0
        self.target = 0
        self.reached = anyio.Event()

    def expect(self, count: int) -> None:
        self.first.clear()
        self.lines = 0
        self.target = count
        self.reached = anyio.Event()

    async def run(self) -> None:
        pending = b""
        while True:
            await anyio.wait_readable(self.fd)
            now = time.perf_counter()
            try:
                data = os.read(self.fd, 1 << 16)
            except BlockingIOError:
                continue
            pending += data
            *lines, pending = pending.split(b"\n")
            for line in lines:
                self.lines += 1
                self.first.setdefault(line.decode(), now)
            if self.target and len(self.first) >= self.target:
                self.reached.set()

    def close(self) -> None:
        os.close(self.fd)


# --------------------------------------------------------------------------- a daemon


class Daemon:
    """``python -m makima daemon`` on a state directory, READY=1 through our socket."""

    def __init__(self, tmp: Path, state_dir: Path, args: argparse.Namespace) -> None:
        self.tmp = tmp
        self.state_dir = state_dir
        self.socket = tmp / "makima.sock"
        self.log = tmp / "daemon.log"
        self.args = args
        self.starts = 0
        self.process: anyio.abc.Process | None = None
        self.spawned_at = 0.0  # perf_counter
        self.spawned_wall = 0.0  # time.time, to compare with the daemon's log
        self.ready_at = 0.0

    @property
    def pid(self) -> int:
        assert self.process is not None
        return self.process.pid

    def environment(self, notify: Path) -> dict[str, str]:
        env = {
            k: v
            for k, v in os.environ.items()
            if not k.startswith(("MAKIMA_", "LISTEN_", "NOTIFY_", "WATCHDOG_"))
        }
        env.update(
            MAKIMA_STATE_DIR=str(self.state_dir),
            MAKIMA_SOCKET=str(self.socket),
            MAKIMA_LOG_LEVEL=self.args.log_level,
            NOTIFY_SOCKET=str(notify),
        )
        return env

    async def start(self) -> None:
        """Spawn it and wait for READY=1 (a daemon that exits first is an error)."""
        self.starts += 1
        notify_path = self.tmp / f"notify-{self.starts}.sock"
        async with await anyio.create_unix_datagram_socket(local_path=notify_path) as notify:
            with self.log.open("ab") as log:
                self.spawned_wall = time.time()
                self.spawned_at = time.perf_counter()
                self.process = await anyio.open_process(
                    [sys.executable, "-m", "makima", "daemon"],
                    stdin=subprocess.DEVNULL,
                    stdout=log,
                    stderr=log,
                    env=self.environment(notify_path),
                )
            process = self.process
            ready = False
            async with anyio.create_task_group() as tg:

                async def exited() -> None:
                    await process.wait()
                    tg.cancel_scope.cancel()

                tg.start_soon(exited)
                with anyio.move_on_after(self.args.timeout):
                    while not ready:
                        data, _ = await notify.receive()
                        ready = "READY=1" in data.decode().split("\n")
                self.ready_at = time.perf_counter()
                tg.cancel_scope.cancel()
        if not ready:
            how = "exited" if process.returncode is not None else "did not become ready"
            raise BenchError(f"the daemon {how}; see {self.log}")

    async def stop(self, how: signal.Signals) -> None:
        if self.process is None:
            return
        process, self.process = self.process, None
        if process.returncode is None:
            process.send_signal(how)
        with anyio.move_on_after(self.args.timeout) as scope:
            await process.wait()
        if scope.cancelled_caught:
            process.kill()
            await process.wait()
        await process.aclose()

    def log_times(self, event: str) -> list[float]:
        """Wall-clock times of ``event`` in the daemon's JSON log since the last start."""
        times = []
        with self.log.open(encoding="utf-8", errors="replace") as log:
            for line in log:
                if event not in line or not line.startswith("{"):
                    continue
                with contextlib.suppress(ValueError, KeyError, TypeError):
                    entry = json.loads(line)
                    if entry.get("event") == event:
                        stamp = datetime.fromisoformat(entry["timestamp"]).timestamp()
                        if stamp >= self.spawned_wall:
                            times.append(stamp)
        return times


# --------------------------------------------------------------------------- the supervisors


def agent_command(fifo: Path, *, ask: bool = False) -> list[str]:
    return [SHELL, str(AGENT), str(fifo), *(["ask"] if ask else [])]


async def create_template(daemon: Daemon, fifo: Path, limit: float) -> None:
    """One supervisor, through the daemon, whose agent asks its question."""
    async with (
        ControlClient.connect(daemon.socket, timeout=limit) as client,
        client.events(["question.asked"]) as events,
    ):
        await client.call(
            "supervisor.create",
            {
                "name": "bench",
                "goal": "wait for a person's answer",
                "command": agent_command(fifo, ask=True),
            },
        )
        with anyio.fail_after(limit):
            async for _ in events:
                return
    raise BenchError(f"the template supervisor asked no question; see {daemon.log}")


def ident(name: str) -> str:
    return '"' + name.replace('"', '""') + '"'


async def table_columns(conn: asyncpg.Connection, table: str) -> list[str]:
    rows = await conn.fetch(
        "SELECT attname FROM pg_attribute WHERE attrelid = $1::regclass "
        "AND attnum > 0 AND NOT attisdropped ORDER BY attnum",
        table,
    )
    return [r["attname"] for r in rows]


async def clone(conn: asyncpg.Connection, table: str, where: str, overrides: dict[str, str]) -> int:
    """Copy the template's rows of ``table`` once per row of ``bench_clones`` (alias
    ``c``; the template row is ``t``), with ``overrides`` as column expressions.
    Every other column is copied as it is, so columns added later come along."""
    columns = await table_columns(conn, table)
    exprs = [overrides.get(c, f"t.{ident(c)}") for c in columns]
    status = await conn.execute(
        f"INSERT INTO {ident(table)} ({', '.join(map(ident, columns))}) "
        f"SELECT {', '.join(exprs)} FROM {ident(table)} t CROSS JOIN bench_clones c "
        f"WHERE {where}"
    )
    return int(status.split()[-1])


async def check_template(conn: asyncpg.Connection) -> tuple[uuid.UUID, uuid.UUID]:
    """The template's ids, after checking it holds only what the cloning copies."""
    sid = await conn.fetchval("SELECT supervisor_id FROM supervisors")
    qid = await conn.fetchval("SELECT question_id FROM questions")
    state = await conn.fetchrow(
        "SELECT state, jsonb_array_length(pending_questions) AS n FROM supervisor_states"
    )
    if sid is None or qid is None or state is None or state["n"] != 1:
        raise BenchError("the template supervisor has no open question")
    tables = await conn.fetch(
        "SELECT table_name FROM information_schema.columns "
        "WHERE table_schema = current_schema() AND column_name = 'supervisor_id' "
        "AND table_name <> ALL($1::text[])",
        list(CLONED),
    )
    for row in tables:
        count = await conn.fetchval(f"SELECT count(*) FROM {ident(row['table_name'])}")
        if count:
            raise BenchError(
                f"the template supervisor wrote {count} rows in {row['table_name']}, "
                "which the bench does not clone: teach bench/restoration.py about them"
            )
    return sid, qid


async def populate(conn: asyncpg.Connection, n: int, fifo: Path) -> None:
    """N supervisors, each waiting for the answer to one open question."""
    sid, qid = await check_template(conn)
    command = agent_command(fifo)
    async with conn.transaction():
        await conn.execute(
            "UPDATE supervisors SET agent_command = $2 WHERE supervisor_id = $1", sid, command
        )
        await conn.execute(
            "CREATE TEMP TABLE bench_clones ON COMMIT DROP AS "
            "SELECT n, gen_random_uuid() AS sid, gen_random_uuid() AS qid "
            "FROM generate_series(1, $1::int) AS n",
            n - 1,
        )
        same = f"t.supervisor_id = '{sid}'"
        await clone(
            conn,
            "supervisors",
            same,
            {"supervisor_id": "c.sid", "name": "t.name || '-' || c.n"},
        )
        await clone(
            conn,
            "supervisor_states",
            same,
            {
                "supervisor_id": "c.sid",
                "pending_questions": "jsonb_set(t.pending_questions, '{0,id}', "
                "to_jsonb(c.qid::text))",
            },
        )
        await clone(
            conn,
            "questions",
            f"t.question_id = '{qid}'",
            {"question_id": "c.qid", "supervisor_id": "c.sid"},
        )
    await conn.execute("ANALYZE")
    await conn.execute("CHECKPOINT")  # the timed start does not pay for this load's writes
    counts = await conn.fetchrow(
        "SELECT (SELECT count(*) FROM supervisors) AS s, "
        "(SELECT count(*) FROM questions WHERE answer IS NULL) AS q, "
        "(SELECT count(*) FROM supervisor_states WHERE state = 'waiting_for_user') AS w"
    )
    assert counts is not None
    if not counts["s"] == counts["q"] == counts["w"] == n:
        raise BenchError(f"populating gave {dict(counts)}, not {n} of each")


# --------------------------------------------------------------------------- one N


@dataclass
class Result:
    n: int
    baseline: ProcFacts
    baseline_ready_s: float
    ready_s: float = 0.0
    listed_s: float = 0.0
    redelivered_s: float = 0.0
    agents_s: float = 0.0
    spawn_ms_per_agent: float | None = None
    spawn_span_s: float | None = None
    facts: ProcFacts | None = None
    list_bytes: int = 0
    status_bytes: int = 0
    running_agents: int = 0
    startup_counts: dict[str, int] = field(default_factory=dict)
    setup_s: float = 0.0
    stop_s: float = 0.0

    @property
    def rss_per_supervisor_kb(self) -> float:
        assert self.facts is not None
        return (self.facts.rss_kb - self.baseline.rss_kb) / self.n

    def to_json(self) -> dict[str, Any]:
        data = asdict(self)
        data["rss_per_supervisor_kb"] = round(self.rss_per_supervisor_kb, 2)
        for key, value in data.items():
            if isinstance(value, float):
                data[key] = round(value, 4)
        return data


FDS_PER_AGENT = 4  # the daemon's end of the agent's 3 pipes, and its pidfd
FDS_SPARE = 512  # the pool, the control socket, the log, the start-up's own


def raise_fd_limit(n: int) -> int:
    """Raise this process's open-files limit (the daemon inherits it) to what N
    agents need; the limit reached. Past the hard limit only CAP_SYS_RESOURCE helps."""
    want = FDS_PER_AGENT * n + FDS_SPARE
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft >= want:
        return soft
    with contextlib.suppress(ValueError, OSError):
        resource.setrlimit(resource.RLIMIT_NOFILE, (want, max(hard, want)))
        return want
    if hard != resource.RLIM_INFINITY and hard < want:
        raise BenchError(
            f"N = {n} needs about {want} open files in the daemon ({FDS_PER_AGENT} per agent: "
            f"3 pipes and a pidfd); the hard limit here is {hard} and cannot be raised "
            "(no CAP_SYS_RESOURCE): raise it (ulimit -Hn, LimitNOFILE=) or use a smaller --n"
        )
    resource.setrlimit(resource.RLIMIT_NOFILE, (want, hard))
    return want


async def poll_redelivered(conn: asyncpg.Connection, n: int) -> float:
    while True:
        count = await conn.fetchval("SELECT count(*) FROM questions WHERE redelivery_count > 0")
        if count >= n:
            return time.perf_counter()
        await anyio.sleep(POLL_S)


async def poll_listed(daemon: Daemon, n: int) -> tuple[float, int]:
    while True:
        result, size = await rpc(daemon.socket, "question.list")
        # One reply holds the oldest questions that fit in a line and counts the rest.
        if len(result["questions"]) + int(result.get("omitted", 0)) >= n:
            return time.perf_counter(), size
        await anyio.sleep(POLL_S)


def make_scratch() -> Path:
    """A fresh short directory (AF_UNIX paths are short)."""
    tmp = Path(tempfile.mkdtemp(prefix="mkr-", dir="/tmp"))
    if os.geteuid() == 0:
        tmp.chmod(0o711)  # as root, the embedded server runs as another account
    (tmp / "state").mkdir(mode=0o700)
    return tmp


@asynccontextmanager
async def scratch(args: argparse.Namespace) -> AsyncIterator[Path]:
    tmp = make_scratch()
    try:
        yield tmp
    finally:
        with anyio.CancelScope(shield=True):
            await anyio.to_thread.run_sync(stop_embedded, tmp / "state")
        if args.keep:
            print(f"kept {tmp}", file=sys.stderr)
        else:
            shutil.rmtree(tmp, ignore_errors=True)


def stop_embedded(state_dir: Path) -> None:
    if (state_dir / "pgdata").exists():
        with contextlib.suppress(Exception):
            EmbeddedPostgres(state_dir).stop()


async def bench_one(args: argparse.Namespace, n: int) -> Result:
    async with scratch(args) as tmp:
        state_dir = tmp / "state"
        started = Started(tmp / "started.fifo")
        daemon = Daemon(tmp, state_dir, args)
        try:
            async with anyio.create_task_group() as tg:
                tg.start_soon(started.run)
                try:
                    result = await measure(args, n, daemon, started)
                finally:
                    with anyio.CancelScope(shield=True):
                        t = time.perf_counter()
                        await daemon.stop(signal.SIGTERM)
                        stop_s = time.perf_counter() - t
                tg.cancel_scope.cancel()
        finally:
            started.close()
        result.stop_s = stop_s
        return result


async def measure(args: argparse.Namespace, n: int, daemon: Daemon, started: Started) -> Result:
    say(args, f"N = {n}: baseline daemon, template supervisor ...")
    t_setup = time.perf_counter()
    started.expect(1)
    # The first start makes the database; the second is the baseline: a restart
    # over 0 supervisors, with the embedded server already up (as in every timed start).
    await daemon.start()
    await daemon.stop(signal.SIGKILL)
    await daemon.start()
    result = Result(n, proc_facts(daemon.pid), baseline_ready_s=daemon.ready_at - daemon.spawned_at)
    await create_template(daemon, started.path, args.timeout)
    await daemon.stop(signal.SIGKILL)  # a crash: the embedded server stays up

    params = await anyio.to_thread.run_sync(EmbeddedPostgres(daemon.state_dir).start)
    conn = await asyncpg.connect(**params.asyncpg_kwargs(), timeout=30)
    try:
        say(args, f"N = {n}: cloning the template into {n} supervisors ...")
        await populate(conn, n, started.path)
        limit = raise_fd_limit(n)
        result.setup_s = time.perf_counter() - t_setup
        say(args, f"N = {n}: timed start (fd limit {limit}) ...")
        started.expect(n)
        with anyio.fail_after(args.timeout):
            async with anyio.create_task_group() as tg:
                redelivered: list[float] = []

                async def watch_db() -> None:
                    redelivered.append(await poll_redelivered(conn, n))

                tg.start_soon(watch_db)
                await daemon.start()
                listed_at, result.list_bytes = await poll_listed(daemon, n)
                await started.reached.wait()
        agents_at = max(started.first.values())
        facts = proc_facts(daemon.pid)
    finally:
        await conn.close()
    status, result.status_bytes = await rpc(daemon.socket, "daemon.status")
    t0 = daemon.spawned_at
    result.ready_s = daemon.ready_at - t0
    result.listed_s = listed_at - t0
    result.redelivered_s = redelivered[0] - t0
    result.agents_s = agents_at - t0
    result.facts = facts
    result.running_agents = status["running_agents"]
    result.startup_counts = (status.get("last_startup_report") or {}).get("counts", {})
    spawns = sorted(daemon.log_times("agent.started"))
    if len(spawns) >= 2:
        result.spawn_span_s = spawns[-1] - spawns[0]
        result.spawn_ms_per_agent = result.spawn_span_s / (len(spawns) - 1) * 1000
    return result


# --------------------------------------------------------------------------- report


def growth(results: Sequence[Result]) -> list[dict[str, Any]]:
    """Each later N against each smaller one: time ratio per N ratio."""
    out = []
    for i, small in enumerate(results):
        for big in results[i + 1 :]:
            out.append(
                {
                    "from": small.n,
                    "to": big.n,
                    "n_ratio": round(big.n / small.n, 2),
                    **{
                        key: round(getattr(big, key) / getattr(small, key), 2)
                        for key in ("ready_s", "listed_s", "redelivered_s", "agents_s")
                    },
                    "rss_per_supervisor_kb": round(
                        big.rss_per_supervisor_kb / small.rss_per_supervisor_kb, 2
                    ),
                }
            )
    return out


def print_table(data: dict[str, Any]) -> None:
    header = (
        f"{'N':>6} {'ready s':>8} {'listed s':>9} {'redeliv s':>9} {'agents s':>9} "
        f"{'spawn ms':>9} {'KB/sup':>7} {'threads':>7} {'fds':>6} {'cpu s':>6} {'list MB':>7}"
    )
    print(header)
    print("-" * len(header))
    for r in data["results"]:
        facts = r["facts"]
        spawn = "-" if r["spawn_ms_per_agent"] is None else f"{r['spawn_ms_per_agent']:.2f}"
        print(
            f"{'0':>6} {r['baseline_ready_s']:>8.2f} {'':>9} {'':>9} {'':>9} {'':>9} "
            f"{'':>7} {r['baseline']['threads']:>7} {r['baseline']['fds']:>6} "
            f"{r['baseline']['cpu_s']:>6.2f}"
        )
        print(
            f"{r['n']:>6} {r['ready_s']:>8.2f} {r['listed_s']:>9.2f} {r['redelivered_s']:>9.2f} "
            f"{r['agents_s']:>9.2f} {spawn:>9} {r['rss_per_supervisor_kb']:>7.1f} "
            f"{facts['threads']:>7} {facts['fds']:>6} {facts['cpu_s']:>6.2f} "
            f"{r['list_bytes'] / 1e6:>7.2f}"
        )
    for g in data["growth"]:
        print(
            f"growth {g['from']} -> {g['to']} (x{g['n_ratio']:g} N): ready x{g['ready_s']}, "
            f"listed x{g['listed_s']}, re-delivered x{g['redelivered_s']}, "
            f"agents x{g['agents_s']}, RSS per supervisor x{g['rss_per_supervisor_kb']}"
        )
    print(
        "\ntimes in seconds from the daemon's spawn; the N = 0 line is the baseline daemon "
        "(empty database)\nspawn ms = the daemon's agent.started log span / (N - 1); KB/sup = "
        "(VmRSS - baseline VmRSS) / N;\ncpu s = the daemon's CPU time; list MB = the "
        f"question.list reply (the makima client reads at most {MAX_LINE / 1e6:.2f} MB)"
    )
    for r in data["results"]:
        if r["list_bytes"] > MAX_LINE or r["status_bytes"] > MAX_LINE:
            print(
                f"N = {r['n']}: question.list ({r['list_bytes']} B) or daemon.status "
                f"({r['status_bytes']} B) is over the control client's {MAX_LINE} B line "
                "limit: `makima questions` / `makima status` cannot read it"
            )
    host = data["host"]
    print(
        f"{host['cpus']} CPUs, Python {host['python']}; load average before the run: "
        + " ".join(f"{x:.2f}" for x in host["loadavg_before"])
    )


# --------------------------------------------------------------------------- main


async def run(args: argparse.Namespace) -> list[Result]:
    raise_fd_limit(max(args.n))  # before any work: a daemon out of fds would hang
    results = []
    for n in args.n:
        result = await bench_one(args, n)
        say(
            args,
            f"N = {n}: ready {result.ready_s:.2f} s, all agents started {result.agents_s:.2f} s "
            f"(set-up {result.setup_s:.1f} s, stop {result.stop_s:.1f} s)",
        )
        results.append(result)
    return results


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--n", type=int, nargs="+", default=[1000, 5000], help="supervisors (several: one run each)"
    )
    parser.add_argument("--timeout", type=float, default=600.0, help="bound on each phase, s")
    parser.add_argument("--log-level", default="info", help="the daemon's MAKIMA_LOG_LEVEL")
    parser.add_argument("--keep", action="store_true", help="keep the scratch directories")
    parser.add_argument("--json", action="store_true", help="print only the JSON line")
    args = parser.parse_args(argv)
    if any(n < 1 for n in args.n):
        parser.error("--n must be at least 1")
    if not AGENT.exists() or not stat.S_ISREG(AGENT.stat().st_mode):
        parser.error(f"the bench agent {AGENT} is missing")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    # makima logs through structlog (the embedded server's reuse, say); keep stdout for results.
    structlog.configure(
        wrapper_class=structlog.make_filtering_bound_logger(logging.WARNING),
        logger_factory=structlog.PrintLoggerFactory(file=sys.stderr),
    )
    load_before = os.getloadavg()
    started = time.perf_counter()
    try:
        results = anyio.run(run, args)
    except KeyboardInterrupt:
        print("interrupted; the scratch directories were removed", file=sys.stderr)
        return 130
    except BenchError as exc:
        print(f"bench failed: {exc}", file=sys.stderr)
        return 1
    except OSError as exc:
        if exc.errno != errno.EMFILE:
            raise
        print(f"bench failed: {exc}: raise the open-files limit", file=sys.stderr)
        return 1
    data = {
        "bench": "restoration",
        "results": [r.to_json() for r in results],
        "growth": growth(results),
        "run_seconds": round(time.perf_counter() - started, 1),
        "host": {
            "cpus": os.cpu_count(),
            "python": sys.version.split()[0],
            "loadavg_before": [round(x, 2) for x in load_before],
        },
    }
    if not args.json:
        print_table(data)
        print()
    print(json.dumps(data, separators=(",", ":")))
    return 0


if __name__ == "__main__":
    sys.exit(main())

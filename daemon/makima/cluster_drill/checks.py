"""The cluster drill's judgements, without I/O: records in, verdicts out.

The drill agent (:mod:`makima.examples.drill_agent`) writes one JSON line per
acknowledgement it receives, to a file of its own process::

    {"pid": 4242, "supervisor_id": "3f2a…", "what": "spawn", "t": 1234.5, "task_id": "…"}

``t`` is ``time.monotonic()``: CLOCK_MONOTONIC is one clock for every process
of a Linux host, so records of different agents (and the drill's own
moments: a kill, a pause) can be compared. Its first line, ``what == "start"``,
carries the daemon's pid (``ppid``) and the restoration source. The daemon's
lines as the agent read them (``MAKIMA_AGENT_TRACE``) give the answers each
process received.

Everything here is pure: the rest of :mod:`makima.cluster_drill` reads the
files, the database and ``/proc``, and hands the facts to these functions.
"""

from __future__ import annotations

import json
import statistics
from collections import Counter, defaultdict
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

START = "start"
EXIT = "exit"
ACK_KINDS = frozenset({"phase", "spawn", "wait_tasks", "ask", "answer", "checkpoint", "done"})
"""Records of an awaited SDK call that returned: the agent's daemon answered it."""
TASK_REASSIGNMENT = "task_reassignment"


# --------------------------------------------------------------------------- records


@dataclass(frozen=True, slots=True)
class Record:
    """One line of an agent's record file."""

    pid: int
    supervisor_id: str
    what: str
    t: float
    ppid: int | None = None  # start: the daemon that runs the agent
    source: str | None = None  # start: the restoration source (None on a first start)
    question_id: str | None = None  # ask, answer
    answer: str | None = None  # answer
    task_id: str | None = None  # spawn
    code: int | None = None  # exit

    @property
    def is_ack(self) -> bool:
        return self.what in ACK_KINDS


def _opt_int(value: object) -> int | None:
    return value if isinstance(value, int) and not isinstance(value, bool) else None


def _opt_str(value: object) -> str | None:
    return value if isinstance(value, str) else None


def parse_record(line: str) -> Record | None:
    """A record from one line; None for a torn or foreign line (a process killed
    in the middle of a write leaves at most its last line incomplete)."""
    try:
        obj = json.loads(line)
    except ValueError:
        return None
    if not isinstance(obj, dict):
        return None
    pid, sid, what, t = obj.get("pid"), obj.get("supervisor_id"), obj.get("what"), obj.get("t")
    if (
        _opt_int(pid) is None
        or not isinstance(sid, str)
        or not isinstance(what, str)
        or not isinstance(t, int | float)
        or isinstance(t, bool)
    ):
        return None
    assert isinstance(pid, int)
    return Record(
        pid=pid,
        supervisor_id=sid,
        what=what,
        t=float(t),
        ppid=_opt_int(obj.get("ppid")),
        source=_opt_str(obj.get("source")),
        question_id=_opt_str(obj.get("question_id")),
        answer=_opt_str(obj.get("answer")),
        task_id=_opt_str(obj.get("task_id")),
        code=_opt_int(obj.get("code")),
    )


def parse_records(lines: Iterable[str]) -> list[Record]:
    return [r for r in map(parse_record, lines) if r is not None]


@dataclass(frozen=True, slots=True)
class Process:
    """What one agent process of one supervisor did, from its records."""

    supervisor_id: str
    pid: int
    ppid: int | None
    source: str | None
    started: float | None  # t of its start record
    first: float | None  # t of its first record (start or ack)
    last_ack: float | None
    acks: int
    exited: float | None  # t of its exit record, if it wrote one
    exit_code: int | None

    @property
    def interval(self) -> tuple[float, float] | None:
        """[first record, last ack]: when this process acted for its supervisor."""
        if self.first is None or self.last_ack is None:
            return None
        return (self.first, self.last_ack)


def processes(records: Iterable[Record]) -> dict[str, list[Process]]:
    """Every agent process per supervisor, in the order they started."""
    by_process: dict[tuple[str, int], list[Record]] = defaultdict(list)
    for record in records:
        by_process[(record.supervisor_id, record.pid)].append(record)
    result: dict[str, list[Process]] = defaultdict(list)
    for (sid, pid), own in by_process.items():
        own.sort(key=lambda r: r.t)
        start = next((r for r in own if r.what == START), None)
        acks = [r for r in own if r.is_ack]
        exit_record = next((r for r in own if r.what == EXIT), None)
        acting = [r for r in own if r.what == START or r.is_ack]
        result[sid].append(
            Process(
                supervisor_id=sid,
                pid=pid,
                ppid=None if start is None else start.ppid,
                source=None if start is None else start.source,
                started=None if start is None else start.t,
                first=acting[0].t if acting else None,
                last_ack=acks[-1].t if acks else None,
                acks=len(acks),
                exited=None if exit_record is None else exit_record.t,
                exit_code=None if exit_record is None else exit_record.code,
            )
        )
    for listed in result.values():
        listed.sort(key=lambda p: (p.first if p.first is not None else float("inf"), p.pid))
    return dict(result)


# --------------------------------------------------------------------------- overlaps


@dataclass(frozen=True, slots=True)
class Overlap:
    """Two agent processes of one supervisor that were both acknowledged at once."""

    supervisor_id: str
    earlier: Process
    later: Process

    @property
    def seconds(self) -> float:
        assert self.earlier.last_ack is not None
        assert self.later.first is not None
        return self.earlier.last_ack - self.later.first

    def describe(self) -> str:
        return (
            f"{self.supervisor_id[:8]}: pid {self.earlier.pid} (daemon {self.earlier.ppid}) "
            f"acked until {self.earlier.last_ack:.3f}, pid {self.later.pid} "
            f"(daemon {self.later.ppid}) from {self.later.first:.3f} ({self.seconds:.3f}s)"
        )


def overlaps(records: Iterable[Record]) -> list[Overlap]:
    """Pairs of processes of one supervisor whose intervals intersect (no supervisor
    may run in two places at once). Processes that never got an ack have no interval."""
    found: list[Overlap] = []
    for sid, listed in sorted(processes(records).items()):
        spans = [p for p in listed if p.interval is not None]
        spans.sort(key=lambda p: p.interval or (0.0, 0.0))
        reach: Process | None = None  # the process whose interval ends last so far
        for process in spans:
            assert process.interval is not None
            if reach is not None:
                assert reach.interval is not None
                if process.interval[0] < reach.interval[1]:
                    found.append(Overlap(sid, reach, process))
                if process.interval[1] > reach.interval[1]:
                    reach = process
            else:
                reach = process
    return found


# --------------------------------------------------------------------------- losses


@dataclass(frozen=True, slots=True)
class Stored:
    """What the database holds at the end, for the drill's supervisors."""

    questions: Mapping[str, str | None]  # question id -> answer (None: open)
    question_owner: Mapping[str, str]  # question id -> supervisor id
    tasks: frozenset[str]
    states: Mapping[str, str]  # supervisor id -> state
    open_questions: Mapping[str, int]  # supervisor id -> pending_questions length


def lost_acknowledgements(
    records: Iterable[Record], accepted: Mapping[str, str], stored: Stored
) -> list[str]:
    """Acknowledged things the database does not hold: questions an agent got an id
    for, tasks an agent got an id for, answers the drill was told were accepted
    (or that hold another answer than the accepted one)."""
    lost: list[str] = []
    asked = sorted({r.question_id for r in records if r.what == "ask" and r.question_id})
    lost += [
        f"question {q[:8]} (acked to an agent) missing" for q in asked if q not in stored.questions
    ]
    spawned = sorted({r.task_id for r in records if r.what == "spawn" and r.task_id})
    lost += [f"task {t[:8]} (acked to an agent) missing" for t in spawned if t not in stored.tasks]
    for qid, answer in sorted(accepted.items()):
        if qid not in stored.questions:
            lost.append(f"answered question {qid[:8]} missing")
        elif stored.questions[qid] != answer:
            lost.append(f"question {qid[:8]}: answer {stored.questions[qid]!r} != {answer!r}")
    return lost


def acknowledged_counts(records: Iterable[Record]) -> tuple[int, int]:
    """(questions, tasks) the agents got an id for."""
    listed = list(records)
    questions = {r.question_id for r in listed if r.what == "ask" and r.question_id}
    tasks = {r.task_id for r in listed if r.what == "spawn" and r.task_id}
    return len(questions), len(tasks)


# --------------------------------------------------------------------------- deliveries


@dataclass(frozen=True, slots=True)
class Delivery:
    """An answer that reached one agent process (seen in its trace of the daemon's lines)."""

    supervisor_id: str
    pid: int
    question_id: str


def deliveries_from_trace(supervisor_id: str, pid: int, lines: Iterable[str]) -> list[Delivery]:
    """The answers in one process's trace: ``answer`` messages and the
    ``undelivered_answers`` of its ``start``."""
    found: list[Delivery] = []
    for line in lines:
        try:
            message = json.loads(line)
        except ValueError:
            continue
        if not isinstance(message, dict):
            continue
        kind = message.get("type")
        if kind == "answer" and isinstance(message.get("question_id"), str):
            found.append(Delivery(supervisor_id, pid, message["question_id"]))
        elif kind == "start":
            restoration = message.get("restoration")
            entries: Any = (
                restoration.get("undelivered_answers") if isinstance(restoration, dict) else None
            )
            for entry in entries if isinstance(entries, list) else []:
                if isinstance(entry, dict) and isinstance(entry.get("question_id"), str):
                    found.append(Delivery(supervisor_id, pid, entry["question_id"]))
    return found


def delivery_problems(deliveries: Iterable[Delivery], stored: Stored) -> list[str]:
    """Each answer reaches an agent process at most once, and every answered
    question's answer reached some process of its supervisor (or that supervisor
    completed anyway)."""
    listed = list(deliveries)
    problems: list[str] = []
    per_process = Counter((d.pid, d.question_id) for d in listed)
    owner = {(d.pid, d.question_id): d.supervisor_id for d in listed}
    for (pid, qid), count in sorted(per_process.items()):
        if count > 1:
            problems.append(f"{qid[:8]} reached pid {pid} ({owner[(pid, qid)][:8]}) {count} times")
    reached = {(d.supervisor_id, d.question_id) for d in listed}
    for qid, answer in sorted(stored.questions.items()):
        sid = stored.question_owner.get(qid, "")
        if answer is None or (sid, qid) in reached:
            continue
        if stored.states.get(sid) != "completed":
            problems.append(f"{qid[:8]} answered but never reached {sid[:8]}")
    return problems


def unfinished(stored: Stored, supervisor_ids: Iterable[str]) -> list[str]:
    """Supervisors not completed, or with questions still open."""
    bad: list[str] = []
    for sid in supervisor_ids:
        state = stored.states.get(sid, "missing")
        if state != "completed":
            bad.append(f"{sid[:8]} {state}")
        elif stored.open_questions.get(sid, 0):
            bad.append(f"{sid[:8]} {stored.open_questions[sid]} open questions")
    bad += [f"question {q[:8]} open" for q, a in sorted(stored.questions.items()) if a is None]
    return bad


# --------------------------------------------------------------------------- takeovers


def takeover_start(
    records: Iterable[Record], supervisor_id: str, *, after: float, not_on: int | None
) -> Record | None:
    """The first start of ``supervisor_id`` after ``after``, restored by another
    daemon (``ppid`` other than ``not_on``) with source task_reassignment."""
    starts = [
        r
        for r in records
        if r.what == START
        and r.supervisor_id == supervisor_id
        and r.t >= after
        and r.source == TASK_REASSIGNMENT
        and (not_on is None or r.ppid != not_on)
    ]
    return min(starts, key=lambda r: r.t) if starts else None


def takeover_times(
    records: Iterable[Record], supervisor_ids: Iterable[str], *, after: float, not_on: int | None
) -> dict[str, float | None]:
    """Seconds from ``after`` (the kill, the pause) to each supervisor's resumption
    elsewhere; None for one not resumed."""
    listed = list(records)
    times: dict[str, float | None] = {}
    for sid in supervisor_ids:
        start = takeover_start(listed, sid, after=after, not_on=not_on)
        times[sid] = None if start is None else start.t - after
    return times


@dataclass(frozen=True, slots=True)
class Stats:
    count: int
    median: float | None
    worst: float | None


def stats(values: Iterable[float]) -> Stats:
    listed = sorted(values)
    if not listed:
        return Stats(0, None, None)
    return Stats(len(listed), statistics.median(listed), listed[-1])


def slow_takeovers(times: Mapping[str, float | None], limit: float) -> list[str]:
    """Supervisors not resumed within ``limit`` seconds (or not at all)."""
    bad: list[str] = []
    for sid, seconds in sorted(times.items()):
        if seconds is None:
            bad.append(f"{sid[:8]} not resumed")
        elif seconds > limit:
            bad.append(f"{sid[:8]} after {seconds:.1f}s")
    return bad


# --------------------------------------------------------------------------- processes on the host


@dataclass(frozen=True, slots=True)
class ProcState:
    """A process as ``/proc/PID/stat`` shows it."""

    state: str  # R, S, D, T, Z, …
    exit_status: int | None  # the wait status, for a zombie (field 52)

    @property
    def ended(self) -> bool:
        return self.state in ("Z", "X")

    @property
    def exit_code(self) -> int | None:
        """The exit code of an ended process (128 + signal for one killed by a signal)."""
        status = self.exit_status
        if status is None or not self.ended:
            return None
        if status & 0x7F:
            return 128 + (status & 0x7F)
        return (status >> 8) & 0xFF


def parse_proc_stat(text: str) -> ProcState | None:
    """Parse ``/proc/PID/stat`` (the command name, in parentheses, may hold spaces)."""
    close = text.rfind(")")
    if close < 0:
        return None
    fields = text[close + 1 :].split()
    if not fields:
        return None
    # fields[0] is field 3 (state); field 52 (exit_code) is fields[49].
    status = fields[49] if len(fields) > 49 else None
    return ProcState(
        state=fields[0],
        exit_status=int(status) if status and status.lstrip("-").isdigit() else None,
    )


@dataclass(frozen=True, slots=True)
class Ending:
    """When the drill saw an agent process end (zombie or gone), and how."""

    pid: int
    supervisor_id: str
    t: float | None  # None: still running when the drill stopped looking
    code: int | None  # exit code, when the drill read it from the zombie


@dataclass
class SelfStopVerdict:
    problems: list[str] = field(default_factory=list)
    stopped: int = 0
    total: int = 0
    worst: float | None = None


def self_stops(
    endings: Sequence[Ending], *, paused_at: float, resumed_at: float, ttl: float, slack: float
) -> SelfStopVerdict:
    """The agents of a daemon paused at ``paused_at`` must have stopped by themselves
    (status 75, the SDK's self-stop) within ``ttl`` (+ the drill's polling ``slack``),
    before the daemon was resumed."""
    verdict = SelfStopVerdict(total=len(endings))
    for ending in endings:
        label = f"pid {ending.pid} ({ending.supervisor_id[:8]})"
        if ending.t is None or ending.t >= resumed_at:
            verdict.problems.append(f"{label} still running when the daemon was resumed")
            continue
        took = ending.t - paused_at
        verdict.worst = took if verdict.worst is None else max(verdict.worst, took)
        if took > ttl + slack:
            verdict.problems.append(f"{label} stopped {took:.1f}s after the pause")
        elif ending.code is not None and ending.code != 75:
            verdict.problems.append(f"{label} exited with status {ending.code}, not 75")
        else:
            verdict.stopped += 1
    return verdict


def with_exit_records(endings: Sequence[Ending], records: Sequence[Record]) -> list[Ending]:
    """Endings seen in /proc, made exact by the agents' own exit records (the moment
    it wrote its last line; the status, when /proc no longer had it)."""
    exits = {r.pid: r for r in records if r.what == EXIT}
    better: list[Ending] = []
    for ending in endings:
        record = exits.get(ending.pid)
        if record is None or record.supervisor_id != ending.supervisor_id:
            better.append(ending)
            continue
        seen = record.t if ending.t is None else min(ending.t, record.t)
        code = ending.code if ending.code is not None else record.code
        better.append(Ending(ending.pid, ending.supervisor_id, seen, code))
    return better

"""The cluster drill's judgements (makima.cluster_drill.checks), on hand-made records; and
its agent, driven by a hand-played daemon (tests/unit/fake_daemon.py)."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import pytest

from makima.cluster_drill import checks as cc
from makima.cluster_drill import database_url
from makima.embedded import ConnectParams
from makima.examples import drill_agent
from makima.examples.drill_agent import question_text
from tests.unit.fake_daemon import SUPERVISOR_ID, FakeDaemon, fake_daemon

DRILL_AGENT = Path(drill_agent.__file__)

A = "aaaaaaaa-0000-0000-0000-000000000001"
B = "bbbbbbbb-0000-0000-0000-000000000002"


def rec(pid: int, sid: str, what: str, t: float, **fields: Any) -> cc.Record:
    return cc.Record(pid=pid, supervisor_id=sid, what=what, t=t, **fields)


def run_of(
    pid: int, sid: str, start: float, end: float, *, ppid: int = 1, source: str | None = None
) -> list[cc.Record]:
    """A process that started at ``start`` and was acknowledged until ``end``."""
    return [
        rec(pid, sid, "start", start, ppid=ppid, source=source),
        rec(pid, sid, "phase", start + 0.01),
        rec(pid, sid, "checkpoint", end),
    ]


def stored(**overrides: Any) -> cc.Stored:
    base: dict[str, Any] = {
        "questions": {},
        "question_owner": {},
        "tasks": frozenset(),
        "states": {},
        "open_questions": {},
    }
    base.update(overrides)
    return cc.Stored(**base)


# --------------------------------------------------------------------------- records


def test_parse_record_reads_the_agent_line() -> None:
    line = json.dumps(
        {
            "pid": 7,
            "supervisor_id": A,
            "what": "start",
            "t": 12.5,
            "ppid": 3,
            "source": "task_reassignment",
        }
    )
    assert cc.parse_record(line) == rec(7, A, "start", 12.5, ppid=3, source="task_reassignment")


@pytest.mark.parametrize(
    "line",
    [
        '{"pid": 7, "supervisor_id": "x", "what": "ph',  # torn by a kill
        "[]",
        '{"pid": "7", "supervisor_id": "x", "what": "phase", "t": 1}',
        '{"pid": 7, "supervisor_id": "x", "what": "phase", "t": true}',
        '{"pid": 7, "what": "phase", "t": 1}',
    ],
)
def test_parse_record_skips_torn_and_foreign_lines(line: str) -> None:
    assert cc.parse_record(line) is None


def test_processes_groups_by_supervisor_and_pid_in_start_order() -> None:
    records = [*run_of(20, A, 5.0, 6.0, ppid=2), *run_of(10, A, 1.0, 2.0, ppid=1)]
    records.append(rec(10, A, "exit", 2.5, code=3))
    listed = cc.processes(records)[A]
    assert [p.pid for p in listed] == [10, 20]
    first = listed[0]
    assert (first.ppid, first.started, first.last_ack, first.acks) == (1, 1.0, 2.0, 2)
    assert (first.exited, first.exit_code) == (2.5, 3)
    assert first.interval == (1.0, 2.0)


def test_a_process_without_acks_has_no_interval() -> None:
    listed = cc.processes([rec(5, A, "start", 1.0)])[A]
    assert listed[0].interval is None


# --------------------------------------------------------------------------- overlaps


def test_no_overlap_when_processes_follow_each_other() -> None:
    records = [*run_of(1, A, 0.0, 1.0), *run_of(2, A, 1.5, 3.0), *run_of(3, A, 3.5, 4.0)]
    assert cc.overlaps(records) == []


def test_overlap_found_between_two_processes_of_one_supervisor() -> None:
    records = [*run_of(1, A, 0.0, 2.0, ppid=100), *run_of(2, A, 1.5, 3.0, ppid=200)]
    (found,) = cc.overlaps(records)
    assert (found.earlier.pid, found.later.pid) == (1, 2)
    assert found.seconds == pytest.approx(0.5)
    assert "daemon 100" in found.describe() and "daemon 200" in found.describe()


def test_overlap_found_with_a_long_process_not_the_previous_one() -> None:
    # 1 runs long; 2 lies inside it; 3 starts after 2 ended but still inside 1.
    records = [*run_of(1, A, 0.0, 10.0), *run_of(2, A, 1.0, 2.0), *run_of(3, A, 3.0, 4.0)]
    pairs = [(o.earlier.pid, o.later.pid) for o in cc.overlaps(records)]
    assert pairs == [(1, 2), (1, 3)]


def test_processes_of_different_supervisors_never_overlap() -> None:
    assert cc.overlaps([*run_of(1, A, 0.0, 5.0), *run_of(2, B, 1.0, 3.0)]) == []


def test_a_late_ack_to_an_old_process_is_an_overlap() -> None:
    # The old daemon, resumed after a pause, acknowledged its old agent once more.
    records = [*run_of(1, A, 0.0, 1.0), *run_of(2, A, 4.0, 6.0), rec(1, A, "phase", 5.0)]
    (found,) = cc.overlaps(records)
    # Its interval now reaches from its start to that late ack, across the new process.
    assert (found.earlier.pid, found.later.pid) == (1, 2)
    assert found.seconds == pytest.approx(1.0)


def test_touching_intervals_do_not_overlap() -> None:
    assert cc.overlaps([*run_of(1, A, 0.0, 1.0), *run_of(2, A, 1.0, 2.0)]) == []


# --------------------------------------------------------------------------- losses


def test_nothing_lost_when_the_database_holds_everything() -> None:
    records = [
        rec(1, A, "ask", 1.0, question_id="q1"),
        rec(1, A, "spawn", 0.5, task_id="t1"),
    ]
    db = stored(questions={"q1": "continue"}, question_owner={"q1": A}, tasks=frozenset({"t1"}))
    assert cc.lost_acknowledgements(records, {"q1": "continue"}, db) == []
    assert cc.acknowledged_counts(records) == (1, 1)


def test_lost_question_task_and_answer_are_each_named() -> None:
    records = [
        rec(1, A, "ask", 1.0, question_id="q1-missing"),
        rec(1, A, "spawn", 0.5, task_id="t1-missing"),
    ]
    db = stored(questions={"q2": None, "q3": "finish"}, question_owner={"q2": A, "q3": A})
    lost = cc.lost_acknowledgements(records, {"q2": "continue", "q3": "continue", "q4": "x"}, db)
    assert lost == [
        "question q1-missi (acked to an agent) missing",
        "task t1-missi (acked to an agent) missing",
        "question q2: answer None != 'continue'",
        "question q3: answer 'finish' != 'continue'",
        "answered question q4 missing",
    ]


# --------------------------------------------------------------------------- deliveries


def test_deliveries_from_trace_reads_answers_and_undelivered_answers() -> None:
    lines = [
        json.dumps(
            {
                "type": "start",
                "restoration": {"undelivered_answers": [{"question_id": "q1", "answer": "x"}]},
            }
        ),
        json.dumps({"type": "ack", "ref": "r1"}),
        json.dumps({"type": "answer", "question_id": "q2", "answer": "y"}),
        json.dumps({"type": "ping", "valid_for": 3}),
        "not json",
    ]
    assert cc.deliveries_from_trace(A, 9, lines) == [
        cc.Delivery(A, 9, "q1"),
        cc.Delivery(A, 9, "q2"),
    ]


def test_an_answer_twice_in_one_process_is_a_problem_but_once_per_process_is_not() -> None:
    db = stored(questions={"q1": "x"}, question_owner={"q1": A}, states={A: "completed"})
    once_each = [cc.Delivery(A, 1, "q1"), cc.Delivery(A, 2, "q1")]
    assert cc.delivery_problems(once_each, db) == []
    twice = [cc.Delivery(A, 1, "q1"), cc.Delivery(A, 1, "q1")]
    assert cc.delivery_problems(twice, db) == [f"q1 reached pid 1 ({A[:8]}) 2 times"]


def test_an_answer_never_delivered_is_a_problem_unless_the_supervisor_completed() -> None:
    db = stored(
        questions={"q1": "x", "q2": None}, question_owner={"q1": A, "q2": A}, states={A: "working"}
    )
    assert cc.delivery_problems([], db) == [f"q1 answered but never reached {A[:8]}"]
    done = stored(questions={"q1": "x"}, question_owner={"q1": A}, states={A: "completed"})
    assert cc.delivery_problems([], done) == []


def test_unfinished_names_states_and_open_questions() -> None:
    db = stored(
        questions={"q1": None},
        question_owner={"q1": B},
        states={A: "completed", B: "waiting_for_user"},
        open_questions={B: 1},
    )
    assert cc.unfinished(db, [A, B, "c" * 8]) == [
        f"{B[:8]} waiting_for_user",
        "cccccccc missing",
        "question q1 open",
    ]


# --------------------------------------------------------------------------- takeovers


def test_takeover_time_is_the_first_reassigned_start_on_another_daemon() -> None:
    records = [
        *run_of(1, A, 0.0, 1.0, ppid=100),
        rec(2, A, "start", 1.5, ppid=100, source="agent_restart"),  # same daemon: not it
        rec(3, A, "start", 2.0, ppid=100, source="task_reassignment"),  # the victim itself
        rec(4, A, "start", 4.0, ppid=200, source="task_reassignment"),
        rec(5, A, "start", 6.0, ppid=300, source="task_reassignment"),
        rec(6, B, "start", 0.5, ppid=200, source="task_reassignment"),  # before the kill
    ]
    times = cc.takeover_times(records, [A, B], after=1.0, not_on=100)
    assert times == {A: pytest.approx(3.0), B: None}
    assert cc.slow_takeovers(times, limit=5.0) == [f"{B[:8]} not resumed"]
    assert cc.slow_takeovers(times, limit=2.5) == [f"{A[:8]} after 3.0s", f"{B[:8]} not resumed"]


def test_stats_median_and_worst() -> None:
    assert cc.stats([3.0, 1.0, 2.0]) == cc.Stats(3, 2.0, 3.0)
    assert cc.stats([]) == cc.Stats(0, None, None)


# --------------------------------------------------------------------------- /proc and self-stops


def stat_line(state: str, exit_status: int | None, comm: str = "python3 -m x") -> str:
    fields = [state] + ["0"] * 48 + ([str(exit_status)] if exit_status is not None else [])
    return f"4242 ({comm}) " + " ".join(fields) + "\n"


def test_parse_proc_stat_reads_state_and_the_zombies_exit_code() -> None:
    zombie = cc.parse_proc_stat(stat_line("Z", 75 << 8, comm="a) (b"))
    assert zombie is not None and zombie.ended and zombie.exit_code == 75
    killed = cc.parse_proc_stat(stat_line("Z", 9))
    assert killed is not None and killed.exit_code == 137
    running = cc.parse_proc_stat(stat_line("S", 0))
    assert running is not None and not running.ended and running.exit_code is None
    old_kernel = cc.parse_proc_stat(stat_line("Z", None))
    assert old_kernel is not None and old_kernel.ended and old_kernel.exit_code is None
    assert cc.parse_proc_stat("garbage") is None


def test_self_stops_within_the_ttl_with_status_75() -> None:
    endings = [cc.Ending(1, A, 12.0, 75), cc.Ending(2, B, 12.5, None)]
    verdict = cc.self_stops(endings, paused_at=10.0, resumed_at=20.0, ttl=3.0, slack=0.5)
    assert verdict.problems == [] and verdict.stopped == 2 and verdict.worst == pytest.approx(2.5)


def test_self_stops_late_wrong_status_or_never() -> None:
    endings = [
        cc.Ending(1, A, 14.0, 75),  # 4 s after the pause, TTL 3
        cc.Ending(2, A, 11.0, 3),  # stopped in time, but not by the SDK's self-stop
        cc.Ending(3, B, None, None),  # still running
        cc.Ending(4, B, 21.0, 0),  # ended only after SIGCONT
    ]
    verdict = cc.self_stops(endings, paused_at=10.0, resumed_at=20.0, ttl=3.0, slack=0.5)
    assert verdict.stopped == 0
    assert verdict.problems == [
        f"pid 1 ({A[:8]}) stopped 4.0s after the pause",
        f"pid 2 ({A[:8]}) exited with status 3, not 75",
        f"pid 3 ({B[:8]}) still running when the daemon was resumed",
        f"pid 4 ({B[:8]}) still running when the daemon was resumed",
    ]


# --------------------------------------------------------------------------- the URL


def test_database_url_for_the_embedded_servers_socket() -> None:
    params = ConnectParams("/tmp/mkc-x/pg/run", 5432, "makima", "p@ss/w:rd", "makima")
    assert database_url(params) == (
        "postgresql://makima:p%40ss%2Fw%3Ard@/makima?host=%2Ftmp%2Fmkc-x%2Fpg%2Frun&port=5432"
    )


# --------------------------------------------------------------------------- the drill agent


async def drill_agent_run(
    tmp_path: Path, restoration: dict[str, Any] | None, answers: dict[str, str]
) -> tuple[FakeDaemon, list[cc.Record], list[cc.Delivery]]:
    records_dir = tmp_path / "records"
    records_dir.mkdir()
    env = {"MAKIMA_DRILL_DIR": str(records_dir), "MAKIMA_DRILL_PACE": "0"}
    async with fake_daemon(DRILL_AGENT, tmp_path=tmp_path, env=env) as daemon:
        await daemon.start(restoration, name="drill-0", goal="drill")
        await daemon.drive(answers=answers)
        await daemon.close_stdin()
        assert await daemon.wait_exit() == 0
    (path,) = [p for p in records_dir.glob("*.jsonl") if not p.name.startswith("trace-")]
    records = cc.parse_records(path.read_text().splitlines())
    (trace,) = records_dir.glob("trace-*.jsonl")
    pid = records[0].pid
    assert path.name == f"{SUPERVISOR_ID}-{pid}.jsonl"
    assert trace.name == f"trace-{SUPERVISOR_ID}-{pid}.jsonl"
    deliveries = cc.deliveries_from_trace(SUPERVISOR_ID, pid, trace.read_text().splitlines())
    return daemon, records, deliveries


@pytest.mark.anyio
async def test_drill_agent_records_every_ack_with_its_pid_and_daemon(tmp_path: Path) -> None:
    answers = {question_text(0): "continue", question_text(1): "finish"}
    daemon, records, deliveries = await drill_agent_run(tmp_path, None, answers)

    assert [r.what for r in records] == [
        "start",
        *(["phase", "spawn", "wait_tasks", "ask", "answer", "checkpoint"] * 2),
        "done",
        "exit",
    ]
    start = records[0]
    assert start.ppid == os.getpid() and start.source is None
    assert {r.pid for r in records} == {start.pid}
    assert [r.t for r in records] == sorted(r.t for r in records)
    assert [r.answer for r in records if r.what == "answer"] == ["continue", "finish"]
    assert records[-1].code == 0
    asked = [m for m in daemon.received if m["type"] == "ask"]
    assert [m["choices"] for m in asked] == [["continue", "finish"]] * 2
    assert [r.question_id for r in records if r.what == "ask"] == ["q-2", "q-4"]
    assert [r.task_id for r in records if r.what == "spawn"] == ["t-1", "t-3"]
    assert [d.question_id for d in deliveries] == ["q-2", "q-4"]
    assert daemon.of_type("done")[0]["result"] == {"steps": 2}


@pytest.mark.anyio
async def test_drill_agent_resumes_at_its_checkpoint_and_claims_the_open_question(
    tmp_path: Path,
) -> None:
    restoration = {
        "source": "task_reassignment",
        "restoration_count": 1,
        "checkpoint": {"step": 3, "last_answer": "continue"},
        "pending_questions": [],
        "undelivered_answers": [
            {"question_id": "q-old", "answer": "finish", "question": question_text(3)}
        ],
        "tasks": [],
    }
    daemon, records, deliveries = await drill_agent_run(tmp_path, restoration, {})

    assert records[0].source == "task_reassignment"
    # Step 3's question was answered while the agent was away: not asked again.
    assert daemon.of_type("ask") == []
    assert [(r.what, r.question_id, r.answer) for r in records if r.what == "answer"] == [
        ("answer", "q-old", "finish")
    ]
    assert [m["phase"] for m in daemon.of_type("phase")] == ["step-3"]
    assert daemon.of_type("done")[0]["result"] == {"steps": 4}
    assert deliveries == [cc.Delivery(SUPERVISOR_ID, records[0].pid, "q-old")]


def test_exit_records_make_endings_exact() -> None:
    endings = [
        cc.Ending(1, A, 12.3, None),  # seen late in /proc, gone without a status
        cc.Ending(2, A, None, None),  # never seen ending, but it wrote its exit
        cc.Ending(3, B, 11.0, 75),  # no exit record: as seen
    ]
    records = [
        rec(1, A, "exit", 12.1, code=75),
        rec(2, A, "exit", 13.0, code=75),
        rec(3, A, "exit", 9.0, code=0),  # another supervisor's pid 3: not this one
    ]
    assert cc.with_exit_records(endings, records) == [
        cc.Ending(1, A, 12.1, 75),
        cc.Ending(2, A, 13.0, 75),
        cc.Ending(3, B, 11.0, 75),
    ]

"""Crash drills, short form: a real daemon subprocess with real agents, killed
(by the fault hook, SIGKILL at a chosen save point, just before or just after
its commit; and at random moments under load), restarted, and checked against
every invariant of DESIGN §15. The long form is `makima drill`."""

from __future__ import annotations

import json
import uuid
from pathlib import Path
from typing import Any

import anyio
import asyncpg
import pytest

from makima import repository as repo
from makima.control.client import ControlClient, ControlError, RemoteError
from makima.database import create_pool
from makima.drill import DrillSettings, run_drill
from makima.embedded import ConnectParams
from tests.harness import DEADLINE, RAW, dsn
from tests.process import DaemonProcess, daemon_process

pytestmark = [pytest.mark.anyio, pytest.mark.drill]

PLAN = {
    "steps": [
        {"send": {"type": "phase", "phase": "prepare", "ref": "p1"}, "await": "ack"},
        {
            "send": {"type": "message", "role": "assistant", "content": "hello", "ref": "m1"},
            "await": "ack",
        },
        {"send": {"type": "checkpoint", "data": {"step": 1}, "ref": "c1"}, "await": "ack"},
        {"send": {"type": "spawn", "name": "t1", "command": ["true"], "ref": "s1"}, "await": "ack"},
        {"send": {"type": "wait_tasks", "ref": "w1"}, "await": "tasks_done"},
        {
            "send": {"type": "ask", "question": "Proceed?", "choices": ["yes", "no"], "ref": "q1"},
            "await": "ack",
        },
        {"await": "answer"},
        {"send": {"type": "phase", "phase": "finish", "ref": "p2"}, "await": "ack"},
        {"send": {"type": "done", "ref": "d1"}, "await": "ack"},
    ],
    "resume": "auto",
}

FAULTS = [
    f"{point}:{moment}"
    for point in ("spawn", "ask", "answer", "phase", "heartbeat", "state_change")
    for moment in ("before_commit", "after_commit")
]


def agent_log(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


async def drive(proc: DaemonProcess, sid: str, *, answer: bool, answers: dict[str, str]) -> None:
    """Follow events; answer questions when asked to; return when the supervisor
    completes or the daemon dies."""
    try:
        async with (
            ControlClient.connect(proc.socket_path, timeout=DEADLINE) as client,
            client.events() as events,
        ):
            for q in (await client.call("question.list"))["questions"]:
                if answer and q["question_id"] not in answers:
                    await answer_one(client, q["question_id"], answers)
            async for event in events:
                kind = event["kind"]
                if (
                    kind in ("question.asked", "question.pending", "question.redelivered")
                    and answer
                ) and event["question_id"] not in answers:
                    await answer_one(client, event["question_id"], answers)
                if (
                    kind == "supervisor.state_changed"
                    and event["supervisor_id"] == sid
                    and event["state"] in ("completed", "failed")
                ):
                    return
    except ControlError:
        return  # the daemon died under us: that is the drill


async def answer_one(client: ControlClient, qid: str, answers: dict[str, str]) -> None:
    try:
        await client.call("question.answer", {"question_id": qid, "answer": "yes"})
        answers[qid] = "yes"
    except RemoteError as exc:
        if exc.code != -32002:
            raise
        answers[qid] = exc.data["answer"]


@pytest.mark.parametrize("fault", FAULTS)
async def test_kill_at_each_save_point(
    fault: str, db_params: ConnectParams, short_tmp: Path
) -> None:
    log_path = short_tmp / f"agent-{uuid.uuid4().hex[:6]}.jsonl"
    command = ["python3", str(RAW), json.dumps(PLAN), str(log_path)]
    answers: dict[str, str] = {}
    async with daemon_process(short_tmp, db_params) as proc:
        # first life: dies by the fault hook at the chosen save point
        await proc.start(fault=fault)
        async with ControlClient.connect(proc.socket_path, timeout=DEADLINE) as client:
            sid = (await client.call("supervisor.create", {"name": fault, "command": command}))[
                "supervisor_id"
            ]
        point = fault.split(":")[0]
        with anyio.fail_after(DEADLINE):
            await drive(proc, sid, answer=point == "answer", answers=answers)
            code = await proc.wait()
        assert code == -9, f"the fault {fault} did not fire:\n{proc.log_text()[-2000:]}"
        # second life: no fault; the supervisor comes back and finishes
        await proc.start()
        with anyio.fail_after(DEADLINE):
            await drive(proc, sid, answer=True, answers=answers)
        assert await proc.terminate() == 0

    await check_invariants(db_params, sid, log_path, answers, restorations=1)


async def check_invariants(
    params: ConnectParams,
    sid: str,
    log_path: Path,
    answers: dict[str, str],
    restorations: int,
) -> None:
    messages = agent_log(log_path)
    sent = {
        m["ref"]: m
        for entry in messages
        if entry["type"] == "_sent" and (m := json.loads(entry["message"])).get("ref")
    }
    acked = [
        sent[m["ref"]] | {"_reply": m} for m in messages if m["type"] == "ack" and m["ref"] in sent
    ]
    pool: asyncpg.Pool = await create_pool(params, min_size=1, max_size=2)
    try:
        supervisor = uuid.UUID(sid)
        state = await repo.get_supervisor_state_for_restoration(pool, supervisor)
        assert state is not None
        assert state.state.value == "completed", state
        # restoration_count grows by exactly one per restoration
        assert state.restoration_count == restorations
        checkpoints = await pool.fetch(
            "SELECT snapshot->>'phase' AS phase FROM supervisor_checkpoints "
            "WHERE supervisor_id = $1 AND reason = 'phase_change'",
            supervisor,
        )
        for message in acked:
            reply = message["_reply"]
            if message["type"] == "ask":  # no acknowledged question is lost
                record = await repo.get_question(pool, uuid.UUID(reply["question_id"]))
                assert record is not None and record.answer is not None
            elif message["type"] == "spawn":  # no acknowledged task is lost
                assert await repo.get_task(pool, uuid.UUID(reply["task_id"])) is not None
            elif message["type"] == "phase":  # no acknowledged phase change is lost
                assert message["phase"] in [c["phase"] for c in checkpoints]
        for qid, answer in answers.items():  # every acknowledged answer is kept as given
            record = await repo.get_question(pool, uuid.UUID(qid))
            assert record is not None and record.answer == answer
    finally:
        await pool.close()
    # the agent receives each answer exactly once per agent process, and at least once
    per_process: list[dict[str, int]] = []
    for message in messages:
        if message["type"] == "_started":
            per_process.append({})
        elif message["type"] == "start":
            for entry in (message.get("restoration") or {}).get("undelivered_answers", []):
                per_process[-1][entry["question_id"]] = (
                    per_process[-1].get(entry["question_id"], 0) + 1
                )
        elif message["type"] == "answer":
            per_process[-1][message["question_id"]] = (
                per_process[-1].get(message["question_id"], 0) + 1
            )
    assert all(count == 1 for process in per_process for count in process.values()), per_process
    delivered = {q for process in per_process for q in process}
    assert set(answers) <= delivered


async def test_random_kills_under_load(db_params: ConnectParams, short_tmp: Path) -> None:
    settings = DrillSettings(
        agents=3,
        kills=4,
        seed=20261123,
        database_url=dsn(db_params),
        scratch=short_tmp / f"drill-{uuid.uuid4().hex[:6]}",
        limit=240.0,
    )
    report = await run_drill(settings)
    failures = [c for c in report.checks if not c.ok]
    assert not failures, (failures, report.scratch)
    assert report.kills_survived == 4 and report.supervisors >= 3

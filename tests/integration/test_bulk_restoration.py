"""Restoration at startup works in bulk: a fixed number of statements whatever the
number of supervisors, every open question listed and re-delivered before READY,
and the agents spawned after it."""

from __future__ import annotations

import contextlib
import sys
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

import anyio
import pytest

from makima.config import DaemonConfig, TaskRestartPolicy
from makima.database import Database, DatabaseConfig
from makima.embedded import ConnectParams
from makima.events import EventBus
from makima.model import PendingQuestion, RestorationSource, SupervisorSpec
from makima.model import SupervisorStateEnum as S
from makima.restoration import Claimed, Restorer, restore_all
from makima.store import (
    MessageAdded,
    QuestionAsked,
    Store,
    SupervisorCreated,
    SupervisorsClaimed,
)
from tests.harness import DEADLINE, client_for, daemon_config, running_daemon
from tests.integration.test_store_committer import Wire, counting_proxy

pytestmark = pytest.mark.anyio

# An agent that reads its start line and then waits for the daemon to go.
WAITING_AGENT = [sys.executable, "-c", "import sys\nfor _ in sys.stdin: pass"]


async def seed(store: Store, n: int) -> list[uuid.UUID]:
    """``n`` supervisors, each with some history and one open question."""
    question_ids = []
    for i in range(n):
        spec = SupervisorSpec.new(f"bulk-{i}", WAITING_AGENT, goal="wait")
        await store.create_supervisor(SupervisorCreated(spec))
        for j in range(3):
            await store.add_message(MessageAdded(spec.supervisor_id, "assistant", f"step {j}"))
        question = PendingQuestion(uuid.uuid4(), f"Go on with {i}?", ("yes", "no"))
        await store.ask_question(QuestionAsked(spec.supervisor_id, question, S.WAITING_FOR_USER))
        question_ids.append(question.id)
    return question_ids


async def seeded_daemon(
    params: ConnectParams, short_tmp: Path, n: int
) -> tuple[DaemonConfig, list[uuid.UUID]]:
    """A daemon's settings over a database already holding ``n`` seeded supervisors."""
    config = daemon_config(params, short_tmp)
    db = await Database.open(DatabaseConfig(state_dir=short_tmp, url=config.database_url))
    try:
        return config, await seed(Store(db), n)
    finally:
        await db.close()


@asynccontextmanager
async def wired_store(params: ConnectParams, short_tmp: Path) -> AsyncIterator[tuple[Store, Wire]]:
    async with counting_proxy(params, short_tmp) as (dsn, wire):
        db = await Database.open(DatabaseConfig(state_dir=short_tmp, url=dsn))
        try:
            yield Store(db), wire
        finally:
            await db.close()


async def test_statements_do_not_grow_with_supervisors(
    db_params: ConnectParams, short_tmp: Path
) -> None:
    async with wired_store(db_params, short_tmp) as (store, wire):
        bus = EventBus()
        restorer = Restorer(store, bus, TaskRestartPolicy.INTERRUPT)
        owner = uuid.uuid4()
        counted = []
        for n in (2, 4, 12):  # 2 supervisors (to prepare the statements), then 6, then 18
            await seed(store, n)
            claims = (await store.claim(SupervisorsClaimed(owner, own=True))).claims
            before = wire.mark()
            report, plans = await restore_all(
                restorer,
                {
                    c.supervisor_id: Claimed(RestorationSource.DAEMON_RESTART, c.fence)
                    for c in claims
                },
            )
            counted.append(wire.round_trips - before)
            assert report["counts"]["restored"] == len(plans)
            assert all(p.state.state is S.WAITING_FOR_USER for p in plans)
            assert all(
                [m.content for m in p.history] == ["step 0", "step 1", "step 2"] for p in plans
            )
            assert all(p.redelivered for p in plans)
        assert counted[1] == counted[2], f"round trips for 6 and for 18 supervisors: {counted}"
        open_questions = await store.list_open_questions()
        assert sorted(q.redelivery_count for q in open_questions) == [1] * 12 + [2] * 4 + [3] * 2


async def test_ready_comes_before_the_agents_are_spawned(
    db_params: ConnectParams, short_tmp: Path
) -> None:
    config, question_ids = await seeded_daemon(db_params, short_tmp, 4)
    async with running_daemon(config) as daemon:
        # READY: the socket is served, every question is listed and re-delivered,
        # and no agent has its start line yet.
        assert daemon.agents_starting == 4
        events = daemon.bus.subscribe(["supervisor.restored"])
        listed = await daemon.store.list_open_questions()
        assert {q.question_id for q in listed} == set(question_ids)
        assert {q.redelivery_count for q in listed} == {1}
        restored = 0
        try:
            with anyio.fail_after(DEADLINE):
                async with contextlib.aclosing(aiter(events)) as stream:
                    async for _ in stream:
                        restored += 1
                        if restored == 4:
                            break
        finally:
            events.close()
        assert daemon.agents_starting == 0


async def test_a_long_question_list_is_cut_to_one_line(
    db_params: ConnectParams, short_tmp: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Thousands of open questions would pass the 1 MiB line: the oldest that fit
    are listed, and the rest counted (a small budget stands in for 1 MiB)."""
    from makima import api
    from tests.integration.test_cli import makima

    config, question_ids = await seeded_daemon(db_params, short_tmp, 6)
    monkeypatch.setattr(api, "LINE_BUDGET", 700)
    async with running_daemon(config) as daemon:
        async with client_for(daemon) as client:
            listed = await client.call("question.list")
        shown = [q["question_id"] for q in listed["questions"]]
        assert 0 < len(shown) < 6 and listed["more"] is True
        assert listed["omitted"] == 6 - len(shown)
        assert shown == [str(q) for q in question_ids[: len(shown)]]  # the oldest first
        run = await makima(config.socket_path, "questions")
        assert run.code == 0, run
        assert f"{6 - len(shown)} newer open questions are not shown" in run.err


async def test_a_supervisor_waiting_for_its_turn_to_start_takes_answers(
    db_params: ConnectParams, short_tmp: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Its agent is not started yet (no turn is ever free here), but it is live: its
    question is answered and held for the agent's start."""
    from makima import daemon as daemon_module

    config, question_ids = await seeded_daemon(db_params, short_tmp, 2)
    monkeypatch.setattr(daemon_module, "LAUNCH_WINDOW", 0)
    async with running_daemon(config) as daemon, client_for(daemon) as client:
        assert daemon.agents_starting == 2
        reply = await client.call(
            "question.answer", {"question_id": str(question_ids[0]), "answer": "yes"}
        )
        assert reply["answer"] == "yes"
        status = await client.call("daemon.status")
        assert status["agents_starting"] == 2 and status["pending_questions"] == 1

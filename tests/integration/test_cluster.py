"""Several daemons, one PostgreSQL (DESIGN §13): leases, claims, fencing, and one
cluster for the people who answer. The kill -9 / SIGSTOP / pg_terminate_backend
rounds are the cluster drill's (tests/drills/test_cluster_drill.py)."""

from __future__ import annotations

import dataclasses
import uuid
from datetime import UTC, datetime

import anyio
import asyncpg
import pytest

from makima import repository as repo
from makima.control.client import RemoteError
from makima.errors import FencedError
from makima.model import Fence, PendingQuestion, SupervisorSpec, TaskRecord
from makima.model import SupervisorStateEnum as S
from makima.repository import AnsweredElsewhereError
from makima.store import Heartbeat
from tests.harness import (
    DEADLINE,
    Relay,
    client_for,
    daemon_config,
    next_event,
    running_daemon,
    until,
)
from tests.integration.test_cli import makima

pytestmark = pytest.mark.anyio

TTL, RENEW = 2.0, 0.4


async def owned_supervisor(pool: asyncpg.Pool, owner: uuid.UUID) -> uuid.UUID:
    spec = SupervisorSpec.new("s", ["true"], goal="g")
    state = await repo.create_supervisor(pool, spec, owner)
    assert (state.owner_daemon_id, state.lease_epoch) == (owner, 1)
    return spec.supervisor_id


def question() -> PendingQuestion:
    return PendingQuestion(uuid.uuid4(), "Ship?", ("yes", "no"), None, datetime.now(UTC))


async def test_a_claim_fences_every_write_of_the_former_owner(pool: asyncpg.Pool) -> None:
    old, new = uuid.uuid4(), uuid.uuid4()
    await repo.register_daemon(pool, old, "a", 1, ttl=60)
    await repo.register_daemon(pool, new, "b", 2, ttl=60)
    sid = await owned_supervisor(pool, old)
    stale = Fence(old, 1)
    asked = question()
    await repo.question_asked(sid, asked, S.WAITING_FOR_USER, stale).run(pool)
    task = TaskRecord(uuid.uuid4(), sid, "t", ("true",))
    await repo.task_spawned(task, None, stale).run(pool)

    # The owner's lease is live: nobody may claim it.
    assert await repo.claim_supervisors(pool, new, own=False) == []
    await pool.execute("UPDATE daemons SET lease_expires_at = now() WHERE daemon_id = $1", old)
    claims = await repo.claim_supervisors(pool, new, own=False)
    assert [(c.supervisor_id, c.fence, c.previous) for c in claims] == [(sid, Fence(new, 2), old)]
    before = await repo.get_supervisor_state_for_restoration(pool, sid)
    assert before is not None

    writes = [
        lambda: repo.state_change(sid, S.WORKING, "x", 5, fence=stale).run(pool),
        lambda: repo.message_added(sid, "assistant", "hi", stale).run(pool),
        lambda: repo.question_asked(sid, question(), S.WAITING_FOR_USER, stale).run(pool),
        lambda: repo.task_spawned(TaskRecord(uuid.uuid4(), sid, "u", ("true",)), None, stale).run(
            pool
        ),
        lambda: repo.task_started(task.task_id, sid, stale).run(pool),
        lambda: repo.task_finished(task.task_id, repo.TaskStatus.FAILED, 1, "", sid, stale).run(
            pool
        ),
        lambda: repo.end_unfinished_tasks(pool, sid, repo.TaskStatus.CANCELLED, stale),
        lambda: repo.phase_change(
            dataclasses.replace(before, phase="p", owner_daemon_id=old, lease_epoch=1)
        ).run(pool),
        lambda: repo.save_supervisor_state_full(
            pool, dataclasses.replace(before, state=S.FAILED, owner_daemon_id=old, lease_epoch=1)
        ),
        lambda: repo.record_question_rows(pool, sid, [question()], stale),
        lambda: repo.mark_answers_delivered(pool, [asked.id], sid, stale),
    ]
    for write in writes:
        with pytest.raises(FencedError, match=str(sid)):
            await write()
    beats = await repo.update_supervisors_heartbeat_bulk(
        pool, [Heartbeat(sid, S.WAITING_FOR_USER, "x", 1, before.version, stale)]
    )
    assert beats == {}
    restored = await repo.mark_supervisors_restored(
        pool, [sid], repo.RestorationSource.TASK_REASSIGNMENT, fences={sid: stale}
    )
    assert restored == {}
    after = await repo.get_supervisor_state_for_restoration(pool, sid)
    assert after == before, "a fenced write changed the row"
    assert await repo.get_supervisor_messages(pool, sid) == []
    assert [t.status for t in await repo.get_tasks_for_supervisor(pool, sid)] == [
        repo.TaskStatus.PENDING
    ]

    # A person's answer given to the former owner is kept (once), and says so.
    with pytest.raises(AnsweredElsewhereError) as caught:
        await repo.answer_question(pool, asked.id, "yes", 0, state=S.WORKING, fence=stale)
    assert caught.value.record.answer == "yes"
    row = await repo.get_question(pool, asked.id)
    assert row is not None and row.answer == "yes"

    # The new owner's writes go through.
    fresh = Fence(new, 2)
    assert await repo.state_change(sid, S.WORKING, "y", 6, fence=fresh).run(pool) is not None
    assert await repo.message_added(sid, "assistant", "mine", fresh).run(pool) == 1


async def test_a_write_in_flight_holds_off_the_claim(pool: asyncpg.Pool) -> None:
    """A write of the owner that started before a claim either commits before the
    claim takes the row (SKIP LOCKED leaves it for the next round), or fails."""
    old, new = uuid.uuid4(), uuid.uuid4()
    await repo.register_daemon(pool, old, "a", 1, ttl=0)  # expired at once
    await repo.register_daemon(pool, new, "b", 2, ttl=60)
    sid = await owned_supervisor(pool, old)
    async with pool.acquire() as conn, conn.transaction():
        await repo.message_added(sid, "assistant", "in flight", Fence(old, 1)).run(conn)
        assert await repo.claim_supervisors(pool, new, own=False) == []  # share-locked: skipped
    claims = await repo.claim_supervisors(pool, new, own=False)
    assert [c.fence for c in claims] == [Fence(new, 2)]
    assert [m.content for m in await repo.get_supervisor_messages(pool, sid)] == ["in flight"]


async def test_claims_share_orphans_between_live_daemons(pool: asyncpg.Pool) -> None:
    dead, a, b = uuid.uuid4(), uuid.uuid4(), uuid.uuid4()
    await repo.register_daemon(pool, dead, "x", 1, ttl=0)
    for live in (a, b):
        await repo.register_daemon(pool, live, "y", 2, ttl=60)
    ids = {await owned_supervisor(pool, dead) for _ in range(6)}
    first = await repo.claim_supervisors(pool, a, own=False)
    second = await repo.claim_supervisors(pool, b, own=False)
    runs_on_b = [c.supervisor_id for c in second]  # a daemon's own that run are left alone
    third = await repo.claim_supervisors(pool, b, own=False, running=runs_on_b)
    # A fair share each round: the orphans left over the live daemons (6/2, 3/2, 1/2).
    assert [len(first), len(second), len(third)] == [3, 2, 1]
    claimed = [c.supervisor_id for c in (*first, *second, *third)]
    assert sorted(claimed) == sorted(ids)
    runs_on_a = [c.supervisor_id for c in first]
    assert await repo.claim_supervisors(pool, a, own=False, running=runs_on_a) == []
    # One of a's own that does not run on a (its restoration failed, say) is taken back.
    back = await repo.claim_supervisors(pool, a, own=False, running=runs_on_a[1:])
    assert [c.supervisor_id for c in back] == runs_on_a[:1]


async def test_renewal_reports_what_was_taken_and_what_waits(pool: asyncpg.Pool) -> None:
    me, other = uuid.uuid4(), uuid.uuid4()
    await repo.register_daemon(pool, me, "a", 1, ttl=60)
    sid, kept = await owned_supervisor(pool, me), await owned_supervisor(pool, me)
    await pool.execute(
        "UPDATE supervisor_states SET owner_daemon_id = $2, lease_epoch = 7 "
        "WHERE supervisor_id = $1",
        sid,
        other,
    )
    request = uuid.uuid4()
    await repo.add_request(pool, request, kept, "cancel", 0, other)
    renewal = await repo.renew_lease(pool, me, "a", 1, 30, {sid: Fence(me, 1), kept: Fence(me, 1)})
    assert renewal.fenced == (sid,)
    assert renewal.requests == (request,)
    assert renewal.peers == 0


# --------------------------------------------------------------------------- two daemons


async def test_one_cluster_for_the_people_who_answer(
    db_params: object, short_tmp: object, relay: Relay
) -> None:
    """A supervisor runs on A; B's socket lists it, answers its question (the agent on A
    gets it once), shows A's events, and cancels it (A carries the cancel out)."""
    a_config = daemon_config(db_params, short_tmp, lease_ttl=TTL, lease_renew=RENEW)  # type: ignore[arg-type]
    b_config = daemon_config(db_params, short_tmp, lease_ttl=TTL, lease_renew=RENEW)  # type: ignore[arg-type]
    async with (
        running_daemon(a_config) as a,
        running_daemon(b_config) as b,
        client_for(a) as on_a,
        client_for(b) as on_b,
        on_b.events() as b_events,
    ):
        created = await on_a.call(
            "supervisor.create", {"name": "far", "command": relay.command, "goal": "g"}
        )
        sid = created["supervisor_id"]
        agent = await relay.accept()
        await agent.expect("start")
        listed = await on_b.call("supervisor.list")
        assert [(s["supervisor_id"], s["owner_daemon_id"]) for s in listed["supervisors"]] == [
            (sid, str(a.daemon_id))
        ]
        reply = await agent.request({"type": "ask", "question": "Ship?", "choices": ["yes", "no"]})
        qid = reply["question_id"]
        asked = await next_event(b_events, "question.asked", question_id=qid)
        assert asked["daemon_id"] == str(a.daemon_id)  # A's event, seen on B
        questions = await on_b.call("question.list")
        assert [q["question_id"] for q in questions["questions"]] == [qid]

        answered = await on_b.call("question.answer", {"question_id": qid, "answer": "yes"})
        assert answered["answer"] == "yes"
        got = await agent.expect("answer")
        assert (got["question_id"], got["answer"]) == (qid, "yes")
        with pytest.raises(RemoteError, match="already answered"):  # once, cluster-wide
            await on_a.call("question.answer", {"question_id": qid, "answer": "no"})
        state = await on_b.call("supervisor.get", {"supervisor_id": sid})
        await until(lambda: a.supervisors[uuid.UUID(sid)].state.state is S.WORKING, "working")
        assert state["pending_questions"] == []

        resumed = await on_b.call("supervisor.resume", {"supervisor_id": sid})
        assert resumed["source"] == "manual", resumed  # carried out by A
        await agent.expect("cancel")  # the old agent is told to go
        agent = await relay.accept()
        start = await agent.expect("start")
        assert start["restoration"]["source"] == "manual"

        cancelled = await on_b.call("supervisor.cancel", {"supervisor_id": sid})
        assert cancelled["state"] == "failed", cancelled
        await agent.expect("cancel")
        assert b.supervisors == {}  # it never ran on B


async def test_handover_at_shutdown_and_takeover_by_the_peer(
    db_params: object, short_tmp: object, relay: Relay
) -> None:
    """SIGTERM on A with B alive: A releases its lease, B claims at once (not after the
    TTL) and restores the supervisor with source task_reassignment, its open question
    re-delivered; an answer then reaches the new agent."""
    ttl = 30.0  # a takeover by expiry would not come within the test's deadline
    a_config = daemon_config(db_params, short_tmp, lease_ttl=ttl, lease_renew=RENEW)  # type: ignore[arg-type]
    b_config = daemon_config(db_params, short_tmp, lease_ttl=ttl, lease_renew=RENEW)  # type: ignore[arg-type]
    async with running_daemon(b_config) as b, client_for(b) as on_b, on_b.events() as events:
        async with running_daemon(a_config) as a, client_for(a) as on_a:
            created = await on_a.call(
                "supervisor.create", {"name": "moving", "command": relay.command, "goal": "g"}
            )
            sid = created["supervisor_id"]
            first = await relay.accept()
            await first.expect("start")
            reply = await first.request({"type": "ask", "question": "Go?", "choices": ["go"]})
            qid = reply["question_id"]
        # A stopped (handover): B takes it over now.
        restored = await next_event(events, "supervisor.restored", supervisor_id=sid)
        assert restored["source"] == "task_reassignment"
        second = await relay.accept()
        start = await second.expect("start")
        assert start["restoration"]["source"] == "task_reassignment"
        assert [q["id"] for q in start["restoration"]["pending_questions"]] == [qid]
        state = await on_b.call("supervisor.get", {"supervisor_id": sid})
        assert state["owner_daemon_id"] == str(b.daemon_id) and state["lease_epoch"] == 2
        await on_b.call("question.answer", {"question_id": qid, "answer": "go"})
        got = await second.expect("answer")
        assert got["answer"] == "go"
        status = await on_b.call("daemon.status")
        daemons = {d["daemon_id"]: d for d in status["cluster"]["daemons"]}
        assert daemons[str(b.daemon_id)]["alive"] and daemons[str(b.daemon_id)]["supervisors"] == 1
        assert not daemons[str(a.daemon_id)]["alive"]
        shown = await makima(b.config.socket_path, "status")
        assert shown.code == 0, shown
        rows = {line.split()[0]: line for line in shown.out.splitlines() if line[:1].isalnum()}
        mine = rows[str(b.daemon_id)[:8]]
        assert "(this)" in mine and " yes " in mine and mine.rstrip().endswith("1"), shown.out
        assert "released" in rows[str(a.daemon_id)[:8]], shown.out


async def test_a_fenced_copy_stops_and_acknowledges_nothing(
    db_params: object, short_tmp: object, relay: Relay
) -> None:
    """Another daemon claims a supervisor under A's feet (its epoch bumped): A's next
    write fails its fence, A kills the agent and acks nothing."""
    config = daemon_config(db_params, short_tmp, lease_ttl=TTL, lease_renew=RENEW)  # type: ignore[arg-type]
    async with running_daemon(config) as a, client_for(a) as on_a:
        created = await on_a.call(
            "supervisor.create", {"name": "taken", "command": relay.command, "goal": "g"}
        )
        sid = uuid.UUID(created["supervisor_id"])
        agent = await relay.accept()
        await agent.expect("start")
        thief = uuid.uuid4()
        await a.db.pool.execute(
            "UPDATE supervisor_states SET owner_daemon_id = $2, lease_epoch = lease_epoch + 1 "
            "WHERE supervisor_id = $1",
            sid,
            thief,
        )
        await agent.send({"type": "phase", "phase": "late", "ref": "r1"})
        assert await agent.receive() is None  # no ack: stdin closed, the agent killed
        await until(lambda: sid not in a.supervisors, "the fenced runner gone")
        row = await repo.get_supervisor_state_for_restoration(a.db.pool, sid)
        assert row is not None and row.phase is None and row.owner_daemon_id == thief


async def test_the_lease_is_renewed_and_a_lapse_stops_every_agent(
    db_params: object, short_tmp: object, relay: Relay
) -> None:
    """Past its lease's local deadline without a renewal, a daemon stops its agents
    (here the renewals are made to fail); once it renews again, it takes its own
    supervisors back."""
    config = daemon_config(db_params, short_tmp, lease_ttl=TTL, lease_renew=RENEW)  # type: ignore[arg-type]
    async with running_daemon(config) as a, client_for(a) as on_a:
        created = await on_a.call(
            "supervisor.create", {"name": "lapse", "command": relay.command, "goal": "g"}
        )
        sid = uuid.UUID(created["supervisor_id"])
        agent = await relay.accept()
        await agent.expect("start")
        member = a.member
        assert member is not None
        broken = anyio.Event()
        real = a.store.renew_lease

        async def failing(*args: object, **kwargs: object) -> object:
            if not broken.is_set():
                raise ConnectionResetError("the database is away (test)")
            return await real(*args, **kwargs)  # type: ignore[arg-type]

        a.store.renew_lease = failing  # type: ignore[method-assign]
        assert await agent.receive() is None  # killed at the lease's local deadline
        assert member.is_lapsed and not a.lease_valid()
        broken.set()  # renewals succeed again: the supervisor comes back here
        second = await relay.accept()
        start = await second.expect("start")
        assert start["restoration"]["source"] == "daemon_restart"
        state = await on_a.call("supervisor.get", {"supervisor_id": str(sid)})
        assert state["owner_daemon_id"] == str(a.daemon_id) and state["lease_epoch"] == 2


async def test_an_answer_waiting_on_a_lock_keeps_the_question_asked_meanwhile(
    pool: asyncpg.Pool,
) -> None:
    """Another daemon answers Q1 while the owner's ask of Q2 holds the row: after the
    wait, the answer is applied to the newest row, so Q2 stays open."""
    owner = uuid.uuid4()
    await repo.register_daemon(pool, owner, "a", 1, ttl=60)
    sid = await owned_supervisor(pool, owner)
    fence = Fence(owner, 1)
    first, second = question(), question()
    await repo.question_asked(sid, first, S.WAITING_FOR_USER, fence).run(pool)
    async with pool.acquire() as conn:
        tx = conn.transaction()
        await tx.start()
        await repo.question_asked(sid, second, S.WAITING_FOR_USER, fence).run(conn)
        async with anyio.create_task_group() as tg:
            tg.start_soon(repo.answer_question, pool, first.id, "yes", 0)
            with anyio.fail_after(DEADLINE):  # the answer waits on the row's lock
                # nothing announces a lock wait but the server's own view
                while not await pool.fetchval(  # noqa: ASYNC110
                    "SELECT count(*) FROM pg_stat_activity WHERE wait_event_type = 'Lock' "
                    "AND datname = current_database()"
                ):
                    await anyio.sleep(0.02)
            await tx.commit()
    state = await repo.get_supervisor_state_for_restoration(pool, sid)
    assert state is not None
    assert [q.id for q in state.pending_questions] == [second.id]
    assert state.state is S.WAITING_FOR_USER


async def test_only_what_nobody_holds_is_cancelled_or_failed_by_a_claim(
    pool: asyncpg.Pool,
) -> None:
    live, dead, me = uuid.uuid4(), uuid.uuid4(), uuid.uuid4()
    await repo.register_daemon(pool, live, "a", 1, ttl=60)
    await repo.register_daemon(pool, dead, "b", 2, ttl=0)
    held, orphan = await owned_supervisor(pool, live), await owned_supervisor(pool, dead)
    task = TaskRecord(uuid.uuid4(), orphan, "t", ("true",))
    await repo.task_spawned(task, None, Fence(dead, 1)).run(pool)
    assert not await repo.claim_failed(pool, me, held, "refused")
    assert not await repo.cancel_unheld(pool, me, held, "cancelled by uid 0")
    assert await repo.cancel_unheld(pool, me, orphan, "cancelled by uid 0")
    state = await repo.get_supervisor_state_for_restoration(pool, orphan)
    assert state is not None and state.state is S.FAILED and state.owner_daemon_id == me
    tasks = await repo.get_tasks_for_supervisor(pool, orphan)
    assert [t.status for t in tasks] == [repo.TaskStatus.CANCELLED]
    held_state = await repo.get_supervisor_state_for_restoration(pool, held)
    assert held_state is not None and held_state.state is not S.FAILED

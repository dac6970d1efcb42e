"""Every repository function against a real PostgreSQL."""

from __future__ import annotations

import uuid
from datetime import UTC, datetime

import anyio
import asyncpg
import pytest

from makima import repository as repo
from makima.database import Database, is_connection_error
from makima.errors import (
    ConflictError,
    InvalidAnswerError,
    InvalidValueError,
    NotFoundError,
    SavePointRefusedError,
)
from makima.model import (
    Heartbeat,
    PendingQuestion,
    RestorationSource,
    SupervisorSpec,
    SupervisorState,
    TaskRecord,
    TaskStatus,
)
from makima.model import (
    SupervisorStateEnum as S,
)

pytestmark = pytest.mark.anyio


async def new_supervisor(pool: asyncpg.Pool, name: str = "sup") -> uuid.UUID:
    spec = SupervisorSpec.new(name, ["python", "-c", "pass"], goal="test goal", env={"K": "v"})
    state = await repo.create_supervisor(pool, spec)
    assert state.state is S.INITIALIZING
    return spec.supervisor_id


def question(text: str = "Ship it?", choices: tuple[str, ...] = ("yes", "no")) -> PendingQuestion:
    return PendingQuestion(
        id=uuid.uuid4(), question=text, choices=choices, context="ctx", asked_at=datetime.now(UTC)
    )


async def test_create_and_read_supervisor(pool: asyncpg.Pool) -> None:
    sid = await new_supervisor(pool)
    spec = await repo.get_supervisor_spec(pool, sid)
    assert spec is not None
    assert spec.agent_command == ("python", "-c", "pass")
    assert spec.env == {"K": "v"}
    found = await repo.get_supervisor(pool, sid)
    assert found is not None
    assert found[1] is not None and found[1].version == 0
    listed = await repo.list_supervisors(pool)
    assert [s.supervisor_id for s, _ in listed] == [sid]
    assert await repo.get_supervisor(pool, uuid.uuid4()) is None
    assert await repo.count_supervisors_by_state(pool) == {S.INITIALIZING: 1}


async def test_update_supervisor_detailed_state(pool: asyncpg.Pool) -> None:
    sid = await new_supervisor(pool)
    version = await repo.update_supervisor_detailed_state(pool, sid, S.WORKING, "compiling", 40)
    assert version == 1
    state = await repo.get_supervisor_state_for_restoration(pool, sid)
    assert state is not None
    assert (state.state, state.current_activity, state.progress) == (S.WORKING, "compiling", 40)
    assert (
        await repo.update_supervisor_detailed_state(pool, uuid.uuid4(), S.WORKING, None, 0) is None
    )
    with pytest.raises(asyncpg.CheckViolationError):
        await repo.update_supervisor_detailed_state(pool, sid, S.WORKING, None, 101)


async def test_spawned_tasks_and_validation(pool: asyncpg.Pool) -> None:
    sid = await new_supervisor(pool)
    task = TaskRecord(
        task_id=uuid.uuid4(), supervisor_id=sid, name="lint", command=("ruff", "check")
    )
    created = await repo.create_task(pool, task)
    assert created.status is TaskStatus.PENDING
    again = await repo.create_task(pool, task)  # idempotent by id
    assert again.task_id == task.task_id
    state = await repo.get_supervisor_state_for_restoration(pool, sid)
    assert state is not None and state.spawned_task_ids == (task.task_id,)
    assert (await repo.validate_spawned_tasks(pool, sid)).is_consistent

    ghost = uuid.uuid4()
    assert await repo.add_supervisor_spawned_task(pool, sid, ghost)
    assert await repo.add_supervisor_spawned_task(pool, sid, ghost)  # idempotent
    state = await repo.get_supervisor_state_for_restoration(pool, sid)
    assert state is not None and state.spawned_task_ids == (task.task_id, ghost)
    await pool.execute(
        "INSERT INTO tasks (task_id, supervisor_id, name, command) VALUES ($1, $2, 'x', '{x}')",
        orphan := uuid.uuid4(),
        sid,
    )
    consistency = await repo.validate_spawned_tasks(pool, sid)
    assert consistency.missing_task_rows == (ghost,)
    assert consistency.unlisted_task_ids == (orphan,)
    assert not await repo.add_supervisor_spawned_task(pool, uuid.uuid4(), ghost)
    with pytest.raises(NotFoundError):
        await repo.create_task(pool, TaskRecord(uuid.uuid4(), uuid.uuid4(), "x", ("x",)))


async def test_task_lifecycle(pool: asyncpg.Pool) -> None:
    sid = await new_supervisor(pool)
    task = await repo.create_task(pool, TaskRecord(uuid.uuid4(), sid, "test", ("pytest",)))
    running = await repo.mark_task_running(pool, task.task_id, sid)
    assert running is not None and running.status is TaskStatus.RUNNING and running.attempts == 1
    done = await repo.finish_task(pool, task.task_id, TaskStatus.SUCCEEDED, 0, "ok\n", sid)
    assert done is not None and done.exit_code == 0 and done.finished_at is not None
    assert await repo.finish_task(pool, task.task_id, TaskStatus.FAILED, 1, "", sid) is None
    other = await repo.create_task(pool, TaskRecord(uuid.uuid4(), sid, "slow", ("sleep", "9")))
    await repo.mark_task_running(pool, other.task_id, sid)
    interrupted = await repo.interrupt_unfinished_tasks(pool, sid)
    assert [t.task_id for t in interrupted] == [other.task_id]
    tasks = await repo.get_tasks_for_supervisor(pool, sid)
    assert {t.status for t in tasks} == {TaskStatus.SUCCEEDED, TaskStatus.INTERRUPTED}
    assert (await repo.get_task(pool, other.task_id)) == tasks[1]
    with pytest.raises(ValueError, match="final status"):
        await repo.finish_task(pool, task.task_id, TaskStatus.RUNNING, None, None, sid)


async def test_requeue_interrupted_tasks_only_since_the_last_restoration(
    pool: asyncpg.Pool,
) -> None:
    sid = await new_supervisor(pool)
    old, new, done = [
        await repo.create_task(pool, TaskRecord(uuid.uuid4(), sid, name, ("sleep", "9")))
        for name in ("old", "new", "done")
    ]
    for task in (old, new, done):
        await repo.mark_task_running(pool, task.task_id, sid)
    await repo.finish_task(pool, done.task_id, TaskStatus.SUCCEEDED, 0, "", sid)
    await repo.finish_task(pool, old.task_id, TaskStatus.INTERRUPTED, None, "", sid)
    since = await pool.fetchval("SELECT finished_at FROM tasks WHERE task_id = $1", old.task_id)
    await pool.execute(  # interrupted a moment later (by the next stop)
        "UPDATE tasks SET status = 'interrupted', "
        "finished_at = $2::timestamptz + interval '1 second' WHERE task_id = $1",
        new.task_id,
        since,
    )
    requeued = await repo.requeue_interrupted_tasks(pool, sid, since)
    assert [(t.task_id, t.status, t.finished_at) for t in requeued] == [
        (new.task_id, TaskStatus.PENDING, None)
    ]
    still = await repo.get_task(pool, old.task_id)
    assert still is not None and still.status is TaskStatus.INTERRUPTED
    again = await repo.requeue_interrupted_tasks(pool, sid, None)  # never restored: all
    assert [t.task_id for t in again] == [old.task_id]
    rerun = await repo.mark_task_running(pool, new.task_id, sid)
    assert rerun is not None and rerun.attempts == 2


async def test_pending_questions_add_and_remove(pool: asyncpg.Pool) -> None:
    sid = await new_supervisor(pool)
    q1, q2 = question("one?"), question("two?")
    assert await repo.add_supervisor_pending_question(pool, sid, q1)
    assert await repo.add_supervisor_pending_question(pool, sid, q2)
    assert await repo.add_supervisor_pending_question(pool, sid, q1)  # idempotent
    state = await repo.get_supervisor_state_for_restoration(pool, sid)
    assert state is not None and state.pending_questions == (q1, q2)
    assert await repo.remove_supervisor_pending_question(pool, sid, q1.id)
    assert not await repo.remove_supervisor_pending_question(pool, sid, q1.id)
    state = await repo.get_supervisor_state_for_restoration(pool, sid)
    assert state is not None and state.pending_questions == (q2,)
    assert not await repo.add_supervisor_pending_question(pool, uuid.uuid4(), q1)


async def test_hundred_concurrent_adds_keep_all(pool: asyncpg.Pool) -> None:
    sid = await new_supervisor(pool)
    qs = [question(f"q{i}?") for i in range(100)]
    async with anyio.create_task_group() as tg:
        for q in qs:
            tg.start_soon(repo.add_supervisor_pending_question, pool, sid, q)
    state = await repo.get_supervisor_state_for_restoration(pool, sid)
    assert state is not None
    assert {q.id for q in state.pending_questions} == {q.id for q in qs}
    assert state.version == 100
    # and 100 concurrent removals of half of them leave exactly the other half
    async with anyio.create_task_group() as tg:
        for q in qs[:50]:
            tg.start_soon(repo.remove_supervisor_pending_question, pool, sid, q.id)
    state = await repo.get_supervisor_state_for_restoration(pool, sid)
    assert state is not None
    assert {q.id for q in state.pending_questions} == {q.id for q in qs[50:]}


async def test_save_supervisor_state_full_upserts(pool: asyncpg.Pool) -> None:
    sid = await new_supervisor(pool)
    q = question()
    full = SupervisorState(
        supervisor_id=sid,
        state=S.WAITING_FOR_USER,
        phase="review",
        current_activity="asking",
        progress=70,
        spawned_task_ids=(uuid.uuid4(),),
        pending_questions=(q,),
        checkpoint_data={"cursor": 7},
        restoration_count=2,
        restoration_source=RestorationSource.MANUAL,
    )
    assert await repo.save_supervisor_state_full(pool, full) == 1
    loaded = await repo.get_supervisor_state_for_restoration(pool, sid)
    assert loaded is not None
    assert loaded.state is S.WAITING_FOR_USER
    assert loaded.pending_questions == (q,)
    assert loaded.checkpoint_data == {"cursor": 7}
    # the restoration bookkeeping is mark_supervisor_restored's alone
    assert (loaded.restoration_count, loaded.restoration_source) == (0, None)
    # insert path of the UPSERT: a spec whose state row is gone
    await pool.execute("DELETE FROM supervisor_states WHERE supervisor_id = $1", sid)
    assert await repo.get_specs_without_state(pool) != []
    assert await repo.save_supervisor_state_full(pool, full) == 1
    assert await repo.get_specs_without_state(pool) == []
    inserted = await repo.get_supervisor_state_for_restoration(pool, sid)
    assert inserted is not None and inserted.restoration_count == 2  # a new row takes it all
    assert inserted.restoration_source is RestorationSource.MANUAL


async def test_mark_supervisor_restored(pool: asyncpg.Pool) -> None:
    sid = await new_supervisor(pool)
    first = await repo.mark_supervisor_restored(pool, sid, RestorationSource.DAEMON_RESTART)
    second = await repo.mark_supervisor_restored(pool, sid, RestorationSource.AGENT_RESTART)
    assert first is not None and second is not None
    assert (first[0], second[0]) == (1, 2)
    assert second[1] >= first[1]
    state = await repo.get_supervisor_state_for_restoration(pool, sid)
    assert state is not None
    assert state.restoration_count == 2
    assert state.restoration_source is RestorationSource.AGENT_RESTART
    assert await repo.mark_supervisor_restored(pool, uuid.uuid4(), RestorationSource.MANUAL) is None
    other = await new_supervisor(pool, "other")
    counts = await repo.mark_supervisors_restored(
        pool, [sid, other], RestorationSource.DAEMON_RESTART
    )
    assert {k: count for k, (count, _) in counts.items()} == {sid: 3, other: 1}
    # a retry: a row already past the version it was given is not counted again
    (_, sid_version), (_, other_version) = counts[sid], counts[other]
    again = await repo.mark_supervisors_restored(
        pool,
        [sid, other],
        RestorationSource.DAEMON_RESTART,
        unless_past={sid: sid_version - 1, other: other_version},
    )
    assert again == {sid: (3, sid_version), other: (2, other_version + 1)}


async def test_get_supervisors_with_pending_questions(pool: asyncpg.Pool) -> None:
    asking, quiet, finished = [await new_supervisor(pool, n) for n in ("a", "b", "c")]
    await repo.add_supervisor_pending_question(pool, asking, question())
    await repo.add_supervisor_pending_question(pool, finished, question())
    await repo.update_supervisor_detailed_state(pool, finished, S.COMPLETED, None, 100)
    found = await repo.get_supervisors_with_pending_questions(pool)
    assert [s.supervisor_id for s in found] == [asking]
    assert quiet not in [s.supervisor_id for s in found]


async def test_unfinished_bulk_load(pool: asyncpg.Pool) -> None:
    a = await new_supervisor(pool, "a")
    b = await new_supervisor(pool, "b")
    await repo.update_supervisor_detailed_state(pool, b, S.FAILED, None, 0, "boom")
    assert [s.supervisor_id for s in await repo.get_unfinished_supervisor_states(pool)] == [a]
    assert len(await repo.list_supervisors(pool, include_finished=True)) == 2
    assert await repo.get_supervisor_state_for_restoration(pool, uuid.uuid4()) is None


async def test_update_supervisor_phase(pool: asyncpg.Pool) -> None:
    sid = await new_supervisor(pool)
    assert await repo.update_supervisor_phase(pool, sid, "testing") == 1
    state = await repo.get_supervisor_state_for_restoration(pool, sid)
    assert state is not None and state.phase == "testing"
    assert await repo.update_supervisor_phase(pool, uuid.uuid4(), "x") is None


async def test_heartbeats(pool: asyncpg.Pool) -> None:
    a = await new_supervisor(pool, "a")
    b = await new_supervisor(pool, "b")
    assert await repo.update_supervisor_heartbeat_state(pool, a, S.WORKING, "thinking", 10)
    state = await repo.get_supervisor_state_for_restoration(pool, a)
    assert state is not None and state.last_heartbeat is not None
    assert state.version == 0  # heartbeats are light: no version bump
    assert not await repo.update_supervisor_heartbeat_state(pool, uuid.uuid4(), S.WORKING, None, 0)
    version_b = await repo.update_supervisor_detailed_state(pool, b, S.WAITING_FOR_USER, None, 0)
    assert version_b is not None
    outcomes = await repo.update_supervisors_heartbeat_bulk(
        pool,
        [Heartbeat(a, S.WORKING, "x", 20, 0), Heartbeat(b, S.WAITING_FOR_USER, None, 5, version_b)],
    )
    assert outcomes == {a: (0, True), b: (version_b, True)}
    state_b = await repo.get_supervisor_state_for_restoration(pool, b)
    assert state_b is not None and state_b.state is S.WAITING_FOR_USER and state_b.progress == 5
    # a beat taken before a save point changed the state never undoes it
    stale = Heartbeat(b, S.WORKING, "stale", 1, version_b)
    assert await repo.update_supervisors_heartbeat_bulk(pool, [stale]) == {}
    state_b = await repo.get_supervisor_state_for_restoration(pool, b)
    assert state_b is not None and state_b.state is S.WAITING_FOR_USER and state_b.progress == 5
    # nor one taken before a save point that kept the state: the row's version moved on
    newer = await repo.update_supervisor_detailed_state(pool, b, S.WAITING_FOR_USER, "acked", 7)
    assert newer == version_b + 1
    behind = Heartbeat(b, S.WAITING_FOR_USER, "older", 6, version_b)
    assert await repo.update_supervisors_heartbeat_bulk(pool, [behind]) == {b: (newer, False)}
    state_b = await repo.get_supervisor_state_for_restoration(pool, b)
    assert state_b is not None
    assert (state_b.current_activity, state_b.progress) == ("acked", 7)
    assert state_b.last_heartbeat is not None and state_b.version == newer
    assert await repo.update_supervisors_heartbeat_bulk(pool, []) == {}


async def test_messages_and_checkpoints(pool: asyncpg.Pool) -> None:
    sid = await new_supervisor(pool)
    for i in range(5):
        assert await repo.append_supervisor_message(pool, sid, "assistant", {"n": i}) == i + 1
    history = await repo.get_supervisor_messages(pool, sid)
    assert [m.content for m in history] == [{"n": i} for i in range(5)]
    last_two = await repo.get_supervisor_messages(pool, sid, limit=2)
    assert [m.seq for m in last_two] == [4, 5]

    assert await repo.get_latest_supervisor_checkpoint(pool, sid) is None
    state = await repo.get_supervisor_state_for_restoration(pool, sid)
    assert state is not None
    assert await repo.save_supervisor_checkpoint(pool, sid, state, "explicit") == 1
    moved = SupervisorState(supervisor_id=sid, state=S.WORKING, phase="p2", progress=50)
    assert await repo.save_supervisor_checkpoint(pool, sid, moved, "phase_change") == 2
    latest = await repo.get_latest_supervisor_checkpoint(pool, sid)
    assert latest is not None and latest.seq == 2 and latest.snapshot == moved
    assert latest.reason == "phase_change"


async def test_question_asked_answered_exactly_once(pool: asyncpg.Pool) -> None:
    sid = await new_supervisor(pool)
    q = question()
    version = await repo.record_question_asked(pool, sid, q, S.WAITING_FOR_USER)
    assert version >= 1
    assert (
        await repo.record_question_asked(pool, sid, q, S.WAITING_FOR_USER) > version
    )  # idempotent
    state = await repo.get_supervisor_state_for_restoration(pool, sid)
    assert state is not None and state.state is S.WAITING_FOR_USER
    assert state.pending_questions == (q,)
    open_qs = await repo.list_open_questions(pool)
    assert [r.question_id for r in open_qs] == [q.id]
    assert await repo.list_open_questions(pool, uuid.uuid4()) == []

    with pytest.raises(InvalidAnswerError, match="'maybe' is not one of the choices"):
        await repo.answer_question(pool, q.id, "maybe", 1000)
    answered = await repo.answer_question(pool, q.id, "yes", 1000)
    assert answered.answer == "yes" and answered.answered_by_uid == 1000
    with pytest.raises(ConflictError) as conflict:
        await repo.answer_question(pool, q.id, "no", 1000)
    assert conflict.value.data["answer"] == "yes"
    with pytest.raises(NotFoundError):
        await repo.answer_question(pool, uuid.uuid4(), "yes", 0)
    with pytest.raises(NotFoundError):
        await repo.record_question_asked(pool, uuid.uuid4(), question(), S.WAITING_FOR_USER)

    state = await repo.get_supervisor_state_for_restoration(pool, sid)
    assert state is not None and state.pending_questions == ()
    assert await repo.list_open_questions(pool) == []
    undelivered = await repo.get_undelivered_answers(pool, sid)
    assert [u.question_id for u in undelivered] == [q.id]
    assert await repo.mark_answer_delivered(pool, q.id, sid)
    assert not await repo.mark_answer_delivered(pool, q.id, sid)
    assert await repo.get_undelivered_answers(pool, sid) == []
    record = await repo.get_question(pool, q.id)
    assert record is not None and record.delivered_at is not None


async def test_concurrent_answers_only_one_wins(pool: asyncpg.Pool) -> None:
    sid = await new_supervisor(pool)
    q = question(choices=())
    await repo.record_question_asked(pool, sid, q, S.WAITING_FOR_USER)
    outcomes: list[str] = []

    async def answer(text: str) -> None:
        try:
            await repo.answer_question(pool, q.id, text, 0)
            outcomes.append("ok")
        except ConflictError:
            outcomes.append("conflict")

    async with anyio.create_task_group() as tg:
        for i in range(20):
            tg.start_soon(answer, f"answer {i}")
    assert sorted(outcomes) == ["conflict"] * 19 + ["ok"]


async def test_redelivery_count(pool: asyncpg.Pool) -> None:
    sid = await new_supervisor(pool)
    q1, q2 = question("a?"), question("b?")
    await repo.record_question_asked(pool, sid, q1, S.WAITING_FOR_USER)
    await repo.record_question_asked(pool, sid, q2, S.WAITING_FOR_USER)
    await repo.answer_question(pool, q2.id, "yes", 0)
    assert await repo.increment_redelivery_count(pool, [q1.id, q2.id]) == 1
    record = await repo.get_question(pool, q1.id)
    assert record is not None and record.redelivery_count == 1


async def test_daemons(pool: asyncpg.Pool) -> None:
    did = uuid.uuid4()
    await repo.register_daemon(pool, did, "host", 123)
    assert await repo.touch_daemon(pool, did)
    assert not await repo.touch_daemon(pool, uuid.uuid4())


async def test_a_save_point_the_database_refuses_fails_at_once(pool: asyncpg.Pool) -> None:
    """Retrying cannot cure a value PostgreSQL refuses: the save point fails with a
    clear error at the first attempt instead of waiting forever."""
    db = Database(pool)
    sid = await new_supervisor(pool)
    attempts = 0

    async def refused(p: asyncpg.Pool, value: object) -> object:
        nonlocal attempts
        attempts += 1
        return await repo.update_supervisor_phase(p, sid, value)  # type: ignore[arg-type]

    # a server-side refusal (NUL in text) and a client-side one (a value asyncpg cannot encode)
    for value, shown in (("a\x00b", "phase"), (12, "phase")):
        attempts = 0
        with anyio.fail_after(10), pytest.raises(SavePointRefusedError, match=shown):
            await db.save(lambda p, v=value: refused(p, v), "phase")
        assert attempts == 1


def test_only_connection_failures_are_retried() -> None:
    assert is_connection_error(ConnectionResetError())
    assert is_connection_error(asyncpg.InterfaceError("connection is closed"))
    assert is_connection_error(asyncpg.exceptions.ConnectionDoesNotExistError())
    assert not is_connection_error(asyncpg.exceptions.CharacterNotInRepertoireError())
    assert not is_connection_error(asyncpg.exceptions.UnsupportedClientFeatureError("x"))
    assert not is_connection_error(ValueError("x"))


async def test_save_points_are_single_statements_that_pipeline(pool: asyncpg.Pool) -> None:
    """Every batchable save point returns exactly one row per execution, also when it
    writes nothing, so that many go in one pipeline (fetchmany) and row i is call i's."""
    sid = await new_supervisor(pool)
    ghost = uuid.uuid4()
    bounds = [
        repo.state_change(sid, S.WORKING, "a", 1),
        repo.state_change(ghost, S.WORKING, "b", 2),  # no such supervisor: a NULL version
        repo.state_change(sid, S.IDLE, "c", 3),
    ]
    async with pool.acquire() as conn:
        rows = await conn.fetchmany(bounds[0].sql, [b.args for b in bounds])
    assert [b.decode(r) for b, r in zip(bounds, rows, strict=True)] == [1, None, 2]
    for bound in (
        repo.task_started(uuid.uuid4(), ghost),
        repo.task_finished(uuid.uuid4(), TaskStatus.FAILED, 1, "", ghost),
        repo.answer_delivered(uuid.uuid4(), ghost),
    ):
        assert await bound.run(pool) in (None, False)
    with pytest.raises(NotFoundError, match=str(ghost)):
        await repo.phase_change(SupervisorState(supervisor_id=ghost)).run(pool)


async def test_phase_change_and_checkpoint_write_both_rows_in_one_statement(
    pool: asyncpg.Pool,
) -> None:
    sid = await new_supervisor(pool)
    snapshot = SupervisorState(supervisor_id=sid, state=S.WORKING, phase="build", progress=10)
    assert await repo.record_phase_change(pool, snapshot) == 1
    with_data = SupervisorState(supervisor_id=sid, state=S.WORKING, checkpoint_data={"k": 1})
    assert await repo.record_agent_checkpoint(pool, with_data) == 2
    rows = await pool.fetch(
        "SELECT seq, reason FROM supervisor_checkpoints WHERE supervisor_id = $1 ORDER BY seq",
        sid,
    )
    assert [(r["seq"], r["reason"]) for r in rows] == [(1, "phase_change"), (2, "explicit")]
    state = await repo.get_supervisor_state_for_restoration(pool, sid)
    assert state is not None and (state.phase, state.checkpoint_data) == ("build", {"k": 1})


async def test_a_spawn_with_a_new_state_is_one_save_point(pool: asyncpg.Pool) -> None:
    sid = await new_supervisor(pool)
    task = TaskRecord(uuid.uuid4(), sid, "t", ("true",))
    record, version = await repo.task_spawned(task, S.WORKING).run(pool)
    assert record.task_id == task.task_id and version == 1
    again, version = await repo.task_spawned(task).run(pool)  # idempotent by id
    assert again == record and version == 2
    state = await repo.get_supervisor_state_for_restoration(pool, sid)
    assert state is not None and state.state is S.WORKING
    assert state.spawned_task_ids == (task.task_id,)


async def test_an_answer_retried_after_a_lost_reply_finds_its_own_commit(
    pool: asyncpg.Pool,
) -> None:
    sid = await new_supervisor(pool)
    q = question()
    await repo.record_question_asked(pool, sid, q, S.WAITING_FOR_USER)
    first = await repo.answer_question(pool, q.id, "yes", 5, state=S.WORKING)
    again = await repo.answer_question(pool, q.id, "yes", 5, state=S.WORKING, retry=True)
    assert (again.answer, again.answered_at) == ("yes", first.answered_at)
    with pytest.raises(ConflictError):  # another uid's same text is a second answer
        await repo.answer_question(pool, q.id, "yes", 6, retry=True)
    other = question(choices=())
    await repo.record_question_asked(pool, sid, other, S.WAITING_FOR_USER)
    with pytest.raises(InvalidValueError, match="non-empty"):
        await repo.answer_question(pool, other.id, "  ", 5)
    record = await repo.get_question(pool, other.id)
    assert record is not None and record.answer is None

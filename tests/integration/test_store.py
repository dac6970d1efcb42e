"""The store against a real PostgreSQL: every save point is one round trip (counted
on the wire), a lost connection sends a save point into the retries alone, and an
answer from a client is one statement."""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import anyio
import pytest

from makima import repository as repo
from makima.control.client import ControlClient
from makima.daemon import Daemon
from makima.database import Database, Pool, create_pool
from makima.embedded import ConnectParams
from makima.errors import ConflictError, InvalidAnswerError, NotFoundError
from makima.model import (
    Heartbeat,
    PendingQuestion,
    RestorationSource,
    SupervisorSpec,
    TaskRecord,
    TaskStatus,
)
from makima.model import SupervisorStateEnum as S
from makima.store import (
    AnswersDelivered,
    CheckpointSaved,
    Heartbeats,
    MessageAdded,
    PhaseChange,
    QuestionAnswered,
    QuestionAsked,
    RestorationsCounted,
    StateChange,
    StateRestored,
    Store,
    SupervisorCreated,
    TaskFinished,
    TaskSpawned,
    TaskStarted,
)
from tests.harness import Relay
from tests.integration.test_store_committer import (
    Wire,
    counting_proxy,
    lock_waiter,
    row_locked,
)

pytestmark = pytest.mark.anyio


@pytest.fixture
async def store(pool: Pool) -> Store:
    return Store(Database(pool))


@pytest.fixture
async def wired(db_params: ConnectParams, short_tmp: Path) -> AsyncIterator[tuple[Pool, Wire]]:
    """A pool of one connection (makima's own settings) behind the counting proxy."""
    async with counting_proxy(db_params, short_tmp) as (dsn, wire):
        pool = await create_pool(dsn, min_size=1, max_size=1)
        try:
            yield pool, wire
        finally:
            await pool.close()


async def created(store: Store, name: str = "s") -> uuid.UUID:
    spec = SupervisorSpec.new(name, ["true"])
    await store.create_supervisor(SupervisorCreated(spec))
    return spec.supervisor_id


def question(text: str = "Ship?", choices: tuple[str, ...] = ("yes", "no")) -> PendingQuestion:
    return PendingQuestion(uuid.uuid4(), text, choices, None, datetime.now(UTC))


async def test_every_save_point_is_one_round_trip(wired: tuple[Pool, Wire]) -> None:
    """Counted on the wire: one ReadyForQuery per save point, the server idle after
    each (no BEGIN/COMMIT), and no reset query when the connection goes back."""
    pool, wire = wired
    store = Store(Database(pool))
    sid = await created(store)
    state = await repo.get_supervisor_state_for_restoration(pool, sid)
    assert state is not None
    asked = [question(f"q{i}?") for i in range(4)]
    tasks = [TaskRecord(uuid.uuid4(), sid, f"t{i}", ("true",)) for i in range(2)]
    kinds: dict[str, Callable[[int], Awaitable[Any]]] = {
        "create": lambda i: created(store, f"n{i}"),
        "state": lambda i: store.change_state(StateChange(sid, S.WORKING, f"a{i}", i)),
        "phase": lambda i: store.change_phase(PhaseChange(state)),
        "checkpoint": lambda i: store.save_checkpoint(CheckpointSaved(state)),
        "message": lambda i: store.add_message(MessageAdded(sid, "assistant", {"i": i})),
        "ask": lambda i: store.ask_question(QuestionAsked(sid, asked[i], S.WAITING_FOR_USER)),
        "answer": lambda i: store.answer_question(
            QuestionAnswered(asked[i].id, "yes", 0, S.WORKING)
        ),
        "redelivered_answer": lambda i: store.deliver_answers(AnswersDelivered((asked[i].id,))),
        "spawn": lambda i: store.spawn_task(TaskSpawned(tasks[i], S.WORKING)),
        "task_start": lambda i: store.start_task(
            TaskStarted(tasks[i].task_id, tasks[i].supervisor_id)
        ),
        "task_finished": lambda i: store.finish_task(
            TaskFinished(tasks[i].task_id, TaskStatus.SUCCEEDED, 0, "ok", tasks[i].supervisor_id)
        ),
        "heartbeat": lambda i: store.beat(Heartbeats((Heartbeat(sid, S.WORKING, "beat", 10, 0),))),
        "restore_state": lambda i: store.restore_state(StateRestored(state)),
        "restore_mark": lambda i: store.count_restorations(
            RestorationsCounted((sid,), RestorationSource.MANUAL)
        ),
    }
    trips: dict[str, int] = {}
    for name, save in kinds.items():
        await save(0)  # the first one also prepares the statement
        before = wire.mark()
        await save(1)
        trips[name] = wire.round_trips - before
    assert trips == dict.fromkeys(kinds, 1)
    assert set(wire.statuses) == {"I"}


async def test_the_answer_save_point_keeps_every_guarantee(store: Store) -> None:
    sid = await created(store)
    q = question()
    version = await store.ask_question(QuestionAsked(sid, q, S.WAITING_FOR_USER))
    assert await store.ask_question(QuestionAsked(sid, q, S.WAITING_FOR_USER)) > version
    with pytest.raises(InvalidAnswerError, match="not one of the choices"):
        await store.answer_question(QuestionAnswered(q.id, "maybe", 7))
    record = await store.answer_question(QuestionAnswered(q.id, "yes", 7, S.WORKING))
    assert (record.answer, record.answered_by_uid) == ("yes", 7)
    assert record.answered_at is not None
    with pytest.raises(ConflictError) as conflict:
        await store.answer_question(QuestionAnswered(q.id, "no", 8))
    assert conflict.value.data["answer"] == "yes"
    with pytest.raises(NotFoundError):
        await store.answer_question(QuestionAnswered(uuid.uuid4(), "yes", 7))
    state = await store.load_state(sid)
    assert state is not None and state.state is S.WORKING and state.pending_questions == ()
    assert await store.list_open_questions() == []


async def test_a_save_point_whose_connection_is_lost_is_retried_alone_and_acknowledged(
    db_params: ConnectParams, pool: Pool
) -> None:
    small = await create_pool(db_params, min_size=1, max_size=1)
    try:
        store = Store(Database(small))
        sid = await created(store)
        versions: list[int | None] = []

        async def change() -> None:
            versions.append(await store.change_state(StateChange(sid, S.WORKING, "kept", 9)))

        with anyio.fail_after(30):
            async with anyio.create_task_group() as tg, row_locked(db_params, sid):
                tg.start_soon(change)
                pid = await lock_waiter(pool)  # the first attempt, in flight
                await pool.execute("SELECT pg_terminate_backend($1)", pid)
                await lock_waiter(pool, other_than=pid)  # the retry, on a new connection
                assert versions == []  # acknowledged only once committed
        assert versions == [1]
        state = await store.load_state(sid)
        assert state is not None and (state.current_activity, state.version) == ("kept", 1)
    finally:
        await small.close()


async def test_an_answer_from_a_client_reads_nothing_before_its_statement(
    daemon: Daemon, client: ControlClient, relay: Relay, monkeypatch: pytest.MonkeyPatch
) -> None:
    sid = (await client.call("supervisor.create", {"name": "a", "command": relay.command}))[
        "supervisor_id"
    ]
    agent = await relay.accept()
    await agent.expect("start")
    qid = (await agent.request({"type": "ask", "question": "Ship?", "choices": ["ship"]}))[
        "question_id"
    ]
    reads: list[str] = []
    for name in ("get_question", "get_supervisor"):
        real = getattr(Store, name)

        async def counted(self: Store, *args: Any, _name: str = name, _real: Any = real) -> Any:
            reads.append(_name)
            return await _real(self, *args)

        monkeypatch.setattr(Store, name, counted)
    answers: list[QuestionAnswered] = []
    real_answer = Store.answer_question

    async def answered(self: Store, command: QuestionAnswered) -> Any:
        answers.append(command)
        return await real_answer(self, command)

    monkeypatch.setattr(Store, "answer_question", answered)
    result = await client.call("question.answer", {"question_id": qid, "answer": "ship"})
    assert result["supervisor_id"] == sid and result["answer"] == "ship"
    assert reads == []
    assert [(str(c.question_id), c.answer, c.state) for c in answers] == [(qid, "ship", S.WORKING)]
    assert await agent.expect("answer") == {"type": "answer", "question_id": qid, "answer": "ship"}

"""The group committer against a real PostgreSQL (no mock anywhere).

Round trips are counted on the wire: the connections go through a small Unix
socket proxy that reads the server's messages and counts ReadyForQuery, which
PostgreSQL sends exactly once per round trip (one per Sync or simple Query).
A commit in flight is held by a row lock taken from another connection, and
the test goes on once every task is blocked (``anyio.wait_all_tasks_blocked``).
"""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path

import anyio
import anyio.abc
import asyncpg
import pytest

from makima import repository as repo
from makima.database import Pool, create_pool
from makima.embedded import ConnectParams
from makima.model import SupervisorSpec
from makima.model import SupervisorStateEnum as S
from makima.store import Committer

pytestmark = pytest.mark.anyio


# --------------------------------------------------------------------------- the wire


@dataclass
class Wire:
    """What the proxied connections said: round trips, and the server's
    transaction status after each (I: idle, T: in a transaction block, E: failed)."""

    round_trips: int = 0
    statuses: list[str] = field(default_factory=list)

    def mark(self) -> int:
        return self.round_trips


def _count(wire: Wire, buffer: bytearray) -> None:
    """Consume whole server messages from ``buffer``: type byte, int32 length."""
    while len(buffer) >= 5:
        length = int.from_bytes(buffer[1:5], "big")
        if len(buffer) < 1 + length:
            return
        if buffer[0:1] == b"Z":  # ReadyForQuery
            wire.round_trips += 1
            wire.statuses.append(chr(buffer[5]))
        del buffer[: 1 + length]


@asynccontextmanager
async def counting_proxy(server: ConnectParams, where: Path) -> AsyncIterator[tuple[str, Wire]]:
    """A DSN that reaches ``server`` through a proxy counting round trips."""
    directory = where / f"px-{uuid.uuid4().hex[:8]}"
    directory.mkdir()
    target = str(Path(server.host) / f".s.PGSQL.{server.port}")
    listener = await anyio.create_unix_listener(directory / f".s.PGSQL.{server.port}")
    wire = Wire()

    async def server_to_client(
        src: anyio.abc.SocketStream, dst: anyio.abc.SocketStream, done: anyio.CancelScope
    ) -> None:
        buffer = bytearray()
        try:
            async for chunk in src:
                buffer += chunk
                _count(wire, buffer)  # before the client can see it
                await dst.send(chunk)
        except (anyio.BrokenResourceError, anyio.ClosedResourceError):
            pass
        done.cancel()

    async def client_to_server(
        src: anyio.abc.SocketStream, dst: anyio.abc.SocketStream, done: anyio.CancelScope
    ) -> None:
        try:
            async for chunk in src:
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
            tg.start_soon(server_to_client, upstream, client, tg.cancel_scope)
            tg.start_soon(client_to_server, client, upstream, tg.cancel_scope)

    password = f":{server.password}" if server.password else ""
    dsn = (
        f"postgresql://{server.user}{password}@/{server.database}"
        f"?host={directory}&port={server.port}&sslmode=disable"
    )
    async with listener, anyio.create_task_group() as tg:
        tg.start_soon(listener.serve, handle)
        try:
            yield dsn, wire
        finally:
            tg.cancel_scope.cancel()


@pytest.fixture
async def wired(db_params: ConnectParams, short_tmp: Path) -> AsyncIterator[tuple[Pool, Wire]]:
    """A pool of one connection (makima's own settings) behind the counting proxy."""
    async with counting_proxy(db_params, short_tmp) as (dsn, wire):
        pool = await create_pool(dsn, min_size=1, max_size=1)
        try:
            yield pool, wire
        finally:
            await pool.close()


@asynccontextmanager
async def row_locked(params: ConnectParams, supervisor_id: uuid.UUID) -> AsyncIterator[None]:
    """Hold ``supervisor_id``'s state row locked from another connection until exit:
    a commit that writes it stays in flight meanwhile."""
    conn = await asyncpg.connect(**params.asyncpg_kwargs())
    try:
        async with conn.transaction():
            await conn.execute(
                "SELECT 1 FROM supervisor_states WHERE supervisor_id = $1 FOR UPDATE",
                supervisor_id,
            )
            yield
    finally:
        await conn.close()


async def new_supervisor(pool: Pool) -> uuid.UUID:
    spec = SupervisorSpec.new("c", ["true"])
    await repo.create_supervisor(pool, spec)
    return spec.supervisor_id


# --------------------------------------------------------------------------- tests


async def test_a_lone_save_point_goes_out_at_once_in_one_round_trip(
    wired: tuple[Pool, Wire],
) -> None:
    pool, wire = wired
    sid = await new_supervisor(pool)
    committer = Committer(pool)
    await committer.submit(repo.state_change(sid, S.WORKING, "warm", 1))  # prepares it
    before = wire.mark()
    with anyio.fail_after(10):
        version = await committer.submit(repo.state_change(sid, S.WORKING, "alone", 2))
    assert version == 2
    assert wire.round_trips - before == 1  # no BEGIN/COMMIT, no reset query
    assert wire.statuses[-1] == "I"
    assert (committer.stats.commits, committer.stats.largest, committer.busy) == (2, 1, False)


async def test_save_points_arriving_during_a_commit_go_in_the_next_round_trip(
    wired: tuple[Pool, Wire], db_params: ConnectParams
) -> None:
    pool, wire = wired
    first, *others = [await new_supervisor(pool) for _ in range(4)]
    committer = Committer(pool)
    for sid in (first, *others):  # prepared, and every row at version 1
        await committer.submit(repo.state_change(sid, S.WORKING, "warm", 0))
    versions: dict[uuid.UUID, int | None] = {}
    acknowledged: list[uuid.UUID] = []

    async def save(sid: uuid.UUID) -> None:
        versions[sid] = await committer.submit(repo.state_change(sid, S.IDLE, "batched", 5))
        acknowledged.append(sid)

    before = wire.mark()
    with anyio.fail_after(20):
        async with anyio.create_task_group() as tg, row_locked(db_params, first):
            tg.start_soon(save, first)  # leads; its commit waits for the lock
            await anyio.wait_all_tasks_blocked()
            assert committer.busy
            for sid in others:
                tg.start_soon(save, sid)
            await anyio.wait_all_tasks_blocked()
            assert committer.queued == 3 and acknowledged == []  # they wait for a commit
    assert versions == dict.fromkeys((first, *others), 2)
    assert acknowledged[0] == first and set(acknowledged[1:]) == set(others)
    assert wire.round_trips - before == 2  # the commit in flight, then the other three
    assert committer.stats.largest == 3
    for sid in others:
        state = await repo.get_supervisor_state_for_restoration(pool, sid)
        assert state is not None and (state.state, state.progress) == (S.IDLE, 5)


async def test_one_bad_save_point_in_a_batch_fails_only_its_own_caller(
    pool: Pool, db_params: ConnectParams
) -> None:
    first, good, bad, also_good = [await new_supervisor(pool) for _ in range(4)]
    committer = Committer(pool)
    outcomes: dict[uuid.UUID, object] = {}

    async def save(sid: uuid.UUID, progress: int) -> None:
        try:
            outcomes[sid] = await committer.submit(repo.state_change(sid, S.WORKING, "x", progress))
        except asyncpg.CheckViolationError as exc:
            outcomes[sid] = exc

    with anyio.fail_after(20):
        async with anyio.create_task_group() as tg, row_locked(db_params, first):
            tg.start_soon(save, first, 1)
            await anyio.wait_all_tasks_blocked()
            tg.start_soon(save, good, 10)
            tg.start_soon(save, bad, 101)  # the CHECK on progress refuses it
            tg.start_soon(save, also_good, 30)
            await anyio.wait_all_tasks_blocked()
            assert committer.queued == 3
    assert outcomes[first] == 1 and outcomes[good] == 1 and outcomes[also_good] == 1
    assert isinstance(outcomes[bad], asyncpg.CheckViolationError)
    assert committer.stats.split == 1
    state = await repo.get_supervisor_state_for_restoration(pool, also_good)
    assert state is not None and state.progress == 30
    state = await repo.get_supervisor_state_for_restoration(pool, bad)
    assert state is not None and state.version == 0  # nothing of it was written


async def test_a_batch_of_several_kinds_is_one_round_trip_per_kind(
    wired: tuple[Pool, Wire], db_params: ConnectParams
) -> None:
    pool, wire = wired
    first, a, b = [await new_supervisor(pool) for _ in range(3)]
    committer = Committer(pool)
    await committer.submit(repo.state_change(first, S.WORKING, None, 0))
    await committer.submit(repo.message_added(first, "assistant", "warm"))
    seqs: dict[uuid.UUID, int] = {}

    async def message(sid: uuid.UUID, text: str) -> None:
        seqs[sid] = await committer.submit(repo.message_added(sid, "assistant", text))

    async def state(sid: uuid.UUID) -> None:
        await committer.submit(repo.state_change(sid, S.IDLE, None, 1))

    before = wire.mark()
    with anyio.fail_after(20):
        async with anyio.create_task_group() as tg, row_locked(db_params, first):
            tg.start_soon(state, first)
            await anyio.wait_all_tasks_blocked()
            tg.start_soon(message, a, "one")
            tg.start_soon(state, a)
            tg.start_soon(message, b, "two")
            tg.start_soon(state, b)
            await anyio.wait_all_tasks_blocked()
            assert committer.queued == 4
    assert seqs == {a: 1, b: 1}
    assert wire.round_trips - before == 3  # the one in flight, then one per kind
    assert set(wire.statuses) == {"I"}


async def test_a_queued_caller_that_is_cancelled_is_not_written_and_the_rest_go_on(
    pool: Pool, db_params: ConnectParams
) -> None:
    first, dropped, kept = [await new_supervisor(pool) for _ in range(3)]
    committer = Committer(pool)
    done: list[uuid.UUID] = []

    async def save(sid: uuid.UUID) -> None:
        await committer.submit(repo.state_change(sid, S.WORKING, "x", 7))
        done.append(sid)

    with anyio.fail_after(20):
        async with anyio.create_task_group() as tg, row_locked(db_params, first):
            tg.start_soon(save, first)
            await anyio.wait_all_tasks_blocked()
            cancelled = anyio.CancelScope()

            async def doomed() -> None:
                with cancelled:
                    await save(dropped)

            tg.start_soon(doomed)
            tg.start_soon(save, kept)
            await anyio.wait_all_tasks_blocked()
            assert committer.queued == 2
            cancelled.cancel()  # out of the queue: never written
            await anyio.wait_all_tasks_blocked()
            assert committer.queued == 1
    assert done == [first, kept]
    state = await repo.get_supervisor_state_for_restoration(pool, dropped)
    assert state is not None and state.version == 0
    assert not committer.busy


async def lock_waiter(conn: Pool, other_than: int = 0) -> int:
    """The pid of a backend waiting for a row lock in this database (asked again
    until its statement has reached the server: a round trip each, no sleep)."""
    while True:
        pid = await conn.fetchval(
            "SELECT pid FROM pg_stat_activity WHERE datname = current_database() "
            "AND wait_event_type = 'Lock' AND pid <> $1",
            other_than,
        )
        if pid is not None:
            return int(pid)
        await anyio.wait_all_tasks_blocked()


async def test_a_connection_lost_under_a_commit_fails_its_save_points_only(
    pool: Pool, db_params: ConnectParams
) -> None:
    """Those waiting for the next commit go out on a new connection; the one that
    was in flight gets the connection error (the store then retries it alone)."""
    first, a, b = [await new_supervisor(pool) for _ in range(3)]
    committer = Committer(pool)
    outcomes: dict[uuid.UUID, object] = {}

    async def save(sid: uuid.UUID) -> None:
        try:
            outcomes[sid] = await committer.submit(repo.state_change(sid, S.WORKING, "x", 3))
        except Exception as exc:
            outcomes[sid] = exc

    with anyio.fail_after(20):
        async with anyio.create_task_group() as tg, row_locked(db_params, first):
            tg.start_soon(save, first)
            pid = await lock_waiter(pool)
            tg.start_soon(save, a)
            tg.start_soon(save, b)
            await anyio.wait_all_tasks_blocked()
            assert committer.queued == 2
            await pool.execute("SELECT pg_terminate_backend($1)", pid)
    assert isinstance(outcomes[first], asyncpg.PostgresConnectionError | OSError)
    assert outcomes[a] == 1 and outcomes[b] == 1
    assert not committer.busy

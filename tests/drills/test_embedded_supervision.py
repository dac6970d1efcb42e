"""The embedded PostgreSQL is killed under the daemon: it is reaped and started
again on the same data, save points carry on and nothing committed is lost; too
many deaths in a short time end the daemon with a failure; a clean shutdown
stops the server that runs then."""

from __future__ import annotations

import os
import signal
import socket
import uuid
from collections.abc import AsyncIterator, Mapping, Sequence
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import anyio
import pytest
from structlog.testing import capture_logs

from makima import repository as repo
from makima.control.client import ControlClient, RemoteError
from makima.database import Database, DatabaseConfig
from makima.embedded import (
    EmbeddedPostgres,
    PostmasterInfo,
    _process_serves,
    _shared_memory_users,
)
from makima.errors import EmbeddedDatabaseError
from tests.harness import DEADLINE, Relay, until
from tests.integration.test_embedded import _zombie_children
from tests.process import DaemonProcess, daemon_process

pytestmark = [pytest.mark.anyio, pytest.mark.drill]


@pytest.fixture
def state_dir(short_tmp: Path) -> Path:
    return short_tmp / f"sv{uuid.uuid4().hex[:6]}"


def servers_of(pgdata: Path) -> list[int]:
    """Every live postgres process serving ``pgdata``."""
    return [
        int(entry.name)
        for entry in Path("/proc").iterdir()
        if entry.name.isdigit() and _process_serves(int(entry.name), pgdata)
    ]


def events(logs: Sequence[Mapping[str, Any]], name: str) -> list[Mapping[str, Any]]:
    return [entry for entry in logs if entry["event"] == name]


def postmaster(state_dir: Path) -> PostmasterInfo | None:
    try:
        return PostmasterInfo.parse((state_dir / "pgdata" / "postmaster.pid").read_text())
    except FileNotFoundError:
        return None


async def register(db: Database, daemon_id: uuid.UUID) -> None:
    await db.save(
        lambda pool: repo.register_daemon(pool, daemon_id, socket.gethostname(), os.getpid()),
        "register_daemon",
    )


@asynccontextmanager
async def open_database(state_dir: Path, **config: Any) -> AsyncIterator[Database]:
    db = await Database.open(
        DatabaseConfig(state_dir=state_dir, min_connections=2, max_connections=4, **config)
    )
    try:
        yield db
    finally:
        await db.close()
        await anyio.to_thread.run_sync(EmbeddedPostgres(state_dir).stop)  # if a test failed


async def kill_and_wait_for_restart(
    db: Database, logs: Sequence[Mapping[str, Any]], limit: float = 20.0
) -> tuple[int, int]:
    """SIGKILL the embedded postmaster; return its pid and the new server's."""
    assert db.embedded is not None
    old = db.embedded.pid
    assert old is not None
    restarts = len(events(logs, "embedded_postgres.restarted"))
    os.kill(old, signal.SIGKILL)
    await until(
        lambda: len(events(logs, "embedded_postgres.restarted")) > restarts,
        "started again",
        limit,
    )
    new = db.embedded.pid
    assert new is not None and new != old
    return old, new


async def test_killed_server_is_restarted_and_save_points_continue(state_dir: Path) -> None:
    pgdata = state_dir / "pgdata"
    with capture_logs() as logs:
        async with open_database(state_dir) as db, anyio.create_task_group() as tg:
            tg.start_soon(db.supervise)
            before = uuid.uuid4()
            await register(db, before)  # committed: must survive the crash
            assert db.embedded is not None
            old = db.embedded.pid
            assert old is not None

            shared = postmaster(state_dir)
            assert shared is not None and shared.shared_memory is not None
            key, shmid = shared.shared_memory
            os.kill(old, signal.SIGKILL)
            # Its backends outlive it for a moment (a write could still commit there):
            # wait until the last has gone, then the next save point needs a new server.
            await until(lambda: _shared_memory_users(key, shmid) == 0, "all gone")
            during = uuid.uuid4()
            with anyio.fail_after(20):
                await register(db, during)  # waits for the server to come back, then commits

            # The new server can take connections a moment before its starter
            # (a worker thread) has recorded it.
            embedded = db.embedded
            await until(lambda: embedded.pid not in (None, old), "recorded as restarted")
            new = embedded.pid
            assert new is not None
            assert servers_of(pgdata) == [new]
            stored = await db.pool.fetch(
                "SELECT daemon_id FROM daemons WHERE daemon_id = ANY($1::uuid[])",
                [before, during],
            )
            assert {row["daemon_id"] for row in stored} == {before, during}
            assert old not in _zombie_children()  # the dead postmaster was reaped
            with anyio.fail_after(20):
                await register(db, uuid.uuid4())  # and the pool keeps working
            tg.cancel_scope.cancel()
    [restarted] = events(logs, "embedded_postgres.restarted")
    assert restarted["pid"] == new and restarted["previous_pid"] == old
    assert restarted["attempt"] == 1 and restarted["downtime_s"] >= 0
    assert events(logs, "embedded_postgres.died")[0]["exit_status"] == -signal.SIGKILL
    assert servers_of(pgdata) == []


async def test_a_reused_server_is_watched_and_restarted_too(state_dir: Path) -> None:
    """The server an earlier daemon started (and left running when it crashed) is no
    child of this one: its death is seen in /proc. Nobody reaps it here, as under an
    init that does not, and the zombie's socket lock must not stop the new server."""
    earlier = EmbeddedPostgres(state_dir)
    await anyio.to_thread.run_sync(earlier.start)
    try:
        with capture_logs() as logs:
            async with open_database(state_dir) as db, anyio.create_task_group() as tg:
                assert db.embedded is not None and db.embedded.pid == earlier.pid
                tg.start_soon(db.supervise)
                before = uuid.uuid4()
                await register(db, before)
                old, new = await kill_and_wait_for_restart(db, logs)
                assert old in _zombie_children()  # earlier's child, unreaped
                after = uuid.uuid4()
                with anyio.fail_after(20):
                    await register(db, after)
                stored = await db.pool.fetchval(
                    "SELECT count(*) FROM daemons WHERE daemon_id = ANY($1::uuid[])",
                    [before, after],
                )
                assert stored == 2
                assert servers_of(state_dir / "pgdata") == [new]
                tg.cancel_scope.cancel()
        assert len(events(logs, "embedded_postgres.socket_lock_removed")) == 1
        assert servers_of(state_dir / "pgdata") == []
    finally:
        assert earlier._process is not None
        earlier._process.wait(timeout=20)


async def test_too_many_restarts_in_the_window_give_up(state_dir: Path) -> None:
    failures: list[EmbeddedDatabaseError] = []

    async def supervise(db: Database) -> None:
        try:
            await db.supervise()
        except EmbeddedDatabaseError as exc:
            failures.append(exc)

    with capture_logs() as logs:
        async with open_database(
            state_dir, embedded_restart_limit=1, embedded_restart_window=120.0
        ) as db:
            assert db.embedded is not None
            with anyio.fail_after(40):
                async with anyio.create_task_group() as tg:
                    tg.start_soon(supervise, db)
                    await kill_and_wait_for_restart(db, logs)  # the one allowed
                    last = db.embedded.pid
                    assert last is not None
                    os.kill(last, signal.SIGKILL)  # one too many: supervise ends
    [failure] = failures
    assert "1 times within 120s" in str(failure)
    assert len(events(logs, "embedded_postgres.restarted")) == 1
    assert len(events(logs, "embedded_postgres.restart_limit")) == 1
    assert servers_of(state_dir / "pgdata") == []


async def test_close_after_a_restart_stops_the_new_server(state_dir: Path) -> None:
    pgdata = state_dir / "pgdata"
    with capture_logs() as logs:
        async with open_database(state_dir) as db, anyio.create_task_group() as tg:
            tg.start_soon(db.supervise)
            _, new = await kill_and_wait_for_restart(db, logs)
            assert servers_of(pgdata) == [new]
            await db.close()  # supervise still runs: it must not start the server again
            assert not _process_serves(new, pgdata)
            assert not (pgdata / "postmaster.pid").exists()
            # its next look finds the database closing, and it stands down
            await until(lambda: bool(events(logs, "embedded_postgres.supervision_ended")), "ended")
            assert servers_of(pgdata) == []
            tg.cancel_scope.cancel()
    assert len(events(logs, "embedded_postgres.restarted")) == 1
    assert len(events(logs, "embedded_postgres.stopped")) == 1


async def kill_daemon_postmaster(proc: DaemonProcess) -> int:
    """SIGKILL the daemon's embedded postmaster; wait until it says it started another."""
    info = postmaster(proc.state_dir)
    assert info is not None and info.status == "ready"
    restarts = proc.log_text().count("embedded_postgres.restarted")
    os.kill(info.pid, signal.SIGKILL)
    await until(
        lambda: proc.log_text().count("embedded_postgres.restarted") > restarts, "started again"
    )
    now = postmaster(proc.state_dir)
    assert now is not None and now.pid != info.pid and now.status == "ready"
    assert _process_serves(now.pid, proc.state_dir / "pgdata")
    return info.pid


async def status_when_back(client: ControlClient) -> dict[str, Any]:
    """daemon.status, once the daemon reaches the database again (-32005 meanwhile)."""
    with anyio.fail_after(DEADLINE):
        while True:
            try:
                result: dict[str, Any] = await client.call("daemon.status")
            except RemoteError as exc:
                if exc.code != -32005:
                    raise
                await anyio.sleep(0.1)
            else:
                return result


async def test_daemon_process_survives_its_postgres_being_killed(
    short_tmp: Path, relay: Relay
) -> None:
    async with daemon_process(short_tmp, None) as proc:
        try:
            await proc.start()
            first = await kill_daemon_postmaster(proc)
            async with ControlClient.connect(proc.socket_path, timeout=DEADLINE) as client:
                await status_when_back(client)
                created = await client.call(
                    "supervisor.create", {"name": "after-crash", "command": relay.command}
                )
                agent = await relay.accept()
                await agent.expect("start")
                await agent.request({"type": "phase", "phase": "recovered"})
                listed = await client.call("supervisor.list", {})
                await agent.request({"type": "done"})
                body = await client.call(
                    "supervisor.get", {"supervisor_id": created["supervisor_id"]}
                )
            assert created["supervisor_id"] in {s["supervisor_id"] for s in listed["supervisors"]}
            assert body["state"] == "completed" and body["phase"] == "recovered"
            assert "embedded_postgres.restarted" in proc.log_text()
            current = postmaster(proc.state_dir)
            assert current is not None and current.pid != first
            assert await proc.terminate() == 0, proc.log_text()[-3000:]
            # SIGTERM stopped the server running then, the one started again.
            assert servers_of(proc.state_dir / "pgdata") == []
        finally:
            await anyio.to_thread.run_sync(EmbeddedPostgres(proc.state_dir).stop)


async def test_daemon_process_exits_non_zero_when_postgres_keeps_dying(short_tmp: Path) -> None:
    """Past the restart limit (5 within 60 s by default) the daemon gives up and
    exits with a failure, for systemd to restart it whole."""
    async with daemon_process(short_tmp, None) as proc:
        try:
            await proc.start()
            for _ in range(5):
                await kill_daemon_postmaster(proc)
            info = postmaster(proc.state_dir)
            assert info is not None
            os.kill(info.pid, signal.SIGKILL)
            code = await proc.wait(DEADLINE)
            log = proc.log_text()
            assert code == 1, log[-3000:]
            assert "embedded_postgres.restart_limit" in log
            assert "5 times within 60s" in log
            assert "ExceptionGroup" not in log  # one line says why, no traceback
            assert servers_of(proc.state_dir / "pgdata") == []
        finally:
            await anyio.to_thread.run_sync(EmbeddedPostgres(proc.state_dir).stop)

"""The embedded PostgreSQL: private, reused after a crash, restarted over a stale pid file."""

from __future__ import annotations

import contextlib
import os
import pwd
import signal
import socket
import stat
import time
import warnings
from collections.abc import Iterator
from pathlib import Path

import asyncpg
import pytest

from makima.database import SCHEMA_VERSION, Database, DatabaseConfig
from makima.embedded import ConnectParams, EmbeddedPostgres, _process_serves
from tests.harness import until

pytestmark = pytest.mark.anyio


@pytest.fixture
def state_dir(short_tmp: Path, request: pytest.FixtureRequest) -> Path:
    path = short_tmp / f"s{abs(hash(request.node.name)) % 10**8}"
    return path


@pytest.fixture
def server(state_dir: Path) -> Iterator[EmbeddedPostgres]:
    pg = EmbeddedPostgres(state_dir)
    yield pg
    with contextlib.suppress(Exception):
        EmbeddedPostgres(state_dir).stop()


async def query(params: ConnectParams, sql: str) -> object:
    conn = await asyncpg.connect(**params.asyncpg_kwargs(database="postgres"))
    try:
        return await conn.fetchval(sql)
    finally:
        await conn.close()


async def test_socket_only_and_password_required(server: EmbeddedPostgres, state_dir: Path) -> None:
    params = server.start()
    modes = {
        p: p.stat().st_mode & 0o777
        for p in (Path(params.host), state_dir / "embedded-postgres.json", state_dir / "pgdata")
    }
    assert list(modes.values()) == [0o700, 0o600, 0o700]
    assert await query(params, "SHOW listen_addresses") == ""
    assert await query(params, "SHOW unix_socket_permissions") == "0700"
    with pytest.raises(
        (asyncpg.InvalidPasswordError, asyncpg.InvalidAuthorizationSpecificationError)
    ):
        await asyncpg.connect(
            host=params.host,
            port=params.port,
            user=params.user,
            password="wrong",
            database="postgres",
        )
    server.stop()
    assert not (state_dir / "pgdata" / "postmaster.pid").exists()


@pytest.mark.skipif(os.geteuid() != 0, reason="switching to the nobody account needs root")
def test_another_local_user_is_refused(server: EmbeddedPostgres) -> None:
    """An unprivileged account (nobody) cannot even reach the server's socket."""
    params = server.start()
    socket_path = f"{params.host}/.s.PGSQL.{params.port}"
    nobody = pwd.getpwnam("nobody")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)  # fork in a threaded process
        pid = os.fork()
    if pid == 0:  # child: become nobody, try to connect, report by exit status
        code = 3
        try:
            os.setgroups([])
            os.setgid(nobody.pw_gid)
            os.setuid(nobody.pw_uid)
            probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            try:
                probe.connect(socket_path)
                code = 1  # reached the server: the test fails
            except PermissionError:
                code = 0  # refused by the operating system
            except OSError:
                code = 2
        finally:
            os._exit(code)
    _, status = os.waitpid(pid, 0)
    assert os.WEXITSTATUS(status) == 0, "nobody was not refused (1: connected, 2: other error)"
    # root, by contrast, reaches it (with the password)
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    probe.connect(socket_path)
    probe.close()
    server.stop()


async def test_reused_when_still_running_after_a_crash(
    server: EmbeddedPostgres, state_dir: Path
) -> None:
    first = server.start()
    pid = server.pid
    await query(first, "CREATE TABLE kept (x int)")
    # A new daemon (a new handle on the same state dir) finds the server running.
    again = EmbeddedPostgres(state_dir)
    params = again.start()
    assert again.pid == pid
    assert params == first
    assert await query(params, "SELECT count(*) FROM kept") == 0
    again.stop()
    assert pid is not None and not _process_serves(pid, state_dir / "pgdata")
    server.stop()  # a second stop is harmless


async def test_started_again_over_a_stale_pid_file(
    server: EmbeddedPostgres, state_dir: Path
) -> None:
    params = server.start()
    await query(params, "CREATE TABLE survived AS SELECT 1 AS x")
    pid = server.pid
    assert pid is not None
    os.kill(pid, signal.SIGKILL)  # the server dies hard; postmaster.pid stays behind
    assert server._process is not None
    server._process.wait(timeout=20)
    assert (state_dir / "pgdata" / "postmaster.pid").exists()
    fresh = EmbeddedPostgres(state_dir)
    params = fresh.start()
    assert fresh.pid != pid
    assert await query(params, "SELECT sum(x) FROM survived") == 1  # recovered from WAL
    fresh.stop()


async def test_pid_file_naming_an_unrelated_live_process(
    server: EmbeddedPostgres, state_dir: Path
) -> None:
    server.start()
    server.stop()
    pid_file = state_dir / "pgdata" / "postmaster.pid"
    # A pid file left behind whose pid now belongs to someone else (here: this test).
    pid_file.write_text(f"{os.getpid()}\n{state_dir / 'pgdata'}\n0\n5432\n/tmp\n\n0 0\nready\n")
    handle = EmbeddedPostgres(state_dir)
    params = handle.start()
    assert await query(params, "SELECT 1") == 1
    handle.stop()


async def test_database_open_and_close_with_embedded_default(state_dir: Path) -> None:
    db = await Database.open(
        DatabaseConfig(state_dir=state_dir, min_connections=1, max_connections=2)
    )
    try:
        assert db.is_embedded
        assert await db.pool.fetchval("SELECT version FROM makima_schema") == SCHEMA_VERSION
        assert await db.pool.fetchval("SELECT current_database()") == "makima"
    finally:
        await db.close()
    assert not (state_dir / "pgdata" / "postmaster.pid").exists()
    # and a second open reuses the data
    db = await Database.open(
        DatabaseConfig(state_dir=state_dir, min_connections=1, max_connections=2)
    )
    await db.close()


async def test_database_open_with_url(db_params: ConnectParams) -> None:
    url = (
        f"postgresql://{db_params.user}:{db_params.password}@/{db_params.database}"
        f"?host={db_params.host}&port={db_params.port}"
    )
    db = await Database.open(
        DatabaseConfig(
            state_dir=Path("/nonexistent"), url=url, min_connections=1, max_connections=2
        )
    )
    try:
        assert not db.is_embedded
        assert await db.pool.fetchval("SELECT count(*) FROM supervisors") == 0
    finally:
        await db.close()


def _zombie_children() -> list[int]:
    """This process's children that have exited and not been reaped."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        state, ppid = stat.rsplit(")", 1)[1].split()[:2]
        if state == "Z" and int(ppid) == os.getpid():
            found.append(int(entry.name))
    return found


async def test_started_again_while_the_killed_server_is_unreaped(
    server: EmbeddedPostgres, state_dir: Path
) -> None:
    """A killed server nobody reaped (a zombie) still "exists" for PostgreSQL's lock
    check: its socket lock file used to stop the next start."""
    params = server.start()
    await query(params, "CREATE TABLE survived AS SELECT 1 AS x")
    pid = server.pid
    assert pid is not None and server._process is not None
    os.kill(pid, signal.SIGKILL)
    lock = Path(params.host) / f".s.PGSQL.{params.port}.lock"
    try:
        await until(lambda: pid in _zombie_children(), "dead, and deliberately not reaped")
        assert lock.read_text().split("\n", 1)[0] == str(pid)
        fresh = EmbeddedPostgres(state_dir)
        params = fresh.start()
        assert fresh.pid != pid
        assert await query(params, "SELECT sum(x) FROM survived") == 1  # recovered from WAL
        assert lock.read_text().split("\n", 1)[0] == str(fresh.pid)
        fresh.stop()
    finally:
        server._process.wait(timeout=20)


def test_stop_stops_the_server_running_now(server: EmbeddedPostgres, state_dir: Path) -> None:
    """The server was started again behind this handle's back: stop() stops the new
    one (found through postmaster.pid), not the dead one it knew."""
    server.start()
    first = server.pid
    assert first is not None and server._process is not None
    os.kill(first, signal.SIGKILL)
    server._process.wait(timeout=20)
    other = EmbeddedPostgres(state_dir)
    other.start()
    second = other.pid
    assert second is not None and second != first
    server.stop()
    assert not _process_serves(second, state_dir / "pgdata")
    assert not (state_dir / "pgdata" / "postmaster.pid").exists()
    other._reap()


def test_restart_after_the_server_died(server: EmbeddedPostgres, state_dir: Path) -> None:
    params = server.start()
    first = server.pid
    assert first is not None and server.is_running()
    os.kill(first, signal.SIGKILL)
    deadline = time.monotonic() + 20
    while server.is_running():  # asking reaps the dead child
        assert time.monotonic() < deadline, "the killed server did not exit"
        time.sleep(0.05)
    assert server.exit_status == -signal.SIGKILL
    assert first not in _zombie_children()
    again = server.restart()
    assert again == params  # same socket, same credentials: the pool need not change
    assert server.pid not in (None, first) and server.is_running()
    server.stop()
    assert not server.is_running()


@pytest.mark.parametrize("existing", [False, True])
def test_postgres_log_is_private(server: EmbeddedPostgres, state_dir: Path, existing: bool) -> None:
    """postgres.log records failed statements: mode 0600, also when it existed as 0644."""
    if existing:
        state_dir.mkdir(mode=0o700)
        server.log_file.write_text("an earlier run\n")
        server.log_file.chmod(0o644)
    server.start()
    assert stat.S_IMODE(server.log_file.stat().st_mode) == 0o600
    server.stop()
    content = server.log_file.read_text()
    assert "database system is ready to accept connections" in content  # the server wrote it
    assert content.startswith("an earlier run\n") == existing
    assert stat.S_IMODE(server.log_file.stat().st_mode) == 0o600
